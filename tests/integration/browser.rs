//! The page in Debian's Chromium against three nodes behind nginx (`tests/js/browser.test.mjs`):
//! two people on two nodes chat in a room and in private, through a Disconnect and a Connect,
//! with presence and typing; the screenshots are left in `target/test-artifacts/browser`.

use std::time::Duration;

use chorus_testkit::{
    Balancer, Client, Lb, REDIS, TestDb, fixture::repo_root, run_js, spawn_cluster, stop_all,
    unique,
};

/// Where the browser test leaves its screenshots.
fn shots() -> std::path::PathBuf {
    repo_root().join("target/test-artifacts/browser")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_on_two_nodes_chat_in_chromium_behind_nginx() {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's Chromium is missing: scripts/provision installs it (apt-get install chromium)"
    );
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("browser")).await;
    let ports: Vec<u16> = nodes.iter().map(|n| n.addr.port()).collect();
    let balancer = Balancer::start(Lb::Nginx, &ports).await;

    // nginx hashes the client address, so every page from here lands on one node: find it,
    // and send the second person straight to another node.
    let probe = Client::connect(&balancer.url(), None)
        .await
        .expect("connect");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let behind = loop {
        let mut found = None;
        for (i, node) in nodes.iter().enumerate() {
            if node.metric("chorus_connections").await >= 1.0 {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the probe through nginx is on no node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    probe.close().await;
    let other = &nodes[(behind + 1) % nodes.len()];
    println!(
        "Ada through nginx (node {behind}), Bob straight to {}",
        other.url
    );

    let shots = shots();
    run_js(
        "browser.test.mjs",
        &[balancer.url(), other.url.clone()],
        &[("CHORUS_SHOTS", shots.display().to_string())],
    )
    .await;
    for shot in [
        "ada-lobby",
        "bob-unread",
        "bob-private",
        "bob-after-reconnect",
        "bob-phone",
    ] {
        let path = shots.join(format!("{shot}.png"));
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "no screenshot at {}", path.display());
    }
    println!("screenshots in {}", shots.display());
    drop(balancer);
    stop_all(nodes).await;
}
