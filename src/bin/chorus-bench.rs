//! chorus-bench: load scenarios against real chorus nodes, printing a table and a JSON line.
//!
//! `chorus-bench replay` measures connection state recovery: one client that missed N messages
//! reconnects and receives them, from the Redis stream and from the database. It starts its own
//! node (the `chorus` binary next to this one) on a fresh Postgres database and Redis prefix.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use chorus::client::Client;
use futures_util::{StreamExt, stream::FuturesUnordered};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};

const USAGE: &str =
    "usage: chorus-bench replay [--messages N] [--runs R] [--pg ADMIN_URL] [--redis URL]

  replay   one client recovers N missed messages (default 100000), R times (default 3) from the
           Redis stream and R times from the database; prints messages/s.
  --pg     a Postgres URL with the right to create databases (default
           postgres://postgres@127.0.0.1:5432/postgres)
  --redis  default redis://127.0.0.1:6379";

/// What the command line asks for.
struct Options {
    messages: i64,
    runs: usize,
    pg_admin: String,
    redis: String,
}

fn options() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("replay") => {}
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            std::process::exit(0);
        }
        Some(other) => bail!("unknown scenario {other:?}\n{USAGE}"),
    }
    let mut options = Options {
        messages: 100_000,
        runs: 3,
        pg_admin: "postgres://postgres@127.0.0.1:5432/postgres".into(),
        redis: "redis://127.0.0.1:6379".into(),
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--messages" => options.messages = value()?.parse().context("--messages")?,
            "--runs" => options.runs = value()?.parse().context("--runs")?,
            "--pg" => options.pg_admin = value()?,
            "--redis" => options.redis = value()?,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(
        options.messages > 0 && options.runs > 0,
        "--messages and --runs must be positive"
    );
    Ok(options)
}

/// A chorus node started by the bench, stopped (SIGTERM, then kill) when dropped.
struct Server {
    child: Child,
    url: String,
    port: u16,
}

impl Server {
    async fn start(database_url: &str, redis: &str, prefix: &str) -> anyhow::Result<Server> {
        let exe = std::env::current_exe()?;
        let bin: PathBuf = exe.with_file_name("chorus");
        ensure!(
            bin.exists(),
            "{} not found: build it with `cargo build --release`",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&bin)
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("NODE_ID", "bench")
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis)
            .env("CHAT__REDIS__PREFIX", prefix)
            .env("CHAT__LOG__LEVEL", "warn")
            // Recoveries must come from the stream or the database, not the node's memory.
            .env("CHAT__FEED__RING_CAPACITY", "64")
            .env("CHAT__STREAM__MAX_LEN", "10000000")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
        };
        let started = Instant::now();
        while metrics(server.port).await.is_err() {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the node did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg(pid.to_string()).status().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }
}

/// The node's `/metrics` text.
async fn metrics(port: u16) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// Replays started from `source` so far.
async fn replays(port: u16, source: &str) -> anyhow::Result<f64> {
    let text = metrics(port).await?;
    let label = format!("source=\"{source}\"");
    text.lines()
        .find(|l| l.starts_with("chorus_replays_total{") && l.contains(&label))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .context("chorus_replays_total in /metrics")
}

