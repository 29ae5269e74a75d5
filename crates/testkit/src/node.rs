//! Nodes running inside the test process on port 0, and the one way tests give a node its
//! settings ([`TestSettings`]), which process nodes take too.

use std::{net::SocketAddr, time::Duration};

use chorus::config::Settings;
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{db::TestDb, metrics::metric, redis::require_redis};

/// A test node's settings as the environment variables a deployment would set (`PORT`,
/// `DATABASE_URL`, `CHORUS__SECTION__KEY`, ...), so one list serves a node in process (parsed
/// by [`Settings::load_from`]) and a node as a process (its environment).
///
/// ```ignore
/// let settings = TestSettings::new(&db)
///     .redis(REDIS, &unique("t"))
///     .set("CHORUS__LIMITS__MAX_IN_FLIGHT", "4");
/// let node = Node::start(settings.build()).await;
/// ```
#[derive(Debug, Clone)]
pub struct TestSettings {
    vars: Vec<(String, String)>,
}

impl TestSettings {
    /// Loopback, port 0, the given database (a [`TestDb`], a `TestSqlite` or a URL), and
    /// timeouts short enough for tests.
    pub fn new(database: impl AsRef<str>) -> TestSettings {
        TestSettings { vars: Vec::new() }
            .set("HOST", "127.0.0.1")
            .set("PORT", "0")
            .set("DATABASE_URL", database.as_ref())
            .set("CHORUS__STORE__TIMEOUT_MS", "2000")
            .set("CHORUS__SHUTDOWN__DRAIN_TIMEOUT_MS", "3000")
            // Tests send as fast as they can; the rate limit's own tests set it low.
            .set("CHORUS__LIMITS__MESSAGES_PER_SECOND", "1000000")
            .set("CHORUS__LIMITS__MESSAGE_BURST", "1000000")
            .set("CHORUS__LIMITS__ADDRESS_MESSAGES_PER_SECOND", "1000000")
            .set("CHORUS__LIMITS__ADDRESS_MESSAGE_BURST", "1000000")
    }

    /// Cluster mode on the Redis at `url`, under the key prefix `prefix`.
    pub fn redis(self, url: &str, prefix: &str) -> TestSettings {
        self.set("REDIS_URL", url)
            .set("CHORUS__REDIS__PREFIX", prefix)
    }

    /// Sets the environment variable `key` (`CHORUS__SECTION__KEY`, or `PORT` and the like),
    /// replacing an earlier value.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> TestSettings {
        let value = value.into();
        match self.vars.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.vars.push((key.to_owned(), value)),
        }
        self
    }

    /// Sets `key` unless it is set already (a default of a kind of node).
    pub fn set_if_unset(self, key: &str, value: impl Into<String>) -> TestSettings {
        match self.get(key) {
            Some(_) => self,
            None => self.set(key, value),
        }
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The environment variables, in the order they were first set.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The settings a node in this process starts with; fails the test on a bad value.
    pub fn build(&self) -> Settings {
        Settings::load_from(None, self.vars.iter().cloned()).expect("test settings")
    }
}

/// How long [`Node::stop`] waits for the node to drain and stop.
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// A node running in this process.
pub struct Node {
    pub url: String,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Node {
    /// Builds a node from `settings` and runs it until [`Node::stop`] or until it is dropped.
    pub async fn start(settings: Settings) -> Node {
        // Node logs go to the test's output, shown when it fails.
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,chorus=info".into());
        // Only the first node of the test binary installs the subscriber; the rest find it set.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
        let app = chorus::app::build(settings).await.expect("node starts");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            // Either a stop or the handle being dropped ends the node.
            let _ = stopped.await;
        }));
        Node {
            url: format!("http://{addr}"),
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful stop, waiting until the node is down.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            // The node may have stopped by itself; then there is nobody to tell.
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STOP_LIMIT, task)
                .await
                .unwrap_or_else(|_| panic!("node stops within {STOP_LIMIT:?}"))
                .expect("node task");
        }
    }

    /// The node's `/metrics` value of `name` (see [`metric`]).
    pub async fn metric(&self, name: &str) -> f64 {
        metric(self.addr.port(), name).await
    }
}

/// Stops every node gracefully.
pub async fn stop_all(nodes: Vec<Node>) {
    futures_util::future::join_all(nodes.into_iter().map(Node::stop)).await;
}

/// Starts `n` nodes on one database and one Redis prefix.
pub async fn spawn_cluster(n: usize, db: &TestDb, redis_url: &str, prefix: &str) -> Vec<Node> {
    require_redis(redis_url).await;
    let settings = TestSettings::new(db).redis(redis_url, prefix);
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        nodes.push(Node::start(settings.build()).await);
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_value_replaces_an_earlier_one() {
        let settings = TestSettings::new("sqlite::memory:")
            .set("CHORUS__LIMITS__MAX_IN_FLIGHT", "4")
            .set("CHORUS__LIMITS__MAX_IN_FLIGHT", "8")
            .redis("redis://127.0.0.1:1", "p")
            .set_if_unset("CHORUS__LIMITS__MAX_IN_FLIGHT", "16")
            .set_if_unset("CHORUS__CHORUS__HISTORY", "5");
        assert_eq!(settings.get("CHORUS__CHORUS__HISTORY"), Some("5"));
        assert_eq!(settings.get("CHORUS__LIMITS__MAX_IN_FLIGHT"), Some("8"));
        assert_eq!(
            settings
                .vars()
                .filter(|(k, _)| *k == "CHORUS__LIMITS__MAX_IN_FLIGHT")
                .count(),
            1
        );
        let built = settings.build();
        assert_eq!(built.limits.max_in_flight, 8);
        assert_eq!(built.redis_url.as_deref(), Some("redis://127.0.0.1:1"));
        assert_eq!(built.database_url, "sqlite::memory:");
    }
}
