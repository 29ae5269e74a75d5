//! chorus nodes as child processes of the test, so they can be drained with SIGTERM, killed
//! with SIGKILL and restarted on the same port.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{
    fixture::{POLL, free_port, wait_for},
    http::try_get_at,
    metrics::metric_at,
    netns::Host,
    node::TestSettings,
};

/// How long one readiness probe may take.
const PROBE_LIMIT: Duration = Duration::from_secs(5);

/// How long a node has to become ready after it starts.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// How long a node has to exit after SIGTERM (its drain is 3 s, twice, in [`TestSettings`]).
const EXIT_LIMIT: Duration = Duration::from_secs(20);

/// Sends `signal` (a `kill` signal name such as `TERM`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// What every node of a test cluster is started with.
#[derive(Debug, Clone)]
pub struct NodeSetup {
    /// The `chorus` binary: `env!("CARGO_BIN_EXE_chorus")` of the root package's tests.
    pub bin: PathBuf,
    /// The nodes' settings; each node gets its own `PORT` and `NODE_ID` on top.
    pub settings: TestSettings,
}

impl NodeSetup {
    /// Nodes of `bin` with `settings`, plus what a node behind a balancer needs: an unready
    /// pause long enough to see readiness turn false before the port closes, and info logs.
    /// Values `settings` already holds win.
    pub fn new(bin: impl Into<PathBuf>, settings: TestSettings) -> NodeSetup {
        NodeSetup {
            bin: bin.into(),
            settings: settings
                .set_if_unset("CHORUS__SHUTDOWN__UNREADY_DELAY_MS", "1000")
                .set_if_unset("CHORUS__LOG__LEVEL", "warn,chorus=info"),
        }
    }
}

/// A chorus node running as a child process of the test.
pub struct ProcNode {
    pub id: String,
    pub port: u16,
    /// Where it is reached: loopback, or its host's address ([`ProcNode::start_in`]).
    pub addr: SocketAddr,
    /// The network namespace it runs in, if not the test's.
    netns: Option<String>,
    bin: PathBuf,
    settings: TestSettings,
    child: Option<Child>,
    /// Panics the node's runs have printed (a task's panic does not end the process).
    panics: Arc<AtomicUsize>,
}

impl ProcNode {
    /// Starts the node `id` on `port` (not waiting for it to be ready).
    pub fn start(id: &str, port: u16, setup: &NodeSetup) -> ProcNode {
        Self::start_at(id, SocketAddr::from(([127, 0, 0, 1], port)), None, setup)
    }

    /// Starts the node `id` inside the test host `host`, on `port` of its address.
    pub fn start_in(id: &str, host: &Host, port: u16, setup: &NodeSetup) -> ProcNode {
        let addr = SocketAddr::from((host.ip, port));
        Self::start_at(id, addr, Some(host.ns.clone()), setup)
    }

    fn start_at(id: &str, addr: SocketAddr, netns: Option<String>, setup: &NodeSetup) -> ProcNode {
        let port = addr.port();
        let settings = setup
            .settings
            .clone()
            .set("PORT", port.to_string())
            .set("NODE_ID", id);
        let mut node = ProcNode {
            id: id.to_owned(),
            port,
            addr,
            netns,
            bin: setup.bin.clone(),
            settings,
            child: None,
            panics: Arc::default(),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.id);
        // Output goes to the test's own, which the test runner shows when the test fails;
        // stderr passes through a reader that counts panics on the way.
        let mut command = match &self.netns {
            // `ip netns exec` execs the binary, so the child's pid is the node's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = command
            .envs(self.settings.vars())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = child.unwrap_or_else(|e| panic!("start {} ({e})", self.bin.display()));
        if let Some(stderr) = child.stderr.take() {
            let panics = self.panics.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("panicked at") {
                        panics.fetch_add(1, Ordering::Relaxed);
                    }
                    eprintln!("{line}");
                }
            });
        }
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200; fails if the process exits first.
    pub async fn ready(&mut self) {
        let start = tokio::time::Instant::now();
        loop {
            if let Some((200, _)) = try_get_at(self.addr, "/readyz", PROBE_LIMIT).await {
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
                start.elapsed() < READY_LIMIT,
                "{} not ready within {READY_LIMIT:?}",
                self.id
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .unwrap_or_else(|| panic!("{} is not running", self.id))
    }

    /// SIGTERM: readiness must turn false while the node still serves, then it drains and
    /// exits; returns its exit status.
    pub async fn drain(&mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        let addr = self.addr;
        wait_for(
            Duration::from_secs(10),
            "readiness to turn false after SIGTERM, before the port closes",
            || async move {
                matches!(
                    try_get_at(addr, "/readyz", PROBE_LIMIT).await,
                    Some((503, _))
                )
            },
        )
        .await;
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(EXIT_LIMIT, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {EXIT_LIMIT:?} of SIGTERM", self.id))
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

    /// The node's `/metrics` value of `name` (see [`metric_at`]).
    pub async fn metric(&self, name: &str) -> f64 {
        metric_at(self.addr, name).await
    }

    /// `/readyz` now: its status, or `None` when nothing answers within `limit`.
    pub async fn readiness(&self, limit: Duration) -> Option<(u16, String)> {
        try_get_at(self.addr, "/readyz", limit).await
    }

    /// SIGSTOP: the process freezes as a host pausing it would (its sockets stay open).
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// SIGCONT after [`ProcNode::pause`].
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// Whether the process is running (not killed and not exited).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Panics the node printed, over all its runs: a panic in a task leaves the process
    /// running, so only its output tells.
    pub fn panics(&self) -> usize {
        self.panics.load(Ordering::Relaxed)
    }

    /// Did the process exit by itself (it was not drained or killed by the test)?
    pub fn crashed(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
    }
}

/// Starts three nodes (`node1`..`node3`, the shipped balancer configurations name three) and
/// waits until all are ready.
pub async fn start_nodes(setup: &NodeSetup) -> Vec<ProcNode> {
    let mut nodes: Vec<ProcNode> = (1..=3)
        .map(|i| ProcNode::start(&format!("node{i}"), free_port(), setup))
        .collect();
    for node in &mut nodes {
        node.ready().await;
    }
    nodes
}
