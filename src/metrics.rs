//! Counters and gauges of one node, rendered as Prometheus text for `/metrics`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Where a replay was served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaySource {
    /// The node's in-memory ring of recent messages (no query).
    Memory,
    /// The recovery log: the Redis stream, or the in-process log of a single node.
    Stream,
    /// Pages read from the store.
    Database,
}

const REPLAY_SOURCES: [(ReplaySource, &str); 3] = [
    (ReplaySource::Memory, "memory"),
    (ReplaySource::Stream, "stream"),
    (ReplaySource::Database, "database"),
];

/// Kinds of errors counted in `chorus_errors_total`.
#[derive(Debug, Clone, Copy)]
pub enum ErrorKind {
    /// A client sent something invalid (rejected with an error ack).
    InvalidInput,
    /// A store operation failed (the client gets no ack and retries).
    Store,
    /// Publishing to or receiving from Redis failed (delivery falls back to polling the store).
    Bus,
    /// A socket could not keep up and was disconnected.
    SlowConsumer,
    /// A handshake carried an invalid `serverOffset`.
    InvalidHandshake,
}

const ERROR_KINDS: [(ErrorKind, &str); 5] = [
    (ErrorKind::InvalidInput, "invalid_input"),
    (ErrorKind::Store, "store"),
    (ErrorKind::Bus, "bus"),
    (ErrorKind::SlowConsumer, "slow_consumer"),
    (ErrorKind::InvalidHandshake, "invalid_handshake"),
];

/// All of one node's metrics; shared by reference, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open Socket.IO connections.
    pub connections: AtomicI64,
    /// Messages this node committed to the store.
    pub messages_stored: AtomicU64,
    /// Sends acked without a write because their client offset was stored before.
    pub duplicates: AtomicU64,
    /// Store transactions this node committed (each holds a batch).
    pub store_batches: AtomicU64,
    /// Microseconds the writer waited on store appends, committed or failed.
    pub store_append_micros: AtomicU64,
    /// Messages that entered this node's ordered feed (from any node).
    pub feed_messages: AtomicU64,
    /// Messages emitted to local sockets, live or replayed.
    pub deliveries: AtomicU64,
    /// Batches published to the other nodes.
    pub broadcasts: AtomicU64,
    /// Messages received from the other nodes over Redis.
    pub bus_received: AtomicU64,
    /// Messages the feed fetched from the store because the bus did not bring them in time.
    pub gap_fills: AtomicU64,
    /// Replays (reconnect catch-ups) by the source of their first page.
    replays: [AtomicU64; 3],
    /// Messages sent in replays, by source.
    replayed_messages: [AtomicU64; 3],
    /// Pages read for replays, by source (a database page is one query).
    replay_reads: [AtomicU64; 3],
    errors: [AtomicU64; 5],
}

impl Metrics {
    /// Counts one replay served from `source`.
    pub fn replay(&self, source: ReplaySource) {
        self.replays[source as usize].fetch_add(1, Relaxed);
    }

    /// How many replays `source` served.
    pub fn replays(&self, source: ReplaySource) -> u64 {
        self.replays[source as usize].load(Relaxed)
    }

    /// Counts one page read for a replay from `source` (for the database, one query).
    pub fn replay_read(&self, source: ReplaySource) {
        self.replay_reads[source as usize].fetch_add(1, Relaxed);
    }

    /// Counts `messages` sent by a replay from `source`.
    pub fn replayed(&self, source: ReplaySource, messages: u64) {
        self.replayed_messages[source as usize].fetch_add(messages, Relaxed);
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Relaxed);
    }

    /// How many errors of `kind` were counted.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].load(Relaxed)
    }

    /// Renders every metric in the Prometheus text format, labelled with the node id.
    pub fn render(&self, node: &str) -> String {
        let mut out = String::with_capacity(2048);
        let node = node.replace('\\', "\\\\").replace('"', "\\\"");
        let mut line = |name: &str, kind: &str, help: &str, samples: &[(&str, i128)]| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, value) in samples {
                let sep = if labels.is_empty() { "" } else { "," };
                out.push_str(&format!("{name}{{node=\"{node}\"{sep}{labels}}} {value}\n"));
            }
        };
        let c = |a: &AtomicU64| i128::from(a.load(Relaxed));
        line(
            "chorus_connections",
            "gauge",
            "Open Socket.IO connections.",
            &[("", i128::from(self.connections.load(Relaxed)))],
        );
        for (name, help, value) in [
            (
                "chorus_messages_stored_total",
                "Messages this node committed.",
                &self.messages_stored,
            ),
            (
                "chorus_duplicates_total",
                "Sends whose client offset was already stored.",
                &self.duplicates,
            ),
            (
                "chorus_store_batches_total",
                "Store transactions (group commits).",
                &self.store_batches,
            ),
            (
                "chorus_feed_messages_total",
                "Messages that entered this node's ordered feed.",
                &self.feed_messages,
            ),
            (
                "chorus_deliveries_total",
                "Messages emitted to local sockets.",
                &self.deliveries,
            ),
            (
                "chorus_broadcasts_total",
                "Batches published to the other nodes.",
                &self.broadcasts,
            ),
            (
                "chorus_bus_received_total",
                "Messages received from other nodes over Redis.",
                &self.bus_received,
            ),
            (
                "chorus_gap_fills_total",
                "Messages fetched from the store to fill a gap in the feed.",
                &self.gap_fills,
            ),
        ] {
            line(name, "counter", help, &[("", c(value))]);
        }
        for (name, help, values) in [
            (
                "chorus_replays_total",
                "Reconnect replays, by the source of their first page.",
                &self.replays,
            ),
            (
                "chorus_replayed_messages_total",
                "Messages sent by replays, by source.",
                &self.replayed_messages,
            ),
            (
                "chorus_replay_reads_total",
                "Pages read for replays, by source (a database page is one query).",
                &self.replay_reads,
            ),
        ] {
            let samples: Vec<(String, i128)> = REPLAY_SOURCES
                .iter()
                .map(|(s, label)| (format!("source=\"{label}\""), c(&values[*s as usize])))
                .collect();
            let samples: Vec<(&str, i128)> =
                samples.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            line(name, "counter", help, &samples);
        }
        let errors: Vec<(String, i128)> = ERROR_KINDS
            .iter()
            .map(|(k, name)| (format!("kind=\"{name}\""), c(&self.errors[*k as usize])))
            .collect();
        let errors: Vec<(&str, i128)> = errors.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        line("chorus_errors_total", "counter", "Errors by kind.", &errors);
        out.push_str(&format!(
            "# HELP chorus_store_append_seconds_total Time the writer waited on store appends.\n\
             # TYPE chorus_store_append_seconds_total counter\n\
             chorus_store_append_seconds_total{{node=\"{node}\"}} {}\n",
            self.store_append_micros.load(Relaxed) as f64 / 1e6
        ));
        out
    }
}
