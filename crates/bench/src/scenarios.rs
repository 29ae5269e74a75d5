//! The load scenarios: fanout (and its ramp), connect, store, replay. Each returns figures; the
//! caller prints them side by side.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, ensure};
use futures_util::future::join_all;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Barrier;

use crate::{
    conn::{Conn, Frame, parse},
    hist::Histogram,
    servers::{self, Server},
};

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Fanout parameters.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Fanout {
    /// Connections, spread over the servers.
    pub connections: usize,
    /// How many of them send.
    pub senders: usize,
    /// Messages per second per sender.
    pub rate: f64,
    /// How long senders send.
    pub seconds: f64,
    /// Rooms the connections are spread over (connection `i` in room `i % rooms`, each sender
    /// writing to its own); 0: everyone in the default room.
    pub rooms: usize,
}

impl Fanout {
    /// Whether connection `i` gets what sender `s` sends.
    fn hears(&self, i: usize, s: usize) -> bool {
        self.rooms == 0 || i % self.rooms == s % self.rooms
    }
}

/// What a fanout run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub params: Fanout,
    pub sent: u64,
    pub acked: u64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub latency_ms: Percentiles,
    pub ack_ms: Percentiles,
    pub lost: u64,
    pub duplicated: u64,
    /// Deliveries whose offset was not above the previous one the receiver got (total order).
    pub out_of_order: u64,
    /// Deliveries of a sender's message before an earlier one of the same sender (send order).
    pub reordered: u64,
    /// CPU seconds the generator used per second of the run (1.0 = one core busy).
    pub generator_cpu: f64,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.quantile(0.50)),
            p95: ms(h.quantile(0.95)),
            p99: ms(h.quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// What one connection saw.
#[derive(Default)]
struct ConnStats {
    latency: Histogram,
    acks: Histogram,
    sent: u64,
    acked: u64,
    deliveries: u64,
    /// Per sender: the distinct sequence numbers received, as a bitset.
    seen: Vec<Vec<u64>>,
    /// Per sender: the highest sequence number received so far.
    highest: Vec<Option<u64>>,
    duplicated: u64,
    out_of_order: u64,
    reordered: u64,
    last_offset: Option<i64>,
    last_delivery: Option<Instant>,
}

impl ConnStats {
    fn deliver(&mut self, content: &str, offset: i64, run: &str, senders: usize) {
        // `{run}|{sender}|{seq}|{sent at, µs since the epoch}`
        let mut parts = content.split('|');
        if parts.next() != Some(run) {
            return; // history from an earlier run
        }
        let (Some(sender), Some(seq), Some(at)) = (
            parts.next().and_then(|v| v.parse::<usize>().ok()),
            parts.next().and_then(|v| v.parse::<u64>().ok()),
            parts.next().and_then(|v| v.parse::<u64>().ok()),
        ) else {
            return;
        };
        if sender >= senders {
            return;
        }
        self.deliveries += 1;
        self.last_delivery = Some(Instant::now());
        if self.last_offset.is_some_and(|last| offset <= last) {
            self.out_of_order += 1;
        }
        self.last_offset = Some(offset);
        self.latency.record(now_micros().saturating_sub(at));
        if self.seen.len() < senders {
            self.seen.resize(senders, Vec::new());
            self.highest.resize(senders, None);
        }
        let bits = &mut self.seen[sender];
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return;
        }
        bits[word] |= 1 << bit;
        match self.highest[sender] {
            Some(h) if seq < h => self.reordered += 1,
            _ => self.highest[sender] = Some(seq),
        }
    }

    fn distinct_from(&self, sender: usize) -> u64 {
        self.seen.get(sender).map_or(0, |bits| {
            bits.iter().map(|w| u64::from(w.count_ones())).sum()
        })
    }
}

/// Shared state of one fanout run.
struct Run {
    id: String,
    senders: usize,
    /// Messages each sender has sent.
    sent: Vec<AtomicU64>,
    sending_done: AtomicBool,
    started: Barrier,
}

