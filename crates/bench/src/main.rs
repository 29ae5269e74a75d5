//! chorus-bench: load scenarios against chorus and, side by side, against the Socket.IO
//! tutorial's server on Node.js with the Redis adapter (`bench/baseline`), on the same Postgres
//! and Redis. It starts every server itself. `bench/README.md` explains the scenarios.

mod conn;
mod flaky;
mod floor;
mod hist;
mod scenarios;
mod servers;

use std::{fmt::Write as _, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, ensure};
use chorus_testkit::{PG_ADMIN, REDIS, TestDb, fixture::repo_root, metrics, try_get};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::{
    scenarios::{Fanout, FanoutResult},
    servers::{Server, Services, System},
};

/// Idle connections of the connect scenario.
const CONNECT_CONNECTIONS: usize = 2000;
/// The rooms written at once in the rooms rows of the store figures.
const STORE_ROOMS: [usize; 3] = [1, 4, 16];

/// Missed messages one client recovers in the replay scenario.
const REPLAY_MESSAGES: u64 = 100_000;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "chorus-bench",
    version,
    about = "Load scenarios against chorus and the Socket.IO tutorial's Node.js server, side by side",
    long_about = "Load scenarios against chorus and, side by side, the Socket.IO tutorial's server on \
                  Node.js with the Redis adapter (bench/baseline), on the same Postgres and Redis. \
                  Every server is started by the bench itself; bench/README.md explains the scenarios."
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    common: CommonArgs,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
enum Scenario {
    /// Every scenario below for chorus and the baseline; prints the side-by-side table, writes
    /// bench/results/ramp.csv, ramp.svg and summary.json
    All,
    /// Fanout at rising rates until p99 >= 50 ms or a message is lost
    Ramp,
    /// One fanout run
    Fanout(FanoutArgs),
    /// Server memory per idle websocket connection; with --steps, a ramp of idle connections
    /// (RSS per connection at each step, connections accepted/s, idle CPU at the top), with
    /// --baseline beside the baseline's, written to bench/results/connect.csv and connect.svg
    Connect {
        /// Idle connections to open
        #[arg(long, default_value_t = CONNECT_CONNECTIONS, value_parser = positive)]
        connections: usize,
        /// Ramp through these counts (comma-separated, the last is the top), e.g.
        /// 10000,50000,100000
        #[arg(long, value_delimiter = ',', value_parser = positive)]
        steps: Vec<usize>,
        /// Run the ramp for the baseline too, and print both side by side
        #[arg(long)]
        baseline: bool,
        /// Seconds the connections sit idle at the top while the server's CPU is measured
        #[arg(long, default_value_t = 30, value_parser = positive)]
        idle_seconds: usize,
    },
    /// Flaky clients: tutorial clients over three nodes behind nginx that drop their
    /// connection (a reset) about every 15 s and reconnect 1-2 s later with
    /// `auth.serverOffset`, while a publisher sends 10 messages/s; delivered share,
    /// duplicates, reordering and replay latency, written to bench/results/flaky.csv
    Flaky {
        /// Client counts, one run each (comma-separated)
        #[arg(long, value_delimiter = ',', value_parser = positive, default_value = "1000,10000")]
        clients: Vec<usize>,
        /// Seconds the publisher publishes
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Run the baseline too, and print both side by side
        #[arg(long)]
        baseline: bool,
    },
    /// Acked, stored messages/s with distinct client offsets
    Store {
        /// Rooms written at once (one sender per room at least); 0: the default room
        #[arg(long, default_value_t = 0)]
        rooms: usize,
    },
    /// Rows/s of plain batched INSERTs (batches of 100, one connection), without and with
    /// chorus's identity index: the database's own ceiling for the store scenario
    RawInserts,
    /// One client recovering missed messages (from the stream, then from the database)
    Replay {
        /// Messages the client missed
        #[arg(long, default_value_t = REPLAY_MESSAGES)]
        messages: u64,
    },
    /// Well-behaved clients' ack latency on one chorus node with the default rate limits, alone
    /// and beside one client that floods (and reconnects whenever it is cut off)
    Flood,
    /// CPU time per delivery at three fixed offered loads (a chat's, a middle one, one near
    /// the generator's ceiling) for the floor, the trivial broadcaster, chorus and the
    /// baseline, one node each: the server's, and the whole machine's less the generator's;
    /// writes bench/results/cpu.csv
    Cpu {
        /// Seconds of sending per run
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
    },
    /// A trivial in-memory Socket.IO broadcaster on $PORT (the generator's ceiling); internal
    TrivialServer,
    /// A websocket broadcaster on $PORT with no Socket.IO library (the CPU figures' floor);
    /// internal
    FloorServer,
}

/// The fanout scenario's load.
#[derive(Debug, Clone, Copy, Args)]
struct FanoutArgs {
    /// Connections, spread over the servers
    #[arg(long, default_value_t = 500, value_parser = positive)]
    connections: usize,
    /// How many of the connections send
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Messages per second per sender
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// How long the senders send
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rooms the connections are spread over (each sender writes to its own); 0: the default room
    #[arg(long, default_value_t = 0)]
    rooms: usize,
}

/// What every scenario takes.
#[derive(Debug, Args)]
struct CommonArgs {
    /// The server of single scenarios
    #[arg(long, value_enum, default_value_t = System::Chorus, global = true)]
    system: System,
    /// Servers behind the load
    #[arg(long, default_value_t = 3, value_parser = positive, global = true)]
    nodes: usize,
    /// Small sizes: a smoke run of seconds
    #[arg(long, global = true)]
    quick: bool,
    /// Postgres allowed to create databases
    #[arg(long = "pg", value_name = "URL", default_value = PG_ADMIN, global = true)]
    pg_admin: String,
    /// Redis
    #[arg(long, value_name = "URL", default_value = REDIS, global = true)]
    redis: String,
    /// Pin the servers to CPU N with taskset, or `none` [default: 0 when there are 2+ CPUs]
    #[arg(long, value_name = "N|none", value_parser = cpu_pin, global = true)]
    server_cpu: Option<CpuPin>,
}

impl CommonArgs {
    fn options(&self) -> Options {
        let server_cpu = match self.server_cpu {
            Some(CpuPin::None) => None,
            Some(CpuPin::Cpu(cpu)) => Some(cpu),
            None => {
                // The machine's CPUs, not this process's: under `taskset -c 1` (as scripts/bench
                // runs it) `available_parallelism` says 1, and the servers would share the
                // generator's CPU.
                let cpus = std::fs::read_to_string("/proc/cpuinfo")
                    .map(|info| info.lines().filter(|l| l.starts_with("processor")).count())
                    .unwrap_or(1);
                (cpus >= 2).then_some(0)
            }
        };
        Options {
            system: self.system,
            nodes: self.nodes,
            quick: self.quick,
            services: Services {
                pg_admin: self.pg_admin.clone(),
                redis: self.redis.clone(),
                server_cpu,
            },
        }
    }
}

/// The options of a run, as the scenarios use them.
struct Options {
    system: System,
    nodes: usize,
    quick: bool,
    services: Services,
}

/// `--server-cpu`: a CPU number, or `none`.
#[derive(Debug, Clone, Copy)]
enum CpuPin {
    None,
    Cpu(usize),
}

