//! A lean Socket.IO websocket connection for load generation: one task owns it, answers pings,
//! and reads `chat message` events and acks without building JSON trees (the test kit's
//! [`codec`] does the packets, its [`transport`] the join).

use std::time::Duration;

use anyhow::Context;

use chorus_testkit::{codec, transport};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

pub use chorus_testkit::codec::Lean as Frame;

/// How long a connect may take: the bench opens thousands at once on a busy machine.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// One connection, joined to namespace `/`.
pub struct Conn {
    ws: transport::Ws,
    next_ack: u64,
}

impl Conn {
    /// Connects to `base` (`http://host:port`) over websocket and joins `/` with `auth`.
    pub async fn connect(base: &str, auth: Option<&Value>) -> anyhow::Result<Conn> {
        let joined = transport::join(base, auth, CONNECT_TIMEOUT).await?;
        Ok(Conn {
            ws: joined.ws,
            next_ack: 0,
        })
    }

    /// Like [`Conn::connect_from`] with `auth`, also returning the `chat message`s that arrived
    /// before the namespace's answer, as `(content, offset)` in order.
    pub async fn connect_early(
        base: &str,
        local: std::net::IpAddr,
        auth: Option<&Value>,
    ) -> anyhow::Result<(Conn, Vec<(String, i64)>)> {
        let stream = transport::tcp_from(base, local).await?;
        let joined = transport::join_over(stream, base, auth, CONNECT_TIMEOUT).await?;
        let early = joined
            .early_events
            .into_iter()
            .filter(|(name, _)| name == "chat message")
            .filter_map(|(_, args)| match args.as_slice() {
                [Value::String(content), offset, ..] => Some((content.clone(), offset.as_i64()?)),
                _ => None,
            })
            .collect();
        let conn = Conn {
            ws: joined.ws,
            next_ack: 0,
        };
        Ok((conn, early))
    }

    /// Like [`Conn::connect`] from the local address `local` (another client address).
    pub async fn connect_from(base: &str, local: std::net::IpAddr) -> anyhow::Result<Conn> {
        let stream = transport::tcp_from(base, local).await?;
        let joined = transport::join_over(stream, base, None, CONNECT_TIMEOUT).await?;
        Ok(Conn {
            ws: joined.ws,
            next_ack: 0,
        })
    }

    /// Emits `chat message` with `content` and `client_offset`, asking for an ack; returns the
    /// ack id.
    pub async fn emit(&mut self, content: &str, client_offset: &str) -> anyhow::Result<u64> {
        let id = self.next_ack;
        self.next_ack += 1;
        let frame = codec::encode_chat_message(content, Some(client_offset), Some(id));
        self.ws.send(Message::text(frame)).await?;
        Ok(id)
    }

    /// Emits `room message` to `room` with `content` and `client_offset`, asking for an ack;
    /// returns the ack id.
    pub async fn emit_to(
        &mut self,
        room: &str,
        content: &str,
        client_offset: &str,
    ) -> anyhow::Result<u64> {
        let id = self.next_ack;
        self.next_ack += 1;
        let frame = codec::encode_event(
            codec::ROOM_MESSAGE,
            &[room, content, client_offset],
            Some(id),
        );
        self.ws.send(Message::text(frame)).await?;
        Ok(id)
    }

    /// Joins `room` from its newest message and waits for the ack.
    pub async fn join(&mut self, room: &str) -> anyhow::Result<()> {
        let id = self.next_ack;
        self.next_ack += 1;
        let args = [serde_json::json!(room), serde_json::json!(null)];
        let frame = codec::encode_event(codec::JOIN, &args, Some(id));
        self.ws.send(Message::text(frame)).await?;
        loop {
            let frame = tokio::time::timeout(CONNECT_TIMEOUT, self.next())
                .await
                .context("no ack for a join")??
                .context("closed while joining")?;
            if let Frame::Ack { id: acked, error } = parse(&frame)
                && acked == id
            {
                anyhow::ensure!(!error, "the join of {room} was refused");
                return Ok(());
            }
        }
    }

    /// The next frame; `None` when the connection closed. Pings are answered here.
    pub async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            let Some(frame) = self.ws.next().await else {
                return Ok(None);
            };
            let frame = frame?;
            if let Message::Text(text) = &frame
                && let Frame::Ping(payload) = codec::decode_lean(text)
            {
                let pong = codec::encode_pong(payload);
                self.ws.send(Message::text(pong)).await?;
                continue;
            }
            if matches!(frame, Message::Close(_)) {
                return Ok(None);
            }
            return Ok(Some(frame));
        }
    }

    /// Drops the connection the way a lost network does to an app: no websocket close, no
    /// Socket.IO disconnect, and no FIN either (a zero linger time makes the close a reset).
    pub fn abort(self) {
        if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = self.ws.get_ref()
            && let Err(error) = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO))
        {
            eprintln!("SO_LINGER not set ({error}); this drop sends a FIN");
        }
    }

    /// Closes the websocket.
    pub async fn close(mut self) {
        // The server may have closed first; either way the connection is gone.
        let _ = self.ws.close(None).await;
    }
}

/// Reads a frame: a chat message, an ack, or something else.
pub fn parse(frame: &Message) -> Frame<'_> {
    match frame {
        Message::Text(text) => codec::decode_lean(text),
        _ => Frame::Other,
    }
}
