//! Carries committed messages between nodes over Redis pub/sub: a fast path only.
//!
//! What it loses (Redis down, a node killed between commit and publish, a subscription lost in
//! a reconnect) the feed reads from the store, so correctness never depends on it. Order does
//! not matter either: the feed orders by offset (`docs/DESIGN.md`, trap 2).

use std::{borrow::Cow, sync::Arc};

use fred::{
    clients::Client,
    interfaces::{EventInterface, PubsubInterface},
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    feed::Feed,
    metrics::{ErrorKind, Metrics},
    redis::{RedisConnector, RedisError},
    rooms::Room,
    runtime::Runtime,
    store::Message,
};

/// Messages the bus subscriber holds before the receiving task takes them; a burst beyond it
/// loses messages on the bus, which the feed's gap fill then reads from the store.
const BUS_CHANNEL_CAPACITY: usize = 16_384;
/// Committed batches waiting to be published; when Redis is slower than the writer, batches
/// beyond it are dropped here and the other nodes read them from the store.
const PUBLISH_QUEUE: usize = 4096;

/// One committed batch of one room.
#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    /// The publishing node, so it can skip its own batches.
    node: Cow<'a, str>,
    /// The room's key (empty for the default room). A node of the version before rooms sent
    /// no room, and its batches do not decode: the receiver's gap fill reads them from the
    /// store.
    room: Cow<'a, str>,
    /// `(offset, content, name, at)` tuples.
    messages: Vec<(i64, Cow<'a, str>, Cow<'a, str>, i64)>,
}

/// A committed batch waiting to be published.
type Batch = (Room, Vec<Arc<Message>>);

/// The sending half of the bus, held by the writer.
#[derive(Clone)]
pub struct Bus {
    tx: mpsc::Sender<Batch>,
    metrics: Arc<Metrics>,
}

impl Bus {
    /// Starts publishing (through `publisher`, a command client) to and receiving from the
    /// cluster channel `{prefix}:messages`.
    pub async fn start(
        connector: &RedisConnector,
        publisher: Client,
        prefix: &str,
        node: Arc<str>,
        feed: Feed,
        runtime: &Runtime,
    ) -> Result<Self, RedisError> {
        let channel: Arc<str> = format!("{prefix}:messages").into();
        let subscriber = connector.subscriber(BUS_CHANNEL_CAPACITY, runtime).await?;
        let messages = subscriber.message_rx();
        subscriber.ssubscribe(&*channel).await?;
        let metrics = runtime.metrics.clone();
        runtime.spawn(receive(
            messages,
            channel.clone(),
            node.clone(),
            feed,
            metrics.clone(),
            runtime.cancel.clone(),
        ));
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        runtime.spawn(publish(rx, publisher, channel, node, metrics.clone()));
        Ok(Self { tx, metrics })
    }

    /// Queues a committed batch of `room` for the other nodes. Never waits: when Redis is slow
    /// and the queue is full the batch is dropped here and the other nodes read it from the
    /// store.
    pub fn publish(&self, room: Room, batch: Vec<Arc<Message>>) {
        if self.tx.try_send((room, batch)).is_err() {
            self.metrics.error(ErrorKind::Bus);
            tracing::warn!(
                "bus queue full or closed; other nodes will read this batch from the store"
            );
        }
    }
}

async fn publish(
    mut rx: mpsc::Receiver<Batch>,
    client: Client,
    channel: Arc<str>,
    node: Arc<str>,
    metrics: Arc<Metrics>,
) {
    // Ends when every sender is gone (the writer stopped), after the queue is drained.
    while let Some((room, batch)) = rx.recv().await {
        let envelope = Envelope {
            node: Cow::Borrowed(&node),
            room: Cow::Borrowed(room.key()),
            messages: batch
                .iter()
                .map(|m| {
                    (
                        m.offset,
                        Cow::Borrowed(m.content.as_str()),
                        Cow::Borrowed(m.name.as_str()),
                        m.at,
                    )
                })
                .collect(),
        };
        let payload = match serde_json::to_string(&envelope) {
            Ok(payload) => payload,
            Err(error) => {
                metrics.error(ErrorKind::Bus);
                tracing::error!(error = %error, "could not encode a batch");
                continue;
            }
        };
        match client.spublish::<i64, _, _>(&*channel, payload).await {
            Ok(_) => {
                metrics.broadcasts.inc();
            }
            Err(error) => {
                metrics.error(ErrorKind::Bus);
                tracing::warn!(error = %error, "publish failed; other nodes will read the batch from the store");
            }
        }
    }
}

async fn receive(
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    channel: Arc<str>,
    node: Arc<str>,
    feed: Feed,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let message = tokio::select! {
            () = cancel.cancelled() => return,
            message = messages.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(RecvError::Lagged(n)) => {
                // The feed's filler reads what was skipped from the store.
                metrics.error(ErrorKind::Bus);
                tracing::warn!(skipped = n, "bus receiver lagged");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if *message.channel != *channel {
            continue;
        }
        let Some(payload) = message.value.as_str() else {
            continue;
        };
        match serde_json::from_str::<Envelope>(&payload) {
            Ok(envelope) if *envelope.node == *node => {}
            Ok(envelope) => {
                metrics.bus_received.inc_by(envelope.messages.len() as u64);
                let room = Room::from_key(&envelope.room);
                feed.ingest(
                    &room,
                    envelope
                        .messages
                        .into_iter()
                        .map(|(offset, content, name, at)| {
                            Arc::new(Message {
                                room: room.clone(),
                                offset,
                                content: content.into_owned(),
                                name: name.into_owned(),
                                at,
                            })
                        }),
                );
            }
            Err(error) => {
                metrics.error(ErrorKind::Bus);
                tracing::warn!(error = %error, "ignoring an undecodable bus message");
            }
        }
    }
}