fn cpu_pin(value: &str) -> Result<CpuPin, String> {
    match value {
        "none" => Ok(CpuPin::None),
        cpu => cpu
            .parse()
            .map(CpuPin::Cpu)
            .map_err(|_| format!("{cpu:?} is neither a CPU number nor `none`")),
    }
}

fn positive(value: &str) -> Result<usize, String> {
    match value.parse() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{value:?} is not a positive integer")),
    }
}

/// `n` servers of `system` on one fresh database and Redis prefix.
struct Cluster {
    servers: Vec<Server>,
    db: Option<TestDb>,
}

impl Cluster {
    async fn start(
        system: System,
        n: usize,
        o: &Options,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Cluster> {
        let tag = format!("{}_{}", system.name(), scenarios_counter());
        let db = match system {
            System::Trivial | System::Floor => None,
            _ => Some(servers::create_database(&o.services, &tag).await?),
        };
        let prefix = format!("bench_{}_{tag}", std::process::id());
        let mut servers = Vec::with_capacity(n);
        // One at a time: the baseline's first node creates its table.
        for _ in 0..n {
            servers.push(Server::start(system, &o.services, db.as_ref(), &prefix, extra).await?);
        }
        Ok(Cluster { servers, db })
    }

    fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url.clone()).collect()
    }

    async fn stop(self) -> anyhow::Result<()> {
        futures_util::future::join_all(self.servers.into_iter().map(Server::stop)).await;
        if let Some(db) = self.db {
            db.drop_now().await?;
        }
        Ok(())
    }
}

fn scenarios_counter() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn fanout_line(system: System, nodes: usize, r: &FanoutResult) -> String {
    format!(
        "{:<9} {:>2} nodes {:>5} conns {:>3} senders x {:>6.0}/s: {:>9.0} deliveries/s  p50 {:>7.1} p99 {:>7.1} max {:>7.1} ms  ack p99 {:>6.1} ms  lost {} dup {} ooo {} reordered {}  gen cpu {:.2}",
        system.name(),
        nodes,
        r.params.connections,
        r.params.senders,
        r.params.rate,
        r.deliveries_per_s,
        r.latency_ms.p50,
        r.latency_ms.p99,
        r.latency_ms.max,
        r.ack_ms.p99,
        r.lost,
        r.duplicated,
        r.out_of_order,
        r.reordered,
        r.generator_cpu,
    )
}

/// Does a fanout step pass: p99 under 50 ms, every send acked, nothing lost, duplicated, out of
/// order (by offset) or reordered (a sender's messages against its send order)?
fn passes(r: &FanoutResult) -> bool {
    r.latency_ms.p99 < 50.0
        && r.lost == 0
        && r.duplicated == 0
        && r.out_of_order == 0
        && r.reordered == 0
        && r.acked == r.sent
}

/// Raises the per-sender rate until a step fails; returns every step.
async fn ramp(system: System, nodes: usize, o: &Options) -> anyhow::Result<Vec<FanoutResult>> {
    let (connections, senders, seconds, rates): (usize, usize, f64, Vec<f64>) = if o.quick {
        (30, 3, 1.0, vec![10.0, 40.0])
    } else {
        (
            500,
            10,
            4.0,
            vec![1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0],
        )
    };
    let cluster = Cluster::start(system, nodes, o, &[]).await?;
    let urls = cluster.urls();
    let mut steps = Vec::new();
    for rate in rates {
        let r = scenarios::fanout(
            &urls,
            Fanout {
                connections,
                senders,
                rate,
                seconds,
                rooms: 0,
            },
        )
        .await?;
        println!("{}", fanout_line(system, nodes, &r));
        // Go on while the step was sustained (delivered what was offered), so the curve shows
        // latency against throughput past the 50 ms line too.
        let go_on = sustained(&r);
        steps.push(r);
        if !go_on {
            break;
        }
    }
    cluster.stop().await?;
    Ok(steps)
}

/// Did a step deliver at least 95% of what was offered, with every send acked and nothing
/// lost? Order is not part of it, so a server that breaks order still gets a throughput figure
/// (its violations are reported beside it).
fn sustained(r: &FanoutResult) -> bool {
    let offered = r.params.rate * r.params.senders as f64 * r.params.connections as f64;
    r.deliveries_per_s >= 0.95 * offered && r.acked == r.sent && r.lost == 0
}

/// The best sustained step's deliveries/s and its p99 (zeros when none).
fn best_sustained(steps: &[FanoutResult]) -> (f64, f64) {
    steps
        .iter()
        .filter(|r| sustained(r))
        .map(|r| (r.deliveries_per_s, r.latency_ms.p99))
        .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
}

/// How late this machine wakes a task that sleeps 1 ms, for `seconds`: the floor under any
/// latency percentile measured here. (p50, p99, p99.9, max) in ms.
async fn scheduling_jitter(seconds: f64) -> (f64, f64, f64, f64) {
    let mut h = hist::Histogram::default();
    let end = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
    while std::time::Instant::now() < end {
        let t = std::time::Instant::now();
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        h.record(t.elapsed().as_micros().saturating_sub(1000) as u64);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    (
        ms(h.quantile(0.5)),
        ms(h.quantile(0.99)),
        ms(h.quantile(0.999)),
        ms(h.max()),
    )
}

fn best(steps: &[FanoutResult]) -> f64 {
    steps
        .iter()
        .filter(|r| passes(r))
        .map(|r| r.deliveries_per_s)
        .fold(0.0, f64::max)
}

/// Server memory per idle websocket: `connections` of them to a fresh node.
async fn connect_memory(system: System, o: &Options, connections: usize) -> anyhow::Result<f64> {
    let n = if o.quick { 200 } else { connections };
    let cluster = Cluster::start(system, 1, o, &[]).await?;
    let (before, after, per) = scenarios::connect(&cluster.servers[0], n).await?;
    println!(
        "{:<9} connect: {n} idle websockets, RSS {:.1} MB -> {:.1} MB: {:.1} KB per connection",
        system.name(),
        before as f64 / 1e6,
        after as f64 / 1e6,
        per / 1024.0
    );
    cluster.stop().await?;
    Ok(per)
}

/// Raises this process's descriptor limit as far as the kernel allows (`fs.nr_open`, up to
/// 1 048 576; the hard limit too when running as root), for 100 000 connections here and in the
/// servers the bench starts, which inherit it.
fn raise_descriptor_limit() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1_048_576)
        .min(1_048_576);
    if rlimit::setrlimit(rlimit::Resource::NOFILE, nr_open, nr_open).is_err() {
        // Without CAP_SYS_RESOURCE (not root, or a container that drops it): the soft limit
        // up to the hard one.
        let _ = rlimit::increase_nofile_limit(u64::MAX);
    }
}

/// Descriptors the bench, and each server it starts, may have open.
fn descriptor_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Descriptors a process needs besides its connections (pools, listeners, the runtime).
const DESCRIPTOR_RESERVE: u64 = 500;

/// Local addresses for `n` connections to one server port: 127.0.0.2 and up, 10 000
/// connections each (one address pair has 28 000 ephemeral ports here).
fn connect_sources(n: usize) -> Vec<std::net::IpAddr> {
    let count = n.div_ceil(10_000).clamp(1, 250);
    (0..count)
        .map(|i| std::net::IpAddr::from([127, 0, 0, 2 + i as u8]))
        .collect()
}

