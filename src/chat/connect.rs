//! The handshake: verify the token (when configured) or take `auth.name`, bound the client's
//! sockets, validate `auth.serverOffset`, then subscribe the socket to the feed from there.

use std::{net::IpAddr, sync::Arc};

use serde_json::Value;
use socketioxide::{adapter::Adapter, extract::SocketRef, socket::DisconnectReason};

use super::{CHAT_MESSAGE, Chat, SocketSink, messages};
use crate::{
    access::TokenError,
    config::History,
    metrics::ErrorKind,
    names::{NameError, display_name},
    peers::PeerAddr,
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
        Ok(Admitted { client, name }) => {
            messages::wire(socket, chat, client, name);
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
    if let Some(requested) = requested
        && requested > chat.feed.head()
    {
        // This node may lag behind the one the client came from; only the store can say.
        match chat.store.head().await {
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
    let parts = socket.req_parts();
    let Some(PeerAddr(peer)) = parts.extensions.get::<PeerAddr>() else {
        return Ok(Admitted { client: None, name });
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

/// A socket joined (its `chat message` handler is already wired): watch its disconnect, then
/// subscribe it after the offset it asked for.
pub(super) fn on_connect<A: Adapter>(socket: SocketRef<A>, auth: Option<Value>, chat: Arc<Chat>) {
    chat.metrics.connections.inc();
    let id: Arc<str> = socket.id.to_string().into();

    let on_disconnect = chat.clone();
    let disconnect_id = id.clone();
    socket.on_disconnect(move |_reason: DisconnectReason| {
        let chat = on_disconnect.clone();
        let id = disconnect_id.clone();
        async move {
            chat.feed.unsubscribe(&id);
            chat.metrics.connections.dec();
        }
    });

    // The middleware already refused a bad offset, so this parse succeeds.
    let after = match requested_offset(auth.as_ref()).ok().flatten() {
        Some(after) => after,
        None => match chat.history {
            History::Unlimited => 0,
            History::Last(n) => {
                let n = i64::try_from(n).unwrap_or(i64::MAX);
                chat.feed.head().saturating_sub(n).max(0)
            }
        },
    };
    tracing::debug!(socket = %id, after, event = CHAT_MESSAGE, "subscribing");
    chat.feed.subscribe(id, Arc::new(SocketSink(socket)), after);
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
