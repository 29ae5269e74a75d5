//! The nemesis: three nodes, each in a test host of its own (a network namespace), behind
//! nginx, on a private Postgres and Redis reached across the bridge; tutorial clients (the
//! official client, `steady.mjs`) chat in the default room and Rust clients in two named rooms
//! while faults drawn from a seed hit the cluster one after another: partitions from Redis, from
//! Postgres, from the clients and from everything, bad links (delay with jitter, loss,
//! duplication, reordering), a node frozen (SIGSTOP) and one killed, Redis and Postgres
//! restarted. Then the checker: nothing acked lost, nothing stored twice, every client's
//! deliveries gapless and in the one order of each room, every node at the same heads.
//!
//! The run prints its timeline: each fault, each node's readiness, ack and delivery latencies
//! per fault, and the nodes' and Redis's memory. `CHORUS_NEMESIS_SEED` replays a run,
//! `CHORUS_NEMESIS_SECS` sets its length (120 by default; the README's soak is 1800).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use chorus_testkit::{
    Balancer, Client, ClientError, Cut, Lb, Netem, NodeSetup, PrivatePostgres, PrivateRedis,
    ProcNode, SteadyLoad, TestDb, TestNet, TestSettings, free_port, sources, try_get_at, unique,
    wait_for,
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Every node listens on this port of its own host.
const NODE_PORT: u16 = 3000;
/// The named rooms of the Rust clients; each has one sender and two receivers.
const ROOMS: [&str; 2] = ["nemesis-a", "nemesis-b"];
const RECEIVERS_PER_ROOM: usize = 2;
/// A room sender's pace (one send in flight at a time, as the tutorial's client queues them).
const SEND_INTERVAL: Duration = Duration::from_millis(250);
/// How long a Rust client waits for an ack before it reconnects and sends again.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// A receiver that hears nothing (the default room alone carries 40 messages/s) for this long
/// takes its connection for dead and reconnects, as the heartbeat of a real client would.
const SILENCE_LIMIT: Duration = Duration::from_secs(20);
/// The pause before a client's next connection attempt.
const RECONNECT_DELAY: Duration = Duration::from_millis(250);
/// How long every node has to be ready again after a fault is healed.
const RECOVER_LIMIT: Duration = Duration::from_secs(90);
/// How long the clients have to catch up after the load stops.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);
/// A run at least this long is a soak: faults every 30 s, full lengths, memory checked.
const SOAK_SECS: u64 = 600;

fn env_u64(key: &str, default: u64) -> u64 {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{key} must be a number, got {v:?}")),
        Err(_) => default,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// What happened when, from the start of the run.
struct Timeline {
    start: Instant,
    events: Mutex<Vec<(f64, String)>>,
    printed: AtomicBool,
}

/// Prints the timeline when the run fails before it was printed (a check or a wait panicked),
/// so a failure always comes with its seed and what led to it.
struct PrintOnPanic(Arc<Timeline>, u64);

impl Drop for PrintOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.0.printed.load(Ordering::Relaxed) {
            self.0.print(self.1);
        }
    }
}

impl Timeline {
    fn new() -> Arc<Timeline> {
        Arc::new(Timeline {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
            printed: AtomicBool::new(false),
        })
    }

