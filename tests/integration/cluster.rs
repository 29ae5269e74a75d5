//! Multi-node behaviour: cross-node delivery, replay on another node, G1, and G3 under load.

use std::time::Duration;

use chorus::store::{NewMessage, PgStore, Store};
use chorus_testkit::{
    Client, Node, REDIS, TestDb, TestSettings, TestSqlite, assert_acked, run_js, spawn_cluster,
    stop_all, unique,
};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_to_one_node_reaches_clients_of_every_node() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("x")).await;
    let mut receivers = Vec::new();
    for node in &nodes {
        receivers.push(Client::connect(&node.url, None).await.expect("connect"));
    }
    let sender = Client::connect(&nodes[0].url, None).await.expect("connect");
    for i in 0..20 {
        sender
            .send(&format!("m{i}"), Some(&format!("x-{i}")))
            .await
            .assert_ok();
    }
    for (n, receiver) in receivers.iter_mut().enumerate() {
        for i in 0..20 {
            let (content, offset) = receiver.next_chat_message(T).await.expect("delivered");
            assert_eq!(
                (content.as_str(), offset),
                (format!("m{i}").as_str(), i + 1),
                "node {n}"
            );
        }
    }
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_reconnecting_to_another_node() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("r")).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    run_js(
        "replay.test.mjs",
        &urls,
        &[("CHORUS_TRANSPORT", "websocket".into())],
    )
    .await;
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_20000_missed_messages_arrives_complete_and_in_order() {
    let db = TestDb::new().await;
    let store = PgStore::connect(&db.url, 2, Duration::from_secs(10))
        .await
        .expect("store");
    const N: i64 = 20_000;
    for chunk in 0..N / 1000 {
        let batch: Vec<NewMessage> = (0..1000)
            .map(|i| NewMessage {
                client_offset: Some(format!("seed-{}", chunk * 1000 + i)),
                content: format!("seed {}", chunk * 1000 + i + 1),
                name: "seed".to_owned(),
                at: 0,
            })
            .collect();
        store
            .append(&chorus::rooms::Room::default_room(), &batch)
            .await
            .expect("seed");
    }
    let nodes = spawn_cluster(3, &db, REDIS, &unique("r")).await;
    // A client that saw offset 0 only by the unlimited-history rule would get everything; this
    // one says it has seen 1, so it must get 2..=N.
    let mut client = Client::connect(&nodes[2].url, Some(json!({ "serverOffset": 1 })))
        .await
        .expect("connect");
    for expected in 2..=N {
        let (content, offset) = client
            .next_chat_message(T)
            .await
            .unwrap_or_else(|e| panic!("message {expected} of the replay: {e}"));
        assert_eq!(offset, expected, "replay in order, no gap, no duplicate");
        assert_eq!(content, format!("seed {expected}"));
    }
    // Then live messages follow with no seam.
    let sender = Client::connect(&nodes[0].url, None).await.expect("connect");
    sender.send("live", Some("live-1")).await;
    assert_eq!(
        client.next_chat_message(T).await.expect("live"),
        ("live".into(), N + 1)
    );
    assert!(
        nodes[2]
            .metric("chorus_replays_total{source=\"database\"}")
            .await
            >= 1.0
    );
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_the_same_client_offset_through_three_nodes_is_stored_and_broadcast_once() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("g1")).await;
    let mut watcher = Client::connect(&nodes[1].url, None).await.expect("connect");
    let mut senders = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            senders.push(Client::connect(&node.url, None).await.expect("connect"));
        }
    }
    const ROUNDS: usize = 50;
    for round in 0..ROUNDS {
        let (content, key) = (format!("once {round}"), format!("same-{round}"));
        let sends = senders.iter().map(|s| s.send(&content, Some(&key)));
        // Every copy is acked.
        assert_acked(futures_util::future::join_all(sends).await);
    }
    for round in 0..ROUNDS {
        let (content, offset) = watcher.next_chat_message(T).await.expect("broadcast");
        assert_eq!(content, format!("once {round}"));
        assert_eq!(offset, round as i64 + 1);
    }
    assert!(
        watcher
            .next_chat_message(Duration::from_millis(500))
            .await
            .is_err(),
        "no copy was broadcast twice"
    );
    assert_eq!(
        db.count().await,
        ROUNDS as i64,
        "each client offset stored once"
    );
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g3_concurrent_senders_and_reconnecting_receivers_see_one_order() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("g3")).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    run_js(
        "concurrency.test.mjs",
        &urls,
        &[("CHORUS_TRANSPORT", "websocket".into())],
    )
    .await;
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_crosses_the_bus_without_drops() {
    // With the store's gap filling and polling made too slow to help, every message of a burst
    // must reach the other nodes over the bus alone, in order.
    let db = TestDb::new().await;
    let prefix = unique("burst");
    let settings = TestSettings::new(&db)
        .redis(REDIS, &prefix)
        .set("CHORUS__FEED__GAP_TIMEOUT_MS", "120000")
        .set("CHORUS__FEED__POLL_INTERVAL_MS", "120000")
        .set("CHORUS__STORE__BATCH_MAX", "4");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Node::start(settings.build()).await);
    }
    let mut receiver = Client::connect(&nodes[2].url, None).await.expect("connect");
    let mut senders = Vec::new();
    for _ in 0..8 {
        senders.push(Client::connect(&nodes[0].url, None).await.expect("connect"));
    }
    const EACH: usize = 250;
    // Every send goes out at once; small batches make many publishes.
    for (s, sender) in senders.iter().enumerate() {
        for i in 0..EACH {
            let text = format!("b{s}-{i}");
            sender.send_no_ack(&text, Some(&text)).await;
        }
    }
    let total = (senders.len() * EACH) as i64;
    for expected in 1..=total {
        let (_, offset) = receiver
            .next_chat_message(T)
            .await
            .unwrap_or_else(|e| panic!("message {expected} of {total} over the bus: {e}"));
        assert_eq!(offset, expected);
    }
    assert_eq!(nodes[2].metric("chorus_gap_fills_total").await, 0.0);
    assert_eq!(
        nodes[2].metric("chorus_bus_received_total").await,
        total as f64
    );
    stop_all(nodes).await;
}

