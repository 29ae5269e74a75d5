//! The node's ordered feed: the one place where messages meet local sockets, in offset order,
//! room by room.
//!
//! Messages reach the feed from this node's writer, from other nodes over the bus, and from the
//! store when either of those is late or lost. The feed follows the rooms its sockets are in
//! (the default room always) and releases each room's messages strictly in offset order (a
//! room's `head` is the highest offset released; offsets are gapless, so a hole is always a
//! message that is committed but not yet here). It holds each member's cursor, the last offset
//! of the room that socket was given. A member is either *live* (it gets each released message
//! as it is released) or *catching up* (a task of its own feeds it from the ring, the recovery
//! log or the store, with backpressure, and turns it live under the lock once its cursor reaches
//! the room's head). Because both the release of new messages and that switch happen under one
//! lock, a socket can never miss a message or receive one twice. A person's sockets are members
//! of all their conversations without joining them. See `docs/DESIGN.md`.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    config::Settings,
    metrics::{ErrorKind, ReplaySource},
    recovery::RecoveryLog,
    rooms::Room,
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
/// A catch-up that found nothing above its cursor although the room's head is higher (only
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
    /// Queues one message (of any room the socket is in) without waiting.
    fn send(&self, message: &Message) -> Result<(), SinkError>;
    /// Closes the connection (the client reconnects and catches up).
    fn disconnect(&self);
}

/// Feed tuning, taken from the settings.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// How long a hole may stay open before the feed reads it from the store.
    pub gap_timeout: Duration,
    /// How often the store's heads are checked for messages no one announced.
    pub poll_interval: Duration,
    /// Recent messages kept in memory for catch-ups, per room.
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

/// Who a socket is, for the feed.
pub struct Subscriber {
    /// Where its messages go.
    pub sink: Arc<dyn Sink>,
    /// The person, when the socket has a name that can have conversations.
    pub person: Option<Arc<str>>,
    /// Where it starts in each conversation of its person that existed when it connected (the
    /// offset it recovers after, or the head less the history); a conversation not named began
    /// after it connected, so it starts at 0 there.
    pub conversations: HashMap<Room, i64>,
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
    /// The rooms this node follows: the default room, and every room a local socket is in.
    rooms: HashMap<Room, RoomFeed>,
    sockets: HashMap<SubscriberId, Socket>,
    /// The named people with sockets here, and those sockets, for their conversations.
    people: HashMap<Arc<str>, HashSet<SubscriberId>>,
}

/// A socket, as the feed knows it.
struct Socket {
    sink: Arc<dyn Sink>,
    person: Option<Arc<str>>,
    /// See [`Subscriber::conversations`].
    conversations: HashMap<Room, i64>,
    /// The rooms it is a member of.
    rooms: HashSet<Room>,
}

/// One room on this node.
struct RoomFeed {
    /// Highest offset released to sockets; everything at or below it has been released.
    head: i64,
    /// The newest released messages, contiguous, the last one at `head`.
    ring: VecDeque<Arc<Message>>,
    /// Messages above `head + 1` waiting for the hole below them to fill, with when they came.
    pending: BTreeMap<i64, (Instant, Arc<Message>)>,
    members: HashMap<SubscriberId, Member>,
}

/// A socket's place in one room.
struct Member {
    /// Where its messages go (its socket's sink).
    sink: Arc<dyn Sink>,
    /// The last offset this socket was given (or already had when it joined).
    cursor: i64,
    /// Live members get released messages directly; the others have a catch-up task.
    live: bool,
}

/// A page read ahead for a catch-up: the page after `after`.
struct Prefetch {
    after: i64,
    read: JoinHandle<PageResult>,
}

/// Where a catching-up member stands.
enum Position {
    /// Its cursor reached the head: it was turned live.
    Live,
    /// It left, or its socket is gone.
    Gone,
    /// Behind: its sink and cursor, and the next page when the ring still holds it.
    Behind {
        sink: Arc<dyn Sink>,
        cursor: i64,
        ring_page: Option<Vec<Arc<Message>>>,
    },
}