    fn t(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn log(&self, what: impl Into<String>) {
        let t = self.t();
        self.events.lock().expect("timeline").push((t, what.into()));
    }

    fn print(&self, seed: u64) {
        self.printed.store(true, Ordering::Relaxed);
        let events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        println!("--- nemesis timeline (CHORUS_NEMESIS_SEED={seed}) ---");
        for (t, what) in events.iter() {
            println!("{t:8.1}s  {what}");
        }
    }
}

/// One fault; nodes by index.
#[derive(Debug, Clone)]
enum Fault {
    CutRedis(usize),
    CutPostgres(usize),
    CutClients(usize),
    Isolate(usize),
    BadLink(usize, Netem),
    Pause(usize),
    Kill(usize),
    RestartRedis,
    RestartPostgres,
}

impl Fault {
    fn describe(&self) -> String {
        let n = |i: &usize| format!("node{}", i + 1);
        match self {
            Fault::CutRedis(i) => format!("partition {} from Redis", n(i)),
            Fault::CutPostgres(i) => format!("partition {} from Postgres", n(i)),
            Fault::CutClients(i) => format!("partition {} from its clients", n(i)),
            Fault::Isolate(i) => format!("partition {} from everything", n(i)),
            Fault::BadLink(i, e) => format!(
                "bad link on {}: delay {} ms ± {} ms, loss {:.0}%, duplicate {:.0}%, reorder {:.0}%",
                n(i),
                e.delay.as_millis(),
                e.jitter.as_millis(),
                e.loss * 100.0,
                e.duplicate * 100.0,
                e.reorder * 100.0
            ),
            Fault::Pause(i) => format!("SIGSTOP {}", n(i)),
            Fault::Kill(i) => format!("SIGKILL {} and restart", n(i)),
            Fault::RestartRedis => "restart Redis".into(),
            Fault::RestartPostgres => "restart Postgres".into(),
        }
    }
}

/// The faults of one round, each kind once, in an order and on nodes drawn from `rng`.
fn deck(rng: &mut fastrand::Rng) -> Vec<Fault> {
    let nodes: Vec<usize> = (0..6).map(|_| rng.usize(0..3)).collect();
    let delay = rng.u64(100..=500);
    let netem = Netem {
        delay: Duration::from_millis(delay),
        jitter: Duration::from_millis(delay / 4 + rng.u64(0..=delay / 4)),
        loss: rng.u64(5..=30) as f64 / 100.0,
        duplicate: rng.u64(1..=10) as f64 / 100.0,
        reorder: rng.u64(5..=25) as f64 / 100.0,
    };
    let mut faults = vec![
        Fault::CutRedis(nodes[0]),
        Fault::CutPostgres(nodes[1]),
        Fault::CutClients(nodes[2]),
        Fault::Isolate(nodes[3]),
        Fault::Pause(nodes[4]),
        Fault::Kill(nodes[5]),
        Fault::BadLink(rng.usize(0..3), netem),
        Fault::RestartRedis,
        Fault::RestartPostgres,
    ];
    rng.shuffle(&mut faults);
    faults
}

/// The cluster under test; fields drop in order, so the net goes last.
struct Cluster {
    nodes: Vec<ProcNode>,
    balancer: Option<Balancer>,
    redis: Option<PrivateRedis>,
    redis_port: u16,
    pg: PrivatePostgres,
    db: TestDb,
    net: TestNet,
}

impl Cluster {
    /// Three nodes behind nginx.
    async fn start() -> Cluster {
        let mut cluster = Cluster::hosts(3).await;
        let addrs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
        cluster.balancer = Some(Balancer::start_at(Lb::Nginx, &addrs).await);
        cluster
    }

    /// `count` nodes, each in a test host, on a private Postgres and Redis; no balancer.
    async fn hosts(count: usize) -> Cluster {
        let net = TestNet::create(count);
        let gw = IpAddr::V4(net.gateway());
        let pg = PrivatePostgres::start(gw, free_port()).await;
        let db = TestDb::create(&pg.admin_url(), "chorus_nemesis")
            .await
            .expect("create the nemesis database");
        let redis_port = free_port();
        let redis = PrivateRedis::start_at(gw, redis_port).await;
        let settings = TestSettings::new(&db)
            .redis(&redis.url(), &unique("chorus_nemesis"))
            .set("HOST", "0.0.0.0")
            // Production's store timeout: a partitioned query gives up after it.
            .set("CHORUS__STORE__TIMEOUT_MS", "5000")
            .set("CHORUS__TRANSPORT__TRUSTED_PROXIES", format!("{gw}/32"));
        let setup = NodeSetup::new(env!("CARGO_BIN_EXE_chorus"), settings);
        let mut nodes: Vec<ProcNode> = (0..count)
            .map(|i| ProcNode::start_in(&format!("node{}", i + 1), net.host(i), NODE_PORT, &setup))
            .collect();
        for node in &mut nodes {
            node.ready().await;
        }
        Cluster {
            nodes,
            balancer: None,
            redis: Some(redis),
            redis_port,
            pg,
            db,
            net,
        }
    }

    /// The URL of node `i` itself.
    fn node_url(&self, i: usize) -> String {
        format!("http://{}", self.nodes[i].addr)
    }

    /// Waits until node `i`'s `/readyz` answers `status` with a body containing `reason`.
    async fn readiness_is(&self, i: usize, status: u16, reason: &str) {
        let node = &self.nodes[i];
        let what = format!("{} to answer readiness with {status} {reason}", node.id);
        wait_for(Duration::from_secs(20), &what, || async {
            matches!(
                node.readiness(Duration::from_secs(5)).await,
                Some((code, body)) if code == status && body.contains(reason)
            )
        })
        .await;
    }

