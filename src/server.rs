//! Accepts TCP connections and serves HTTP/1.1 on them with a bounded request head, a deadline
//! for each head and for each stalled write, and a bound per node and per address, so that
//! silent, trickling, idle or unread connections cannot pile up.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use axum::{Router, body::Body, http::Request};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use prometheus_client::metrics::gauge::Gauge;

use crate::{
    config::TransportSettings,
    peers::{AddressCounts, AddressGuard, PeerAddr, TrustedProxies},
};

/// How long accepting pauses after an error such as running out of file descriptors, so the
/// loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What a connection may take before it is closed, and who it is from.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// A connection must send a complete request head within this long: the first one (also
    /// when it sends nothing at all), and each next one after a response (so it is also the
    /// keep-alive idle timeout). It is not armed while a request is being answered (a long-poll)
    /// nor after a websocket upgrade.
    pub header_read_timeout: Duration,
    /// Largest request line plus headers; a larger head gets `431` and the connection closes.
    pub max_header_bytes: usize,
    /// Most TCP connections open at once (HTTP and websockets); more get `503` and are closed.
    pub max_connections: usize,
    /// A write pending this long (the peer's window stays shut) closes the connection.
    pub write_stall_timeout: Duration,
    /// `SO_SNDBUF` of each accepted connection; 0 leaves the kernel's autotuning.
    pub socket_send_buffer_bytes: usize,
    /// Load balancers: their connections are not counted per address (their clients' sockets
    /// are, by the chat).
    pub trusted_proxies: TrustedProxies,
}

impl From<&TransportSettings> for HttpLimits {
    fn from(settings: &TransportSettings) -> Self {
        Self {
            header_read_timeout: settings.header_read_timeout,
            max_header_bytes: settings.max_header_bytes,
            max_connections: settings.max_connections,
            write_stall_timeout: settings.write_stall_timeout,
            socket_send_buffer_bytes: settings.socket_send_buffer_bytes,
            trusted_proxies: settings.trusted_proxies(),
        }
    }
}

/// Serves `router` until `stop` fires, then closes the port, lets every request in flight finish
/// (idle keep-alive connections close at once) and returns. Upgraded connections (websockets)
/// have left hyper and are closed by the Socket.IO layer. A peer that is not a trusted proxy
/// holds at most `per_address`'s bound of connections; each request carries its [`PeerAddr`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    per_address: Arc<AddressCounts>,
    open_gauge: Gauge,
    stop: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes);
    let connections = TaskTracker::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let lingering = Arc::new(Semaphore::new(LINGERING_REFUSALS));
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refuse(tcp, "the node holds its most connections", &lingering);
            continue;
        };
        let address = if limits.trusted_proxies.contains(peer.ip()) {
            None
        } else {
            match per_address.acquire(peer.ip()) {
                Some(guard) => Some(guard),
                None => {
                    refuse(tcp, "the address holds its most connections", &lingering);
                    continue;
                }
            }
        };
        // Without TCP_NODELAY each small frame (an ack, one message) can wait for the peer's
        // delayed ACK; measured here as about 5x fewer acked sends per second.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(error = %error, "could not set TCP_NODELAY");
        }
        if limits.socket_send_buffer_bytes > 0
            && let Err(error) =
                socket2::SockRef::from(&tcp).set_send_buffer_size(limits.socket_send_buffer_bytes)
        {
            tracing::debug!(error = %error, "could not set SO_SNDBUF");
        }
        open_gauge.inc();
        let place = Place {
            _permit: permit,
            _address: address,
            open: open_gauge.clone(),
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(PeerAddr(peer));
            router.clone().oneshot(request)
        });
        let stream = Connection {
            tcp,
            stall_timeout: limits.write_stall_timeout,
            stalled_since: None,
            deadline: None,
            failed: false,
            reader: None,
            _place: place,
        };
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => return ended(result),
                () = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
            ended(connection.await);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// What a connection beyond `max_connections` (or its address's share) is told before it is
