//! G6: bad input gets a clear error, changes nothing, and hurts no one else.

use std::time::Duration;

use chorus_testkit::{Client, ClientError, Node, REDIS, TestDb, TestSettings, unique};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_of_each_kind_is_rejected_and_changes_nothing() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db)
        .redis(REDIS, &unique("in"))
        .set("CHORUS__LIMITS__MAX_MESSAGE_CHARS", "100")
        .set("CHORUS__LIMITS__MAX_PAYLOAD_BYTES", "4096");
    let node = Node::start(settings.build()).await;
    let mut bystander = Client::connect(&node.url, None).await.expect("connect");
    let client = Client::connect(&node.url, None).await.expect("connect");

    let cases: Vec<(Vec<Value>, &str)> = vec![
        (vec![json!(42), json!("c-1")], "invalid_content"),
        (vec![json!({"text": "hi"}), json!("c-2")], "invalid_content"),
        (vec![json!(null)], "invalid_content"),
        (vec![], "invalid_content"),
        (vec![json!(""), json!("c-3")], "empty_content"),
        (vec![json!("   "), json!("c-4")], "empty_content"),
        (
            vec![json!("x".repeat(101)), json!("c-5")],
            "content_too_long",
        ),
        (vec![json!("ok"), json!(12)], "invalid_client_offset"),
        (vec![json!("ok"), json!(["a"])], "invalid_client_offset"),
        (
            vec![json!("ok"), json!("o".repeat(129))],
            "invalid_client_offset",
        ),
    ];
    for (args, code) in cases {
        // Each must get an error ack.
        let ack = client.send_args(&args).await;
        assert_eq!(ack.error_code(), Some(code), "{args:?} -> {ack:?}");
        let message = ack.error_message().unwrap_or("");
        assert!(!message.is_empty(), "error ack carries a message");
    }
    // The connection stayed open and still works.
    let ack = client.send("valid", Some("c-ok")).await;
    assert_eq!(ack.error_code(), None);

    // Malformed packets and oversized frames close only the offender's connection.
    for raw in [
        "42[not json",
        "4",
        "42",
        "49[\"x\"]",
        "42{\"a\":1}",
        "0garbage",
    ] {
        let mut bad = Client::connect(&node.url, None).await.expect("connect");
        bad.send_raw(raw.to_owned()).await.expect("send raw");
        // Either the server closes it or ignores the packet; the node must stay up.
        let _ = bad.wait_closed(Duration::from_millis(300)).await;
    }
    let mut big = Client::connect(&node.url, None).await.expect("connect");
    let huge = format!("42[\"chat message\",\"{}\",\"big-1\"]", "y".repeat(10_000));
    big.send_raw(huge).await.expect("send oversized");
    big.wait_closed(T)
        .await
        .expect("an oversized websocket frame closes the connection");
    let binary = Client::connect(&node.url, None).await.expect("connect");
    binary
        .send_raw_binary(vec![0, 1, 2, 3])
        .await
        .expect("send binary");

    // Handshakes with a bad offset get a connect_error that says what is wrong.
    for auth in [
        json!({"serverOffset": "abc"}),
        json!({"serverOffset": -5}),
        json!({"serverOffset": 1.5}),
        json!("str"),
        json!({"serverOffset": 1_000_000}),
    ] {
        match Client::connect(&node.url, Some(auth.clone())).await {
            Err(ClientError::ConnectRejected(message)) => {
                assert!(
                    message.contains("serverOffset") || message.contains("auth"),
                    "{message}"
                )
            }
            other => panic!("{auth} must be refused, got {other:?}"),
        }
    }

    // Nothing invalid was stored or broadcast: the bystander sees only the valid message.
    let (content, offset) = bystander.next_chat_message(T).await.expect("valid message");
    assert_eq!((content.as_str(), offset), ("valid", 1));
    assert!(
        bystander
            .next_chat_message(Duration::from_millis(500))
            .await
            .is_err()
    );
    assert_eq!(db.count().await, 1);
    assert!(
        node.metric("chorus_errors_total{kind=\"invalid_input\"}")
            .await
            >= 10.0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_client_leaves_others_unaffected() {
    let node = Node::start(TestSettings::new("sqlite::memory:").build()).await;
    let mut bystander = Client::connect(&node.url, None).await.expect("connect");
    let flooder = Client::connect(&node.url, None).await.expect("connect");
    // Fire 2 000 sends without waiting; some may be refused as rate limited, none may crash.
    for i in 0..2000 {
        flooder
            .send_no_ack(&format!("flood {i}"), Some(&format!("f-{i}")))
            .await;
    }
    let other = Client::connect(&node.url, None).await.expect("connect");
    // Another client is served during the flood.
    let ack = other.send("still here", Some("o-1")).await;
    assert_eq!(ack.error_code(), None);
    // The bystander receives a gapless, ordered stream that includes the other client's message.
    let mut expected = 1;
    loop {
        let (content, offset) = bystander.next_chat_message(T).await.expect("delivery");
        assert_eq!(offset, expected);
        expected += 1;
        if content == "still here" {
            break;
        }
    }
    node.stop().await;
}