/// Sends `n` messages through `url` with many in flight; returns (first, last) offset and the
/// acked messages per second.
async fn seed(url: &str, n: i64) -> anyhow::Result<(i64, i64, f64)> {
    // A watcher learns the offsets the messages got.
    let mut watcher = Client::connect(url, None).await?;
    let senders = 4;
    let window = 128; // per sender, below the server's in-flight limit
    let mut clients = Vec::new();
    for _ in 0..senders {
        clients.push(Client::connect(url, None).await?);
    }
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0i64;
    let mut acked = 0i64;
    while acked < n {
        while next < n && in_flight.len() < senders * window {
            let client = &clients[usize::try_from(next).unwrap_or(0) % senders];
            let content = format!("bench message {next} {}", "x".repeat(40));
            let key = format!("bench-{next}");
            in_flight.push(client.emit_with_ack(
                "chat message",
                vec![json!(content), json!(key)],
                Duration::from_secs(30),
            ));
            next += 1;
        }
        let ack = in_flight.next().await.context("an ack")??;
        ensure!(
            ack.first().is_none_or(|a| a.get("error").is_none()),
            "rejected: {ack:?}"
        );
        acked += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(in_flight);
    let (mut first, mut last) = (None, 0);
    for _ in 0..n {
        let (_, offset) = watcher.next_chat_message(Duration::from_secs(30)).await?;
        first.get_or_insert(offset);
        last = offset;
    }
    for client in clients {
        client.close().await;
    }
    watcher.close().await;
    Ok((first.context("no message")?, last, rate))
}

/// One client that saw `after` reconnects and receives through `last`; messages per second.
async fn recover(url: &str, after: i64, last: i64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut client = Client::connect(url, Some(json!({ "serverOffset": after }))).await?;
    for expected in after + 1..=last {
        let (_, offset) = client.next_chat_message(Duration::from_secs(30)).await?;
        ensure!(
            offset == expected,
            "got offset {offset}, expected {expected}"
        );
    }
    let rate = (last - after) as f64 / started.elapsed().as_secs_f64();
    client.close().await;
    Ok(rate)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `runs` recoveries on `server` and checks each started from `source`.
async fn recoveries(
    server: &Server,
    source: &str,
    after: i64,
    last: i64,
    runs: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut rates = Vec::with_capacity(runs);
    for _ in 0..runs {
        let before = replays(server.port, source).await?;
        rates.push(recover(&server.url, after, last).await?);
        let now = replays(server.port, source).await?;
        ensure!(
            now == before + 1.0,
            "the recovery did not start from the {source}"
        );
    }
    Ok(rates)
}

async fn replay(options: &Options) -> anyhow::Result<()> {
    let db = format!("chorus_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&options.pg_admin)
        .await
        .with_context(|| format!("connect to {}", options.pg_admin))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("drop database if exists {db}")))
        .execute(&mut admin)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {db}")))
        .execute(&mut admin)
        .await?;
    let (base, _) = options
        .pg_admin
        .rsplit_once('/')
        .context("--pg must end with /DATABASE")?;
    let database_url = format!("{base}/{db}");

    let result = async {
        // Seed through a node so the messages are in the stream too, then recover from it.
        let server = Server::start(&database_url, &options.redis, &db).await?;
        // One more than recovered: a client with offset 0 is a new client (it gets the newest
        // history, not everything), so the recovering client says it saw the first message.
        let (first, last, store_rate) = seed(&server.url, options.messages + 1).await?;
        let stream = recoveries(&server, "stream", first, last, options.runs).await?;
        server.stop().await;
        // A node on another Redis prefix has an empty stream: the database serves.
        let server = Server::start(&database_url, &options.redis, &format!("{db}_empty")).await?;
        let database = recoveries(&server, "database", first, last, options.runs).await?;
        server.stop().await;
        anyhow::Ok((store_rate, stream, database))
    }
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(&mut admin)
    .await?;
    let (store_rate, stream, database) = result?;

    let n = options.messages;
    println!(
        "replay: one client recovers {n} missed messages ({} runs each)",
        options.runs
    );
    println!(
        "{:<10} {:>14} {:>14} {:>14}",
        "source", "median msg/s", "min msg/s", "max msg/s"
    );
    for (name, rates) in [("stream", &stream), ("database", &database)] {
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        println!(
            "{name:<10} {:>14.0} {min:>14.0} {max:>14.0}",
            median(rates.clone())
        );
    }
    println!("(seeding stored {store_rate:.0} msg/s with 4 senders x 128 in flight)");
    println!(
        "{}",
        json!({
            "scenario": "replay",
            "messages": n,
            "runs": options.runs,
            "stream_msgs_per_s": stream,
            "database_msgs_per_s": database,
            "stream_median": median(stream.clone()),
            "database_median": median(database.clone()),
            "seed_stored_msgs_per_s": store_rate,
        })
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    replay(&options).await
}
