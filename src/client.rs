//! A minimal Socket.IO v5 / Engine.IO v4 client over websocket only, for integration tests and load generation.
//!
//! The client connects to the default namespace `/`, answers Engine.IO pings, routes ack
//! replies to their waiters by id and queues every incoming event on a channel. Writes go
//! through an mpsc channel to a writer task, so sending only needs `&self`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long [`Client::connect`] waits for the websocket and the Socket.IO handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Name of the event that carries chat messages in the chorus contract.
pub const CHAT_MESSAGE_EVENT: &str = "chat message";

/// Capacity of the queue of outgoing frames in front of the writer task.
const OUTGOING_CAPACITY: usize = 1024;

/// How long [`Client::close`] waits for the server to finish the closing handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Errors from the Socket.IO test client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL does not start with `http://`, `https://`, `ws://` or `wss://`.
    #[error("invalid base url {0:?}: expected an http://, https://, ws:// or wss:// url")]
    InvalidUrl(String),
    /// The websocket layer failed.
    #[error("websocket error: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The websocket or Socket.IO handshake did not finish in time.
    #[error("connect timed out after {0:?} (websocket or Socket.IO handshake not answered)")]
    ConnectTimeout(Duration),
    /// The server answered the Socket.IO CONNECT with a `connect_error` packet.
    #[error("server rejected the connection: {0}")]
    ConnectRejected(String),
    /// The server sent something that is not valid Socket.IO / Engine.IO.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No ack reply arrived within the given time.
    #[error("timed out waiting for an ack")]
    AckTimeout,
    /// No event (or no close) arrived within the given time.
    #[error("timed out")]
    Timeout,
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
}

/// An event received from the server: its name and its arguments.
pub type Event = (String, Vec<Value>);

/// Ack waiters keyed by ack id, plus whether the reader has stopped.
#[derive(Default)]
struct AckState {
    closed: bool,
    waiters: HashMap<u64, oneshot::Sender<Vec<Value>>>,
}

/// Shared handle to the ack waiters.
#[derive(Clone, Default)]
struct Acks(Arc<Mutex<AckState>>);

impl Acks {
    fn lock(&self) -> MutexGuard<'_, AckState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a waiter; fails once the reader has stopped.
    fn register(&self, id: u64, tx: oneshot::Sender<Vec<Value>>) -> Result<(), ClientError> {
        let mut state = self.lock();
        if state.closed {
            return Err(ClientError::Closed);
        }
        state.waiters.insert(id, tx);
        Ok(())
    }

    fn remove(&self, id: u64) {
        self.lock().waiters.remove(&id);
    }

    /// Hands an ack reply to its waiter, if any is still waiting.
    fn resolve(&self, id: u64, args: Vec<Value>) {
        let waiter = self.lock().waiters.remove(&id);
        match waiter {
            Some(tx) => {
                let _ = tx.send(args);
            }
            None => tracing::debug!(id, "ack for unknown or expired id"),
        }
    }

    /// Marks the connection closed and drops every waiter, which wakes them with an error.
    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.waiters.clear();
    }
}

