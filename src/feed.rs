//! The node's ordered feed: the one place where messages meet local sockets, in offset order.
//!
//! Messages reach the feed from this node's writer, from other nodes over the bus, and from the
//! store when either of those is late or lost. The feed releases them strictly in offset order
//! (`head` is the highest offset released; offsets are gapless, so a hole is always a message
//! that is committed but not yet here) and holds each socket's cursor, the last offset that
//! socket was given. A socket is either *live* (it gets each released message as it is
//! released) or *catching up* (a task of its own feeds it from the ring or the store, with
//! backpressure, and turns it live under the lock once its cursor reaches `head`). Because both
//! the release of new messages and that switch happen under one lock, a socket can never miss a
//! message or receive one twice. See `docs/DESIGN.md`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    config::Settings,
    metrics::{ErrorKind, ReplaySource},
    recovery::RecoveryLog,
    runtime::Runtime,
    store::{Message, Store, StoreError},
};

/// Most messages a subscribe replays from the ring while holding the feed lock; a socket further
/// behind gets a catch-up task, so one reconnect never holds up every release for long.
const REPLAY_UNDER_LOCK: i64 = 64;
/// A catch-up waiting for room in a full socket buffer backs off from this...
const SEND_BACKOFF_MIN: Duration = Duration::from_millis(1);
/// ...doubling up to this.
const SEND_BACKOFF_MAX: Duration = Duration::from_millis(20);
/// A catch-up whose read failed (store or log down) tries again after this long.
const READ_RETRY: Duration = Duration::from_millis(200);
/// A catch-up that found nothing above its cursor although the feed's head is higher (only
/// while the store is being restored) looks again after this long.
const STORE_BEHIND_PAUSE: Duration = Duration::from_millis(100);

/// A catch-up page and where it came from.
type PageResult = Result<(Vec<Arc<Message>>, ReplaySource), StoreError>;

/// Identifies a subscriber (a socket id, as text).
pub type SubscriberId = Arc<str>;

/// Why a message could not be handed to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkError {
    /// The socket's send buffer is full; try again later.
    Full,
    /// The socket is gone.
    Closed,
}

/// Where the feed puts messages for one socket.
pub trait Sink: Send + Sync + 'static {
    /// Queues one message without waiting.
    fn send(&self, message: &Message) -> Result<(), SinkError>;
    /// Closes the connection (the client reconnects and catches up).
    fn disconnect(&self);
}

/// Feed tuning, taken from the settings.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// How long a hole may stay open before the feed reads it from the store.
    pub gap_timeout: Duration,
    /// How often the store's head is checked for messages no one announced.
    pub poll_interval: Duration,
    /// Recent messages kept in memory for catch-ups.
    pub ring_capacity: usize,
    /// Messages per store page during a catch-up.
    pub page_size: usize,
    /// How long a socket's buffer may stay full before it is disconnected.
    pub slow_consumer_timeout: Duration,
}

impl From<&Settings> for FeedOptions {
    fn from(settings: &Settings) -> Self {
        Self {
            gap_timeout: settings.feed.gap_timeout,
            poll_interval: settings.feed.poll_interval,
            ring_capacity: settings.feed.ring_capacity,
            page_size: settings.store.page_size,
            slow_consumer_timeout: settings.transport.slow_consumer_timeout,
        }
    }
}

/// A cheap handle to the node's feed.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    /// Where released messages are logged, and catch-ups read before the store.
    log: Arc<dyn RecoveryLog>,
    options: FeedOptions,
    /// Wakes the filler when a hole opens.
    hole: Notify,
    runtime: Runtime,
}

struct State {
    /// Highest offset released to sockets; everything at or below it has been released.
    head: i64,
    /// The newest released messages, contiguous, the last one at `head`.
    ring: VecDeque<Arc<Message>>,
    /// Messages above `head + 1` waiting for the hole below them to fill, with when they came.
    pending: BTreeMap<i64, (Instant, Arc<Message>)>,
    subscribers: HashMap<SubscriberId, Subscriber>,
}

/// A page read ahead for a catch-up: the page after `after`.
struct Prefetch {
    after: i64,
    read: JoinHandle<PageResult>,
}

/// Where a catching-up subscriber stands.
enum Position {
    /// Its cursor reached the head: it was turned live.
    Live,
    /// It unsubscribed.
    Gone,
    /// Behind: its sink and cursor, and the next page when the ring still holds it.
    Behind {
        sink: Arc<dyn Sink>,
        cursor: i64,
        ring_page: Option<Vec<Arc<Message>>>,
    },
}

