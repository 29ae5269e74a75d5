//! The handshake: verify the token (when configured) or take `auth.name`, bound the client's
//! sockets, validate `auth.serverOffset` and `auth.rooms`, then subscribe the socket to the feed
//! from there: the default room, the rooms it recovers, and its person's conversations.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use serde_json::Value;
use socketioxide::{adapter::Adapter, extract::SocketRef, socket::DisconnectReason};

use super::{CHAT_MESSAGE, Chat, SocketSink, messages, presence, rooms::start_after};
use crate::{
    access::TokenError,
    feed::Subscriber,
    metrics::ErrorKind,
    names::{NameError, display_name},
    peers::PeerAddr,
    rooms::Room,
    store::ANONYMOUS,
};

/// Why a handshake was refused; the client gets a `connect_error` with this message.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The token is missing, invalid or expired: the message is its stable code.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The client's address holds its most sockets already (behind a trusted proxy).
    #[error("too_many_connections")]
    TooManyConnections,
    /// `auth.name` is not a usable name (open mode).
    #[error("auth.name: {0}")]
    BadName(#[from] NameError),
    /// `auth.name` is present but not a string.
    #[error("auth.name must be a string")]
    NameNotString,
    /// `auth` was present but is not an object.
    #[error("auth must be an object such as {{ \"serverOffset\": 0 }}")]
    NotAnObject,
    /// `serverOffset` is neither a non-negative integer nor a string of one.
    #[error("auth.serverOffset must be a non-negative integer or a string of digits, got {0}")]
    BadOffset(String),
    /// `serverOffset` is beyond the newest stored message (the client's state is not ours).
    #[error("auth.serverOffset {requested} is ahead of the newest message ({head})")]
    AheadOfHead {
        /// What the client sent.
        requested: i64,
        /// The newest stored offset.
        head: i64,
    },
    /// `auth.rooms` is not an object of room names and offsets, names a room it may not, or
    /// names more rooms than a socket may be in.
    #[error("auth.rooms: {0}")]
    BadRooms(String),
}

/// The offset a handshake asks to resume after; `None` for a new client (absent, null or 0).
pub fn requested_offset(auth: Option<&Value>) -> Result<Option<i64>, HandshakeError> {
    let offset = match auth {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map.get("serverOffset"),
        Some(_) => return Err(HandshakeError::NotAnObject),
    };
    let parsed = match offset {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64().filter(|n| *n >= 0),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<i64>().ok()
        }
        Some(_) => None,
    };
    match parsed {
        Some(0) => Ok(None),
        Some(n) => Ok(Some(n)),
        None => {
            let mut shown = offset.map(Value::to_string).unwrap_or_default();
            shown.truncate(64);
            Err(HandshakeError::BadOffset(shown))
        }
    }
}

/// The connect middleware: refuses a handshake without a valid token (when tokens are on), from
/// a proxied client that holds its most sockets, or whose offset is malformed or from the future.
/// What it admits it leaves in the socket's extensions (the [`crate::access::User`] and the
/// address's place), and it wires the socket's `chat message` handler here, before socketioxide
/// sends the CONNECT answer: docs/DESIGN.md, "Connection and handshake".
pub(super) async fn check_handshake<A: Adapter>(
    socket: &SocketRef<A>,
    auth: Result<Value, socketioxide::ParserError>,
    chat: Arc<Chat>,
) -> Result<(), HandshakeError> {
    match admit(socket, auth, &chat).await {
        Ok(Admitted {
            client,
            name,
            recovering,
        }) => {
            let rooms: HashSet<Room> = recovering.rooms.iter().map(|(r, _)| r.clone()).collect();
            socket.extensions.insert(Arc::new(recovering));
            messages::wire(socket, chat, client, name, rooms);
            Ok(())
        }
        Err(error) => {
            chat.metrics.error(ErrorKind::InvalidHandshake);
            Err(error)
        }
    }
}

