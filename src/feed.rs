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
    sync::{Arc, Mutex, MutexGuard, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use tokio::{sync::Notify, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    log::RecoveryLog,
    metrics::{ErrorKind, Metrics, ReplaySource},
    store::{Message, Store, StoreError},
};

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
    metrics: Arc<Metrics>,
    /// Wakes the filler when a hole opens.
    hole: Notify,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

struct State {
    /// Highest offset released to sockets; everything at or below it has been released.
    head: i64,
    /// The newest released messages, contiguous, the last one at `head`.
    ring: VecDeque<Arc<Message>>,
    /// Messages above `head + 1` waiting for the hole below them to fill.
    pending: BTreeMap<i64, Arc<Message>>,
    subscribers: HashMap<SubscriberId, Subscriber>,
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
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
        cancel: CancellationToken,
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
                metrics,
                hole: Notify::new(),
                tasks: tasks.clone(),
                cancel,
            }),
        };
        tasks.spawn(feed.clone().fill());
        feed
    }

    /// The highest offset released on this node.
    pub fn head(&self) -> i64 {
        self.lock().head
    }

    /// Takes committed messages from any source, in any order, duplicates allowed.
    pub fn ingest(&self, messages: impl IntoIterator<Item = Arc<Message>>) {
        let mut state = self.lock();
        for message in messages {
            if message.offset > state.head {
                state.pending.insert(message.offset, message);
            }
        }
        let mut released = Vec::new();
        loop {
            let next = state.head + 1;
            let Some(message) = state.pending.remove(&next) else {
                break;
            };
            state.head = next;
            if state.ring.len() == self.inner.options.ring_capacity {
                state.ring.pop_front();
            }
            state.ring.push_back(message.clone());
            released.push(message);
        }
        if !released.is_empty() {
            self.inner
                .metrics
                .feed_messages
                .fetch_add(released.len() as u64, Relaxed);
            self.inner.log.append(&released);
            self.release(&mut state, &released);
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
        self.inner.metrics.deliveries.fetch_add(delivered, Relaxed);
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
        let head = state.head;
        let mut sub = Subscriber {
            sink,
            cursor: after,
            live: true,
        };
        if after < head {
            // Serve from memory right here when the ring reaches back far enough and the socket
            // has room; otherwise a catch-up task takes over (the socket is not live until then).
            let start = state.ring.front().map_or(i64::MAX, |m| m.offset);
            if after + 1 >= start && usize::try_from(head - after).is_ok_and(|n| n <= 64) {
                self.inner.metrics.replay(ReplaySource::Memory);
                for message in state
                    .ring
                    .range(usize::try_from(after + 1 - start).unwrap_or(0)..)
                {
                    match sub.sink.send(message) {
                        Ok(()) => sub.cursor = message.offset,
                        Err(SinkError::Full) => {
                            sub.live = false;
                            break;
                        }
                        Err(SinkError::Closed) => return,
                    }
                }
                self.inner.metrics.replay_read(ReplaySource::Memory);
                self.inner
                    .metrics
                    .replayed(ReplaySource::Memory, (sub.cursor - after) as u64);
            } else {
                sub.live = false;
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
        let cancel = self.inner.cancel.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                () = feed.catch_up(id) => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    /// Feeds one subscriber until its cursor reaches `head`, then makes it live.
    async fn catch_up(self, id: SubscriberId) {
        let page_size = self.inner.options.page_size;
        let mut counted = None;
        // The next log or store page, read while the current one is being sent.
        let mut prefetched: Option<(i64, JoinHandle<PageResult>)> = None;
        loop {
            let (sink, cursor, from_ring) = {
                let mut state = self.lock();
                let head = state.head;
                let start = state.ring.front().map_or(i64::MAX, |m| m.offset);
                let Some(sub) = state.subscribers.get_mut(&id) else {
                    return;
                };
                if sub.cursor >= head {
                    sub.live = true;
                    return;
                }
                let cursor = sub.cursor;
                let sink = sub.sink.clone();
                let from_ring: Option<Vec<Arc<Message>>> = (cursor + 1 >= start).then(|| {
                    let skip = usize::try_from(cursor + 1 - start).unwrap_or(0);
                    state.ring.range(skip..).take(page_size).cloned().collect()
                });
                (sink, cursor, from_ring)
            };
            let (page, source) = match from_ring {
                Some(page) => {
                    self.inner.metrics.replay_read(ReplaySource::Memory);
                    (page, ReplaySource::Memory)
                }
                None => match self.next_page(&id, cursor, prefetched.take()).await {
                    Ok(found) => found,
                    Err(error) => {
                        self.inner.metrics.error(ErrorKind::Store);
                        tracing::warn!(error = %error, subscriber = %id, "catch-up read failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            if counted.is_none() {
                counted = Some(source);
                self.inner.metrics.replay(source);
            }
            if source != ReplaySource::Memory
                && page.len() == page_size
                && let Some(last) = page.last()
            {
                let (feed, id, after) = (self.clone(), id.clone(), last.offset);
                let read = self
                    .inner
                    .tasks
                    .spawn(async move { feed.page_after(&id, after).await });
                prefetched = Some((after, read));
            }
            let mut last = cursor;
            for message in &page {
                match self.send_when_room(&*sink, message).await {
                    Ok(()) => last = message.offset,
                    Err(SinkError::Closed) => {
                        self.unsubscribe(&id);
                        return;
                    }
                    Err(SinkError::Full) => {
                        self.inner.metrics.error(ErrorKind::SlowConsumer);
                        tracing::info!(subscriber = %id, "disconnecting a socket that stopped reading");
                        self.unsubscribe(&id);
                        sink.disconnect();
                        return;
                    }
                }
            }
            self.inner.metrics.replayed(source, (last - cursor) as u64);
            self.inner
                .metrics
                .deliveries
                .fetch_add((last - cursor) as u64, Relaxed);
            if let Some(sub) = self.lock().subscribers.get_mut(&id) {
                sub.cursor = last;
            }
            if page.is_empty() {
                // The store has nothing above the cursor although the feed's head is higher:
                // only possible while the store is being restored; wait for it.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The page after `cursor`: the one prefetched for it if there is one, else read now.
    async fn next_page(
        &self,
        id: &str,
        cursor: i64,
        prefetched: Option<(i64, JoinHandle<PageResult>)>,
    ) -> PageResult {
        match prefetched {
            Some((after, read)) if after == cursor => match read.await {
                Ok(result) => result,
                Err(_) => self.page_after(id, cursor).await,
            },
            Some((_, read)) => {
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
        self.inner.metrics.replay_read(ReplaySource::Stream);
        match self.inner.log.read_after(cursor, page_size).await {
            Ok(page) if !page.is_empty() => return Ok((page, ReplaySource::Stream)),
            Ok(_) => {}
            Err(error) => {
                self.inner.metrics.error(ErrorKind::Bus);
                tracing::debug!(error = %error, subscriber = %id, "recovery log unreadable; reading the store");
            }
        }
        self.inner.metrics.replay_read(ReplaySource::Database);
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
        let mut pause = Duration::from_millis(1);
        loop {
            match sink.send(message) {
                Err(SinkError::Full) => {
                    if started.elapsed() > self.inner.options.slow_consumer_timeout {
                        return Err(SinkError::Full);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
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
                () = self.inner.cancel.cancelled() => return,
                () = self.inner.hole.notified() => {
                    tokio::select! {
                        () = self.inner.cancel.cancelled() => return,
                        () = tokio::time::sleep(options.gap_timeout) => {}
                    }
                    false
                }
                _ = poll.tick() => true,
            };
            if let Err(error) = self.fill_once(polled).await {
                self.inner.metrics.error(ErrorKind::Store);
                tracing::warn!(error = %error, "feed could not read the store; will retry");
            }
        }
    }

    async fn fill_once(&self, polled: bool) -> Result<(), crate::store::StoreError> {
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
                .metrics
                .gap_fills
                .fetch_add(rows.len() as u64, Relaxed);
            self.ingest(rows.into_iter().map(Arc::new));
        }
    }
}
