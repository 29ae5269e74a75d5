//! The deployment topology as processes, as the under-load tests use it: three chorus nodes
//! (the test build's binary) behind nginx or HAProxy with the files in `deploy/`, and a steady
//! Node.js load through the balancer, whose results [`Loaded::finish`] checks.

use chorus_testkit::{
    Balancer, Lb, NodeSetup, ProcNode, SteadyLoad, TestDb, TestSettings, sources, start_nodes,
    unique,
};
use serde_json::Value;

/// Settings of process nodes on `database` and the Redis at `redis_url`, under a fresh prefix.
pub fn lb_settings(database: impl AsRef<str>, redis_url: &str) -> TestSettings {
    TestSettings::new(database).redis(redis_url, &unique("chorus_lb"))
}

/// Process nodes of the test build's `chorus` with `settings`.
pub fn setup(settings: TestSettings) -> NodeSetup {
    NodeSetup::new(env!("CARGO_BIN_EXE_chorus"), settings)
}

/// Three nodes behind a balancer with the steady load running through it.
pub struct Loaded {
    pub db: TestDb,
    pub nodes: Vec<ProcNode>,
    /// Kept for the test's length; stopped on drop.
    _balancer: Balancer,
    pub load: Option<SteadyLoad>,
    /// Clients connected to nodes that went down (each must reconnect at least once).
    pub moved: i64,
}

impl Loaded {
    /// Starts the nodes, the balancer and the load, and checks the clients spread over nodes.
    pub async fn start(lb: Lb, db: TestDb, setup: &NodeSetup) -> Loaded {
        let nodes = start_nodes(setup).await;
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let balancer = Balancer::start(lb, &ports).await;
        let mut load = SteadyLoad::start(&balancer.url(), &sources());
        load.ready().await;
        let loaded = Loaded {
            db,
            nodes,
            _balancer: balancer,
            load: Some(load),
            moved: 0,
        };
        let spread = loaded.connections().await;
        println!("{lb:?}: connections per node at the start {spread:?}");
        assert_eq!(
            spread.iter().sum::<i64>(),
            sources().len() as i64,
            "every client is connected once"
        );
        assert!(
            spread.iter().filter(|&&c| c > 0).count() >= 2,
            "the balancer put every client on one node: {spread:?}"
        );
        loaded
    }

    /// Each node's open connections.
    pub async fn connections(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            out.push(node.connections().await);
        }
        out
    }

    /// Sum of a metric over the nodes.
    pub async fn metric_sum(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for node in &self.nodes {
            sum += node.metric(name).await;
        }
        sum
    }

    /// Waits until `n` more messages are stored: the load is running.
    pub async fn progress(&self, n: i64) {
        self.db.wait_stored(self.db.count().await + n).await;
    }

    /// Drains node `i` (SIGTERM), requiring a clean exit; counts its clients as moved.
    pub async fn drain(&mut self, i: usize) {
        self.moved += self.nodes[i].connections().await;
        let status = self.nodes[i].drain().await;
        assert!(
            status.success(),
            "{} exited with {status} on SIGTERM",
            self.nodes[i].id
        );
    }

    /// Kills node `i` (SIGKILL); counts its clients as moved.
    pub async fn kill(&mut self, i: usize) {
        self.moved += self.nodes[i].connections().await;
        self.nodes[i].kill().await;
    }

    /// Starts a latency phase in the load's report.
    pub async fn mark(&mut self, name: &str) {
        self.load.as_mut().expect("the load runs").mark(name).await;
    }

    /// Stops the load and checks what it and the database say: every send acked, every
    /// message stored once and seen by every client once, in order; prints the counts.
    pub async fn finish(mut self, label: &str) -> Value {
        let result = self.load.take().expect("the load runs").finish().await;
        let (rows, distinct): (i64, i64) = sqlx::query_as(
            "select count(*), count(distinct (client_offset, content)) from messages",
        )
        .fetch_one(&mut self.db.connect().await)
        .await
        .expect("count rows");
        println!(
            "{label}: sent={} acked={} stored={rows} clients={} each_saw={} \
             reconnects={} retries={} lost={} duplicated={} out_of_order={} gaps={} latency={}",
            result["sent"],
            result["acked"],
            result["clients"],
            result["stored"],
            result["reconnects"],
            result["retries"],
            result["lost"],
            result["duplicated"],
            result["outOfOrder"],
            result["gaps"],
            result["latency_ms"],
        );
        // steady.mjs asserted lost = duplicated = out of order = 0 for every client; the
        // database must agree: each message once, as many rows as distinct messages seen.
        assert_eq!(
            rows, distinct,
            "a message (client offset and content) was stored twice"
        );
        assert_eq!(
            result["stored"].as_i64().map(|n| n + 1),
            Some(rows),
            "rows in the database against messages the clients saw (plus the baseline)"
        );
        assert_eq!(result["sent"], result["acked"], "every send was acked");
        for key in ["lost", "duplicated", "outOfOrder", "gaps"] {
            assert_eq!(result[key].as_i64(), Some(0), "{key}");
        }
        assert!(
            result["reconnects"].as_i64().unwrap_or(0) >= self.moved,
            "{} clients were on nodes that went down, but only {} reconnects",
            self.moved,
            result["reconnects"]
        );
        for node in &mut self.nodes {
            assert!(!node.crashed(), "{} crashed", node.id);
            assert_eq!(node.panics(), 0, "{} panicked (its output above)", node.id);
        }
        result
    }
}
