//! The floor of the CPU figures: a websocket broadcaster with no Socket.IO library and no
//! websocket library past the handshake's key. It speaks just enough Engine.IO and Socket.IO
//! for the bench's client (the open packet, the namespace's CONNECT, `chat message` numbered
//! and broadcast, acks), frames each message once for every socket, and writes whatever a
//! socket has queued in one write: what is left is what the kernel and the framing cost.

use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

/// Frames a socket may fall behind by before it skips (the bench runs it below that).
const BACKLOG: usize = 1 << 16;
/// The longest request head or client frame it takes.
const MAX_INPUT: usize = 64 * 1024;

/// A server-to-client text frame (unmasked) around `payload`.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x81);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= 0xffff => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// One client frame from the front of `buf`: `(opcode, unmasked payload, bytes used)`, or
/// `None` while it is incomplete.
fn client_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask: [u8; 4] = if b1 & 0x80 != 0 {
        let m = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        m
    } else {
        [0; 4]
    };
    let body = buf.get(at..at + len)?;
    let payload = body
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Some((b0 & 0x0f, payload, at + len))
}

/// Numbers messages and hands their frames to every socket in that order.
struct Broadcast {
    next: Mutex<u64>,
    tx: broadcast::Sender<Arc<[u8]>>,
}

impl Broadcast {
    fn send(&self, content: &Value) -> anyhow::Result<()> {
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *next += 1;
        let packet = format!(
            "42{}",
            serde_json::to_string(&("chat message", content, *next))?
        );
        // No receiver is not an error: nobody is connected.
        let _ = self.tx.send(text_frame(packet.as_bytes()).into());
        Ok(())
    }
}

/// Serves on `PORT` (3000) of loopback until killed.
pub async fn serve() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")
        .unwrap_or_else(|_| "3000".into())
        .parse()?;
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let broadcast = Arc::new(Broadcast {
        next: Mutex::new(0),
        tx: broadcast::channel(BACKLOG).0,
    });
    let mut sessions = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        // As the other servers: small frames are not held back.
        let _ = stream.set_nodelay(true);
        sessions += 1;
        let broadcast = broadcast.clone();
        tokio::spawn(async move {
            let _ = session(stream, sessions, &broadcast).await;
        });
    }
}

/// One connection: a readiness probe, or a websocket session.
async fn session(mut stream: TcpStream, n: u64, broadcast: &Broadcast) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        anyhow::ensure!(buf.len() < MAX_INPUT, "request head too long");
        let mut chunk = [0u8; 1024];
        let got = stream.read(&mut chunk).await?;
        anyhow::ensure!(got > 0, "closed before the request head");
        buf.extend_from_slice(&chunk[..got]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    if head.starts_with("GET /readyz") {
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nready\n")
            .await?;
        return Ok(());
    }
    let key = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("not a websocket upgrade"))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let open = format!(
        r#"0{{"sid":"floor{n}","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}}"#
    );
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes();
    out.extend_from_slice(&text_frame(open.as_bytes()));
    stream.write_all(&out).await?;
    let mut rx = broadcast.tx.subscribe();
    let mut chunk = vec![0u8; 4096];
    loop {
        out.clear();
        tokio::select! {
            got = stream.read(&mut chunk) => {
                let got = got?;
                if got == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..got]);
                anyhow::ensure!(buf.len() < MAX_INPUT, "client frame too long");
                while let Some((opcode, payload, used)) = client_frame(&buf) {
                    buf.drain(..used);
                    match opcode {
                        0x8 => return Ok(()),
                        0x1 => answer(&payload, n, broadcast, &mut out)?,
                        _ => {}
                    }
                }
            }
            frame = rx.recv() => match frame {
                Ok(frame) => {
                    // Whatever else is queued goes out in the same write.
                    out.extend_from_slice(&frame);
                    loop {
                        match rx.try_recv() {
                            Ok(frame) => out.extend_from_slice(&frame),
                            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                            Err(_) => break,
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
    }
}

/// What a client's packet asks for: the namespace's CONNECT, or a message (broadcast, acked).
fn answer(packet: &[u8], n: u64, broadcast: &Broadcast, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let packet = std::str::from_utf8(packet)?;
    if packet.starts_with("40") {
        out.extend_from_slice(&text_frame(format!(r#"40{{"sid":"s{n}"}}"#).as_bytes()));
    } else if let Some(rest) = packet.strip_prefix("42") {
        let (id, args) = rest.split_at(rest.find('[').unwrap_or(rest.len()));
        let args: Vec<Value> = serde_json::from_str(args)?;
        if args.first().and_then(Value::as_str) == Some("chat message") {
            broadcast.send(args.get(1).unwrap_or(&Value::Null))?;
            if !id.is_empty() {
                out.extend_from_slice(&text_frame(format!("43{id}[]").as_bytes()));
            }
        }
    }
    Ok(())
}
