//! Carries committed messages between nodes over Redis pub/sub, and builds the fred clients.
//!
//! The bus is a fast path only: what it loses (Redis down, a node killed between commit and
//! publish, a subscription lost in a reconnect) the feed reads from the store, so correctness
//! never depends on it. Order does not matter either: the feed orders by offset.

use std::{sync::Arc, sync::atomic::Ordering::Relaxed, time::Duration};

use fred::{
    clients::{Client, SubscriberClient},
    interfaces::{ClientLike, EventInterface, PubsubInterface},
    types::{
        Builder, RespVersion,
        config::{Config, ReconnectPolicy},
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    feed::Feed,
    metrics::{ErrorKind, Metrics},
    store::Message,
};

/// Why Redis could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The URL is not a Redis URL fred understands.
    #[error("invalid REDIS_URL")]
    Url(#[source] fred::error::Error),
    /// Redis could not be reached or refused a command.
    #[error("redis error")]
    Redis(#[from] fred::error::Error),
}

/// Messages the bus subscriber holds before the receiving task takes them; a burst beyond it
/// loses messages on the bus, which the feed's gap fill then reads from the store.
const BUS_CHANNEL_CAPACITY: usize = 16_384;

/// Builds fred clients with the settings every connection of a node shares.
#[derive(Clone)]
pub struct RedisConnector {
    builder: Arc<Builder>,
}

impl RedisConnector {
    /// Prepares clients for `url`: RESP3 (the Socket.IO adapter needs it), a command timeout
    /// (so nothing hangs while Redis is down) and endless reconnects. Subscriber clients get a
    /// larger pub/sub channel (see [`RedisConnector::subscriber`]).
    pub fn new(url: &str, command_timeout: Duration) -> Result<Self, BusError> {
        let mut config = Config::from_url(url).map_err(BusError::Url)?;
        config.version = RespVersion::RESP3;
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|perf| {
                perf.default_command_timeout = command_timeout;
            })
            .with_connection_config(|conn| {
                conn.connection_timeout = command_timeout;
                conn.internal_command_timeout = command_timeout;
                conn.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2));
        Ok(Self {
            builder: Arc::new(builder),
        })
    }

    /// A connected client for commands.
    pub async fn client(&self) -> Result<Client, BusError> {
        let client = self.builder.build()?;
        client.init().await?;
        Ok(client)
    }

    /// A connected subscriber client that re-subscribes after every reconnect. `capacity` sizes
    /// its pub/sub channel: messages beyond it that the reader has not taken yet are dropped
    /// (fred's default holds 32). fred sizes about ten channels of each client with it, all
    /// allocated up front, so it is set per client rather than for every client.
    pub async fn subscriber(
        &self,
        capacity: usize,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<SubscriberClient, BusError> {
        let (client, connections) = self.unconnected_subscriber(capacity)?;
        client.init().await?;
        connections.keep_subscribed(&client, tasks, cancel).await;
        Ok(client)
    }

    /// A subscriber client not connected yet, for a user that connects it itself (the Socket.IO
    /// adapter's driver calls `init`; a second `init` on a connected client can leave its next
    /// command unsent, see `app::build`). Once it is connected, hand it to
    /// [`Connections::keep_subscribed`].
    pub fn unconnected_subscriber(
        &self,
        capacity: usize,
    ) -> Result<(SubscriberClient, Connections), BusError> {
        let mut builder = (*self.builder).clone();
        builder.with_performance_config(|perf| perf.broadcast_channel_capacity = capacity);
        let client = builder.build_subscriber_client()?;
        // fred announces every connection, the first one too: listen before connecting so the
        // first announcement is surely the initial connection, which needs no re-subscribing.
        let connections = Connections(client.reconnect_rx());
        Ok((client, connections))
    }
}

/// The connection announcements of one subscriber client, taken before it first connected.
pub struct Connections(tokio::sync::broadcast::Receiver<fred::types::config::Server>);

impl Connections {
    /// Call once `client` is connected: skips the announcement of that first connection, then
    /// re-subscribes the client's channels after every later one, until `cancel`.
    pub async fn keep_subscribed(
        mut self,
        client: &SubscriberClient,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) {
        if self.0.recv().await.is_err() {
            tracing::warn!("no connection announcement from the redis client");
        }
        tasks.spawn(keep_subscribed(client.clone(), self.0, cancel));
    }
}

/// Re-subscribes to every tracked channel after each reconnect, retrying until it succeeds.
/// fred's own `resubscribe_all` sends `SUBSCRIBE` even with no channel to name, which Redis
/// refuses, and `manage_subscriptions` only logs a failure, leaving a connected but deaf client.
async fn keep_subscribed(
    client: SubscriberClient,
    mut reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            event = reconnects.recv() => {
                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = event {
                    return;
                }
            }
        }
        let mut pause = Duration::from_millis(50);
        while let Err(error) = resubscribe(&client).await {
            tracing::warn!(error = %error, "re-subscribing failed; retrying");
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

async fn resubscribe(client: &SubscriberClient) -> Result<(), fred::error::Error> {
    let channels: Vec<String> = client
        .tracked_channels()
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    if !channels.is_empty() {
        client.subscribe(channels).await?;
    }
    // The Socket.IO adapter uses sharded pub/sub; one SSUBSCRIBE per channel keeps every
    // command within one hash slot.
    for channel in client.tracked_shard_channels() {
        client.ssubscribe(channel.to_string()).await?;
    }
    tracing::debug!(client = %client.id(), "subscriptions restored");
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    /// The publishing node, so it can skip its own batches.
    node: std::borrow::Cow<'a, str>,
    /// `(offset, content)` pairs.
    messages: Vec<(i64, std::borrow::Cow<'a, str>)>,
}

/// The sending half of the bus, held by the writer.
#[derive(Clone)]
pub struct Bus {
    tx: mpsc::Sender<Vec<Arc<Message>>>,
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
        metrics: Arc<Metrics>,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, BusError> {
        let channel: Arc<str> = format!("{prefix}:messages").into();
        let subscriber = connector
            .subscriber(BUS_CHANNEL_CAPACITY, tasks, cancel.clone())
            .await?;
        let messages = subscriber.message_rx();
        subscriber.subscribe(&*channel).await?;
        tasks.spawn(receive(
            messages,
            channel.clone(),
            node.clone(),
            feed,
            metrics.clone(),
            cancel.clone(),
        ));
        let (tx, rx) = mpsc::channel(4096);
        tasks.spawn(publish(rx, publisher, channel, node, metrics.clone()));
        Ok(Self { tx, metrics })
    }

    /// Queues a committed batch for the other nodes. Never waits: when Redis is slow and the
    /// queue is full the batch is dropped here and the other nodes read it from the store.
    pub fn publish(&self, batch: Vec<Arc<Message>>) {
        if self.tx.try_send(batch).is_err() {
            self.metrics.error(ErrorKind::Bus);
            tracing::warn!(
                "bus queue full or closed; other nodes will read this batch from the store"
            );
        }
    }
}

async fn publish(
    mut rx: mpsc::Receiver<Vec<Arc<Message>>>,
    client: Client,
    channel: Arc<str>,
    node: Arc<str>,
    metrics: Arc<Metrics>,
) {
    // Ends when every sender is gone (the writer stopped), after the queue is drained.
    while let Some(batch) = rx.recv().await {
        let envelope = Envelope {
            node: std::borrow::Cow::Borrowed(&node),
            messages: batch
                .iter()
                .map(|m| (m.offset, std::borrow::Cow::Borrowed(m.content.as_str())))
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
        match client.publish::<i64, _, _>(&*channel, payload).await {
            Ok(_) => {
                metrics.broadcasts.fetch_add(1, Relaxed);
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
                metrics
                    .bus_received
                    .fetch_add(envelope.messages.len() as u64, Relaxed);
                feed.ingest(envelope.messages.into_iter().map(|(offset, content)| {
                    Arc::new(Message {
                        offset,
                        content: content.into_owned(),
                    })
                }));
            }
            Err(error) => {
                metrics.error(ErrorKind::Bus);
                tracing::warn!(error = %error, "ignoring an undecodable bus message");
            }
        }
    }
}