/// A connected Socket.IO client on the default namespace `/`.
pub struct Client {
    sid: String,
    out_tx: mpsc::Sender<Message>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    acks: Acks,
    next_ack_id: AtomicU64,
    closed_rx: watch::Receiver<bool>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("sid", &self.sid)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `base_url` (like `http://127.0.0.1:3000`) and joins namespace `/`, optionally with `auth`.
    pub async fn connect(base_url: &str, auth: Option<Value>) -> Result<Client, ClientError> {
        let url = websocket_url(base_url)?;
        match tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(&url, auth)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::ConnectTimeout(CONNECT_TIMEOUT)),
        }
    }

    async fn connect_inner(url: &str, auth: Option<Value>) -> Result<Client, ClientError> {
        let (mut ws, _response) =
            tokio_tungstenite::connect_async_with_config(url, None, true).await?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let sid = handshake(&mut ws, auth.as_ref(), &events_tx).await?;

        let (sink, stream) = ws.split();
        let (out_tx, out_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let (closed_tx, closed_rx) = watch::channel(false);
        let acks = Acks::default();

        let writer = tokio::spawn(write_loop(sink, out_rx));
        let reader = tokio::spawn(read_loop(
            stream,
            out_tx.clone(),
            events_tx,
            acks.clone(),
            closed_tx,
        ));

        Ok(Client {
            sid,
            out_tx,
            events_rx,
            acks,
            next_ack_id: AtomicU64::new(0),
            closed_rx,
            reader: Some(reader),
            writer: Some(writer),
        })
    }

    /// The Socket.IO session id the server assigned in its CONNECT answer.
    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// Emits `event` with `args` without asking for an ack.
    pub async fn emit(&self, event: &str, args: Vec<Value>) -> Result<(), ClientError> {
        self.send_frame(Message::text(encode_event(event, &args, None)))
            .await
    }

    /// Emits `event` with `args` and waits up to `timeout` for the server's ack arguments.
    pub async fn emit_with_ack(
        &self,
        event: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Vec<Value>, ClientError> {
        let id = self.next_ack_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.acks.register(id, tx)?;
        let frame = Message::text(encode_event(event, &args, Some(id)));
        if let Err(err) = self.send_frame(frame).await {
            self.acks.remove(id);
            return Err(err);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                self.acks.remove(id);
                Err(ClientError::AckTimeout)
            }
        }
    }

    /// Waits up to `timeout` for the next event; queued events are still returned after a close.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Event, ClientError> {
        match tokio::time::timeout(timeout, self.events_rx.recv()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Returns the next already-received event, if there is one.
    pub fn try_next_event(&mut self) -> Option<Event> {
        self.events_rx.try_recv().ok()
    }

    /// Waits up to `timeout` for a `chat message` event, skipping others, and returns `(content, serverOffset)`.
    pub async fn next_chat_message(
        &mut self,
        timeout: Duration,
    ) -> Result<(String, i64), ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (name, args) = self.next_event(left).await?;
            if name == CHAT_MESSAGE_EVENT {
                return parse_chat_message(&args);
            }
            tracing::debug!(event = %name, "skipping non-chat event");
        }
    }

    /// Sends `text` as one raw websocket text frame, with no Socket.IO framing added.
    pub async fn send_raw(&self, text: String) -> Result<(), ClientError> {
        self.send_frame(Message::text(text)).await
    }

    /// Sends `data` as one raw websocket binary frame.
    pub async fn send_raw_binary(&self, data: Vec<u8>) -> Result<(), ClientError> {
        self.send_frame(Message::binary(data)).await
    }

    /// Whether the connection has been closed (by the server, by an error or by [`Client::close`]).
    pub fn is_closed(&self) -> bool {
        *self.closed_rx.borrow()
    }

    /// Waits up to `timeout` for the connection to close, e.g. after the server disconnects this client.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Result<(), ClientError> {
        match tokio::time::timeout(timeout, self.closed_rx.wait_for(|closed| *closed)).await {
            // An error means the reader is gone, which also means closed.
            Ok(_) => Ok(()),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Leaves the namespace (`41`), closes the websocket and waits briefly for the server to finish.
    pub async fn close(mut self) {
        let _ = self.out_tx.send(Message::text("41")).await;
        let _ = self.out_tx.send(Message::Close(None)).await;
        if let Some(writer) = self.writer.take() {
            let _ = tokio::time::timeout(CLOSE_GRACE, writer).await;
        }
        let _ = tokio::time::timeout(CLOSE_GRACE, self.closed_rx.wait_for(|closed| *closed)).await;
        // Dropping `self` aborts the reader if the server never answered the close.
    }

    async fn send_frame(&self, frame: Message) -> Result<(), ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        self.out_tx
            .send(frame)
            .await
            .map_err(|_| ClientError::Closed)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
    }
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

