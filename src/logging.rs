//! Log set-up: plain or JSON lines, each carrying this node's id.

use std::{fmt, sync::OnceLock};

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

use crate::config::LogFormat;

/// The node id, known once the node has bound its port; lines before that carry `-`.
static NODE: OnceLock<String> = OnceLock::new();

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The level is not a valid filter directive.
    #[error("invalid log level {0:?}")]
    Level(String),
}

/// Installs the global subscriber; `RUST_LOG` overrides `level`.
pub fn init(format: LogFormat, level: &str) -> Result<(), LogError> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .map_err(|_| LogError::Level(level.to_owned()))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => {
            let inner = tracing_subscriber::fmt::format().json().flatten_event(true);
            builder.event_format(WithNode { inner, json: true }).init();
        }
        LogFormat::Plain => {
            let inner = tracing_subscriber::fmt::format();
            builder.event_format(WithNode { inner, json: false }).init();
        }
    }
    Ok(())
}

/// Sets the node id every later line carries (the first call wins).
pub fn set_node(id: &str) {
    if NODE.set(id.to_owned()).is_err() {
        tracing::debug!("node id for logs was already set");
    }
}

/// Adds `node` to each line: a `node=` prefix, or a first JSON field.
struct WithNode<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithNode<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let node = NODE.get().map_or("-", String::as_str);
        if !self.json {
            write!(writer, "node={node} ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                let node = serde_json::to_string(node).map_err(|_| fmt::Error)?;
                write!(writer, "{{\"node\":{node},{rest}")
            }
            None => writer.write_str(&line),
        }
    }
}
