//! Sends from clients (`chat message`, and the room and private messages of [`super::rooms`]):
//! validate, store once, ack after commit; and what each socket's sends are held to.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Instant,
};

use serde::Serialize;
use serde_json::Value;
use socketioxide::{
    adapter::Adapter,
    extract::{AckSender, SocketRef, TryData},
};

use super::{CHAT_MESSAGE, Chat};
use crate::{
    config::LimitSettings,
    metrics::{ErrorKind, Metrics},
    names::NameError,
    rooms::{Room, RoomError},
    store::{ANONYMOUS, Appended, NewMessage, now_ms},
    writer::WriteError,
};

/// Input limits, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Each socket's send rate: a token bucket of `message_burst` sends, refilled at
    /// `messages_per_second`.
    pub rate: governor::Quota,
    /// Rate-limited sends in a row after which the socket is disconnected.
    pub rate_limited_disconnect_after: u32,
    /// Each client address's send rate, shared by its sockets.
    pub address_rate: governor::Quota,
    /// Longest message, in characters.
    pub max_message_chars: usize,
    /// Longest client offset, in characters.
    pub max_client_offset_chars: usize,
    /// Most sends of one socket waiting for their ack at once.
    pub max_in_flight: usize,
    /// Most rooms one socket joins (besides the default room and its conversations).
    pub max_rooms: usize,
    /// Each socket's `typing` rate.
    pub typing_rate: governor::Quota,
}

impl From<&LimitSettings> for Limits {
    fn from(settings: &LimitSettings) -> Self {
        // Validated to be at least 1.
        let nonzero = |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            rate: governor::Quota::per_second(nonzero(settings.messages_per_second))
                .allow_burst(nonzero(settings.message_burst)),
            rate_limited_disconnect_after: settings.rate_limited_disconnect_after,
            address_rate: governor::Quota::per_second(nonzero(
                settings.address_messages_per_second,
            ))
            .allow_burst(nonzero(settings.address_message_burst)),
            max_message_chars: settings.max_message_chars,
            max_client_offset_chars: settings.max_client_offset_chars,
            max_in_flight: settings.max_in_flight,
            max_rooms: settings.max_rooms_per_socket,
            typing_rate: governor::Quota::per_second(nonzero(settings.typing_per_second))
                .allow_burst(nonzero(settings.typing_per_second.saturating_mul(2))),
        }
    }
}

/// Checks between two sweeps of the address buckets that have refilled (and so hold nothing).
const ADDRESS_SWEEP_EVERY: u64 = 16_384;

