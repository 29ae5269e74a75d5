//! The harness: real nodes in-process on port 0, a fresh Postgres database and Redis prefix per
//! test, a fault proxy, a private Redis, and a runner for the Node.js client scenarios.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use chorus::config::Settings;
use sqlx::{Connection, PgConnection};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{Notify, oneshot},
    task::JoinHandle,
};

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const REDIS: &str = "redis://127.0.0.1:6379";

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` until it is true, failing with `what` after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh Postgres database for one test.
pub struct TestDb {
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = unique("chorus_t");
        let mut admin = PgConnection::connect(PG_ADMIN).await.unwrap_or_else(|e| {
            panic!("Postgres is not reachable at {PG_ADMIN} ({e}); scripts/test starts it")
        });
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        TestDb {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
        }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to test database")
    }

    /// Rows in `messages`.
    pub async fn count(&self) -> i64 {
        sqlx::query_scalar("select count(*) from messages")
            .fetch_one(&mut self.connect().await)
            .await
            .expect("count messages")
    }
}

/// Fails the test with a clear message when Redis is not there.
pub async fn require_redis(url: &str) {
    let addr = url.trim_start_matches("redis://");
    let mut stream = TcpStream::connect(addr).await.unwrap_or_else(|e| {
        panic!("Redis is not reachable at {url} ({e}); scripts/test starts it")
    });
    stream.write_all(b"PING\r\n").await.expect("write to redis");
}

/// Settings for a test node: loopback, port 0, fast polling, small timeouts.
pub fn settings(database_url: &str, redis: Option<(&str, &str)>) -> Settings {
    settings_with(database_url, redis, &[])
}

/// [`settings`] plus `extra` environment variables (`CHORUS__SECTION__KEY`, ...).
pub fn settings_with(
    database_url: &str,
    redis: Option<(&str, &str)>,
    extra: &[(&str, &str)],
) -> Settings {
    let mut env = vec![
        ("HOST".to_owned(), "127.0.0.1".to_owned()),
        ("PORT".to_owned(), "0".to_owned()),
        ("DATABASE_URL".to_owned(), database_url.to_owned()),
        ("CHORUS__STORE__TIMEOUT_MS".to_owned(), "2000".to_owned()),
        (
            "CHORUS__SHUTDOWN__DRAIN_TIMEOUT_MS".to_owned(),
            "3000".to_owned(),
        ),
    ];
    if let Some((url, prefix)) = redis {
        env.push(("REDIS_URL".to_owned(), url.to_owned()));
        env.push(("CHORUS__REDIS__PREFIX".to_owned(), prefix.to_owned()));
    }
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Settings::load_from(None, env).expect("test settings")
}

/// A node running in this process.
pub struct Node {
    pub url: String,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Node {
    pub async fn start(settings: Settings) -> Node {
        // Node logs go to the test's output, shown when it fails.
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,chorus=info".into());
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
        let app = chorus::app::build(settings).await.expect("node starts");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            // Either a stop or the handle being dropped ends the node.
            let _ = stopped.await;
        }));
        Node {
            url: format!("http://{addr}"),
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful stop, waiting until the node is down.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("node stops within 20 s")
                .expect("node task");
        }
    }

    /// The node's `/metrics` value of `name` (see [`metric`]).
    pub async fn metric(&self, name: &str) -> f64 {
        metric(self.addr.port(), name).await
    }
}

/// The `/metrics` value of `name` from the node on `port`, written without the node label, e.g.
/// `chorus_replays_total{source="database"}` or `chorus_connections`.
pub async fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = try_get(port, "/metrics")
        .await
        .unwrap_or_else(|| panic!("nothing serves /metrics on port {port}"));
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let key = match key.split_once("node=\"") {
            Some((metric, rest)) => {
                let rest = rest.split_once('"').map(|(_, r)| r).unwrap_or("");
                let rest = rest.trim_start_matches(',');
                if rest == "}" {
                    metric.trim_end_matches('{').to_owned()
                } else {
                    format!("{metric}{rest}")
                }
            }
            None => key.to_owned(),
        };
        if key == name {
            return value.parse().expect("numeric metric");
        }
    }
    panic!("metric {name} not found in:\n{body}")
}

/// A minimal HTTP/1.1 GET: (status, body); fails the test when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(addr.port(), path)
        .await
        .unwrap_or_else(|| panic!("GET {path} on {addr} got no answer"))
}

/// `(status, body)` of a GET to `127.0.0.1:{port}`, or `None` when nothing answers.
pub async fn try_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::AsyncReadExt;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

/// Reconnects to `url` having seen `after`, and requires `after+1..=head` in order, each message
/// once; the rest of the recovery, if any, is left unread.
pub async fn recover(url: &str, after: i64, head: i64) {
    let mut client =
        chorus::client::Client::connect(url, Some(serde_json::json!({ "serverOffset": after })))
            .await
            .expect("connect");
    let mut seen = std::collections::HashSet::new();
    for expected in after + 1..=head {
        let (content, offset) = client
            .next_chat_message(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("message {expected} of the recovery: {e}"));
        assert_eq!(offset, expected, "recovered in order, no gap, no duplicate");
        assert!(seen.insert(content.clone()), "{content} twice");
    }
    client.close().await;
}

/// Stops every node gracefully.
pub async fn stop_all(nodes: Vec<Node>) {
    futures_util::future::join_all(nodes.into_iter().map(Node::stop)).await;
}

/// Starts `n` nodes on one database and one Redis prefix.
pub async fn spawn_cluster(n: usize, db: &TestDb, redis_url: &str, prefix: &str) -> Vec<Node> {
    require_redis(redis_url).await;
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        nodes.push(Node::start(settings(&db.url, Some((redis_url, prefix)))).await);
    }
    nodes
}

/// Runs one Node.js scenario against `urls`; panics with its output when it fails.
pub async fn run_js(script: &str, urls: &[String], env: &[(&str, String)]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        dir.join("node_modules/socket.io-client").exists(),
        "tests/js/node_modules is missing: run `npm ci` in tests/js (scripts/test does)"
    );
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("--test")
        .arg("--test-reporter=spec")
        .arg(dir.join(script))
        .env("CHORUS_URLS", urls.join(","))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .expect("node scenario finished within 10 minutes")
        .expect("node is installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- {script} ---\n{stdout}\n{stderr}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
}

/// A TCP proxy that can cut every connection and refuse new ones, then let them through again.
pub struct FaultProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    cut_now: Arc<Notify>,
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let cut_now = Arc::new(Notify::new());
        let upstream = upstream.to_owned();
        let (c, n) = (cut.clone(), cut_now.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let n = n.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = n.notified() => {}
                    }
                });
            }
        });
        FaultProxy { addr, cut, cut_now }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cut_now.notify_waiters();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A Redis server of this test's own, on a free port, keeping nothing on disk.
pub struct PrivateRedis {
    pub port: u16,
    child: tokio::process::Child,
}

impl PrivateRedis {
    pub async fn start_on(port: u16) -> PrivateRedis {
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        let redis = PrivateRedis { port, child };
        let addr = format!("127.0.0.1:{port}");
        wait_for(Duration::from_secs(10), "private redis to listen", || {
            let addr = addr.clone();
            async move { TcpStream::connect(&addr).await.is_ok() }
        })
        .await;
        redis
    }

    pub async fn start() -> PrivateRedis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        Self::start_on(port).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash would.
    pub async fn kill(mut self) -> u16 {
        self.child.kill().await.expect("kill redis");
        self.port
    }
}