    /// Injects `fault`, holds it for `hold`, heals it.
    async fn inject(&mut self, fault: &Fault, hold: Duration, seed: u64, timeline: &Timeline) {
        let pg = self.pg.port;
        let redis = self.redis_port;
        match fault {
            Fault::CutRedis(i) => self.partitioned(*i, Cut::Peers(vec![redis]), hold).await,
            Fault::CutPostgres(i) => self.partitioned(*i, Cut::Peers(vec![pg]), hold).await,
            Fault::CutClients(i) => self.partitioned(*i, Cut::Clients(NODE_PORT), hold).await,
            Fault::Isolate(i) => self.partitioned(*i, Cut::All, hold).await,
            Fault::BadLink(i, netem) => {
                self.net.host(*i).netem(*netem, seed);
                tokio::time::sleep(hold).await;
                self.net.host(*i).heal();
            }
            Fault::Pause(i) => {
                self.nodes[*i].pause();
                tokio::time::sleep(hold).await;
                self.nodes[*i].resume();
            }
            Fault::Kill(i) => {
                self.nodes[*i].kill().await;
                tokio::time::sleep(hold).await;
                timeline.log(format!("  restarting node{}", i + 1));
                self.nodes[*i].restart().await;
            }
            Fault::RestartRedis => {
                let redis = self.redis.take().expect("redis runs");
                let port = redis.kill().await;
                tokio::time::sleep(hold).await;
                let gw = IpAddr::V4(self.net.gateway());
                self.redis = Some(PrivateRedis::start_at(gw, port).await);
            }
            Fault::RestartPostgres => {
                self.pg.stop().await;
                tokio::time::sleep(hold).await;
                self.pg.start_again().await;
            }
        }
    }

    async fn partitioned(&self, i: usize, cut: Cut, hold: Duration) {
        self.net.host(i).partition(&cut);
        tokio::time::sleep(hold).await;
        self.net.host(i).heal();
    }

