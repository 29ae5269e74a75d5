//! The settings tree: built-in defaults, then an optional TOML file, then environment variables.

use std::{fmt, path::Path, time::Duration};

use serde::{Deserialize, Deserializer, de};

/// Everything a node can be configured with, in one typed tree. Durations are read from
/// `*_ms` / `*_secs` keys and held as `Duration`; [`Settings::load`] checks the values together.
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
    /// What the chat gives clients.
    pub chat: ChatSettings,
    /// What a client may send.
    pub limits: LimitSettings,
    /// Per-connection buffers and timeouts of the Socket.IO transport.
    pub transport: TransportSettings,
    /// Who may open a socket and as whom; where `/metrics` is served.
    pub access: AccessSettings,
    /// Storage tuning.
    pub store: StoreSettings,
    /// Ordered delivery tuning.
    pub feed: FeedSettings,
    /// Redis tuning.
    pub redis: RedisSettings,
    /// Retention of the recovery log.
    pub recovery: RecoverySettings,
    /// Logging.
    pub log: LogSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
}

/// What the chat gives clients.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatSettings {
    /// How many of the newest messages a new client gets; `unlimited` replays everything.
    pub history: History,
    /// How long after a node stops answering its people are taken out of their rooms (`left`).
    #[serde(rename = "presence_timeout_ms", deserialize_with = "millis")]
    pub presence_timeout: Duration,
}

/// What a client may send: the limits clients meet.
#[derive(Debug, Clone, Deserialize)]
pub struct LimitSettings {
    /// Longest accepted message, in characters.
    pub max_message_chars: usize,
    /// Longest accepted client offset, in characters.
    pub max_client_offset_chars: usize,
    /// Most sends of one socket waiting for their ack; more are refused as rate limited.
    pub max_in_flight: usize,
    /// Largest incoming Engine.IO payload or websocket message, in bytes.
    pub max_payload_bytes: u64,
    /// Sends one socket may make per second, on average (a token bucket); more are refused
    /// as rate limited.
    pub messages_per_second: u32,
    /// Sends one socket may make at once before the rate applies (the bucket's size). The
    /// tutorial's client sends what it queued while disconnected in one burst on reconnect.
    pub message_burst: u32,
    /// A socket whose sends are refused as rate limited this many times in a row is disconnected.
    pub rate_limited_disconnect_after: u32,
    /// Sends all sockets of one client address may make per second on average, so that a
    /// client cannot reconnect for a fresh per-socket bucket. Behind a NAT, many people share it.
    pub address_messages_per_second: u32,
    /// Sends all sockets of one client address may make at once before that rate applies.
    pub address_message_burst: u32,
    /// Rooms one socket may be in at once besides the default room and its conversations; a
    /// join beyond it is refused.
    pub max_rooms_per_socket: usize,
    /// `typing` events one socket may send per second (bursts of twice that); more are refused.
    pub typing_per_second: u32,
}

/// Per-connection buffers and timeouts of the Socket.IO transport.
#[derive(Debug, Clone, Deserialize)]
pub struct TransportSettings {
    /// Packets socketioxide buffers per socket before `emit` reports the buffer full.
    pub max_buffer_size: usize,
    /// Initial size of each websocket's read buffer; it grows for a larger frame. Every idle
    /// connection holds it, and chat sends are small.
    pub ws_read_buffer_bytes: usize,
    /// How long a socket whose buffer stays full is kept before it is disconnected.
    #[serde(rename = "slow_consumer_timeout_ms", deserialize_with = "millis")]
    pub slow_consumer_timeout: Duration,
    /// A connection must send a complete HTTP request head within this long, the first one and
    /// each next one on a kept-alive connection (so it is the idle timeout too); then it is closed.
    #[serde(rename = "header_read_timeout_ms", deserialize_with = "millis")]
    pub header_read_timeout: Duration,
    /// Largest HTTP request head (request line and headers); a larger one gets `431`.
    pub max_header_bytes: usize,
    /// Most TCP connections the node holds at once (HTTP and websockets); more get `503`.
    pub max_connections: usize,
    /// Most connections of one client address: TCP connections from a direct peer, Socket.IO
    /// sessions of a client behind a trusted proxy. More get `503` or a `connect_error`.
    pub max_connections_per_address: usize,
    /// Load balancers whose `X-Forwarded-For` names the client: IP addresses or CIDR networks,
    /// as a list or comma-separated. Empty: every peer is the client.
    #[serde(deserialize_with = "list")]
    pub trusted_proxies: Vec<String>,
    /// A connection whose writes make no progress for this long (its peer stopped reading) is
    /// closed, and what was queued for it is freed.
    #[serde(rename = "write_stall_timeout_ms", deserialize_with = "millis")]
    pub write_stall_timeout: Duration,
    /// The kernel send buffer of each accepted connection (`SO_SNDBUF`), which bounds what an
    /// unread connection holds in the kernel; 0 leaves the kernel's autotuning (up to
    /// `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default).
    pub socket_send_buffer_bytes: usize,
    /// An Engine.IO session must join the chat (send its Socket.IO `CONNECT`) within this long.
    #[serde(rename = "handshake_timeout_ms", deserialize_with = "millis")]
    pub handshake_timeout: Duration,
}

