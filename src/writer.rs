//! Group commit, room by room: the node's writer takes every pending send, stores each room's in
//! one transaction, hands the new messages to the feed (local sockets) and the bus (other
//! nodes), then answers each sender. A send is answered `Ok` only after its transaction
//! committed. Each room has at most one commit in flight (so a client's sends to a room are
//! stored in the order it sent them); different rooms commit at the same time, up to the
//! store's pool, so no room waits for another's.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Instant,
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    bus::Bus,
    feed::Feed,
    metrics::{ErrorKind, Metrics},
    rooms::Room,
    runtime::Runtime,
    store::{Appended, Message, NewMessage, Store},
};

/// Why a send was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The store failed; nothing of the batch was committed. The client gets no ack and retries.
    #[error("store unavailable: {0}")]
    Store(String),
    /// The store refused this message itself (a retry would fail the same way). The client gets
    /// an error ack; the messages beside it were stored without it.
    #[error("refused by the store: {0}")]
    Refused(String),
    /// The node is shutting down and took no new writes.
    #[error("node is shutting down")]
    ShuttingDown,
}

struct Submission {
    room: Room,
    message: NewMessage,
    reply: oneshot::Sender<Result<Appended, WriteError>>,
}

/// A cheap handle for submitting sends to the writer.
#[derive(Clone)]
pub struct Writer {
    /// Unbounded: what is queued is bounded by each socket's in-flight limit
    /// (`chat.max_in_flight`), and queuing must not wait, so sends keep their order.
    tx: mpsc::UnboundedSender<Submission>,
}

impl Writer {
    /// Starts the writer task, committing batches of up to `batch_max` messages to up to
    /// `concurrency` rooms at once; it stops after `cancel`, once what was queued is answered.
    pub fn start(
        store: Arc<dyn Store>,
        feed: Feed,
        bus: Option<Bus>,
        batch_max: usize,
        concurrency: usize,
        runtime: &Runtime,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let lanes = Lanes {
            store,
            feed,
            bus,
            batch_max: batch_max.max(1),
            concurrency: concurrency.max(1),
            metrics: runtime.metrics.clone(),
        };
        runtime.spawn(lanes.run(rx, runtime.cancel.clone()));
        Self { tx }
    }

    /// Queues one message for `room` now (sends queued one after the other to one room are
    /// stored in that order); the future resolves once it is stored (or found stored before)
    /// with where it is in the room.
    pub fn submit(
        &self,
        room: Room,
        message: NewMessage,
    ) -> impl Future<Output = Result<Appended, WriteError>> + use<> {
        let (reply, answer) = oneshot::channel();
        let queued = self.tx.send(Submission {
            room,
            message,
            reply,
        });
        async move {
            queued.map_err(|_| WriteError::ShuttingDown)?;
            answer.await.map_err(|_| WriteError::ShuttingDown)?
        }
    }
}

/// The writer's parts, and how much it commits at once.
struct Lanes {
    store: Arc<dyn Store>,
    feed: Feed,
    bus: Option<Bus>,
    batch_max: usize,
    /// Rooms committing at once: more than the store's pool would only wait for connections.
    concurrency: usize,
    metrics: Arc<Metrics>,
}

