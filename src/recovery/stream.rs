//! The cluster's recovery log: a Redis stream per room, `{prefix}:log:{epoch}` for the default
//! room and `{prefix}:log:{epoch}:room:{name}` for the others, whose entry ids are the room's
//! offsets (`{offset}-0`), appended by every node that follows the room a batch per script call,
//! trimmed by count, bytes and age, and expiring when the room falls silent. `docs/DESIGN.md`,
//! "The stream", argues why it has no holes and why readers need not trust it anyway.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
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
use futures_util::future::{BoxFuture, join_all};
use tokio::sync::mpsc;

use super::{ReadError, RecoveryLog, Retention, entry_bytes};
use crate::{
    metrics::{ErrorKind, Metrics},
    rooms::Room,
    runtime::Runtime,
    store::Message,
};

/// Appends a batch, skipping what another node appended first; see the script's own comment.
const APPEND_SCRIPT: &str = include_str!("append.lua");

/// The cluster's log, in Redis streams.
pub struct StreamLog {
    client: Client,
    keys: StreamKeys,
    tx: mpsc::Sender<Vec<Arc<Message>>>,
    metrics: Arc<Metrics>,
}

/// The names of the rooms' streams.
#[derive(Clone)]
struct StreamKeys {
    /// `{prefix}:log:{epoch}`: the default room's stream (the name it had before rooms), and
    /// the start of every other room's.
    base: Arc<str>,
}

impl StreamKeys {
    fn of(&self, room: &Room) -> String {
        if room.is_default() {
            self.base.to_string()
        } else {
            format!("{}:room:{}", self.base, room.key())
        }
    }
}

/// The content field of each stream entry (the append script writes it as `c`).
const CONTENT: &str = "c";
/// The field holding the sender's name.
const NAME: &str = "n";
/// The field holding the time the message was accepted (milliseconds since the Unix epoch).
const AT: &str = "t";
/// Most messages per append command.
const APPEND_BATCH: usize = 1024;
/// Released batches waiting for the appender. Bounded: if Redis is slower than the feed,
/// appends are dropped rather than queued without limit; a dropped message leaves the stream
/// short, which readers detect.
const APPEND_QUEUE: usize = 4096;
/// How often the appender samples when it released which offset: the clock of the age trim.
const RELEASE_SAMPLE: Duration = Duration::from_secs(1);
/// The age trim runs this many times per `recovery.max_age`, but not more often than
/// `AGE_TRIM_MIN` nor less often than `AGE_TRIM_MAX`.
const AGE_TRIMS_PER_MAX_AGE: u32 = 10;
const AGE_TRIM_MIN: Duration = Duration::from_secs(1);
const AGE_TRIM_MAX: Duration = Duration::from_secs(60);

impl StreamLog {
    /// The streams `{prefix}:log:{epoch}...`, with their appender task.
    pub fn start(
        client: Client,
        prefix: &str,
        epoch: &str,
        retention: Retention,
        runtime: &Runtime,
    ) -> Self {
        let keys = StreamKeys {
            base: format!("{prefix}:log:{epoch}").into(),
        };
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        runtime.spawn(appender(
            client.clone(),
            keys.clone(),
            rx,
            retention,
            runtime.clone(),
        ));
        Self {
            client,
            keys,
            tx,
            metrics: runtime.metrics.clone(),
        }
    }
}

impl RecoveryLog for StreamLog {
    fn append(&self, messages: &[Arc<Message>]) {
        if self.tx.try_send(messages.to_vec()).is_err() {
            self.metrics.error(ErrorKind::RecoveryLog);
        }
    }

    fn read_after<'a>(
        &'a self,
        room: &'a Room,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<Message>>, ReadError>> {
        Box::pin(async move {
            let start = format!("{}-0", after + 1);
            let count = u64::try_from(limit).unwrap_or(u64::MAX);
            let entries: Vec<(String, Vec<(String, String)>)> = self
                .client
                .xrange(self.keys.of(room), start, "+", Some(count))
                .await?;
            let mut page = Vec::with_capacity(entries.len());
            for (next, (id, fields)) in (after + 1..).zip(entries) {
                let offset = id
                    .strip_suffix("-0")
                    .and_then(|n| n.parse::<i64>().ok())
                    .ok_or_else(|| ReadError::Malformed(id.clone()))?;
                // Only the run that starts at `after + 1` with no hole counts.
                if offset != next {
                    break;
                }
                // An entry without a name or time (appended by the version before names) is
                // unreadable: the feed then reads the store.
                let (mut content, mut name, mut at) = (None, None, None);
                for (field, value) in fields {
                    match field.as_str() {
                        CONTENT => content = Some(value),
                        NAME => name = Some(value),
                        AT => at = value.parse::<i64>().ok(),
                        _ => {}
                    }
                }
                let (Some(content), Some(name), Some(at)) = (content, name, at) else {
                    return Err(ReadError::Malformed(id));
                };
                page.push(Arc::new(Message {
                    room: room.clone(),
                    offset,
                    content,
                    name,
                    at,
                }));
            }
            Ok(page)
        })
    }
}

