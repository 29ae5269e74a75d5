//! A steady chat load of tutorial clients (`tests/js/steady.mjs`, the official client with its
//! default transports) that runs through a balancer until the test stops it.

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::mpsc,
    task::JoinHandle,
};

use crate::js::js_dir;

/// How long the clients have to connect, upgrade and synchronize.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long the scenario's own checks may take after the senders stop.
const FINISH_LIMIT: Duration = Duration::from_secs(180);

/// Local addresses the clients connect from, so a balancer that routes by source spreads them.
pub fn sources() -> Vec<String> {
    (2..14).map(|i| format!("127.0.0.{i}")).collect()
}

/// `tests/js/steady.mjs` running against one URL; see that file for the protocol.
pub struct SteadyLoad {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl SteadyLoad {
    /// Starts the load with clients spread over `sources` (local addresses).
    pub fn start(url: &str, sources: &[String]) -> SteadyLoad {
        Self::start_with(url, sources, &[])
    }

    /// Like [`SteadyLoad::start`], with more of `steady.mjs`'s settings (`CHORUS_...` variables).
    pub fn start_with(url: &str, sources: &[String], env: &[(&str, &str)]) -> SteadyLoad {
        let mut child = Command::new("node")
            .arg(js_dir().join("steady.mjs"))
            .envs(env.iter().copied())
            .env("CHORUS_URLS", url)
            .env("CHORUS_SOURCES", sources.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::unbounded_channel();
        let mut readers = Vec::new();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, tx) in [
            (
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                Some(tx),
            ),
            (Box::new(stderr), None),
        ] {
            let output = output.clone();
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    output.lock().expect("output lock").push(line.clone());
                    if let Some(tx) = &tx {
                        // Nobody reads lines after `ready`; the output keeps them anyway.
                        let _ = tx.send(line);
                    }
                }
            }));
        }
        SteadyLoad {
            stdin: child.stdin.take(),
            child,
            lines,
            output,
            readers,
        }
    }

    fn dump(&self) -> String {
        self.output.lock().expect("output lock").join("\n")
    }

    /// Starts a new measurement phase named `name` (delivery latencies are reported by phase).
    pub async fn mark(&mut self, name: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            stdin
                .write_all(format!("mark {name}\n").as_bytes())
                .await
                .expect("write to steady.mjs");
        }
    }

    /// Waits for the `READY` line: every client connected, upgraded and synchronized.
    pub async fn ready(&mut self) {
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if line.starts_with("READY ") {
                    return true;
                }
            }
            false
        };
        let ok = tokio::time::timeout(READY_LIMIT, wait).await;
        assert!(
            matches!(ok, Ok(true)),
            "steady.mjs did not get ready:\n{}",
            self.dump()
        );
    }

    /// Stops the senders, waits for the scenario's own checks, and returns its `RESULT`.
    pub async fn finish(mut self) -> Value {
        if let Some(mut stdin) = self.stdin.take() {
            // A scenario that already exited shows in its status below.
            let _ = stdin.write_all(b"stop\n").await;
        }
        let status = tokio::time::timeout(FINISH_LIMIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("steady.mjs did not finish:\n{}", self.dump()))
            .expect("wait for node");
        // The readers end at the end of the output.
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
        }
        let out = self.dump();
        println!("--- steady.mjs ---\n{out}");
        assert!(status.success(), "steady.mjs failed:\n{out}");
        let result = out
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .expect("a RESULT line");
        serde_json::from_str(result).expect("RESULT is JSON")
    }
}
