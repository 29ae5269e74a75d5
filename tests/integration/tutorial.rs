//! The tutorial's flow with the official JavaScript client, on SQLite and on Postgres.

use chorus_testkit::{
    Node, REDIS, TestDb, TestSettings, TestSqlite, http_get, run_js, spawn_cluster, stop_all,
    unique,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_flow_on_sqlite_single_node() {
    let sqlite = TestSqlite::new();
    let node = Node::start(TestSettings::new(&sqlite).build()).await;
    for transport in ["websocket", "polling"] {
        run_js(
            "tutorial.test.mjs",
            std::slice::from_ref(&node.url),
            &[("CHORUS_TRANSPORT", transport.to_owned())],
        )
        .await;
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_flow_on_postgres_cluster() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("t")).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    for transport in ["websocket", "polling"] {
        run_js(
            "tutorial.test.mjs",
            &urls,
            &[("CHORUS_TRANSPORT", transport.to_owned())],
        )
        .await;
    }
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_bundle_health_and_metrics_are_served() {
    let node = Node::start(TestSettings::new("sqlite::memory:").build()).await;
    let (status, page) = http_get(node.addr, "/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("/socket.io/socket.io.js"),
        "page loads the bundle"
    );
    assert!(
        page.contains("serverOffset"),
        "page has the tutorial client"
    );
    let (status, bundle) = http_get(node.addr, "/socket.io/socket.io.js").await;
    assert_eq!(status, 200);
    assert!(bundle.len() > 10_000, "bundle served");
    assert_eq!(http_get(node.addr, "/healthz").await.0, 200);
    assert_eq!(http_get(node.addr, "/readyz").await.0, 200);
    let (status, metrics) = http_get(node.addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "chorus_connections",
        "chorus_messages_stored_total",
        "chorus_broadcasts_total",
        "chorus_replays_total",
        "chorus_errors_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    node.stop().await;
}