/// closed.
const FULL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 5\r\ncontent-length: 0\r\n\r\n";

/// Refused connections whose close waits for what the peer already sent (at most this many at
/// once; beyond them a refused connection is closed at once).
const LINGERING_REFUSALS: usize = 256;
/// How long a refused connection's close waits for the peer's request to arrive and be read.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);
/// The most of a refused connection's request that is read (and discarded) before it closes.
const REFUSAL_DRAIN_BYTES: usize = 16 * 1024;

/// Tells a connection the node (or its address) is full and closes it. The answer fits any
/// socket buffer, so one non-blocking write sends it. Closing a socket with unread input makes
/// the kernel reset the connection, which can destroy the answer before the peer reads it; so
/// the close waits, briefly and for a bounded number of connections, for the peer's request
/// and reads it first.
fn refuse(tcp: TcpStream, why: &str, lingering: &Arc<Semaphore>) {
    tracing::debug!(why, "connection refused");
    if let Err(error) = tcp.try_write(FULL) {
        tracing::debug!(error = %error, "could not answer a refused connection");
        return;
    }
    let Ok(place) = lingering.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _place = place;
        let mut tcp = tcp;
        let _ = tcp.shutdown().await;
        let drain = async {
            let mut buf = [0u8; 1024];
            let mut read = 0;
            while read < REFUSAL_DRAIN_BYTES {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
    });
}

/// A TCP stream that holds its place among the open connections (and its peer's) until it is
/// dropped: when hyper closes it, or, after a websocket upgrade, when the websocket ends. A
/// write that makes no progress for `stall_timeout` fails it for good, reads included, so the
/// tasks holding it (hyper's, or a websocket's reader and writer) end and drop it: a peer that
/// stopped reading gives back its descriptor and whatever was queued for it.
struct Connection {
    tcp: TcpStream,
    stall_timeout: Duration,
    /// Since when writes have found the socket full; cleared by any write that goes through.
    stalled_since: Option<Instant>,
    /// Made at the first stall and kept: a write that goes through leaves it armed (cancelling
    /// and re-arming a timer on every full socket costs more than a spurious wake-up), and one
    /// that fires for an earlier stall is re-armed for the current one.
    deadline: Option<Pin<Box<Sleep>>>,
    failed: bool,
    /// The task waiting to read, woken when a stalled write fails the connection.
    reader: Option<Waker>,
    _place: Place,
}

/// What an open connection holds: a permit of the node's bound, a count for its address, and
/// one in the open-connections gauge.
struct Place {
    _permit: OwnedSemaphorePermit,
    _address: Option<AddressGuard>,
    open: Gauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.dec();
    }
}

fn stalled() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the peer took nothing for the write-stall timeout",
    )
}

impl Connection {
    /// Passes on a write's progress; a write pending for the whole stall timeout fails.
    fn write_progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled_since = None;
            return polled;
        }
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        let due = since + self.stall_timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        loop {
            if deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() < due {
                // It fired for an earlier stall.
                deadline.as_mut().reset(due);
                continue;
            }
            tracing::debug!("closing a connection whose peer stopped reading");
            self.failed = true;
            if let Some(reader) = self.reader.take() {
                reader.wake();
            }
            return Poll::Ready(Err(stalled()));
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(stalled()));
        }
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if polled.is_pending()
            && !self
                .reader
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.reader = Some(cx.waker().clone());
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(stalled()));
        }
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.write_progress(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.failed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(stalled()));
        }
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.write_progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// A connection's end: timeouts and malformed or oversized heads are the clients' doing.
fn ended(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        tracing::debug!(error = %error, timeout = error.is_timeout(), "http connection closed");
    }
}

/// Logs an accept error and, unless it concerned only that one connection, pauses.
async fn accept_failed(error: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %error, "accept failed; pausing");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}