/// Encodes a Socket.IO EVENT for namespace `/`: `42["event",...]`, or `42<id>["event",...]` with an ack id.
pub fn encode_event(event: &str, args: &[Value], ack_id: Option<u64>) -> String {
    let mut items = Vec::with_capacity(args.len() + 1);
    items.push(Value::String(event.to_owned()));
    items.extend(args.iter().cloned());
    let payload = Value::Array(items);
    match ack_id {
        Some(id) => format!("42{id}{payload}"),
        None => format!("42{payload}"),
    }
}

/// Encodes a Socket.IO CONNECT for namespace `/`: `40`, or `40{auth}` with an auth payload.
pub fn encode_connect(auth: Option<&Value>) -> String {
    match auth {
        Some(auth) => format!("40{auth}"),
        None => "40".to_owned(),
    }
}

/// A Socket.IO packet, after its Engine.IO `4` (message) prefix and namespace are removed.
#[derive(Debug, Clone, PartialEq)]
enum SocketPacket {
    /// `0`: the namespace is joined; the payload holds the sid.
    Connect(Option<Value>),
    /// `1`: the server left the namespace.
    Disconnect,
    /// `2`: an event, with an ack id if the sender wants an ack.
    Event {
        id: Option<u64>,
        name: String,
        args: Vec<Value>,
    },
    /// `3`: an ack reply.
    Ack { id: u64, args: Vec<Value> },
    /// `4`: the connection to the namespace was refused, with the server's message.
    ConnectError(String),
    /// `5` / `6`: binary event or ack, which this client does not support.
    Binary,
}

/// One decoded websocket text frame.
#[derive(Debug, Clone, PartialEq)]
enum Incoming {
    /// Engine.IO `0`: the open packet with its handshake data.
    Open(Value),
    /// Engine.IO `1`: the server closes the transport.
    Close,
    /// Engine.IO `2`: a ping, with an optional payload to echo.
    Ping(String),
    /// Engine.IO `3`: a pong.
    Pong,
    /// Engine.IO `5` or `6`: upgrade or noop, meaningless here.
    Noop,
    /// Engine.IO `4`: a Socket.IO packet for namespace `nsp`.
    Socket { nsp: String, packet: SocketPacket },
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

/// Decodes one websocket text frame into an Engine.IO / Socket.IO packet.
fn decode(text: &str) -> Result<Incoming, ClientError> {
    let mut chars = text.chars();
    let kind = chars
        .next()
        .ok_or_else(|| protocol("empty Engine.IO packet"))?;
    let rest = chars.as_str();
    match kind {
        '0' => {
            let open: Value = serde_json::from_str(rest)
                .map_err(|e| protocol(format!("bad open packet {rest:?}: {e}")))?;
            Ok(Incoming::Open(open))
        }
        '1' => Ok(Incoming::Close),
        '2' => Ok(Incoming::Ping(rest.to_owned())),
        '3' => Ok(Incoming::Pong),
        '4' => decode_socket(rest),
        '5' | '6' => Ok(Incoming::Noop),
        other => Err(protocol(format!("unknown Engine.IO packet type {other:?}"))),
    }
}

/// Takes the leading ASCII digits of `s` and returns them with the remainder.
fn split_digits(s: &str) -> (&str, &str) {
    let end = s
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit())
        .map_or(s.len(), |(i, _)| i);
    s.split_at(end)
}