/// The send rate of every client address, shared by all its sockets, so that reconnecting does
/// not buy a fresh bucket. A full bucket is forgotten at the next sweep.
pub struct AddressRates {
    limiter: governor::DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

impl AddressRates {
    /// Buckets of `limits.address_rate`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            limiter: governor::RateLimiter::keyed(limits.address_rate),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes a send from `addr`'s bucket; `false` when it is empty.
    fn check(&self, addr: IpAddr) -> bool {
        if self.checks.fetch_add(1, Relaxed) % ADDRESS_SWEEP_EVERY == ADDRESS_SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(&addr).is_ok()
    }
}

/// A permanent rejection: acked with `{ "error": { "code", "message" } }` so the client stops
/// retrying; nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The first argument is not a string.
    #[error("message content must be a string")]
    ContentNotString,
    /// The content is empty or only white space.
    #[error("message content must not be empty")]
    ContentEmpty,
    /// The content is longer than the limit.
    #[error("message content is longer than {0} characters")]
    ContentTooLong(usize),
    /// The content holds a NUL character, which Postgres cannot store (both backends refuse it,
    /// so they accept the same inputs).
    #[error("message content must not contain NUL (U+0000)")]
    ContentNul,
    /// The store refused the message itself (not an outage): retrying cannot help.
    #[error("message refused by the store")]
    Refused,
    /// The client offset is present but not a string.
    #[error("client offset must be a string")]
    ClientOffsetNotString,
    /// The client offset is empty or longer than the limit.
    #[error("client offset must be 1 to {0} characters")]
    ClientOffsetLength(usize),
    /// The client offset holds a NUL character.
    #[error("client offset must not contain NUL (U+0000)")]
    ClientOffsetNul,
    /// This socket has too many sends waiting for their ack.
    #[error("too many messages in flight; wait for acks before sending more")]
    TooManyInFlight,
    /// This socket sends faster than its rate limit.
    #[error("sending too fast; slow down")]
    TooFast,
    /// The room argument is not a usable room name.
    #[error("{0}")]
    Room(#[from] RoomError),
    /// The socket is not in that room (join it first), or the conversation is not its own.
    #[error("not a member of room {0}; join it first")]
    NotAMember(String),
    /// The default room and conversations are not left.
    #[error("the default room and conversations cannot be left")]
    CannotLeave,
    /// The socket is in its most rooms already.
    #[error("in {0} rooms already; leave one first")]
    TooManyRooms(usize),
    /// The offset to resume after is malformed, or beyond the room's newest message.
    #[error("{0}")]
    BadOffset(String),
    /// The recipient of a private message is not a name, or is the sender.
    #[error("recipient: {0}")]
    BadRecipient(String),
    /// `typing`'s second argument is not a boolean.
    #[error("typing must be true or false")]
    NotTyping,
    /// A sender without a name (anonymous) cannot have conversations.
    #[error("private messages need a name: connect with auth.name")]
    Nameless,
}

impl From<NameError> for InputError {
    fn from(error: NameError) -> Self {
        Self::BadRecipient(error.to_string())
    }
}

impl InputError {
    /// The stable code clients can match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ContentNotString => "invalid_content",
            Self::ContentEmpty => "empty_content",
            Self::ContentTooLong(_) => "content_too_long",
            Self::ContentNul | Self::Refused => "invalid_content",
            Self::ClientOffsetNotString => "invalid_client_offset",
            Self::ClientOffsetLength(_) | Self::ClientOffsetNul => "invalid_client_offset",
            Self::TooManyInFlight | Self::TooFast => "rate_limited",
            Self::Room(_) | Self::CannotLeave => "invalid_room",
            Self::NotAMember(_) => "not_a_member",
            Self::TooManyRooms(_) => "too_many_rooms",
            Self::BadOffset(_) => "invalid_offset",
            Self::BadRecipient(_) => "invalid_recipient",
            Self::Nameless => "no_name",
            Self::NotTyping => "invalid_typing",
        }
    }
}

#[derive(Serialize)]
struct ErrorAck<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
}

/// Every argument of an event, however many the client sent.
///
/// socketioxide hands a handler all of an event's arguments only when the target type is
/// tuple-like (otherwise just the first), so this deserializes as a tuple of any length.
pub struct EventArgs(pub Vec<Value>);

impl<'de> serde::Deserialize<'de> for EventArgs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Args;
        impl<'de> serde::de::Visitor<'de> for Args {
            type Value = EventArgs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("event arguments")
            }
            fn visit_seq<S: serde::de::SeqAccess<'de>>(
                self,
                mut seq: S,
            ) -> Result<EventArgs, S::Error> {
                let mut args = Vec::with_capacity(seq.size_hint().unwrap_or(2).min(8));
                while let Some(arg) = seq.next_element()? {
                    args.push(arg);
                }
                Ok(EventArgs(args))
            }
        }
        d.deserialize_tuple_struct("EventArgs", usize::MAX, Args)
    }
}

/// A send's arguments, checked: what the client asked to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSend {
    /// The client's idempotency key, if it sent one.
    pub client_offset: Option<String>,
    /// The text.
    pub content: String,
}

impl ValidSend {
    /// The message to store: this send by `name`, accepted at `at`.
    pub fn by(self, name: &str, at: i64) -> NewMessage {
        NewMessage {
            client_offset: self.client_offset,
            content: self.content,
            name: name.to_owned(),
            at,
        }
    }
}