impl TransportSettings {
    /// The trusted proxies, parsed ([`Settings::validate`] has checked each).
    pub fn trusted_proxies(&self) -> crate::peers::TrustedProxies {
        crate::peers::TrustedProxies::new(
            self.trusted_proxies
                .iter()
                .filter_map(|entry| parse_net(entry).ok())
                .collect(),
        )
    }
}

/// An address (`10.0.0.1`) or a network (`10.0.0.0/8`).
fn parse_net(entry: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(addr) = entry.parse::<std::net::IpAddr>() {
        return Ok(addr.into());
    }
    entry
        .parse::<ipnet::IpNet>()
        .map_err(|_| format!("{entry:?} is neither an IP address nor a CIDR network"))
}

/// Who may open a socket and as whom.
#[derive(Debug, Clone, Deserialize)]
pub struct AccessSettings {
    /// Origins (`https://chat.example.com`) whose pages may open a socket, as a list or
    /// comma-separated; `*` allows any. The page's own origin (the request's `Host`) is always
    /// allowed, and clients that send no `Origin` (not browsers) are not affected.
    #[serde(deserialize_with = "list")]
    pub allowed_origins: Vec<String>,
    /// Set: a handshake must carry `auth.token`, a JWT signed with HS256 by this secret.
    pub jwt_secret: Option<String>,
    /// Set: a handshake must carry `auth.token`, a JWT verified with this PEM public key, by
    /// `jwt_algorithm`.
    pub jwt_public_key_file: Option<String>,
    /// `RS256` or `ES256`, for `jwt_public_key_file`.
    pub jwt_algorithm: String,
    /// Set: `/metrics` is served on this address (`127.0.0.1:9100`) and not on the public port.
    pub metrics_listen: Option<String>,
}

/// A list from a TOML array, or from one comma-separated string (an environment variable).
fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let items = match Raw::deserialize(d)? {
        Raw::One(joined) => joined.split(',').map(str::to_owned).collect(),
        Raw::Many(items) => items,
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect())
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
    #[serde(rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Duration,
}

/// Ordered delivery tuning.
#[derive(Debug, Clone, Deserialize)]
pub struct FeedSettings {
    /// How long an out-of-order message waits for the gap before it is filled from the store.
    #[serde(rename = "gap_timeout_ms", deserialize_with = "millis")]
    pub gap_timeout: Duration,
    /// How often the store is polled for messages the bus did not bring.
    #[serde(rename = "poll_interval_ms", deserialize_with = "millis")]
    pub poll_interval: Duration,
    /// Recent messages kept in memory to serve reconnects without a query.
    pub ring_capacity: usize,
}

/// Redis tuning.
#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    /// Prefix of every key and channel, so several clusters (or tests) share one Redis.
    pub prefix: String,
    /// Every Redis command fails after this long instead of hanging while Redis is down.
    #[serde(rename = "command_timeout_ms", deserialize_with = "millis")]
    pub command_timeout: Duration,
}

