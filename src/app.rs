//! Builds a node from its settings and runs it until told to stop.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering::Relaxed},
    time::Duration,
};

use axum::{Router, serve::ListenerExt};
use futures_util::future::BoxFuture;
use socketioxide::{SocketIo, SocketIoBuilder};
use socketioxide_redis::{FredAdapter, RedisAdapterConfig, RedisAdapterCtr};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{
    bus::{Bus, BusError, RedisConnector},
    chat::{self, Chat, Limits},
    config::Settings,
    feed::{Feed, FeedOptions},
    http::{self, HttpState},
    log::{MemoryLog, RecoveryLog, Retention, StreamLog},
    metrics::Metrics,
    store::{self, Store, StoreError},
    writer::Writer,
};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened or migrated.
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    /// Redis could not be reached.
    #[error("cannot connect to redis")]
    Redis(#[from] BusError),
    /// The Socket.IO adapter could not subscribe to its Redis channels.
    #[error("cannot start the socket.io redis adapter: {0}")]
    Adapter(String),
}

/// A node ready to serve: bound, connected, migrated.
pub struct App {
    listener: TcpListener,
    router: Router,
    node_id: Arc<str>,
    http: Arc<HttpState>,
    close_sockets: Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>,
    store: Arc<dyn Store>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    drain_timeout: Duration,
    unready_delay: Duration,
}