/// Checks a send's arguments `(content, clientOffset?)`.
pub fn parse_send(args: &[Value], limits: &Limits) -> Result<ValidSend, InputError> {
    let content = match args.first() {
        Some(Value::String(s)) => s,
        _ => return Err(InputError::ContentNotString),
    };
    if content.trim().is_empty() {
        return Err(InputError::ContentEmpty);
    }
    if content.chars().count() > limits.max_message_chars {
        return Err(InputError::ContentTooLong(limits.max_message_chars));
    }
    if content.contains('\0') {
        return Err(InputError::ContentNul);
    }
    let client_offset = match args.get(1) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let n = s.chars().count();
            if n == 0 || n > limits.max_client_offset_chars {
                return Err(InputError::ClientOffsetLength(
                    limits.max_client_offset_chars,
                ));
            }
            if s.contains('\0') {
                return Err(InputError::ClientOffsetNul);
            }
            Some(s.clone())
        }
        Some(_) => return Err(InputError::ClientOffsetNotString),
    };
    Ok(ValidSend {
        client_offset,
        content: content.clone(),
    })
}

/// Registers every event on a socket the handshake admitted: `chat message` here, the rooms'
/// events in [`super::rooms`]. Its sends carry `name`, count against its own bucket and, when its
/// client address is known, that address's, and may go to the default room, `rooms` and its
/// conversations.
///
/// A send is validated and queued for the writer in the handler itself, not in the future it
/// returns, so a client's pipelined sends are stored in the order it sent them
/// (`docs/DESIGN.md`, "Write path").
pub(super) fn wire<A: Adapter>(
    socket: &SocketRef<A>,
    chat: Arc<Chat>,
    client: Option<IpAddr>,
    name: String,
    rooms: HashSet<Room>,
) {
    let sender = Arc::new(Sender::new(&chat.limits, client, name, rooms));
    super::rooms::wire(socket, &chat, &sender);
    socket.on(
        CHAT_MESSAGE,
        move |socket: SocketRef<A>, TryData(args): TryData<EventArgs>, ack: AckSender<A>| {
            let queued = args
                .map_err(|_| InputError::ContentNotString)
                .and_then(|args| sender.queue(Room::default_room(), &args.0, &chat));
            sender.answer_when_stored(socket, ack, queued, Ack::Chat, &chat)
        },
    );
}

/// The success ack of a stored send: where the message is.
#[derive(Debug, Clone)]
pub(super) enum Ack {
    /// `{ serverOffset }`, for `chat message`.
    Chat,
    /// `{ room, serverOffset }`, for room and private messages.
    Room(Room),
}

/// What a queued send resolves to.
pub(super) type Stored = Result<Appended, WriteError>;

/// What one socket's sends are held to: its rate, its address's, a number in flight, and the
/// rooms it may send to.
pub(super) struct Sender {
    /// A token bucket per socket (`limits.messages_per_second`, `limits.message_burst`).
    rate: governor::DefaultDirectRateLimiter,
    /// The client address whose bucket its sends also take from.
    client: Option<IpAddr>,
    /// Who sends: the name its messages carry.
    pub(super) name: String,
    /// The named rooms it joined (the default room and its conversations are always its).
    pub(super) rooms: Mutex<HashSet<Room>>,
    /// A token bucket for its `typing` events (`limits.typing_per_second`).
    pub(super) typing: governor::DefaultDirectRateLimiter,
    /// Sends queued for the writer and not answered yet.
    in_flight: AtomicUsize,
    /// Sends refused as too fast since the last one that was not.
    too_fast_in_a_row: AtomicU32,
}

impl Sender {
    fn new(limits: &Limits, client: Option<IpAddr>, name: String, rooms: HashSet<Room>) -> Self {
        Self {
            rate: governor::RateLimiter::direct(limits.rate),
            client,
            name,
            rooms: Mutex::new(rooms),
            typing: governor::RateLimiter::direct(limits.typing_rate),
            in_flight: AtomicUsize::new(0),
            too_fast_in_a_row: AtomicU32::new(0),
        }
    }

