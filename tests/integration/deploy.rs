//! The deployment as processes: nginx and HAProxy with the shipped configuration in front of three
//! nodes; tutorial clients with the default transports through them; nodes drained, killed and
//! restarted while the clients chat. Also `scripts/cluster`, which starts that topology by hand.

use std::{process::Stdio, time::Duration};

use chorus::client::Client;
use serde_json::json;

use crate::{
    support::{REDIS, TestDb, require_redis, unique},
    topology::{Balancer, Lb, ProcNode, SteadyLoad, free_port, start_nodes, try_get, wait_stored},
};

const T: Duration = Duration::from_secs(10);

/// Local addresses the clients connect from, so a balancer that routes by source spreads them.
fn sources() -> Vec<String> {
    (2..14).map(|i| format!("127.0.0.{i}")).collect()
}

/// What happens to the nodes while the load runs.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Drain the busiest node and restart it, then kill another one and restart it.
    DrainThenKill,
    /// Drain and restart every node in turn.
    Rolling,
}

async fn stored(db: &TestDb) -> i64 {
    db.count().await
}

/// Waits until `n` more messages are stored: the load is running.
async fn progress(db: &TestDb, n: i64) {
    wait_stored(db, stored(db).await + n).await;
}

async fn connections(nodes: &[ProcNode]) -> Vec<i64> {
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        out.push(node.connections().await);
    }
    out
}

/// Index of the node with the most connections, other than `except`.
fn busiest(conns: &[i64], except: Option<usize>) -> usize {
    (0..conns.len())
        .filter(|&i| Some(i) != except)
        .max_by_key(|&i| conns[i])
        .expect("a node")
}

async fn drain(node: &mut ProcNode) {
    let status = node.drain().await;
    assert!(
        status.success(),
        "{} exited with {status} on SIGTERM",
        node.id
    );
}

