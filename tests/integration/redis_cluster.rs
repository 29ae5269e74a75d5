//! chorus on a Redis Cluster of the test's own (three masters, a replica each): the tutorial
//! flow, a reconnect served from the cluster's stream, the concurrency scenario, and every
//! master failing over under load with nothing lost and the bus and the adapter hearing again.

use std::time::{Duration, Instant};

use chorus_testkit::{
    Client, Lb, Node, PrivateRedisCluster, TestDb, TestSettings, assert_acked, run_js, stop_all,
    unique, wait_for,
};
use fred::{
    clients::Client as Redis,
    interfaces::{ClientLike, StreamsInterface},
    types::config::Config,
};
use serde_json::json;

use crate::{
    support::{next_about, recover},
    topology::{Loaded, setup},
};

const T: Duration = Duration::from_secs(10);

/// `n` in-process nodes on `db` and `cluster`, under a fresh prefix; `extra` settings on top.
async fn nodes_on(
    cluster: &PrivateRedisCluster,
    db: &TestDb,
    n: usize,
    extra: &[(&str, &str)],
) -> (String, Vec<Node>) {
    let prefix = unique("rc");
    let mut settings = TestSettings::new(db).redis(&cluster.url(), &prefix);
    for (key, value) in extra {
        settings = settings.set(key, *value);
    }
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        nodes.push(Node::start(settings.build()).await);
    }
    (prefix, nodes)
}

fn urls(nodes: &[Node]) -> Vec<String> {
    nodes.iter().map(|n| n.url.clone()).collect()
}

