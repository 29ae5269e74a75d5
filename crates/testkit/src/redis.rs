//! Redis for tests: the shared local server (each test on its own key prefix), private servers
//! a test can kill and restart, and private Redis Clusters a test can fail over.

use std::{process::Stdio, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::fixture::{free_port, wait_for};

/// The local Redis that `scripts/test` starts.
pub const REDIS: &str = "redis://127.0.0.1:6379";

/// Fails the test with a clear message when Redis is not there.
pub async fn require_redis(url: &str) {
    let addr = url.trim_start_matches("redis://");
    let mut stream = TcpStream::connect(addr).await.unwrap_or_else(|e| {
        panic!("Redis is not reachable at {url} ({e}); scripts/test starts it")
    });
    stream.write_all(b"PING\r\n").await.expect("write to redis");
}

/// A Redis server of this test's own, on a free port, keeping nothing on disk; killed when
/// dropped.
pub struct PrivateRedis {
    pub port: u16,
    /// The address it listens on (loopback unless started with [`PrivateRedis::start_at`]).
    pub bind: std::net::IpAddr,
    child: tokio::process::Child,
}

impl PrivateRedis {
    /// Starts one on `port` (a port an earlier one had, to restart it) and waits until it listens.
    pub async fn start_on(port: u16) -> PrivateRedis {
        Self::start_at(std::net::Ipv4Addr::LOCALHOST.into(), port).await
    }

    /// Starts one on `bind:port` and waits until it listens.
    pub async fn start_at(bind: std::net::IpAddr, port: u16) -> PrivateRedis {
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                &bind.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                // A test bridge's address is not loopback; nothing but the test's hosts is on it.
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        let redis = PrivateRedis { port, bind, child };
        let addr = std::net::SocketAddr::new(bind, port);
        wait_for(
            Duration::from_secs(10),
            "private redis to listen",
            || async move { TcpStream::connect(addr).await.is_ok() },
        )
        .await;
        redis
    }

    /// Starts one on a free port.
    pub async fn start() -> PrivateRedis {
        Self::start_on(free_port()).await
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.bind, self.port)
    }

    /// SIGKILL, as a crash would; returns the port, to start another on it.
    pub async fn kill(mut self) -> u16 {
        self.child.kill().await.expect("kill redis");
        self.port
    }
}

/// A Redis Cluster of this test's own on loopback: `masters` masters with one replica each,
/// created by `redis-cli --cluster create`, keeping nothing on disk; every server is killed
/// when it is dropped.
pub struct PrivateRedisCluster {
    /// Each server's client port, masters first as created (a failover swaps the roles).
    pub ports: Vec<u16>,
    _servers: Vec<tokio::process::Child>,
    /// The servers' cluster state files (`nodes-{port}.conf`).
    _dir: tempfile::TempDir,
}

impl PrivateRedisCluster {
    /// Starts `2 * masters` servers, joins them into a cluster with one replica per master, and
    /// waits until every server reports the cluster whole and every replica is in sync.
    pub async fn start(masters: usize) -> PrivateRedisCluster {
        let dir = tempfile::tempdir().expect("a directory for the cluster's state files");
        // A port picked free can be taken by another test before a server binds it: the
        // servers start again on other ports, a few times.
        let mut attempt = 0;
        let (ports, servers) = loop {
            attempt += 1;
            match Self::spawn(masters * 2, dir.path()).await {
                Ok(started) => break started,
                Err(why) if attempt < 3 => eprintln!("cluster servers not up ({why}); again"),
                Err(why) => panic!("the cluster's servers did not start: {why}"),
            }
        };
        let mut create = tokio::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli is installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = PrivateRedisCluster {
            ports,
            _servers: servers,
            _dir: dir,
        };
        cluster.wait_whole().await;
        cluster
    }

