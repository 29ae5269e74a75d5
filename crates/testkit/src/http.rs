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

/// An Engine.IO long-polling session spoken by hand, for packets no Socket.IO client would
/// send: open, then POST raw packets and GET what the server queued.
pub struct PollingSession {
    client: reqwest::Client,
    url: String,
}

impl PollingSession {
    /// Opens a session on the node on `port` and joins namespace `/`.
    pub async fn open(port: u16) -> PollingSession {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(GET_TIMEOUT)
            .build()
            .expect("an HTTP client without TLS builds");
        let base = format!("http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling");
        let open = client
            .get(&base)
            .send()
            .await
            .expect("polling handshake")
            .text()
            .await
            .expect("handshake body");
        let json = open.strip_prefix('0').expect("an Engine.IO OPEN packet");
        let sid = serde_json::from_str::<serde_json::Value>(json).expect("OPEN is JSON")["sid"]
            .as_str()
            .expect("OPEN names the sid")
            .to_owned();
        let session = PollingSession {
            client,
            url: format!("{base}&sid={sid}"),
        };
        assert_eq!(session.post("40").await, 200, "CONNECT to /");
        session
    }

    /// POSTs one payload; the HTTP status.
    pub async fn post(&self, payload: &str) -> u16 {
        self.client
            .post(&self.url)
            .body(payload.to_owned())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// GETs what the server queued; `(status, body)`. A closed session answers 400.
    pub async fn poll(&self) -> (u16, String) {
        match self.client.get(&self.url).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }
}
