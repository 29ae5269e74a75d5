//! A lean Socket.IO v5 / Engine.IO v4 websocket connection for load generation: one task owns
//! it, answers pings, and reads `chat message` events and acks without building JSON trees.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a frame from the server was.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// `chat message` with its content and offset.
    Chat(&'a str, i64),
    /// The ack of our emit number `id`; `ok` is false for an error ack.
    Ack(u64, bool),
    /// Anything else (pings are answered before this is returned).
    Other,
}

/// One connection, joined to namespace `/`.
pub struct Conn {
    ws: Ws,
    next_ack: u64,
}

impl Conn {
    /// Connects to `base` (`http://host:port`) over websocket and joins `/` with `auth`
    /// (a JSON object, or none).
    pub async fn connect(base: &str, auth: Option<&str>) -> anyhow::Result<Conn> {
        let host = base
            .strip_prefix("http://")
            .with_context(|| format!("{base} is not an http:// url"))?
            .trim_end_matches('/');
        let url = format!("ws://{host}/socket.io/?EIO=4&transport=websocket");
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(20),
            tokio_tungstenite::connect_async_with_config(url, None, true),
        )
        .await
        .context("websocket connect timed out")??;
        let mut conn = Conn { ws, next_ack: 0 };
        conn.ws
            .send(Message::text(match auth {
                Some(auth) => format!("40{auth}"),
                None => "40".to_owned(),
            }))
            .await?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), conn.ws.next())
                .await
                .context("no Socket.IO CONNECT answer")?
                .context("closed during the handshake")??;
            if let Message::Text(text) = frame {
                if text.starts_with("40") {
                    return Ok(conn);
                }
                if text.starts_with("44") {
                    bail!("connect_error: {text}");
                }
            }
        }
    }

    /// Emits `chat message` with `content` and `client_offset`, asking for an ack; returns the
    /// ack id. The strings must not need JSON escaping (the bench's own contents never do).
    pub async fn emit(&mut self, content: &str, client_offset: &str) -> anyhow::Result<u64> {
        let id = self.next_ack;
        self.next_ack += 1;
        let frame = format!("42{id}[\"chat message\",\"{content}\",\"{client_offset}\"]");
        self.ws.send(Message::text(frame)).await?;
        Ok(id)
    }

    /// The next frame; `None` when the connection closed. Pings are answered here.
    pub async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            let Some(frame) = self.ws.next().await else {
                return Ok(None);
            };
            let frame = frame?;
            if let Message::Text(text) = &frame
                && text.as_str() == "2"
            {
                self.ws.send(Message::text("3")).await?;
                continue;
            }
            if matches!(frame, Message::Close(_)) {
                return Ok(None);
            }
            return Ok(Some(frame));
        }
    }

    /// Closes the websocket.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Reads a text frame: a chat message, an ack, or something else.
pub fn parse(text: &str) -> Frame<'_> {
    if let Some(rest) = text.strip_prefix("42[\"chat message\",\"") {
        if let Some((content, rest)) = rest.split_once("\",")
            && let Some(offset) = rest.strip_suffix(']')
            && let Ok(offset) = offset.trim().parse()
        {
            return Frame::Chat(content, offset);
        }
        return Frame::Other;
    }
    if let Some(rest) = text.strip_prefix("43") {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if let Ok(id) = rest[..digits].parse() {
            return Frame::Ack(id, !rest[digits..].contains("\"error\""));
        }
    }
    Frame::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read() {
        assert_eq!(
            parse("42[\"chat message\",\"b|1|2|3\",17]"),
            Frame::Chat("b|1|2|3", 17)
        );
        assert_eq!(parse("4312[]"), Frame::Ack(12, true));
        assert_eq!(parse("437[null]"), Frame::Ack(7, true));
        assert_eq!(
            parse("433[{\"error\":{\"code\":\"x\"}}]"),
            Frame::Ack(3, false)
        );
        assert_eq!(parse("40{\"sid\":\"x\"}"), Frame::Other);
    }
}