/// Retention of the recovery log (the Redis stream, or the in-process log of a single node):
/// trimmed to `max_len` messages, `max_bytes` of content and `max_age`, whichever keeps fewer.
#[derive(Debug, Clone, Deserialize)]
pub struct RecoverySettings {
    /// Most messages kept.
    pub max_len: usize,
    /// Most bytes of message content kept (with a small per-entry overhead counted too), so
    /// that large messages cannot fill memory or Redis before `max_len` is reached.
    pub max_bytes: usize,
    /// Oldest message kept.
    #[serde(rename = "max_age_secs", deserialize_with = "secs")]
    pub max_age: Duration,
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
    #[serde(rename = "drain_timeout_ms", deserialize_with = "millis")]
    pub drain_timeout: Duration,
    /// How long the node keeps serving with readiness false before it stops accepting, so a
    /// load balancer with health checks moves new clients away first (0: stop at once).
    #[serde(rename = "unready_delay_ms", deserialize_with = "millis")]
    pub unready_delay: Duration,
}

fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
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

/// The built-in defaults; README's configuration table lists them.
const DEFAULTS: &str = r#"
host = "0.0.0.0"
port = 3000
database_url = "sqlite://chorus.db"

[chat]
history = 100
presence_timeout_ms = 15000

[limits]
max_message_chars = 4096
max_client_offset_chars = 128
max_in_flight = 256
max_payload_bytes = 65536
messages_per_second = 10
message_burst = 50
rate_limited_disconnect_after = 100
address_messages_per_second = 100
address_message_burst = 500
max_rooms_per_socket = 64
typing_per_second = 4

[transport]
max_buffer_size = 4096
ws_read_buffer_bytes = 1024
slow_consumer_timeout_ms = 30000
header_read_timeout_ms = 30000
max_header_bytes = 16384
max_connections = 100000
max_connections_per_address = 256
trusted_proxies = ""
write_stall_timeout_ms = 30000
socket_send_buffer_bytes = 0
handshake_timeout_ms = 10000

[access]
allowed_origins = ""
jwt_algorithm = "RS256"

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

[recovery]
max_len = 1000000
max_bytes = 268435456
max_age_secs = 900

[log]
format = "plain"
level = "info"

[shutdown]
drain_timeout_ms = 10000
unready_delay_ms = 0
"#;

/// The prefix of environment variables that set any key: `CHORUS__SECTION__KEY`.
pub const ENV_PREFIX: &str = "CHORUS";

