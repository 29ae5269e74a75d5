//! Builds a node from its settings and runs it until told to stop.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering::Relaxed},
    time::Duration,
};

use std::convert::Infallible;

use axum::{Router, body::Body, http::Request, response::IntoResponse};
use futures_util::future::BoxFuture;
use socketioxide::{SocketIo, SocketIoBuilder, adapter::Adapter};
use socketioxide_core::adapter::DefinedAdapter;
use socketioxide_redis::{FredAdapter, RedisAdapterConfig, RedisAdapterCtr};
use tokio::net::{TcpListener, TcpSocket};
use tower::ServiceExt;

use crate::{
    access::{self, AccessError, Origins, Verifier},
    bus::Bus,
    chat::{self, Chat},
    config::Settings,
    feed::{Feed, FeedOptions},
    http::{self, HttpState},
    peers::AddressCounts,
    recovery::{MemoryLog, RecoveryLog, StreamLog},
    redis::{RedisConnector, RedisError},
    runtime::Runtime,
    server::HttpLimits,
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
    Redis(#[from] RedisError),
    /// The Socket.IO adapter could not subscribe to its Redis channels.
    #[error("cannot start the socket.io redis adapter: {0}")]
    Adapter(String),
    /// The token key could not be loaded.
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// Closes every Socket.IO connection of the node (they reconnect elsewhere).
type CloseSockets = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// A node ready to serve: bound, connected, migrated.
pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    router: Router,
    /// The operations port, when `/metrics` has one of its own.
    ops: Option<(TcpListener, Router)>,
    per_address: Arc<AddressCounts>,
    node_id: Arc<str>,
    http: Arc<HttpState>,
    close_sockets: CloseSockets,
    store: Arc<dyn Store>,
    runtime: Runtime,
    http_limits: HttpLimits,
    drain_timeout: Duration,
    unready_delay: Duration,
}

/// How the node shares its work: alone, or with a cluster through Redis.
enum Mode {
    /// Everything in process: the recovery log in memory, no bus, the local adapter.
    Single,
    /// Redis carries the bus, the recovery log and the Socket.IO adapter.
    Cluster {
        connector: RedisConnector,
        /// The node's one command client: the recovery log, publishing and readiness share it.
        client: fred::clients::Client,
    },
}

/// Builds a node: binds the port, opens the store, connects Redis when configured, and wires
/// the parts the way `docs/DESIGN.md` draws them.
pub async fn build(settings: Settings) -> Result<App, StartError> {
    let (listener, addr) = bind(&settings.host, settings.port).await?;
    let node_id = node_id(&settings, addr);
    crate::logging::set_node(&node_id);
    let runtime = Runtime::new(&node_id);

    let store = store::connect(&settings).await?;
    let head = store.head(&crate::rooms::Room::default_room()).await?;
    let mode = Mode::connect(&settings).await?;
    let log = mode.recovery_log(&settings, &*store, &runtime).await?;
    let feed = Feed::start(
        head,
        store.clone(),
        log,
        FeedOptions::from(&settings),
        &runtime,
    );
    let bus = mode.bus(&settings, &node_id, &feed, &runtime).await?;
    let writer = Writer::start(
        store.clone(),
        feed.clone(),
        bus,
        settings.store.batch_max,
        usize::try_from(settings.store.max_connections).unwrap_or(1),
        &runtime,
    );
    let http_limits = HttpLimits::from(&settings.transport);
    let per_address = AddressCounts::new(settings.transport.max_connections_per_address);
    let limits = (&settings.limits).into();
    let presence = Arc::new(match mode.client() {
        Some(client) => chat::Presence::clustered(client, &settings.redis.prefix, node_id.clone()),
        None => chat::Presence::single(),
    });
    let chat = Arc::new(Chat {
        feed,
        writer,
        store: store.clone(),
        history: settings.chat.history,
        address_rates: chat::AddressRates::new(&limits),
        limits,
        metrics: runtime.metrics.clone(),
        verifier: Verifier::new(&settings.access)?,
        per_address: per_address.clone(),
        trusted_proxies: http_limits.trusted_proxies.clone(),
        presence,
    });
    let http = Arc::new(HttpState {
        store: store.clone(),
        redis: mode.client(),
        metrics: runtime.metrics.clone(),
        draining: AtomicBool::new(false),
        check_timeout: readiness_timeout(&settings),
    });
    let ops = match settings.access.metrics_listen() {
        Some(addr) => Some((bind_addr(addr).await?.0, http::ops_routes(http.clone()))),
        None => None,
    };
    let routes = http::routes(http.clone(), ops.is_none());
    let (router, close_sockets) = mode.socket_io(&settings, routes, chat, &runtime).await?;

    tracing::info!(node = %node_id, %addr, clustered = settings.clustered(), head, "node ready");
    Ok(App {
        listener,
        addr,
        router,
        ops,
        per_address,
        node_id,
        http,
        close_sockets,
        store,
        runtime,
        http_limits,
        drain_timeout: settings.shutdown.drain_timeout,
        unready_delay: settings.shutdown.unready_delay,
    })
}

async fn bind(host: &str, port: u16) -> Result<(TcpListener, SocketAddr), StartError> {
    bind_addr(&format!("{host}:{port}")).await
}

async fn bind_addr(addr: &str) -> Result<(TcpListener, SocketAddr), StartError> {
    listen(addr).await.map_err(|source| StartError::Bind {
        addr: addr.to_owned(),
        source,
    })
}

/// Connections the kernel completes and holds for the node before it accepts them (capped by
/// `net.core.somaxconn`). tokio's `bind` asks for 128 here, which a reconnect storm (thousands
/// of clients coming back after a network blip) overflows while the node is busy: the kernel
/// then drops SYNs, and each dropped one costs its client a retransmit of a second or more.
const LISTEN_BACKLOG: u32 = 4096;

/// Listens on the first address `addr` resolves to that can be bound, with [`LISTEN_BACKLOG`].
async fn listen(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let mut failure = None;
    for candidate in tokio::net::lookup_host(addr).await? {
        let socket = if candidate.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As tokio's `bind` does: a restarted node can bind while old connections linger.
        socket.set_reuseaddr(true)?;
        match socket
            .bind(candidate)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => {
                let local = listener.local_addr()?;
                return Ok((listener, local));
            }
            Err(error) => failure = Some(error),
        }
    }
    Err(failure.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

/// The configured node id, or the host name and the bound port.
fn node_id(settings: &Settings, addr: SocketAddr) -> Arc<str> {
    match &settings.node_id {
        Some(id) => id.as_str().into(),
        None => format!("{}:{}", host_name(), addr.port()).into(),
    }
}

/// Readiness answers within this long even when the store's own query timeout is longer, so a
/// balancer's probe (usually 2-5 s) sees a clear "no" rather than its own timeout.
const READINESS_CHECK_MAX: Duration = Duration::from_secs(2);

fn readiness_timeout(settings: &Settings) -> Duration {
    settings.store.timeout.min(READINESS_CHECK_MAX)
}

/// Connections the operations port (metrics, health) holds at once.
const OPS_MAX_CONNECTIONS: usize = 64;

/// Messages the Socket.IO adapter's subscriber holds before its driver takes them: requests
/// between nodes are rare and taken at once.
const ADAPTER_CHANNEL_CAPACITY: usize = 1024;

impl Mode {
    async fn connect(settings: &Settings) -> Result<Self, StartError> {
        let Some(url) = &settings.redis_url else {
            return Ok(Mode::Single);
        };
        let connector = RedisConnector::new(url, settings.redis.command_timeout)?;
        let client = connector.client().await?;
        Ok(Mode::Cluster { connector, client })
    }

    fn client(&self) -> Option<fred::clients::Client> {
        match self {
            Mode::Single => None,
            Mode::Cluster { client, .. } => Some(client.clone()),
        }
    }

    async fn recovery_log(
        &self,
        settings: &Settings,
        store: &dyn Store,
        runtime: &Runtime,
    ) -> Result<Arc<dyn RecoveryLog>, StartError> {
        let retention = (&settings.recovery).into();
        Ok(match self {
            Mode::Single => Arc::new(MemoryLog::new(retention)),
            Mode::Cluster { client, .. } => Arc::new(StreamLog::start(
                client.clone(),
                &settings.redis.prefix,
                &store.epoch().await?,
                retention,
                runtime,
            )),
        })
    }

    async fn bus(
        &self,
        settings: &Settings,
        node_id: &Arc<str>,
        feed: &Feed,
        runtime: &Runtime,
    ) -> Result<Option<Bus>, StartError> {
        Ok(match self {
            Mode::Single => None,
            Mode::Cluster { connector, client } => Some(
                Bus::start(
                    connector,
                    client.clone(),
                    &settings.redis.prefix,
                    node_id.clone(),
                    feed.clone(),
                    runtime,
                )
                .await?,
            ),
        })
    }

    /// Registers the chat on a Socket.IO layer with this mode's adapter and mounts it behind
    /// `routes`.
    async fn socket_io(
        &self,
        settings: &Settings,
        routes: Router,
        chat: Arc<Chat>,
        runtime: &Runtime,
    ) -> Result<(Router, CloseSockets), StartError> {
        let builder = socket_io_builder(settings);
        let origins = Arc::new(Origins::new(&settings.access));
        match self {
            Mode::Single => {
                let (svc, io) = builder.build_svc();
                chat::register(&io, chat);
                Ok(mount(routes, origins, svc, io))
            }
            Mode::Cluster { connector, .. } => {
                // The adapter's driver connects its subscriber itself (`init`), so it gets one
                // unconnected: docs/DESIGN.md, "Start-up".
                let (subscriber, connections) =
                    connector.unconnected_subscriber(ADAPTER_CHANNEL_CAPACITY)?;
                let config = RedisAdapterConfig::new()
                    .with_prefix(format!("{}:socket.io", settings.redis.prefix))
                    .with_request_timeout(settings.redis.command_timeout);
                let adapter = RedisAdapterCtr::new_with_fred_config(subscriber.clone(), config)
                    .await
                    .map_err(|e| StartError::Adapter(e.to_string()))?;
                connections.keep_subscribed(&subscriber, runtime).await;
                let (svc, io) = builder.with_adapter::<FredAdapter<_>>(adapter).build_svc();
                let presence = chat.presence.clone();
                let limit = settings.redis.command_timeout * 2;
                match tokio::time::timeout(limit, chat::register(&io, chat)).await {
                    Ok(Ok(())) => {
                        // After the namespace exists: the first thing the presence task may do
                        // is send `left` for people an earlier run of this node left behind,
                        // and socketioxide panics on a broadcast to a namespace not yet there.
                        presence.start(io.clone(), settings.chat.presence_timeout, runtime);
                        Ok(mount(routes, origins, svc, io))
                    }
                    Ok(Err(e)) => Err(StartError::Adapter(e.to_string())),
                    Err(_) => Err(StartError::Adapter("timed out".into())),
                }
            }
        }
    }
}

/// The Socket.IO layer's limits and buffers, from the settings.
fn socket_io_builder(settings: &Settings) -> SocketIoBuilder {
    let max_payload = settings.limits.max_payload_bytes;
    let max_ws = usize::try_from(max_payload).unwrap_or(usize::MAX);
    SocketIo::builder()
        .max_buffer_size(settings.transport.max_buffer_size)
        .ws_read_buffer_size(settings.transport.ws_read_buffer_bytes)
        .max_payload(max_payload)
        // socketioxide's payload limit covers polling only; websocket frames get their own
        .ws_max_message_size(max_ws)
        .ws_max_frame_size(max_ws)
        .connect_timeout(settings.transport.handshake_timeout)
}

/// Serves Socket.IO wherever `routes` has no route, each request's origin checked
/// ([`access::check_origin`]) and its head trimmed to what is needed ([`http::own_head`]);
/// returns the router and what closes the sockets on shutdown.
fn mount<A, S>(
    routes: Router,
    origins: Arc<Origins>,
    svc: S,
    io: SocketIo<A>,
) -> (Router, CloseSockets)
where
    A: Adapter + DefinedAdapter,
    S: tower::Service<Request<Body>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Response: IntoResponse + 'static,
    S::Future: Send + 'static,
{
    let socket_io = Router::new()
        .fallback_service(svc.map_request(http::own_head::<Body>))
        .layer(axum::middleware::from_fn_with_state(
            origins,
            access::check_origin,
        ));
    let router = routes.fallback_service(socket_io);
    let close: CloseSockets = Box::new(move || Box::pin(async move { io.close().await }));
    (router, close)
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
        self.addr
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
        let stop_accepting = tokio_util::sync::CancellationToken::new();
        let open = self.runtime.metrics.tcp_connections.clone();
        if let Some((listener, router)) = self.ops {
            // Scrapers only: its own bounds, and it stops with the node's background tasks.
            let ops_limits = HttpLimits {
                max_connections: OPS_MAX_CONNECTIONS,
                ..self.http_limits.clone()
            };
            self.runtime.tasks.spawn(crate::server::serve(
                listener,
                router,
                ops_limits,
                AddressCounts::new(OPS_MAX_CONNECTIONS),
                prometheus_client::metrics::gauge::Gauge::default(),
                self.runtime.cancel.clone(),
            ));
        }
        let server = tokio::spawn(crate::server::serve(
            self.listener,
            self.router,
            self.http_limits,
            self.per_address,
            open,
            stop_accepting.clone(),
        ));

        shutdown.await;
        tracing::info!(node = %self.node_id, "shutting down");
        self.http.draining.store(true, Relaxed);
        if !self.unready_delay.is_zero() {
            tokio::time::sleep(self.unready_delay).await;
        }
        stop_accepting.cancel();
        // Closing waits on each socket's disconnect handler; a stuck one must not hold the
        // shutdown past its drain timeout.
        if tokio::time::timeout(self.drain_timeout, (self.close_sockets)())
            .await
            .is_err()
        {
            tracing::warn!("sockets did not close within the drain timeout");
        }
        let Runtime { tasks, cancel, .. } = &self.runtime;
        cancel.cancel();
        tasks.close();
        if tokio::time::timeout(self.drain_timeout, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the drain timeout");
        }
        match tokio::time::timeout(self.drain_timeout, server).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "http server task failed"),
            Err(_) => tracing::warn!("http connections did not close within the drain timeout"),
        }
        self.store.close().await;
        tracing::info!(node = %self.node_id, "stopped");
    }
}