/// One connection's task: connect, wait for the start, send at `rate` if it is a sender, read
/// everything, until sending is done and it has every message (or the drain time is over).
async fn connection(
    url: String,
    index: usize,
    sender: Option<usize>,
    params: Fanout,
    run: Arc<Run>,
    drain: Duration,
) -> anyhow::Result<ConnStats> {
    let mut conn = Conn::connect(&url, None).await?;
    let room = (params.rooms > 0).then(|| format!("{}-room-{}", run.id, index % params.rooms));
    if let Some(room) = &room {
        conn.join(room).await?;
    }
    let mut stats = ConnStats::default();
    let mut pending: std::collections::HashMap<u64, Instant> = std::collections::HashMap::new();
    run.started.wait().await;
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / params.rate.max(0.001));
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + period.mul_f64(rand_fraction(sender)),
        period,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let send_until = start + Duration::from_secs_f64(params.seconds);
    let mut seq = 0u64;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if run.sending_done.load(Relaxed) {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + drain);
            let complete = (0..run.senders)
                .filter(|s| params.hears(index, *s))
                .all(|s| stats.distinct_from(s) >= run.sent[s].load(Relaxed));
            if (complete && pending.is_empty()) || Instant::now() >= deadline {
                break;
            }
        }
        let sending = sender.is_some() && Instant::now() < send_until;
        tokio::select! {
            _ = tick.tick(), if sending => {
                let s = sender.unwrap_or(0);
                let content = format!("{}|{s}|{seq}|{}", run.id, now_micros());
                let offset = format!("{}-{s}-{seq}", run.id);
                let id = match &room {
                    Some(room) => conn.emit_to(room, &content, &offset).await?,
                    None => conn.emit(&content, &offset).await?,
                };
                pending.insert(id, Instant::now());
                seq += 1;
                stats.sent += 1;
                run.sent[s].store(seq, Relaxed);
            }
            frame = conn.next() => {
                let Some(frame) = frame? else { break };
                match parse(&frame) {
                    Frame::ChatMessage { content, offset } => stats.deliver(&content, offset, &run.id, run.senders),
                    Frame::Ack { id, error } => {
                        if let Some(at) = pending.remove(&id) {
                            stats.acks.record(at.elapsed().as_micros() as u64);
                            if !error { stats.acked += 1; }
                        }
                    }
                    Frame::Ping(_) | Frame::Other => {}
                }
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    conn.close().await;
    Ok(stats)
}

/// A fixed spread of first send times over one period, by sender index.
fn rand_fraction(sender: Option<usize>) -> f64 {
    let i = sender.unwrap_or(0) as f64;
    (i * 0.618_033_988_75).fract()
}

/// Runs a fanout against `urls` (connections round-robin over them).
pub async fn fanout(urls: &[String], params: Fanout) -> anyhow::Result<FanoutResult> {
    ensure!(
        params.senders <= params.connections,
        "more senders than connections"
    );
    let run = Arc::new(Run {
        id: format!("r{}", now_micros()),
        senders: params.senders,
        sent: (0..params.senders).map(|_| AtomicU64::new(0)).collect(),
        sending_done: AtomicBool::new(false),
        started: Barrier::new(params.connections + 1),
    });
    let drain = Duration::from_secs(5);
    let mut tasks = Vec::with_capacity(params.connections);
    for i in 0..params.connections {
        let url = urls[i % urls.len()].clone();
        let sender = (i < params.senders).then_some(i);
        tasks.push(tokio::spawn(connection(
            url,
            i,
            sender,
            params,
            run.clone(),
            drain,
        )));
        if i % 100 == 99 {
            // Do not open thousands of sockets in one instant.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    run.started.wait().await;
    let cpu_before = servers::cpu_seconds(std::process::id())?;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(params.seconds)).await;
    run.sending_done.store(true, Relaxed);
    let mut total = ConnStats::default();
    let (mut lost, mut last) = (0u64, start);
    let sent: Vec<u64> = run.sent.iter().map(|s| s.load(Relaxed)).collect();
    for (i, stats) in join_all(tasks).await.into_iter().enumerate() {
        let stats = stats.context("connection task")??;
        for (s, n) in sent.iter().enumerate().filter(|(s, _)| params.hears(i, *s)) {
            lost += n.saturating_sub(stats.distinct_from(s));
        }
        total.latency.merge(&stats.latency);
        total.acks.merge(&stats.acks);
        total.sent += stats.sent;
        total.acked += stats.acked;
        total.deliveries += stats.deliveries;
        total.duplicated += stats.duplicated;
        total.out_of_order += stats.out_of_order;
        total.reordered += stats.reordered;
        if let Some(t) = stats.last_delivery {
            last = last.max(t);
        }
    }
    let elapsed = last.duration_since(start).as_secs_f64().max(params.seconds);
    let cpu = servers::cpu_seconds(std::process::id())? - cpu_before;
    Ok(FanoutResult {
        params,
        sent: total.sent,
        acked: total.acked,
        deliveries: total.deliveries,
        deliveries_per_s: total.deliveries as f64 / elapsed,
        latency_ms: Percentiles::of(&total.latency),
        ack_ms: Percentiles::of(&total.acks),
        lost,
        duplicated: total.duplicated,
        out_of_order: total.out_of_order,
        reordered: total.reordered,
        generator_cpu: cpu / elapsed,
    })
}

/// Server memory per idle websocket connection: RSS of a fresh server before and after `n`
/// connections, divided by `n`.
pub async fn connect(server: &Server, n: usize) -> anyhow::Result<(u64, u64, f64)> {
    let pid = server.pid().context("server pid")?;
    // One connection first, so one-time allocations are not counted per connection.
    let warm = Conn::connect(&server.url, None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = servers::rss_bytes(pid)?;
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(Conn::connect(&server.url, None).await?);
    }
    // Let the server settle (buffers allocated on first use, tasks parked).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = servers::rss_bytes(pid)?;
    let per = after.saturating_sub(before) as f64 / n as f64;
    for c in conns {
        c.close().await;
    }
    warm.close().await;
    Ok((before, after, per))
}

/// One step of the connection ramp: the server with `connections` idle websockets.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectStep {
    pub connections: usize,
    /// The server's RSS with them open.
    pub rss_bytes: u64,
    /// RSS above the one-connection start, per connection.
    pub bytes_per_connection: f64,
    /// Connections opened (handshake and namespace join) per second in this step.
    pub accepted_per_s: f64,
}

/// What the ramp measured, and where it stopped if it could not go on.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectRamp {
    pub steps: Vec<ConnectStep>,
    /// The server's CPU (user + system) while every connection it reached sat idle, as a share
    /// of one core.
    pub idle_cpu_percent: f64,
    pub idle_seconds: f64,
    /// Why the ramp stopped before its last step, if it did.
    pub stopped: Option<String>,
}

