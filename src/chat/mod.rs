//! The Socket.IO side of the chat: the handshake (auth, name, rooms to recover, replay),
//! `chat message` sends, and rooms and private messages.

mod connect;
mod messages;
mod presence;
mod rooms;

use std::sync::Arc;

use serde::Serialize;
use socketioxide::{SocketIo, adapter::Adapter, extract::SocketRef, handler::ConnectHandler};
use socketioxide_core::adapter::DefinedAdapter;

use crate::{
    access::Verifier,
    config::History,
    feed::{Feed, Sink, SinkError},
    metrics::Metrics,
    peers::{AddressCounts, TrustedProxies},
    store::{Message, Store},
    writer::Writer,
};

pub use connect::{HandshakeError, requested_name, requested_offset, requested_rooms};
pub use messages::{AddressRates, EventArgs, InputError, Limits, ValidSend, parse_send};
pub use presence::Presence;

/// The event name of the tutorial's contract, both directions: the default room's messages.
pub const CHAT_MESSAGE: &str = "chat message";
/// A message of a named room or a conversation, both directions.
pub const ROOM_MESSAGE: &str = "room message";
/// A message to a person, from a client.
pub const PRIVATE_MESSAGE: &str = "private message";
/// Joining a room, from a client.
pub const JOIN: &str = "join";
/// Leaving a room, from a client.
pub const LEAVE: &str = "leave";

/// What the handlers need, shared by every socket of the node.
pub struct Chat {
    /// Where connecting sockets subscribe.
    pub feed: Feed,
    /// Where sends are stored.
    pub writer: Writer,
    /// Consulted when a client claims an offset this node has not seen yet.
    pub store: Arc<dyn Store>,
    /// How much history a new client receives.
    pub history: History,
    /// Input limits.
    pub limits: Limits,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Set: every handshake must carry a token it verifies.
    pub verifier: Option<Verifier>,
    /// Each client address's send bucket.
    pub address_rates: AddressRates,
    /// Sockets per client address, counted for clients behind a trusted proxy (direct peers
    /// are counted by their TCP connections).
    pub per_address: Arc<AddressCounts>,
    /// The load balancers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: TrustedProxies,
    /// Who is where, cluster-wide.
    pub presence: Arc<Presence>,
}

/// Registers the `/` namespace on `io`; returns what the adapter needs awaited, if anything.
pub fn register<A: Adapter + DefinedAdapter>(io: &SocketIo<A>, chat: Arc<Chat>) -> A::InitRes {
    let for_auth = chat.clone();
    // The work is done in the closure, not the future it returns: docs/DESIGN.md,
    // "Connection and handshake".
    let handler = move |socket: SocketRef<A>,
                        auth: socketioxide::extract::TryData<serde_json::Value>| {
        connect::on_connect(socket, auth.0.ok(), chat.clone());
        std::future::ready(())
    };
    let check = move |socket: SocketRef<A>,
                      auth: socketioxide::extract::TryData<serde_json::Value>| {
        let chat = for_auth.clone();
        async move { connect::check_handshake(&socket, auth.0, chat).await }
    };
    io.ns("/", handler.with(check))
}

/// How often a disconnect that found the socket's buffer full is tried again.
const DISCONNECT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// A socket as the feed sees it.
struct SocketSink<A: Adapter>(SocketRef<A>);

impl<A: Adapter> Sink for SocketSink<A> {
    fn send(&self, message: &Message) -> Result<(), SinkError> {
        use socketioxide::{SendError, SocketError};
        #[derive(Serialize)]
        struct Sent<'a> {
            name: &'a str,
            at: i64,
        }
        #[derive(Serialize)]
        struct ChatArgs<'a>(&'a str, i64, Sent<'a>);
        #[derive(Serialize)]
        struct RoomArgs<'a>(&'a str, &'a str, i64, Sent<'a>);
        let sent = Sent {
            name: &message.name,
            at: message.at,
        };
        let emitted = match message.room.to_arg() {
            None => self.0.emit(
                CHAT_MESSAGE,
                &ChatArgs(&message.content, message.offset, sent),
            ),
            Some(room) => self.0.emit(
                ROOM_MESSAGE,
                &RoomArgs(room, &message.content, message.offset, sent),
            ),
        };
        match emitted {
            Ok(()) => Ok(()),
            Err(SendError::Socket(SocketError::InternalChannelFull)) => Err(SinkError::Full),
            Err(SendError::Socket(SocketError::Closed)) => Err(SinkError::Closed),
            Err(SendError::Serialize(error)) => {
                // A string and a number always serialize; treat the impossible as a lost socket.
                tracing::error!(error = ?error, "could not encode a chat message");
                Err(SinkError::Closed)
            }
        }
    }

    /// The disconnect packet needs room in the very buffer that is full; until the peer makes
    /// some (or its stalled connection is closed, which closes the socket) it is retried.
    fn disconnect(&self) {
        use socketioxide::SocketError;
        let socket = self.0.clone();
        tokio::spawn(async move {
            while let Err(SocketError::InternalChannelFull) = socket.clone().disconnect() {
                tokio::time::sleep(DISCONNECT_RETRY).await;
            }
        });
    }
}