/// Decodes a Socket.IO packet (the text after the Engine.IO `4`).
fn decode_socket(text: &str) -> Result<Incoming, ClientError> {
    let mut chars = text.chars();
    let kind = chars
        .next()
        .ok_or_else(|| protocol("empty Socket.IO packet"))?;
    let mut rest = chars.as_str();

    if matches!(kind, '5' | '6') {
        let (count, after) = split_digits(rest);
        rest = after
            .strip_prefix('-')
            .filter(|_| !count.is_empty())
            .ok_or_else(|| protocol(format!("bad attachment count in {text:?}")))?;
    }

    let nsp = if rest.starts_with('/') {
        match rest.split_once(',') {
            Some((nsp, after)) => {
                rest = after;
                nsp
            }
            None => std::mem::take(&mut rest),
        }
    } else {
        "/"
    };

    let (digits, payload) = split_digits(rest);
    let id = if digits.is_empty() {
        None
    } else {
        Some(
            digits
                .parse::<u64>()
                .map_err(|e| protocol(format!("bad ack id {digits:?}: {e}")))?,
        )
    };

    let json = |what: &str| -> Result<Value, ClientError> {
        serde_json::from_str(payload)
            .map_err(|e| protocol(format!("bad {what} payload {payload:?}: {e}")))
    };
    let array = |what: &str| -> Result<Vec<Value>, ClientError> {
        match json(what)? {
            Value::Array(items) => Ok(items),
            other => Err(protocol(format!("{what} payload is not an array: {other}"))),
        }
    };

    let packet = match kind {
        '0' => SocketPacket::Connect(if payload.is_empty() {
            None
        } else {
            Some(json("connect")?)
        }),
        '1' => SocketPacket::Disconnect,
        '2' => {
            let mut items = array("event")?.into_iter();
            let Some(Value::String(name)) = items.next() else {
                return Err(protocol(format!("event without a name: {payload:?}")));
            };
            SocketPacket::Event {
                id,
                name,
                args: items.collect(),
            }
        }
        '3' => {
            let id = id.ok_or_else(|| protocol(format!("ack without id: {text:?}")))?;
            SocketPacket::Ack {
                id,
                args: array("ack")?,
            }
        }
        '4' => {
            let message = match serde_json::from_str::<Value>(payload) {
                Ok(Value::Object(mut obj)) => match obj.remove("message") {
                    Some(Value::String(message)) => message,
                    Some(other) => other.to_string(),
                    None => Value::Object(obj).to_string(),
                },
                Ok(Value::String(message)) => message,
                Ok(other) => other.to_string(),
                Err(_) => payload.to_owned(),
            };
            SocketPacket::ConnectError(message)
        }
        '5' | '6' => SocketPacket::Binary,
        other => return Err(protocol(format!("unknown Socket.IO packet type {other:?}"))),
    };
    Ok(Incoming::Socket {
        nsp: nsp.to_owned(),
        packet,
    })
}

/// Parses `chat message` args `(content: string, serverOffset: number)`.
fn parse_chat_message(args: &[Value]) -> Result<(String, i64), ClientError> {
    match args {
        [Value::String(content), offset, ..] => offset
            .as_i64()
            .map(|offset| (content.clone(), offset))
            .ok_or_else(|| protocol(format!("chat message offset is not an integer: {offset}"))),
        _ => Err(protocol(format!(
            "chat message args are not (string, number): {}",
            Value::Array(args.to_vec())
        ))),
    }
}

/// Reads the Engine.IO open packet, sends CONNECT and waits for the namespace answer; returns the sid.
async fn handshake(
    ws: &mut Ws,
    auth: Option<&Value>,
    events_tx: &mpsc::UnboundedSender<Event>,
) -> Result<String, ClientError> {
    let mut opened = false;
    while let Some(frame) = ws.next().await {
        let text = match frame? {
            Message::Text(text) => text,
            Message::Close(_) => return Err(ClientError::Closed),
            _ => continue,
        };
        match decode(text.as_str())? {
            Incoming::Open(open) if !opened => {
                tracing::debug!(%open, "engine.io open");
                opened = true;
                ws.send(Message::text(encode_connect(auth))).await?;
            }
            Incoming::Open(_) => return Err(protocol("second Engine.IO open packet")),
            Incoming::Close => return Err(ClientError::Closed),
            Incoming::Ping(payload) => ws.send(Message::text(format!("3{payload}"))).await?,
            Incoming::Pong | Incoming::Noop => {}
            Incoming::Socket { nsp, .. } if nsp != "/" => {}
            Incoming::Socket { packet, .. } if !opened => {
                return Err(protocol(format!("{packet:?} before the open packet")));
            }
            Incoming::Socket { packet, .. } => match packet {
                SocketPacket::Connect(payload) => {
                    let sid = payload
                        .as_ref()
                        .and_then(|p| p.get("sid"))
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            protocol(format!("CONNECT answer without sid: {payload:?}"))
                        })?;
                    return Ok(sid.to_owned());
                }
                SocketPacket::ConnectError(message) => {
                    return Err(ClientError::ConnectRejected(message));
                }
                SocketPacket::Disconnect => return Err(ClientError::Closed),
                SocketPacket::Event { name, args, .. } => {
                    let _ = events_tx.send((name, args));
                }
                SocketPacket::Ack { .. } | SocketPacket::Binary => {}
            },
        }
    }
    Err(ClientError::Closed)
}