/// Connections being opened at once.
const CONNECT_CONCURRENCY: usize = 256;

/// Idle websockets to a fresh server, opened up to each of `steps` in turn from the local
/// addresses `sources` in turn (one address pair has about 28 000 ephemeral ports), each held
/// by a task of its own that answers the server's pings; at each step the server's RSS, and at
/// the end its CPU over `idle` while they sit there (heartbeats only).
pub async fn connect_ramp(
    server: &Server,
    steps: &[usize],
    sources: &[std::net::IpAddr],
    idle: Duration,
) -> anyhow::Result<ConnectRamp> {
    let pid = server.pid().context("server pid")?;
    ensure!(!sources.is_empty(), "no source addresses");
    let warm = Conn::connect(&server.url, None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = servers::rss_bytes(pid)?;
    let permits = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    let mut holders = tokio::task::JoinSet::new();
    let mut figures = Vec::new();
    let mut stopped = None;
    let mut open = 0usize;
    'ramp: for &target in steps {
        let started = Instant::now();
        let from = open;
        for i in open..target {
            let url = server.url.clone();
            let source = sources[i % sources.len()];
            let permits = permits.clone();
            let opened = opened_tx.clone();
            holders.spawn(async move {
                let Ok(permit) = permits.acquire_owned().await else {
                    return;
                };
                let mut conn = match Conn::connect_from(&url, source).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        let _ = opened.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                drop(permit);
                let _ = opened.send(Ok(()));
                // Held until the end, answering pings; the end aborts this task.
                while let Ok(Some(_)) = conn.next().await {}
            });
        }
        while open < target {
            match opened_rx.recv().await {
                Some(Ok(())) => open += 1,
                Some(Err(e)) => {
                    stopped = Some(format!("connection {} failed: {e}", open + 1));
                    break 'ramp;
                }
                None => break 'ramp,
            }
        }
        let accepted_per_s = (open - from) as f64 / started.elapsed().as_secs_f64();
        // Let the server settle (buffers allocated on first use, tasks parked).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = servers::rss_bytes(pid)?;
        figures.push(ConnectStep {
            connections: open,
            rss_bytes: rss,
            bytes_per_connection: rss.saturating_sub(before) as f64 / open.max(1) as f64,
            accepted_per_s,
        });
    }
    // Idle: the Socket.IO heartbeat is all that runs (every 25 s per connection).
    let cpu = servers::cpu_seconds(pid)?;
    let idle_started = Instant::now();
    tokio::time::sleep(idle).await;
    let idle_seconds = idle_started.elapsed().as_secs_f64();
    let idle_cpu_percent = (servers::cpu_seconds(pid)? - cpu) / idle_seconds * 100.0;
    holders.abort_all();
    while holders.join_next().await.is_some() {}
    warm.close().await;
    Ok(ConnectRamp {
        steps: figures,
        idle_cpu_percent,
        idle_seconds,
        stopped,
    })
}