    /// The person this socket is, for conversations: its name, unless it has none.
    pub(super) fn person(&self) -> Option<&str> {
        (self.name != ANONYMOUS).then_some(self.name.as_str())
    }

    /// Whether the socket may send to `room`.
    pub(super) fn may_send_to(&self, room: &Room) -> bool {
        room.is_default()
            || self.person().is_some_and(|p| room.has_person(p))
            || self
                .rooms
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(room)
    }

    /// Takes one request from the socket's bucket and its address's; `TooFast` when either is
    /// empty. Every send and join takes from them, valid or not.
    pub(super) fn take_rate(&self, chat: &Chat) -> Result<(), InputError> {
        let address_allows = |addr| chat.address_rates.check(addr);
        if self.rate.check().is_err() || !self.client.is_none_or(address_allows) {
            self.too_fast_in_a_row.fetch_add(1, Relaxed);
            return Err(InputError::TooFast);
        }
        self.too_fast_in_a_row.store(0, Relaxed);
        Ok(())
    }

    /// Checks a send to `room` of `(content, clientOffset?)` against the rates, validates it
    /// and queues it for the writer; the future resolves once it is stored.
    pub(super) fn queue(
        &self,
        room: Room,
        args: &[Value],
        chat: &Chat,
    ) -> Result<impl Future<Output = Stored> + use<>, InputError> {
        self.take_rate(chat)?;
        if !self.may_send_to(&room) {
            return Err(InputError::NotAMember(room.key().to_owned()));
        }
        let message = parse_send(args, &chat.limits)?.by(&self.name, now_ms());
        if self.in_flight.fetch_add(1, Relaxed) >= chat.limits.max_in_flight {
            self.in_flight.fetch_sub(1, Relaxed);
            return Err(InputError::TooManyInFlight);
        }
        Ok(chat.writer.submit(room, message))
    }

    /// What answers a send once it is stored (or at once when it was refused): the success ack
    /// in `shape`, an error ack for a permanent refusal, no ack for a transient failure. A
    /// socket refused as too fast too often in a row is disconnected. The handler returns it,
    /// and socketioxide spawns it.
    pub(super) fn answer_when_stored<A: Adapter, F: Future<Output = Stored> + Send + 'static>(
        self: &Arc<Self>,
        socket: SocketRef<A>,
        ack: AckSender<A>,
        queued: Result<F, InputError>,
        shape: Ack,
        chat: &Arc<Chat>,
    ) -> impl Future<Output = ()> + Send + 'static + use<A, F> {
        let arrived = Instant::now();
        let (chat, sender) = (chat.clone(), self.clone());
        async move {
            match queued {
                Err(error) => {
                    reject(ack, &error, &chat.metrics);
                    sender.disconnect_if_abusive(&socket, &error, &chat.limits);
                }
                Ok(stored) => {
                    let result = stored.await;
                    sender.in_flight.fetch_sub(1, Relaxed);
                    match result {
                        Err(WriteError::Refused(reason)) => {
                            tracing::info!(socket = %socket.id, reason = %reason, "send refused by the store");
                            reject(ack, &InputError::Refused, &chat.metrics);
                        }
                        other => answer(&socket, ack, other, &shape),
                    }
                }
            }
            chat.metrics.ack.observe(arrived.elapsed().as_secs_f64());
        }
    }

    /// Disconnects the socket when it has been refused as too fast often enough in a row.
    pub(super) fn disconnect_if_abusive<A: Adapter>(
        &self,
        socket: &SocketRef<A>,
        error: &InputError,
        limits: &Limits,
    ) {
        if *error == InputError::TooFast
            && self.too_fast_in_a_row.load(Relaxed) >= limits.rate_limited_disconnect_after
        {
            tracing::info!(socket = %socket.id, "disconnecting a socket that keeps sending too fast");
            if let Err(error) = socket.clone().disconnect() {
                tracing::debug!(socket = %socket.id, error = ?error, "socket already closing");
            }
        }
    }
}