/// The connection ramp of one system on a fresh single node.
async fn connect_ramp(
    system: System,
    o: &Options,
    steps: &[usize],
    idle: Duration,
) -> anyhow::Result<scenarios::ConnectRamp> {
    let steps: Vec<usize> = if o.quick {
        vec![100, 200]
    } else {
        steps.to_vec()
    };
    // One process holds one descriptor per connection, the server and the bench alike: above
    // the limit neither can go, so the ramp stops below it and says so.
    let limit = descriptor_limit();
    let most = usize::try_from(limit.saturating_sub(DESCRIPTOR_RESERVE)).unwrap_or(usize::MAX);
    let mut steps: Vec<usize> = steps.into_iter().map(|n| n.min(most)).collect();
    steps.dedup();
    if steps.last().is_some_and(|&n| n == most) {
        println!(
            "{:<9} connect: capped at {most} connections: the descriptor limit is {limit} and cannot be raised here",
            system.name()
        );
    }
    let top = steps.iter().copied().max().unwrap_or(1);
    let idle = if o.quick {
        Duration::from_secs(2)
    } else {
        idle
    };
    // Above the node's default bound of open connections (100 000) with room for the probes.
    let limit = (top + 1000).to_string();
    let extra = [("CHORUS__TRANSPORT__MAX_CONNECTIONS", limit.as_str())];
    let cluster = Cluster::start(system, 1, o, &extra).await?;
    let ramp =
        scenarios::connect_ramp(&cluster.servers[0], &steps, &connect_sources(top), idle).await;
    cluster.stop().await?;
    let ramp = ramp?;
    for step in &ramp.steps {
        println!(
            "{:<9} connect: {:>6} idle websockets, RSS {:>7.1} MB, {:>5.1} KB per connection, {:>6.0} accepted/s",
            system.name(),
            step.connections,
            step.rss_bytes as f64 / 1e6,
            step.bytes_per_connection / 1024.0,
            step.accepted_per_s
        );
    }
    if let Some(why) = &ramp.stopped {
        println!("{:<9} connect: stopped: {why}", system.name());
    }
    Ok(ramp)
}