/// What the appender keeps of one room to trim its stream.
struct RoomTrim {
    /// When offsets were released here, sampled every RELEASE_SAMPLE: the age trim's clock.
    released_at: VecDeque<(Instant, i64)>,
    budget: ByteBudget,
    /// When the room last released a message here.
    last: Instant,
}

/// Appends what the feed released, in order, room by room, and trims each room's stream by
/// count, bytes and age.
async fn appender(
    client: Client,
    keys: StreamKeys,
    mut rx: mpsc::Receiver<Vec<Arc<Message>>>,
    retention: Retention,
    runtime: Runtime,
) {
    let (metrics, cancel) = (&runtime.metrics, &runtime.cancel);
    let mut rooms: HashMap<Room, RoomTrim> = HashMap::new();
    let trim_every = (retention.max_age / AGE_TRIMS_PER_MAX_AGE).clamp(AGE_TRIM_MIN, AGE_TRIM_MAX);
    let mut trim = tokio::time::interval(trim_every);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max_len = i64::try_from(retention.max_len).unwrap_or(i64::MAX);
    // The stream outlives its last append by twice the age limit: by then it holds nothing a
    // reader may use.
    let ttl_ms = i64::try_from(retention.max_age.as_millis().saturating_mul(2))
        .unwrap_or(i64::MAX)
        .max(1);
    // Logged when appends start and stop failing, not for every batch while Redis is down.
    let mut failing = false;
    let mut script = AppendScript { sha: None };
    loop {
        let first = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            first = rx.recv() => first,
            _ = trim.tick() => {
                for (room, state) in &mut rooms {
                    trim_by_age(&client, &keys.of(room), &mut state.released_at, retention.max_age).await;
                }
                // A room silent for longer than the age limit has nothing left to trim.
                let now = Instant::now();
                rooms.retain(|_, state| now.duration_since(state.last) <= retention.max_age);
                continue;
            }
        };
        let Some(first) = first else { break };
        let mut size = first.len();
        let mut batches = vec![first];
        while size < APPEND_BATCH {
            match rx.try_recv() {
                Ok(more) => {
                    size += more.len();
                    batches.push(more);
                }
                Err(_) => break,
            }
        }
        let by_room = group_by_room(batches);
        let results = script
            .run_all(&client, &keys, &by_room, max_len, ttl_ms)
            .await;
        let now = Instant::now();
        for (batch, result) in by_room.iter().zip(results) {
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
                continue;
            };
            let state = rooms.entry(first.room.clone()).or_insert_with(|| RoomTrim {
                released_at: VecDeque::new(),
                budget: ByteBudget::new(retention),
                last: now,
            });
            state.last = now;
            // Every node that follows the room releases every message of it, so each one's
            // count of the stream's bytes is the same whether its own append or another node's
            // put them there.
            if let Some(below) = state.budget.record(batch) {
                trim_below(&client, &keys.of(&first.room), below).await;
            }
            if state
                .released_at
                .back()
                .is_none_or(|(at, _)| now.duration_since(*at) >= RELEASE_SAMPLE)
            {
                state.released_at.push_back((now, last.offset));
            }
            if result.is_err() {
                metrics.error(ErrorKind::RecoveryLog);
            }
            if result.is_err() != failing {
                failing = !failing;
                if let Err(error) = result {
                    tracing::warn!(error = %error, "stream appends failing; reconnects read the database meanwhile");
                } else {
                    tracing::info!("stream appends work again");
                }
            }
        }
    }
}

