//! The tests' Socket.IO v5 client: websocket only, namespace `/`, with the contract's verbs
//! (send a chat message, read the ack, read the next chat message).
//!
//! The client answers Engine.IO pings, routes ack replies to their waiters by id and queues
//! every incoming event on a channel. Writes go through an mpsc channel to a writer task, so
//! sending only needs `&self`. The verbs ([`Client::send`] and the like) panic with a message
//! when the server does not answer, as test helpers do; the `emit` methods and
//! [`Client::try_send`] return the error, for tests that expect one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::codec::{self, CHAT_MESSAGE, Packet, ProtocolError, SocketPacket};
use crate::transport::{self, Ws};

/// How long [`Client::connect`] waits for the websocket and the Socket.IO handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the verbs wait for an ack: a commit on a loaded test machine, with margin.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Capacity of the queue of outgoing frames in front of the writer task.
const OUTGOING_CAPACITY: usize = 1024;

/// How long [`Client::close`] waits for the server to finish the closing handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

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
    /// A TCP connection could not be set up.
    #[error("tcp: {0}")]
    Io(std::io::Error),
    /// The server answered the Socket.IO CONNECT with a `connect_error` packet.
    #[error("server rejected the connection: {0}")]
    ConnectRejected(String),
    /// The server sent something that is not valid Socket.IO / Engine.IO.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
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

/// A message of any room as a client received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its room: `None` for the default room (a `chat message`).
    pub room: Option<String>,
    /// Its text.
    pub content: String,
    /// Its offset in its room.
    pub offset: i64,
    /// Its sender's name.
    pub sender: String,
}

/// The server's answer to a send: the ack's arguments. The contract acks a stored send with
/// no error and refuses invalid input with `{ error: { code, message } }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack(pub Vec<Value>);

impl Ack {
    /// The ack's arguments as sent.
    pub fn args(&self) -> &[Value] {
        &self.0
    }

    /// The error code, when the send was refused.
    pub fn error_code(&self) -> Option<&str> {
        codec::ack_error(&self.0)?.get("code")?.as_str()
    }

    /// The error message, when the send was refused.
    pub fn error_message(&self) -> Option<&str> {
        codec::ack_error(&self.0)?.get("message")?.as_str()
    }

    /// The success payload's field `key` (`serverOffset`, `room`, `head`), when the request was
    /// accepted.
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.0.get(1)?.get(key)
    }

    /// The `serverOffset` a stored send was acked with.
    #[track_caller]
    pub fn offset(&self) -> i64 {
        self.field("serverOffset")
            .and_then(Value::as_i64)
            .unwrap_or_else(|| panic!("no serverOffset in the ack {:?}", self.0))
    }

    /// Whether the send was accepted (the ack carries no error).
    pub fn is_ok(&self) -> bool {
        codec::ack_error(&self.0).is_none()
    }

    /// Fails the test when the ack carries an error.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(self.is_ok(), "the send was refused: {:?}", self.0);
    }
}