/// One flaky-clients run: three nodes of `system` behind nginx, sized for `clients`. The
/// servers are not pinned: what a client sees is the whole machine's answer.
async fn flaky_run(
    system: System,
    o: &Options,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<flaky::FlakyResult> {
    let mut unpinned = Options {
        system,
        nodes: 3,
        quick: o.quick,
        services: o.services.clone(),
    };
    unpinned.services.server_cpu = None;
    // The contract reads `serverOffset` 0 as a new client, which gets the newest 100 messages:
    // a client whose first connection dropped before any message arrived, and that came back
    // more than 100 messages later, would miss the first ones by that rule. The tutorial's
    // server replays everything after 0; chorus's rule for that is an unlimited history.
    let extra = [("CHORUS__CHAT__HISTORY", "unlimited")];
    let cluster = Cluster::start(system, 3, &unpinned, &extra).await?;
    let nodes: Vec<std::net::SocketAddr> = cluster
        .servers
        .iter()
        .map(|s| std::net::SocketAddr::from(([127, 0, 0, 1], s.port)))
        .collect();
    let balancer =
        chorus_testkit::Balancer::start_for(chorus_testkit::Lb::Nginx, &nodes, clients + 16).await;
    let mut params = flaky::Flaky::standard(clients, seconds);
    if o.quick {
        // A smoke run: every client drops a few times in its seconds.
        params.lifetime = Duration::from_secs(3);
        params.away = (Duration::from_millis(500), Duration::from_secs(1));
    }
    let pids: Vec<u32> = cluster.servers.iter().filter_map(Server::pid).collect();
    let servers_cpu =
        || -> anyhow::Result<f64> { pids.iter().map(|&pid| servers::cpu_seconds(pid)).sum() };
    let (servers_before, machine_before) = (servers_cpu()?, machine_busy_seconds()?);
    let started = std::time::Instant::now();
    let result = flaky::run(&balancer.url(), params).await;
    let elapsed = started.elapsed().as_secs_f64();
    let servers_cores = (servers_cpu()? - servers_before) / elapsed;
    let machine_cores = (machine_busy_seconds()? - machine_before) / elapsed;
    drop(balancer);
    cluster.stop().await?;
    let mut r = result?;
    r.servers_cores = servers_cores;
    r.machine_cores = machine_cores;
    println!(
        "{:<9} flaky: {:>6} clients, {} published: delivered {:.4}%, complete {}/{}, dup {}, reordered {}, drops {}, failed connects {}, connect p50 {:.0} p99 {:.0} ms, replays {} p50 {:.0} p99 {:.0} max {:.0} ms (after the connect p50 {:.0} p99 {:.0} ms), servers {:.2} cores, machine {:.2} cores, gen cpu {:.2}",
        system.name(),
        clients,
        r.published,
        r.delivered_share * 100.0,
        r.complete,
        clients,
        r.duplicated,
        r.reordered,
        r.drops,
        r.failed_connects,
        r.connect_ms.p50,
        r.connect_ms.p99,
        r.replays,
        r.replay_ms.p50,
        r.replay_ms.p99,
        r.replay_ms.max,
        r.after_connect_ms.p50,
        r.after_connect_ms.p99,
        r.servers_cores,
        r.machine_cores,
        r.generator_cpu
    );
    if r.complete < clients {
        println!(
            "{:<9} flaky: {} clients incomplete, {} of them still failing to reconnect when the drain ended",
            system.name(),
            clients - r.complete,
            r.unconnected
        );
    }
    for (client, gap, had, unconnected) in &r.incomplete {
        println!(
            "{:<9} flaky: client {client} misses offset {gap} first, had {had} messages{}",
            system.name(),
            if *unconnected {
                ", was still reconnecting"
            } else {
                ""
            }
        );
    }
    Ok(r)
}

/// The flaky runs side by side.
fn print_flaky_table(runs: &[(System, usize, Result<flaky::FlakyResult, String>)]) {
    println!(
        "{:<9} {:>7} {:>9} {:>11} {:>6} {:>9} {:>6} {:>8} {:>10} {:>10} {:>11} {:>8}",
        "system",
        "clients",
        "published",
        "delivered",
        "dup",
        "reordered",
        "drops",
        "replays",
        "replay p50",
        "replay p99",
        "connect p99",
        "machine"
    );
    for (system, clients, run) in runs {
        let r = match run {
            Ok(r) => r,
            Err(e) => {
                println!("{:<9} {clients:>7} failed: {e}", system.name());
                continue;
            }
        };
        println!(
            "{:<9} {:>7} {:>9} {:>10.3}% {:>6} {:>9} {:>6} {:>8} {:>7.0} ms {:>7.0} ms {:>8.0} ms {:>4.2} cores",
            system.name(),
            r.params.clients,
            r.published,
            r.delivered_share * 100.0,
            r.duplicated,
            r.reordered,
            r.drops,
            r.replays,
            r.replay_ms.p50,
            r.replay_ms.p99,
            r.connect_ms.p99,
            r.machine_cores
        );
    }
}

/// bench/results/flaky.csv.
fn write_flaky_results(
    runs: &[(System, usize, Result<flaky::FlakyResult, String>)],
    quick: bool,
) -> anyhow::Result<()> {
    let mut csv = String::from(
        "system,clients,published,delivered_share,complete,duplicated,reordered,drops,failed_connects,replays,replay_p50_ms,replay_p99_ms,replay_max_ms,connect_p50_ms,connect_p99_ms,after_connect_p50_ms,after_connect_p99_ms,servers_cores,machine_cores,generator_cpu,failure\n",
    );
    for (system, clients, run) in runs {
        let r = match run {
            Ok(r) => r,
            Err(e) => {
                let e = e.replace([',', '\n'], ";");
                writeln!(csv, "{},{clients},,,,,,,,,,,,,,,,,,,{e}", system.name())?;
                continue;
            }
        };
        writeln!(
            csv,
            "{},{},{},{:.6},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.2},{:.2},{:.2},",
            system.name(),
            r.params.clients,
            r.published,
            r.delivered_share,
            r.complete,
            r.duplicated,
            r.reordered,
            r.drops,
            r.failed_connects,
            r.replays,
            r.replay_ms.p50,
            r.replay_ms.p99,
            r.replay_ms.max,
            r.connect_ms.p50,
            r.connect_ms.p99,
            r.after_connect_ms.p50,
            r.after_connect_ms.p99,
            r.servers_cores,
            r.machine_cores,
            r.generator_cpu
        )?;
    }
    std::fs::write(result_file("flaky", "csv", quick)?, csv)?;
    Ok(())
}

/// The ramps side by side: one row per step.
fn print_connect_table(ramps: &[(System, scenarios::ConnectRamp)]) {
    let mut header = format!("{:>11}", "connections");
    for (system, _) in ramps {
        let _ = write!(
            header,
            " | {:>26}",
            format!("{} RSS, KB/conn, conn/s", system.name())
        );
    }
    println!("{header}");
    let counts: std::collections::BTreeSet<usize> = ramps
        .iter()
        .flat_map(|(_, r)| r.steps.iter().map(|s| s.connections))
        .collect();
    for n in counts {
        let mut row = format!("{n:>11}");
        for (_, ramp) in ramps {
            match ramp.steps.iter().find(|s| s.connections == n) {
                Some(s) => {
                    let _ = write!(
                        row,
                        " | {:>8.0} MB {:>6.1} {:>7.0}",
                        s.rss_bytes as f64 / 1e6,
                        s.bytes_per_connection / 1024.0,
                        s.accepted_per_s
                    );
                }
                None => {
                    let _ = write!(row, " | {:>26}", "not reached");
                }
            }
        }
        println!("{row}");
    }
    for (system, ramp) in ramps {
        let top = ramp.steps.last().map_or(0, |s| s.connections);
        println!(
            "{:<9} idle CPU with {top} connections: {:.2}% of a core over {:.0} s{}",
            system.name(),
            ramp.idle_cpu_percent,
            ramp.idle_seconds,
            ramp.stopped
                .as_deref()
                .map(|w| format!(" (stopped: {w})"))
                .unwrap_or_default()
        );
    }
}

/// bench/results/connect.csv and connect.svg (RSS against connections).
fn write_connect_results(
    ramps: &[(System, scenarios::ConnectRamp)],
    quick: bool,
) -> anyhow::Result<()> {
    let mut csv = String::from(
        "system,connections,rss_bytes,bytes_per_connection,accepted_per_s,idle_cpu_percent\n",
    );
    for (system, ramp) in ramps {
        for s in &ramp.steps {
            writeln!(
                csv,
                "{},{},{},{:.0},{:.0},{:.3}",
                system.name(),
                s.connections,
                s.rss_bytes,
                s.bytes_per_connection,
                s.accepted_per_s,
                ramp.idle_cpu_percent
            )?;
        }
    }
    std::fs::write(result_file("connect", "csv", quick)?, csv)?;
    std::fs::write(result_file("connect", "svg", quick)?, connect_svg(ramps))?;
    Ok(())
}

/// A linear plot: x connections, y server RSS (MB), one line per system.
fn connect_svg(ramps: &[(System, scenarios::ConnectRamp)]) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 440.0, 70.0, 50.0, 30.0, 170.0);
    let points = ramps.iter().flat_map(|(_, r)| r.steps.iter());
    let max_x = points
        .clone()
        .map(|s| s.connections as f64)
        .fold(1.0, f64::max)
        * 1.05;
    let max_y = points
        .map(|s| s.rss_bytes as f64 / 1e6)
        .fold(10.0, f64::max)
        * 1.1;
    let x = |v: f64| left + v / max_x * (w - left - right);
    let y = |v: f64| h - bottom - v / max_y * (h - bottom - top);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        out,
        "<text x=\"{left}\" y=\"18\" font-size=\"14\">server RSS against idle websocket connections (one node)</text>"
    );
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=5 {
        let vx = max_x * f64::from(i) / 5.0;
        let vy = max_y * f64::from(i) / 5.0;
        // Thousands once the axis reaches them.
        let tick = if max_x >= 5000.0 {
            format!("{:.0}k", vx / 1000.0)
        } else {
            format!("{vx:.0}")
        };
        let _ = writeln!(
            out,
            "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"middle\">{tick}</text><text x=\"{}\" y=\"{:.0}\" text-anchor=\"end\">{:.0} MB</text><line x1=\"{left}\" y1=\"{:.0}\" x2=\"{}\" y2=\"{:.0}\" stroke=\"#ddd\"/>",
            x(vx),
            h - bottom + 18.0,
            left - 6.0,
            y(vy) + 4.0,
            vy,
            y(vy),
            w - right,
            y(vy)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"middle\">idle websocket connections</text>",
        (left + w - right) / 2.0,
        h - 10.0
    );
    let colors = ["#1b6ac9", "#d9480f", "#666"];
    for (i, (system, ramp)) in ramps.iter().enumerate() {
        let color = colors[i % colors.len()];
        let dots: Vec<(f64, f64)> = ramp
            .steps
            .iter()
            .map(|s| (x(s.connections as f64), y(s.rss_bytes as f64 / 1e6)))
            .collect();
        // The line starts at the origin; the dots are the steps.
        let line: Vec<(f64, f64)> = std::iter::once((x(0.0), y(0.0)))
            .chain(dots.iter().copied())
            .collect();
        let legend = (w - right + 10.0, top + 20.0 + 18.0 * i as f64);
        svg_series(&mut out, color, &line, &dots, legend, system.name());
    }
    out.push_str("</svg>\n");
    out
}

/// Rows/s of plain batched inserts on a fresh database: one connection, batches of 100, an id,
/// client offset and content, each batch its own autocommitted statement. Measured twice: with
/// a primary key only, and with chorus's identity index as well.
async fn raw_insert_rate(o: &Options) -> anyhow::Result<RawInserts> {
    let seconds = if o.quick { 1.0 } else { 5.0 };
    let mut rates = [0.0; 2];
    for (rate, identity) in rates.iter_mut().zip([false, true]) {
        let db = servers::create_database(&o.services, "raw").await?;
        let measured = scenarios::raw_inserts(&db.url, 100, seconds, identity).await;
        db.drop_now().await?;
        *rate = measured?;
    }
    let [plain, identity] = rates;
    println!(
        "postgres  raw inserts: batches of 100 on one connection: {plain:.0} rows/s, {identity:.0} rows/s with the identity index"
    );
    Ok(RawInserts { plain, identity })
}