impl State {
    /// Moves `head` over every pending message that continues it, keeping each in the ring;
    /// returns them in offset order with when they arrived.
    fn release_contiguous(&mut self, ring_capacity: usize) -> Vec<(Instant, Arc<Message>)> {
        let mut released = Vec::new();
        while let Some((arrived, message)) = self.pending.remove(&(self.head + 1)) {
            self.head = message.offset;
            if self.ring.len() == ring_capacity {
                self.ring.pop_front();
            }
            self.ring.push_back(message.clone());
            released.push((arrived, message));
        }
        released
    }

    /// The ring's messages after `after`, when the ring still holds `after + 1`.
    fn ring_after(&self, after: i64) -> Option<impl Iterator<Item = &Arc<Message>>> {
        let start = self.ring.front()?.offset;
        let skip = usize::try_from(after + 1 - start).ok()?;
        Some(self.ring.range(skip.min(self.ring.len())..))
    }
}

struct Subscriber {
    sink: Arc<dyn Sink>,
    /// The last offset this socket was given (or already had when it connected).
    cursor: i64,
    /// Live subscribers get released messages directly; the others have a catch-up task.
    live: bool,
}

impl Feed {
    /// Starts a feed whose head is the store's current head, with its filler task.
    pub fn start(
        head: i64,
        store: Arc<dyn Store>,
        log: Arc<dyn RecoveryLog>,
        options: FeedOptions,
        runtime: &Runtime,
    ) -> Self {
        let feed = Feed {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    head,
                    ring: VecDeque::new(),
                    pending: BTreeMap::new(),
                    subscribers: HashMap::new(),
                }),
                store,
                log,
                options,
                hole: Notify::new(),
                runtime: runtime.clone(),
            }),
        };
        runtime.spawn(feed.clone().fill());
        feed
    }

    /// The highest offset released on this node.
    pub fn head(&self) -> i64 {
        self.lock().head
    }

    /// Takes committed messages from any source, in any order, duplicates allowed.
    pub fn ingest(&self, messages: impl IntoIterator<Item = Arc<Message>>) {
        let arrived = Instant::now();
        let mut state = self.lock();
        for message in messages {
            if message.offset > state.head {
                state.pending.insert(message.offset, (arrived, message));
            }
        }
        let released = state.release_contiguous(self.inner.options.ring_capacity);
        if !released.is_empty() {
            let messages: Vec<Arc<Message>> = released.iter().map(|(_, m)| m.clone()).collect();
            let metrics = &self.inner.runtime.metrics;
            metrics.feed_messages.inc_by(messages.len() as u64);
            self.inner.log.append(&messages);
            self.release(&mut state, &messages);
            let handed_off = Instant::now();
            for (arrived, _) in &released {
                metrics
                    .delivery
                    .observe(handed_off.duration_since(*arrived).as_secs_f64());
            }
        }
        let hole = !state.pending.is_empty();
        drop(state);
        if hole {
            self.inner.hole.notify_one();
        }
    }

    /// Gives newly released messages to every live subscriber; called with the lock held.
    fn release(&self, state: &mut State, released: &[Arc<Message>]) {
        let mut fallen_behind = Vec::new();
        let mut gone = Vec::new();
        let mut delivered = 0u64;
        for (id, sub) in state.subscribers.iter_mut().filter(|(_, s)| s.live) {
            for message in released {
                if message.offset <= sub.cursor {
                    continue;
                }
                match sub.sink.send(message) {
                    Ok(()) => {
                        sub.cursor = message.offset;
                        delivered += 1;
                    }
                    Err(SinkError::Full) => {
                        sub.live = false;
                        fallen_behind.push(id.clone());
                        break;
                    }
                    Err(SinkError::Closed) => {
                        gone.push(id.clone());
                        break;
                    }
                }
            }
        }
        self.inner.runtime.metrics.deliveries.inc_by(delivered);
        for id in gone {
            state.subscribers.remove(&id);
        }
        for id in fallen_behind {
            self.spawn_catch_up(id);
        }
    }

    /// Adds a socket that has seen everything up to `after`; it gets the rest, then live ones.
    pub fn subscribe(&self, id: SubscriberId, sink: Arc<dyn Sink>, after: i64) {
        let mut state = self.lock();
        let mut sub = Subscriber {
            sink,
            cursor: after,
            live: true,
        };
        if after < state.head {
            // Serve from memory right here when the ring reaches back far enough and the socket
            // has room; otherwise a catch-up task takes over (the socket is not live until then).
            let near = state.head - after <= REPLAY_UNDER_LOCK;
            match state.ring_after(after).filter(|_| near) {
                Some(missed) => {
                    let metrics = &self.inner.runtime.metrics;
                    metrics.replay_started(ReplaySource::Ring);
                    metrics.replay_read(ReplaySource::Ring);
                    for message in missed {
                        match sub.sink.send(message) {
                            Ok(()) => sub.cursor = message.offset,
                            Err(SinkError::Full) => {
                                sub.live = false;
                                break;
                            }
                            Err(SinkError::Closed) => return,
                        }
                    }
                    let sent = (sub.cursor - after) as u64;
                    metrics.replayed(ReplaySource::Ring, sent);
                    metrics.deliveries.inc_by(sent);
                }
                None => sub.live = false,
            }
        }
        let live = sub.live;
        state.subscribers.insert(id.clone(), sub);
        drop(state);
        if !live {
            self.spawn_catch_up(id);
        }
    }

    /// Forgets a socket (it disconnected).
    pub fn unsubscribe(&self, id: &str) {
        self.lock().subscribers.remove(id);
    }

    /// How many sockets the feed serves.
    pub fn subscribers(&self) -> usize {
        self.lock().subscribers.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would leave no invariant half-updated that a later
        // caller could not live with, so a poisoned lock is used as is.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn spawn_catch_up(&self, id: SubscriberId) {
        let feed = self.clone();
        let cancel = self.inner.runtime.cancel.clone();
        self.inner.runtime.spawn(async move {
            tokio::select! {
                () = feed.catch_up(id) => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    /// Feeds one subscriber page by page until its cursor reaches `head`, then makes it live.
    /// Each page comes from the ring when it still holds `cursor + 1`, else the recovery log,
    /// else the store (`docs/DESIGN.md`, "A catch-up, page by page").
    async fn catch_up(self, id: SubscriberId) {
        let metrics = self.inner.runtime.metrics.clone();
        let started = Instant::now();
        let mut first_source = None;
        // The next log or store page, read while the current one is being sent.
        let mut prefetched: Option<Prefetch> = None;
        loop {
            let (sink, cursor, ring_page) = match self.position(&id) {
                Position::Live => {
                    metrics.replay.observe(started.elapsed().as_secs_f64());
                    return;
                }
                Position::Gone => return,
                Position::Behind {
                    sink,
                    cursor,
                    ring_page,
                } => (sink, cursor, ring_page),
            };
            let (page, source) = match ring_page {
                Some(page) => {
                    metrics.replay_read(ReplaySource::Ring);
                    (page, ReplaySource::Ring)
                }
                None => match self.next_page(&id, cursor, prefetched.take()).await {
                    Ok(found) => found,
                    Err(error) => {
                        metrics.error(ErrorKind::Store);
                        tracing::warn!(error = %error, subscriber = %id, "catch-up read failed; retrying");
                        tokio::time::sleep(READ_RETRY).await;
                        continue;
                    }
                },
            };
            if first_source.is_none() {
                first_source = Some(source);
                metrics.replay_started(source);
            }
            prefetched = self.prefetch(&id, &page, source);
            let Some(last) = self.send_page(&id, &*sink, cursor, &page).await else {
                return;
            };
            let sent = (last - cursor) as u64;
            metrics.replayed(source, sent);
            metrics.deliveries.inc_by(sent);
            if let Some(sub) = self.lock().subscribers.get_mut(&id) {
                sub.cursor = last;
            }
            if page.is_empty() {
                tokio::time::sleep(STORE_BEHIND_PAUSE).await;
            }
        }
    }

    /// Where a catching-up subscriber stands, under the lock: turned live if its cursor reached
    /// the head (so no release can slip between the check and the switch), else what it needs.
    fn position(&self, id: &str) -> Position {
        let mut state = self.lock();
        let head = state.head;
        let ring_page = {
            let Some(sub) = state.subscribers.get(id) else {
                return Position::Gone;
            };
            if sub.cursor >= head {
                None
            } else {
                Some((
                    sub.sink.clone(),
                    sub.cursor,
                    state
                        .ring_after(sub.cursor)
                        .map(|m| m.take(self.inner.options.page_size).cloned().collect()),
                ))
            }
        };
        match ring_page {
            None => {
                if let Some(sub) = state.subscribers.get_mut(id) {
                    sub.live = true;
                }
                Position::Live
            }
            Some((sink, cursor, ring_page)) => Position::Behind {
                sink,
                cursor,
                ring_page,
            },
        }
    }

    /// Starts reading the page after a full log or store page, so it is ready when this one is
    /// sent. A short page is the last one; the ring needs no read.
    fn prefetch(
        &self,
        id: &SubscriberId,
        page: &[Arc<Message>],
        source: ReplaySource,
    ) -> Option<Prefetch> {
        if source == ReplaySource::Ring || page.len() < self.inner.options.page_size {
            return None;
        }
        let after = page.last()?.offset;
        let (feed, id) = (self.clone(), id.clone());
        let read = self
            .inner
            .runtime
            .tasks
            .spawn(async move { feed.page_after(&id, after).await });
        Some(Prefetch { after, read })
    }

    /// Sends a page with backpressure; the offset of its last message (`cursor` for an empty
    /// page), or `None` when the socket is gone or was cut off as a slow consumer.
    async fn send_page(
        &self,
        id: &str,
        sink: &dyn Sink,
        cursor: i64,
        page: &[Arc<Message>],
    ) -> Option<i64> {
        let mut last = cursor;
        for message in page {
            match self.send_when_room(sink, message).await {
                Ok(()) => last = message.offset,
                Err(SinkError::Closed) => {
                    self.unsubscribe(id);
                    return None;
                }
                Err(SinkError::Full) => {
                    self.inner.runtime.metrics.error(ErrorKind::SlowConsumer);
                    tracing::info!(subscriber = %id, "disconnecting a socket that stopped reading");
                    self.unsubscribe(id);
                    sink.disconnect();
                    return None;
                }
            }
        }
        Some(last)
    }

    /// The page after `cursor`: the one prefetched for it if there is one, else read now.
    async fn next_page(&self, id: &str, cursor: i64, prefetched: Option<Prefetch>) -> PageResult {
        match prefetched {
            Some(Prefetch { after, read }) if after == cursor => match read.await {
                Ok(result) => result,
                Err(_) => self.page_after(id, cursor).await,
            },
            Some(Prefetch { read, .. }) => {
                read.abort();
                self.page_after(id, cursor).await
            }
            None => self.page_after(id, cursor).await,
        }
    }

    /// The next page after `cursor` from the recovery log, or from the store when the log does
    /// not hold `cursor + 1` (or cannot be read).
    async fn page_after(&self, id: &str, cursor: i64) -> PageResult {
        let page_size = self.inner.options.page_size;
        let metrics = &self.inner.runtime.metrics;
        metrics.replay_read(ReplaySource::Log);
        match self.inner.log.read_after(cursor, page_size).await {
            Ok(page) if !page.is_empty() => return Ok((page, ReplaySource::Log)),
            Ok(_) => {}
            Err(error) => {
                metrics.error(ErrorKind::RecoveryLog);
                tracing::debug!(error = %error, subscriber = %id, "recovery log unreadable; reading the store");
            }
        }
        metrics.replay_read(ReplaySource::Database);
        let rows = self.inner.store.read_after(cursor, page_size).await?;
        Ok((
            rows.into_iter().map(Arc::new).collect(),
            ReplaySource::Database,
        ))
    }

    /// Sends one message, waiting (with backoff) while the socket's buffer is full; gives up
    /// with `Full` after the slow-consumer timeout.
    async fn send_when_room(&self, sink: &dyn Sink, message: &Message) -> Result<(), SinkError> {
        let started = Instant::now();
        let mut pause = SEND_BACKOFF_MIN;
        loop {
            match sink.send(message) {
                Err(SinkError::Full) => {
                    if started.elapsed() > self.inner.options.slow_consumer_timeout {
                        return Err(SinkError::Full);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(SEND_BACKOFF_MAX);
                }
                other => return other,
            }
        }
    }

    /// Fills holes and picks up messages no one announced: after `gap_timeout` when a hole
    /// opens, and every `poll_interval` regardless (a node that crashed between commit and
    /// publish, or a bus that is down, delays messages by at most that long).
    async fn fill(self) {
        let options = self.inner.options.clone();
        let mut poll = tokio::time::interval(options.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let polled = tokio::select! {
                () = self.inner.runtime.cancel.cancelled() => return,
                () = self.inner.hole.notified() => {
                    tokio::select! {
                        () = self.inner.runtime.cancel.cancelled() => return,
                        () = tokio::time::sleep(options.gap_timeout) => {}
                    }
                    false
                }
                _ = poll.tick() => true,
            };
            if let Err(error) = self.fill_once(polled).await {
                self.inner.runtime.metrics.error(ErrorKind::Store);
                tracing::warn!(error = %error, "feed could not read the store; will retry");
            }
        }
    }

    async fn fill_once(&self, polled: bool) -> Result<(), StoreError> {
        loop {
            let (head, hole) = {
                let state = self.lock();
                (state.head, state.pending.keys().next().copied())
            };
            let target = match hole {
                Some(above) => above - 1,
                None if polled => self.inner.store.head().await?,
                None => return Ok(()),
            };
            if target <= head {
                return Ok(());
            }
            let want = usize::try_from(target - head)
                .unwrap_or(usize::MAX)
                .min(self.inner.options.page_size);
            let rows = self.inner.store.read_after(head, want).await?;
            if rows.is_empty() {
                return Ok(());
            }
            self.inner
                .runtime
                .metrics
                .gap_fills
                .inc_by(rows.len() as u64);
            self.ingest(rows.into_iter().map(Arc::new));
        }
    }
}
