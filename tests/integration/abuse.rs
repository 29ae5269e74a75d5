//! A client acting as an attacker would: input that used to poison other clients' acks, packets
//! that used to be half-executed, connections that used to be held open for ever. Each test
//! checks that the offender changes nothing and that a well-behaved client is still served.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use chorus_testkit::{Client, Node, PollingSession, TestDb, TestSettings, TestSqlite, wait_for};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// Valid, NUL, valid sent back to back: Postgres refused a NUL, and the batch it shared with
/// the valid messages lost every ack. Now both backends refuse it alone, with an error ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_is_refused_alike_on_both_backends_and_costs_no_one_an_ack() {
    let postgres = TestDb::new().await;
    let sqlite = TestSqlite::new();
    for (backend, settings) in [
        ("postgres", TestSettings::new(&postgres)),
        ("sqlite", TestSettings::new(&sqlite)),
    ] {
        let node = Node::start(settings.build()).await;
        let sender = Client::connect(&node.url, None).await.expect("connect");
        let other = Client::connect(&node.url, None).await.expect("connect");
        // Sent without waiting for each ack, so the writer takes them as one batch.
        let (before, nul, nul_offset, beside, after) = tokio::join!(
            sender.send("before", Some("n-1")),
            sender.send("a\u{0}b", Some("n-2")),
            sender.send("offset", Some("n-\u{0}")),
            other.send("beside", Some("o-1")),
            sender.send("after", Some("n-3")),
        );
        for ack in [&before, &beside, &after] {
            assert!(ack.is_ok(), "{backend}: {ack:?}");
        }
        assert_eq!(nul.error_code(), Some("invalid_content"), "{backend}");
        assert_eq!(
            nul_offset.error_code(),
            Some("invalid_client_offset"),
            "{backend}"
        );
        node.stop().await;
        let stored = match backend {
            "postgres" => postgres.count().await,
            _ => sqlite.count().await,
        };
        assert_eq!(
            stored, 3,
            "{backend}: the three valid messages, nothing else"
        );
    }
}

/// `4299999999999999999999999999999["chat message","x","o"]` asks for an ack whose id does
/// not fit in 64 bits. It was read as "no ack": stored and broadcast, never acked. Now it is a
/// malformed packet: refused, over websocket and over polling, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_id_too_large_is_refused_and_nothing_is_stored() {
    const PACKET: &str = r#"4299999999999999999999999999999["chat message","x","o"]"#;
    let db = TestDb::new().await;
    let node = Node::start(TestSettings::new(&db).build()).await;

    let mut websocket = Client::connect(&node.url, None).await.expect("connect");
    websocket.send_raw(PACKET.to_owned()).await.expect("send");
    websocket
        .wait_closed(T)
        .await
        .expect("a malformed packet closes the websocket session");

    let polling = PollingSession::open(node.addr.port()).await;
    polling.post(PACKET).await;
    wait_for(T, "the polling session to be closed", || async {
        polling.poll().await.0 != 200
    })
    .await;

    // Anything the bad packets had queued for the writer would be stored before this.
    let bystander = Client::connect(&node.url, None).await.expect("connect");
    bystander
        .send("still served", Some("b-1"))
        .await
        .assert_ok();
    assert_eq!(db.count().await, 1, "only the bystander's message");
    node.stop().await;
}

/// How long a test node gives a connection to send a request head.
const HEAD_DEADLINE_MS: &str = "1000";

/// Reads until the peer closes; the bytes it sent first.
fn read_to_close(mut stream: TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(T)).expect("read timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return seen,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(error) => panic!("the node did not close the connection within {T:?}: {error}"),
        }
    }
}

