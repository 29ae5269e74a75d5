//! Faults: the database unreachable (G2), Redis restarted under a running cluster.

use std::time::Duration;

use chorus::client::{Client, ClientError};
use serde_json::json;

use crate::support::{
    FaultProxy, Node, PrivateRedis, TestDb, http_get, settings, stop_all, unique, wait_for,
};

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_no_ack_while_the_database_is_unreachable_then_one_row_and_one_ack() {
    let db = TestDb::new().await;
    let proxy = FaultProxy::start("127.0.0.1:5432").await;
    let via_proxy = db.url.replace("127.0.0.1:5432", &proxy.addr.to_string());
    let node = Node::start(settings(&via_proxy, None)).await;
    let mut client = Client::connect(&node.url, None).await.expect("connect");

    proxy.cut();
    let send = || {
        client.emit_with_ack(
            "chat message",
            vec![json!("during outage"), json!("g2-1")],
            Duration::from_secs(3),
        )
    };
    match send().await {
        Err(ClientError::AckTimeout) => {}
        other => panic!("expected no ack while the database is down, got {other:?}"),
    }
    wait_for(T, "readiness to report the store down", || async {
        http_get(node.addr, "/readyz").await.0 == 503
    })
    .await;

    proxy.restore();
    // The tutorial client retries the same send until it is acked; so do we.
    let mut acked = None;
    for _ in 0..10 {
        if let Ok(ack) = send().await {
            acked = Some(ack);
            break;
        }
    }
    let ack = acked.expect("acked once the database is back");
    assert!(
        ack.first().is_none_or(|a| a.get("error").is_none()),
        "{ack:?}"
    );
    assert_eq!(db.count().await, 1, "exactly one row");
    let (content, offset) = client.next_chat_message(T).await.expect("broadcast");
    assert_eq!((content.as_str(), offset), ("during outage", 1));
    assert!(
        client
            .next_chat_message(Duration::from_millis(500))
            .await
            .is_err(),
        "broadcast once"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_between_nodes_resumes_after_redis_restarts() {
    let db = TestDb::new().await;
    let redis = PrivateRedis::start().await;
    let redis_url = redis.url();
    let prefix = unique("rr");
    // Polling the store would hide a dead subscription; make it too slow to matter here.
    let slow_poll = |mut s: chorus::config::Settings| {
        s.feed.poll_interval_ms = 120_000;
        s
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Node::start(slow_poll(settings(&db.url, Some((&redis_url, &prefix))))).await);
    }
    let sender = Client::connect(&nodes[0].url, None).await.expect("connect");
    let mut receiver = Client::connect(&nodes[2].url, None).await.expect("connect");
    sender
        .emit_with_ack("chat message", vec![json!("before"), json!("rr-0")], T)
        .await
        .expect("acked");
    assert_eq!(
        receiver.next_chat_message(T).await.expect("before"),
        ("before".into(), 1)
    );

    let port = redis.kill().await;
    wait_for(T, "readiness to report redis down", || async {
        http_get(nodes[0].addr, "/readyz").await.0 == 503
    })
    .await;
    // Stored while Redis is down: acked (the store is fine), delivered later.
    sender
        .emit_with_ack("chat message", vec![json!("during"), json!("rr-1")], T)
        .await
        .expect("acked while redis is down");
    let _redis = PrivateRedis::start_on(port).await;
    for node in &nodes {
        wait_for(
            Duration::from_secs(20),
            "readiness after redis returns",
            || async { http_get(node.addr, "/readyz").await.0 == 200 },
        )
        .await;
    }
    let received_before = nodes[2].metric("chorus_bus_received_total").await;
    // Re-subscription happens right after the reconnect; a message published before it lands
    // would be missed by the bus (and filled from the store), so keep sending until the bus
    // carries one.
    let mut i = 2;
    wait_for(
        Duration::from_secs(20),
        "the bus to carry messages again",
        || {
            i += 1;
            let sender = &sender;
            let nodes = &nodes;
            async move {
                sender
                    .emit_with_ack(
                        "chat message",
                        vec![json!(format!("after {i}")), json!(format!("rr-{i}"))],
                        T,
                    )
                    .await
                    .expect("acked");
                nodes[2].metric("chorus_bus_received_total").await > received_before
            }
        },
    )
    .await;
    // Everything arrives once, in order, including what was stored during the outage.
    let (content, offset) = receiver.next_chat_message(T).await.expect("during");
    assert_eq!((content.as_str(), offset), ("during", 2));
    let mut expected = 3;
    while let Ok((_, offset)) = receiver.next_chat_message(Duration::from_secs(1)).await {
        assert_eq!(offset, expected, "in order, no gap, no duplicate");
        expected += 1;
    }
    assert_eq!(
        expected,
        i64::from(i) + 1,
        "every message after the restart arrived"
    );
    stop_all(nodes).await;
}
