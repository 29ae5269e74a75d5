//! Redis for tests: the shared local server (each test on its own key prefix), and private
//! servers a test can kill and restart.

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
