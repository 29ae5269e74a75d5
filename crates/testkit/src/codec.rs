//! The Engine.IO v4 / Socket.IO v5 text packets of namespace `/`: encoding what a client sends,
//! and decoding what it receives, either fully (the test client) or the lean way a load
//! generator reads thousands of frames a second (only chat messages, acks and pings, no JSON
//! trees).

use std::{borrow::Cow, fmt::Write as _};

use serde::Serialize;
use serde_json::Value;

/// Name of the event that carries chat messages in the chorus contract.
pub const CHAT_MESSAGE: &str = "chat message";
/// A message of a named room or a conversation, both directions.
pub const ROOM_MESSAGE: &str = "room message";
/// A message to a person.
pub const PRIVATE_MESSAGE: &str = "private message";
/// Joining a room.
pub const JOIN: &str = "join";
/// Leaving a room.
pub const LEAVE: &str = "leave";

/// The Socket.IO DISCONNECT of namespace `/`: the client leaves it.
pub const DISCONNECT: &str = "41";

/// The server sent something that is not valid Engine.IO / Socket.IO.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol error: {0}")]
pub struct ProtocolError(pub String);

fn protocol(message: impl Into<String>) -> ProtocolError {
    ProtocolError(message.into())
}

/// One decoded websocket text frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// Engine.IO `0`: the open packet with its handshake data.
    Open(Value),
    /// Engine.IO `1`: the server closes the transport.
    Close,
    /// Engine.IO `2`: a ping, with an optional payload to echo.
    Ping(String),
    /// Engine.IO `3`: a pong.
    Pong,
    /// Engine.IO `5` / `6`: upgrade and noop, which a websocket-only client ignores.
    Noop,
    /// Engine.IO `4`: a Socket.IO packet for namespace `nsp`.
    Socket { nsp: String, packet: SocketPacket },
}

/// A Socket.IO packet, after its Engine.IO `4` (message) prefix and namespace are removed.
#[derive(Debug, Clone, PartialEq)]
pub enum SocketPacket {
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
    /// `5` / `6`: binary event or ack, which these clients do not support.
    Binary,
}

/// Encodes a Socket.IO CONNECT for namespace `/`: `40`, or `40{auth}` with an auth payload.
pub fn encode_connect(auth: Option<&Value>) -> String {
    match auth {
        Some(auth) => format!("40{auth}"),
        None => "40".to_owned(),
    }
}

/// Encodes a Socket.IO EVENT for namespace `/`: `42["event",...]`, or `42<id>["event",...]`
/// with an ack id. The arguments are written as JSON straight into the frame.
pub fn encode_event<A: Serialize>(event: &str, args: &[A], ack_id: Option<u64>) -> String {
    let mut frame = String::from("42");
    if let Some(id) = ack_id {
        let _ = write!(frame, "{id}");
    }
    frame.push('[');
    push_json(&mut frame, &event);
    for arg in args {
        frame.push(',');
        push_json(&mut frame, arg);
    }
    frame.push(']');
    frame
}

/// Encodes the contract's send, `socket.emit('chat message', content, clientOffset)`, asking
/// for an ack when `ack_id` is given; without a client offset the event has only the content.
pub fn encode_chat_message(
    content: &str,
    client_offset: Option<&str>,
    ack_id: Option<u64>,
) -> String {
    match client_offset {
        Some(offset) => encode_event(CHAT_MESSAGE, &[content, offset], ack_id),
        None => encode_event(CHAT_MESSAGE, &[content], ack_id),
    }
}

/// The Engine.IO pong answering a ping with `payload`.
pub fn encode_pong(payload: &str) -> String {
    format!("3{payload}")
}

fn push_json<T: Serialize + ?Sized>(frame: &mut String, value: &T) {
    // Strings and JSON values always serialize; only maps with non-string keys could fail.
    let json = serde_json::to_string(value).expect("an event argument serializes to JSON");
    frame.push_str(&json);
}