/// Acked stored messages per second: `senders` connections, `window` sends in flight each,
/// distinct client offsets, for `seconds`; with `rooms` above 0, sender `i` writes to room
/// `i % rooms` (`room message`), else to the default room (`chat message`).
pub async fn store(
    urls: &[String],
    senders: usize,
    window: usize,
    seconds: f64,
    rooms: usize,
) -> anyhow::Result<f64> {
    let run = format!("s{}", now_micros());
    let started = Arc::new(Barrier::new(senders + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..senders {
        let (url, run, started, stop) = (
            urls[i % urls.len()].clone(),
            run.clone(),
            started.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(&url, None).await?;
            let room = (rooms > 0).then(|| format!("{run}-room-{}", i % rooms));
            if let Some(room) = &room {
                conn.join(room).await?;
            }
            started.wait().await;
            let (mut in_flight, mut acked, mut seq) = (0usize, 0u64, 0u64);
            loop {
                while in_flight < window && !stop.load(Relaxed) {
                    let (content, offset) =
                        (format!("{run}|{i}|{seq}|0"), format!("{run}-{i}-{seq}"));
                    match &room {
                        Some(room) => conn.emit_to(room, &content, &offset).await?,
                        None => conn.emit(&content, &offset).await?,
                    };
                    seq += 1;
                    in_flight += 1;
                }
                if in_flight == 0 {
                    break;
                }
                // A server drops an ack it cannot queue (the client would retry); the bench
                // does not retry, so it says so instead of waiting forever.
                let frame = tokio::time::timeout(Duration::from_secs(15), conn.next())
                    .await
                    .context("no frame for 15 s with sends in flight: acks were dropped")??;
                let Some(frame) = frame else {
                    break;
                };
                if let Frame::Ack { error, .. } = parse(&frame) {
                    in_flight -= 1;
                    if !error {
                        acked += 1;
                    }
                }
            }
            conn.close().await;
            anyhow::Ok(acked)
        }));
    }
    started.wait().await;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Relaxed);
    let mut acked = 0;
    for t in join_all(tasks).await {
        acked += t.context("store task")??;
    }
    Ok(acked as f64 / start.elapsed().as_secs_f64())
}

/// Rows/s of plain inserts into a fresh table with an id, client offset and content (a primary
/// key; with `identity`, also chorus's unique index on client offset and content hash): one
/// connection, `batch` rows per autocommitted statement.
pub async fn raw_inserts(
    url: &str,
    batch: usize,
    seconds: f64,
    identity: bool,
) -> anyhow::Result<f64> {
    use sqlx::{Connection, PgConnection};
    let mut conn = PgConnection::connect(url).await?;
    sqlx::raw_sql(
        "create table raw_messages (id bigserial primary key, client_offset text, content text)",
    )
    .execute(&mut conn)
    .await?;
    if identity {
        // chorus's identity index (migrations/postgres/0002), which its appends check.
        sqlx::raw_sql("create unique index on raw_messages (client_offset, md5(content))")
            .execute(&mut conn)
            .await?;
    }
    let run = now_micros();
    let (mut rows, mut seq) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        let offsets: Vec<String> = (seq..seq + batch as u64)
            .map(|i| format!("{run}-{i}"))
            .collect();
        let contents: Vec<String> = (seq..seq + batch as u64)
            .map(|i| format!("{run}|0|{i}|0"))
            .collect();
        rows += sqlx::query(
            "insert into raw_messages (client_offset, content) select * from unnest($1::text[], $2::text[])",
        )
        .bind(offsets)
        .bind(contents)
        .execute(&mut conn)
        .await?
        .rows_affected();
        seq += batch as u64;
    }
    let rate = rows as f64 / start.elapsed().as_secs_f64();
    conn.close().await?;
    Ok(rate)
}