impl Lanes {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Submission>, cancel: CancellationToken) {
        // Sends waiting, per room, in the order they came.
        let mut queued: HashMap<Room, VecDeque<Submission>> = HashMap::new();
        // Rooms with sends waiting and no commit in flight, oldest first.
        let mut ready: VecDeque<Room> = VecDeque::new();
        // Rooms with a commit in flight.
        let mut in_flight: HashSet<Room> = HashSet::new();
        let mut committing = FuturesUnordered::new();
        let mut open = true;
        while open || !committing.is_empty() {
            while open
                && committing.len() < self.concurrency
                && let Some(room) = ready.pop_front()
            {
                let Some(waiting) = queued.get_mut(&room) else {
                    continue;
                };
                let take = waiting.len().min(self.batch_max);
                let batch: Vec<Submission> = waiting.drain(..take).collect();
                if waiting.is_empty() {
                    queued.remove(&room);
                }
                in_flight.insert(room.clone());
                committing.push(self.commit(room, batch));
            }
            tokio::select! {
                biased;
                () = cancel.cancelled(), if open => open = false,
                Some(room) = committing.next(), if !committing.is_empty() => {
                    // The room's next batch may go now; it joins the back of the line.
                    in_flight.remove(&room);
                    if queued.contains_key(&room) {
                        ready.push_back(room);
                    }
                }
                first = rx.recv(), if open => match first {
                    Some(first) => {
                        let mut next = Some(first);
                        while let Some(submission) = next {
                            let room = submission.room.clone();
                            // A room with nothing waiting and no commit in flight gets in line
                            // (one with sends waiting is in line or committing, and one
                            // committing is put back in line when its commit ends).
                            let idle = !queued.contains_key(&room) && !in_flight.contains(&room);
                            queued.entry(room.clone()).or_default().push_back(submission);
                            if idle {
                                ready.push_back(room);
                            }
                            next = rx.try_recv().ok();
                        }
                    }
                    None => open = false,
                },
            }
        }
        // Shutting down, with no commit in flight: refuse what is still queued (never
        // half-done: those clients retry elsewhere), and let the bus drain by dropping our
        // sender.
        rx.close();
        let leftover = queued.into_values().flatten();
        for submission in leftover.chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            answer(submission.reply, Err(WriteError::ShuttingDown));
        }
    }

    /// Stores one room's `batch`, feeds and publishes what is new, answers every sender;
    /// resolves to the room.
    async fn commit(&self, room: Room, batch: Vec<Submission>) -> Room {
        let metrics = &*self.metrics;
        let folded = Folded::new(batch.iter().map(|s| &s.message));
        let outcomes = append(&*self.store, &room, &folded.unique, metrics).await;
        if outcomes.iter().any(Result::is_ok) {
            metrics.store_batches.inc();
        }
        let answers = folded.answers(&outcomes);
        let fresh = fresh_messages(&room, &outcomes, folded.unique);
        metrics.messages_stored.inc_by(fresh.len() as u64);
        if !fresh.is_empty() {
            self.feed.ingest(&room, fresh.iter().cloned());
            if let Some(bus) = &self.bus {
                bus.publish(room.clone(), fresh);
            }
        }
        let duplicates = answers
            .iter()
            .filter(|a| matches!(a, Ok(Appended::Existing(_))))
            .count();
        metrics.duplicates.inc_by(duplicates as u64);
        for (submission, result) in batch.into_iter().zip(answers) {
            answer(submission.reply, result);
        }
        room
    }
}

/// What the store did with each message of `unique`. A batch the database refuses for its data
/// (one bad row, not an outage) is appended again one message at a time, so that row fails
/// alone and never takes the acks of the rows beside it.
async fn append(
    store: &dyn Store,
    room: &Room,
    unique: &[NewMessage],
    metrics: &Metrics,
) -> Vec<Result<Appended, WriteError>> {
    let started = Instant::now();
    let result = store.append(room, unique).await;
    metrics
        .store_append
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(appended) => appended.into_iter().map(Ok).collect(),
        Err(error) if error.is_refusal() && unique.len() > 1 => {
            tracing::warn!(error = %error, size = unique.len(), "the store refused a batch for its data; appending its messages one by one");
            let mut outcomes = Vec::with_capacity(unique.len());
            for message in unique {
                let single =
                    Box::pin(append(store, room, std::slice::from_ref(message), metrics)).await;
                outcomes.extend(single);
            }
            outcomes
        }
        Err(error) => {
            metrics.error(ErrorKind::Store);
            tracing::warn!(error = %error, cause = ?std::error::Error::source(&error), size = unique.len(), "batch not stored");
            let failure = if error.is_refusal() {
                WriteError::Refused(error.to_string())
            } else {
                WriteError::Store(error.to_string())
            };
            vec![Err(failure); unique.len()]
        }
    }
}