/// Who a handshake admitted.
struct Admitted {
    /// The client's address, when it is known.
    client: Option<IpAddr>,
    /// The name its messages carry.
    name: String,
    /// Where it starts in its rooms and conversations.
    recovering: Recovering,
}

/// Where an admitted socket starts, left in its extensions for the connect handler.
struct Recovering {
    /// The name its messages carry, which presence shows.
    name: Arc<str>,
    /// The person it is, for conversations (none when anonymous).
    person: Option<Arc<str>>,
    /// The named rooms of `auth.rooms`, each with the offset to resume after (`None`: the
    /// newest history).
    rooms: Vec<(Room, Option<i64>)>,
    /// Where it starts in each existing conversation of its person (see
    /// [`Subscriber::conversations`]).
    conversations: HashMap<Room, i64>,
}

/// Checks a handshake.
async fn admit<A: Adapter>(
    socket: &SocketRef<A>,
    auth: Result<Value, socketioxide::ParserError>,
    chat: &Chat,
) -> Result<Admitted, HandshakeError> {
    let auth = auth.map_err(|_| HandshakeError::NotAnObject)?;
    // With tokens, the name is the token's, never the client's word.
    let name = match &chat.verifier {
        Some(verifier) => {
            let user = verifier.verify(Some(&auth))?;
            let name = user.name.to_string();
            socket.extensions.insert(user);
            name
        }
        None => requested_name(&auth)?,
    };
    let requested = requested_offset(Some(&auth))?;
    let person = (name != ANONYMOUS).then_some(name.as_str());
    let rooms = requested_rooms(&auth, person, chat.limits.max_rooms)?;
    let default_head = chat.feed.head(&Room::default_room()).unwrap_or(0);
    if let Some(requested) = requested
        && requested > default_head
    {
        // This node may lag behind the one the client came from; only the store can say.
        match chat.store.head(&Room::default_room()).await {
            Ok(head) if requested > head => {
                return Err(HandshakeError::AheadOfHead { requested, head });
            }
            Ok(_) => {}
            // The tutorial's client never retries after a connect_error, so an outage must
            // not refuse it: accept the offset (it came from one of our nodes) and let the
            // catch-up wait for the store.
            Err(error) => {
                tracing::warn!(error = %error, "store unreachable during a handshake; offset accepted unchecked");
            }
        }
    }
    let recovering = recovering(chat, person, rooms).await?;
    let parts = socket.req_parts();
    let Some(PeerAddr(peer)) = parts.extensions.get::<PeerAddr>() else {
        return Ok(Admitted {
            client: None,
            name,
            recovering,
        });
    };
    let client = chat.trusted_proxies.client(peer.ip(), &parts.headers);
    // A direct peer's connections are counted at accept; a proxied client's sockets here.
    if chat.trusted_proxies.contains(peer.ip()) {
        let place = chat
            .per_address
            .acquire(client)
            .ok_or(HandshakeError::TooManyConnections)?;
        socket.extensions.insert(Arc::new(place));
    }
    Ok(Admitted {
        client: Some(client),
        name,
        recovering,
    })
}