impl RoomFeed {
    fn new(head: i64) -> Self {
        Self {
            head,
            ring: VecDeque::new(),
            pending: BTreeMap::new(),
            members: HashMap::new(),
        }
    }

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

impl State {
    /// Starts following `room` at `head` (the caller knows nothing above it was released).
    /// A conversation's members are every local socket of its two people, each from where it
    /// starts there; returns them, since those behind need a catch-up.
    fn follow(&mut self, room: &Room, head: i64) -> Vec<SubscriberId> {
        let mut feed = RoomFeed::new(head);
        let mut joined = Vec::new();
        if let Some((a, b)) = room.people() {
            for person in [a, b] {
                for id in self.people.get(person).into_iter().flatten() {
                    let Some(socket) = self.sockets.get_mut(id) else {
                        continue;
                    };
                    let cursor = socket.conversations.get(room).copied().unwrap_or(0);
                    socket.rooms.insert(room.clone());
                    feed.members.insert(
                        id.clone(),
                        Member {
                            sink: socket.sink.clone(),
                            cursor,
                            live: cursor >= head,
                        },
                    );
                    if cursor < head {
                        joined.push(id.clone());
                    }
                }
            }
        }
        self.rooms.insert(room.clone(), feed);
        joined
    }

    /// Where a conversation this node does not follow would start: the lowest cursor of the
    /// local sockets of its people, or `None` when neither has a socket here.
    fn conversation_start(&self, room: &Room) -> Option<i64> {
        let (a, b) = room.people()?;
        [a, b]
            .iter()
            .flat_map(|person| self.people.get(*person).into_iter().flatten())
            .filter_map(|id| self.sockets.get(id))
            .map(|socket| socket.conversations.get(room).copied().unwrap_or(0))
            .min()
    }

    /// Drops `id` from `room`, and the room when nobody here is in it any more (never the
    /// default room).
    fn leave(&mut self, room: &Room, id: &str) {
        if let Some(feed) = self.rooms.get_mut(room) {
            feed.members.remove(id);
            if feed.members.is_empty() && !room.is_default() {
                self.rooms.remove(room);
            }
        }
        if let Some(socket) = self.sockets.get_mut(id) {
            socket.rooms.remove(room);
        }
    }

