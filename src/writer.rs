//! Group commit: the node's one writer takes every pending send, stores them in one transaction,
//! hands the new messages to the feed (local sockets) and the bus (other nodes), then answers
//! each sender. A send is answered `Ok` only after its transaction committed.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::Bus,
    feed::Feed,
    metrics::{ErrorKind, Metrics},
    store::{Appended, Message, NewMessage, Store},
};

/// Why a send was not stored; the client gets no ack and retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The store failed; nothing of the batch was committed.
    #[error("store unavailable: {0}")]
    Store(String),
    /// The node is shutting down and took no new writes.
    #[error("node is shutting down")]
    ShuttingDown,
}

struct Submission {
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
    /// Starts the writer task; it stops after `cancel`, once what was queued is answered.
    pub fn start(
        store: Arc<dyn Store>,
        feed: Feed,
        bus: Option<Bus>,
        batch_max: usize,
        metrics: Arc<Metrics>,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tasks.spawn(run(rx, store, feed, bus, batch_max, metrics, cancel));
        Self { tx }
    }

    /// Queues one message now (sends queued one after the other are stored in that order); the
    /// future resolves once it is stored (or found stored before) with where it is.
    pub fn submit(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = Result<Appended, WriteError>> + use<> {
        let (reply, answer) = oneshot::channel();
        let queued = self.tx.send(Submission { message, reply });
        async move {
            queued.map_err(|_| WriteError::ShuttingDown)?;
            answer.await.map_err(|_| WriteError::ShuttingDown)?
        }
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Submission>,
    store: Arc<dyn Store>,
    feed: Feed,
    bus: Option<Bus>,
    batch_max: usize,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut batch = Vec::with_capacity(batch_max);
    loop {
        let first = tokio::select! {
            biased;
            first = rx.recv() => first,
            () = cancel.cancelled() => None,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        commit(&mut batch, &*store, &feed, bus.as_ref(), &metrics).await;
    }
    // Shutting down: refuse what is still queued (never half-done: those clients retry
    // elsewhere), and let the bus drain by dropping our sender.
    rx.close();
    while let Ok(submission) = rx.try_recv() {
        answer(submission.reply, Err(WriteError::ShuttingDown));
    }
}

/// Stores `batch`, feeds and publishes what is new, answers every sender; empties `batch`.
async fn commit(
    batch: &mut Vec<Submission>,
    store: &dyn Store,
    feed: &Feed,
    bus: Option<&Bus>,
    metrics: &Metrics,
) {
    // The same message twice in one batch (a retry racing its original) is stored once:
    // `slots[i]` is the position in `unique` that answers submission i. A message is its client
    // offset and its content (see `NewMessage::client_offset`).
    let mut unique: Vec<NewMessage> = Vec::with_capacity(batch.len());
    let mut slots = Vec::with_capacity(batch.len());
    let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
    for submission in batch.iter() {
        let message = &submission.message;
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
                unique.push(submission.message.clone());
                unique.len() - 1
            }
        };
        slots.push(slot);
    }
    drop(seen);

    let started = std::time::Instant::now();
    let result = store.append(&unique).await;
    let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    metrics.store_append_micros.fetch_add(waited, Relaxed);
    let results: Vec<Result<Appended, WriteError>> = match result {
        Ok(appended) => {
            metrics.store_batches.fetch_add(1, Relaxed);
            let fresh: Vec<Arc<Message>> = appended
                .iter()
                .zip(unique)
                .filter_map(|(a, m)| match a {
                    Appended::Inserted(offset) => Some(Arc::new(Message {
                        offset: *offset,
                        content: m.content,
                    })),
                    Appended::Existing(_) => None,
                })
                .collect();
            metrics
                .messages_stored
                .fetch_add(fresh.len() as u64, Relaxed);
            if !fresh.is_empty() {
                feed.ingest(fresh.iter().cloned());
                if let Some(bus) = bus {
                    bus.publish(fresh);
                }
            }
            let mut first_use = vec![true; appended.len()];
            slots
                .iter()
                .map(|&slot| {
                    // A later copy of a client offset within this batch is a duplicate.
                    let a = match appended[slot] {
                        Appended::Inserted(o) if !first_use[slot] => Appended::Existing(o),
                        a => a,
                    };
                    first_use[slot] = false;
                    if matches!(a, Appended::Existing(_)) {
                        metrics.duplicates.fetch_add(1, Relaxed);
                    }
                    Ok(a)
                })
                .collect()
        }
        Err(error) => {
            metrics.error(ErrorKind::Store);
            tracing::warn!(error = %error, cause = ?std::error::Error::source(&error), size = batch.len(), "batch not stored; senders get no ack");
            let text = error.to_string();
            slots
                .iter()
                .map(|_| Err(WriteError::Store(text.clone())))
                .collect()
        }
    };
    for (submission, result) in batch.drain(..).zip(results) {
        answer(submission.reply, result);
    }
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