    /// Starts `n` cluster-enabled servers on ports free at once (each a client port and a bus
    /// port, none picked twice) and waits until each answers as itself: the server on its port
    /// has its process id. `Err` when one exited (its port was taken) or never answered.
    async fn spawn(
        n: usize,
        dir: &std::path::Path,
    ) -> Result<(Vec<u16>, Vec<tokio::process::Child>), String> {
        // Held together while they are picked, so no two are the same.
        let held: Vec<std::net::TcpListener> = (0..n * 2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
            .collect();
        let picked: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().expect("local addr").port())
            .collect();
        drop(held);
        let (ports, buses) = picked.split_at(n);
        let mut servers = Vec::with_capacity(n);
        for (&port, &bus) in ports.iter().zip(buses) {
            let child = tokio::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                // The cluster bus on a port of its own (the default, port + 10000, may be taken).
                .args(["--cluster-port", &bus.to_string()])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir)
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server is installed");
            servers.push(child);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for (server, &port) in servers.iter_mut().zip(ports) {
            let pid = server.id().unwrap_or_default();
            loop {
                if let Ok(Some(status)) = server.try_wait() {
                    return Err(format!("the server for port {port} exited ({status})"));
                }
                let info = cli(port, &["INFO", "server"]).await;
                let ours = format!("process_id:{pid}");
                if info.lines().any(|line| line.trim() == ours) {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!("no answer from the server on port {port}"));
                }
                tokio::time::sleep(crate::fixture::POLL).await;
            }
        }
        Ok((ports.to_vec(), servers))
    }

    /// `redis-cluster://` naming every server, as a user lists a cluster's nodes.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.ports[0]);
        for (i, port) in self.ports.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{port}"));
        }
        url
    }

    /// The port of the master that serves `key`'s slot (a channel's slot for sharded pub/sub).
    pub async fn master_of(&self, key: &str) -> u16 {
        let slot: u16 = cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .await
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number");
        for &port in &self.ports {
            if role(port).await == "master" && owns(port, slot).await {
                return port;
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// The ports of the servers that are masters now.
    pub async fn masters(&self) -> Vec<u16> {
        let mut masters = Vec::new();
        for &port in &self.ports {
            if role(port).await == "master" {
                masters.push(port);
            }
        }
        masters
    }

    /// A manual failover of the master on `port`: `CLUSTER FAILOVER` on its replica, which
    /// waits for the master to hand over. Returns once the replica is the master and every
    /// server reports the cluster whole again; the former master is then its replica.
    pub async fn fail_over(&self, port: u16) -> u16 {
        let id = cli(port, &["CLUSTER", "MYID"]).await.trim().to_owned();
        let mut replica = None;
        for &other in &self.ports {
            let info = cli(other, &["INFO", "replication"]).await;
            if role(other).await == "slave" && master_port(&info) == Some(port) {
                replica = Some(other);
            }
        }
        let replica =
            replica.unwrap_or_else(|| panic!("the master on {port} ({id}) has no replica"));
        let answer = cli(replica, &["CLUSTER", "FAILOVER"]).await;
        assert_eq!(answer.trim(), "OK", "CLUSTER FAILOVER on {replica}");
        wait_for(
            Duration::from_secs(20),
            "the replica to take over as master",
            || async move { role(replica).await == "master" && role(port).await == "slave" },
        )
        .await;
        self.wait_whole().await;
        replica
    }

    async fn wait_whole(&self) {
        for &port in &self.ports {
            wait_for(
                Duration::from_secs(30),
                "every cluster server to report the cluster whole and in sync",
                || async move {
                    let state = cli(port, &["CLUSTER", "INFO"]).await;
                    if !state.contains("cluster_state:ok") {
                        return false;
                    }
                    let info = cli(port, &["INFO", "replication"]).await;
                    !info.contains("role:slave") || info.contains("master_link_status:up")
                },
            )
            .await;
        }
    }
}

/// One `redis-cli` command against the server on `port`; its raw output.
async fn cli(port: u16, args: &[&str]) -> String {
    let out = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("redis-cli is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `master` or `slave`, from `ROLE`.
async fn role(port: u16) -> String {
    cli(port, &["ROLE"])
        .await
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The master port a replica's `INFO replication` names.
fn master_port(info: &str) -> Option<u16> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("master_port:"))
        .and_then(|port| port.parse().ok())
}

/// Whether the server on `port` serves `slot`, from the `myself` line of its `CLUSTER NODES`
/// (slot ranges from the ninth field on: `start-end` or one slot).
async fn owns(port: u16, slot: u16) -> bool {
    let nodes = cli(port, &["CLUSTER", "NODES"]).await;
    let Some(myself) = nodes.lines().find(|line| line.contains("myself")) else {
        return false;
    };
    myself.split_whitespace().skip(8).any(|range| {
        let (start, end) = range.split_once('-').unwrap_or((range, range));
        matches!((start.parse::<u16>(), end.parse::<u16>()), (Ok(s), Ok(e)) if s <= slot && slot <= e)
    })
}