/// Builds a node: binds the port, opens the store, connects Redis when configured.
pub async fn build(settings: Settings) -> Result<App, StartError> {
    let addr = format!("{}:{}", settings.host, settings.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| StartError::Bind {
        addr: settings.host.clone(),
        source,
    })?;
    let node_id: Arc<str> = settings
        .node_id
        .clone()
        .unwrap_or_else(|| format!("{}:{}", host_name(), local.port()))
        .into();

    crate::logging::set_node(&node_id);
    let metrics = Arc::new(Metrics::default());
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    let ms = Settings::ms;

    let store = store::connect(&settings).await?;
    let head = store.head().await?;
    let retention = Retention {
        max_len: settings.stream.max_len.max(1),
        max_age: Duration::from_secs(settings.stream.max_age_secs.max(1)),
    };
    let redis = match &settings.redis_url {
        Some(url) => Some(RedisConnector::new(
            url,
            ms(settings.redis.command_timeout_ms),
        )?),
        None => None,
    };
    // One command client per node: the recovery log, publishing, and readiness share it.
    let cluster = match &redis {
        Some(connector) => Some((connector, connector.client().await?)),
        None => None,
    };
    let log: Arc<dyn RecoveryLog> = match &cluster {
        Some((_, client)) => Arc::new(StreamLog::start(
            client.clone(),
            &settings.redis.prefix,
            &store.epoch().await?,
            retention,
            metrics.clone(),
            &tasks,
            cancel.clone(),
        )),
        None => Arc::new(MemoryLog::new(retention)),
    };
    let feed = Feed::start(
        head,
        store.clone(),
        log,
        FeedOptions {
            gap_timeout: ms(settings.feed.gap_timeout_ms),
            poll_interval: ms(settings.feed.poll_interval_ms),
            ring_capacity: settings.feed.ring_capacity.max(1),
            page_size: settings.store.page_size,
            slow_consumer_timeout: ms(settings.chat.slow_consumer_timeout_ms),
        },
        metrics.clone(),
        tasks.clone(),
        cancel.clone(),
    );
    let bus = match &cluster {
        Some((connector, client)) => Some(
            Bus::start(
                connector,
                client.clone(),
                &settings.redis.prefix,
                node_id.clone(),
                feed.clone(),
                metrics.clone(),
                &tasks,
                cancel.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let redis_client = cluster.map(|(_, client)| client);

    let writer = Writer::start(
        store.clone(),
        feed.clone(),
        bus,
        settings.store.batch_max,
        metrics.clone(),
        &tasks,
        cancel.clone(),
    );
    let chat = Arc::new(Chat {
        feed,
        writer,
        store: store.clone(),
        history: settings.chat.history,
        limits: Limits {
            max_message_chars: settings.chat.max_message_chars,
            max_client_offset_chars: settings.chat.max_client_offset_chars,
            max_in_flight: settings.chat.max_in_flight,
        },
        metrics: metrics.clone(),
    });

    let http = Arc::new(HttpState {
        node_id: node_id.clone(),
        store: store.clone(),
        redis: redis_client,
        metrics,
        draining: AtomicBool::new(false),
        check_timeout: ms(settings.store.timeout_ms.min(2_000)),
    });
    let routes = http::routes(http.clone());
    let builder = socket_io_builder(&settings);
    let (router, close_sockets) = match &redis {
        None => {
            let (svc, io) = builder.build_svc();
            chat::register(&io, chat);
            (
                routes.fallback_service(svc.map_request(http::own_head)),
                closer(io),
            )
        }
        Some(connector) => {
            // The adapter's driver connects the client itself (it calls `init`), so it gets the
            // client unconnected. A second `init` replaces fred's router task and sends QUIT to
            // the old one; until the old task has processed that QUIT, fred only buffers new
            // commands without flushing them, so the adapter's first SSUBSCRIBE could sit
            // unsent until it timed out (about one start in 250, more under CPU load).
            // Adapter requests between nodes are rare and taken at once by the driver's task.
            let (subscriber, connections) = connector.unconnected_subscriber(1024)?;
            let config = RedisAdapterConfig::new()
                .with_prefix(format!("{}:socket.io", settings.redis.prefix))
                .with_request_timeout(ms(settings.redis.command_timeout_ms));
            let adapter = RedisAdapterCtr::new_with_fred_config(subscriber.clone(), config)
                .await
                .map_err(|e| StartError::Adapter(e.to_string()))?;
            connections
                .keep_subscribed(&subscriber, &tasks, cancel.clone())
                .await;
            let (svc, io) = builder.with_adapter::<FredAdapter<_>>(adapter).build_svc();
            let limit = ms(settings.redis.command_timeout_ms * 2);
            match tokio::time::timeout(limit, chat::register(&io, chat)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(StartError::Adapter(e.to_string())),
                Err(_) => return Err(StartError::Adapter("timed out".into())),
            }
            (
                routes.fallback_service(svc.map_request(http::own_head)),
                closer(io),
            )
        }
    };

    tracing::info!(node = %node_id, addr = %local, clustered = redis.is_some(), head, "node ready");
    Ok(App {
        listener,
        router,
        node_id,
        http,
        close_sockets,
        store,
        tasks,
        cancel,
        drain_timeout: ms(settings.shutdown.drain_timeout_ms),
        unready_delay: ms(settings.shutdown.unready_delay_ms),
    })
}

fn socket_io_builder(settings: &Settings) -> SocketIoBuilder {
    let max_payload = settings.chat.max_payload_bytes;
    let max_ws = usize::try_from(max_payload).unwrap_or(usize::MAX);
    SocketIo::builder()
        .max_buffer_size(settings.chat.max_buffer_size)
        .ws_read_buffer_size(settings.chat.ws_read_buffer_bytes)
        .max_payload(max_payload)
        // socketioxide's payload limit covers polling only; websocket frames get their own
        .ws_max_message_size(max_ws)
        .ws_max_frame_size(max_ws)
}

fn closer<A: socketioxide::adapter::Adapter>(
    io: SocketIo<A>,
) -> Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send> {
    Box::new(move || Box::pin(async move { io.close().await }))
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "chorus".to_owned())
}

impl App {
    /// The address the node listens on (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        // Bound in `build`, so the address is known; fall back to unspecified only in theory.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// This node's name in logs and metrics.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Serves until `shutdown` resolves, then drains: readiness turns false (and stays false while
    /// the node still serves for `shutdown.unready_delay_ms`), the port closes, sockets are closed
    /// so clients reconnect elsewhere, the write in progress finishes (acked or not, never
    /// half), background tasks stop and the pools close.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let stop_accepting = CancellationToken::new();
        // Without TCP_NODELAY each small frame (an ack, one message) can wait for the peer's
        // delayed ACK; measured here as about 5x fewer acked sends per second.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(error = %error, "could not set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, self.router)
            .with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
        let server = tokio::spawn(async move { server.await });

        shutdown.await;
        tracing::info!(node = %self.node_id, "shutting down");
        self.http.draining.store(true, Relaxed);
        if !self.unready_delay.is_zero() {
            tokio::time::sleep(self.unready_delay).await;
        }
        stop_accepting.cancel();
        (self.close_sockets)().await;
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.drain_timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the drain timeout");
        }
        match tokio::time::timeout(self.drain_timeout, server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(error = %error, "http server error"),
            Ok(Err(error)) => tracing::warn!(error = %error, "http server task failed"),
            Err(_) => tracing::warn!("http connections did not close within the drain timeout"),
        }
        self.store.close().await;
        tracing::info!(node = %self.node_id, "stopped");
    }
}