/// A batch with the copies of one message folded into one (a retry racing its original), so the
/// store sees distinct messages. A message is its client offset and its content together
/// (`docs/DESIGN.md`, "Write path"); a send without a client offset is never a copy.
#[derive(Debug)]
struct Folded {
    /// What to store, in first-seen order.
    unique: Vec<NewMessage>,
    /// For each submission, the position in `unique` that answers it.
    slots: Vec<usize>,
}

impl Folded {
    fn new<'a>(messages: impl ExactSizeIterator<Item = &'a NewMessage>) -> Self {
        let mut unique: Vec<NewMessage> = Vec::with_capacity(messages.len());
        let mut slots = Vec::with_capacity(messages.len());
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        for message in messages {
            let key = message
                .client_offset
                .as_deref()
                .map(|offset| (offset, message.content.as_str()));
            let slot = match key.and_then(|k| seen.get(&k).copied()) {
                Some(slot) => slot,
                None => {
                    if let Some(k) = key {
                        seen.insert(k, unique.len());
                    }
                    unique.push(message.clone());
                    unique.len() - 1
                }
            };
            slots.push(slot);
        }
        Self { unique, slots }
    }

    /// Each submission's answer, given what the store did with `unique`: a later copy of a
    /// message stored by this batch is answered as a duplicate of it.
    fn answers(
        &self,
        outcomes: &[Result<Appended, WriteError>],
    ) -> Vec<Result<Appended, WriteError>> {
        let mut first_use = vec![true; outcomes.len()];
        self.slots
            .iter()
            .map(|&slot| {
                let answer = match &outcomes[slot] {
                    Ok(Appended::Inserted(offset)) if !first_use[slot] => {
                        Ok(Appended::Existing(*offset))
                    }
                    other => other.clone(),
                };
                first_use[slot] = false;
                answer
            })
            .collect()
    }
}

/// The messages this append stored now in `room`, with their offsets (not those stored before).
fn fresh_messages(
    room: &Room,
    outcomes: &[Result<Appended, WriteError>],
    unique: Vec<NewMessage>,
) -> Vec<Arc<Message>> {
    outcomes
        .iter()
        .zip(unique)
        .filter_map(|(outcome, m)| match outcome {
            Ok(Appended::Inserted(offset)) => {
                Some(Arc::new(Message::stored(room.clone(), *offset, m)))
            }
            _ => None,
        })
        .collect()
}

fn answer(
    reply: oneshot::Sender<Result<Appended, WriteError>>,
    result: Result<Appended, WriteError>,
) {
    // The sender may have gone (its socket closed); the outcome is in the store either way and
    // a retry finds it there.
    if reply.send(result).is_err() {
        tracing::debug!("a sender left before its write was answered");
    }
}

#[cfg(test)]
mod tests {
    use futures_util::future::BoxFuture;

    use super::*;
    use crate::store::{RoomHead, StoreError};

    fn send(offset: Option<&str>, content: &str) -> NewMessage {
        NewMessage {
            client_offset: offset.map(str::to_owned),
            content: content.to_owned(),
            name: "ada".to_owned(),
            at: 0,
        }
    }

    #[test]
    fn copies_of_a_message_are_stored_once_and_answered_as_duplicates() {
        let batch = [
            send(Some("a-1"), "hi"),
            send(Some("a-1"), "hi"),
            // Same client offset, other content: another message (offsets queued offline).
            send(Some("a-1"), "ho"),
            send(None, "hi"),
            send(None, "hi"),
            send(Some("a-1"), "hi"),
        ];
        let folded = Folded::new(batch.iter());
        let stored: Vec<(Option<&str>, &str)> = folded
            .unique
            .iter()
            .map(|m| (m.client_offset.as_deref(), m.content.as_str()))
            .collect();
        assert_eq!(
            stored,
            [
                (Some("a-1"), "hi"),
                (Some("a-1"), "ho"),
                (None, "hi"),
                (None, "hi")
            ]
        );
        assert_eq!(folded.slots, [0, 0, 1, 2, 3, 0]);

        let appended = [
            Ok(Appended::Inserted(7)),
            Ok(Appended::Existing(3)),
            Ok(Appended::Inserted(8)),
            Err(WriteError::Refused("bad row".into())),
        ];
        let answers: Vec<Option<Appended>> = folded
            .answers(&appended)
            .into_iter()
            .map(Result::ok)
            .collect();
        assert_eq!(
            answers,
            [
                Some(Appended::Inserted(7)),
                Some(Appended::Existing(7)),
                Some(Appended::Existing(3)),
                Some(Appended::Inserted(8)),
                None,
                Some(Appended::Existing(7)),
            ]
        );
        let fresh: Vec<i64> = fresh_messages(&Room::default_room(), &appended, folded.unique)
            .iter()
            .map(|m| m.offset)
            .collect();
        assert_eq!(fresh, [7, 8]);
    }

