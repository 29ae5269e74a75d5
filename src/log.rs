//! The recovery log: the most recent messages, in offset order, kept where every node can read
//! them, so that a client reconnecting to any node catches up without a database query.
//!
//! In cluster mode the log is a Redis stream whose entry ids are the offsets (`{offset}-0`).
//! Every node appends every message its feed releases, in offset order; Redis refuses an id at or
//! below the stream's last one, so of the nodes' copies the first is kept and the rest are
//! refused, and since each node appends in order the stream stays contiguous. Nothing trusts
//! that, though: a read returns only the run of entries that starts exactly at the asked offset
//! and has no hole, and anything else (a stream lost in a Redis restart, trimmed past the
//! offset, restarted by a lagging node) reads as "not here", which sends the caller to the
//! database. The key carries the database's epoch, so a stream written for another database is
//! never read. A single node keeps the same log in process.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fred::{
    clients::Client,
    interfaces::{LuaInterface, StreamsInterface},
    types::{
        Value,
        streams::{XCap, XCapKind, XCapTrim},
    },
};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    metrics::{ErrorKind, Metrics},
    store::Message,
};

/// How much the log keeps: at most `max_len` messages, none older than `max_age`.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Most messages kept.
    pub max_len: usize,
    /// Oldest message kept.
    pub max_age: Duration,
}

/// Why the log could not be read (the caller reads the database instead).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Redis refused or did not answer.
    #[error("redis error: {0}")]
    Redis(#[from] fred::error::Error),
    /// An entry was not in the shape this module writes.
    #[error("malformed stream entry {0}")]
    Malformed(String),
}

/// Recent messages, readable by offset.
pub trait RecoveryLog: Send + Sync + 'static {
    /// Takes released messages (in offset order, contiguous); never waits.
    fn append(&self, messages: &[Arc<Message>]);
    /// Up to `limit` messages from `after + 1` on, contiguous; empty when the log does not hold
    /// `after + 1`.
    fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, LogError>>;
}

/// The log of a single node, in memory.
pub struct MemoryLog {
    entries: Mutex<VecDeque<(Instant, Arc<Message>)>>,
    retention: Retention,
}

impl MemoryLog {
    /// An empty log.
    pub fn new(retention: Retention) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            retention,
        }
    }
}

impl RecoveryLog for MemoryLog {
    fn append(&self, messages: &[Arc<Message>]) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for message in messages {
            match entries.back() {
                Some((_, last)) if message.offset <= last.offset => continue,
                // Not contiguous (cannot happen with the feed's order): start over rather than
                // keep a hole that readers would have to step around.
                Some((_, last)) if message.offset != last.offset + 1 => entries.clear(),
                _ => {}
            }
            entries.push_back((now, message.clone()));
        }
        while entries.len() > self.retention.max_len
            || entries
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > self.retention.max_age)
        {
            entries.pop_front();
        }
    }

    fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, LogError>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let page = match entries.front() {
            Some((_, first)) if after >= first.offset - 1 => {
                let skip = usize::try_from(after + 1 - first.offset).unwrap_or(usize::MAX);
                entries
                    .iter()
                    .skip(skip)
                    .take(limit)
                    .map(|(_, m)| m.clone())
                    .collect()
            }
            _ => Vec::new(),
        };
        Box::pin(std::future::ready(Ok(page)))
    }
}

/// The cluster's log, in a Redis stream.
pub struct StreamLog {
    client: Client,
    key: Arc<str>,
    tx: mpsc::Sender<Vec<Arc<Message>>>,
    metrics: Arc<Metrics>,
}

/// The one field of each stream entry (the append script writes it as `c`).
const CONTENT: &str = "c";
/// Most messages per append command.
const APPEND_BATCH: usize = 1024;

impl StreamLog {
    /// The stream `{prefix}:log:{epoch}`, with its appender task.
    pub fn start(
        client: Client,
        prefix: &str,
        epoch: &str,
        retention: Retention,
        metrics: Arc<Metrics>,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let key: Arc<str> = format!("{prefix}:log:{epoch}").into();
        // Bounded: if Redis is slower than the feed, appends are dropped rather than queued
        // without limit. A dropped message leaves the stream short, which readers detect.
        let (tx, rx) = mpsc::channel(4096);
        tasks.spawn(appender(
            client.clone(),
            key.clone(),
            rx,
            retention,
            metrics.clone(),
            cancel,
        ));
        Self {
            client,
            key,
            tx,
            metrics,
        }
    }
}

impl RecoveryLog for StreamLog {
    fn append(&self, messages: &[Arc<Message>]) {
        if self.tx.try_send(messages.to_vec()).is_err() {
            self.metrics.error(ErrorKind::Bus);
        }
    }

    fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, LogError>> {
        Box::pin(async move {
            let start = format!("{}-0", after + 1);
            let count = u64::try_from(limit).unwrap_or(u64::MAX);
            let entries: Vec<(String, Vec<(String, String)>)> = self
                .client
                .xrange(&*self.key, start, "+", Some(count))
                .await?;
            let mut page = Vec::with_capacity(entries.len());
            for (next, (id, fields)) in (after + 1..).zip(entries) {
                let offset = id
                    .strip_suffix("-0")
                    .and_then(|n| n.parse::<i64>().ok())
                    .ok_or_else(|| LogError::Malformed(id.clone()))?;
                // Only the run that starts at `after + 1` with no hole counts.
                if offset != next {
                    break;
                }
                let content = fields
                    .into_iter()
                    .find_map(|(k, v)| (k == CONTENT).then_some(v))
                    .ok_or(LogError::Malformed(id))?;
                page.push(Arc::new(Message { offset, content }));
            }
            Ok(page)
        })
    }
}