/// Connections that send nothing, that trickle a partial head, or that sit idle after a
/// response are closed after the head deadline; a head beyond the size bound gets 431. A
/// websocket idle for longer than the deadline is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_trickling_idle_and_oversized_connections_are_closed() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db)
        .set(
            "CHORUS__TRANSPORT__HEADER_READ_TIMEOUT_MS",
            HEAD_DEADLINE_MS,
        )
        .set("CHORUS__TRANSPORT__MAX_HEADER_BYTES", "4096");
    let node = Node::start(settings.build()).await;
    let addr = node.addr;
    let websocket = Client::connect(&node.url, None).await.expect("connect");

    let silent = TcpStream::connect(addr).expect("connect");
    let started = Instant::now();
    let said = tokio::task::spawn_blocking(move || read_to_close(silent))
        .await
        .expect("reader");
    assert!(said.is_empty(), "closed without an answer");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the deadline"
    );

    let trickler = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .expect("write");
        let started = Instant::now();
        // A byte every 200 ms: it never completes the head, and that does not buy it time.
        while started.elapsed() < T {
            if stream.write_all(b"X").is_err() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("a trickling connection was still open after {T:?}");
    });
    let open_for = trickler.await.expect("trickler");
    assert!(
        open_for < Duration::from_secs(5),
        "closed near the deadline: {open_for:?}"
    );

    let idle = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        // The answer, then nothing more: keep-alive idle until the node closes it.
        read_to_close(stream)
    });
    let said = String::from_utf8_lossy(&idle.await.expect("idle")).into_owned();
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");

    let oversized = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(8000)
        );
        stream.write_all(head.as_bytes()).expect("write");
        read_to_close(stream)
    });
    let said = String::from_utf8_lossy(&oversized.await.expect("oversized")).into_owned();
    assert!(said.starts_with("HTTP/1.1 431"), "{said}");

    // The websocket has been idle for longer than the deadline all along, and still works.
    websocket
        .send("after the deadline", Some("w-1"))
        .await
        .assert_ok();
    node.stop().await;
}

/// A socket that sends faster than its rate gets `rate_limited` beyond its burst, and is
/// disconnected when it keeps on; another socket on the same node is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_socket_is_rate_limited_then_cut_off_and_others_are_served() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db)
        .set("CHORUS__LIMITS__MESSAGES_PER_SECOND", "2")
        .set("CHORUS__LIMITS__MESSAGE_BURST", "10")
        .set("CHORUS__LIMITS__RATE_LIMITED_DISCONNECT_AFTER", "30");
    let node = Node::start(settings.build()).await;
    let mut flooder = Client::connect(&node.url, None).await.expect("connect");
    let bystander = Client::connect(&node.url, None).await.expect("connect");

    // Twenty at once: the burst is taken, the rest is refused.
    let offsets: Vec<String> = (0..20).map(|i| format!("f-{i}")).collect();
    let started = Instant::now();
    let acks = futures_util::future::join_all(
        offsets
            .iter()
            .map(|o| flooder.send("flood", Some(o.as_str()))),
    )
    .await;
    let accepted = acks.iter().filter(|a| a.is_ok()).count();
    let limited = acks
        .iter()
        .filter(|a| a.error_code() == Some("rate_limited"))
        .count();
    assert_eq!(accepted + limited, 20, "{acks:?}");
    // The burst of 10, plus what 2 per second refilled while the twenty were answered.
    let refills = (started.elapsed().as_secs_f64() * 2.0).ceil() as usize;
    assert!(
        (10..=10 + refills).contains(&accepted),
        "the burst of 10 and {refills} refills: {acks:?}"
    );
    bystander.send("unhurt", Some("b-1")).await.assert_ok();

    // Keeping on: thirty refusals in a row cut the flooder off. A token refilled meanwhile
    // lets one through (and starts the count again).
    let mut refilled = 0;
    for i in 0..80 {
        if flooder.is_closed() {
            break;
        }
        match flooder.try_send("flood", Some(&format!("g-{i}")), T).await {
            Ok(ack) if ack.is_ok() => refilled += 1,
            Ok(ack) => assert_eq!(ack.error_code(), Some("rate_limited"), "{ack:?}"),
            Err(_) => break, // closed while waiting for the ack
        }
    }
    flooder
        .wait_closed(T)
        .await
        .expect("a socket that keeps flooding is disconnected");
    bystander
        .send("still unhurt", Some("b-2"))
        .await
        .assert_ok();
    assert_eq!(db.count().await, (accepted + refilled) as i64 + 2);
    node.stop().await;
}

/// A node holds at most `transport.max_connections` TCP connections, websockets included; one
/// more gets a clear `503` at once, not a hang, and a place that frees up is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_node_limit_get_a_clear_refusal() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db).set("CHORUS__TRANSPORT__MAX_CONNECTIONS", "3");
    let node = Node::start(settings.build()).await;
    let addr = node.addr;
    let first = Client::connect(&node.url, None).await.expect("connect");
    let second = Client::connect(&node.url, None).await.expect("connect");
    let mut third = TcpStream::connect(addr).expect("connect");
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut answer = [0u8; 12];
    third
        .read_exact(&mut answer)
        .expect("an answer while the node has room");
    assert_eq!(&answer, b"HTTP/1.1 200");

    // Silent, and with its request sent at once: both read the answer and a clean close (a
    // close with the request unread would reset the connection and could lose the answer).
    for request in [&b""[..], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"] {
        let refused = tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream.write_all(request).expect("write");
            read_to_close(stream)
        })
        .await
        .expect("reader");
        let refused = String::from_utf8_lossy(&refused).into_owned();
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    }
    // The sockets in place are served all along.
    first.send("still served", Some("c-1")).await.assert_ok();

    second.close().await;
    wait_for(
        T,
        "a freed place to be taken by a new connection",
        || async {
            tokio::task::spawn_blocking(move || {
                let mut stream = TcpStream::connect(addr).expect("connect");
                // While the node is still full it refuses this probe; closing on a request it
                // did not read, it may reset the connection instead of a clean close.
                if stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .is_err()
                {
                    return false;
                }
                stream.set_read_timeout(Some(T)).expect("read timeout");
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer);
                answer.starts_with(b"HTTP/1.1 200")
            })
            .await
            .expect("probe")
        },
    )
    .await;
    drop(third);
    node.stop().await;
}