    /// Waits until every node answers `/readyz` with 200; how long it took, or what is not.
    async fn all_ready(&self) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let mut not = Vec::new();
            for node in &self.nodes {
                match node.readiness(Duration::from_secs(2)).await {
                    Some((200, _)) => {}
                    other => not.push(format!("{}: {other:?}", node.id)),
                }
            }
            if not.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > RECOVER_LIMIT {
                return Err(not.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Each node's RSS and open descriptors, and Redis's used memory, now.
    fn resources(&mut self, t: f64) -> Sample {
        let nodes = self
            .nodes
            .iter_mut()
            .map(|n| {
                if !n.running() {
                    return (0, 0);
                }
                let pid = n.pid();
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| d.count() as u64)
                    .unwrap_or(0);
                (rss, fds)
            })
            .collect();
        let info = std::process::Command::new("redis-cli")
            .args([
                "-h",
                &self.net.gateway().to_string(),
                "-p",
                &self.redis_port.to_string(),
            ])
            .args(["info", "memory"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let redis = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Sample { t, nodes, redis }
    }
}

/// What the cluster holds at one moment.
struct Sample {
    /// Seconds into the run.
    t: f64,
    /// Each node's RSS (KiB) and open descriptors; zeros while it is down.
    nodes: Vec<(u64, u64)>,
    /// Redis's `used_memory` (bytes).
    redis: u64,
}

/// Logs each node's readiness whenever it changes.
fn watch_readiness(
    addrs: Vec<SocketAddr>,
    timeline: Arc<Timeline>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: Vec<String> = vec![String::new(); addrs.len()];
        while !stop.load(Ordering::Relaxed) {
            for (i, addr) in addrs.iter().enumerate() {
                // Longer than readiness's own checks (2 s each), so a "no" is heard as one.
                let now = match try_get_at(*addr, "/readyz", Duration::from_secs(5)).await {
                    Some((200, _)) => "ready".to_owned(),
                    Some((code, body)) => format!("{code} {}", body.trim()),
                    None => "unreachable".to_owned(),
                };
                if now != last[i] {
                    timeline.log(format!("  node{} {now}", i + 1));
                    last[i] = now;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// What the Rust clients saw.
#[derive(Default)]
struct Seen {
    /// Per room, `(content, offset)` of every acked send, in send order.
    acked: HashMap<&'static str, Vec<(String, i64)>>,
    /// Per receiver: its room and its deliveries there, in arrival order.
    logs: Vec<(&'static str, Vec<(i64, String)>)>,
    /// `(time in the run, ms)` of each ack and each delivery.
    ack_latency: Vec<(f64, f64)>,
    delivery_latency: Vec<(f64, f64)>,
    violations: Vec<String>,
    reconnects: u64,
    /// Error acks by code (a store that is down answers some sends with an error).
    refused: BTreeMap<String, u64>,
}

/// The Rust clients in the named rooms.
struct RoomLoad {
    seen: Arc<Mutex<Seen>>,
    stop_senders: Arc<AtomicBool>,
    stop_receivers: Arc<AtomicBool>,
    senders: Vec<JoinHandle<()>>,
    receivers: Vec<JoinHandle<()>>,
}

impl RoomLoad {
    fn start(url: &str, tag: &str, timeline: Arc<Timeline>) -> RoomLoad {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop_senders = Arc::new(AtomicBool::new(false));
        let stop_receivers = Arc::new(AtomicBool::new(false));
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        let mut source = 20u8;
        for room in ROOMS {
            for r in 0..RECEIVERS_PER_ROOM {
                let index = {
                    let mut s = seen.lock().expect("seen");
                    s.logs.push((room, Vec::new()));
                    s.logs.len() - 1
                };
                source += 1;
                receivers.push(tokio::spawn(receive(
                    url.to_owned(),
                    IpAddr::from([127, 0, 0, source]),
                    room,
                    format!("{room}-r{r}"),
                    index,
                    seen.clone(),
                    timeline.clone(),
                    stop_receivers.clone(),
                )));
            }
            seen.lock().expect("seen").acked.insert(room, Vec::new());
            source += 1;
            senders.push(tokio::spawn(send(
                url.to_owned(),
                IpAddr::from([127, 0, 0, source]),
                room,
                format!("{tag}-{room}"),
                seen.clone(),
                timeline.clone(),
                stop_senders.clone(),
            )));
        }
        RoomLoad {
            seen,
            stop_senders,
            stop_receivers,
            senders,
            receivers,
        }
    }

    /// Stops the senders (each after its send in flight is acked), waits until every receiver
    /// has every acked message, then stops the receivers.
    async fn finish(self, timeline: &Timeline) -> Seen {
        self.stop_senders.store(true, Ordering::Relaxed);
        let start = Instant::now();
        for sender in self.senders {
            tokio::time::timeout(SETTLE_LIMIT, sender)
                .await
                .unwrap_or_else(|_| panic!("a room sender got no ack within {SETTLE_LIMIT:?}"))
                .expect("a room sender panicked");
        }
        loop {
            let behind: Vec<String> = {
                let s = self.seen.lock().expect("seen");
                s.logs
                    .iter()
                    .filter_map(|(room, log)| {
                        let top = s.acked[room].iter().map(|(_, o)| *o).max().unwrap_or(0);
                        let at = log.last().map(|(o, _)| *o).unwrap_or(0);
                        (at < top).then(|| format!("{room}: at {at} of {top}"))
                    })
                    .collect()
            };
            if behind.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < SETTLE_LIMIT,
                "the room receivers did not catch up within {SETTLE_LIMIT:?}: {behind:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        timeline.log("room clients caught up");
        self.stop_receivers.store(true, Ordering::Relaxed);
        for task in self.receivers {
            task.await.expect("a room receiver panicked");
        }
        Arc::try_unwrap(self.seen)
            .unwrap_or_else(|_| panic!("the room clients ended"))
            .into_inner()
            .expect("seen")
    }
}

async fn connect(url: &str, source: IpAddr, auth: Value) -> Option<Client> {
    match Client::connect_from(url, source, Some(auth)).await {
        Ok(client) => Some(client),
        Err(_) => {
            tokio::time::sleep(RECONNECT_DELAY).await;
            None
        }
    }
}

/// A room's sender: sends `{prefix}-{k}@{ms}` one at a time, each until it is acked,
/// reconnecting when its connection dies or an ack does not come.
async fn send(
    url: String,
    source: IpAddr,
    room: &'static str,
    prefix: String,
    seen: Arc<Mutex<Seen>>,
    timeline: Arc<Timeline>,
    stop: Arc<AtomicBool>,
) {
    let mut client: Option<Client> = None;
    let mut last_acked = 0i64;
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let sent_at = now_ms();
        let offset = format!("{prefix}-{k}");
        let content = format!("{offset}@{sent_at}");
        loop {
            let Some(c) = client.as_mut() else {
                let auth =
                    json!({ "name": format!("{room}-sender"), "rooms": { room: last_acked } });
                client = connect(&url, source, auth).await;
                if client.is_some() {
                    seen.lock().expect("seen").reconnects += 1;
                }
                continue;
            };
            // Deliveries to the sender are not checked; drop them as they come.
            while c.try_next_event().is_some() {}
            match c
                .try_send_to(room, &content, Some(&offset), ACK_TIMEOUT)
                .await
            {
                Ok(ack) if ack.is_ok() => {
                    let at = ack.offset();
                    last_acked = last_acked.max(at);
                    let mut s = seen.lock().expect("seen");
                    s.acked
                        .get_mut(room)
                        .expect("room")
                        .push((content.clone(), at));
                    s.ack_latency
                        .push((timeline.t(), (now_ms() - sent_at) as f64));
                    break;
                }
                Ok(ack) => {
                    let code = ack.error_code().unwrap_or("?").to_owned();
                    *seen.lock().expect("seen").refused.entry(code).or_default() += 1;
                    tokio::time::sleep(RECONNECT_DELAY).await;
                }
                Err(_) => {
                    // No ack in time, or the connection closed: a new one, the same message.
                    client = None;
                }
            }
        }
        k += 1;
        tokio::time::sleep(SEND_INTERVAL).await;
    }
    if let Some(c) = client {
        c.close().await;
    }
}

/// A room's receiver: records every delivery of `room`, checking each is the next offset;
/// reconnects from its last offset whenever its connection dies or falls silent.
#[allow(clippy::too_many_arguments)]
async fn receive(
    url: String,
    source: IpAddr,
    room: &'static str,
    name: String,
    index: usize,
    seen: Arc<Mutex<Seen>>,
    timeline: Arc<Timeline>,
    stop: Arc<AtomicBool>,
) {
    let mut last = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let auth = json!({ "name": name, "rooms": { room: last } });
        let Some(mut client) = connect(&url, source, auth).await else {
            continue;
        };
        seen.lock().expect("seen").reconnects += 1;
        let mut heard = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match client.next_delivery(Duration::from_millis(500)).await {
                Ok(d) => {
                    heard = Instant::now();
                    if d.room.as_deref() != Some(room) {
                        continue;
                    }
                    let mut s = seen.lock().expect("seen");
                    if d.offset != last + 1 {
                        let v = format!(
                            "{name}: offset {} after {last} ({:.1}s)",
                            d.offset,
                            timeline.t()
                        );
                        s.violations.push(v);
                    }
                    last = last.max(d.offset);
                    if let Some(ms) = d
                        .content
                        .rsplit_once('@')
                        .and_then(|(_, t)| t.parse::<i64>().ok())
                    {
                        s.delivery_latency
                            .push((timeline.t(), (now_ms() - ms) as f64));
                    }
                    s.logs[index].1.push((d.offset, d.content));
                }
                Err(ClientError::Timeout) if heard.elapsed() < SILENCE_LIMIT => {}
                Err(_) => break,
            }
        }
        client.close().await;
    }
}

/// p50/p99/max of the samples in `[from, to)`.
fn window(samples: &[(f64, f64)], from: f64, to: f64) -> String {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, ms)| *ms)
        .collect();
    if v.is_empty() {
        return "none".into();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64) as usize).min(v.len() - 1)];
    format!(
        "n={} p50={:.0} p99={:.0} max={:.0} ms",
        v.len(),
        at(0.5),
        at(0.99),
        v[v.len() - 1]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis() {
    let secs = env_u64("CHORUS_NEMESIS_SECS", 120);
    let seed = env_u64("CHORUS_NEMESIS_SEED", 14);
    let soak = secs >= SOAK_SECS;
    let mut rng = fastrand::Rng::with_seed(seed);
    let timeline = Timeline::new();
    let _print_on_panic = PrintOnPanic(timeline.clone(), seed);
    let mut cluster = Cluster::start().await;
    timeline.log(format!(
        "cluster up: nodes at {:?}, Postgres :{}, Redis :{} on {}",
        cluster.nodes.iter().map(|n| n.addr).collect::<Vec<_>>(),
        cluster.pg.port,
        cluster.redis_port,
        cluster.net.gateway()
    ));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = watch_readiness(
        cluster.nodes.iter().map(|n| n.addr).collect(),
        timeline.clone(),
        stop_watch.clone(),
    );

    let url = cluster.balancer.as_ref().expect("the balancer").url();
    let run_limit = ((secs + 900) * 1000).to_string();
    let mut steady = SteadyLoad::start_with(
        &url,
        &sources(),
        &[
            ("CHORUS_SENDS_MAY_FAIL", "1"),
            ("CHORUS_SEND_INTERVAL_MS", "100"),
            ("CHORUS_RUN_LIMIT_MS", &run_limit),
        ],
    );
    steady.ready().await;
    let tag = unique("nem");
    let rooms = RoomLoad::start(&url, &tag, timeline.clone());
    timeline
        .log("load running: 12 tutorial clients in the default room, 6 Rust clients in 2 rooms");

    // Faults one after another, each kind once per round, until the run's time is up.
    let mut windows: Vec<(f64, String)> = Vec::new();
    let mut resources: Vec<Sample> = Vec::new();
    let mut n = 0;
    'run: loop {
        for fault in deck(&mut rng) {
            if timeline.t() > secs as f64 {
                break 'run;
            }
            n += 1;
            let began = Instant::now();
            let hold = match (&fault, soak) {
                (Fault::Pause(_), true) => Duration::from_secs(rng.u64(5..=40)),
                (Fault::Pause(_), false) => Duration::from_secs(rng.u64(5..=10)),
                (Fault::Kill(_) | Fault::RestartRedis | Fault::RestartPostgres, _) => {
                    Duration::from_secs(rng.u64(1..=3))
                }
                (_, true) => Duration::from_secs(rng.u64(5..=20)),
                (_, false) => Duration::from_secs(rng.u64(3..=8)),
            };
            steady.mark(&format!("f{n}")).await;
            windows.push((timeline.t(), format!("f{n}")));
            timeline.log(format!(
                "f{n} {} for {:.0}s",
                fault.describe(),
                hold.as_secs_f64()
            ));
            cluster.inject(&fault, hold, rng.u64(..), &timeline).await;
            timeline.log(format!("f{n} healed"));
            match cluster.all_ready().await {
                Ok(took) => timeline.log(format!(
                    "f{n} every node ready {:.1}s after the heal",
                    took.as_secs_f64()
                )),
                Err(not) => {
                    panic!(
                        "f{n} ({}): nodes not ready {RECOVER_LIMIT:?} after the heal: {not}",
                        fault.describe()
                    );
                }
            }
            let sample = cluster.resources(timeline.t());
            timeline.log(format!(
                "  rss KiB / fds {:?}, Redis used {} KiB",
                sample.nodes,
                sample.redis / 1024
            ));
            resources.push(sample);
            // Soak: one fault every 30 s; short: a breath between faults.
            let gap = if soak {
                Duration::from_secs(30)
            } else {
                Duration::from_secs(2)
            };
            let left = gap
                .saturating_sub(began.elapsed())
                .max(Duration::from_secs(2));
            tokio::time::sleep(left).await;
        }
    }
    steady.mark("after").await;
    windows.push((timeline.t(), "after".into()));
    timeline.log("faults over; stopping the load");

    let seen = rooms.finish(&timeline).await;
    let result = steady.finish().await;
    stop_watch.store(true, Ordering::Relaxed);
    watcher.await.expect("readiness watcher");

    // The timeline, with each fault's latencies.
    windows.push((f64::INFINITY, String::new()));
    for pair in windows.windows(2) {
        let ((from, name), (to, _)) = (&pair[0], &pair[1]);
        timeline.log(format!(
            "latency {name}: rooms ack {} | rooms delivery {} | default room ack {} | delivery {}",
            window(&seen.ack_latency, *from, *to),
            window(&seen.delivery_latency, *from, *to),
            result["ack_latency_ms"][name],
            result["latency_ms"][name],
        ));
    }
    timeline.log(format!(
        "default room: sent={} acked={} failed={} stored={} reconnects={} | rooms: acked={:?} reconnects={} refused={:?}",
        result["sent"],
        result["acked"],
        result["failed"],
        result["stored"],
        result["reconnects"],
        seen.acked.iter().map(|(r, a)| (*r, a.len())).collect::<BTreeMap<_, _>>(),
        seen.reconnects,
        seen.refused,
    ));
    timeline.print(seed);

    check_rooms(&cluster, &seen).await;
    check_default_room(&cluster).await;
    check_converged(&cluster).await;
    if soak {
        check_flat(&resources);
    }
    for node in &mut cluster.nodes {
        assert!(node.running(), "{} exited by itself", node.id);
        assert_eq!(node.panics(), 0, "{} panicked (its output above)", node.id);
    }
}

/// Every receiver's deliveries gapless and in one order per room; every acked message stored
/// once, at its acked offset, and delivered to every receiver of its room.
async fn check_rooms(cluster: &Cluster, seen: &Seen) {
    assert!(
        seen.violations.is_empty(),
        "deliveries out of order or with gaps: {:?}",
        seen.violations
    );
    let mut conn = cluster.db.connect().await;
    for room in ROOMS {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("select id, content from room_messages where room = $1 order by id")
                .bind(room)
                .fetch_all(&mut conn)
                .await
                .expect("read the room");
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let expected: Vec<i64> = (1..=rows.len() as i64).collect();
        assert_eq!(ids, expected, "{room}: the stored offsets are 1..=head");
        let by_offset: HashMap<i64, &str> = rows.iter().map(|(id, c)| (*id, c.as_str())).collect();
        let mut contents: Vec<&str> = rows.iter().map(|(_, c)| c.as_str()).collect();
        contents.sort_unstable();
        let stored = contents.len();
        contents.dedup();
        assert_eq!(contents.len(), stored, "{room}: a message stored twice");
        let acked = &seen.acked[room];
        assert!(!acked.is_empty(), "{room}: nothing was acked");
        for (content, offset) in acked {
            assert_eq!(
                by_offset.get(offset).copied(),
                Some(content.as_str()),
                "{room}: acked {content:?} at {offset}, stored differently"
            );
        }
        assert_eq!(
            acked.len(),
            rows.len(),
            "{room}: every stored message was acked (senders retry until acked)"
        );
        for (log_room, log) in seen.logs.iter().filter(|(r, _)| *r == room) {
            let got: Vec<(i64, &str)> = log.iter().map(|(o, c)| (*o, c.as_str())).collect();
            let want: Vec<(i64, &str)> = rows.iter().map(|(o, c)| (*o, c.as_str())).collect();
            assert_eq!(
                got.len(),
                want.len(),
                "{log_room}: a receiver saw {} of {} messages",
                got.len(),
                want.len()
            );
            assert!(
                got == want,
                "{log_room}: a receiver's deliveries differ from the stored order"
            );
        }
    }
}

/// The default room: offsets 1..=head, each message (client offset and content) once.
/// (steady.mjs checked every tutorial client's log itself.)
async fn check_default_room(cluster: &Cluster) {
    let (rows, distinct, head): (i64, i64, Option<i64>) = sqlx::query_as(
        "select count(*), count(distinct (client_offset, content)), max(id) from room_messages where room = ''",
    )
    .fetch_one(&mut cluster.db.connect().await)
    .await
    .expect("count the default room");
    assert_eq!(rows, distinct, "a default-room message stored twice");
    assert_eq!(Some(rows), head, "the default room's offsets are 1..=head");
}

/// Every node serves each room up to the store's head.
async fn check_converged(cluster: &Cluster) {
    let mut conn = cluster.db.connect().await;
    let heads: Vec<(String, i64)> =
        sqlx::query_as("select name, head from rooms where name = any($1)")
            .bind(vec!["", ROOMS[0], ROOMS[1]])
            .fetch_all(&mut conn)
            .await
            .expect("room heads");
    let heads: HashMap<String, i64> = heads.into_iter().collect();
    let default_head = heads[""];
    for node in &cluster.nodes {
        let url = format!("http://{}", node.addr);
        let rooms: serde_json::Map<String, Value> = ROOMS
            .iter()
            .map(|r| ((*r).to_owned(), json!(heads[*r] - 1)))
            .collect();
        let auth = json!({ "serverOffset": default_head - 1, "rooms": rooms });
        let mut client = Client::connect(&url, Some(auth))
            .await
            .expect("connect to a node");
        let mut want: HashMap<Option<String>, i64> = ROOMS
            .iter()
            .map(|r| (Some((*r).to_owned()), heads[*r]))
            .collect();
        want.insert(None, default_head);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !want.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let d = client
                .next_delivery(left)
                .await
                .unwrap_or_else(|e| panic!("{} does not serve the heads {want:?}: {e}", node.id));
            if want.get(&d.room) == Some(&d.offset) {
                want.remove(&d.room);
            }
        }
        client.close().await;
    }
}

/// The soak's end against its first third: RSS within 25% + 16 MiB, descriptors within 32,
/// Redis memory within 25% + 8 MiB.
fn check_flat(resources: &[Sample]) {
    let end = resources.last().expect("samples");
    let early: Vec<&Sample> = resources.iter().filter(|s| s.t <= end.t / 3.0).collect();
    assert!(!early.is_empty(), "samples from the first third");
    for node in 0..end.nodes.len() {
        let rss0 = early.iter().map(|s| s.nodes[node].0).max().unwrap_or(0);
        let fds0 = early.iter().map(|s| s.nodes[node].1).max().unwrap_or(0);
        let (rss, fds) = end.nodes[node];
        println!(
            "soak node{}: rss {rss0} -> {rss} KiB, fds {fds0} -> {fds}",
            node + 1
        );
        assert!(
            rss as f64 <= rss0 as f64 * 1.25 + 16.0 * 1024.0,
            "node{} RSS grew: {rss0} -> {rss} KiB",
            node + 1
        );
        assert!(
            fds <= fds0 + 32,
            "node{} descriptors grew: {fds0} -> {fds}",
            node + 1
        );
    }
    let redis0 = early.iter().map(|s| s.redis).max().unwrap_or(0);
    println!("soak Redis: used {redis0} -> {} bytes", end.redis);
    assert!(
        end.redis as f64 <= redis0 as f64 * 1.25 + 8.0 * 1_048_576.0,
        "Redis memory grew: {redis0} -> {}",
        end.redis
    );
}

/// Reads `client`'s default-room messages until `content` arrives (within `limit`); its offset.
async fn until_message(client: &mut Client, content: &str, limit: Duration) -> i64 {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (got, offset) = client
            .next_chat_message(left)
            .await
            .unwrap_or_else(|e| panic!("{content:?} did not arrive within {limit:?}: {e}"));
        if got == content {
            return offset;
        }
    }
}

/// Ada on node1 and Bob on node2, each connected to the node itself.
async fn ada_and_bob(cluster: &Cluster) -> (Client, Client) {
    let ada = Client::connect(&cluster.node_url(0), None)
        .await
        .expect("Ada on node1");
    let bob = Client::connect(&cluster.node_url(1), None)
        .await
        .expect("Bob on node2");
    (ada, bob)
}

/// Rows of the default room with this content.
async fn stored(cluster: &Cluster, content: &str) -> i64 {
    sqlx::query_scalar("select count(*) from room_messages where room = '' and content = $1")
        .bind(content)
        .fetch_one(&mut cluster.db.connect().await)
        .await
        .expect("count rows")
}

/// A node cut from Redis but not from Postgres says it is not ready (so a balancer with health
/// checks sends it no one new) and keeps serving the clients it has: their sends are stored and
/// acked, and messages cross between it and the others through the store's poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_redis_serves_its_clients_through_the_store() {
    let cluster = Cluster::hosts(2).await;
    let (mut ada, mut bob) = ada_and_bob(&cluster).await;
    cluster
        .net
        .host(0)
        .partition(&Cut::Peers(vec![cluster.redis_port]));
    cluster.readiness_is(0, 503, "redis unreachable").await;