    /// A row the database refuses for its data: a check violation.
    #[derive(Debug, thiserror::Error)]
    #[error("new row violates a check constraint")]
    struct DataException;

    impl sqlx::error::DatabaseError for DataException {
        fn message(&self) -> &str {
            "new row violates a check constraint"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some("23514".into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::CheckViolation
        }
    }

    /// A store that refuses, as a database would, every batch holding a message "bad", and
    /// stores the rest at consecutive offsets.
    #[derive(Default)]
    struct Picky {
        head: std::sync::Mutex<i64>,
        calls: std::sync::Mutex<Vec<usize>>,
    }

    impl Store for Picky {
        fn append<'a>(
            &'a self,
            _: &'a Room,
            batch: &'a [NewMessage],
        ) -> BoxFuture<'a, Result<Vec<Appended>, StoreError>> {
            self.calls.lock().unwrap().push(batch.len());
            let result = if batch.iter().any(|m| m.content == "bad") {
                Err(sqlx::Error::Database(Box::new(DataException)).into())
            } else {
                let mut head = self.head.lock().unwrap();
                Ok(batch
                    .iter()
                    .map(|_| {
                        *head += 1;
                        Appended::Inserted(*head)
                    })
                    .collect())
            };
            Box::pin(std::future::ready(result))
        }
        fn read_after<'a>(
            &'a self,
            _: &'a Room,
            _: i64,
            _: usize,
        ) -> BoxFuture<'a, Result<Vec<Message>, StoreError>> {
            Box::pin(std::future::ready(Ok(Vec::new())))
        }
        fn head<'a>(&'a self, _: &'a Room) -> BoxFuture<'a, Result<i64, StoreError>> {
            let head = *self.head.lock().unwrap();
            Box::pin(std::future::ready(Ok(head)))
        }
        fn heads<'a>(&'a self, _: &'a [Room]) -> BoxFuture<'a, Result<Vec<RoomHead>, StoreError>> {
            Box::pin(std::future::ready(Ok(Vec::new())))
        }
        fn conversations<'a>(
            &'a self,
            _: &'a [&'a str],
        ) -> BoxFuture<'a, Result<Vec<RoomHead>, StoreError>> {
            Box::pin(std::future::ready(Ok(Vec::new())))
        }
        fn epoch(&self) -> BoxFuture<'_, Result<String, StoreError>> {
            Box::pin(std::future::ready(Ok("test".into())))
        }
        fn close(&self) -> BoxFuture<'_, ()> {
            Box::pin(std::future::ready(()))
        }
    }

    #[tokio::test]
    async fn one_refused_row_fails_alone_and_the_rows_beside_it_are_stored() {
        let store = Picky::default();
        let metrics = Metrics::new("test");
        let batch = [
            send(Some("a"), "ok 1"),
            send(Some("b"), "bad"),
            send(Some("c"), "ok 2"),
        ];
        let outcomes = append(&store, &Room::default_room(), &batch, &metrics).await;
        assert!(
            matches!(outcomes[0], Ok(Appended::Inserted(1))),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[1], Err(WriteError::Refused(_))),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[2], Ok(Appended::Inserted(2))),
            "{outcomes:?}"
        );
        // The whole batch once, then each message alone.
        assert_eq!(*store.calls.lock().unwrap(), [3, 1, 1, 1]);
        assert_eq!(
            metrics.errors(ErrorKind::Store),
            1,
            "the refused row is counted once"
        );
    }
}