/// A websocket whose peer stopped reading used to keep its descriptor, its place and every
/// packet queued for it until the peer read again. Now a write that makes no progress for
/// `transport.write_stall_timeout_ms` closes the connection: the TCP connection, the socket
/// and its queue are released, and the sender beside it is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_released() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db)
        .set("CHORUS__TRANSPORT__WRITE_STALL_TIMEOUT_MS", "1000")
        // A small fixed kernel buffer, which the sends below surely fill (autotuned, it may
        // grow to 4 MiB).
        .set("CHORUS__TRANSPORT__SOCKET_SEND_BUFFER_BYTES", "16384")
        // The feed's own cut-off would also end it; this test is about the stalled write.
        .set("CHORUS__TRANSPORT__SLOW_CONSUMER_TIMEOUT_MS", "600000");
    let node = Node::start(settings.build()).await;
    let sender = Client::connect(&node.url, None).await.expect("connect");
    let mut unread = chorus_testkit::slow_consumer(node.addr.port()).await;
    assert_eq!(node.metric("chorus_connections").await, 2.0);

    // Far more than the kernel buffers of the unread socket hold.
    let content = "x".repeat(4000);
    for i in 0..400 {
        sender
            .send(&content, Some(&format!("s-{i}")))
            .await
            .assert_ok();
        if node.metric("chorus_connections").await < 2.0 {
            break;
        }
    }
    // The sender's connection and the probe's own.
    wait_for(T, "the unread socket to be released", || async {
        node.metric("chorus_tcp_connections").await == 2.0
            && node.metric("chorus_connections").await == 1.0
    })
    .await;
    // Its peer, reading at last, finds what its buffers held and then the end.
    let drained = tokio::time::timeout(T, async {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = unread.next().await {}
    })
    .await;
    assert!(drained.is_ok(), "the node closed the unread connection");
    sender
        .send("still served", Some("s-last"))
        .await
        .assert_ok();
    node.stop().await;
}

/// An Engine.IO session that never joins the chat (no Socket.IO CONNECT) is closed after
/// `transport.handshake_timeout_ms`, over polling and over websocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_joins_is_closed_after_the_handshake_timeout() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db).set("CHORUS__TRANSPORT__HANDSHAKE_TIMEOUT_MS", "500");
    let node = Node::start(settings.build()).await;
    let port = node.addr.port();

    let polling = PollingSession::open_only(port).await;
    let started = Instant::now();
    wait_for(T, "the unjoined polling session to be closed", || async {
        polling.poll().await.0 != 200
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));

    let addr = node.addr;
    let websocket = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .write_all(chorus_testkit::websocket_upgrade("").as_bytes())
            .expect("write");
        let started = Instant::now();
        read_to_close(stream);
        started.elapsed()
    });
    let open_for = websocket.await.expect("websocket");
    assert!(
        open_for >= Duration::from_millis(400) && open_for < Duration::from_secs(5),
        "closed after {open_for:?}"
    );
    node.stop().await;
}

/// The frames of `tests/corpus/packets.json`.
fn corpus() -> (Vec<String>, Vec<Vec<u8>>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/packets.json");
    let corpus: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the corpus")).expect("JSON");
    let text = serde_json::from_value(corpus["text"].clone()).expect("text frames");
    let binary = serde_json::from_value(corpus["binary"].clone()).expect("binary frames");
    (text, binary)
}

