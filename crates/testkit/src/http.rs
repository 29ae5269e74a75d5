//! Plain HTTP/1.1 GETs on loopback (pages, health, readiness, metrics), with `reqwest`.

use std::{net::SocketAddr, time::Duration};

/// The longest a GET may take: a node under load answers in milliseconds.
const GET_TIMEOUT: Duration = Duration::from_secs(10);

/// `(status, body)` of a GET to `127.0.0.1:{port}{path}`, or `None` when nothing answers.
pub async fn try_get(port: u16, path: &str) -> Option<(u16, String)> {
    // A connection per request, as a probe makes: a pooled keep-alive connection would still
    // reach a node that has stopped accepting new ones, and readiness tests watch exactly that.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(GET_TIMEOUT)
        .build()
        .expect("an HTTP client without TLS builds");
    let response = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let body = response.text().await.ok()?;
    Some((status, body))
}

/// `(status, body)` of a GET to `addr`; fails the test when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(addr.port(), path)
        .await
        .unwrap_or_else(|| panic!("GET {path} on {addr} got no answer"))
}