/// Forwards queued frames to the websocket until the queue ends, a write fails or a close frame is sent.
async fn write_loop(mut sink: SplitSink<Ws, Message>, mut out_rx: mpsc::Receiver<Message>) {
    while let Some(frame) = out_rx.recv().await {
        let is_close = matches!(frame, Message::Close(_));
        if let Err(err) = sink.send(frame).await {
            tracing::debug!(%err, "websocket write failed");
            return;
        }
        if is_close {
            return;
        }
    }
    let _ = sink.close().await;
}

/// Reads frames until the connection ends: answers pings, resolves acks, queues events.
async fn read_loop(
    mut stream: SplitStream<Ws>,
    out_tx: mpsc::Sender<Message>,
    events_tx: mpsc::UnboundedSender<Event>,
    acks: Acks,
    closed_tx: watch::Sender<bool>,
) {
    while let Some(frame) = stream.next().await {
        let text = match frame {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(_)) => break,
            Ok(Message::Binary(data)) => {
                tracing::debug!(len = data.len(), "ignoring binary frame");
                continue;
            }
            Ok(_) => continue,
            Err(err) => {
                tracing::debug!(%err, "websocket read failed");
                break;
            }
        };
        let incoming = match decode(text.as_str()) {
            Ok(incoming) => incoming,
            Err(err) => {
                tracing::warn!(%err, "ignoring undecodable frame");
                continue;
            }
        };
        match incoming {
            Incoming::Ping(payload) => {
                if out_tx
                    .send(Message::text(format!("3{payload}")))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Incoming::Close => break,
            Incoming::Open(_) | Incoming::Pong | Incoming::Noop => {}
            Incoming::Socket { nsp, .. } if nsp != "/" => {}
            Incoming::Socket { packet, .. } => match packet {
                SocketPacket::Event { name, args, .. } => {
                    // The receiver may be gone while the client is closing; nothing to do then.
                    let _ = events_tx.send((name, args));
                }
                SocketPacket::Ack { id, args } => acks.resolve(id, args),
                SocketPacket::Disconnect => break,
                SocketPacket::ConnectError(message) => {
                    tracing::debug!(%message, "connect_error after connect");
                    break;
                }
                SocketPacket::Connect(_) | SocketPacket::Binary => {}
            },
        }
    }
    acks.close();
    let _ = closed_tx.send(true);
    // Ask the writer to close the websocket too; it may already be gone.
    let _ = out_tx.try_send(Message::Close(None));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn socket(text: &str) -> SocketPacket {
        match decode(text).unwrap() {
            Incoming::Socket { nsp, packet } => {
                assert_eq!(nsp, "/");
                packet
            }
            other => panic!("not a socket packet: {other:?}"),
        }
    }

    #[test]
    fn encodes_event_without_ack() {
        let frame = encode_event("chat message", &[json!("hi"), json!("c-1")], None);
        assert_eq!(frame, r#"42["chat message","hi","c-1"]"#);
        assert_eq!(encode_event("ping", &[], None), r#"42["ping"]"#);
    }

    #[test]
    fn encodes_event_with_ack_id() {
        assert_eq!(encode_event("x", &[json!(1)], Some(0)), r#"420["x",1]"#);
        assert_eq!(
            encode_event("x", &[json!({"a": [1, 2]})], Some(1234)),
            r#"421234["x",{"a":[1,2]}]"#
        );
    }

    #[test]
    fn encodes_connect() {
        assert_eq!(encode_connect(None), "40");
        assert_eq!(
            encode_connect(Some(&json!({"serverOffset": 5}))),
            r#"40{"serverOffset":5}"#
        );
    }

    #[test]
    fn encoded_event_round_trips() {
        let frame = encode_event("e", &[json!("a"), json!(null)], Some(77));
        assert_eq!(
            socket(&frame),
            SocketPacket::Event {
                id: Some(77),
                name: "e".into(),
                args: vec![json!("a"), json!(null)],
            }
        );
    }

    #[test]
    fn parses_event() {
        assert_eq!(
            socket(r#"42["chat message","hi",3]"#),
            SocketPacket::Event {
                id: None,
                name: "chat message".into(),
                args: vec![json!("hi"), json!(3)],
            }
        );
        assert_eq!(
            socket(r#"42["bare"]"#),
            SocketPacket::Event {
                id: None,
                name: "bare".into(),
                args: vec![],
            }
        );
    }

    #[test]
    fn parses_event_with_namespace_and_id() {
        match decode(r#"42/admin,7["x",1]"#).unwrap() {
            Incoming::Socket { nsp, packet } => {
                assert_eq!(nsp, "/admin");
                assert_eq!(
                    packet,
                    SocketPacket::Event {
                        id: Some(7),
                        name: "x".into(),
                        args: vec![json!(1)],
                    }
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_ack_with_single_and_multi_digit_ids() {
        assert_eq!(
            socket(r#"430[{"ok":true}]"#),
            SocketPacket::Ack {
                id: 0,
                args: vec![json!({"ok": true})],
            }
        );
        assert_eq!(
            socket("4312345[]"),
            SocketPacket::Ack {
                id: 12345,
                args: vec![],
            }
        );
        assert_eq!(
            socket(r#"4342["a","b"]"#),
            SocketPacket::Ack {
                id: 42,
                args: vec![json!("a"), json!("b")],
            }
        );
    }

    #[test]
    fn rejects_ack_without_id_or_bad_payload() {
        assert!(matches!(decode("43[]"), Err(ClientError::Protocol(_))));
        assert!(matches!(decode("431{}"), Err(ClientError::Protocol(_))));
        assert!(matches!(
            decode("4399999999999999999999999[]"),
            Err(ClientError::Protocol(_))
        ));
    }

    #[test]
    fn parses_connect_error() {
        assert_eq!(
            socket(r#"44{"message":"invalid serverOffset"}"#),
            SocketPacket::ConnectError("invalid serverOffset".into())
        );
        assert_eq!(
            socket(r#"44"plain""#),
            SocketPacket::ConnectError("plain".into())
        );
        assert_eq!(
            socket(r#"44{"message":"m","data":{"x":1}}"#),
            SocketPacket::ConnectError("m".into())
        );
    }

    #[test]
    fn parses_connect_and_disconnect() {
        assert_eq!(
            socket(r#"40{"sid":"abc"}"#),
            SocketPacket::Connect(Some(json!({"sid": "abc"})))
        );
        assert_eq!(socket("40"), SocketPacket::Connect(None));
        assert_eq!(socket("41"), SocketPacket::Disconnect);
    }

    #[test]
    fn parses_engine_packets() {
        let open = r#"0{"sid":"e1","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        match decode(open).unwrap() {
            Incoming::Open(v) => assert_eq!(v["pingInterval"], json!(25000)),
            other => panic!("{other:?}"),
        }
        assert_eq!(decode("1").unwrap(), Incoming::Close);
        assert_eq!(decode("2").unwrap(), Incoming::Ping(String::new()));
        assert_eq!(decode("2probe").unwrap(), Incoming::Ping("probe".into()));
        assert_eq!(decode("3").unwrap(), Incoming::Pong);
        assert_eq!(decode("6").unwrap(), Incoming::Noop);
        assert!(matches!(decode(""), Err(ClientError::Protocol(_))));
        assert!(matches!(decode("9"), Err(ClientError::Protocol(_))));
        assert!(matches!(decode("0not json"), Err(ClientError::Protocol(_))));
    }

    #[test]
    fn binary_packets_are_recognised_and_ignored() {
        assert_eq!(
            socket(r#"451-["up",{"_placeholder":true,"num":0}]"#),
            SocketPacket::Binary
        );
        assert_eq!(
            socket(r#"461-3[{"_placeholder":true,"num":0}]"#),
            SocketPacket::Binary
        );
        assert!(matches!(decode("45-[]"), Err(ClientError::Protocol(_))));
    }

    #[test]
    fn rejects_malformed_events() {
        assert!(matches!(decode("42"), Err(ClientError::Protocol(_))));
        assert!(matches!(decode("42[]"), Err(ClientError::Protocol(_))));
        assert!(matches!(decode("42[1,2]"), Err(ClientError::Protocol(_))));
        assert!(matches!(
            decode(r#"42{"a":1}"#),
            Err(ClientError::Protocol(_))
        ));
        assert!(matches!(decode("47"), Err(ClientError::Protocol(_))));
    }

    #[test]
    fn parses_chat_message_args() {
        assert_eq!(
            parse_chat_message(&[json!("hi"), json!(12)]).unwrap(),
            ("hi".to_owned(), 12)
        );
        assert!(parse_chat_message(&[json!("hi")]).is_err());
        assert!(parse_chat_message(&[json!(1), json!(2)]).is_err());
        assert!(parse_chat_message(&[json!("hi"), json!("12")]).is_err());
    }

    /// A scripted one-connection Engine.IO server on loopback; returns its base URL.
    async fn fake_server<F, Fut>(script: F) -> (String, JoinHandle<()>)
    where
        F: FnOnce(WebSocketStream<TcpStream>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            script(ws).await;
        });
        (format!("http://{addr}"), task)
    }

    async fn recv_text(ws: &mut WebSocketStream<TcpStream>) -> String {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => return t.as_str().to_owned(),
                Message::Close(_) => return "<close>".to_owned(),
                _ => {}
            }
        }
    }

    const OPEN: &str = r#"0{"sid":"eng","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;

    #[tokio::test]
    async fn talks_to_a_scripted_server() {
        let (url, server) = fake_server(|mut ws| async move {
            ws.send(Message::text(OPEN)).await.unwrap();
            assert_eq!(recv_text(&mut ws).await, r#"40{"serverOffset":5}"#);
            // A ping during the handshake is answered by the handshake itself.
            ws.send(Message::text("2")).await.unwrap();
            assert_eq!(recv_text(&mut ws).await, "3");
            ws.send(Message::text(r#"40{"sid":"sock-1"}"#))
                .await
                .unwrap();
            assert_eq!(recv_text(&mut ws).await, r#"42["hello",1]"#);
            assert_eq!(
                recv_text(&mut ws).await,
                r#"420["chat message","hi","c-1"]"#
            );
            ws.send(Message::text(r#"430[{"ok":true}]"#)).await.unwrap();
            assert_eq!(recv_text(&mut ws).await, r#"421["slow"]"#);
            ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
            ws.send(Message::text(r#"42["other"]"#)).await.unwrap();
            ws.send(Message::text(r#"42["chat message","hi",9]"#))
                .await
                .unwrap();
            assert_eq!(recv_text(&mut ws).await, "raw");
            // A late ack for the timed-out id is dropped quietly.
            ws.send(Message::text(r#"431["late"]"#)).await.unwrap();
            // A ping after the handshake is answered by the reader task.
            ws.send(Message::text("2")).await.unwrap();
            assert_eq!(recv_text(&mut ws).await, "3");
            ws.send(Message::text("41")).await.unwrap();
            let _ = ws.close(None).await;
        })
        .await;

        let mut client = Client::connect(&url, Some(json!({"serverOffset": 5})))
            .await
            .unwrap();
        assert_eq!(client.sid(), "sock-1");
        assert!(!client.is_closed());
        client.emit("hello", vec![json!(1)]).await.unwrap();
        let ack = client
            .emit_with_ack(
                "chat message",
                vec![json!("hi"), json!("c-1")],
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(ack, vec![json!({"ok": true})]);
        let slow = client
            .emit_with_ack("slow", vec![], Duration::from_millis(50))
            .await;
        assert!(matches!(slow, Err(ClientError::AckTimeout)), "{slow:?}");
        assert_eq!(
            client
                .next_chat_message(Duration::from_secs(5))
                .await
                .unwrap(),
            ("hi".to_owned(), 9)
        );
        assert!(client.try_next_event().is_none());
        client.send_raw("raw".to_owned()).await.unwrap();
        client.wait_closed(Duration::from_secs(5)).await.unwrap();
        assert!(client.is_closed());
        assert!(matches!(
            client.next_event(Duration::from_secs(1)).await,
            Err(ClientError::Closed)
        ));
        assert!(matches!(
            client.emit("late", vec![]).await,
            Err(ClientError::Closed)
        ));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn connect_error_is_reported() {
        let (url, server) = fake_server(|mut ws| async move {
            ws.send(Message::text(OPEN)).await.unwrap();
            assert_eq!(recv_text(&mut ws).await, "40");
            ws.send(Message::text(r#"44{"message":"invalid serverOffset"}"#))
                .await
                .unwrap();
        })
        .await;
        match Client::connect(&url, None).await {
            Err(ClientError::ConnectRejected(message)) => {
                assert_eq!(message, "invalid serverOffset")
            }
            other => panic!("unexpected {other:?}"),
        }
        server.await.unwrap();
    }

    #[tokio::test]
    async fn close_sends_disconnect_then_closes() {
        let (url, server) = fake_server(|mut ws| async move {
            ws.send(Message::text(OPEN)).await.unwrap();
            assert_eq!(recv_text(&mut ws).await, "40");
            ws.send(Message::text(r#"40{"sid":"s"}"#)).await.unwrap();
            assert_eq!(recv_text(&mut ws).await, "41");
            assert_eq!(recv_text(&mut ws).await, "<close>");
        })
        .await;
        let client = Client::connect(&url, None).await.unwrap();
        client.close().await;
        server.await.unwrap();
    }

    #[tokio::test]
    async fn pending_ack_fails_when_server_closes() {
        let (url, server) = fake_server(|mut ws| async move {
            ws.send(Message::text(OPEN)).await.unwrap();
            assert_eq!(recv_text(&mut ws).await, "40");
            ws.send(Message::text(r#"40{"sid":"s"}"#)).await.unwrap();
            assert_eq!(recv_text(&mut ws).await, r#"420["never"]"#);
            ws.send(Message::text("1")).await.unwrap();
        })
        .await;
        let client = Client::connect(&url, None).await.unwrap();
        let result = client
            .emit_with_ack("never", vec![], Duration::from_secs(10))
            .await;
        assert!(matches!(result, Err(ClientError::Closed)), "{result:?}");
        server.await.unwrap();
    }

    #[test]
    fn converts_base_urls() {
        assert_eq!(
            websocket_url("http://127.0.0.1:3000").unwrap(),
            "ws://127.0.0.1:3000/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(
            websocket_url("http://localhost:3000/").unwrap(),
            "ws://localhost:3000/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(
            websocket_url("https://h").unwrap(),
            "wss://h/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(
            websocket_url("ws://h:1").unwrap(),
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