    /// Forgets a socket everywhere.
    fn remove_socket(&mut self, id: &str) {
        let Some(socket) = self.sockets.remove(id) else {
            return;
        };
        for room in &socket.rooms {
            self.leave(room, id);
        }
        if let Some(person) = &socket.person
            && let Some(ids) = self.people.get_mut(person)
        {
            ids.remove(id);
            if ids.is_empty() {
                self.people.remove(person);
            }
        }
    }
}

impl Feed {
    /// Starts a feed that follows the default room from `head` (the store's head of it), with
    /// its filler task.
    pub fn start(
        head: i64,
        store: Arc<dyn Store>,
        log: Arc<dyn RecoveryLog>,
        options: FeedOptions,
        runtime: &Runtime,
    ) -> Self {
        let mut rooms = HashMap::new();
        rooms.insert(Room::default_room(), RoomFeed::new(head));
        let feed = Feed {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    rooms,
                    sockets: HashMap::new(),
                    people: HashMap::new(),
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

    /// The highest offset of `room` released on this node, if it follows the room.
    pub fn head(&self, room: &Room) -> Option<i64> {
        self.lock().rooms.get(room).map(|feed| feed.head)
    }

    /// Takes committed messages of `room` from any source, in any order, duplicates allowed.
    /// Messages of a room this node does not follow are dropped, except a conversation of a
    /// person with a socket here, which it starts following.
    pub fn ingest(&self, room: &Room, messages: impl IntoIterator<Item = Arc<Message>>) {
        let arrived = Instant::now();
        let mut state = self.lock();
        let mut behind = Vec::new();
        if !state.rooms.contains_key(room) {
            let Some(start) = state.conversation_start(room) else {
                return;
            };
            behind = state.follow(room, start);
        }
        let ring_capacity = self.inner.options.ring_capacity;
        let (released, hole) = {
            let Some(feed) = state.rooms.get_mut(room) else {
                return;
            };
            for message in messages {
                if message.offset > feed.head {
                    feed.pending.insert(message.offset, (arrived, message));
                }
            }
            (
                feed.release_contiguous(ring_capacity),
                !feed.pending.is_empty(),
            )
        };
        if !released.is_empty() {
            let messages: Vec<Arc<Message>> = released.iter().map(|(_, m)| m.clone()).collect();
            let metrics = &self.inner.runtime.metrics;
            metrics.feed_messages.inc_by(messages.len() as u64);
            self.inner.log.append(&messages);
            self.release(&mut state, room, &messages);
            let handed_off = Instant::now();
            for (arrived, _) in &released {
                metrics
                    .delivery
                    .observe(handed_off.duration_since(*arrived).as_secs_f64());
            }
        }
        drop(state);
        for id in behind {
            self.spawn_catch_up(room.clone(), id);
        }
        if hole {
            self.inner.hole.notify_one();
        }
    }

    /// Gives newly released messages of `room` to its live members; called with the lock held.
    fn release(&self, state: &mut State, room: &Room, released: &[Arc<Message>]) {
        let mut fallen_behind = Vec::new();
        let mut gone = Vec::new();
        let mut delivered = 0u64;
        let Some(feed) = state.rooms.get_mut(room) else {
            return;
        };
        for (id, member) in feed.members.iter_mut().filter(|(_, m)| m.live) {
            for message in released {
                if message.offset <= member.cursor {
                    continue;
                }
                match member.sink.send(message) {
                    Ok(()) => {
                        member.cursor = message.offset;
                        delivered += 1;
                    }
                    Err(SinkError::Full) => {
                        member.live = false;
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
            state.remove_socket(&id);
        }
        for id in fallen_behind {
            self.spawn_catch_up(room.clone(), id);
        }
    }

    /// Adds a socket; it is in no room until it subscribes, except its person's conversations
    /// the node follows, where it starts as `subscriber.conversations` says.
    pub fn connect(&self, id: SubscriberId, subscriber: Subscriber) {
        let mut state = self.lock();
        let Subscriber {
            sink,
            person,
            conversations,
        } = subscriber;
        let (mut joined, mut behind) = (HashSet::new(), Vec::new());
        if let Some(person) = &person {
            state
                .people
                .entry(person.clone())
                .or_default()
                .insert(id.clone());
            for (room, feed) in state.rooms.iter_mut() {
                if room.has_person(person) {
                    let cursor = conversations.get(room).copied().unwrap_or(0);
                    let live = cursor >= feed.head;
                    let sink = sink.clone();
                    feed.members
                        .insert(id.clone(), Member { sink, cursor, live });
                    joined.insert(room.clone());
                    if !live {
                        behind.push(room.clone());
                    }
                }
            }
        }
        state.sockets.insert(
            id.clone(),
            Socket {
                sink,
                person,
                conversations,
                rooms: joined,
            },
        );
        drop(state);
        for room in behind {
            self.spawn_catch_up(room, id.clone());
        }
    }

    /// Makes a connected socket a member of `room` that has seen everything up to
    /// `after(head)`, given the room's head here; it gets the rest, then live ones. Follows the
    /// room first when the node does not (reading its head from the store). Returns the room's
    /// head here, or `None` when the socket is gone. A socket already in the room stays where it
    /// is.
    pub async fn subscribe(
        &self,
        room: &Room,
        id: &SubscriberId,
        after: impl FnOnce(i64) -> i64,
    ) -> Result<Option<i64>, StoreError> {
        if !self.lock().rooms.contains_key(room) {
            let head = self.inner.store.head(room).await?;
            let behind = {
                let mut state = self.lock();
                if state.rooms.contains_key(room) || !state.sockets.contains_key(&**id) {
                    Vec::new()
                } else {
                    state.follow(room, head)
                }
            };
            for other in behind {
                self.spawn_catch_up(room.clone(), other);
            }
        }
        let mut state = self.lock();
        let State { rooms, sockets, .. } = &mut *state;
        let (Some(feed), Some(socket)) = (rooms.get_mut(room), sockets.get_mut(&**id)) else {
            return Ok(None);
        };
        let head = feed.head;
        if feed.members.contains_key(&**id) {
            return Ok(Some(head));
        }
        let after = after(head);
        socket.rooms.insert(room.clone());
        let mut member = Member {
            sink: socket.sink.clone(),
            cursor: after,
            live: true,
        };
        if after < head {
            // Serve from memory right here when the ring reaches back far enough and the socket
            // has room; otherwise a catch-up task takes over (the member is not live until then).
            let near = head - after <= REPLAY_UNDER_LOCK;
            match feed.ring_after(after).filter(|_| near) {
                Some(missed) => {
                    let metrics = &self.inner.runtime.metrics;
                    metrics.replay_started(ReplaySource::Ring);
                    metrics.replay_read(ReplaySource::Ring);
                    for message in missed {
                        match member.sink.send(message) {
                            Ok(()) => member.cursor = message.offset,
                            Err(SinkError::Full) => {
                                member.live = false;
                                break;
                            }
                            Err(SinkError::Closed) => break,
                        }
                    }
                    let sent = (member.cursor - after) as u64;
                    metrics.replayed(ReplaySource::Ring, sent);
                    metrics.deliveries.inc_by(sent);
                    // A closed sink leaves a member behind, which its catch-up then drops.
                    member.live = member.live && member.cursor >= head;
                }
                None => member.live = false,
            }
        }
        let live = member.live;
        feed.members.insert(id.clone(), member);
        drop(state);
        if !live {
            self.spawn_catch_up(room.clone(), id.clone());
        }
        Ok(Some(head))
    }

    /// Takes a socket out of `room` (it left).
    pub fn unsubscribe(&self, room: &Room, id: &str) {
        self.lock().leave(room, id);
    }

    /// Forgets a socket (it disconnected).
    pub fn disconnect(&self, id: &str) {
        self.lock().remove_socket(id);
    }

    /// Whether the socket is connected here.
    pub fn knows(&self, id: &str) -> bool {
        self.lock().sockets.contains_key(id)
    }

    /// How many sockets the feed serves.
    pub fn subscribers(&self) -> usize {
        self.lock().sockets.len()
    }

    /// How many rooms the node follows.
    pub fn rooms(&self) -> usize {
        self.lock().rooms.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would leave no invariant half-updated that a later
        // caller could not live with, so a poisoned lock is used as is.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn spawn_catch_up(&self, room: Room, id: SubscriberId) {
        let feed = self.clone();
        let cancel = self.inner.runtime.cancel.clone();
        self.inner.runtime.spawn(async move {
            tokio::select! {
                () = feed.catch_up(room, id) => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    /// Feeds one member page by page until its cursor reaches the room's head, then makes it
    /// live. Each page comes from the ring when it still holds `cursor + 1`, else the recovery
    /// log, else the store (`docs/DESIGN.md`, "A catch-up, page by page").
    async fn catch_up(self, room: Room, id: SubscriberId) {
        let metrics = self.inner.runtime.metrics.clone();
        let started = Instant::now();
        let mut first_source = None;
        // The next log or store page, read while the current one is being sent.
        let mut prefetched: Option<Prefetch> = None;
        loop {
            let (sink, cursor, ring_page) = match self.position(&room, &id) {
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
                None => match self.next_page(&room, &id, cursor, prefetched.take()).await {
                    Ok(found) => found,
                    Err(error) => {
                        metrics.error(ErrorKind::Store);
                        tracing::warn!(error = %error, subscriber = %id, %room, "catch-up read failed; retrying");
                        tokio::time::sleep(READ_RETRY).await;
                        continue;
                    }
                },
            };
            if first_source.is_none() {
                first_source = Some(source);
                metrics.replay_started(source);
            }
            prefetched = self.prefetch(&room, &id, &page, source);
            let Some(last) = self.send_page(&id, &*sink, cursor, &page).await else {
                return;
            };
            let sent = (last - cursor) as u64;
            metrics.replayed(source, sent);
            metrics.deliveries.inc_by(sent);
            if let Some(member) = self
                .lock()
                .rooms
                .get_mut(&room)
                .and_then(|feed| feed.members.get_mut(&*id))
            {
                member.cursor = last;
            }
            if page.is_empty() {
                tokio::time::sleep(STORE_BEHIND_PAUSE).await;
            }
        }
    }

    /// Where a catching-up member stands, under the lock: turned live if its cursor reached
    /// the head (so no release can slip between the check and the switch), else what it needs.
    fn position(&self, room: &Room, id: &str) -> Position {
        let page_size = self.inner.options.page_size;
        let mut state = self.lock();
        // A member's socket is connected: both go together.
        let Some(feed) = state.rooms.get_mut(room) else {
            return Position::Gone;
        };
        let head = feed.head;
        let Some(member) = feed.members.get_mut(id) else {
            return Position::Gone;
        };
        if member.cursor >= head {
            member.live = true;
            return Position::Live;
        }
        let (sink, cursor) = (member.sink.clone(), member.cursor);
        Position::Behind {
            sink,
            cursor,
            ring_page: feed
                .ring_after(cursor)
                .map(|m| m.take(page_size).cloned().collect()),
        }
    }

    /// Starts reading the page after a full log or store page, so it is ready when this one is
    /// sent. A short page is the last one; the ring needs no read.
    fn prefetch(
        &self,
        room: &Room,
        id: &SubscriberId,
        page: &[Arc<Message>],
        source: ReplaySource,
    ) -> Option<Prefetch> {
        if source == ReplaySource::Ring || page.len() < self.inner.options.page_size {
            return None;
        }
        let after = page.last()?.offset;
        let (feed, room, id) = (self.clone(), room.clone(), id.clone());
        let read = self
            .inner
            .runtime
            .tasks
            .spawn(async move { feed.page_after(&room, &id, after).await });
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
                    self.disconnect(id);
                    return None;
                }
                Err(SinkError::Full) => {
                    self.inner.runtime.metrics.error(ErrorKind::SlowConsumer);
                    tracing::info!(subscriber = %id, "disconnecting a socket that stopped reading");
                    self.disconnect(id);
                    sink.disconnect();
                    return None;
                }
            }
        }
        Some(last)
    }

    /// The page after `cursor`: the one prefetched for it if there is one, else read now.
    async fn next_page(
        &self,
        room: &Room,
        id: &str,
        cursor: i64,
        prefetched: Option<Prefetch>,
    ) -> PageResult {
        match prefetched {
            Some(Prefetch { after, read }) if after == cursor => match read.await {
                Ok(result) => result,
                Err(_) => self.page_after(room, id, cursor).await,
            },
            Some(Prefetch { read, .. }) => {
                read.abort();
                self.page_after(room, id, cursor).await
            }
            None => self.page_after(room, id, cursor).await,
        }
    }

    /// The next page of `room` after `cursor` from the recovery log, or from the store when the
    /// log does not hold `cursor + 1` (or cannot be read).
    async fn page_after(&self, room: &Room, id: &str, cursor: i64) -> PageResult {
        let page_size = self.inner.options.page_size;
        let metrics = &self.inner.runtime.metrics;
        metrics.replay_read(ReplaySource::Log);
        match self.inner.log.read_after(room, cursor, page_size).await {
            Ok(page) if !page.is_empty() => return Ok((page, ReplaySource::Log)),
            Ok(_) => {}
            Err(error) => {
                metrics.error(ErrorKind::RecoveryLog);
                tracing::debug!(error = %error, subscriber = %id, %room, "recovery log unreadable; reading the store");
            }
        }
        metrics.replay_read(ReplaySource::Database);
        let rows = self.inner.store.read_after(room, cursor, page_size).await?;
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

    /// Reads what the store has that this node's rooms lack: below every hole, and when
    /// `polled`, up to each followed room's head in the store (and the conversations of the
    /// people here that it does not follow yet).
    async fn fill_once(&self, polled: bool) -> Result<(), StoreError> {
        let mut targets: Vec<(Room, i64)> = {
            let state = self.lock();
            state
                .rooms
                .iter()
                .filter_map(|(room, feed)| {
                    let above = *feed.pending.keys().next()?;
                    Some((room.clone(), above - 1))
                })
                .collect()
        };
        if polled {
            let (followed, people): (Vec<Room>, Vec<Arc<str>>) = {
                let state = self.lock();
                (
                    state.rooms.keys().cloned().collect(),
                    state.people.keys().cloned().collect(),
                )
            };
            targets.extend(self.inner.store.heads(&followed).await?);
            if !people.is_empty() {
                let names: Vec<&str> = people.iter().map(|p| &**p).collect();
                targets.extend(self.inner.store.conversations(&names).await?);
            }
        }
        for (room, target) in targets {
            self.fill_room(&room, target).await?;
        }
        Ok(())
    }

    /// Reads `room` from the store up to `target`, when this node follows the room (or would:
    /// a conversation of a person here) and is behind it.
    async fn fill_room(&self, room: &Room, target: i64) -> Result<(), StoreError> {
        loop {
            let head = {
                let state = self.lock();
                match state.rooms.get(room) {
                    Some(feed) => feed.head,
                    None => match state.conversation_start(room) {
                        Some(start) => start,
                        None => return Ok(()),
                    },
                }
            };
            if target <= head {
                return Ok(());
            }
            let want = usize::try_from(target - head)
                .unwrap_or(usize::MAX)
                .min(self.inner.options.page_size);
            let rows = self.inner.store.read_after(room, head, want).await?;
            if rows.is_empty() {
                return Ok(());
            }
            self.inner
                .runtime
                .metrics
                .gap_fills
                .inc_by(rows.len() as u64);
            self.ingest(room, rows.into_iter().map(Arc::new));
        }
    }
}