/// Appends what the feed released, in order, and trims the stream by count and by age.
async fn appender(
    client: Client,
    key: Arc<str>,
    mut rx: mpsc::Receiver<Vec<Arc<Message>>>,
    retention: Retention,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    // When offsets were released here, sampled about once a second: the age trim's clock.
    let mut released_at: VecDeque<(Instant, i64)> = VecDeque::new();
    let trim_every =
        (retention.max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut trim = tokio::time::interval(trim_every);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max_len = i64::try_from(retention.max_len).unwrap_or(i64::MAX);
    // Logged when appends start and stop failing, not for every batch while Redis is down.
    let mut failing = false;
    let mut script = AppendScript { sha: None };
    loop {
        let first = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            first = rx.recv() => first,
            _ = trim.tick() => {
                trim_by_age(&client, &key, &mut released_at, retention.max_age).await;
                continue;
            }
        };
        let Some(mut batch) = first else { break };
        while batch.len() < APPEND_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        let result = script.run(&client, &key, &batch, max_len).await;
        if result.is_err() {
            metrics.error(ErrorKind::Bus);
        }
        if result.is_err() != failing {
            failing = !failing;
            if let Err(error) = result {
                tracing::warn!(error = %error, "stream appends failing; reconnects read the database meanwhile");
            } else {
                tracing::info!("stream appends work again");
            }
        }
        let now = Instant::now();
        if let Some(last) = batch.last()
            && released_at
                .back()
                .is_none_or(|(at, _)| now.duration_since(*at) >= Duration::from_secs(1))
        {
            released_at.push_back((now, last.offset));
        }
    }
}

/// Appends a batch to the stream in one command. `KEYS[1]` is the stream, `ARGV[1]` its
/// approximate length cap, then `offset, content` pairs in offset order. Offsets at or below
/// the stream's last entry are skipped (another node appended them first: every node appends
/// every message); an `XADD` still refused as too small (the stream's entries were all trimmed
/// by age, its last id remains) is skipped the same way, and any other failure is returned.
const APPEND_SCRIPT: &str = r"
local key = KEYS[1]
local last = -1
local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if #top > 0 then last = tonumber(string.match(top[1][1], '^%d+')) end
local added = 0
for i = 2, #ARGV, 2 do
  if tonumber(ARGV[i]) > last then
    local r = redis.pcall('XADD', key, ARGV[i] .. '-0', 'c', ARGV[i + 1])
    if type(r) == 'table' and r.err then
      if not string.find(r.err, 'equal or smaller', 1, true) then return r end
    else
      added = added + 1
    end
  end
end
if added > 0 then redis.call('XTRIM', key, 'MAXLEN', '~', ARGV[1]) end
return added
";

/// The append script, loaded on first use and again when Redis has forgotten it (a restart).
struct AppendScript {
    sha: Option<String>,
}

impl AppendScript {
    /// Runs the script for `batch`; loads it first when needed.
    async fn run(
        &mut self,
        client: &Client,
        key: &str,
        batch: &[Arc<Message>],
        max_len: i64,
    ) -> Result<(), fred::error::Error> {
        // The arguments are built per attempt: a retry after a reload is rare, and cloning them
        // on every call is not.
        let args = || {
            let mut args = Vec::with_capacity(1 + 2 * batch.len());
            args.push(Value::Integer(max_len));
            for message in batch {
                args.push(Value::Integer(message.offset));
                args.push(Value::String(message.content.as_str().into()));
            }
            args
        };
        for _ in 0..2 {
            let sha = match &self.sha {
                Some(sha) => sha.clone(),
                None => {
                    let sha: String = client.script_load(APPEND_SCRIPT).await?;
                    self.sha.insert(sha).clone()
                }
            };
            match client.evalsha::<Value, _, _, _>(sha, key, args()).await {
                Err(error) if error.details().starts_with("NOSCRIPT") => self.sha = None,
                result => return result.map(drop),
            }
        }
        Err(fred::error::Error::new(
            fred::error::ErrorKind::Unknown,
            "redis forgot the append script right after loading it",
        ))
    }
}

/// Trims entries released more than `max_age` ago (by this node's clock of releases).
async fn trim_by_age(
    client: &Client,
    key: &str,
    released_at: &mut VecDeque<(Instant, i64)>,
    max_age: Duration,
) {
    let now = Instant::now();
    let mut expired = None;
    while let Some(&(at, offset)) = released_at.front()
        && now.duration_since(at) > max_age
    {
        expired = Some(offset);
        released_at.pop_front();
    }
    let Some(offset) = expired else { return };
    let min_id = format!("{}-0", offset + 1);
    match XCap::try_from((XCapKind::MinID, XCapTrim::AlmostExact, min_id)) {
        Ok(cap) => {
            if let Err(error) = client.xtrim::<Value, _, _>(key, cap).await {
                tracing::warn!(error = %error, "stream trim failed");
            }
        }
        Err(error) => tracing::warn!(error = %error, "could not build a stream trim"),
    }
}
