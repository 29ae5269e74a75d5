//! Who may open a socket: a foreign page's origin is refused on websocket and polling alike,
//! a configured key admits only the tokens it signed, each client address holds a bounded
//! share of the node (behind a trusted proxy too), and `/metrics` can live on a port of its own.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use chorus_testkit::{
    Client, ClientError, Node, PollingRefusal, PollingSession, TestDb, TestSettings, free_port,
    raw_status, try_get, wait_for, websocket_upgrade,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, get_current_timestamp};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A cross-site page cannot open a socket over either transport; the page's own origin, a
/// listed origin and a client without `Origin` can. Only a listed origin gets CORS headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_origin_is_refused_on_websocket_and_polling() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db).set(
        "CHORUS__ACCESS__ALLOWED_ORIGINS",
        "https://chat.example.com",
    );
    let node = Node::start(settings.build()).await;
    let port = node.addr.port();

    let evil = "Origin: https://evil.example\r\n";
    assert_eq!(raw_status(port, &websocket_upgrade(evil)).await, 403);
    let own = format!("Origin: http://127.0.0.1:{port}\r\n");
    let own_upgrade = websocket_upgrade(&own).replace(
        "Host: 127.0.0.1\r\n",
        &format!("Host: 127.0.0.1:{port}\r\n"),
    );
    assert_eq!(raw_status(port, &own_upgrade).await, 101);
    let listed = "Origin: https://chat.example.com\r\n";
    assert_eq!(raw_status(port, &websocket_upgrade(listed)).await, 101);
    assert_eq!(raw_status(port, &websocket_upgrade("")).await, 101);

    match PollingSession::join(port, &[("origin", "https://evil.example")], None).await {
        Err(PollingRefusal::Http(403, body)) => assert!(body.contains("origin_not_allowed")),
        Err(other) => panic!("refused otherwise: {other:?}"),
        Ok(_) => panic!("a foreign origin opened a polling session"),
    }
    let listed = PollingSession::join(port, &[("origin", "https://chat.example.com")], None)
        .await
        .expect("a listed origin joins over polling");
    drop(listed);
    let (status, allowed) = preflight(port, "https://chat.example.com").await;
    assert_eq!(status, 204);
    assert_eq!(allowed.as_deref(), Some("https://chat.example.com"));
    assert_eq!(preflight(port, "https://evil.example").await.0, 403);

    // Nothing the refused requests did reached the chat.
    let client = Client::connect(&node.url, None).await.expect("connect");
    client.send("after", Some("o-1")).await.assert_ok();
    assert_eq!(db.count().await, 1);
    node.stop().await;
}

/// `(status, Access-Control-Allow-Origin)` of a CORS preflight from `origin`.
async fn preflight(port: u16, origin: &str) -> (u16, Option<String>) {
    let head = format!(
        "OPTIONS /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Origin: {origin}\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
    );
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(T)).expect("timeout");
        stream.write_all(head.as_bytes()).expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        answer
    })
    .await
    .expect("preflight");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let allowed = answer
        .lines()
        .find_map(|l| l.strip_prefix("access-control-allow-origin: "))
        .map(str::to_owned);
    (status, allowed)
}

fn es256_token(claims: &Value) -> String {
    let pem = std::fs::read(fixture("es256-private.pem")).expect("the test key");
    let key = EncodingKey::from_ec_pem(&pem).expect("a P-256 key");
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &key).expect("signed")
}