/// The database's own insert rates, rows/s.
struct RawInserts {
    /// Primary key only.
    plain: f64,
    /// Primary key and the identity index chorus's appends check.
    identity: f64,
}

async fn store_rate(system: System, o: &Options, rooms: usize) -> anyhow::Result<f64> {
    let (senders, window, seconds) = if o.quick { (2, 32, 1.0) } else { (6, 128, 5.0) };
    let senders = senders.max(rooms);
    let cluster = Cluster::start(system, o.nodes, o, &[]).await?;
    let rate = scenarios::store(&cluster.urls(), senders, window, seconds, rooms).await?;
    let into = match rooms {
        0 => "the default room".to_owned(),
        1 => "1 room".to_owned(),
        n => format!("{n} rooms"),
    };
    println!(
        "{:<9} store: {senders} senders x {window} in flight on {} nodes into {into}: {rate:.0} stored msg/s",
        system.name(),
        o.nodes
    );
    cluster.stop().await?;
    Ok(rate)
}

/// The p99 ack latency of well-behaved senders, without and with one flooding client beside
/// them on the same node, with the rate limits a deployment gets by default.
async fn flood(o: &Options) -> anyhow::Result<()> {
    let seconds = if o.quick { 1.0 } else { 10.0 };
    let params = Fanout {
        connections: 100,
        senders: 10,
        rate: 5.0,
        seconds,
        rooms: 0,
    };
    let defaults = [
        ("CHORUS__LIMITS__MESSAGES_PER_SECOND", "10"),
        ("CHORUS__LIMITS__MESSAGE_BURST", "50"),
        ("CHORUS__LIMITS__ADDRESS_MESSAGES_PER_SECOND", "100"),
        ("CHORUS__LIMITS__ADDRESS_MESSAGE_BURST", "500"),
    ];
    let cluster = Cluster::start(System::Chorus, 1, o, &defaults).await?;
    let urls = cluster.urls();
    let alone = scenarios::fanout(&urls, params).await?;
    let (beside, flooder) = tokio::join!(
        scenarios::fanout(&urls, params),
        scenarios::flood(&urls[0], seconds)
    );
    let (beside, flooder) = (beside?, flooder?);
    cluster.stop().await?;
    for (label, r) in [("alone", &alone), ("with a flooder", &beside)] {
        println!(
            "chorus    flood: 10 senders x 5/s, {label:<14}: ack p50 {:6.1} p99 {:6.1} ms, delivery p99 {:6.1} ms, lost {}",
            r.ack_ms.p50, r.ack_ms.p99, r.latency_ms.p99, r.lost
        );
    }
    println!(
        "chorus    flood: the flooder sent {}, {} stored, {} refused as rate limited, cut off {} times",
        flooder.sent, flooder.stored, flooder.rate_limited, flooder.reconnects
    );
    println!(
        "{}",
        json!({ "scenario": "flood", "alone": alone, "with_flooder": beside, "flooder": flooder })
    );
    Ok(())
}

/// Recovery rates: (from the stream, from the database); the baseline has only the database.
async fn replay(system: System, o: &Options, messages: u64) -> anyhow::Result<(Option<f64>, f64)> {
    let n = if o.quick { 2_000 } else { messages };
    // Recoveries must come from the stream or the database, not a node's memory.
    let extra = [
        ("CHORUS__FEED__RING_CAPACITY", "64"),
        ("CHORUS__RECOVERY__MAX_LEN", "10000000"),
    ];
    let cluster = Cluster::start(system, 1, o, &extra).await?;
    let url = cluster.urls()[0].clone();
    // One more than recovered: offset 0 would mean a new client, which gets only the newest
    // history; the recovering client says it saw the first one.
    let (first, last) = scenarios::seed(&url, n + 1).await?;
    let port = cluster.servers[0].port;
    let (stream, database) = match system {
        System::Chorus => {
            let stream = recovered_from(port, "log", scenarios::recover(&url, first, last)).await?;
            // A node on another Redis prefix has an empty stream: the database serves.
            let db = cluster.db.as_ref().context("database")?;
            let other = Server::start(
                system,
                &o.services,
                Some(db),
                &format!("bench_empty_{}", std::process::id()),
                &extra,
            )
            .await?;
            let database = recovered_from(
                other.port,
                "database",
                scenarios::recover(&other.url, first, last),
            )
            .await?;
            other.stop().await;
            (Some(stream), database)
        }
        _ => (None, scenarios::recover(&url, first, last).await?),
    };
    println!(
        "{:<9} replay of {n}: stream {} msg/s, database {database:.0} msg/s",
        system.name(),
        stream.map_or("-".into(), |s| format!("{s:.0}")),
    );
    cluster.stop().await?;
    Ok((stream, database))
}

/// Runs a chorus recovery and checks from `/metrics` that it started from `source`.
async fn recovered_from(
    port: u16,
    source: &str,
    recovery: impl Future<Output = anyhow::Result<f64>>,
) -> anyhow::Result<f64> {
    let name = format!("chorus_replays_total{{source=\"{source}\"}}");
    let count = || async {
        let (_, body) = try_get(port, "/metrics")
            .await
            .with_context(|| format!("no /metrics on port {port}"))?;
        metrics::value(&body, &name).with_context(|| format!("{name} is not in /metrics"))
    };
    let before = count().await?;
    let rate = recovery.await?;
    ensure!(
        count().await? == before + 1.0,
        "the recovery did not start from the {source}"
    );
    Ok(rate)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.1}x", a / b)
    } else {
        "-".into()
    }
}

/// `bench/results/{stem}.{ext}`, or `{stem}-quick.{ext}` for a smoke run (ignored by git);
/// the directory is made if missing.
fn result_file(stem: &str, ext: &str, quick: bool) -> anyhow::Result<PathBuf> {
    let dir = repo_root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let suffix = if quick { "-quick" } else { "" };
    Ok(dir.join(format!("{stem}{suffix}.{ext}")))
}

/// Writes the ramp steps as CSV and as an SVG plot of p99 latency against deliveries/s.
fn write_ramps(ramps: &[(System, usize, Vec<FanoutResult>)], quick: bool) -> anyhow::Result<()> {
    let mut csv = String::from(
        "system,nodes,connections,senders,rate_per_sender,deliveries_per_s,p50_ms,p95_ms,p99_ms,max_ms,ack_p99_ms,lost,duplicated,out_of_order,reordered,generator_cpu\n",
    );
    for (system, nodes, steps) in ramps {
        for r in steps {
            writeln!(
                csv,
                "{},{nodes},{},{},{},{:.0},{:.2},{:.2},{:.2},{:.2},{:.2},{},{},{},{},{:.2}",
                system.name(),
                r.params.connections,
                r.params.senders,
                r.params.rate,
                r.deliveries_per_s,
                r.latency_ms.p50,
                r.latency_ms.p95,
                r.latency_ms.p99,
                r.latency_ms.max,
                r.ack_ms.p99,
                r.lost,
                r.duplicated,
                r.out_of_order,
                r.reordered,
                r.generator_cpu
            )?;
        }
    }
    std::fs::write(result_file("ramp", "csv", quick)?, csv)?;
    std::fs::write(result_file("ramp", "svg", quick)?, svg(ramps))?;
    Ok(())
}