/// Acks a stored send; a transient failure gets no ack.
fn answer<A: Adapter>(socket: &SocketRef<A>, ack: AckSender<A>, result: Stored, shape: &Ack) {
    /// The success ack's payload: where the message is in the order.
    #[derive(Serialize)]
    struct Committed<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<Option<&'a str>>,
        #[serde(rename = "serverOffset")]
        server_offset: i64,
    }
    match result {
        // Stored now or before: either way the client may stop retrying. Error-first, as the
        // error ack: `null`, then the message's offset, so a page can confirm its own message.
        Ok(Appended::Inserted(offset) | Appended::Existing(offset)) => {
            let committed = Committed {
                room: match shape {
                    Ack::Chat => None,
                    Ack::Room(room) => Some(room.to_arg()),
                },
                server_offset: offset,
            };
            if let Err(error) = ack.send(&(None::<()>, committed)) {
                // The ack is lost (socket gone or its buffer full); the client retries and the
                // retry is acked as a duplicate.
                tracing::debug!(socket = %socket.id, error = ?error, "ack not sent");
            }
        }
        // Transient: no ack, so the client's retry carries the message over the outage.
        Err(error) => {
            tracing::debug!(socket = %socket.id, error = %error, "send not stored; no ack");
        }
    }
}

/// Acks a refused request with `{ error: { code, message } }`.
pub(super) fn reject<A: Adapter>(ack: AckSender<A>, error: &InputError, metrics: &Metrics) {
    metrics.error(ErrorKind::InvalidInput);
    let body = ErrorAck {
        error: ErrorBody {
            code: error.code(),
            message: error.to_string(),
        },
    };
    if let Err(send_error) = ack.send(&body) {
        tracing::debug!(error = ?send_error, "error ack not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits {
        rate: governor::Quota::per_second(std::num::NonZeroU32::MIN),
        rate_limited_disconnect_after: 1,
        address_rate: governor::Quota::per_second(std::num::NonZeroU32::MIN),
        max_message_chars: 5,
        max_client_offset_chars: 4,
        max_in_flight: 8,
        max_rooms: 2,
        typing_rate: governor::Quota::per_second(std::num::NonZeroU32::MIN),
    };

    #[test]
    fn accepts_the_two_tutorial_shapes() {
        let m = parse_send(&[json!("hi")], &LIMITS).unwrap();
        assert_eq!((m.content.as_str(), m.client_offset), ("hi", None));
        let m = parse_send(&[json!("hi"), json!("a-1")], &LIMITS).unwrap();
        assert_eq!(m.client_offset.as_deref(), Some("a-1"));
    }

    #[test]
    fn rejects_each_kind_of_bad_input() {
        let cases = [
            (vec![], "invalid_content"),
            (vec![json!(5)], "invalid_content"),
            (vec![json!({"a": 1})], "invalid_content"),
            (vec![json!("  ")], "empty_content"),
            (vec![json!("toolong")], "content_too_long"),
            (vec![json!("ok"), json!(7)], "invalid_client_offset"),
            (vec![json!("ok"), json!("")], "invalid_client_offset"),
            (vec![json!("ok"), json!("12345")], "invalid_client_offset"),
            (vec![json!("a\u{0}b")], "invalid_content"),
            (vec![json!("ok"), json!("o\u{0}")], "invalid_client_offset"),
        ];
        for (args, code) in cases {
            assert_eq!(
                parse_send(&args, &LIMITS).unwrap_err().code(),
                code,
                "{args:?}"
            );
        }
        // Characters, not bytes: five multi-byte characters fit.
        assert!(parse_send(&[json!("ééééé")], &LIMITS).is_ok());
    }
}