/// Released batches regrouped by room, each room's messages in the order they came (each batch
/// holds one room's).
fn group_by_room(batches: Vec<Vec<Arc<Message>>>) -> Vec<Vec<Arc<Message>>> {
    let mut slots: HashMap<Room, usize> = HashMap::new();
    let mut grouped: Vec<Vec<Arc<Message>>> = Vec::new();
    for batch in batches {
        let Some(room) = batch.first().map(|m| m.room.clone()) else {
            continue;
        };
        match slots.get(&room) {
            Some(&slot) => grouped[slot].extend(batch),
            None => {
                slots.insert(room, grouped.len());
                grouped.push(batch);
            }
        }
    }
    grouped
}

/// The append script: loaded once for its hash, run by hash, and by its text on a server that
/// has not seen it (a restart, another cluster master, a promoted replica).
struct AppendScript {
    sha: Option<String>,
}

impl AppendScript {
    /// Runs the script for each room's batch at once (the client pipelines them); each batch's
    /// result in order.
    async fn run_all(
        &mut self,
        client: &Client,
        keys: &StreamKeys,
        batches: &[Vec<Arc<Message>>],
        max_len: i64,
        ttl_ms: i64,
    ) -> Vec<Result<(), fred::error::Error>> {
        if let [batch] = batches {
            let key = batch.first().map(|m| keys.of(&m.room)).unwrap_or_default();
            return vec![self.run(client, &key, batch, max_len, ttl_ms).await];
        }
        if self.sha.is_none() {
            match client.script_load::<String, _>(APPEND_SCRIPT).await {
                Ok(sha) => self.sha = Some(sha),
                Err(error) => return batches.iter().map(|_| Err(error.clone())).collect(),
            }
        }
        let sha = self.sha.clone().unwrap_or_default();
        let attempts = batches.iter().map(|batch| {
            let key = batch.first().map(|m| keys.of(&m.room)).unwrap_or_default();
            let sha = sha.clone();
            async move {
                client
                    .evalsha::<Value, _, _, _>(sha, key, script_args(batch, max_len, ttl_ms))
                    .await
                    .map(drop)
            }
        });
        let mut results = join_all(attempts).await;
        // A server that has not seen the script: run those again one by one, as `run` does.
        for (batch, result) in batches.iter().zip(results.iter_mut()) {
            if let Err(error) = result
                && is_noscript(error)
            {
                let key = batch.first().map(|m| keys.of(&m.room)).unwrap_or_default();
                *result = self.run(client, &key, batch, max_len, ttl_ms).await;
            }
        }
        results
    }

    /// Runs the script for `batch`; loads it first when needed.
    async fn run(
        &mut self,
        client: &Client,
        key: &str,
        batch: &[Arc<Message>],
        max_len: i64,
        ttl_ms: i64,
    ) -> Result<(), fred::error::Error> {
        // The arguments are built per attempt: a retry with the script's text is rare, and
        // cloning them on every call is not.
        let args = || script_args(batch, max_len, ttl_ms);
        let sha = match &self.sha {
            Some(sha) => sha.clone(),
            None => {
                let sha: String = client.script_load(APPEND_SCRIPT).await?;
                self.sha.insert(sha).clone()
            }
        };
        match client.evalsha::<Value, _, _, _>(sha, key, args()).await {
            // The server holding the key has not seen the script: it restarted, or it is a
            // cluster master other than the one that loaded it, or a replica that took over.
            // EVAL runs the text and leaves it cached there for the next EVALSHA.
            Err(error) if is_noscript(&error) => client
                .eval::<Value, _, _, _>(APPEND_SCRIPT, key, args())
                .await
                .map(drop),
            result => result.map(drop),
        }
    }
}

/// Whether Redis refused an `EVALSHA` for not knowing the script.
fn is_noscript(error: &fred::error::Error) -> bool {
    error.details().starts_with("NOSCRIPT")
}

/// The append script's arguments for `batch` (see the script).
fn script_args(batch: &[Arc<Message>], max_len: i64, ttl_ms: i64) -> Vec<Value> {
    let mut args = Vec::with_capacity(2 + 4 * batch.len());
    args.push(Value::Integer(max_len));
    args.push(Value::Integer(ttl_ms));
    for message in batch {
        args.push(Value::Integer(message.offset));
        args.push(Value::String(message.content.as_str().into()));
        args.push(Value::String(message.name.as_str().into()));
        args.push(Value::Integer(message.at));
    }
    args
}

