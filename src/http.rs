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

/// The HTTP routes (Socket.IO is added by the caller as the fallback service).
pub fn routes(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/socket.io/socket.io.js", get(client_bundle))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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
        tokio::time::timeout(limit, state.store.head()).await,
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

/// Gives a request's head memory of its own. hyper parses a head in place, so its header values
/// and URI are slices of the connection's read buffer (8 to 16 KB), and engineioxide keeps each
/// socket's handshake head for the socket's whole life: without this copy, every idle socket
/// pins that buffer. Copying costs a few hundred bytes once per request.
pub fn own_head<B>(mut request: Request<B>) -> Request<B> {
    let mut headers = HeaderMap::with_capacity(request.headers().len());
    for (name, value) in request.headers() {
        let mut owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        owned.set_sensitive(value.is_sensitive());
        headers.append(name, owned);
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
    use axum::body::Bytes;

    #[test]
    fn own_head_keeps_nothing_of_the_read_buffer() {
        // A head the way hyper hands it over: values and URI sliced out of one read buffer.
        let buffer = Bytes::from_static(b"/socket.io/?EIO=4&transport=websocket io=abc");
        let within = |p: *const u8| buffer.as_ptr_range().contains(&p);
        let uri = Uri::from_maybe_shared(buffer.slice(..37)).unwrap();
        let mut value = HeaderValue::from_maybe_shared(buffer.slice(38..)).unwrap();
        value.set_sensitive(true);
        let mut request = Request::builder().uri(uri).body(()).unwrap();
        request.headers_mut().append(header::COOKIE, value);
        assert!(within(
            request.headers()[header::COOKIE].as_bytes().as_ptr()
        ));

        let request = own_head(request);
        let cookie = &request.headers()[header::COOKIE];
        assert_eq!(cookie.as_bytes(), b"io=abc");
        assert!(cookie.is_sensitive());
        assert!(!within(cookie.as_bytes().as_ptr()));
        let path = request.uri().path_and_query().unwrap().as_str();
        assert_eq!(path, "/socket.io/?EIO=4&transport=websocket");
        assert!(!within(path.as_ptr()));
    }
}
