//! The deployment as processes: nginx and HAProxy with the shipped configuration in front of three
//! nodes; tutorial clients with the default transports through them; nodes drained, killed and
//! restarted while the clients chat. Also `scripts/cluster`, which starts that topology by hand.

use std::{process::Stdio, time::Duration};

use chorus_testkit::{Client, Lb, REDIS, TestDb, free_port, require_redis, try_get, unique};
use serde_json::json;

use crate::topology::{Loaded, lb_settings, setup};

const T: Duration = Duration::from_secs(10);

/// What happens to the nodes while the load runs.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Drain the busiest node and restart it, then kill another one and restart it.
    DrainThenKill,
    /// Drain and restart every node in turn.
    Rolling,
}

/// Index of the node with the most connections, other than `except`.
fn busiest(conns: &[i64], except: Option<usize>) -> usize {
    (0..conns.len())
        .filter(|&i| Some(i) != except)
        .max_by_key(|&i| conns[i])
        .expect("a node")
}

async fn under_load(lb: Lb, plan: Plan) {
    require_redis(REDIS).await;
    let db = TestDb::new().await;
    let setup = setup(lb_settings(&db, REDIS));
    let mut run = Loaded::start(lb, db, &setup).await;
    let mut events = Vec::new();
    match plan {
        Plan::DrainThenKill => {
            let a = busiest(&run.connections().await, None);
            run.progress(100).await;
            run.drain(a).await;
            events.push(format!("drained {}", run.nodes[a].id));
            run.progress(150).await;
            run.nodes[a].restart().await;
            run.progress(100).await;

            let b = busiest(&run.connections().await, Some(a));
            run.kill(b).await;
            events.push(format!("killed {}", run.nodes[b].id));
            run.progress(150).await;
            run.nodes[b].restart().await;
            run.progress(100).await;
        }
        Plan::Rolling => {
            for i in 0..run.nodes.len() {
                run.progress(100).await;
                run.drain(i).await;
                run.nodes[i].restart().await;
                events.push(format!("restarted {}", run.nodes[i].id));
            }
            run.progress(100).await;
        }
    }
    run.finish(&format!("{lb:?} {plan:?} ({})", events.join(", ")))
        .await;
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
            .env("CHORUS__REDIS__PREFIX", unique("chorus_script"))
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
    // Stored.
    sender
        .send("through nginx", Some("script-1"))
        .await
        .assert_ok();
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

/// Every `chorus_*` series the Grafana dashboard queries is one this registry exports.
#[test]
fn the_dashboard_queries_only_exported_series() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/chorus-dashboard.json"
        ))
        .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 10, "{exprs:?}");
    let exported: std::collections::HashSet<String> = chorus::metrics::Metrics::new("n")
        .render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect();
    let mut used = 0;
    for expr in &exprs {
        for (start, _) in expr.match_indices("chorus_") {
            let name: String = expr[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exported.contains(&name),
                "the dashboard queries {name}, which is not exported"
            );
            used += 1;
        }
    }
    assert!(used >= exprs.len());
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}
