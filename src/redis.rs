//! Redis connections: builds every fred client of a node (commands, the bus's subscriber, the
//! Socket.IO adapter's subscriber) with the settings they share, and keeps subscribers
//! subscribed across reconnects.

use std::{sync::Arc, time::Duration};

use fred::{
    clients::{Client, SubscriberClient},
    interfaces::{ClientLike, EventInterface, PubsubInterface},
    types::{
        Builder, RespVersion,
        config::{Config, ReconnectPolicy},
    },
};
use tokio_util::sync::CancellationToken;

use crate::runtime::Runtime;

/// Why Redis could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL is not a Redis URL fred understands.
    #[error("invalid REDIS_URL")]
    Url(#[source] fred::error::Error),
    /// Redis could not be reached or refused a command.
    #[error("redis error")]
    Redis(#[from] fred::error::Error),
}

/// Builds fred clients with the settings every connection of a node shares.
#[derive(Clone)]
pub struct RedisConnector {
    builder: Arc<Builder>,
}

impl RedisConnector {
    /// Prepares clients for `url`: RESP3 (the Socket.IO adapter needs it), a command timeout
    /// (so nothing hangs while Redis is down) and endless reconnects. Subscriber clients get a
    /// larger pub/sub channel (see [`RedisConnector::subscriber`]).
    pub fn new(url: &str, command_timeout: Duration) -> Result<Self, RedisError> {
        let mut config = Config::from_url(url).map_err(RedisError::Url)?;
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
    pub async fn client(&self) -> Result<Client, RedisError> {
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
        runtime: &Runtime,
    ) -> Result<SubscriberClient, RedisError> {
        let (client, connections) = self.unconnected_subscriber(capacity)?;
        client.init().await?;
        connections.keep_subscribed(&client, runtime).await;
        Ok(client)
    }

    /// A subscriber client not connected yet, for a user that connects it itself (the Socket.IO
    /// adapter's driver calls `init`; a second `init` on a connected client can leave its next
    /// command unsent, see `docs/DESIGN.md`, "Start-up"). Once it is connected, hand it to
    /// [`Connections::keep_subscribed`].
    pub fn unconnected_subscriber(
        &self,
        capacity: usize,
    ) -> Result<(SubscriberClient, Connections), RedisError> {
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
    pub async fn keep_subscribed(mut self, client: &SubscriberClient, runtime: &Runtime) {
        if self.0.recv().await.is_err() {
            tracing::warn!("no connection announcement from the redis client");
        }
        runtime.spawn(keep_subscribed(
            client.clone(),
            self.0,
            runtime.cancel.clone(),
        ));
    }
}

/// How often a subscriber of a Redis Cluster renews its sharded subscriptions (see
/// [`keep_subscribed`]).
const CLUSTER_RENEWAL: Duration = Duration::from_secs(1);

/// Re-subscribes to every tracked channel after each reconnect, retrying until it succeeds.
/// fred's own `resubscribe_all` sends `SUBSCRIBE` even with no channel to name, which Redis
/// refuses, and `manage_subscriptions` only logs a failure, leaving a connected but deaf client.
///
/// On a Redis Cluster it also renews the sharded subscriptions every [`CLUSTER_RENEWAL`]: when
/// a shard's master fails over (or its slots move), Redis ends that shard's subscriptions with
/// a `sunsubscribe` push on a connection that stays open, which fred drops without a word, so
/// no reconnect announces it. An `SSUBSCRIBE` of a channel still subscribed changes nothing;
/// one sent to a former master is redirected (`MOVED`) to the new one.
async fn keep_subscribed(
    client: SubscriberClient,
    mut reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    cancel: CancellationToken,
) {
    let mut renewal = tokio::time::interval(CLUSTER_RENEWAL);
    renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let clustered = client.is_clustered();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = renewal.tick(), if clustered => {
                if let Err(error) = resubscribe_shards(&client).await {
                    tracing::debug!(error = %error, "renewing sharded subscriptions failed");
                }
                continue;
            }
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
    resubscribe_shards(client).await?;
    tracing::debug!(client = %client.id(), "subscriptions restored");
    Ok(())
}

/// The bus and the Socket.IO adapter use sharded pub/sub; one `SSUBSCRIBE` per channel keeps
/// every command within one hash slot.
async fn resubscribe_shards(client: &SubscriberClient) -> Result<(), fred::error::Error> {
    for channel in client.tracked_shard_channels() {
        client.ssubscribe(channel.to_string()).await?;
    }
    Ok(())
}