/// The tutorial's client builds client offsets from `socket.id`, which is undefined while it is
/// disconnected: messages different clients queue offline share offsets such as `undefined-0`.
async fn shared_offsets_with_other_content_are_other_messages(url: &str) {
    let mut watcher = Client::connect(url, None).await.expect("connect");
    let a = Client::connect(url, None).await.expect("connect");
    let b = Client::connect(url, None).await.expect("connect");
    for (client, content) in [(&a, "from a"), (&b, "from b"), (&a, "from a")] {
        client.send(content, Some("undefined-0")).await.assert_ok();
    }
    for (content, offset) in [("from a", 1), ("from b", 2)] {
        let got = watcher.next_chat_message(T).await.expect("broadcast");
        assert_eq!(got, (content.to_owned(), offset), "on {url}");
    }
    assert!(
        watcher
            .next_chat_message(Duration::from_millis(500))
            .await
            .is_err(),
        "the retry of \"from a\" was stored again on {url}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_a_client_offset_names_a_message_together_with_its_content() {
    let db = TestDb::new().await;
    let pg = Node::start(TestSettings::new(&db).build()).await;
    let sqlite = TestSqlite::new();
    let lite = Node::start(TestSettings::new(&sqlite).build()).await;
    shared_offsets_with_other_content_are_other_messages(&pg.url).await;
    shared_offsets_with_other_content_are_other_messages(&lite.url).await;
    assert_eq!(db.count().await, 2);
    stop_all(vec![pg, lite]).await;
}
