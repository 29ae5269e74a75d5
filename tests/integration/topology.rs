//! The deployment topology as processes: chorus nodes as child processes (so they can be drained
//! with SIGTERM or killed with SIGKILL), nginx or HAProxy in front with the files in `deploy/`,
//! and a steady Node.js load through the balancer that the test stops when it is done.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::mpsc,
    task::JoinHandle,
};

use crate::support::{TestDb, metric, try_get, unique, wait_for};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A port that was free a moment ago (the node or balancer binds it right after).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.local_addr().expect("local addr").port()
}

/// Sends `signal` (a `kill` signal name) to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A chorus node running as a child process of the test.
pub struct ProcNode {
    pub id: String,
    pub port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl ProcNode {
    /// Starts the test build's `chorus` binary on `port` (not waiting for it to be ready).
    pub fn start(id: &str, port: u16, setup: &NodeSetup) -> ProcNode {
        let mut env: Vec<(String, String)> = [
            ("HOST", "127.0.0.1".to_owned()),
            ("PORT", port.to_string()),
            ("NODE_ID", id.to_owned()),
            ("DATABASE_URL", setup.database_url.clone()),
            ("REDIS_URL", setup.redis_url.clone()),
            ("CHORUS__REDIS__PREFIX", setup.prefix.clone()),
            ("CHORUS__STORE__TIMEOUT_MS", "2000".to_owned()),
            ("CHORUS__SHUTDOWN__DRAIN_TIMEOUT_MS", "3000".to_owned()),
            // Long enough to see readiness turn false before the port closes.
            ("CHORUS__SHUTDOWN__UNREADY_DELAY_MS", "1000".to_owned()),
            ("CHORUS__LOG__LEVEL", "warn,chorus=info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(setup.env.iter().cloned());
        let mut node = ProcNode {
            id: id.to_owned(),
            port,
            env,
            child: None,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.id);
        // Output goes to the test's own, which the test runner shows when the test fails.
        let child = Command::new(env!("CARGO_BIN_EXE_chorus"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the chorus binary");
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200; fails if the process exits first.
    pub async fn ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = try_get(self.port, "/readyz").await {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{} exited with {status} before it was ready", self.id);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} not ready within 30 s",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .unwrap_or_else(|| panic!("{} is not running", self.id))
    }

    /// SIGTERM: readiness must turn false while the node still serves, then it drains and
    /// exits; returns its exit status.
    pub async fn drain(&mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        let port = self.port;
        wait_for(
            Duration::from_secs(10),
            "readiness to turn false after SIGTERM, before the port closes",
            || async move { matches!(try_get(port, "/readyz").await, Some((503, _))) },
        )
        .await;
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within 20 s of SIGTERM", self.id))
            .expect("wait for the node")
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().await.expect("kill the node");
    }

    /// Starts the node again, with the same settings and port, and waits until it is ready.
    pub async fn restart(&mut self) {
        self.spawn();
        self.ready().await;
    }

    /// The node's `chorus_connections` gauge.
    pub async fn connections(&self) -> i64 {
        self.metric("chorus_connections").await as i64
    }

    /// The node's `/metrics` value of `name` (see [`metric`]).
    pub async fn metric(&self, name: &str) -> f64 {
        metric(self.port, name).await
    }

    /// Is the process still running (not exited or crashed)?
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// What every node of a test cluster is started with.
#[derive(Debug, Clone)]
pub struct NodeSetup {
    pub database_url: String,
    pub redis_url: String,
    pub prefix: String,
    /// More settings, `CHORUS__SECTION__KEY` style.
    pub env: Vec<(String, String)>,
}

impl NodeSetup {
    /// The test's database and Redis at `redis_url`, a fresh prefix, no extra settings.
    pub fn new(db: &TestDb, redis_url: &str) -> NodeSetup {
        NodeSetup {
            database_url: db.url.clone(),
            redis_url: redis_url.to_owned(),
            prefix: unique("chorus_lb"),
            env: Vec::new(),
        }
    }
}

/// Starts three nodes and waits until all are ready.
pub async fn start_nodes(setup: &NodeSetup) -> Vec<ProcNode> {
    let mut nodes: Vec<ProcNode> = (1..=3)
        .map(|i| ProcNode::start(&format!("node{i}"), free_port(), setup))
        .collect();
    for node in &mut nodes {
        node.ready().await;
    }
    nodes
}

/// Which load balancer.
#[derive(Debug, Clone, Copy)]
pub enum Lb {
    /// nginx with `deploy/nginx/chorus.conf` and `chorus-nodes.conf`.
    Nginx,
    /// HAProxy with `deploy/haproxy/haproxy.cfg`.
    Haproxy,
}

/// A load balancer process in front of the nodes.
pub struct Balancer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Balancer {
    /// Starts `kind` with the shipped configuration, pointed at `node_ports`.
    pub async fn start(kind: Lb, node_ports: &[u16]) -> Balancer {
        assert_eq!(node_ports.len(), 3, "the shipped configs name three nodes");
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("chorus_lb"));
        std::fs::create_dir_all(&dir).expect("balancer dir");
        let deploy = Path::new(ROOT).join("deploy");
        let mut cmd = match kind {
            Lb::Nginx => {
                // The shipped files with only the listening address and node addresses put in.
                let site = std::fs::read_to_string(deploy.join("nginx/chorus.conf"))
                    .expect("deploy/nginx/chorus.conf");
                assert!(
                    site.contains("\n    listen 80;\n"),
                    "chorus.conf listens on 80"
                );
                let site = site.replace(
                    "\n    listen 80;\n",
                    &format!("\n    listen 127.0.0.1:{port};\n"),
                );
                let mut nodes = std::fs::read_to_string(deploy.join("nginx/chorus-nodes.conf"))
                    .expect("deploy/nginx/chorus-nodes.conf");
                for (i, p) in node_ports.iter().enumerate() {
                    let name = format!("chorus{}:3000", i + 1);
                    assert!(nodes.contains(&name), "chorus-nodes.conf names {name}");
                    nodes = nodes.replace(&name, &format!("127.0.0.1:{p}"));
                }
                let main = format!(
                    "worker_processes 1;\npid {dir}/nginx.pid;\n\
                     events {{ worker_connections 4096; }}\n\
                     http {{\n    access_log off;\n    include chorus.conf;\n}}\n",
                    dir = dir.display()
                );
                std::fs::write(dir.join("chorus.conf"), site).expect("write chorus.conf");
                std::fs::write(dir.join("chorus-nodes.conf"), nodes).expect("write nodes");
                std::fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
                let mut cmd = Command::new("nginx");
                cmd.arg("-p")
                    .arg(format!("{}/", dir.display()))
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .args(["-e", "stderr", "-g", "daemon off;"]);
                cmd
            }
            Lb::Haproxy => {
                let mut cmd = Command::new("haproxy");
                cmd.arg("-db")
                    .arg("-f")
                    .arg(deploy.join("haproxy/haproxy.cfg"))
                    .env("CHORUS_LISTEN", format!("127.0.0.1:{port}"));
                for (i, p) in node_ports.iter().enumerate() {
                    cmd.env(format!("CHORUS_NODE{}", i + 1), format!("127.0.0.1:{p}"));
                }
                cmd
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{kind:?} could not start ({e}); scripts/test installs it"));
        let balancer = Balancer { port, child, dir };
        wait_for(
            Duration::from_secs(20),
            "the balancer to serve /readyz",
            || async { matches!(try_get(port, "/readyz").await, Some((200, _))) },
        )
        .await;
        balancer
    }

    /// The balancer's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // TERM, not KILL: the nginx master then stops its workers, and exits once they are gone,
        // so nothing outlives the test holding its output open.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
            for _ in 0..250 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `tests/js/steady.mjs` running against one URL; see that file for the protocol.
pub struct SteadyLoad {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl SteadyLoad {
    /// Starts the load with clients spread over `sources` (local addresses).
    pub fn start(url: &str, sources: &[String]) -> SteadyLoad {
        let dir = Path::new(ROOT).join("tests/js");
        assert!(
            dir.join("node_modules/socket.io-client").exists(),
            "tests/js/node_modules is missing: run `npm ci` in tests/js (scripts/test does)"
        );
        let mut child = Command::new("node")
            .arg(dir.join("steady.mjs"))
            .env("CHORUS_URLS", url)
            .env("CHORUS_SOURCES", sources.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::unbounded_channel();
        let mut readers = Vec::new();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, tx) in [
            (
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                Some(tx),
            ),
            (Box::new(stderr), None),
        ] {
            let output = output.clone();
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    output.lock().expect("output lock").push(line.clone());
                    if let Some(tx) = &tx {
                        let _ = tx.send(line);
                    }
                }
            }));
        }
        SteadyLoad {
            stdin: child.stdin.take(),
            child,
            lines,
            output,
            readers,
        }
    }

    fn dump(&self) -> String {
        self.output.lock().expect("output lock").join("\n")
    }

    /// Starts a new measurement phase named `name` (delivery latencies are reported by phase).
    pub async fn mark(&mut self, name: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            stdin
                .write_all(format!("mark {name}\n").as_bytes())
                .await
                .expect("write to steady.mjs");
        }
    }

    /// Waits for the `READY` line: every client connected, upgraded and synchronized.
    pub async fn ready(&mut self) {
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if line.starts_with("READY ") {
                    return true;
                }
            }
            false
        };
        let ok = tokio::time::timeout(Duration::from_secs(60), wait).await;
        assert!(
            matches!(ok, Ok(true)),
            "steady.mjs did not get ready:\n{}",
            self.dump()
        );
    }

    /// Stops the senders, waits for the scenario's own checks, and returns its `RESULT`.
    pub async fn finish(mut self) -> Value {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\n").await;
        }
        let status = tokio::time::timeout(Duration::from_secs(180), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("steady.mjs did not finish:\n{}", self.dump()))
            .expect("wait for node");
        // The readers end at the end of the output.
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
        }
        let out = self.dump();
        println!("--- steady.mjs ---\n{out}");
        assert!(status.success(), "steady.mjs failed:\n{out}");
        let result = out
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .expect("a RESULT line");
        serde_json::from_str(result).expect("RESULT is JSON")
    }
}

/// Waits until the database holds at least `rows` messages.
pub async fn wait_stored(db: &TestDb, rows: i64) {
    let mut conn = db.connect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar("select count(*) from messages")
            .fetch_one(&mut conn)
            .await
            .expect("count messages");
        if n >= rows {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {n} of {rows} messages stored after 60 s: the load stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Local addresses the clients connect from, so a balancer that routes by source spreads them.
pub fn sources() -> Vec<String> {
    (2..14).map(|i| format!("127.0.0.{i}")).collect()
}

/// Three nodes behind a balancer with the steady load running through it.
pub struct Loaded {
    pub db: TestDb,
    pub nodes: Vec<ProcNode>,
    /// Kept for the test's length; stopped on drop.
    _balancer: Balancer,
    pub load: Option<SteadyLoad>,
    /// Clients connected to nodes that went down (each must reconnect at least once).
    pub moved: i64,
}

impl Loaded {
    /// Starts the nodes, the balancer and the load, and checks the clients spread over nodes.
    pub async fn start(lb: Lb, db: TestDb, setup: &NodeSetup) -> Loaded {
        let nodes = start_nodes(setup).await;
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let balancer = Balancer::start(lb, &ports).await;
        let mut load = SteadyLoad::start(&balancer.url(), &sources());
        load.ready().await;
        let loaded = Loaded {
            db,
            nodes,
            _balancer: balancer,
            load: Some(load),
            moved: 0,
        };
        let spread = loaded.connections().await;
        println!("{lb:?}: connections per node at the start {spread:?}");
        assert_eq!(
            spread.iter().sum::<i64>(),
            sources().len() as i64,
            "every client is connected once"
        );
        assert!(
            spread.iter().filter(|&&c| c > 0).count() >= 2,
            "the balancer put every client on one node: {spread:?}"
        );
        loaded
    }

    /// Each node's open connections.
    pub async fn connections(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            out.push(node.connections().await);
        }
        out
    }

    /// Sum of a metric over the nodes.
    pub async fn metric_sum(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for node in &self.nodes {
            sum += node.metric(name).await;
        }
        sum
    }

    /// Waits until `n` more messages are stored: the load is running.
    pub async fn progress(&self, n: i64) {
        wait_stored(&self.db, self.db.count().await + n).await;
    }

    /// Drains node `i` (SIGTERM), requiring a clean exit; counts its clients as moved.
    pub async fn drain(&mut self, i: usize) {
        self.moved += self.nodes[i].connections().await;
        let status = self.nodes[i].drain().await;
        assert!(
            status.success(),
            "{} exited with {status} on SIGTERM",
            self.nodes[i].id
        );
    }

    /// Kills node `i` (SIGKILL); counts its clients as moved.
    pub async fn kill(&mut self, i: usize) {
        self.moved += self.nodes[i].connections().await;
        self.nodes[i].kill().await;
    }

    /// Starts a latency phase in the load's report.
    pub async fn mark(&mut self, name: &str) {
        self.load.as_mut().expect("the load runs").mark(name).await;
    }

    /// Stops the load and checks what it and the database say: every send acked, every
    /// message stored once and seen by every client once, in order; prints the counts.
    pub async fn finish(mut self, label: &str) -> Value {
        let result = self.load.take().expect("the load runs").finish().await;
        let (rows, distinct): (i64, i64) = sqlx::query_as(
            "select count(*), count(distinct (client_offset, content)) from messages",
        )
        .fetch_one(&mut self.db.connect().await)
        .await
        .expect("count rows");
        println!(
            "{label}: sent={} acked={} stored={rows} clients={} each_saw={} \
             reconnects={} retries={} lost={} duplicated={} out_of_order={} gaps={} latency={}",
            result["sent"],
            result["acked"],
            result["clients"],
            result["stored"],
            result["reconnects"],
            result["retries"],
            result["lost"],
            result["duplicated"],
            result["outOfOrder"],
            result["gaps"],
            result["latency_ms"],
        );
        // steady.mjs asserted lost = duplicated = out of order = 0 for every client; the
        // database must agree: each message once, as many rows as distinct messages seen.
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
        for key in ["lost", "duplicated", "outOfOrder", "gaps"] {
            assert_eq!(result[key].as_i64(), Some(0), "{key}");
        }
        assert!(
            result["reconnects"].as_i64().unwrap_or(0) >= self.moved,
            "{} clients were on nodes that went down, but only {} reconnects",
            self.moved,
            result["reconnects"]
        );
        for node in &mut self.nodes {
            if node.child.is_some() {
                assert!(node.running(), "{} crashed", node.id);
            }
        }
        result
    }
}

/// A websocket client that joins the chat on `port` and then never reads: a slow consumer.
/// Its receive buffer and segment size are made small, so the kernel buffers on both sides
/// (which Linux sizes from the segment size) fill within seconds, not minutes.
pub async fn slow_consumer(port: u16) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use futures_util::SinkExt;
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.set_tcp_mss(536).expect("TCP_MAXSEG");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    socket.connect(&addr.into()).expect("connect");
    socket.set_nonblocking(true).expect("nonblocking");
    let stream =
        tokio::net::TcpStream::from_std(std::net::TcpStream::from(socket)).expect("tokio stream");
    let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("websocket handshake");
    // Socket.IO CONNECT to the main namespace; the server answers and starts sending.
    ws.send(tokio_tungstenite::tungstenite::Message::text("40"))
        .await
        .expect("send CONNECT");
    ws
}