    let ack = ada
        .try_send(
            "ada while cut from redis",
            Some("ada-1"),
            Duration::from_secs(5),
        )
        .await
        .expect("node1 acks while it reaches Postgres");
    ack.assert_ok();
    // Poll interval 1 s; publishing on node1 fails after the Redis command timeout.
    let at = until_message(&mut bob, "ada while cut from redis", Duration::from_secs(5)).await;
    assert_eq!(
        at,
        ack.offset(),
        "Bob sees Ada's message at its acked offset"
    );
    bob.send("bob to the cut node", Some("bob-1"))
        .await
        .assert_ok();
    until_message(&mut ada, "bob to the cut node", Duration::from_secs(5)).await;

    cluster.net.host(0).heal();
    cluster.readiness_is(0, 200, "ready").await;
    ada.close().await;
    bob.close().await;
}

/// A node cut from Postgres stops acking (an ack follows a commit), says it is not ready, and
/// still delivers what the others commit (the bus needs no store when nothing is missing); the
/// client's retry after the heal is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_postgres_stops_acking_and_still_delivers() {
    let cluster = Cluster::hosts(2).await;
    let (mut ada, mut bob) = ada_and_bob(&cluster).await;
    cluster
        .net
        .host(0)
        .partition(&Cut::Peers(vec![cluster.pg.port]));
    cluster.readiness_is(0, 503, "store unreachable").await;

