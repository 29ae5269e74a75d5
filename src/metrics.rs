//! The node's metrics: counters, a gauge and latency histograms in a `prometheus-client`
//! registry, every sample labelled with the node id, rendered as OpenMetrics text for `/metrics`.

use std::{borrow::Cow, fmt::Write as _};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// Where a replay page came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplaySource {
    /// The feed's ring of recently released messages (no I/O).
    Ring,
    /// The recovery log: the Redis stream in a cluster, the in-process log on a single node.
    Log,
    /// The store (a page is one query).
    Database,
}

impl ReplaySource {
    /// Every source, so each label value is exported from the start.
    const ALL: [Self; 3] = [Self::Ring, Self::Log, Self::Database];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ring => "ring",
            Self::Log => "log",
            Self::Database => "database",
        }
    }
}

/// Kinds of errors counted in `chorus_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A client sent something invalid (rejected with an error ack).
    InvalidInput,
    /// A store operation failed (the client gets no ack and retries).
    Store,
    /// Publishing to or receiving from the Redis bus failed (delivery falls back to polling).
    Bus,
    /// Appending to or reading the recovery log failed (reconnects read the store).
    RecoveryLog,
    /// A socket could not keep up and was disconnected.
    SlowConsumer,
    /// A handshake carried an invalid `serverOffset`.
    InvalidHandshake,
}

impl ErrorKind {
    /// Every kind, so each label value is exported from the start.
    const ALL: [Self; 6] = [
        Self::InvalidInput,
        Self::Store,
        Self::Bus,
        Self::RecoveryLog,
        Self::SlowConsumer,
        Self::InvalidHandshake,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid_input",
            Self::Store => "store",
            Self::Bus => "bus",
            Self::RecoveryLog => "recovery_log",
            Self::SlowConsumer => "slow_consumer",
            Self::InvalidHandshake => "invalid_handshake",
        }
    }
}

macro_rules! label_value {
    ($t:ty) => {
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    };
}
label_value!(ReplaySource);
label_value!(ErrorKind);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabel {
    source: ReplaySource,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: ErrorKind,
}

/// All of one node's metrics. The handles are cheap clones of shared atomics; the registry
/// renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open Socket.IO connections.
    pub connections: Gauge,
    /// Open TCP connections (HTTP and websockets), each holding a file descriptor.
    pub tcp_connections: Gauge,
    /// Messages this node committed to the store.
    pub messages_stored: Counter,
    /// Sends acked without a write because the same message was stored before.
    pub duplicates: Counter,
    /// Store transactions this node committed (each holds a batch).
    pub store_batches: Counter,
    /// Messages that entered this node's ordered feed (from any node).
    pub feed_messages: Counter,
    /// Messages emitted to local sockets, live or replayed.
    pub deliveries: Counter,
    /// Batches published to the other nodes.
    pub broadcasts: Counter,
    /// Messages received from the other nodes over Redis.
    pub bus_received: Counter,
    /// Messages the feed fetched from the store because the bus did not bring them in time.
    pub gap_fills: Counter,
    /// How long each store append took, committed or failed.
    pub store_append: Histogram,
    /// From a send's arrival to its answer (ack or error ack).
    pub ack: Histogram,
    /// From a message's arrival in the feed to its hand-off to every live socket (the wait for
    /// a hole below it, then the fan-out).
    pub delivery: Histogram,
    /// From a catch-up's start to the socket turning live.
    pub replay: Histogram,
    replays: Family<SourceLabel, Counter>,
    replayed_messages: Family<SourceLabel, Counter>,
    replay_reads: Family<SourceLabel, Counter>,
    errors: Family<KindLabel, Counter>,
}

/// Latency buckets from 0.1 ms to about 13 s, a factor of 2.15 apart (16 buckets).
fn latency_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_1, 2.15, 16,
    ))
}

