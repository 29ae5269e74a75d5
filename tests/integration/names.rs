//! Names and acks: every message carries its sender's name and time (`{ name, at }`, the third argument
//! of `chat message`), live, replayed from the recovery log and from the database, on every
//! node; the name is the handshake's `auth.name` in open mode and the token's with tokens. A
//! send's ack carries its offset.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_testkit::{
    Client, ClientError, Node, REDIS, TestDb, TestSettings, spawn_cluster, stop_all, unique,
};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// Ada and an anonymous client send on two nodes; a third client on the third node sees both
/// live with their names and times, and a fourth that joins later gets them replayed with the
/// same names and times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_carry_their_senders_name_and_time_on_every_node() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("names")).await;
    let ada = Client::connect(
        &nodes[0].url,
        Some(json!({"name": "  Ada ", "serverOffset": 0})),
    )
    .await
    .expect("connect");
    let anonymous = Client::connect(&nodes[1].url, None).await.expect("connect");
    let mut reader = Client::connect(&nodes[2].url, None).await.expect("connect");
    let before = now_ms();
    ada.send("hello", Some("a-1")).await.assert_ok();
    anonymous.send("hi", Some("b-1")).await.assert_ok();
    let after = now_ms();

    let mut live = Vec::new();
    for _ in 0..2 {
        live.push(reader.next_chat_message_from(T).await.expect("live"));
    }
    assert_eq!(
        live.iter()
            .map(|(c, o, n, _)| (c.as_str(), *o, n.as_str()))
            .collect::<Vec<_>>(),
        [("hello", 1, "Ada"), ("hi", 2, "anonymous")]
    );
    for (_, _, _, at) in &live {
        assert!(
            (before - 1000..=after + 1000).contains(at),
            "{at} not in [{before}, {after}]"
        );
    }

    // Replayed from the recovery log (a node whose stream holds them) and from the database
    // (a fresh single node on the same database has no log).
    let mut late = Client::connect(&nodes[1].url, None).await.expect("connect");
    let single = Node::start(TestSettings::new(&db).build()).await;
    let mut from_db = Client::connect(&single.url, None).await.expect("connect");
    for client in [&mut late, &mut from_db] {
        let mut replayed = Vec::new();
        for _ in 0..2 {
            replayed.push(client.next_chat_message_from(T).await.expect("replayed"));
        }
        assert_eq!(replayed, live, "the same names and times as live");
    }
    single.stop().await;
    stop_all(nodes).await;
}

/// An unusable `auth.name` refuses the handshake with a `connect_error` that says what is
/// wrong; with tokens, `auth.name` is ignored and the token's name is the sender's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_name_is_refused_and_a_token_name_cannot_be_overridden() {
    let db = TestDb::new().await;
    let node = Node::start(TestSettings::new(&db).build()).await;
    for name in [
        json!(""),
        json!("@ada"),
        json!("a|b"),
        json!("x".repeat(33)),
        json!(5),
    ] {
        match Client::connect(&node.url, Some(json!({ "name": name }))).await {
            Err(ClientError::ConnectRejected(message)) => {
                assert!(message.starts_with("auth.name"), "{name}: {message}")
            }
            other => panic!("{name} must be refused, got {other:?}"),
        }
    }
    node.stop().await;

    let secured = Node::start(
        TestSettings::new(&db)
            .set("CHORUS__ACCESS__JWT_SECRET", "s3cret")
            .build(),
    )
    .await;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "u-7", "name": "Grace"}),
        &jsonwebtoken::EncodingKey::from_secret(b"s3cret").expect("key"),
    )
    .expect("signed");
    let mut client = Client::connect(
        &secured.url,
        Some(json!({"token": token, "name": "Mallory"})),
    )
    .await
    .expect("a valid token joins");
    client.send("it is me", Some("g-1")).await.assert_ok();
    let (_, _, name, _) = client.next_chat_message_from(T).await.expect("own message");
    assert_eq!(name, "Grace");
    secured.stop().await;
}

/// The success ack is error-first with the message's place: `null, { serverOffset }`, for a
/// first send and for its retry alike, so a page can confirm its own message at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_carries_the_messages_offset_for_a_retry_too() {
    let db = TestDb::new().await;
    let node = Node::start(TestSettings::new(&db).build()).await;
    let client = Client::connect(&node.url, None).await.expect("connect");
    client.send("first", Some("k-1")).await.assert_ok();
    let ack = client.send("second", Some("k-2")).await;
    assert_eq!(ack.args(), [json!(null), json!({"serverOffset": 2})]);
    let retry = client.send("second", Some("k-2")).await;
    assert_eq!(retry.args(), [json!(null), json!({"serverOffset": 2})]);
    assert_eq!(db.count().await, 2);
    node.stop().await;
}