/// The `REDIS_URL` schemes fred reads: one server, or a Redis Cluster named by one or more of
/// its nodes (`redis-cluster://host:port?node=host2:port2`), each with or without TLS.
const REDIS_SCHEMES: [&str; 4] = [
    "redis://",
    "rediss://",
    "redis-cluster://",
    "rediss-cluster://",
];

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
        // The conventional names users expect, then CHORUS__SECTION__KEY for the rest.
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
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what the types cannot: ranges, and values that only work together.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return invalid(
                "database_url (DATABASE_URL)",
                "must start with sqlite:, postgres:// or postgresql://".into(),
            );
        }
        if let Some(url) = &self.redis_url
            && !REDIS_SCHEMES.iter().any(|scheme| url.starts_with(scheme))
        {
            return invalid(
                "redis_url (REDIS_URL)",
                "must start with redis:// (one server) or redis-cluster:// (a Redis Cluster)"
                    .into(),
            );
        }
        let at_least = |key, value: u64, min: u64| {
            if value < min {
                invalid(key, format!("must be at least {min}, got {value}"))
            } else {
                Ok(())
            }
        };
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        at_least(
            "limits.max_message_chars",
            n(self.limits.max_message_chars),
            1,
        )?;
        at_least(
            "limits.max_client_offset_chars",
            n(self.limits.max_client_offset_chars),
            1,
        )?;
        at_least("limits.max_in_flight", n(self.limits.max_in_flight), 1)?;
        for (key, value) in [
            (
                "limits.messages_per_second",
                self.limits.messages_per_second,
            ),
            ("limits.message_burst", self.limits.message_burst),
            (
                "limits.address_messages_per_second",
                self.limits.address_messages_per_second,
            ),
            (
                "limits.address_message_burst",
                self.limits.address_message_burst,
            ),
            ("limits.typing_per_second", self.limits.typing_per_second),
        ] {
            at_least(key, u64::from(value), 1)?;
        }
        at_least(
            "limits.max_payload_bytes",
            self.limits.max_payload_bytes,
            1024,
        )?;
        at_least(
            "transport.ws_read_buffer_bytes",
            n(self.transport.ws_read_buffer_bytes),
            64,
        )?;
        at_least("store.batch_max", n(self.store.batch_max), 1)?;
        at_least("store.page_size", n(self.store.page_size), 1)?;
        at_least(
            "store.max_connections",
            u64::from(self.store.max_connections),
            2,
        )?;
        at_least("feed.ring_capacity", n(self.feed.ring_capacity), 1)?;
        at_least("recovery.max_len", n(self.recovery.max_len), 1)?;
        at_least("recovery.max_bytes", n(self.recovery.max_bytes), 65536)?;
        at_least("recovery.max_age_secs", self.recovery.max_age.as_secs(), 1)?;
        at_least(
            "transport.max_header_bytes",
            n(self.transport.max_header_bytes),
            1024,
        )?;
        at_least(
            "transport.header_read_timeout_ms",
            u64::try_from(self.transport.header_read_timeout.as_millis()).unwrap_or(u64::MAX),
            100,
        )?;
        at_least(
            "transport.max_connections_per_address",
            n(self.transport.max_connections_per_address),
            1,
        )?;
        for (key, value) in [
            (
                "transport.write_stall_timeout_ms",
                self.transport.write_stall_timeout,
            ),
            (
                "transport.handshake_timeout_ms",
                self.transport.handshake_timeout,
            ),
            ("chat.presence_timeout_ms", self.chat.presence_timeout),
        ] {
            at_least(
                key,
                u64::try_from(value.as_millis()).unwrap_or(u64::MAX),
                100,
            )?;
        }
        for entry in &self.transport.trusted_proxies {
            if let Err(reason) = parse_net(entry) {
                return invalid("transport.trusted_proxies", reason);
            }
        }
        self.access.validate()?;
        if self.feed.poll_interval.is_zero() {
            return invalid("feed.poll_interval_ms", "must be at least 1".into());
        }
        // A socket's buffer must hold a burst: a full batch released at once plus the socket's
        // own acks. Acks cannot wait for room, so one that finds the buffer full is lost (the
        // client's retry is then answered as a duplicate). docs/DESIGN.md, "Backpressure".
        let burst = self
            .store
            .batch_max
            .saturating_add(self.limits.max_in_flight);
        if self.transport.max_buffer_size < burst {
            return invalid(
                "transport.max_buffer_size",
                format!(
                    "must hold store.batch_max + limits.max_in_flight ({burst}) packets, got {}",
                    self.transport.max_buffer_size
                ),
            );
        }
        Ok(())
    }

    /// Whether this node runs in cluster mode.
    pub fn clustered(&self) -> bool {
        self.redis_url.is_some()
    }
}

