//! The flaky-clients scenario, what phones on trains do: tutorial clients behind the balancer
//! that lose their connection every 15 s or so (a reset, no close) and come back 1 to 2 s
//! later from another address with the tutorial's `auth.serverOffset`, while one publisher
//! sends at a chat's pace. Every client must end with every message once, in order; the
//! figure of interest is how long a reconnect takes to catch up.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::future::join_all;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Barrier;

use crate::{
    conn::{Conn, Frame, parse},
    hist::Histogram,
    scenarios::Percentiles,
    servers,
};

/// Source addresses the clients connect from (127.0.1.1 and up): the balancer hashes on the
/// client's address, and each reconnect picks one at random, so it may land on another node.
const SOURCES: u8 = 64;
/// How long after the publisher stops a client may take to hold everything (on a saturated
/// machine a reconnect's SYN can be dropped several times, and each retransmit waits longer).
const DRAIN: Duration = Duration::from_secs(90);
/// The pause before another attempt when a connect fails.
const RETRY: Duration = Duration::from_secs(1);
/// How long a client keeps trying its first connect (a server may be slow to take thousands).
const FIRST_CONNECT: Duration = Duration::from_secs(120);

/// The scenario's shape.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Flaky {
    /// Clients, each dropping and coming back throughout.
    pub clients: usize,
    /// How long the publisher publishes.
    pub seconds: f64,
    /// The publisher's messages per second.
    pub rate: f64,
    /// A connection's mean lifetime before it drops (each lives 2/3 to 4/3 of it).
    pub lifetime: Duration,
    /// The shortest and longest time a client stays away.
    pub away: (Duration, Duration),
}

impl Flaky {
    /// The published shape: drops about every 15 s, away 1 to 2 s, 10 messages/s for 60 s.
    pub fn standard(clients: usize, seconds: f64) -> Flaky {
        Flaky {
            clients,
            seconds,
            rate: 10.0,
            lifetime: Duration::from_secs(15),
            away: (Duration::from_secs(1), Duration::from_secs(2)),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FlakyResult {
    pub params: Flaky,
    /// Messages the publisher had acked and received back.
    pub published: u64,
    /// Of every (client, published message) pair, the share the client received.
    pub delivered_share: f64,
    /// Clients that ended with every message.
    pub complete: usize,
    /// Messages a client received a second time.
    pub duplicated: u64,
    /// Messages that arrived below an offset the client already had.
    pub reordered: u64,
    /// Connections dropped.
    pub drops: u64,
    /// Reconnect attempts that failed (and were tried again after a second).
    pub failed_connects: u64,
    /// Reconnects that had missed messages to catch up on.
    pub replays: u64,
    /// From the start of such a reconnect until the client held every message published
    /// before it began.
    pub replay_ms: Percentiles,
    /// From the start of a connect (the first and every reconnect, failed attempts included)
    /// until the namespace answered.
    pub connect_ms: Percentiles,
    /// The replays again, from the namespace's answer: the server's part of a catch-up.
    pub after_connect_ms: Percentiles,
    /// Clients missing something at the end of the drain whose last reconnect was still
    /// failing then (the rest are missing messages while connected).
    pub unconnected: usize,
    /// Clients missing something at the end of the drain, for the report (at most 5): the
    /// client, its first missing offset, how many messages it had, and whether it was still
    /// failing to reconnect.
    pub incomplete: Vec<(usize, i64, usize, bool)>,
    /// CPU seconds the generator used per second of the run (1.0 = one core busy).
    pub generator_cpu: f64,
    /// The same for the servers together, and for the whole machine (filled in by the caller,
    /// which knows the servers).
    pub servers_cores: f64,
    pub machine_cores: f64,
}

/// What the clients share.
struct Shared {
    run: String,
    /// The highest offset the publisher has received back: what a reconnect must catch up to.
    head: AtomicI64,
    /// True once the publisher is done; then `last` is the final offset and `drain_until`
    /// the end of the run.
    done: tokio::sync::watch::Sender<bool>,
    drain_until: std::sync::OnceLock<Instant>,
    last: AtomicI64,
    drops: AtomicU64,
    failed_connects: AtomicU64,
    connected: Barrier,
}

/// What one client saw.
struct Seen {
    offsets: Vec<i64>,
    /// Each replay's time, µs (a histogram each would be 18 KB a client).
    replays: Vec<u64>,
    /// Each connect's time until the namespace answered, µs, failed attempts included.
    connects: Vec<u64>,
    /// Each replay's time from the namespace's answer, µs.
    after_connect: Vec<u64>,
    /// Whether its last reconnect was still failing when the drain ended.
    unconnected: bool,
}

fn source(rng: &mut fastrand::Rng) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, rng.u8(1..=SOURCES)))
}

fn between(rng: &mut fastrand::Rng, low: Duration, high: Duration) -> Duration {
    low + (high - low).mul_f64(rng.f64())
}