/// The rooms `auth.rooms` asks to recover (`{ [room]: lastOffset }`), checked: valid names, at
/// most `max_rooms` of them besides conversations, conversations only of `person`, offsets
/// non-negative integers (or null for the newest history).
pub fn requested_rooms(
    auth: &Value,
    person: Option<&str>,
    max_rooms: usize,
) -> Result<Vec<(Room, Option<i64>)>, HandshakeError> {
    let bad = |reason: String| HandshakeError::BadRooms(reason);
    let map = match auth.get("rooms") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(bad("must be an object of room names and offsets".into())),
    };
    let mut rooms = Vec::with_capacity(map.len().min(max_rooms));
    let mut named = 0;
    for (name, offset) in map {
        let room = Room::named(name).map_err(|e| bad(e.to_string()))?;
        if room.is_conversation() && !person.is_some_and(|p| room.has_person(p)) {
            return Err(bad(format!("{name} is not a conversation of yours")));
        }
        if !room.is_conversation() {
            named += 1;
            if named > max_rooms {
                return Err(bad(format!("at most {max_rooms} rooms")));
            }
        }
        let offset = match offset {
            Value::Null => None,
            // As for `join`: a number is the offset to resume after (0: from the first).
            Value::Number(n) => match n.as_i64() {
                Some(n) if n >= 0 => Some(n),
                _ => {
                    return Err(bad(format!(
                        "the offset of {name} must be a non-negative integer"
                    )));
                }
            },
            _ => {
                return Err(bad(format!(
                    "the offset of {name} must be a non-negative integer"
                )));
            }
        };
        rooms.push((room, offset));
    }
    Ok(rooms)
}

