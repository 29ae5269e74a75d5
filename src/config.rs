//! The settings tree: built-in defaults, then an optional TOML file, then environment variables.

use std::{fmt, path::Path, time::Duration};

use serde::{Deserialize, Deserializer, de};

/// Everything a node can be configured with, in one typed tree.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Address to bind (`0.0.0.0` in containers, `127.0.0.1` in tests).
    pub host: String,
    /// Port to listen on; `0` picks a free one (tests).
    pub port: u16,
    /// `sqlite://...` (embedded default) or `postgres://...` (scaled out).
    pub database_url: String,
    /// Set: cluster mode through Redis. Unset: single node, in-process everything.
    pub redis_url: Option<String>,
    /// Name of this node in logs and metrics; defaults to the host name and port.
    pub node_id: Option<String>,
    /// Chat behaviour seen by clients.
    pub chat: ChatSettings,
    /// Storage tuning.
    pub store: StoreSettings,
    /// Ordered delivery tuning.
    pub feed: FeedSettings,
    /// Redis tuning.
    pub redis: RedisSettings,
    /// Retention of the recovery log.
    pub stream: StreamSettings,
    /// Logging.
    pub log: LogSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
}

/// What clients see: history on first connect and input limits.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatSettings {
    /// How many of the newest messages a new client gets; `unlimited` replays everything.
    pub history: History,
    /// Longest accepted message, in characters.
    pub max_message_chars: usize,
    /// Longest accepted client offset, in characters.
    pub max_client_offset_chars: usize,
    /// Largest incoming Engine.IO payload or websocket message, in bytes.
    pub max_payload_bytes: u64,
    /// Packets socketioxide buffers per socket before `emit` reports the buffer full.
    pub max_buffer_size: usize,
    /// Initial size of each websocket's read buffer; it grows for a larger frame. Every idle
    /// connection holds it, and chat sends are small.
    pub ws_read_buffer_bytes: usize,
    /// How long a socket whose buffer stays full is kept before it is disconnected.
    pub slow_consumer_timeout_ms: u64,
    /// Most sends of one socket waiting for their ack; more are refused as rate limited.
    pub max_in_flight: usize,
}

/// Storage tuning.
#[derive(Debug, Clone, Deserialize)]
pub struct StoreSettings {
    /// Connection pool size.
    pub max_connections: u32,
    /// Most messages committed in one transaction (group commit).
    pub batch_max: usize,
    /// Rows per page of a replay from the store.
    pub page_size: usize,
    /// Time allowed to get a connection or run one query.
    pub timeout_ms: u64,
}

/// Ordered delivery tuning.
#[derive(Debug, Clone, Deserialize)]
pub struct FeedSettings {
    /// How long an out-of-order message waits for the gap before it is filled from the store.
    pub gap_timeout_ms: u64,
    /// How often the store is polled for messages the bus did not bring.
    pub poll_interval_ms: u64,
    /// Recent messages kept in memory to serve reconnects without a query.
    pub ring_capacity: usize,
}

/// Redis tuning.
#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    /// Prefix of every key and channel, so several clusters (or tests) share one Redis.
    pub prefix: String,
    /// Every Redis command fails after this long instead of hanging while Redis is down.
    pub command_timeout_ms: u64,
}

/// Retention of the recovery log (the Redis stream, or the in-process log of a single node):
/// trimmed to `max_len` messages and to `max_age_secs`, whichever keeps fewer.
#[derive(Debug, Clone, Deserialize)]
pub struct StreamSettings {
    /// Most messages kept.
    pub max_len: usize,
    /// Oldest message kept, in seconds.
    pub max_age_secs: u64,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    /// `plain` or `json`.
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `chorus=debug`.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Graceful shutdown.
#[derive(Debug, Clone, Deserialize)]
pub struct ShutdownSettings {
    /// Longest wait for in-flight writes after a signal.
    pub drain_timeout_ms: u64,
    /// How long the node keeps serving with readiness false before it stops accepting, so a
    /// load balancer with health checks moves new clients away first (0: stop at once).
    pub unready_delay_ms: u64,
}

/// How much history a new client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// The newest N messages.
    Last(u64),
    /// The whole table, as the tutorial does.
    Unlimited,
}