impl AccessSettings {
    /// A secret, or a key file, or neither; the algorithm one a key can have.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.into(),
            })
        };
        if self.jwt_secret().is_some() && self.jwt_public_key_file().is_some() {
            return invalid(
                "access.jwt_secret",
                "set either jwt_secret or jwt_public_key_file, not both",
            );
        }
        if !matches!(self.jwt_algorithm.as_str(), "RS256" | "ES256") {
            return invalid("access.jwt_algorithm", "must be RS256 or ES256");
        }
        for origin in &self.allowed_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return invalid(
                    "access.allowed_origins",
                    "each origin is *, or a scheme and host such as https://chat.example.com",
                );
            }
        }
        Ok(())
    }

    /// The HS256 secret, when set and not empty.
    pub fn jwt_secret(&self) -> Option<&str> {
        self.jwt_secret.as_deref().filter(|s| !s.is_empty())
    }

    /// The public key file, when set and not empty.
    pub fn jwt_public_key_file(&self) -> Option<&str> {
        self.jwt_public_key_file
            .as_deref()
            .filter(|s| !s.is_empty())
    }

    /// The metrics address, when set and not empty.
    pub fn metrics_listen(&self) -> Option<&str> {
        self.metrics_listen.as_deref().filter(|s| !s.is_empty())
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

    fn load(pairs: &[(&str, &str)]) -> Settings {
        Settings::load_from(None, env(pairs)).unwrap()
    }

    /// The message of the error that `pairs` cause.
    fn refusal(pairs: &[(&str, &str)]) -> String {
        Settings::load_from(None, env(pairs))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_are_single_node_sqlite() {
        let s = load(&[]);
        assert_eq!(s.port, 3000);
        assert!(s.database_url.starts_with("sqlite:"));
        assert!(s.redis_url.is_none());
        assert_eq!(s.chat.history, History::Last(100));
    }

    #[test]
    fn conventional_names_and_prefixed_keys_override() {
        let s = load(&[
            ("PORT", "4000"),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("CHORUS__CHAT__HISTORY", "unlimited"),
            ("CHORUS__STORE__BATCH_MAX", "64"),
        ]);
        assert_eq!(s.port, 4000);
        assert!(s.clustered());
        assert_eq!(s.chat.history, History::Unlimited);
        assert_eq!(s.store.batch_max, 64);
    }

    #[test]
    fn a_redis_cluster_is_named_by_its_nodes() {
        let url = "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001&node=127.0.0.1:7002";
        let s = load(&[("REDIS_URL", url)]);
        assert!(s.clustered());
        assert_eq!(s.redis_url.as_deref(), Some(url));
    }

    #[test]
    fn a_bad_value_names_its_key() {
        for (pair, key) in [
            (("CHORUS__STORE__BATCH_MAX", "lots"), "batch_max"),
            (("PORT", "http"), "port"),
            (("DATABASE_URL", "mysql://x"), "DATABASE_URL"),
            (("CHORUS__RECOVERY__MAX_LEN", "0"), "recovery.max_len"),
            (("REDIS_URL", "127.0.0.1:6379"), "REDIS_URL"),
        ] {
            let err = refusal(&[pair]);
            assert!(err.contains(key), "{pair:?}: {err}");
        }
    }

    #[test]
    fn durations_are_read_from_their_unit_keys() {
        let s = load(&[
            ("CHORUS__FEED__GAP_TIMEOUT_MS", "75"),
            ("CHORUS__RECOVERY__MAX_AGE_SECS", "60"),
        ]);
        assert_eq!(s.feed.gap_timeout, Duration::from_millis(75));
        assert_eq!(s.recovery.max_age, Duration::from_secs(60));
        assert_eq!(s.transport.slow_consumer_timeout, Duration::from_secs(30));
    }

    #[test]
    fn a_buffer_too_small_for_a_burst_is_refused() {
        let err = refusal(&[("CHORUS__TRANSPORT__MAX_BUFFER_SIZE", "700")]);
        assert!(err.contains("transport.max_buffer_size"), "{err}");
        assert!(err.contains("768"), "{err}");
        let s = load(&[
            ("CHORUS__TRANSPORT__MAX_BUFFER_SIZE", "64"),
            ("CHORUS__STORE__BATCH_MAX", "32"),
            ("CHORUS__LIMITS__MAX_IN_FLIGHT", "32"),
        ]);
        assert_eq!(s.transport.max_buffer_size, 64);
    }

    #[test]
    fn lists_come_from_arrays_or_comma_separated_strings() {
        let s = load(&[
            (
                "CHORUS__TRANSPORT__TRUSTED_PROXIES",
                "10.0.0.0/8, 192.168.1.1",
            ),
            (
                "CHORUS__ACCESS__ALLOWED_ORIGINS",
                "https://a.example,https://b.example",
            ),
        ]);
        assert_eq!(s.transport.trusted_proxies, ["10.0.0.0/8", "192.168.1.1"]);
        assert_eq!(
            s.access.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert!(load(&[]).transport.trusted_proxies.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[access]\nallowed_origins = [\"*\"]\n").unwrap();
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(s.access.allowed_origins, ["*"]);
        for (pair, key) in [
            (
                ("CHORUS__TRANSPORT__TRUSTED_PROXIES", "lb"),
                "trusted_proxies",
            ),
            (
                ("CHORUS__ACCESS__ALLOWED_ORIGINS", "example.com"),
                "allowed_origins",
            ),
            (("CHORUS__ACCESS__JWT_ALGORITHM", "none"), "jwt_algorithm"),
        ] {
            let err = refusal(&[pair]);
            assert!(err.contains(key), "{pair:?}: {err}");
        }
    }

    #[test]
    fn a_file_sits_between_defaults_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "port = 5000\n[chat]\nhistory = 7\n").unwrap();
        let s = Settings::load_from(Some(&path), env(&[("PORT", "5001")])).unwrap();
        assert_eq!(s.port, 5001);
        assert_eq!(s.chat.history, History::Last(7));
    }
}