/// Every malformed frame of the corpus (truncated packets, wrong types, huge or negative ack
/// ids, binary attachments where text is expected, unknown namespaces), each on a session of
/// its own, over websocket and over polling. After each, the session either answers a valid
/// send or is closed: never left open and deaf. A bystander on the node is served all along,
/// and nothing of the frames is stored: only the valid sends (a valid send that raced its
/// session's close may be stored unacked, as after any lost connection; a retry would be
/// answered as a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_over_websocket_and_polling_store_nothing_and_hurt_no_one() {
    let db = TestDb::new().await;
    let node = Node::start(TestSettings::new(&db).build()).await;
    let mut bystander = Client::connect(&node.url, None).await.expect("connect");
    let (text, binary) = corpus();
    let mut valid = 0;

    for (i, frame) in text.iter().enumerate() {
        let mut client = Client::connect(&node.url, None).await.expect("connect");
        client.send_raw(frame.clone()).await.expect("send");
        if answers_or_closes(&mut client, &format!("w-{i}"), frame).await {
            valid += 1;
        }
    }
    for (i, frame) in binary.iter().enumerate() {
        let mut client = Client::connect(&node.url, None).await.expect("connect");
        client.send_raw_binary(frame.clone()).await.expect("send");
        if answers_or_closes(&mut client, &format!("b-{i}"), &format!("{frame:?}")).await {
            valid += 1;
        }
    }
    for (i, frame) in text.iter().enumerate() {
        let polling = PollingSession::open(node.addr.port()).await;
        polling.post(frame).await;
        let valid_send = [
            json!("chat message"),
            json!("valid"),
            json!(format!("p-{i}")),
        ];
        // An ack, or a closed session; one left open without an ack fails inside.
        if let Ok(ack) = polling.emit_with_ack(77, &valid_send).await {
            ack.assert_ok();
            valid += 1;
        }
    }

    bystander.send("unhurt", Some("by-1")).await.assert_ok();
    let stored = db.count().await;
    let mut seen = 0;
    while let Ok((content, _)) = bystander
        .next_chat_message(Duration::from_millis(500))
        .await
    {
        assert!(matches!(content.as_str(), "valid" | "unhurt"), "{content}");
        seen += 1;
    }
    assert_eq!(seen, stored, "the bystander saw every stored message");
    let mut conn = db.connect().await;
    let foreign: i64 = sqlx::query_scalar(
        "select count(*) from messages where content not in ('valid', 'unhurt')",
    )
    .fetch_one(&mut conn)
    .await
    .expect("count");
    assert_eq!(foreign, 0, "nothing of the malformed frames was stored");
    assert!(
        stored > valid as i64,
        "every acked send ({valid}) and the bystander's were stored ({stored})"
    );
    node.stop().await;
}

/// After a bad frame: `true` when the session still acks a valid send, `false` when the node
/// closed it; a session left open that does not answer fails the test.
async fn answers_or_closes(client: &mut Client, offset: &str, frame: &str) -> bool {
    match client
        .try_send("valid", Some(offset), Duration::from_secs(3))
        .await
    {
        Ok(ack) => {
            ack.assert_ok();
            true
        }
        Err(_) => {
            client
                .wait_closed(T)
                .await
                .unwrap_or_else(|e| panic!("{frame:?}: neither answered nor closed: {e}"));
            false
        }
    }
}

/// The limits a socket meets hold over polling as over websocket: message length, the send
/// rate (and its burst), and the payload size, which closes the session. Error acks name the
/// limit and carry no internal names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_limits_hold_over_polling_too() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db)
        .set("CHORUS__LIMITS__MAX_MESSAGE_CHARS", "100")
        .set("CHORUS__LIMITS__MAX_PAYLOAD_BYTES", "4096")
        .set("CHORUS__LIMITS__MESSAGES_PER_SECOND", "1")
        .set("CHORUS__LIMITS__MESSAGE_BURST", "3");
    let node = Node::start(settings.build()).await;
    let port = node.addr.port();

    let polling = PollingSession::open(port).await;
    let too_long = polling
        .emit_with_ack(
            1,
            &[json!("chat message"), json!("x".repeat(101)), json!("l-1")],
        )
        .await
        .expect("an ack");
    assert_eq!(
        too_long.error_code(),
        Some("content_too_long"),
        "{too_long:?}"
    );
    let message = too_long.error_message().unwrap_or_default().to_lowercase();
    for internal in ["sql", "postgres", "sqlite", "panick", "src/"] {
        assert!(!message.contains(internal), "{message}");
    }
    // The refused send took a token too: two of the burst are left, then the rate refuses.
    let mut codes = Vec::new();
    for i in 0..4 {
        let ack = polling
            .emit_with_ack(
                10 + i,
                &[json!("chat message"), json!("ok"), json!(format!("r-{i}"))],
            )
            .await
            .expect("an ack");
        codes.push(ack.error_code().map(str::to_owned));
    }
    assert_eq!(codes[..2], [None, None], "{codes:?}");
    assert!(
        codes[2..].contains(&Some("rate_limited".to_owned())),
        "beyond the burst: {codes:?}"
    );

    let oversized = PollingSession::open(port).await;
    let status = oversized
        .post(&format!(
            r#"42["chat message","{}","big"]"#,
            "y".repeat(5000)
        ))
        .await;
    assert_ne!(status, 200, "a payload beyond the bound is refused");
    wait_for(T, "the oversized session to be closed", || async {
        oversized.poll().await.0 != 200
    })
    .await;
    let accepted = codes.iter().filter(|code| code.is_none()).count();
    assert_eq!(db.count().await, accepted as i64, "the accepted sends only");
    node.stop().await;
}

