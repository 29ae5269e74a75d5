//! Connection state recovery: reconnects served from the recovery log (Redis stream, or in
//! process), from the database when the log does not reach back far enough, and after the
//! stream was lost.

use std::{sync::Arc, time::Duration};

use chorus::{
    metrics::ErrorKind,
    recovery::{RecoveryLog, Retention, StreamLog},
    rooms::Room,
    runtime::Runtime,
    store::Message,
};
use chorus_testkit::{
    Client, Node, PrivateRedis, REDIS, TestDb, TestSettings, TestSqlite, assert_acked, http_get,
    require_redis, stop_all, unique, wait_for,
};
use fred::{
    clients::Client as Redis,
    interfaces::{ClientLike, StreamsInterface},
    types::config::Config,
};
use serde_json::json;

use crate::support::recover;

const T: Duration = Duration::from_secs(10);

/// `settings` with a small ring, so reconnects further back than 16 messages cannot be served
/// from memory.
fn small_ring(settings: TestSettings) -> TestSettings {
    settings.set("CHORUS__FEED__RING_CAPACITY", "16")
}

/// Runs the workspace's `chorus-bench` (built beside chorus by `cargo nextest run --workspace`,
/// as scripts/test does; it runs the chorus next to it) with `args`, prints its output and
/// requires success; its standard output.
async fn run_bench(args: &[&str]) -> String {
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_chorus")).with_file_name("chorus-bench");
    assert!(
        bench.exists(),
        "{} is missing: run the tests with --workspace",
        bench.display()
    );
    let out = tokio::process::Command::new(&bench)
        .args(args)
        .output()
        .await
        .expect("run chorus-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "chorus-bench {args:?} failed");
    stdout
}

/// `bench/results/{stem}-quick.csv`, written by a smoke run.
fn quick_results(stem: &str) -> String {
    let path = chorus_testkit::fixture::repo_root().join(format!("bench/results/{stem}-quick.csv"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A results file's rows after its header, split at commas.
fn rows_of(csv: &str) -> Vec<Vec<&str>> {
    csv.lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect()
}

/// Sends `n` messages `m1..=mn` through `url`, 100 in flight at a time, and waits for the acks.
async fn send(url: &str, n: i64) {
    let sender = Client::connect(url, None).await.expect("connect");
    for chunk in (1..=n).collect::<Vec<_>>().chunks(100) {
        let messages: Vec<_> = chunk
            .iter()
            .map(|i| (format!("m{i}"), format!("k-{i}")))
            .collect();
        let acks = messages
            .iter()
            .map(|(content, key)| sender.send(content, Some(key)));
        assert_acked(futures_util::future::join_all(acks).await);
    }
    sender.close().await;
}

/// A Redis client of the test's own.
async fn redis(url: &str) -> Redis {
    let client = Redis::new(Config::from_url(url).expect("redis url"), None, None, None);
    client.init().await.expect("connect to redis");
    client
}

/// The stream's key for the database at `db`: `{prefix}:log:{epoch}`.
async fn stream_key(db: &TestDb, prefix: &str) -> String {
    let epoch: String = sqlx::query_scalar("select epoch from chorus_meta")
        .fetch_one(&mut db.connect().await)
        .await
        .expect("epoch");
    format!("{prefix}:log:{epoch}")
}

/// Waits until the stream's newest entry is `offset`.
async fn stream_reaches(redis: &Redis, key: &str, offset: i64) {
    let want = format!("{offset}-0");
    wait_for(T, &format!("the stream to reach {offset}"), || async {
        let last: Vec<(String, Vec<(String, String)>)> = redis
            .xrevrange(key, "+", "-", Some(1))
            .await
            .unwrap_or_default();
        last.first().is_some_and(|(id, _)| *id == want)
    })
    .await;
}

/// Two nodes with small rings on a fresh database and prefix; `n` messages sent through the
/// first, and in the stream.
async fn two_nodes_with_stream(n: i64) -> (TestDb, Vec<Node>) {
    require_redis(REDIS).await;
    let db = TestDb::new().await;
    let prefix = unique("rs");
    let mut nodes = Vec::new();
    let settings = small_ring(TestSettings::new(&db).redis(REDIS, &prefix));
    for _ in 0..2 {
        nodes.push(Node::start(settings.build()).await);
    }
    send(&nodes[0].url, n).await;
    stream_reaches(&redis(REDIS).await, &stream_key(&db, &prefix).await, n).await;
    (db, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_within_retention_is_served_from_the_stream_without_a_query() {
    let (_db, nodes) = two_nodes_with_stream(300).await;

    let (queries, from_stream) = (
        nodes[1]
            .metric("chorus_replay_reads_total{source=\"database\"}")
            .await,
        nodes[1]
            .metric("chorus_replays_total{source=\"log\"}")
            .await,
    );
    recover(&nodes[1].url, 10, 300).await;
    assert_eq!(
        nodes[1]
            .metric("chorus_replay_reads_total{source=\"database\"}")
            .await,
        queries,
        "a reconnect within retention made a database query"
    );
    assert_eq!(
        nodes[1]
            .metric("chorus_replays_total{source=\"log\"}")
            .await,
        from_stream + 1.0
    );
    assert!(
        nodes[1]
            .metric("chorus_replayed_messages_total{source=\"log\"}")
            .await
            >= 290.0
    );
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_behind_retention_is_served_from_the_database() {
    require_redis(REDIS).await;
    let db = TestDb::new().await;
    let prefix = unique("rd");
    let settings = small_ring(TestSettings::new(&db).redis(REDIS, &prefix))
        .set("CHORUS__RECOVERY__MAX_LEN", "50");
    let node = Node::start(settings.build()).await;
    send(&node.url, 1000).await;
    let redis = redis(REDIS).await;
    let key = stream_key(&db, &prefix).await;
    stream_reaches(&redis, &key, 1000).await;
    let first: Vec<(String, Vec<(String, String)>)> =
        redis.xrange(&key, "-", "+", Some(1)).await.expect("xrange");
    assert!(
        first
            .first()
            .is_some_and(|(id, _)| id != "1-0" && id != "2-0"),
        "the stream was trimmed: {first:?}"
    );
    let before = node
        .metric("chorus_replays_total{source=\"database\"}")
        .await;
    recover(&node.url, 1, 1000).await;
    assert_eq!(
        node.metric("chorus_replays_total{source=\"database\"}")
            .await,
        before + 1.0,
        "the recovery started from the database"
    );
    assert!(
        node.metric("chorus_replay_reads_total{source=\"database\"}")
            .await
            >= 1.0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stream_sends_reconnects_to_the_database_until_it_covers_them_again() {
    let db = TestDb::new().await;
    let private = PrivateRedis::start().await;
    let url = private.url();
    let prefix = unique("rl");
    let node = Node::start(small_ring(TestSettings::new(&db).redis(&url, &prefix)).build()).await;
    send(&node.url, 100).await;
    let key = stream_key(&db, &prefix).await;
    stream_reaches(&redis(&url).await, &key, 100).await;

    // Redis restarts empty (it keeps nothing on disk): the stream is gone.
    let port = private.kill().await;
    let _private = PrivateRedis::start_on(port).await;
    let redis = redis(&url).await;
    wait_for(T, "the node to be ready again", || async {
        http_get(node.addr, "/readyz").await.0 == 200
    })
    .await;
    send_more(&node.url, 101, 120).await;
    stream_reaches(&redis, &key, 120).await;

    // 51 is not in the new stream (it starts at 101): the database serves it.
    let before = node
        .metric("chorus_replays_total{source=\"database\"}")
        .await;
    recover(&node.url, 50, 120).await;
    assert_eq!(
        node.metric("chorus_replays_total{source=\"database\"}")
            .await,
        before + 1.0
    );
    // 101 on is in the new stream again.
    let before = node.metric("chorus_replays_total{source=\"log\"}").await;
    recover(&node.url, 101, 120).await;
    assert_eq!(
        node.metric("chorus_replays_total{source=\"log\"}").await,
        before + 1.0
    );
    node.stop().await;
}

/// Sends `m{from}..=m{to}` one at a time.
async fn send_more(url: &str, from: i64, to: i64) {
    let sender = Client::connect(url, None).await.expect("connect");
    for i in from..=to {
        sender
            .send(&format!("m{i}"), Some(&format!("k-{i}")))
            .await
            .assert_ok();
    }
    sender.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_serves_reconnects_from_its_in_process_log() {
    let sqlite = TestSqlite::new();
    let node = Node::start(small_ring(TestSettings::new(&sqlite)).build()).await;
    send(&node.url, 300).await;
    let queries = node
        .metric("chorus_replay_reads_total{source=\"database\"}")
        .await;
    recover(&node.url, 10, 300).await;
    assert_eq!(
        node.metric("chorus_replay_reads_total{source=\"database\"}")
            .await,
        queries,
        "a reconnect within retention made a database query"
    );
    assert_eq!(
        node.metric("chorus_replays_total{source=\"log\"}").await,
        1.0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_during_a_stream_recovery_are_merged_by_offset() {
    let (_db, nodes) = two_nodes_with_stream(3000).await;

    // The recovery of 2990 messages runs while 500 more are sent through the other node.
    let live = tokio::spawn({
        let url = nodes[0].url.clone();
        async move { send_more(&url, 3001, 3500).await }
    });
    let mut client = Client::connect(&nodes[1].url, Some(json!({ "serverOffset": 10 })))
        .await
        .expect("connect");
    let mut seen = std::collections::HashSet::new();
    for expected in 11..=3500 {
        let (content, offset) = client
            .next_chat_message(T)
            .await
            .unwrap_or_else(|e| panic!("message {expected}: {e}"));
        assert_eq!(offset, expected, "recovery and live messages in one order");
        assert!(seen.insert(content.clone()), "{content} twice");
    }
    live.await.expect("live sender");
    assert!(
        client
            .next_chat_message(Duration::from_millis(300))
            .await
            .is_err(),
        "nothing after the last message"
    );
    assert_eq!(
        nodes[1]
            .metric("chorus_replays_total{source=\"log\"}")
            .await,
        1.0
    );
    stop_all(nodes).await;
}

/// The benchmark, small: every scenario runs against chorus and the baseline, checks its own
/// sources, and prints figures (`chorus-bench all --quick`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs() {
    require_redis(REDIS).await;
    let stdout = run_bench(&["all", "--quick"]).await;
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let result: serde_json::Value = serde_json::from_str(line).expect("JSON");
    // Figures depend on the machine; that every scenario ran and chorus broke no order does not.
    assert_eq!(
        result
            .pointer("/violations/chorus")
            .and_then(serde_json::Value::as_u64),
        Some(0),
        "chorus lost, duplicated or reordered messages: {result}"
    );
    for path in [
        "/stored_per_s/chorus",
        "/replay_per_s/chorus_stream",
        "/replay_per_s/chorus_database",
        "/bytes_per_idle_connection/chorus",
    ] {
        let value = result.pointer(path).and_then(serde_json::Value::as_f64);
        assert!(value.is_some_and(|v| v > 0.0), "{path}: {result}");
    }
}

/// `chorus-bench connect` with steps: the connection ramp for chorus and the baseline, side by
/// side, at smoke size; every step reached by both, and the results written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_ramp_runs() {
    require_redis(REDIS).await;
    let stdout = run_bench(&["connect", "--quick", "--baseline", "--steps", "100,200"]).await;
    for system in ["chorus", "baseline"] {
        for n in [100, 200] {
            let line = format!("connect: {n:>6} idle websockets");
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with(system) && l.contains(&line)),
                "{system} did not report {n} connections:\n{stdout}"
            );
        }
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(system) && l.contains("idle CPU with 200 connections")),
            "{system}: no idle CPU figure:\n{stdout}"
        );
    }
    assert!(!stdout.contains("stopped:"), "a ramp stopped:\n{stdout}");
    let csv = quick_results("connect");
    assert_eq!(
        csv.lines().count(),
        1 + 4,
        "a header and two steps each:\n{csv}"
    );
}

/// The flaky-clients scenario's smoke run: 50 clients dropping every 3 s or so and coming back
/// over three chorus nodes behind nginx (and the baseline's) for 8 s of publishing; chorus must
/// deliver every message to every client once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flaky_clients_run() {
    require_redis(REDIS).await;
    run_bench(&["flaky", "--quick", "--baseline"]).await;
    let csv = quick_results("flaky");
    let rows = rows_of(&csv);
    assert_eq!(
        rows.len(),
        2,
        "a row each for chorus and the baseline:\n{csv}"
    );
    let chorus = rows
        .iter()
        .find(|r| r[0] == "chorus")
        .expect("a chorus row");
    // system,clients,published,delivered_share,complete,duplicated,reordered,drops,...,replays
    assert_eq!(chorus[1], "50");
    assert!(chorus[2].parse::<u64>().expect("published") >= 70, "{csv}");
    assert_eq!(
        chorus[3], "1.000000",
        "every message reached every client:\n{csv}"
    );
    assert_eq!((chorus[4], chorus[5], chorus[6]), ("50", "0", "0"), "{csv}");
    // A first connection lives up to 3 s in the smoke run: each client drops while the
    // publisher publishes, and misses messages it must replay.
    assert!(
        chorus[7].parse::<u64>().expect("drops") >= 50,
        "clients dropped:\n{csv}"
    );
    assert!(
        chorus[9].parse::<u64>().expect("replays") >= 50,
        "reconnects replayed:\n{csv}"
    );
}

/// Two nodes' logs append overlapping batches to one stream, each in offset order as a feed
/// releases them: however their calls interleave, the stream holds every offset once, in order,
/// and no skipped entry counts as an error. Once trimming removed every entry (the stream's last
/// id stays), appends at or below that id are skipped too and the rest are added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_logs_appending_the_same_offsets_leave_one_contiguous_stream() {
    require_redis(REDIS).await;
    let prefix = unique("ls");
    let retention = Retention {
        max_len: 1_000,
        max_bytes: usize::MAX,
        max_age: Duration::from_secs(600),
    };
    let runtimes = [Runtime::new("a"), Runtime::new("b")];
    let mut logs = Vec::new();
    for runtime in &runtimes {
        let client = redis(REDIS).await;
        logs.push(StreamLog::start(
            client, &prefix, "epoch", retention, runtime,
        ));
    }
    let batch = |offsets: std::ops::RangeInclusive<i64>, node: &str| -> Vec<Arc<Message>> {
        offsets
            .map(|offset| {
                Arc::new(Message {
                    room: Room::default_room(),
                    offset,
                    content: format!("{node}:{offset}"),
                    name: node.to_owned(),
                    at: 0,
                })
            })
            .collect()
    };
    logs[0].append(&batch(1..=5, "a"));
    logs[1].append(&batch(1..=3, "b"));
    logs[0].append(&batch(6..=10, "a"));
    logs[1].append(&batch(4..=8, "b"));
    logs[1].append(&batch(9..=12, "b"));

    let key = format!("{prefix}:log:epoch");
    let admin = redis(REDIS).await;
    stream_reaches(&admin, &key, 12).await;
    let page = logs[0]
        .read_after(&Room::default_room(), 0, 100)
        .await
        .expect("read the stream");
    let offsets: Vec<i64> = page.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1..=12).collect::<Vec<_>>());
    for m in &page {
        let (node, offset) = m.content.split_once(':').expect("node:offset");
        assert!(node == "a" || node == "b", "{}", m.content);
        assert_eq!(
            offset,
            m.offset.to_string(),
            "an entry holds its own message"
        );
    }
    let length: u64 = admin.xlen(&key).await.expect("XLEN");
    assert_eq!(length, 12, "every offset once");

    // Every entry trimmed: the stream is empty but its last id is still 12-0.
    let _: i64 = admin
        .xtrim(&key, ("MAXLEN", "=", 0_i64))
        .await
        .expect("XTRIM");
    logs[0].append(&batch(11..=14, "a"));
    stream_reaches(&admin, &key, 14).await;
    let page = logs[1]
        .read_after(&Room::default_room(), 12, 100)
        .await
        .expect("read the stream");
    let offsets: Vec<i64> = page.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, vec![13, 14]);
    assert!(
        logs[1]
            .read_after(&Room::default_room(), 10, 100)
            .await
            .expect("read")
            .is_empty(),
        "11 and 12 are not in the stream: the reader is sent to the database"
    );
    for runtime in &runtimes {
        assert_eq!(
            runtime.metrics.errors(ErrorKind::RecoveryLog),
            0,
            "skipped entries are not errors"
        );
        runtime.cancel.cancel();
        runtime.tasks.close();
        runtime.tasks.wait().await;
    }
}

/// Large messages fill the stream's byte budget long before its count: it is trimmed to about
/// `recovery.max_bytes`, and what it keeps is still the contiguous newest run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_trimmed_by_bytes() {
    require_redis(REDIS).await;
    let prefix = unique("lb");
    let runtime = Runtime::new("a");
    let content = "x".repeat(2_000);
    let retention = Retention {
        max_len: 1_000_000,
        max_bytes: 400 * 2_064,
        max_age: Duration::from_secs(600),
    };
    let log = StreamLog::start(redis(REDIS).await, &prefix, "epoch", retention, &runtime);
    for start in (1..=2_000).step_by(50) {
        let batch: Vec<Arc<Message>> = (start..start + 50)
            .map(|offset| {
                Arc::new(Message {
                    room: Room::default_room(),
                    offset,
                    content: content.clone(),
                    name: String::new(),
                    at: 0,
                })
            })
            .collect();
        log.append(&batch);
    }
    let key = format!("{prefix}:log:epoch");
    let admin = redis(REDIS).await;
    stream_reaches(&admin, &key, 2_000).await;
    // The budget holds 400 entries and trims in runs of 64, so it keeps 337 to 400; Redis
    // trims whole stream nodes (100 entries), so it may keep a node more. The trim follows the
    // append that reached 2 000.
    wait_for(T, "the stream to be trimmed to its byte budget", || async {
        admin.xlen::<u64, _>(&key).await.is_ok_and(|n| n <= 600)
    })
    .await;
    let length: u64 = admin.xlen(&key).await.expect("XLEN");
    assert!((337..=600).contains(&length), "{length} entries kept");
    let first = 2_000 - i64::try_from(length).expect("length") + 1;
    let page = log
        .read_after(&Room::default_room(), first - 1, 10_000)
        .await
        .expect("read");
    assert_eq!(page.len() as u64, length, "the newest run, contiguous");
    assert_eq!(page.last().map(|m| m.offset), Some(2_000));
    assert_eq!(runtime.metrics.errors(ErrorKind::RecoveryLog), 0);
    runtime.cancel.cancel();
    runtime.tasks.close();
    runtime.tasks.wait().await;
}

/// `chorus-bench cpu --quick`: CPU per delivery for the floor, the trivial broadcaster, chorus
/// and the baseline at the chat load, at smoke size; every system delivered everything and
/// got a figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cpu_figures_run() {
    require_redis(REDIS).await;
    run_bench(&["cpu", "--quick"]).await;
    let csv = quick_results("cpu");
    let rows = rows_of(&csv);
    let systems: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(systems, ["floor", "trivial", "chorus", "baseline"], "{csv}");
    for row in &rows {
        assert_eq!(row[5], "0", "{} lost deliveries: {csv}", row[0]);
        // A smoke run is too short for the figures (CPU time comes in 10 ms ticks); that they
        // are read is what it checks.
        let per: f64 = row[8].parse().expect("µs per delivery");
        assert!(per >= 0.0, "{}: CPU per delivery {per}: {csv}", row[0]);
    }
}