impl Metrics {
    /// Metrics for the node `node`, every sample labelled `node="{node}"`.
    pub fn new(node: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "chorus",
            [(Cow::Borrowed("node"), Cow::Owned(node.to_owned()))].into_iter(),
        );
        let m = Metrics {
            connections: Gauge::default(),
            tcp_connections: Gauge::default(),
            messages_stored: Counter::default(),
            duplicates: Counter::default(),
            store_batches: Counter::default(),
            feed_messages: Counter::default(),
            deliveries: Counter::default(),
            broadcasts: Counter::default(),
            bus_received: Counter::default(),
            gap_fills: Counter::default(),
            store_append: latency_buckets(),
            ack: latency_buckets(),
            delivery: latency_buckets(),
            replay: latency_buckets(),
            replays: Family::default(),
            replayed_messages: Family::default(),
            replay_reads: Family::default(),
            errors: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Open Socket.IO connections",
            m.connections.clone(),
        );
        r.register(
            "tcp_connections",
            "Open TCP connections, HTTP and websockets",
            m.tcp_connections.clone(),
        );
        for (name, help, counter) in [
            (
                "messages_stored",
                "Messages this node committed",
                &m.messages_stored,
            ),
            (
                "duplicates",
                "Sends whose message was already stored",
                &m.duplicates,
            ),
            (
                "store_batches",
                "Store transactions (group commits)",
                &m.store_batches,
            ),
            (
                "feed_messages",
                "Messages that entered this node's ordered feed",
                &m.feed_messages,
            ),
            (
                "deliveries",
                "Messages emitted to local sockets",
                &m.deliveries,
            ),
            (
                "broadcasts",
                "Batches published to the other nodes",
                &m.broadcasts,
            ),
            (
                "bus_received",
                "Messages received from other nodes over Redis",
                &m.bus_received,
            ),
            (
                "gap_fills",
                "Messages fetched from the store to fill a gap in the feed",
                &m.gap_fills,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
        for (name, help, family) in [
            (
                "replays",
                "Reconnect replays, by the source of their first page",
                &m.replays,
            ),
            (
                "replayed_messages",
                "Messages sent by replays, by source",
                &m.replayed_messages,
            ),
            (
                "replay_reads",
                "Pages read for replays, by source (a database page is one query)",
                &m.replay_reads,
            ),
        ] {
            for source in ReplaySource::ALL {
                drop(family.get_or_create_owned(&SourceLabel { source }));
            }
            r.register(name, help, family.clone());
        }
        for kind in ErrorKind::ALL {
            drop(m.errors.get_or_create_owned(&KindLabel { kind }));
        }
        r.register("errors", "Errors by kind", m.errors.clone());
        for (name, help, histogram) in [
            (
                "store_append",
                "Duration of store appends, committed or failed",
                &m.store_append,
            ),
            ("ack", "From a send's arrival to its answer", &m.ack),
            (
                "delivery",
                "From a message's arrival in the feed to its hand-off to every live socket",
                &m.delivery,
            ),
            (
                "replay",
                "From a catch-up's start to the socket turning live",
                &m.replay,
            ),
        ] {
            r.register_with_unit(name, help, Unit::Seconds, histogram.clone());
        }
        Metrics { registry, ..m }
    }

    /// Counts one replay whose first page came from `source`.
    pub fn replay_started(&self, source: ReplaySource) {
        self.replays.get_or_create(&SourceLabel { source }).inc();
    }

    /// Counts one page read for a replay from `source` (for the database, one query).
    pub fn replay_read(&self, source: ReplaySource) {
        self.replay_reads
            .get_or_create(&SourceLabel { source })
            .inc();
    }

    /// Counts `messages` sent by a replay from `source`.
    pub fn replayed(&self, source: ReplaySource, messages: u64) {
        self.replayed_messages
            .get_or_create(&SourceLabel { source })
            .inc_by(messages);
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// How many errors of `kind` were counted.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors.get_or_create(&KindLabel { kind }).get()
    }

    /// Renders every metric as OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String cannot fail; say so rather than serve half a page silently.
            tracing::error!(error = %error, "could not render metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_carries_the_node_and_every_label_is_there_from_the_start() {
        let metrics = Metrics::new("n\"1");
        metrics.deliveries.inc_by(3);
        metrics.error(ErrorKind::RecoveryLog);
        metrics.store_append.observe(0.002);
        let text = metrics.render();
        assert!(
            text.contains("chorus_deliveries_total{node=\"n\\\"1\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("chorus_errors_total{node=\"n\\\"1\",kind=\"recovery_log\"} 1"),
            "{text}"
        );
        for source in ReplaySource::ALL {
            let label = format!(
                "chorus_replays_total{{node=\"n\\\"1\",source=\"{}\"}} 0",
                source.as_str()
            );
            assert!(text.contains(&label), "{label} in {text}");
        }
        assert!(
            text.contains("chorus_store_append_seconds_count{node=\"n\\\"1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chorus_store_append_seconds_bucket{"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
