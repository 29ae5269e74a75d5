//! The websocket under every client of the kit and the bench: the Engine.IO endpoint of a base
//! URL, the connection (optionally over a TCP socket the caller prepared) and the join of
//! namespace `/`.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};

use crate::{
    client::{ClientError, Event},
    codec::{self, Packet, SocketPacket},
};

/// A websocket to a server.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A websocket that has joined namespace `/`.
pub struct Joined {
    pub ws: Ws,
    /// The Socket.IO session id from the server's CONNECT answer.
    pub sid: String,
    /// Events that arrived before the CONNECT answer, in order.
    pub early_events: Vec<Event>,
}

/// Turns `http://host:port` (or https/ws/wss) into the Engine.IO websocket endpoint URL.
pub fn websocket_url(base_url: &str) -> Result<String, ClientError> {
    let trimmed = base_url.trim().trim_end_matches('/');
    let (scheme, rest) = trimmed
        .split_once("://")
        .ok_or_else(|| ClientError::InvalidUrl(base_url.to_owned()))?;
    let ws_scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        _ => return Err(ClientError::InvalidUrl(base_url.to_owned())),
    };
    if rest.is_empty() {
        return Err(ClientError::InvalidUrl(base_url.to_owned()));
    }
    Ok(format!(
        "{ws_scheme}://{rest}/socket.io/?EIO=4&transport=websocket"
    ))
}

/// The clients' websocket settings: a 4 KiB read buffer (tungstenite allocates 128 KiB per
/// connection up front by default, which 100 000 bench connections cannot afford); it grows
/// for a larger frame.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

/// Connects to `base_url` over websocket and joins `/` with `auth`, all within `limit`.
pub async fn join(
    base_url: &str,
    auth: Option<&Value>,
    limit: Duration,
) -> Result<Joined, ClientError> {
    // TCP_NODELAY: small frames are not held back (the servers set it too).
    join_by(base_url, auth, limit, |url| {
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
    })
    .await
}

/// Like [`join`] over `stream`, a TCP connection to the server the caller set up itself (for
/// socket options a plain connect does not set).
pub async fn join_over(
    stream: TcpStream,
    base_url: &str,
    auth: Option<&Value>,
    limit: Duration,
) -> Result<Joined, ClientError> {
    join_by(base_url, auth, limit, |url| {
        tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(stream),
            Some(ws_config()),
        )
    })
    .await
}

/// `IP_BIND_ADDRESS_NO_PORT`: the bind takes the address only, and the port is chosen at
/// connect, unique per destination. A bind to port 0 otherwise reserves a port of the odd half
/// of the range for good, and thousands of bench connections from one address ran out of them
/// and then took the ports plain connects (the database's, Redis's) need.
fn bind_address_no_port(socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a setsockopt of an int option on a socket this function borrows, with the
    // option's size.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A TCP connection to `base_url`'s host and port from the local address `local` (any of
/// 127.0.0.0/8 on loopback): a client of another address, as the node counts them.
pub async fn tcp_from(base_url: &str, local: std::net::IpAddr) -> Result<TcpStream, ClientError> {
    let authority = base_url
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'))
        .ok_or_else(|| ClientError::InvalidUrl(base_url.to_owned()))?;
    let server: std::net::SocketAddr = authority
        .parse()
        .map_err(|_| ClientError::InvalidUrl(base_url.to_owned()))?;
    let socket = match local {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(ClientError::Io)?;
    bind_address_no_port(&socket).map_err(ClientError::Io)?;
    socket
        .bind(std::net::SocketAddr::new(local, 0))
        .map_err(ClientError::Io)?;
    let stream = socket.connect(server).await.map_err(ClientError::Io)?;
    stream.set_nodelay(true).map_err(ClientError::Io)?;
    Ok(stream)
}

/// Opens the websocket to `base_url`'s endpoint with `open` and joins `/`, within `limit`.
async fn join_by<F, Fut, R>(
    base_url: &str,
    auth: Option<&Value>,
    limit: Duration,
    open: F,
) -> Result<Joined, ClientError>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<(Ws, R), tokio_tungstenite::tungstenite::Error>>,
{
    let url = websocket_url(base_url)?;
    let join = async {
        let (ws, _response) = open(url).await?;
        handshake(ws, auth).await
    };
    tokio::time::timeout(limit, join)
        .await
        .unwrap_or(Err(ClientError::ConnectTimeout(limit)))
}

/// Reads the Engine.IO open packet, sends CONNECT and waits for the namespace's answer.
async fn handshake(mut ws: Ws, auth: Option<&Value>) -> Result<Joined, ClientError> {
    let mut opened = false;
    let mut early_events = Vec::new();
    while let Some(frame) = ws.next().await {
        let text = match frame? {
            Message::Text(text) => text,
            Message::Close(_) => return Err(ClientError::Closed),
            _ => continue,
        };
        match codec::decode(text.as_str())? {
            Packet::Open(open) if !opened => {
                tracing::debug!(%open, "engine.io open");
                opened = true;
                ws.send(Message::text(codec::encode_connect(auth))).await?;
            }
            Packet::Open(_) => {
                return Err(codec::ProtocolError("second Engine.IO open packet".into()).into());
            }
            Packet::Close => return Err(ClientError::Closed),
            Packet::Ping(payload) => ws.send(Message::text(codec::encode_pong(&payload))).await?,
            Packet::Pong | Packet::Noop => {}
            Packet::Socket { nsp, .. } if nsp != "/" => {}
            Packet::Socket { packet, .. } if !opened => {
                let message = format!("{packet:?} before the open packet");
                return Err(codec::ProtocolError(message).into());
            }
            Packet::Socket { packet, .. } => match packet {
                SocketPacket::Connect(payload) => {
                    let sid = payload
                        .as_ref()
                        .and_then(|p| p.get("sid"))
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            codec::ProtocolError(format!("CONNECT answer without sid: {payload:?}"))
                        })?
                        .to_owned();
                    return Ok(Joined {
                        ws,
                        sid,
                        early_events,
                    });
                }
                SocketPacket::ConnectError(message) => {
                    return Err(ClientError::ConnectRejected(message));
                }
                SocketPacket::Disconnect => return Err(ClientError::Closed),
                SocketPacket::Event { name, args, .. } => early_events.push((name, args)),
                SocketPacket::Ack { .. } | SocketPacket::Binary => {}
            },
        }
    }
    Err(ClientError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_base_urls() {
        let url = |base: &str| websocket_url(base).expect("a valid base url");
        assert_eq!(
            url("http://127.0.0.1:3000"),
            "ws://127.0.0.1:3000/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(
            url("http://localhost:3000/"),
            "ws://localhost:3000/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(
            url("https://h"),
            "wss://h/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(
            url("ws://h:1"),
            "ws://h:1/socket.io/?EIO=4&transport=websocket"
        );
        assert!(matches!(
            websocket_url("127.0.0.1:3000"),
            Err(ClientError::InvalidUrl(_))
        ));
        assert!(matches!(
            websocket_url("ftp://h"),
            Err(ClientError::InvalidUrl(_))
        ));
    }
}