/// Where a socket starts: refuses offsets beyond the rooms' heads, and reads the heads of its
/// person's conversations. A store that cannot answer refuses nothing (the offsets came from
/// our nodes; the tutorial's client never retries after a connect_error): the offsets are taken
/// unchecked and conversations not named start at 0.
async fn recovering(
    chat: &Chat,
    person: Option<&str>,
    rooms: Vec<(Room, Option<i64>)>,
) -> Result<Recovering, HandshakeError> {
    let resumed: Vec<Room> = rooms
        .iter()
        .filter(|(_, offset)| offset.is_some())
        .map(|(room, _)| room.clone())
        .collect();
    if !resumed.is_empty() {
        match chat.store.heads(&resumed).await {
            Ok(heads) => {
                let heads: HashMap<Room, i64> = heads.into_iter().collect();
                for (room, offset) in &rooms {
                    let head = heads.get(room).copied().unwrap_or(0);
                    if let Some(offset) = *offset
                        && offset > head
                    {
                        return Err(HandshakeError::BadRooms(format!(
                            "the offset {offset} of {room} is ahead of its newest message ({head})"
                        )));
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "store unreachable during a handshake; room offsets accepted unchecked");
            }
        }
    }
    let mut conversations = HashMap::new();
    if let Some(person) = person {
        match chat.store.conversations(&[person]).await {
            Ok(existing) => {
                for (room, head) in existing {
                    conversations.insert(room, start_after(None, head, chat.history));
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "store unreachable during a handshake; conversations start at their first message");
            }
        }
    }
    let (conversations_named, rooms): (Vec<_>, Vec<_>) = rooms
        .into_iter()
        .partition(|(room, _)| room.is_conversation());
    for (room, offset) in conversations_named {
        conversations.insert(room, offset.unwrap_or(0));
    }
    Ok(Recovering {
        name: Arc::from(person.unwrap_or(ANONYMOUS)),
        person: person.map(Arc::from),
        rooms,
        conversations,
    })
}

/// The name an open-mode handshake gives (`auth.name`), or `anonymous` without one.
pub fn requested_name(auth: &Value) -> Result<String, HandshakeError> {
    match auth.get("name") {
        None | Some(Value::Null) => Ok(ANONYMOUS.to_owned()),
        Some(Value::String(raw)) => Ok(display_name(raw)?),
        Some(_) => Err(HandshakeError::NameNotString),
    }
}

/// A socket joined (its handlers are already wired): watch its disconnect, then subscribe it
/// after the offsets it asked for.
pub(super) fn on_connect<A: Adapter>(socket: SocketRef<A>, auth: Option<Value>, chat: Arc<Chat>) {
    chat.metrics.connections.inc();
    let id: Arc<str> = socket.id.to_string().into();

    let on_disconnect = chat.clone();
    let disconnect_id = id.clone();
    // The work is done when socketioxide calls the handler, not in the future it returns:
    // socketioxide spawns that future, and when the engine.io session closes too (a client's
    // disconnect packet followed by its websocket close) the socket may leave its rooms in the
    // adapter before the future runs, which would find no room to announce a `left` in.
    socket.on_disconnect(move |socket: SocketRef<A>, _reason: DisconnectReason| {
        on_disconnect.feed.disconnect(&disconnect_id);
        on_disconnect.presence.disconnect(&socket);
        on_disconnect.metrics.connections.dec();
        std::future::ready(())
    });

    let recovering = socket
        .extensions
        .remove::<Arc<Recovering>>()
        .unwrap_or_else(|| {
            Arc::new(Recovering {
                name: Arc::from(ANONYMOUS),
                person: None,
                rooms: Vec::new(),
                conversations: HashMap::new(),
            })
        });
    // The middleware already refused a bad offset, so this parse succeeds.
    let requested = requested_offset(auth.as_ref()).ok().flatten();
    tracing::debug!(socket = %id, ?requested, event = CHAT_MESSAGE, "subscribing");
    let name = recovering.name.clone();
    if let Some(person) = &recovering.person {
        socket.join(presence::person(person));
    }
    let for_presence = socket.clone();
    chat.feed.connect(
        id.clone(),
        Subscriber {
            sink: Arc::new(SocketSink(socket)),
            person: recovering.person.clone(),
            conversations: recovering.conversations.clone(),
        },
    );
    let default = Room::default_room();
    tokio::spawn(async move {
        // The default room is always followed, so this reads nothing and cannot fail.
        subscribe_from(&chat, &default, &id, requested).await;
        chat.presence.enter(&for_presence, &default, &name).await;
        for (room, requested) in &recovering.rooms {
            subscribe_from(&chat, room, &id, *requested).await;
            chat.presence.enter(&for_presence, room, &name).await;
        }
    });
}

/// Subscribes a socket to `room` after `requested` (or at the newest history), retrying while
/// the store cannot say the room's head.
async fn subscribe_from(chat: &Chat, room: &Room, id: &Arc<str>, requested: Option<i64>) {
    let mut pause = std::time::Duration::from_millis(100);
    let history = chat.history;
    loop {
        match chat
            .feed
            .subscribe(room, id, |head| start_after(requested, head, history))
            .await
        {
            Ok(_) => return,
            Err(_) if !chat.feed.knows(id) => return,
            Err(error) => {
                tracing::warn!(error = %error, %room, "could not subscribe a recovering socket; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn offsets_parse_as_the_contract_says() {
        assert_eq!(requested_offset(None).unwrap(), None);
        assert_eq!(requested_offset(Some(&json!({}))).unwrap(), None);
        assert_eq!(
            requested_offset(Some(&json!({"serverOffset": 0}))).unwrap(),
            None
        );
        assert_eq!(
            requested_offset(Some(&json!({"serverOffset": 42}))).unwrap(),
            Some(42)
        );
        assert_eq!(
            requested_offset(Some(&json!({"serverOffset": "42"}))).unwrap(),
            Some(42)
        );
        for bad in [
            json!(-1),
            json!(1.5),
            json!("4x"),
            json!(""),
            json!([1]),
            json!(true),
        ] {
            let err = requested_offset(Some(&json!({ "serverOffset": bad }))).unwrap_err();
            assert!(err.to_string().contains("serverOffset"), "{err}");
        }
        assert!(requested_offset(Some(&json!("x"))).is_err());
    }

    #[test]
    fn names_come_from_auth_or_are_anonymous() {
        assert_eq!(requested_name(&json!({})).unwrap(), "anonymous");
        assert_eq!(requested_name(&json!({"name": null})).unwrap(), "anonymous");
        assert_eq!(requested_name(&json!({"name": " Ada "})).unwrap(), "Ada");
        for bad in [json!(""), json!("@x"), json!("a|b"), json!(7)] {
            let err = requested_name(&json!({ "name": bad })).unwrap_err();
            assert!(err.to_string().contains("auth.name"), "{err}");
        }
    }
}