/// One series of a plot: a line through `line`, a dot at each of `dots`, and its legend entry
/// at `legend`.
fn svg_series(
    out: &mut String,
    color: &str,
    line: &[(f64, f64)],
    dots: &[(f64, f64)],
    legend: (f64, f64),
    label: &str,
) {
    let points: Vec<String> = line.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = writeln!(
        out,
        "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
        points.join(" ")
    );
    for (x, y) in dots {
        let _ = writeln!(
            out,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{color}\"/>"
        );
    }
    let (lx, ly) = legend;
    let _ = writeln!(
        out,
        "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{label}</text>",
        lx + 20.0,
        lx + 26.0,
        ly + 4.0
    );
}

/// A log-scale plot: x deliveries/s, y p99 latency (ms), one line per system and node count.
fn svg(ramps: &[(System, usize, Vec<FanoutResult>)]) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 440.0, 70.0, 50.0, 30.0, 170.0);
    let points = ramps.iter().flat_map(|(_, _, s)| s.iter());
    let max_x = points
        .clone()
        .map(|r| r.deliveries_per_s)
        .fold(1.0, f64::max)
        * 1.1;
    let (min_y, max_y) = (
        1.0f64,
        points.map(|r| r.latency_ms.p99).fold(100.0, f64::max) * 1.5,
    );
    let x = |v: f64| left + v / max_x * (w - left - right);
    let y = |v: f64| {
        let t = (v.max(min_y).ln() - min_y.ln()) / (max_y.ln() - min_y.ln());
        h - bottom - t * (h - bottom - top)
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        out,
        "<text x=\"{left}\" y=\"18\" font-size=\"14\">p99 delivery latency against deliveries/s (fanout ramp)</text>"
    );
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - right,
        h - bottom
    );
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom
    );
    for i in 0..=5 {
        let v = max_x * f64::from(i) / 5.0;
        let _ = writeln!(
            out,
            "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"middle\">{:.0}k</text>",
            x(v),
            h - bottom + 18.0,
            v / 1000.0
        );
    }
    for v in [1.0, 10.0, 50.0, 100.0, 1000.0, 10000.0]
        .into_iter()
        .filter(|v| *v <= max_y)
    {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{:.0}\" text-anchor=\"end\">{v} ms</text>",
            left - 6.0,
            y(v) + 4.0
        );
        let dash = if v == 50.0 {
            " stroke-dasharray=\"4 3\" stroke=\"red\""
        } else {
            " stroke=\"#ddd\""
        };
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" y1=\"{:.0}\" x2=\"{}\" y2=\"{:.0}\"{dash}/>",
            y(v),
            w - right,
            y(v)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"middle\">deliveries/s</text>",
        (left + w - right) / 2.0,
        h - 10.0
    );
    let colors = ["#1b6ac9", "#7fb2f0", "#d9480f", "#f5a46c", "#666", "#aaa"];
    for (i, (system, nodes, steps)) in ramps.iter().enumerate() {
        let color = colors[i % colors.len()];
        let points: Vec<(f64, f64)> = steps
            .iter()
            .map(|r| (x(r.deliveries_per_s), y(r.latency_ms.p99)))
            .collect();
        let label = format!(
            "{} ({nodes} node{})",
            system.name(),
            if *nodes == 1 { "" } else { "s" }
        );
        let legend = (w - right + 10.0, top + 20.0 + 18.0 * i as f64);
        svg_series(&mut out, color, &points, &points, legend, &label);
    }
    out.push_str("</svg>\n");
    out
}