/// The bytes of the newest released messages, in runs of consecutive offsets, so the appender
/// knows below which offset the stream holds more than `Retention::max_bytes`.
struct ByteBudget {
    /// `(last offset, messages, bytes)` of each run, oldest first.
    runs: VecDeque<(i64, usize, usize)>,
    /// Messages and bytes in `runs`.
    messages: usize,
    bytes: usize,
    retention: Retention,
}

/// Messages in one run of a [`ByteBudget`]: the granularity of a trim by bytes (the stream
/// keeps up to one run less than `max_bytes` allows), and what bounds the runs kept to
/// `max_len / RUN` entries.
const RUN: usize = 64;

impl ByteBudget {
    fn new(retention: Retention) -> Self {
        Self {
            runs: VecDeque::new(),
            messages: 0,
            bytes: 0,
            retention,
        }
    }

    /// Counts a released batch; the offset below which the stream must be trimmed to fit
    /// `max_bytes`, if it no longer does.
    fn record(&mut self, batch: &[Arc<Message>]) -> Option<i64> {
        for message in batch {
            let bytes = entry_bytes(message);
            match self.runs.back_mut() {
                Some(run) if run.1 < RUN => *run = (message.offset, run.1 + 1, run.2 + bytes),
                _ => self.runs.push_back((message.offset, 1, bytes)),
            }
            self.messages += 1;
            self.bytes += bytes;
        }
        let mut first = None;
        while self.bytes > self.retention.max_bytes || self.messages > self.retention.max_len {
            let Some((run_last, messages, bytes)) = self.runs.pop_front() else {
                break;
            };
            self.messages -= messages;
            self.bytes -= bytes;
            // Beyond the count the stream's own MAXLEN trims; only bytes need a trim here.
            if self.bytes + bytes > self.retention.max_bytes {
                first = Some(run_last + 1);
            }
        }
        first
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
    if let Some(offset) = expired {
        trim_below(client, key, offset + 1).await;
    }
}

/// Trims the entries below `first` (approximately: whole stream nodes, so a few more are kept).
async fn trim_below(client: &Client, key: &str, first: i64) {
    let min_id = format!("{first}-0");
    match XCap::try_from((XCapKind::MinID, XCapTrim::AlmostExact, min_id)) {
        Ok(cap) => {
            if let Err(error) = client.xtrim::<Value, _, _>(key, cap).await {
                tracing::warn!(error = %error, "stream trim failed");
            }
        }
        Err(error) => tracing::warn!(error = %error, "could not build a stream trim"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_trims_below_the_oldest_run_that_still_fits() {
        let message = |offset| {
            Arc::new(Message {
                room: Room::default_room(),
                offset,
                content: "x".repeat(936),
                name: String::new(),
                at: 0,
            })
        };
        // 1000 bytes an entry with the overhead; room for 200.
        assert_eq!(entry_bytes(&message(1)), 1000);
        let mut budget = ByteBudget::new(Retention {
            max_len: 1_000_000,
            max_bytes: 200_000,
            max_age: Duration::from_secs(60),
        });
        let batch = |range: std::ops::RangeInclusive<i64>| range.map(message).collect::<Vec<_>>();
        assert_eq!(budget.record(&batch(1..=150)), None);
        // 250 messages in runs of 64: the oldest run that still fits starts at 65, so the
        // stream keeps 65..=250, 186 messages.
        assert_eq!(budget.record(&batch(151..=250)), Some(65));
        assert_eq!((budget.messages, budget.bytes), (186, 186_000));
        // A batch larger than the whole budget keeps the newest runs that fit, not nothing.
        assert_eq!(budget.record(&batch(251..=1250)), Some(1089));
        assert!(
            (150_000..=200_000).contains(&budget.bytes),
            "{}",
            budget.bytes
        );
        // Small batches merge into runs of RUN messages.
        for offset in 1251..=1400 {
            budget.record(&batch(offset..=offset));
        }
        assert!(budget.bytes <= 200_000, "{}", budget.bytes);
        assert!(
            budget.runs.len() <= 200 / RUN + 2,
            "{:?}",
            budget.runs.len()
        );
        // A run dropped for the count alone asks for no trim: MAXLEN does that.
        let mut by_count = ByteBudget::new(Retention {
            max_len: 10,
            max_bytes: usize::MAX,
            max_age: Duration::from_secs(60),
        });
        assert_eq!(by_count.record(&batch(1..=20)), None);
    }
}
