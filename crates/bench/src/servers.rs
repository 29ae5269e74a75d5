//! The servers a benchmark runs against, as child processes: chorus nodes (the binary next to
//! this one), the Node.js baseline (`bench/baseline/server.mjs`), and a trivial in-memory
//! Socket.IO server that measures the load generator's own ceiling, and the floor: a websocket
//! broadcaster with no Socket.IO library.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use chorus_testkit::{TestDb, fixture::repo_root, free_port, try_get};
use tokio::process::{Child, Command};

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// chorus.
    Chorus,
    /// The tutorial's server on Node.js with the Redis adapter.
    Baseline,
    /// A trivial in-memory broadcaster (no storage): the generator's ceiling.
    Trivial,
    /// A websocket broadcaster with no Socket.IO library: what the kernel and framing cost.
    Floor,
}

impl System {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            System::Chorus => "chorus",
            System::Baseline => "baseline",
            System::Trivial => "trivial",
            System::Floor => "floor",
        }
    }
}

/// Where Postgres and Redis are.
#[derive(Debug, Clone)]
pub struct Services {
    /// A Postgres URL allowed to create databases (ends in `/postgres` or another database).
    pub pg_admin: String,
    /// The Redis URL.
    pub redis: String,
    /// The CPU the servers are pinned to (`taskset`), when there is more than one.
    pub server_cpu: Option<usize>,
}

/// A fresh database `chorus_bench_{pid}_{tag}` on the Postgres of `services`, for the bench to
/// drop when it is done with it.
pub async fn create_database(services: &Services, tag: &str) -> anyhow::Result<TestDb> {
    let name = format!("chorus_bench_{}_{tag}", std::process::id());
    TestDb::create(&services.pg_admin, &name)
        .await
        .with_context(|| format!("create database {name} through {}", services.pg_admin))
}

/// A server process, stopped when dropped (killed if `stop` was not called).
pub struct Server {
    child: Child,
    pub url: String,
    pub port: u16,
}

/// `program` under `taskset -c CPU` when a CPU is given and taskset exists.
fn pinned(program: &Path, cpu: Option<usize>) -> Command {
    match cpu {
        Some(cpu) if Path::new("/usr/bin/taskset").exists() => {
            let mut cmd = Command::new("/usr/bin/taskset");
            cmd.arg("-c").arg(cpu.to_string()).arg(program);
            cmd
        }
        _ => Command::new(program),
    }
}

impl Server {
    /// Starts one server of `system` on `db` with the Redis `prefix`, waiting until it answers.
    pub async fn start(
        system: System,
        services: &Services,
        db: Option<&TestDb>,
        prefix: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let port = free_port();
        let mut cmd = match system {
            System::Chorus => {
                let bin = std::env::current_exe()?.with_file_name("chorus");
                ensure!(
                    bin.exists(),
                    "{} not found: cargo build --release",
                    bin.display()
                );
                let mut cmd = pinned(&bin, services.server_cpu);
                cmd.env("HOST", "127.0.0.1")
                    .env("NODE_ID", format!("bench-{port}"))
                    .env("DATABASE_URL", &db.context("chorus needs a database")?.url)
                    .env("REDIS_URL", &services.redis)
                    .env("CHORUS__REDIS__PREFIX", prefix)
                    .env("CHORUS__LOG__LEVEL", "warn")
                    // The scenarios measure throughput: no sender is held to a chat's rate.
                    .env("CHORUS__LIMITS__MESSAGES_PER_SECOND", "1000000")
                    .env("CHORUS__LIMITS__MESSAGE_BURST", "1000000")
                    .env("CHORUS__LIMITS__ADDRESS_MESSAGES_PER_SECOND", "1000000")
                    .env("CHORUS__LIMITS__ADDRESS_MESSAGE_BURST", "1000000")
                    // Every simulated client comes from loopback.
                    .env("CHORUS__TRANSPORT__MAX_CONNECTIONS_PER_ADDRESS", "1000000");
                cmd
            }
            System::Baseline => {
                let dir = repo_root().join("bench/baseline");
                ensure!(
                    dir.join("node_modules/socket.io").exists(),
                    "bench/baseline/node_modules is missing: npm ci in bench/baseline"
                );
                let mut cmd = pinned(Path::new("node"), services.server_cpu);
                cmd.arg(dir.join("server.mjs"))
                    .current_dir(&dir)
                    .env(
                        "DATABASE_URL",
                        &db.context("the baseline needs a database")?.url,
                    )
                    .env("REDIS_URL", &services.redis)
                    .env("REDIS_KEY", prefix);
                cmd
            }
            System::Trivial => {
                let mut cmd = pinned(&std::env::current_exe()?, services.server_cpu);
                cmd.arg("trivial-server");
                cmd
            }
            System::Floor => {
                let mut cmd = pinned(&std::env::current_exe()?, services.server_cpu);
                cmd.arg("floor-server");
                cmd
            }
        };
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start the {} server", system.name()))?;
        let mut server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
        };
        let started = Instant::now();
        loop {
            if matches!(try_get(port, "/readyz").await, Some((200, _))) {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("the {} server exited with {status}", system.name());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the {} server did not start",
                system.name()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id (for its memory).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM, then wait (killed after 20 s).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg(pid.to_string()).status().await;
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Resident memory of a process, in bytes, from `/proc`.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/PID/status")?;
    Ok(kb * 1024)
}

/// CPU time (user + system) a process has used, in seconds, from `/proc`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}