async fn all(o: &Options) -> anyhow::Result<()> {
    let jitter = scheduling_jitter(if o.quick { 0.5 } else { 3.0 }).await;
    println!(
        "scheduling jitter of this machine (1 ms sleeps, overshoot): p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} ms",
        jitter.0, jitter.1, jitter.2, jitter.3
    );
    let mut ramps = Vec::new();
    for system in [System::Trivial, System::Chorus, System::Baseline] {
        let node_counts: &[usize] = if system == System::Trivial {
            &[1]
        } else {
            &[1, 3]
        };
        for &nodes in node_counts {
            ramps.push((system, nodes, ramp(system, nodes, o).await?));
        }
    }
    write_ramps(&ramps, o.quick)?;
    let best_of = |s: System, n: usize| {
        ramps
            .iter()
            .find(|(sy, no, _)| *sy == s && *no == n)
            .map_or(0.0, |(_, _, st)| best(st))
    };
    let sustained_of = |s: System, n: usize| {
        ramps
            .iter()
            .find(|(sy, no, _)| *sy == s && *no == n)
            .map_or((0.0, 0.0), |(_, _, st)| best_sustained(st))
    };
    let mem = (
        connect_memory(System::Chorus, o, CONNECT_CONNECTIONS).await?,
        connect_memory(System::Baseline, o, CONNECT_CONNECTIONS).await?,
    );
    let raw = raw_insert_rate(o).await?;
    let stored = (
        store_rate(System::Chorus, o, 0).await?,
        store_rate(System::Baseline, o, 0).await?,
    );
    let mut in_rooms = Vec::new();
    for rooms in STORE_ROOMS {
        in_rooms.push((rooms, store_rate(System::Chorus, o, rooms).await?));
    }
    let (c_replay, b_replay) = (
        replay(System::Chorus, o, REPLAY_MESSAGES).await?,
        replay(System::Baseline, o, REPLAY_MESSAGES).await?,
    );

    let (c3, b3) = (
        sustained_of(System::Chorus, 3),
        sustained_of(System::Baseline, 3),
    );
    let (c1, b1) = (
        sustained_of(System::Chorus, 1),
        sustained_of(System::Baseline, 1),
    );
    let rows: Vec<(&str, f64, f64, String)> = vec![
        (
            "deliveries/s sustained (0 lost), 3 nodes",
            c3.0,
            b3.0,
            format!("(p99 {:.0} ms vs {:.0} ms)", c3.1, b3.1),
        ),
        (
            "deliveries/s sustained (0 lost), 1 node",
            c1.0,
            b1.0,
            format!("(p99 {:.0} ms vs {:.0} ms)", c1.1, b1.1),
        ),
        (
            "deliveries/s, p99<50ms, 0 lost, 3 nodes",
            best_of(System::Chorus, 3),
            best_of(System::Baseline, 3),
            String::new(),
        ),
        (
            "deliveries/s, p99<50ms, 0 lost, 1 node",
            best_of(System::Chorus, 1),
            best_of(System::Baseline, 1),
            String::new(),
        ),
        (
            "server KB per idle websocket",
            mem.0 / 1024.0,
            mem.1 / 1024.0,
            "(lower is better)".into(),
        ),
        (
            "stored msg/s, 3 nodes",
            stored.0,
            stored.1,
            format!(
                "(raw batched inserts {:.0} rows/s, {:.0} with the identity index: chorus at {:.2}x, {:.2}x)",
                raw.plain,
                raw.identity,
                stored.0 / raw.plain,
                stored.0 / raw.identity
            ),
        ),
    ];
    let room_rows = in_rooms.iter().map(|&(rooms, rate)| {
        (
            format!("stored msg/s into {rooms} room(s) at once, 3 nodes"),
            rate,
            0.0,
            format!(
                "({:.2}x raw inserts with the identity index; baseline: no rooms)",
                rate / raw.identity
            ),
        )
    });
    let mut rows: Vec<(String, f64, f64, String)> = rows
        .into_iter()
        .map(|(name, c, b, note)| (name.to_owned(), c, b, note))
        .chain(room_rows)
        .collect();
    rows.extend([
        (
            "replay msg/s from the stream".to_owned(),
            c_replay.0.unwrap_or(0.0),
            0.0,
            "(baseline: no stream)".into(),
        ),
        (
            "replay msg/s from the database".to_owned(),
            c_replay.1,
            b_replay.1,
            String::new(),
        ),
    ]);
    println!();
    println!(
        "{:<50} {:>12} {:>12} {:>8}",
        "", "chorus", "baseline", "ratio"
    );
    for (name, c, b, note) in &rows {
        println!("{name:<50} {c:>12.0} {b:>12.0} {:>8} {note}", ratio(*c, *b));
    }
    let ceiling = sustained_of(System::Trivial, 1);
    println!(
        "generator ceiling (trivial in-memory server, 1 node): {:.0} deliveries/s sustained at p99 {:.0} ms",
        ceiling.0, ceiling.1
    );
    // Lost, duplicated, out-of-order and reordered deliveries over every ramp step.
    let violations = |s: System| -> u64 {
        ramps
            .iter()
            .filter(|(sy, _, _)| *sy == s)
            .flat_map(|(_, _, steps)| steps)
            .map(|r| r.lost + r.duplicated + r.out_of_order + r.reordered)
            .sum()
    };
    println!(
        "deliveries lost, duplicated, out of order or reordered over every ramp step: chorus {}, baseline {}",
        violations(System::Chorus),
        violations(System::Baseline)
    );
    let summary = json!({
        "scenario": "all",
        "violations": { "chorus": violations(System::Chorus), "baseline": violations(System::Baseline) },
        "quick": o.quick,
        "deliveries_3_nodes": { "chorus": best_of(System::Chorus, 3), "baseline": best_of(System::Baseline, 3) },
        "deliveries_1_node": { "chorus": best_of(System::Chorus, 1), "baseline": best_of(System::Baseline, 1) },
        "generator_ceiling": best_of(System::Trivial, 1),
        "sustained_3_nodes": { "chorus": c3.0, "chorus_p99_ms": c3.1, "baseline": b3.0, "baseline_p99_ms": b3.1 },
        "sustained_1_node": { "chorus": c1.0, "chorus_p99_ms": c1.1, "baseline": b1.0, "baseline_p99_ms": b1.1 },
        "generator_ceiling_sustained": ceiling.0,
        "scheduling_jitter_ms": { "p50": jitter.0, "p99": jitter.1, "p999": jitter.2, "max": jitter.3 },
        "bytes_per_idle_connection": { "chorus": mem.0, "baseline": mem.1 },
        "stored_per_s": { "chorus": stored.0, "baseline": stored.1, "raw_batched_inserts": raw.plain, "raw_batched_inserts_identity_index": raw.identity },
        "replay_per_s": { "chorus_stream": c_replay.0, "chorus_database": c_replay.1, "baseline_database": b_replay.1 },
    });
    println!("{summary}");
    std::fs::write(
        result_file("summary", "json", o.quick)?,
        format!("{summary:#}\n"),
    )?;
    Ok(())
}

/// The offered loads of the CPU figures: a name and each sender's messages/s (10 senders, 500
/// connections: 5 000, 40 000 and 150 000 deliveries/s offered).
const CPU_RATES: [(&str, f64); 3] = [("chat", 1.0), ("middle", 8.0), ("high", 30.0)];

/// One run of the CPU figures.
struct CpuRun {
    system: System,
    load: &'static str,
    offered: f64,
    result: FanoutResult,
    /// CPU seconds of the server process over the run.
    server: f64,
    /// CPU seconds of the whole machine over the run, less the generator's own.
    machine: f64,
}

impl CpuRun {
    fn per_delivery_us(&self, seconds: f64) -> f64 {
        seconds / self.result.deliveries.max(1) as f64 * 1e6
    }
}

/// Busy CPU seconds of the whole machine so far (`/proc/stat`: everything but idle and iowait).
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .take(6)
        .sum();
    Ok(busy / 100.0)
}

/// The CPU table: every system at every load, one fresh node each.
async fn cpu_per_delivery(o: &Options, seconds: f64) -> anyhow::Result<()> {
    let (connections, senders, seconds) = if o.quick {
        (50, 5, 2.0)
    } else {
        (500, 10, seconds)
    };
    let me = std::process::id();
    let mut runs = Vec::new();
    // A smoke run takes the chat load only.
    let loads = if o.quick {
        &CPU_RATES[..1]
    } else {
        &CPU_RATES[..]
    };
    for &(load, rate) in loads {
        for system in [
            System::Floor,
            System::Trivial,
            System::Chorus,
            System::Baseline,
        ] {
            let cluster = Cluster::start(system, 1, o, &[]).await?;
            let pid = cluster.servers[0].pid().context("server pid")?;
            let (server0, machine0, me0) = (
                servers::cpu_seconds(pid)?,
                machine_busy_seconds()?,
                servers::cpu_seconds(me)?,
            );
            let params = Fanout {
                connections,
                senders,
                rate,
                seconds,
                rooms: 0,
            };
            let result = scenarios::fanout(&cluster.urls(), params).await;
            let server = servers::cpu_seconds(pid)? - server0;
            let machine = machine_busy_seconds()? - machine0 - (servers::cpu_seconds(me)? - me0);
            cluster.stop().await?;
            let result = result?;
            let run = CpuRun {
                system,
                load,
                offered: rate * senders as f64 * connections as f64,
                result,
                server,
                machine,
            };
            println!(
                "{:<9} cpu {load:<6}: offered {:>7.0} deliveries/s, delivered {:>7.0}/s (p99 {:.1} ms, lost {}), server {:.2} µs and machine {:.2} µs per delivery",
                system.name(),
                run.offered,
                run.result.deliveries_per_s,
                run.result.latency_ms.p99,
                run.result.lost,
                run.per_delivery_us(run.server),
                run.per_delivery_us(run.machine),
            );
            runs.push(run);
        }
    }
    print_cpu_table(&runs);
    write_cpu_results(&runs, o.quick)
}

/// µs per delivery, server alone and whole machine, one row per load.
fn print_cpu_table(runs: &[CpuRun]) {
    let systems = [
        System::Floor,
        System::Trivial,
        System::Chorus,
        System::Baseline,
    ];
    let mut header = format!("{:<8} {:>9}", "load", "offered/s");
    for s in systems {
        let _ = write!(header, " | {:>17}", format!("{} server/machine", s.name()));
    }
    println!("{header}   (µs of CPU per delivery)");
    for (load, _) in CPU_RATES {
        let Some(offered) = runs.iter().find(|r| r.load == load).map(|r| r.offered) else {
            continue;
        };
        let mut row = format!("{load:<8} {offered:>9.0}");
        for s in systems {
            match runs.iter().find(|r| r.load == load && r.system == s) {
                Some(r) => {
                    let _ = write!(
                        row,
                        " | {:>8.2} / {:>6.2}",
                        r.per_delivery_us(r.server),
                        r.per_delivery_us(r.machine)
                    );
                }
                None => {
                    let _ = write!(row, " | {:>17}", "-");
                }
            }
        }
        println!("{row}");
    }
}