/// A cluster client of the test's own.
async fn redis(cluster: &PrivateRedisCluster) -> Redis {
    let config = Config::from_url(&cluster.url()).expect("cluster url");
    assert!(config.server.is_clustered(), "the url names a cluster");
    let client = Redis::new(config, None, None, None);
    client.init().await.expect("connect to the cluster");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_flow_on_a_redis_cluster() {
    let cluster = PrivateRedisCluster::start(3).await;
    let db = TestDb::new().await;
    let (_, nodes) = nodes_on(&cluster, &db, 3, &[]).await;
    for transport in ["websocket", "polling"] {
        run_js(
            "tutorial.test.mjs",
            &urls(&nodes),
            &[("CHORUS_TRANSPORT", transport.to_owned())],
        )
        .await;
    }
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g3_on_a_redis_cluster_concurrent_senders_and_reconnecting_receivers_see_one_order() {
    let cluster = PrivateRedisCluster::start(3).await;
    let db = TestDb::new().await;
    let (_, nodes) = nodes_on(&cluster, &db, 3, &[]).await;
    run_js(
        "concurrency.test.mjs",
        &urls(&nodes),
        &[("CHORUS_TRANSPORT", "websocket".into())],
    )
    .await;
    stop_all(nodes).await;
}

/// The default room's stream and a named room's stream hash to slots of their own, each on
/// whichever master serves it; a reconnect to the other node is served from the stream of
/// each, without a database read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_on_a_redis_cluster_is_served_from_the_stream() {
    let cluster = PrivateRedisCluster::start(3).await;
    let db = TestDb::new().await;
    // A small ring, so the reconnects below cannot be served from memory.
    let (prefix, nodes) =
        nodes_on(&cluster, &db, 2, &[("CHORUS__FEED__RING_CAPACITY", "16")]).await;
    let sender = Client::connect(&nodes[0].url, None).await.expect("connect");
    sender.join("shard", None).await.assert_ok();
    const N: i64 = 200;
    for chunk in (1..=N).collect::<Vec<_>>().chunks(50) {
        let texts: Vec<_> = chunk
            .iter()
            .map(|i| {
                (
                    format!("m{i}"),
                    format!("k-{i}"),
                    format!("s{i}"),
                    format!("s-{i}"),
                )
            })
            .collect();
        let default_room = texts.iter().map(|(m, k, _, _)| sender.send(m, Some(k)));
        assert_acked(futures_util::future::join_all(default_room).await);
        let named = texts
            .iter()
            .map(|(_, _, m, k)| sender.send_to(Some("shard"), m, Some(k)));
        assert_acked(futures_util::future::join_all(named).await);
    }

    let epoch: String = sqlx::query_scalar("select epoch from chorus_meta")
        .fetch_one(&mut db.connect().await)
        .await
        .expect("epoch");
    let default_key = format!("{prefix}:log:{epoch}");
    let room_key = format!("{default_key}:room:shard");
    let admin = redis(&cluster).await;
    for key in [&default_key, &room_key] {
        let want = format!("{N}-0");
        wait_for(T, &format!("{key} to reach {N}"), || async {
            let last: Vec<(String, Vec<(String, String)>)> = admin
                .xrevrange(key.as_str(), "+", "-", Some(1))
                .await
                .unwrap_or_default();
            last.first().is_some_and(|(id, _)| *id == want)
        })
        .await;
    }
    println!(
        "default room's stream on the master at {}, the room's at {}",
        cluster.master_of(&default_key).await,
        cluster.master_of(&room_key).await
    );

    let reads = nodes[1]
        .metric("chorus_replay_reads_total{source=\"database\"}")
        .await;
    recover(&nodes[1].url, 10, N).await;
    let mut late = Client::connect(&nodes[1].url, None).await.expect("connect");
    late.join("shard", Some(10)).await.assert_ok();
    let mut expected = 11;
    while expected <= N {
        let delivery = late.next_delivery(T).await.expect("the room's recovery");
        // The default room's history may come first or between; only the room's order counts.
        if delivery.room.is_none() {
            continue;
        }
        assert_eq!(
            (delivery.room.as_deref(), delivery.offset),
            (Some("shard"), expected),
            "the room's recovery in order, no gap, no duplicate"
        );
        expected += 1;
    }
    assert_eq!(
        nodes[1]
            .metric("chorus_replay_reads_total{source=\"database\"}")
            .await,
        reads,
        "a reconnect within retention read the database"
    );
    stop_all(nodes).await;
}

/// Three process nodes behind nginx on the cluster with the steady load running; each master
/// in turn hands over to its replica (`CLUSTER FAILOVER`). Nothing acked is lost, duplicated or
/// reordered (`Loaded::finish`), and afterwards the bus carries messages to every node again
/// and the adapter answers requests between nodes: Redis ends a failed-over shard's sharded
/// subscriptions, and the nodes must subscribe again on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_master_failing_over_under_load_loses_nothing() {
    let cluster = PrivateRedisCluster::start(3).await;
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db).redis(&cluster.url(), &unique("rc_lb"));
    let run = Loaded::start(Lb::Nginx, db, &setup(settings)).await;
    run.progress(100).await;
    for port in cluster.masters().await {
        let began = Instant::now();
        let promoted = cluster.fail_over(port).await;
        println!(
            "the master at {port} handed over to {promoted} in {:?}",
            began.elapsed()
        );
        run.progress(100).await;
    }

    // The bus: a message sent now reaches each node through Redis, not only by polling.
    let before: Vec<f64> = futures_util::future::join_all(
        run.nodes
            .iter()
            .map(|node| node.metric("chorus_bus_received_total")),
    )
    .await;
    run.progress(50).await;
    for (node, before) in run.nodes.iter().zip(before) {
        wait_for(
            T,
            &format!("{} to receive from the bus after the failovers", node.id),
            || async move { node.metric("chorus_bus_received_total").await > before },
        )
        .await;
    }

    // The adapter: `who` asks every node, and a join on one node reaches the others.
    let urls: Vec<String> = run
        .nodes
        .iter()
        .map(|n| format!("http://127.0.0.1:{}", n.port))
        .collect();
    let room = "after-failover";
    let mut people = Vec::new();
    for (url, name) in urls.iter().zip(["Ada", "Bob", "Cy"]) {
        let client = Client::connect(url, Some(json!({ "name": name })))
            .await
            .expect("connect");
        client.join(room, None).await.assert_ok();
        people.push(client);
    }
    // Asked until it answers in full: a node may still be renewing a subscription.
    for (i, client) in people.iter().enumerate() {
        wait_for(
            T,
            &format!("who from node {i} to list everyone"),
            || async {
                let ack = client.who(Some(room)).await;
                ack.is_ok() && ack.field("people") == Some(&json!(["Ada", "Bob", "Cy"]))
            },
        )
        .await;
    }
    let dee = Client::connect(&urls[1], Some(json!({ "name": "Dee" })))
        .await
        .expect("connect");
    dee.join(room, None).await.assert_ok();
    // Each sees the others' `joined` first (on its own node or through the adapter), then Dee's.
    let dee_joined = ("joined".to_owned(), vec![json!(room), json!("Dee")]);
    for client in &mut people {
        while next_about(client, Some(room)).await != dee_joined {}
    }
    dee.close().await;
    for client in people {
        client.close().await;
    }
    run.finish("every master failed over").await;
}