/// Fails the test unless every send was acked without an error.
#[track_caller]
pub fn assert_acked(acks: impl IntoIterator<Item = Ack>) {
    for ack in acks {
        ack.assert_ok();
    }
}

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
            // The waiter may have timed out in between; its reply is dropped then.
            Some(tx) => drop(tx.send(args)),
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
        let joined = transport::join(base_url, auth.as_ref(), CONNECT_TIMEOUT).await?;
        Self::start(joined)
    }

    /// Like [`Client::connect`] from the local address `local` (on loopback, any of
    /// 127.0.0.0/8): a client of its own address, as the node counts them.
    pub async fn connect_from(
        base_url: &str,
        local: std::net::IpAddr,
        auth: Option<Value>,
    ) -> Result<Client, ClientError> {
        let stream = transport::tcp_from(base_url, local).await?;
        let joined = transport::join_over(stream, base_url, auth.as_ref(), CONNECT_TIMEOUT).await?;
        Self::start(joined)
    }

    fn start(joined: transport::Joined) -> Result<Client, ClientError> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        for event in joined.early_events {
            // The receiver is `events_rx`, held below: this cannot fail.
            let _ = events_tx.send(event);
        }

        let (sink, stream) = joined.ws.split();
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
            sid: joined.sid,
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

    /// The contract's send, `socket.emit('chat message', content, clientOffset)`: waits up to
    /// [`ACK_TIMEOUT`] for the ack and fails the test if none comes.
    pub async fn send(&self, content: &str, client_offset: Option<&str>) -> Ack {
        self.try_send(content, client_offset, ACK_TIMEOUT)
            .await
            .unwrap_or_else(|e| {
                panic!("no ack for chat message {content:?} (client offset {client_offset:?}): {e}")
            })
    }

    /// The same send repeated, as the tutorial's client retries, until it is acked: up to
    /// `attempts` tries of `per_try` each; fails the test when none is acked.
    pub async fn send_until_acked(
        &self,
        content: &str,
        client_offset: Option<&str>,
        per_try: Duration,
        attempts: usize,
    ) -> Ack {
        for _ in 0..attempts {
            if let Ok(ack) = self.try_send(content, client_offset, per_try).await {
                return ack;
            }
        }
        panic!(
            "{content:?} (client offset {client_offset:?}) not acked in {attempts} tries of {per_try:?}"
        )
    }

    /// Like [`Client::send`], returning the error when no ack arrives within `timeout`.
    pub async fn try_send(
        &self,
        content: &str,
        client_offset: Option<&str>,
        timeout: Duration,
    ) -> Result<Ack, ClientError> {
        self.ask(timeout, |id| {
            codec::encode_chat_message(content, client_offset, Some(id))
        })
        .await
        .map(Ack)
    }

    /// Sends `chat message` with arbitrary `args` (invalid input, say) and waits for the ack.
    pub async fn send_args(&self, args: &[Value]) -> Ack {
        self.emit_with_ack(CHAT_MESSAGE, args.to_vec(), ACK_TIMEOUT)
            .await
            .map(Ack)
            .unwrap_or_else(|e| panic!("no ack for chat message {args:?}: {e}"))
    }

    /// `join(room, lastOffset)`: waits for the ack (`{ room, head }` or an error).
    pub async fn join(&self, room: &str, last_offset: Option<i64>) -> Ack {
        self.request(codec::JOIN, vec![json!(room), json!(last_offset)])
            .await
    }

    /// `leave(room)`: waits for the ack.
    pub async fn leave(&self, room: &str) -> Ack {
        self.request(codec::LEAVE, vec![json!(room)]).await
    }

    /// `room message(room, content, clientOffset)`: waits for the ack (`{ room, serverOffset }`
    /// after commit, or an error). `room` `None` is the default room.
    pub async fn send_to(
        &self,
        room: Option<&str>,
        content: &str,
        client_offset: Option<&str>,
    ) -> Ack {
        self.request(
            codec::ROOM_MESSAGE,
            vec![json!(room), json!(content), json!(client_offset)],
        )
        .await
    }

    /// Like [`Client::send_to`], returning the error when no ack arrives within `timeout`.
    pub async fn try_send_to(
        &self,
        room: &str,
        content: &str,
        client_offset: Option<&str>,
        timeout: Duration,
    ) -> Result<Ack, ClientError> {
        let args = vec![json!(room), json!(content), json!(client_offset)];
        self.emit_with_ack(codec::ROOM_MESSAGE, args, timeout)
            .await
            .map(Ack)
    }

    /// `private message(to, content, clientOffset)`: waits for the ack.
    pub async fn send_private(&self, to: &str, content: &str, client_offset: Option<&str>) -> Ack {
        self.request(
            codec::PRIVATE_MESSAGE,
            vec![json!(to), json!(content), json!(client_offset)],
        )
        .await
    }

    /// `who(room)`: waits for the ack (`{ room, people }`). `room` `None` is the default room.
    pub async fn who(&self, room: Option<&str>) -> Ack {
        self.request("who", vec![json!(room)]).await
    }

    /// `typing(room, typing)`: waits for the ack.
    pub async fn typing(&self, room: Option<&str>, typing: bool) -> Ack {
        self.request("typing", vec![json!(room), json!(typing)])
            .await
    }

    /// Waits up to `timeout` for the next `event`, skipping every other; its arguments.
    pub async fn next_named(
        &mut self,
        event: &str,
        timeout: Duration,
    ) -> Result<Vec<Value>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (name, args) = self.next_event(left).await?;
            if name == event {
                return Ok(args);
            }
        }
    }

    /// Emits `event` with `args` and waits up to [`ACK_TIMEOUT`] for its ack; fails the test if
    /// none comes.
    pub async fn request(&self, event: &str, args: Vec<Value>) -> Ack {
        self.emit_with_ack(event, args.clone(), ACK_TIMEOUT)
            .await
            .map(Ack)
            .unwrap_or_else(|e| panic!("no ack for {event} {args:?}: {e}"))
    }

    /// Waits up to `timeout` for the next message of any room, skipping other events: a `chat
    /// message` (the default room) or a `room message`.
    pub async fn next_delivery(&mut self, timeout: Duration) -> Result<Delivery, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (name, args) = self.next_event(left).await?;
            match name.as_str() {
                CHAT_MESSAGE => {
                    let (content, offset) = codec::parse_chat_message(&args)?;
                    let (sender, _) = codec::parse_sender(&args)?;
                    return Ok(Delivery {
                        room: None,
                        content,
                        offset,
                        sender,
                    });
                }
                codec::ROOM_MESSAGE => {
                    let room = args.first().and_then(Value::as_str).map(str::to_owned);
                    let rest = args.get(1..).unwrap_or_default();
                    let (content, offset) = codec::parse_chat_message(rest)?;
                    let (sender, _) = codec::parse_sender(rest)?;
                    return Ok(Delivery {
                        room,
                        content,
                        offset,
                        sender,
                    });
                }
                _ => {}
            }
        }
    }

    /// The contract's send without asking for an ack (a client that fires and forgets).
    pub async fn send_no_ack(&self, content: &str, client_offset: Option<&str>) {
        let frame = codec::encode_chat_message(content, client_offset, None);
        self.send_frame(Message::text(frame))
            .await
            .unwrap_or_else(|e| panic!("could not send chat message {content:?}: {e}"));
    }

    /// Emits `event` with `args` without asking for an ack.
    pub async fn emit(&self, event: &str, args: Vec<Value>) -> Result<(), ClientError> {
        self.send_frame(Message::text(codec::encode_event(event, &args, None)))
            .await
    }

    /// Emits `event` with `args` and waits up to `timeout` for the server's ack arguments.
    pub async fn emit_with_ack(
        &self,
        event: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Vec<Value>, ClientError> {
        self.ask(timeout, |id| codec::encode_event(event, &args, Some(id)))
            .await
    }

    /// Sends the frame `encode` builds for a fresh ack id, and waits up to `timeout` for the ack.
    async fn ask(
        &self,
        timeout: Duration,
        encode: impl FnOnce(u64) -> String,
    ) -> Result<Vec<Value>, ClientError> {
        let id = self.next_ack_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.acks.register(id, tx)?;
        if let Err(err) = self.send_frame(Message::text(encode(id))).await {
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
            if name == CHAT_MESSAGE {
                return Ok(codec::parse_chat_message(&args)?);
            }
            tracing::debug!(event = %name, "skipping non-chat event");
        }
    }

    /// The next `chat message` with its sender and time: `(content, offset, name, at)`.
    pub async fn next_chat_message_from(
        &mut self,
        timeout: Duration,
    ) -> Result<(String, i64, String, i64), ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (name, args) = self.next_event(left).await?;
            if name == CHAT_MESSAGE {
                let (content, offset) = codec::parse_chat_message(&args)?;
                let (sender, at) = codec::parse_sender(&args)?;
                return Ok((content, offset, sender, at));
            }
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
        // Either send fails only when the writer is already gone, which is the goal anyway.
        let _ = self.out_tx.send(Message::text(codec::DISCONNECT)).await;
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

/// A websocket client that joins the chat on `port` and then never reads: a slow consumer.
/// Its receive buffer and segment size are made small, so the kernel buffers on both sides
/// (which Linux sizes from the segment size) fill within seconds, not minutes. Hold the
/// returned websocket for as long as the consumer should stay connected.
pub async fn slow_consumer(port: u16) -> Ws {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.set_tcp_mss(536).expect("TCP_MAXSEG");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    socket.connect(&addr.into()).expect("connect");
    socket.set_nonblocking(true).expect("nonblocking");
    let stream =
        tokio::net::TcpStream::from_std(std::net::TcpStream::from(socket)).expect("tokio stream");
    let base_url = format!("http://127.0.0.1:{port}");
    transport::join_over(stream, &base_url, None, CONNECT_TIMEOUT)
        .await
        .expect("the slow consumer joins the chat")
        .ws
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
    // The queue ended: the client is gone, and so may be the connection.
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
        let packet = match codec::decode(text.as_str()) {
            Ok(packet) => packet,
            Err(err) => {
                tracing::warn!(%err, "ignoring undecodable frame");
                continue;
            }
        };
        match packet {
            Packet::Ping(payload) => {
                let pong = Message::text(codec::encode_pong(&payload));
                if out_tx.send(pong).await.is_err() {
                    break;
                }
            }
            Packet::Close => break,
            Packet::Open(_) | Packet::Pong | Packet::Noop => {}
            Packet::Socket { nsp, .. } if nsp != "/" => {}
            Packet::Socket { packet, .. } => match packet {
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
    // Nobody may be watching any more; the flag is for those who are.
    let _ = closed_tx.send(true);
    // Ask the writer to close the websocket too; it may already be gone.
    let _ = out_tx.try_send(Message::Close(None));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::net::TcpStream;
    use tokio_tungstenite::WebSocketStream;

    #[test]
    fn acks_say_whether_the_send_was_refused() {
        let ok = Ack(vec![]);
        assert!(ok.is_ok());
        assert_eq!(ok.error_code(), None);
        ok.assert_ok();
        assert_acked([Ack(vec![json!(null)]), Ack(vec![json!({"stored": true})])]);
        let refused = Ack(vec![
            json!({"error": {"code": "empty_content", "message": "content is empty"}}),
        ]);
        assert!(!refused.is_ok());
        assert_eq!(refused.error_code(), Some("empty_content"));
        assert_eq!(refused.error_message(), Some("content is empty"));
        let panicked = std::panic::catch_unwind(|| refused.assert_ok());
        assert!(panicked.is_err(), "assert_ok passes an error ack");
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
        let ack = client.send("hi", Some("c-1")).await;
        assert_eq!(ack.args(), [json!({"ok": true})]);
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
}