/// One client that saw `after` reconnects and receives through `last`; messages per second.
pub async fn recover(url: &str, after: i64, last: i64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut conn = Conn::connect(url, Some(&json!({ "serverOffset": after }))).await?;
    let mut expected = after + 1;
    while expected <= last {
        let frame = tokio::time::timeout(Duration::from_secs(30), conn.next())
            .await
            .context("recovery stalled")??
            .context("closed during the recovery")?;
        if let Frame::ChatMessage { offset, .. } = parse(&frame) {
            ensure!(
                offset == expected,
                "got offset {offset}, expected {expected}"
            );
            expected += 1;
        }
    }
    let rate = (last - after) as f64 / started.elapsed().as_secs_f64();
    conn.close().await;
    Ok(rate)
}

/// Sends `n` messages through `url` (128 in flight) and returns the offsets they got, from a
/// watcher connected before that reads while the messages are sent.
pub async fn seed(url: &str, n: u64) -> anyhow::Result<(i64, i64)> {
    let run = format!("seed{}", now_micros());
    let mut watcher = Conn::connect(url, None).await?;
    let watch = tokio::spawn({
        let run = run.clone();
        async move {
            let (mut first, mut last, mut got) = (None, 0, 0);
            while got < n {
                let frame = tokio::time::timeout(Duration::from_secs(60), watcher.next())
                    .await
                    .context("seed messages did not arrive")??
                    .context("watcher closed")?;
                if let Frame::ChatMessage { content, offset } = parse(&frame)
                    && content.starts_with(&run)
                {
                    first.get_or_insert(offset);
                    last = offset;
                    got += 1;
                }
            }
            watcher.close().await;
            anyhow::Ok((first.context("nothing seeded")?, last))
        }
    });
    let mut conn = Conn::connect(url, None).await?;
    let (mut sent, mut acked, mut in_flight) = (0u64, 0u64, 0usize);
    while acked < n {
        while in_flight < 128 && sent < n {
            conn.emit(
                &format!("{run}|0|{sent}|0 {}", "x".repeat(40)),
                &format!("{run}-{sent}"),
            )
            .await?;
            sent += 1;
            in_flight += 1;
        }
        let frame = conn.next().await?.context("closed while seeding")?;
        if let Frame::Ack { error, .. } = parse(&frame) {
            ensure!(!error, "a seed message was rejected");
            in_flight -= 1;
            acked += 1;
        }
    }
    conn.close().await;
    watch.await.context("watcher task")?
}

/// What one flooding client did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FloodStats {
    /// Sends it made.
    pub sent: u64,
    /// Sends acked as stored.
    pub stored: u64,
    /// Sends refused as rate limited.
    pub rate_limited: u64,
    /// Times it was disconnected and connected again.
    pub reconnects: u64,
}

/// The flooder's local address: loopback, but not the other clients' 127.0.0.1.
const FLOODER_ADDRESS: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// One abusive client on `url` for `seconds`: sends as fast as its socket takes them, reads and
/// counts the acks in between, and connects again whenever it is cut off.
pub async fn flood(url: &str, seconds: f64) -> anyhow::Result<FloodStats> {
    /// Sends written before the acks queued so far are read.
    const SENDS_PER_ROUND: usize = 32;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut stats = FloodStats {
        sent: 0,
        stored: 0,
        rate_limited: 0,
        reconnects: 0,
    };
    'connections: while Instant::now() < deadline {
        // From an address of its own, as an abusive client is: the well-behaved clients' share
        // of their address is theirs.
        let mut conn = Conn::connect_from(url, FLOODER_ADDRESS).await?;
        while Instant::now() < deadline {
            for _ in 0..SENDS_PER_ROUND {
                let offset = format!("flood-{}", stats.sent);
                if conn.emit("flood", &offset).await.is_err() {
                    stats.reconnects += 1;
                    continue 'connections;
                }
                stats.sent += 1;
            }
            // What has arrived so far, without waiting for more.
            while let Ok(frame) = tokio::time::timeout(Duration::ZERO, conn.next()).await {
                match frame {
                    Ok(Some(frame)) => match parse(&frame) {
                        Frame::Ack { error: false, .. } => stats.stored += 1,
                        Frame::Ack { error: true, .. } => stats.rate_limited += 1,
                        _ => {}
                    },
                    Ok(None) | Err(_) => {
                        stats.reconnects += 1;
                        continue 'connections;
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        conn.close().await;
    }
    Ok(stats)
}
