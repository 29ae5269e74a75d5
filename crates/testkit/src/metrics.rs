//! Reading a node's `/metrics`: the value of one sample, named as a test writes it,
//! `name{labels}` without the node label. Parsed with `prometheus-parse`, which reads both the
//! Prometheus text format (0.0.4) and the OpenMetrics text the `prometheus-client` crate writes
//! (`_total` counters, `# UNIT` and `# EOF` lines, histograms as `_bucket`, `_sum`, `_count`).

use std::collections::HashMap;

use prometheus_parse::{Scrape, Value};

use crate::http::try_get_at;

/// The `/metrics` value of `name` from the node on `port`, written without the node label,
/// e.g. `chorus_replays_total{source="database"}` or `chorus_connections`; fails the test when
/// nothing serves the metrics or the sample is missing.
pub async fn metric(port: u16, name: &str) -> f64 {
    metric_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), name).await
}

/// Like [`metric`], from the node at `addr`.
pub async fn metric_at(addr: std::net::SocketAddr, name: &str) -> f64 {
    let (_, body) = try_get_at(addr, "/metrics", std::time::Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("nothing serves /metrics on {addr}"));
    value(&body, name).unwrap_or_else(|| panic!("metric {name} not found in:\n{body}"))
}

/// The value of the sample `name` (as [`metric`] takes it) in an exposition; `None` when no
/// sample has that name and, the node label aside, exactly those labels.
pub fn value(exposition: &str, name: &str) -> Option<f64> {
    let (metric, labels) = split_name(name);
    let lines = exposition.lines().map(|line| Ok(line.to_owned()));
    // Reading from memory cannot fail.
    let scrape = Scrape::parse(lines).ok()?;
    scrape.samples.into_iter().find_map(|sample| {
        if sample.metric != metric {
            return None;
        }
        let mut have: HashMap<String, String> = (*sample.labels).clone();
        have.remove("node");
        if have != labels {
            return None;
        }
        match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            // Buckets and quantiles are read through their _count and _sum samples.
            Value::Histogram(_) | Value::Summary(_) => None,
        }
    })
}

/// `chorus_x{a="1",b="2"}` into `chorus_x` and its labels.
fn split_name(name: &str) -> (&str, HashMap<String, String>) {
    let Some((metric, labels)) = name.split_once('{') else {
        return (name, HashMap::new());
    };
    let labels = labels
        .trim_end_matches('}')
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect();
    (metric, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a node writes today: Prometheus text format 0.0.4.
    const PROMETHEUS: &str = r#"# HELP chorus_connections Open Socket.IO connections.
# TYPE chorus_connections gauge
chorus_connections{node="n1"} 3
# HELP chorus_deliveries_total Messages emitted to local sockets.
# TYPE chorus_deliveries_total counter
chorus_deliveries_total{node="n1"} 5
# TYPE chorus_replays_total counter
chorus_replays_total{node="n1",source="memory"} 0
chorus_replays_total{node="n1",source="log"} 2
chorus_replays_total{node="n1",source="database"} 1
# TYPE chorus_store_append_seconds histogram
chorus_store_append_seconds_bucket{node="n1",le="0.001"} 4
chorus_store_append_seconds_bucket{node="n1",le="+Inf"} 6
chorus_store_append_seconds_sum{node="n1"} 0.25
chorus_store_append_seconds_count{node="n1"} 6
"#;

    /// What `prometheus-client` writes: OpenMetrics text, counters declared without `_total`.
    const OPENMETRICS: &str = r#"# HELP chorus_connections Open Socket.IO connections.
# TYPE chorus_connections gauge
chorus_connections{node="n1"} 3
# HELP chorus_deliveries Messages emitted to local sockets.
# TYPE chorus_deliveries counter
chorus_deliveries_total{node="n1"} 5
# HELP chorus_replays Replays by the source of their first page.
# TYPE chorus_replays counter
chorus_replays_total{node="n1",source="memory"} 0
chorus_replays_total{source="log",node="n1"} 2
chorus_replays_total{node="n1",source="database"} 1 # {trace_id="x"} 1.0
# HELP chorus_store_append_seconds Time spent in store appends.
# TYPE chorus_store_append_seconds histogram
# UNIT chorus_store_append_seconds seconds
chorus_store_append_seconds_sum{node="n1"} 0.25
chorus_store_append_seconds_count{node="n1"} 6
chorus_store_append_seconds_bucket{le="0.001",node="n1"} 4
chorus_store_append_seconds_bucket{le="+Inf",node="n1"} 6
# EOF
"#;

    #[test]
    fn reads_both_formats_alike() {
        for text in [PROMETHEUS, OPENMETRICS] {
            assert_eq!(value(text, "chorus_connections"), Some(3.0));
            assert_eq!(value(text, "chorus_deliveries_total"), Some(5.0));
            assert_eq!(
                value(text, r#"chorus_replays_total{source="log"}"#),
                Some(2.0)
            );
            assert_eq!(
                value(text, r#"chorus_replays_total{source="database"}"#),
                Some(1.0)
            );
            assert_eq!(value(text, "chorus_store_append_seconds_count"), Some(6.0));
            assert_eq!(value(text, "chorus_store_append_seconds_sum"), Some(0.25));
        }
    }

    /// The reader against what `prometheus-client` itself renders: families with a node label
    /// and another, a gauge, and a histogram with a unit.
    #[test]
    fn reads_what_prometheus_client_renders() {
        use prometheus_client::{
            encoding::text::encode,
            metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
            registry::{Registry, Unit},
        };
        let mut registry = Registry::with_labels([("node".into(), "vm:3000".into())].into_iter());
        let deliveries = Counter::<u64>::default();
        registry.register("chorus_deliveries", "Messages emitted", deliveries.clone());
        let replays = Family::<Vec<(String, String)>, Counter>::default();
        registry.register("chorus_replays", "Replays by source", replays.clone());
        let connections = Gauge::<i64>::default();
        registry.register(
            "chorus_connections",
            "Open connections",
            connections.clone(),
        );
        let appends = Histogram::new([0.001, 0.01]);
        registry.register_with_unit(
            "chorus_store_append",
            "Store appends",
            Unit::Seconds,
            appends.clone(),
        );
        deliveries.inc_by(5);
        replays
            .get_or_create(&vec![("source".into(), "database".into())])
            .inc();
        replays
            .get_or_create(&vec![("source".into(), "log".into())])
            .inc_by(2);
        connections.set(3);
        appends.observe(0.005);
        let mut text = String::new();
        encode(&mut text, &registry).expect("renders");
        assert!(text.ends_with("# EOF\n"), "{text}");

        assert_eq!(value(&text, "chorus_deliveries_total"), Some(5.0), "{text}");
        assert_eq!(
            value(&text, r#"chorus_replays_total{source="database"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&text, r#"chorus_replays_total{source="log"}"#),
            Some(2.0)
        );
        assert_eq!(value(&text, "chorus_connections"), Some(3.0));
        assert_eq!(value(&text, "chorus_store_append_seconds_count"), Some(1.0));
        assert_eq!(value(&text, "chorus_store_append_seconds_sum"), Some(0.005));
    }

    #[test]
    fn labels_must_match_exactly() {
        for text in [PROMETHEUS, OPENMETRICS] {
            assert_eq!(
                value(text, "chorus_replays_total"),
                None,
                "a label is missing"
            );
            assert_eq!(value(text, r#"chorus_replays_total{source="disk"}"#), None);
            assert_eq!(value(text, "chorus_nothing_total"), None);
        }
    }
}