/// bench/results/cpu.csv.
fn write_cpu_results(runs: &[CpuRun], quick: bool) -> anyhow::Result<()> {
    let mut csv = String::from(
        "system,load,offered_per_s,deliveries_per_s,p99_ms,lost,server_cpu_s,machine_cpu_s,server_us_per_delivery,machine_us_per_delivery\n",
    );
    for r in runs {
        writeln!(
            csv,
            "{},{},{:.0},{:.0},{:.2},{},{:.3},{:.3},{:.3},{:.3}",
            r.system.name(),
            r.load,
            r.offered,
            r.result.deliveries_per_s,
            r.result.latency_ms.p99,
            r.result.lost,
            r.server,
            r.machine,
            r.per_delivery_us(r.server),
            r.per_delivery_us(r.machine)
        )?;
    }
    std::fs::write(result_file("cpu", "csv", quick)?, csv)?;
    Ok(())
}

/// A Socket.IO server that only broadcasts: no storage, no ordering, no checks.
async fn trivial_server() -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    use socketioxide::{
        SocketIo,
        extract::{AckSender, Data, SocketRef},
    };
    use std::sync::atomic::{AtomicI64, Ordering};
    let port: u16 = std::env::var("PORT")
        .unwrap_or_else(|_| "3000".into())
        .parse()?;
    let (layer, io) = SocketIo::builder().build_layer();
    let counter = Arc::new(AtomicI64::new(0));
    let io2 = io.clone();
    io.ns("/", move |socket: SocketRef| {
        let (counter, io) = (counter.clone(), io2.clone());
        socket.on(
            "chat message",
            move |Data((content, _)): Data<(String, String)>, ack: AckSender| {
                let (counter, io) = (counter.clone(), io.clone());
                async move {
                    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                    // The in-memory adapter's broadcast is a future too; it must be awaited.
                    let _ = io.emit("chat message", &(content, n)).await;
                    let _ = ack.send(&());
                }
            },
        );
        std::future::ready(())
    });
    let app = axum::Router::new()
        .route("/readyz", axum::routing::get(|| async { "ready" }))
        .layer(layer);
    // TCP_NODELAY, as chorus and Node.js set it: small frames are not held back.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    axum::serve(listener, app).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_descriptor_limit();
    let o = cli.common.options();
    match cli.scenario {
        Scenario::All => all(&o).await,
        Scenario::Ramp => {
            let steps = ramp(o.system, o.nodes, &o).await?;
            println!("best: {:.0} deliveries/s", best(&steps));
            Ok(())
        }
        Scenario::Fanout(args) => {
            let cluster = Cluster::start(o.system, o.nodes, &o, &[]).await?;
            let params = Fanout {
                connections: args.connections,
                senders: args.senders,
                rate: args.rate,
                seconds: args.seconds,
                rooms: args.rooms,
            };
            let r = scenarios::fanout(&cluster.urls(), params).await?;
            println!("{}", fanout_line(o.system, o.nodes, &r));
            println!("{}", serde_json::to_string(&r)?);
            cluster.stop().await
        }
        Scenario::Connect {
            connections,
            steps,
            baseline,
            idle_seconds,
        } => {
            if steps.is_empty() && !baseline {
                return connect_memory(o.system, &o, connections).await.map(|_| ());
            }
            let steps = if steps.is_empty() {
                vec![connections]
            } else {
                steps
            };
            let idle = Duration::from_secs(idle_seconds as u64);
            let mut systems = vec![o.system];
            if baseline && o.system != System::Baseline {
                systems.push(System::Baseline);
            }
            let mut ramps = Vec::new();
            for system in systems {
                ramps.push((system, connect_ramp(system, &o, &steps, idle).await?));
            }
            print_connect_table(&ramps);
            write_connect_results(&ramps, o.quick)
        }
        Scenario::Flaky {
            clients,
            seconds,
            baseline,
        } => {
            let mut systems = vec![o.system];
            if baseline && o.system != System::Baseline {
                systems.push(System::Baseline);
            }
            let (clients, seconds) = if o.quick {
                (vec![50], 8.0)
            } else {
                (clients, seconds)
            };
            let mut runs = Vec::new();
            for &n in &clients {
                for &system in &systems {
                    // A server that gives up (closes the publisher, refuses first connects)
                    // is a result too: the others still run.
                    let run = flaky_run(system, &o, n, seconds).await.map_err(|e| {
                        println!("{:<9} flaky: {n:>6} clients: failed: {e:#}", system.name());
                        format!("{e:#}")
                    });
                    runs.push((system, n, run));
                }
            }
            print_flaky_table(&runs);
            write_flaky_results(&runs, o.quick)?;
            ensure!(
                runs.iter()
                    .all(|(system, _, run)| run.is_ok() || *system != System::Chorus),
                "a chorus run failed"
            );
            Ok(())
        }
        Scenario::Store { rooms } => store_rate(o.system, &o, rooms).await.map(|_| ()),
        Scenario::RawInserts => raw_insert_rate(&o).await.map(|_| ()),
        Scenario::Replay { messages } => {
            let (stream, database) = replay(o.system, &o, messages).await?;
            println!(
                "{}",
                json!({ "scenario": "replay", "system": o.system.name(), "messages": messages, "stream_msgs_per_s": stream, "database_msgs_per_s": database })
            );
            Ok(())
        }
        Scenario::Flood => flood(&o).await,
        Scenario::Cpu { seconds } => cpu_per_delivery(&o, seconds).await,
        Scenario::TrivialServer => trivial_server().await,
        Scenario::FloorServer => floor::serve().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn options_go_before_or_after_the_scenario() {
        for args in [
            &["chorus-bench", "all", "--quick"][..],
            &["chorus-bench", "--quick", "all"],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert!(matches!(cli.scenario, Scenario::All));
            assert!(cli.common.quick);
        }
        let cli = Cli::try_parse_from([
            "chorus-bench",
            "fanout",
            "--connections",
            "30",
            "--senders",
            "3",
            "--rate",
            "12.5",
            "--system",
            "baseline",
            "--server-cpu",
            "none",
        ])
        .expect("parses");
        let Scenario::Fanout(args) = cli.scenario else {
            panic!("not fanout: {:?}", cli.scenario);
        };
        assert_eq!((args.connections, args.senders, args.rate), (30, 3, 12.5));
        let o = cli.common.options();
        assert_eq!(o.system, System::Baseline);
        assert_eq!(o.services.server_cpu, None);
        assert_eq!(o.nodes, 3);
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["chorus-bench", "ramp", "--nodes", "0"][..],
            &["chorus-bench", "connect", "--connections", "-1"],
            &["chorus-bench", "all", "--server-cpu", "first"],
            &["chorus-bench", "all", "--system", "other"],
            &["chorus-bench", "nothing"],
            &["chorus-bench"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} parsed");
        }
    }
}