/// With a public key configured, a handshake needs a token it verifies: none, a forged one
/// or another algorithm's get `unauthorized`, an expired one `token_expired`, over websocket
/// and polling; a valid one joins and sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_valid_token_opens_a_socket_when_a_key_is_configured() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db)
        .set(
            "CHORUS__ACCESS__JWT_PUBLIC_KEY_FILE",
            fixture("es256-public.pem"),
        )
        .set("CHORUS__ACCESS__JWT_ALGORITHM", "ES256");
    let node = Node::start(settings.build()).await;
    let now = get_current_timestamp();
    let valid = es256_token(&json!({"sub": "u-1", "name": "Ada", "exp": now + 600}));
    let expired = es256_token(&json!({"sub": "u-1", "exp": now - 3600}));
    let mut forged = valid.clone();
    forged.truncate(forged.len() - 4);
    forged.push_str("AAAA");
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "u-1"}),
        &EncodingKey::from_secret(b"guess").expect("key"),
    )
    .expect("signed");

    for (auth, code) in [
        (None, "unauthorized"),
        (Some(json!({"serverOffset": 0})), "unauthorized"),
        (Some(json!({"token": forged})), "unauthorized"),
        (Some(json!({"token": hs256})), "unauthorized"),
        (Some(json!({"token": expired})), "token_expired"),
    ] {
        match Client::connect(&node.url, auth.clone()).await {
            Err(ClientError::ConnectRejected(message)) => assert_eq!(message, code, "{auth:?}"),
            other => panic!("{auth:?} over websocket: {other:?}"),
        }
        match PollingSession::join(node.addr.port(), &[], auth.clone()).await {
            Err(PollingRefusal::ConnectError(message)) => assert_eq!(message, code, "{auth:?}"),
            Err(other) => panic!("{auth:?} over polling: {other:?}"),
            Ok(_) => panic!("{auth:?} joined over polling"),
        }
    }
    let client = Client::connect(&node.url, Some(json!({"token": valid, "serverOffset": 0})))
        .await
        .expect("a valid token joins");
    client.send("signed in", Some("t-1")).await.assert_ok();
    assert_eq!(db.count().await, 1);
    node.stop().await;
}

/// A direct peer holds at most `transport.max_connections_per_address` TCP connections; one
/// more gets `503`. Behind a trusted proxy, the forwarded client's sockets are counted
/// instead, and one more gets `too_many_connections`; another client behind it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_address_holds_a_bounded_share_of_the_node() {
    let db = TestDb::new().await;
    let direct = Node::start(
        TestSettings::new(&db)
            .set("CHORUS__TRANSPORT__MAX_CONNECTIONS_PER_ADDRESS", "2")
            .build(),
    )
    .await;
    let first = Client::connect(&direct.url, None).await.expect("connect");
    let _second = Client::connect(&direct.url, None).await.expect("connect");
    assert_eq!(
        raw_status(direct.addr.port(), &websocket_upgrade("")).await,
        503
    );
    first.send("still served", Some("a-1")).await.assert_ok();
    drop(first);
    wait_for(T, "a freed place to be taken again", || async {
        Client::connect(&direct.url, None).await.is_ok()
    })
    .await;
    direct.stop().await;

    let proxied = Node::start(
        TestSettings::new(&db)
            .set("CHORUS__TRANSPORT__MAX_CONNECTIONS_PER_ADDRESS", "2")
            .set("CHORUS__TRANSPORT__TRUSTED_PROXIES", "127.0.0.0/8")
            .build(),
    )
    .await;
    let port = proxied.addr.port();
    let from = |client: &'static str| [("x-forwarded-for", client)];
    let a1 = PollingSession::join(port, &from("203.0.113.7"), None).await;
    let a2 = PollingSession::join(port, &from("203.0.113.7"), None).await;
    assert!(a1.is_ok() && a2.is_ok());
    assert_eq!(
        PollingSession::join(port, &from("203.0.113.7"), None)
            .await
            .err(),
        Some(PollingRefusal::ConnectError("too_many_connections".into()))
    );
    // The client's own left entries prove nothing: the proxy's appended one is the client.
    assert_eq!(
        PollingSession::join(
            port,
            &[("x-forwarded-for", "198.51.100.1, 203.0.113.7")],
            None
        )
        .await
        .err(),
        Some(PollingRefusal::ConnectError("too_many_connections".into()))
    );
    PollingSession::join(port, &from("203.0.113.8"), None)
        .await
        .expect("another client behind the proxy joins");
    proxied.stop().await;
}

/// With `access.metrics_listen` set, `/metrics` answers there and no longer on the public
/// port; health and readiness stay on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_move_to_a_port_of_their_own() {
    let db = TestDb::new().await;
    let ops = free_port();
    let node = Node::start(
        TestSettings::new(&db)
            .set("CHORUS__ACCESS__METRICS_LISTEN", format!("127.0.0.1:{ops}"))
            .build(),
    )
    .await;
    let public = node.addr.port();
    let (status, body) = try_get(ops, "/metrics")
        .await
        .expect("the ops port answers");
    assert_eq!(status, 200);
    assert!(body.contains("chorus_connections"), "{body}");
    let (status, _) = try_get(public, "/metrics")
        .await
        .expect("the public port answers");
    assert_ne!(status, 200, "metrics are not public");
    for port in [public, ops] {
        assert_eq!(try_get(port, "/readyz").await.map(|(s, _)| s), Some(200));
    }
    node.stop().await;
}