    // The store's timeout is 5 s: after it the append has failed, and no ack ever comes.
    let unacked = ada
        .try_send(
            "ada while cut from postgres",
            Some("ada-1"),
            Duration::from_secs(8),
        )
        .await;
    assert!(
        matches!(unacked, Err(ClientError::AckTimeout)),
        "node1 answered a send it could not store: {unacked:?}"
    );
    bob.send("bob while ada's node is cut", Some("bob-1"))
        .await
        .assert_ok();
    until_message(
        &mut ada,
        "bob while ada's node is cut",
        Duration::from_secs(5),
    )
    .await;

    cluster.net.host(0).heal();
    cluster.readiness_is(0, 200, "ready").await;
    // The tutorial client's retry: the same message, the same client offset.
    let ack = ada
        .try_send(
            "ada while cut from postgres",
            Some("ada-1"),
            Duration::from_secs(10),
        )
        .await
        .expect("acked after the heal");
    ack.assert_ok();
    until_message(
        &mut bob,
        "ada while cut from postgres",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        stored(&cluster, "ada while cut from postgres").await,
        1,
        "stored once"
    );
    ada.close().await;
    bob.close().await;
}

/// A node frozen (SIGSTOP) right after an ack takes nothing with it: the acked message reaches
/// the others; a send it took but could not answer, sent again elsewhere, is stored once, also
/// after the node resumes and handles the copy it had buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_loses_nothing_it_acked() {
    let cluster = Cluster::hosts(2).await;
    let (ada, mut bob) = ada_and_bob(&cluster).await;
    let acked = ada.send("acked before the pause", Some("ada-1")).await;
    acked.assert_ok();
    cluster.nodes[0].pause();
    let at = until_message(&mut bob, "acked before the pause", Duration::from_secs(5)).await;
    assert_eq!(at, acked.offset());

    let frozen = ada
        .try_send(
            "sent to the frozen node",
            Some("ada-2"),
            Duration::from_secs(2),
        )
        .await;
    assert!(frozen.is_err(), "a frozen node answered: {frozen:?}");
    // Ada's client gives up on the frozen node and sends again through another.
    let ada_again = Client::connect(&cluster.node_url(1), Some(json!({ "serverOffset": at })))
        .await
        .expect("Ada on node2");
    let retry = ada_again
        .send("sent to the frozen node", Some("ada-2"))
        .await;
    retry.assert_ok();
    until_message(&mut bob, "sent to the frozen node", Duration::from_secs(5)).await;

    let folded = "chorus_duplicates_total";
    let before = cluster.nodes[0].readiness(Duration::from_millis(500)).await;
    assert!(
        before.is_none(),
        "the frozen node answered readiness: {before:?}"
    );
    cluster.nodes[0].resume();
    // Resumed, node1 handles the copy it had taken and finds it stored.
    let node1 = &cluster.nodes[0];
    wait_for(
        Duration::from_secs(20),
        "node1 to handle the send it had buffered",
        || async { node1.metric(folded).await >= 1.0 },
    )
    .await;
    assert_eq!(
        stored(&cluster, "sent to the frozen node").await,
        1,
        "stored once"
    );
    assert_eq!(stored(&cluster, "acked before the pause").await, 1);
    drop(ada);
    ada_again.close().await;
    bob.close().await;
}