async fn under_load(lb: Lb, plan: Plan) {
    require_redis(REDIS).await;
    let db = TestDb::new().await;
    let mut nodes = start_nodes(&db, REDIS).await;
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let balancer = Balancer::start(lb, &ports).await;
    let clients = sources().len() as i64;
    let mut load = SteadyLoad::start(&balancer.url(), &sources());
    load.ready().await;

    let spread = connections(&nodes).await;
    println!("{lb:?} {plan:?}: connections per node at the start {spread:?}");
    assert_eq!(
        spread.iter().sum::<i64>(),
        clients,
        "every client is connected once"
    );
    assert!(
        spread.iter().filter(|&&c| c > 0).count() >= 2,
        "the balancer put every client on one node: {spread:?}"
    );

    // Clients connected to each node when it went down: all of them must come back elsewhere.
    let mut moved = 0;
    let mut events = Vec::new();
    match plan {
        Plan::DrainThenKill => {
            let a = busiest(&spread, None);
            progress(&db, 100).await;
            moved += connections(&nodes).await[a];
            drain(&mut nodes[a]).await;
            events.push(format!("drained {}", nodes[a].id));
            progress(&db, 150).await;
            nodes[a].restart().await;
            progress(&db, 100).await;

            let now = connections(&nodes).await;
            let b = busiest(&now, Some(a));
            moved += now[b];
            nodes[b].kill().await;
            events.push(format!("killed {}", nodes[b].id));
            progress(&db, 150).await;
            nodes[b].restart().await;
            progress(&db, 100).await;
        }
        Plan::Rolling => {
            for i in 0..nodes.len() {
                progress(&db, 100).await;
                moved += connections(&nodes).await[i];
                drain(&mut nodes[i]).await;
                nodes[i].restart().await;
                events.push(format!("restarted {}", nodes[i].id));
            }
            progress(&db, 100).await;
        }
    }
    let result = load.finish().await;

    let (rows, distinct): (i64, i64) =
        sqlx::query_as("select count(*), count(distinct (client_offset, content)) from messages")
            .fetch_one(&mut db.connect().await)
            .await
            .expect("count rows");
    println!(
        "{lb:?} {plan:?}: {} | sent={} acked={} stored={rows} reconnects={} retries={} \
         lost={} duplicated={} out_of_order={} gaps={}",
        events.join(", "),
        result["sent"],
        result["acked"],
        result["reconnects"],
        result["retries"],
        result["lost"],
        result["duplicated"],
        result["outOfOrder"],
        result["gaps"],
    );
    // steady.mjs asserted lost = duplicated = out of order = 0 for every client; the database
    // must agree: one row per client offset, and as many rows as distinct messages seen.
    assert_eq!(
        rows, distinct,
        "a message (client offset and content) was stored twice"
    );
    assert_eq!(
        result["stored"].as_i64().map(|n| n + 1),
        Some(rows),
        "rows in the database against messages the clients saw (plus the baseline)"
    );
    assert_eq!(result["sent"], result["acked"], "every send was acked");
    assert!(
        result["reconnects"].as_i64().unwrap_or(0) >= moved,
        "{moved} clients were on nodes that went down, but only {} reconnects",
        result["reconnects"]
    );
    drop(balancer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_drain_and_kill_under_load() {
    under_load(Lb::Nginx, Plan::DrainThenKill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_drain_and_kill_under_load() {
    under_load(Lb::Haproxy, Plan::DrainThenKill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_rolling_restart_under_load() {
    under_load(Lb::Nginx, Plan::Rolling).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_rolling_restart_under_load() {
    under_load(Lb::Haproxy, Plan::Rolling).await;
}

/// `count` consecutive ports from `base` that are free now.
fn free_run(count: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base > u16::MAX - count {
            continue;
        }
        let all_free =
            (base..base + count).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no {count} consecutive free ports")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_script_serves_chat_through_nginx() {
    require_redis(REDIS).await;
    let db = TestDb::new().await;
    let port = free_port();
    let base = free_run(3);
    let mut script =
        tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster"))
            .args([
                "--lb",
                "nginx",
                "--port",
                &port.to_string(),
                "--base-port",
                &base.to_string(),
            ])
            .env("CHORUS_BIN", env!("CARGO_BIN_EXE_chorus"))
            .env("DATABASE_URL", &db.url)
            .env("REDIS_URL", REDIS)
            .env("CHAT__REDIS__PREFIX", unique("chorus_script"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("run scripts/cluster");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !matches!(try_get(port, "/readyz").await, Some((200, _))) {
        if let Some(status) = script.try_wait().expect("poll scripts/cluster") {
            panic!("scripts/cluster exited with {status} before it served (its output is above)");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "scripts/cluster did not serve through nginx within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in base..base + 3 {
        let (status, _) = try_get(p, "/readyz").await.expect("node answers");
        assert_eq!(status, 200, "node on {p} is ready");
    }

    let url = format!("http://127.0.0.1:{port}");
    let sender = Client::connect(&url, Some(json!({ "serverOffset": 0 })))
        .await
        .expect("connect through nginx");
    let mut receiver = Client::connect(&url, Some(json!({ "serverOffset": 0 })))
        .await
        .expect("connect through nginx");
    let ack = sender
        .emit_with_ack(
            "chat message",
            vec![json!("through nginx"), json!("script-1")],
            T,
        )
        .await
        .expect("ack");
    assert!(
        ack.first().is_none_or(|a| a.get("error").is_none()),
        "stored: {ack:?}"
    );
    let (content, offset) = receiver.next_chat_message(T).await.expect("delivered");
    assert_eq!((content.as_str(), offset), ("through nginx", 1));
    sender.close().await;
    receiver.close().await;

    let pid = script.id().expect("script runs");
    let status = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let status = tokio::time::timeout(Duration::from_secs(30), script.wait())
        .await
        .expect("scripts/cluster stops within 30 s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "scripts/cluster exited with {status}");
    for p in [port, base, base + 1, base + 2] {
        assert!(
            try_get(p, "/healthz").await.is_none(),
            "port {p} still answers after the stop"
        );
    }
}
