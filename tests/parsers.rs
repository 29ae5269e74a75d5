//! Property tests over everything that parses client input, run by the suite: raw Socket.IO
//! packets through socketioxide's (patched) parser into the `chat message` arguments and
//! `parse_send`, the handshake's `auth` (offset and token), `Origin` and `X-Forwarded-For`.
//! Each property holds for any input; the replay of `tests/corpus/packets.json` keeps every
//! frame that once broke something in the run, and proptest keeps the inputs it ever shrank
//! a failure to in `tests/parsers.proptest-regressions`.

use std::net::{IpAddr, Ipv4Addr};

use axum::http::{HeaderMap, HeaderValue, header};
use chorus::{
    access::{Origins, TokenError, Verifier},
    chat::{EventArgs, Limits, parse_send, requested_offset},
    config::Settings,
    peers::TrustedProxies,
};
use proptest::prelude::*;
use serde_json::Value;
use socketioxide_core::{
    Str,
    packet::PacketData,
    parser::{Parse, ParseConfig, ParserState},
};
use socketioxide_parser_common::CommonParser;

fn limits() -> Limits {
    (&Settings::load_from(None, Vec::new())
        .expect("defaults")
        .limits)
        .into()
}

/// What chorus makes of one text frame, as the node runs it: the packet parser, then for a
/// `chat message` event the argument extractor and `parse_send`, for a CONNECT the handshake
/// checks. Panics are the failures; the checks on what is accepted are in the properties.
fn run_frame(frame: &str, limits: &Limits) {
    let parser = CommonParser;
    let state = ParserState::default();
    let Ok(packet) =
        parser.decode_str(&ParseConfig::default(), &state, Str::from(frame.to_owned()))
    else {
        return;
    };
    match packet.inner {
        PacketData::Event(mut data, _) => {
            let is_chat = parser.read_event(&data).ok() == Some("chat message");
            if is_chat
                && let Ok(EventArgs(args)) = parser.decode_value::<EventArgs>(&mut data, true)
            {
                check_send(&args, limits);
            }
        }
        PacketData::Connect(Some(mut data)) => {
            if let Ok(auth) = parser.decode_value::<Value>(&mut data, false) {
                check_auth(&auth);
            }
        }
        _ => {}
    }
}

/// What `parse_send` accepts is within the limits, and it never accepts a NUL.
fn check_send(args: &[Value], limits: &Limits) {
    if let Ok(message) = parse_send(args, limits) {
        assert!(!message.content.trim().is_empty());
        assert!(message.content.chars().count() <= limits.max_message_chars);
        assert!(!message.content.contains('\0'));
        if let Some(offset) = &message.client_offset {
            assert!(!offset.is_empty() && !offset.contains('\0'));
            assert!(offset.chars().count() <= limits.max_client_offset_chars);
        }
    }
}

/// An accepted offset is positive; no random token verifies.
fn check_auth(auth: &Value) {
    if let Ok(Some(offset)) = requested_offset(Some(auth)) {
        assert!(offset > 0);
    }
    let verifier = verifier();
    assert!(matches!(
        verifier.verify(Some(auth)),
        Err(TokenError::Unauthorized | TokenError::Expired)
    ));
}

fn verifier() -> Verifier {
    let env = [("CHORUS__ACCESS__JWT_SECRET".to_owned(), "s3cret".to_owned())];
    let settings = Settings::load_from(None, env).expect("settings");
    Verifier::new(&settings.access)
        .expect("a secret")
        .expect("a verifier")
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        "[0-9]{1,25}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_]{0,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Any string at all, as a frame.
    #[test]
    fn any_text_frame_is_parsed_without_panicking(frame in "\\PC{0,64}") {
        run_frame(&frame, &limits());
    }

    /// Frames shaped like events and CONNECTs, with any type digit, namespace, ack id
    /// (overflowing ones included) and arguments.
    #[test]
    fn packet_shaped_frames_are_parsed_without_panicking(
        kind in "[0-9]",
        nsp in prop_oneof![Just(String::new()), "/[a-z]{0,6},"],
        ack in prop_oneof![Just(String::new()), "[0-9]{1,30}", "-[0-9]{1,3}"],
        event in prop_oneof![Just("chat message".to_owned()), ".{0,8}"],
        args in prop::collection::vec(json(), 0..4),
        auth in json(),
    ) {
        let limits = limits();
        let mut all = vec![Value::String(event)];
        all.extend(args);
        run_frame(&format!("4{kind}{nsp}{ack}{}", Value::Array(all)), &limits);
        run_frame(&format!("40{nsp}{auth}"), &limits);
    }

    /// An ack id beyond 64 bits never reaches a handler as "no ack".
    #[test]
    fn an_overflowing_ack_id_is_refused(digits in "[1-9][0-9]{19,30}") {
        let frame = format!("42{digits}[\"chat message\",\"x\",\"o\"]");
        let decoded = CommonParser.decode_str(
            &ParseConfig::default(),
            &ParserState::default(),
            Str::from(frame),
        );
        // Every such id exceeds i64::MAX: published, the parser read it as "no ack".
        prop_assert!(decoded.is_err(), "decoded as {:?}", decoded.map(|p| p.inner));
    }

    /// The arguments of a send, straight to `parse_send`.
    #[test]
    fn any_send_arguments_are_checked(args in prop::collection::vec(json(), 0..4)) {
        check_send(&args, &limits());
    }

    /// Any handshake `auth`.
    #[test]
    fn any_auth_is_checked(auth in json(), token in ".{0,80}") {
        check_auth(&auth);
        check_auth(&serde_json::json!({ "token": token }));
    }

    /// The client behind any `X-Forwarded-For` is the peer or one of the addresses listed;
    /// from an untrusted peer it is always the peer.
    #[test]
    fn forwarded_headers_name_the_peer_or_a_listed_address(
        values in prop::collection::vec("[0-9a-f.:, ]{0,40}", 0..3),
        trusted_peer in any::<bool>(),
    ) {
        let proxies = TrustedProxies::new(vec!["10.0.0.0/8".parse().expect("net")]);
        let peer = if trusted_peer {
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))
        } else {
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
        };
        let mut headers = HeaderMap::new();
        for value in &values {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.append("x-forwarded-for", value);
            }
        }
        let client = proxies.client(peer, &headers);
        if trusted_peer {
            let listed = values
                .iter()
                .flat_map(|v| v.split(','))
                .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
                .any(|addr| addr == client || addr.to_canonical() == client);
            prop_assert!(client == peer || listed);
        } else {
            prop_assert_eq!(client, peer);
        }
    }

    /// Any `Origin` and `Host`: only the page's own origin passes when none is listed.
    #[test]
    fn any_origin_is_judged_without_panicking(origin in "\\PC{0,40}", host in "[a-z0-9.:]{0,20}") {
        let settings = Settings::load_from(None, Vec::new()).expect("defaults");
        let origins = Origins::new(&settings.access);
        let mut headers = HeaderMap::new();
        if let (Ok(origin), Ok(host)) = (HeaderValue::from_str(&origin), HeaderValue::from_str(&host)) {
            headers.insert(header::ORIGIN, origin);
            headers.insert(header::HOST, host);
            let _ = origins.allows(&headers);
        }
    }
}

/// Every frame of the corpus, replayed.
#[test]
fn the_corpus_replays() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/packets.json");
    let corpus: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the corpus")).expect("JSON");
    let frames = corpus["text"].as_array().expect("text frames");
    assert!(frames.len() >= 40, "the corpus holds its frames");
    let limits = limits();
    for frame in frames {
        run_frame(frame.as_str().expect("a string"), &limits);
    }
}