/// A client that reconnects gets a fresh bucket for its new socket, not for its address: all
/// sockets of one address share `limits.address_message_burst` and its rate. A client of
/// another address is not touched by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_refill_the_address_bucket() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db)
        .set("CHORUS__LIMITS__MESSAGES_PER_SECOND", "1")
        .set("CHORUS__LIMITS__MESSAGE_BURST", "10")
        .set("CHORUS__LIMITS__ADDRESS_MESSAGES_PER_SECOND", "1")
        .set("CHORUS__LIMITS__ADDRESS_MESSAGE_BURST", "15");
    let node = Node::start(settings.build()).await;
    let flooder: std::net::IpAddr = [127, 0, 0, 2].into();
    let started = Instant::now();
    let mut accepted = 0;
    for round in 0..3 {
        let client = Client::connect_from(&node.url, flooder, None)
            .await
            .expect("connect");
        for i in 0..10 {
            if client
                .send("again", Some(&format!("f-{round}-{i}")))
                .await
                .is_ok()
            {
                accepted += 1;
            }
        }
        client.close().await;
    }
    let refills = started.elapsed().as_secs_f64().ceil() as usize;
    assert!(
        (15..=15 + refills).contains(&accepted),
        "the address's burst of 15 and {refills} refills, not three sockets' 30: {accepted}"
    );
    let other = Client::connect(&node.url, None).await.expect("connect");
    for i in 0..10 {
        other
            .send("another address", Some(&format!("o-{i}")))
            .await
            .assert_ok();
    }
    assert_eq!(db.count().await, accepted as i64 + 10);
    node.stop().await;
}

/// A socket holds at most `limits.max_in_flight` sends awaiting their ack: while the store
/// cannot take a write (another connection holds SQLite's write lock, so appends wait out the
/// store's time limit), the first sends wait (no ack), and one more is refused at once as
/// `rate_limited`. Once the lock is gone, the retries of the waiting ones are acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_beyond_the_in_flight_bound_are_refused_at_once() {
    use sqlx::Connection;
    let sqlite = TestSqlite::new();
    let settings = TestSettings::new(&sqlite).set("CHORUS__LIMITS__MAX_IN_FLIGHT", "3");
    let node = Node::start(settings.build()).await;
    let client = Client::connect(&node.url, None).await.expect("connect");

    let mut blocker = sqlx::SqliteConnection::connect(sqlite.as_ref())
        .await
        .expect("open the test SQLite file");
    sqlx::query("begin exclusive")
        .execute(&mut blocker)
        .await
        .expect("take the write lock");
    let wait = Duration::from_secs(3);
    // Written in this order on one websocket, so the node counts the first three first.
    let (a, b, c, d, e) = tokio::join!(
        client.try_send("one", Some("i-1"), wait),
        client.try_send("two", Some("i-2"), wait),
        client.try_send("three", Some("i-3"), wait),
        client.try_send("four", Some("i-4"), wait),
        client.try_send("five", Some("i-5"), wait),
    );
    for waiting in [&a, &b, &c] {
        assert!(
            waiting.is_err(),
            "no ack while the store is locked: {waiting:?}"
        );
    }
    for refused in [d, e] {
        let refused = refused.expect("refused at once, not left waiting");
        assert_eq!(refused.error_code(), Some("rate_limited"), "{refused:?}");
    }

    sqlx::query("rollback")
        .execute(&mut blocker)
        .await
        .expect("release the write lock");
    for (content, offset) in [("one", "i-1"), ("two", "i-2"), ("three", "i-3")] {
        client
            .send_until_acked(content, Some(offset), wait, 10)
            .await
            .assert_ok();
    }
    assert_eq!(sqlite.count().await, 3);
    node.stop().await;
}
