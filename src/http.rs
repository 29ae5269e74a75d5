//! The HTTP side: the chat page, the client bundle, liveness, readiness and metrics.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use fred::{clients::Client, interfaces::ClientLike};

use crate::{metrics::Metrics, store::Store};

const PAGE: &str = include_str!("../assets/index.html");
const CLIENT_BUNDLE: &str = include_str!("../assets/socket.io.min.js");

/// What the HTTP handlers read.
pub struct HttpState {
    /// Checked by readiness.
    pub store: Arc<dyn Store>,
    /// Checked by readiness in cluster mode.
    pub redis: Option<Client>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Set when the node starts draining, so the load balancer stops sending clients here.
    pub draining: AtomicBool,
    /// Longest wait for one readiness check.
    pub check_timeout: Duration,
}

/// The public HTTP routes (Socket.IO is added by the caller as the fallback service), with
/// `/metrics` unless the operations port serves it.
pub fn routes(state: Arc<HttpState>, with_metrics: bool) -> Router {
    let router = Router::new()
        .route("/", get(page))
        .route("/socket.io/socket.io.js", get(client_bundle))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let router = if with_metrics {
        router.route("/metrics", get(metrics))
    } else {
        router
    };
    router.with_state(state)
}

/// The operations port's routes: metrics, liveness and readiness.
pub fn ops_routes(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn client_bundle() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                "application/javascript; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        CLIENT_BUNDLE,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    if state.draining.load(Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let limit = state.check_timeout;
    let store_ok = matches!(
        tokio::time::timeout(limit, state.store.head(&crate::rooms::Room::default_room())).await,
        Ok(Ok(_))
    );
    if !store_ok {
        return (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response();
    }
    if let Some(redis) = &state.redis {
        let ping = tokio::time::timeout(limit, redis.ping::<String>(None)).await;
        if !matches!(ping, Ok(Ok(_))) {
            return (StatusCode::SERVICE_UNAVAILABLE, "redis unreachable\n").into_response();
        }
    }
    "ready\n".into_response()
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The request headers Socket.IO needs: the websocket handshake, the polling body's framing,
/// and what the handshake checks (origin, forwarded client). engineioxide keeps each session's
/// handshake head for the session's life, so nothing else is kept.
const KEPT_HEADERS: [header::HeaderName; 10] = [
    header::HOST,
    header::ORIGIN,
    header::CONNECTION,
    header::UPGRADE,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::HeaderName::from_static("x-forwarded-for"),
];

/// Gives a request's head memory of its own, with only [`KEPT_HEADERS`]. hyper parses a head in
/// place, so its header values and URI are slices of the connection's read buffer (8 to 16 KB),
/// and engineioxide keeps each socket's handshake head for the socket's whole life: without
/// this, every idle socket pins that buffer and whatever cookies its browser sent. Copying
/// costs a few hundred bytes once per request.
pub fn own_head<B>(mut request: Request<B>) -> Request<B> {
    // Sized to what is kept: each slot of a header map costs about a hundred bytes.
    let kept = KEPT_HEADERS
        .iter()
        .map(|name| request.headers().get_all(name).iter().count())
        .sum();
    let mut headers = HeaderMap::with_capacity(kept);
    for name in &KEPT_HEADERS {
        for value in request.headers().get_all(name) {
            let owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            headers.append(name, owned);
        }
    }
    *request.headers_mut() = headers;
    if let Ok(uri) = Uri::try_from(request.uri().to_string()) {
        *request.uri_mut() = uri;
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshake_keeps_only_the_headers_socket_io_needs() {
        let request = Request::builder()
            .uri("/socket.io/?EIO=4&transport=websocket")
            .header(header::HOST, "chat.example.com")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
            .header(header::COOKIE, "x".repeat(12_000))
            .header(header::USER_AGENT, "y".repeat(2_000))
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap();
        let kept = own_head(request);
        let headers = kept.headers();
        assert!(headers.get(header::COOKIE).is_none());
        assert!(headers.get(header::USER_AGENT).is_none());
        assert_eq!(headers.get(header::HOST).unwrap(), "chat.example.com");
        assert_eq!(headers.get_all("x-forwarded-for").iter().count(), 2);
        let bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        assert!(bytes < 200, "{bytes} bytes of headers kept");
    }
}