impl<'de> Deserialize<'de> for History {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = History;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of messages or \"unlimited\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<History, E> {
                Ok(History::Last(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<History, E> {
                u64::try_from(v)
                    .map(History::Last)
                    .map_err(|_| E::custom("history must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<History, E> {
                if v.eq_ignore_ascii_case("unlimited") {
                    Ok(History::Unlimited)
                } else {
                    v.parse().map(History::Last).map_err(|_| {
                        E::custom(format!("expected a number or \"unlimited\", got {v:?}"))
                    })
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type; the message names the key.
    #[error(transparent)]
    Load(#[from] config::ConfigError),
    /// A value has the right type but is not usable.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// The offending key, as a user would write it.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

const DEFAULTS: &str = r#"
host = "0.0.0.0"
port = 3000
database_url = "sqlite://chorus.db"

[chat]
history = 100
max_message_chars = 4096
max_client_offset_chars = 128
max_payload_bytes = 65536
max_buffer_size = 4096
ws_read_buffer_bytes = 1024
slow_consumer_timeout_ms = 30000
max_in_flight = 256

[store]
max_connections = 8
batch_max = 512
page_size = 1000
timeout_ms = 5000

[feed]
gap_timeout_ms = 50
poll_interval_ms = 1000
ring_capacity = 8192

[redis]
prefix = "chorus"
command_timeout_ms = 2000

[stream]
max_len = 1000000
max_age_secs = 900

[log]
format = "plain"
level = "info"

[shutdown]
drain_timeout_ms = 10000
unready_delay_ms = 0
"#;

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment, so tests need not touch the process's.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env: config::Map<String, String> = env.into_iter().collect();
        // The conventional names users expect, then CHAT__SECTION__KEY for the rest.
        for (var, key) in [
            ("PORT", "port"),
            ("HOST", "host"),
            ("DATABASE_URL", "database_url"),
            ("REDIS_URL", "redis_url"),
            ("NODE_ID", "node_id"),
        ] {
            if let Some(value) = env.get(var).filter(|v| !v.is_empty()) {
                builder = builder.set_override(key, value.as_str())?;
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("CHAT")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return invalid(
                "database_url (DATABASE_URL)",
                "must start with sqlite:, postgres:// or postgresql://",
            );
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return invalid("redis_url (REDIS_URL)", "must start with redis://");
        }
        if self.chat.max_message_chars == 0 {
            return invalid("chat.max_message_chars", "must be at least 1");
        }
        if self.chat.max_in_flight == 0 {
            return invalid("chat.max_in_flight", "must be at least 1");
        }
        if self.chat.ws_read_buffer_bytes < 64 {
            return invalid("chat.ws_read_buffer_bytes", "must be at least 64");
        }
        if self.chat.max_buffer_size < 16 {
            return invalid("chat.max_buffer_size", "must be at least 16");
        }
        if self.store.batch_max == 0 || self.store.page_size == 0 {
            return invalid("store.batch_max / store.page_size", "must be at least 1");
        }
        if self.store.max_connections < 2 {
            return invalid("store.max_connections", "must be at least 2");
        }
        if self.feed.poll_interval_ms == 0 {
            return invalid("feed.poll_interval_ms", "must be at least 1");
        }
        Ok(())
    }

    /// Whether this node runs in cluster mode.
    pub fn clustered(&self) -> bool {
        self.redis_url.is_some()
    }

    /// Helper: a millisecond setting as a `Duration`.
    pub fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_single_node_sqlite() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.port, 3000);
        assert!(s.database_url.starts_with("sqlite:"));
        assert!(s.redis_url.is_none());
        assert_eq!(s.chat.history, History::Last(100));
    }

    #[test]
    fn conventional_names_and_prefixed_keys_override() {
        let s = Settings::load_from(
            None,
            env(&[
                ("PORT", "4000"),
                ("REDIS_URL", "redis://127.0.0.1:6379"),
                ("CHAT__CHAT__HISTORY", "unlimited"),
                ("CHAT__STORE__BATCH_MAX", "64"),
            ]),
        )
        .unwrap();
        assert_eq!(s.port, 4000);
        assert!(s.clustered());
        assert_eq!(s.chat.history, History::Unlimited);
        assert_eq!(s.store.batch_max, 64);
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = Settings::load_from(None, env(&[("CHAT__STORE__BATCH_MAX", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_max"), "{err}");
        let err = Settings::load_from(None, env(&[("PORT", "http")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
        let err = Settings::load_from(None, env(&[("DATABASE_URL", "mysql://x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn a_file_sits_between_defaults_and_env() {
        let dir = std::env::temp_dir().join(format!("chorus-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "port = 5000\n[chat]\nhistory = 7\n").unwrap();
        let s = Settings::load_from(Some(&path), env(&[("PORT", "5001")])).unwrap();
        assert_eq!(s.port, 5001);
        assert_eq!(s.chat.history, History::Last(7));
    }
}