/// One client: connects, then until the end lives a while, drops, stays away, reconnects with
/// the offset of the last message it got.
async fn client(
    url: String,
    index: usize,
    params: Flaky,
    shared: Arc<Shared>,
) -> anyhow::Result<Seen> {
    let mut rng = fastrand::Rng::with_seed(index as u64 * 7919 + 17);
    let mut seen = Seen {
        offsets: Vec::with_capacity((params.seconds * params.rate) as usize + 16),
        replays: Vec::new(),
        connects: Vec::new(),
        after_connect: Vec::new(),
        unconnected: false,
    };
    let mut highest = 0i64;
    let mut first = true;
    // The first lifetime is spread over one mean lifetime, so drops do not come in waves.
    let mut lifetime = params.lifetime.mul_f64(rng.f64());
    loop {
        // A reconnect: from its start until the client holds what was published before it.
        let began = Instant::now();
        let target = shared.head.load(Relaxed);
        let auth = json!({ "serverOffset": highest });
        let (mut conn, early) = loop {
            match Conn::connect_early(&url, source(&mut rng), Some(&auth)).await {
                Ok(joined) => break joined,
                Err(error) if first && began.elapsed() > FIRST_CONNECT => {
                    // The others wait for everyone's first connect.
                    shared.connected.wait().await;
                    return Err(error.context("a first connect"));
                }
                Err(_) => {
                    shared.failed_connects.fetch_add(1, Relaxed);
                    if shared
                        .drain_until
                        .get()
                        .is_some_and(|d| Instant::now() >= *d)
                    {
                        // Still away when the drain ended: what it missed stays missed.
                        seen.unconnected = true;
                        return Ok(seen);
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        let answered = Instant::now();
        seen.connects
            .push(answered.duration_since(began).as_micros() as u64);
        let mut replaying = target > highest;
        let record = |offset: i64, highest: &mut i64, replaying: &mut bool, seen: &mut Seen| {
            seen.offsets.push(offset);
            *highest = (*highest).max(offset);
            if *replaying && *highest >= target {
                *replaying = false;
                seen.replays.push(began.elapsed().as_micros() as u64);
                seen.after_connect
                    .push(answered.elapsed().as_micros() as u64);
            }
        };
        for (content, offset) in early {
            if content.starts_with(&shared.run) {
                record(offset, &mut highest, &mut replaying, &mut seen);
            }
        }
        if first {
            first = false;
            shared.connected.wait().await;
        }
        let drop_at = tokio::time::sleep(lifetime);
        tokio::pin!(drop_at);
        lifetime = between(
            &mut rng,
            params.lifetime.mul_f64(2.0 / 3.0),
            params.lifetime.mul_f64(4.0 / 3.0),
        );
        let mut done = shared.done.subscribe();
        loop {
            let publishing = !*done.borrow_and_update();
            if !publishing {
                let last = shared.last.load(Relaxed);
                let until = shared.drain_until.get().copied();
                if highest >= last || until.is_some_and(|d| Instant::now() >= d) {
                    conn.close().await;
                    return Ok(seen);
                }
            }
            // The drain's deadline, once there is one (a few frames at the end of a run).
            let drain_left = shared
                .drain_until
                .get()
                .map_or(DRAIN, |d| d.saturating_duration_since(Instant::now()));
            tokio::select! {
                () = &mut drop_at, if publishing => break,
                _ = done.changed(), if publishing => {}
                () = tokio::time::sleep(drain_left), if !publishing => {}
                frame = conn.next() => match frame {
                    Ok(Some(frame)) => {
                        if let Frame::ChatMessage { content, offset } = parse(&frame)
                            && content.starts_with(&shared.run)
                        {
                            record(offset, &mut highest, &mut replaying, &mut seen);
                        }
                    }
                    // Closed by the server (a node restarting, a slow consumer cut off): the
                    // client reconnects at once, as the tutorial's would.
                    Ok(None) | Err(_) => break,
                },
            }
        }
        if shared
            .drain_until
            .get()
            .is_some_and(|d| Instant::now() >= *d)
        {
            return Ok(seen);
        }
        conn.abort();
        shared.drops.fetch_add(1, Relaxed);
        let away = between(&mut rng, params.away.0, params.away.1);
        tokio::time::sleep(away).await;
    }
}

/// The publisher: sends `chat message`s at the rate for the run's length, with a client
/// offset each, and follows its own messages coming back to move the head.
async fn publisher(url: String, params: Flaky, shared: Arc<Shared>) -> anyhow::Result<u64> {
    let conn = Conn::connect(&url, None).await;
    shared.connected.wait().await;
    let mut conn = conn?;
    let period = Duration::from_secs_f64(1.0 / params.rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = (params.seconds * params.rate).round() as u64;
    let (mut sent, mut acked, mut back) = (0u64, 0u64, 0u64);
    let limit = Instant::now() + Duration::from_secs_f64(params.seconds) + DRAIN;
    while back < total || acked < sent {
        anyhow::ensure!(
            Instant::now() < limit,
            "the publisher's own messages did not come back: sent {sent}, acked {acked}, back {back}"
        );
        tokio::select! {
            _ = tick.tick(), if sent < total => {
                let content = format!("{}|{sent}", shared.run);
                conn.emit(&content, &format!("{}-{sent}", shared.run)).await?;
                sent += 1;
            }
            frame = conn.next() => {
                let frame = frame?.context("the publisher's connection closed")?;
                match parse(&frame) {
                    Frame::Ack { error, .. } => {
                        anyhow::ensure!(!error, "a publish was refused");
                        acked += 1;
                    }
                    Frame::ChatMessage { content, offset } if content.starts_with(&shared.run) => {
                        back += 1;
                        shared.head.fetch_max(offset, Relaxed);
                    }
                    _ => {}
                }
            }
        }
    }
    shared.last.store(shared.head.load(Relaxed), Relaxed);
    let _ = shared.drain_until.set(Instant::now() + DRAIN);
    shared.done.send_replace(true);
    conn.close().await;
    Ok(back)
}

/// Runs the scenario through the balancer at `url`.
pub async fn run(url: &str, params: Flaky) -> anyhow::Result<FlakyResult> {
    let shared = Arc::new(Shared {
        run: format!("flaky{}", run_id()),
        head: AtomicI64::new(0),
        done: tokio::sync::watch::Sender::new(false),
        drain_until: std::sync::OnceLock::new(),
        last: AtomicI64::new(0),
        drops: AtomicU64::new(0),
        failed_connects: AtomicU64::new(0),
        connected: Barrier::new(params.clients + 1),
    });
    let mut tasks = Vec::with_capacity(params.clients);
    for i in 0..params.clients {
        tasks.push(tokio::spawn(client(
            url.to_owned(),
            i,
            params,
            shared.clone(),
        )));
        if i % 100 == 99 {
            // 2 000 first connects a second: a storm of them would only measure the listen
            // queues, before the scenario starts.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let cpu_before = servers::cpu_seconds(std::process::id())?;
    let start = Instant::now();
    let publisher = tokio::spawn(publisher(url.to_owned(), params, shared.clone()));
    let published = publisher.await.context("publisher task")??;
    let last = shared.last.load(Relaxed);
    let (mut replays, mut connects, mut after_connect) = (
        Histogram::default(),
        Histogram::default(),
        Histogram::default(),
    );
    let (mut delivered, mut complete, mut duplicated, mut reordered) = (0u64, 0, 0u64, 0u64);
    let mut replay_count = 0u64;
    let (mut incomplete, mut unconnected) = (Vec::new(), 0);
    for (i, seen) in join_all(tasks).await.into_iter().enumerate() {
        let seen = seen.context("client task")??;
        let mut have = vec![false; usize::try_from(last).unwrap_or(0) + 1];
        let mut top = 0i64;
        for &offset in &seen.offsets {
            let Some(slot) = usize::try_from(offset).ok().and_then(|o| have.get_mut(o)) else {
                continue;
            };
            if *slot {
                duplicated += 1;
            } else {
                *slot = true;
                delivered += 1;
                if offset < top {
                    reordered += 1;
                }
            }
            top = top.max(offset);
        }
        match have.iter().skip(1).position(|h| !h) {
            None => complete += 1,
            Some(gap) => {
                unconnected += usize::from(seen.unconnected);
                if incomplete.len() < 5 {
                    let had = have.iter().filter(|h| **h).count();
                    incomplete.push((i, gap as i64 + 1, had, seen.unconnected));
                }
            }
        }
        replay_count += seen.replays.len() as u64;
        for &us in &seen.replays {
            replays.record(us);
        }
        for &us in &seen.connects {
            connects.record(us);
        }
        for &us in &seen.after_connect {
            after_connect.record(us);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = servers::cpu_seconds(std::process::id())? - cpu_before;
    let pairs = params.clients as f64 * last as f64;
    Ok(FlakyResult {
        params,
        published,
        delivered_share: if pairs > 0.0 {
            delivered as f64 / pairs
        } else {
            0.0
        },
        complete,
        duplicated,
        reordered,
        drops: shared.drops.load(Relaxed),
        failed_connects: shared.failed_connects.load(Relaxed),
        replays: replay_count,
        replay_ms: Percentiles::of(&replays),
        connect_ms: Percentiles::of(&connects),
        after_connect_ms: Percentiles::of(&after_connect),
        unconnected,
        incomplete,
        generator_cpu: cpu / elapsed,
        servers_cores: 0.0,
        machine_cores: 0.0,
    })
}

/// A tag for this run's messages: microseconds since the epoch.
fn run_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}
