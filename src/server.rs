//! Accepts TCP connections and serves HTTP/1.1 on them with a bounded request head and a deadline
//! for each head, so that silent, trickling or idle connections cannot pile up.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body, http::Request};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::config::TransportSettings;

/// How long accepting pauses after an error such as running out of file descriptors, so the
/// loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What a connection may take before it is closed.
#[derive(Debug, Clone, Copy)]
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
}

impl From<&TransportSettings> for HttpLimits {
    fn from(settings: &TransportSettings) -> Self {
        Self {
            header_read_timeout: settings.header_read_timeout,
            max_header_bytes: settings.max_header_bytes,
            max_connections: settings.max_connections,
        }
    }
}

/// Serves `router` until `stop` fires, then closes the port, lets every request in flight finish
/// (idle keep-alive connections close at once) and returns. Upgraded connections (websockets)
/// have left hyper and are closed by the Socket.IO layer.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stop: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes);
    let connections = TaskTracker::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let tcp = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refuse(tcp);
            continue;
        };
        // Without TCP_NODELAY each small frame (an ack, one message) can wait for the peer's
        // delayed ACK; measured here as about 5x fewer acked sends per second.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(error = %error, "could not set TCP_NODELAY");
        }
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            router.clone().oneshot(request.map(Body::new))
        });
        let connection = builder
            .serve_connection(
                TokioIo::new(Counted {
                    tcp,
                    _permit: permit,
                }),
                service,
            )
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

/// What a connection beyond `max_connections` is told before it is closed.
const FULL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 5\r\ncontent-length: 0\r\n\r\n";

/// Tells a connection the node is full and closes it. The answer fits any socket buffer, so
/// one non-blocking write sends it; a peer that cannot take even that is closed unanswered.
fn refuse(tcp: TcpStream) {
    tracing::debug!("connection refused: the node holds its most connections");
    if let Err(error) = tcp.try_write(FULL) {
        tracing::debug!(error = %error, "could not answer a refused connection");
    }
}

/// A TCP stream that holds its place among the open connections until it is dropped: when
/// hyper closes it, or, after a websocket upgrade, when the websocket ends.
struct Counted {
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
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