/// Decodes one text frame from the server.
pub fn decode(text: &str) -> Result<Packet, ProtocolError> {
    let mut chars = text.chars();
    let kind = chars
        .next()
        .ok_or_else(|| protocol("empty Engine.IO packet"))?;
    let rest = chars.as_str();
    match kind {
        '0' => serde_json::from_str(rest)
            .map(Packet::Open)
            .map_err(|e| protocol(format!("bad open packet {rest:?}: {e}"))),
        '1' => Ok(Packet::Close),
        '2' => Ok(Packet::Ping(rest.to_owned())),
        '3' => Ok(Packet::Pong),
        '4' => decode_socket(rest),
        '5' | '6' => Ok(Packet::Noop),
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
fn decode_socket(text: &str) -> Result<Packet, ProtocolError> {
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

    let json = |what: &str| -> Result<Value, ProtocolError> {
        serde_json::from_str(payload)
            .map_err(|e| protocol(format!("bad {what} payload {payload:?}: {e}")))
    };
    let array = |what: &str| -> Result<Vec<Value>, ProtocolError> {
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
    Ok(Packet::Socket {
        nsp: nsp.to_owned(),
        packet,
    })
}

/// Parses `chat message` args `(content: string, serverOffset: number)`.
pub fn parse_chat_message(args: &[Value]) -> Result<(String, i64), ProtocolError> {
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

/// The sender and time of a `chat message`'s third argument, `{ name, at }`.
pub fn parse_sender(args: &[Value]) -> Result<(String, i64), ProtocolError> {
    let sent = args
        .get(2)
        .ok_or_else(|| protocol("chat message without its { name, at }"))?;
    match (
        sent.get("name").and_then(Value::as_str),
        sent.get("at").and_then(Value::as_i64),
    ) {
        (Some(name), Some(at)) => Ok((name.to_owned(), at)),
        _ => Err(protocol(format!("not a {{ name, at }}: {sent}"))),
    }
}

/// Does an ack's first argument carry the contract's `{ error: { code, message } }`?
pub fn ack_error(args: &[Value]) -> Option<&Value> {
    args.first()?.get("error")
}

/// What a load generator needs from a frame, read without building JSON trees.
#[derive(Debug, PartialEq, Eq)]
pub enum Lean<'a> {
    /// An Engine.IO ping with the payload to echo.
    Ping(&'a str),
    /// A `chat message` with its content and server offset.
    ChatMessage { content: Cow<'a, str>, offset: i64 },
    /// The ack of emit number `id`; `error` when it carries the contract's error object.
    Ack { id: u64, error: bool },
    /// Anything else.
    Other,
}

/// Reads a frame the lean way. Chat messages are recognised in the shape servers emit them
/// (namespace `/`, no ack id); content without escapes is borrowed from the frame, content
/// with escapes is decoded in full.
pub fn decode_lean(text: &str) -> Lean<'_> {
    if let Some(payload) = text.strip_prefix('2') {
        return Lean::Ping(payload);
    }
    if let Some(rest) = text.strip_prefix("42[\"chat message\",") {
        return lean_chat_message(rest).unwrap_or_else(|| match decode(text) {
            Ok(Packet::Socket {
                packet: SocketPacket::Event { name, args, .. },
                ..
            }) if name == CHAT_MESSAGE => match parse_chat_message(&args) {
                Ok((content, offset)) => Lean::ChatMessage {
                    content: Cow::Owned(content),
                    offset,
                },
                Err(_) => Lean::Other,
            },
            _ => Lean::Other,
        });
    }
    // A room's message, `42["room message","room",...]`, read as a chat message when its room
    // has no escapes (a load generator knows what room each connection is in).
    if let Some(rest) = text.strip_prefix("42[\"room message\",\"")
        && let Some((room, rest)) = rest.split_once('"')
        && !room.contains('\\')
        && let Some(message) = rest.strip_prefix(',').and_then(lean_chat_message)
    {
        return message;
    }
    if let Some(rest) = text.strip_prefix("43") {
        let (digits, payload) = split_digits(rest);
        if let Ok(id) = digits.parse() {
            // chorus's error ack is `[{"error":{...}}]`, serialized without spaces.
            let error = payload.starts_with("[{\"error\":");
            return Lean::Ack { id, error };
        }
    }
    Lean::Other
}

/// The fast path of a chat message after `42["chat message",`: `"content",offset]` or
/// `"content",offset,{...}]` (the sender and time, not read here), when the content has no
/// escapes.
fn lean_chat_message(rest: &str) -> Option<Lean<'_>> {
    let rest = rest.strip_prefix('"')?;
    let (content, rest) = rest.split_once('"')?;
    if content.contains('\\') {
        return None;
    }
    let rest = rest.strip_prefix(',')?;
    let end = rest.find([',', ']'])?;
    let offset = rest[..end].trim().parse().ok()?;
    Some(Lean::ChatMessage {
        content: Cow::Borrowed(content),
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn socket(text: &str) -> SocketPacket {
        match decode(text).expect("decodes") {
            Packet::Socket { nsp, packet } => {
                assert_eq!(nsp, "/");
                packet
            }
            other => panic!("not a socket packet: {other:?}"),
        }
    }

    fn is_protocol_error(text: &str) -> bool {
        decode(text).is_err()
    }

    #[test]
    fn encodes_event_without_ack() {
        let frame = encode_event("chat message", &[json!("hi"), json!("c-1")], None);
        assert_eq!(frame, r#"42["chat message","hi","c-1"]"#);
        assert_eq!(encode_event::<Value>("ping", &[], None), r#"42["ping"]"#);
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
    fn encodes_chat_messages_with_escapes() {
        assert_eq!(
            encode_chat_message("hi", Some("c-1"), Some(7)),
            r#"427["chat message","hi","c-1"]"#
        );
        assert_eq!(
            encode_chat_message("say \"hi\"\n", None, None),
            r#"42["chat message","say \"hi\"\n"]"#
        );
    }

    #[test]
    fn encodes_connect_and_pong() {
        assert_eq!(encode_connect(None), "40");
        assert_eq!(
            encode_connect(Some(&json!({"serverOffset": 5}))),
            r#"40{"serverOffset":5}"#
        );
        assert_eq!(encode_pong(""), "3");
        assert_eq!(encode_pong("probe"), "3probe");
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
        match decode(r#"42/admin,7["x",1]"#).expect("decodes") {
            Packet::Socket { nsp, packet } => {
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
        assert!(is_protocol_error("43[]"));
        assert!(is_protocol_error("431{}"));
        assert!(is_protocol_error("4399999999999999999999999[]"));
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
        assert_eq!(socket(DISCONNECT), SocketPacket::Disconnect);
    }

    #[test]
    fn parses_engine_packets() {
        let open = r#"0{"sid":"e1","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        match decode(open).expect("decodes") {
            Packet::Open(v) => assert_eq!(v["pingInterval"], json!(25000)),
            other => panic!("{other:?}"),
        }
        assert_eq!(decode("1"), Ok(Packet::Close));
        assert_eq!(decode("2"), Ok(Packet::Ping(String::new())));
        assert_eq!(decode("2probe"), Ok(Packet::Ping("probe".into())));
        assert_eq!(decode("3"), Ok(Packet::Pong));
        assert_eq!(decode("6"), Ok(Packet::Noop));
        assert!(is_protocol_error(""));
        assert!(is_protocol_error("9"));
        assert!(is_protocol_error("0not json"));
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
        assert!(is_protocol_error("45-[]"));
    }

    #[test]
    fn rejects_malformed_events() {
        assert!(is_protocol_error("42"));
        assert!(is_protocol_error("42[]"));
        assert!(is_protocol_error("42[1,2]"));
        assert!(is_protocol_error(r#"42{"a":1}"#));
        assert!(is_protocol_error("47"));
    }

    #[test]
    fn parses_chat_message_args() {
        assert_eq!(
            parse_chat_message(&[json!("hi"), json!(12)]),
            Ok(("hi".to_owned(), 12))
        );
        assert!(parse_chat_message(&[json!("hi")]).is_err());
        assert!(parse_chat_message(&[json!(1), json!(2)]).is_err());
        assert!(parse_chat_message(&[json!("hi"), json!("12")]).is_err());
    }

    #[test]
    fn finds_the_error_of_an_ack() {
        let error = json!({"error": {"code": "empty_content", "message": "m"}});
        assert_eq!(
            ack_error(std::slice::from_ref(&error)),
            Some(&error["error"])
        );
        assert_eq!(ack_error(&[]), None);
        assert_eq!(ack_error(&[json!(null)]), None);
        assert_eq!(ack_error(&[json!({"ok": true})]), None);
    }

    #[test]
    fn lean_reads_chat_messages_acks_and_pings() {
        assert_eq!(
            decode_lean("42[\"room message\",\"r-1\",\"b|1|2|3\",4,{\"name\":\"a\",\"at\":1}]"),
            Lean::ChatMessage {
                content: Cow::Borrowed("b|1|2|3"),
                offset: 4
            }
        );
        assert_eq!(
            decode_lean("42[\"room message\",\"r\\\"x\",\"c\",4]"),
            Lean::Other
        );
        assert_eq!(
            decode_lean("42[\"chat message\",\"b|1|2|3\",17]"),
            Lean::ChatMessage {
                content: Cow::Borrowed("b|1|2|3"),
                offset: 17
            }
        );
        assert_eq!(
            decode_lean("4312[]"),
            Lean::Ack {
                id: 12,
                error: false
            }
        );
        assert_eq!(
            decode_lean("437[null]"),
            Lean::Ack {
                id: 7,
                error: false
            }
        );
        assert_eq!(
            decode_lean("433[{\"error\":{\"code\":\"x\"}}]"),
            Lean::Ack { id: 3, error: true }
        );
        assert_eq!(
            decode_lean("42[\"chat message\",\"hi\",18,{\"name\":\"Ada\",\"at\":1}]"),
            Lean::ChatMessage {
                content: Cow::Borrowed("hi"),
                offset: 18
            }
        );
        assert_eq!(decode_lean("2"), Lean::Ping(""));
        assert_eq!(decode_lean("2probe"), Lean::Ping("probe"));
        assert_eq!(decode_lean("40{\"sid\":\"x\"}"), Lean::Other);
        assert_eq!(decode_lean("43[]"), Lean::Other);
    }

    #[test]
    fn lean_decodes_escaped_content_in_full() {
        let frame = encode_event(CHAT_MESSAGE, &[json!("say \"hi\", \\o/"), json!(5)], None);
        assert_eq!(
            decode_lean(&frame),
            Lean::ChatMessage {
                content: Cow::Owned("say \"hi\", \\o/".to_owned()),
                offset: 5
            }
        );
        assert_eq!(decode_lean("42[\"chat message\",1,2]"), Lean::Other);
        assert_eq!(decode_lean("42[\"chat message\",\"x\"]"), Lean::Other);
    }

    #[test]
    fn lean_and_full_decoding_agree() {
        for (content, offset) in [("plain", 1), ("a \"quote\"", 2), ("tab\tand é", 3)] {
            let frame = encode_event(CHAT_MESSAGE, &[json!(content), json!(offset)], None);
            let Packet::Socket {
                packet: SocketPacket::Event { args, .. },
                ..
            } = decode(&frame).expect("decodes")
            else {
                panic!("{frame} is not an event");
            };
            let full = parse_chat_message(&args).expect("chat message");
            match decode_lean(&frame) {
                Lean::ChatMessage { content, offset } => {
                    assert_eq!((content.into_owned(), offset), full)
                }
                other => panic!("{frame}: {other:?}"),
            }
        }
    }
}
