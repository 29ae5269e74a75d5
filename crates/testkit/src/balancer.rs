//! nginx or HAProxy in front of three nodes, with the shipped configuration in `deploy/` and
//! only the listening and node addresses put in.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::{
    fixture::{free_port, repo_root, wait_for},
    http::try_get,
};

/// Which load balancer.
#[derive(Debug, Clone, Copy)]
pub enum Lb {
    /// nginx with `deploy/nginx/chorus.conf` and `chorus-nodes.conf`.
    Nginx,
    /// HAProxy with `deploy/haproxy/haproxy.cfg`.
    Haproxy,
}

/// A load balancer process in front of the nodes; stopped when dropped.
pub struct Balancer {
    pub port: u16,
    child: Child,
    /// nginx's configuration and pid file; removed after the balancer stopped.
    _dir: TempDir,
}

impl Balancer {
    /// Starts `kind` with the shipped configuration, pointed at `node_ports`.
    pub async fn start(kind: Lb, node_ports: &[u16]) -> Balancer {
        let nodes: Vec<SocketAddr> = node_ports
            .iter()
            .map(|&p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        Self::start_at(kind, &nodes).await
    }

    /// Like [`Balancer::start`], for nodes at `nodes` (in test hosts, say); it listens on
    /// loopback.
    pub async fn start_at(kind: Lb, nodes: &[SocketAddr]) -> Balancer {
        Self::start_for(kind, nodes, 0).await
    }

    /// Like [`Balancer::start_at`], sized for `clients` connections at once: beyond the
    /// default's 2 000, nginx gets a second worker (the kernel spreads accepted connections
    /// with `reuseport`), descriptors for two per connection (client and node side) with room
    /// to spare, and a listen queue for a reconnect storm.
    pub async fn start_for(kind: Lb, nodes: &[SocketAddr], clients: usize) -> Balancer {
        assert_eq!(nodes.len(), 3, "the shipped configs name three nodes");
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("chorus_lb")
            .tempdir()
            .expect("balancer dir");
        let path = dir.path();
        let deploy = repo_root().join("deploy");
        let mut cmd = match kind {
            Lb::Nginx => {
                // The shipped files with only the listening address and node addresses put in.
                let site = std::fs::read_to_string(deploy.join("nginx/chorus.conf"))
                    .expect("deploy/nginx/chorus.conf");
                assert!(
                    site.contains("\n    listen 80;\n"),
                    "chorus.conf listens on 80"
                );
                // Two descriptors a client (its side and the node's), and room for the
                // connections that reconnects leave closing: a worker out of connections stops
                // accepting, and the listen queue behind it overflows.
                let (workers, per_worker) = match clients {
                    0..=2000 => (1, 4096),
                    _ => (2, clients * 3 / 2 + 1024),
                };
                let reuseport = if workers > 1 {
                    " reuseport backlog=4096"
                } else {
                    ""
                };
                let site = site.replace(
                    "\n    listen 80;\n",
                    &format!("\n    listen 127.0.0.1:{port}{reuseport};\n"),
                );
                let mut upstreams = std::fs::read_to_string(deploy.join("nginx/chorus-nodes.conf"))
                    .expect("deploy/nginx/chorus-nodes.conf");
                for (i, node) in nodes.iter().enumerate() {
                    let name = format!("chorus{}:3000", i + 1);
                    assert!(upstreams.contains(&name), "chorus-nodes.conf names {name}");
                    upstreams = upstreams.replace(&name, &node.to_string());
                }
                let main = format!(
                    "worker_processes {workers};\npid {dir}/nginx.pid;\n\
                     worker_rlimit_nofile {files};\n\
                     events {{ worker_connections {per_worker}; }}\n\
                     http {{\n    access_log off;\n    include chorus.conf;\n}}\n",
                    dir = path.display(),
                    files = per_worker + 64,
                );
                std::fs::write(path.join("chorus.conf"), site).expect("write chorus.conf");
                std::fs::write(path.join("chorus-nodes.conf"), upstreams).expect("write nodes");
                std::fs::write(path.join("nginx.conf"), main).expect("write nginx.conf");
                let mut cmd = Command::new("nginx");
                cmd.arg("-p")
                    .arg(format!("{}/", path.display()))
                    .arg("-c")
                    .arg(path.join("nginx.conf"))
                    .args(["-e", "stderr", "-g", "daemon off;"]);
                cmd
            }
            Lb::Haproxy => {
                let mut cmd = Command::new("haproxy");
                cmd.arg("-db")
                    .arg("-f")
                    .arg(deploy.join("haproxy/haproxy.cfg"))
                    .env("CHORUS_LISTEN", format!("127.0.0.1:{port}"));
                for (i, node) in nodes.iter().enumerate() {
                    cmd.env(format!("CHORUS_NODE{}", i + 1), node.to_string());
                }
                cmd
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{kind:?} could not start ({e}); scripts/test installs it"));
        let balancer = Balancer {
            port,
            child,
            _dir: dir,
        };
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
        // so nothing outlives the test holding its output open. Drop cannot await, so it polls
        // for the exit, up to 5 s.
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
    }
}
