//! Plain HTTP/1.1 GETs on loopback (pages, health, readiness, metrics), with `reqwest`.

use std::{net::SocketAddr, time::Duration};

/// The longest a GET may take: a node under load answers in milliseconds.
const GET_TIMEOUT: Duration = Duration::from_secs(10);

/// `(status, body)` of a GET to `127.0.0.1:{port}{path}`, or `None` when nothing answers.
pub async fn try_get(port: u16, path: &str) -> Option<(u16, String)> {
    try_get_at(SocketAddr::from(([127, 0, 0, 1], port)), path, GET_TIMEOUT).await
}

/// `(status, body)` of a GET to `http://{addr}{path}` within `timeout`, or `None`.
pub async fn try_get_at(addr: SocketAddr, path: &str, timeout: Duration) -> Option<(u16, String)> {
    // A connection per request, as a probe makes: a pooled keep-alive connection would still
    // reach a node that has stopped accepting new ones, and readiness tests watch exactly that.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(timeout)
        .build()
        .expect("an HTTP client without TLS builds");
    let response = client
        .get(format!("http://{addr}{path}"))
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

/// The status code of the answer to `head`, a raw HTTP/1.1 request head sent on a new
/// connection to `127.0.0.1:{port}`: for requests no HTTP client sends as written, such as a
/// websocket upgrade with a chosen `Origin` (a `101` included).
pub async fn raw_status(port: u16, head: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !seen.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before a status line: {seen:?}");
            seen.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&seen).into_owned();
        line.split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"))
    };
    tokio::time::timeout(GET_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no status line within {GET_TIMEOUT:?}"))
}

/// A websocket upgrade to the Socket.IO endpoint with `extra` header lines (each ending in
/// `\r\n`), for [`raw_status`].
pub fn websocket_upgrade(extra: &str) -> String {
    format!(
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// An Engine.IO long-polling session spoken by hand, for packets no Socket.IO client would
/// send: open, then POST raw packets and GET what the server queued.
pub struct PollingSession {
    client: reqwest::Client,
    url: String,
    headers: reqwest::header::HeaderMap,
}

/// Why a polling session could not join the chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollingRefusal {
    /// An HTTP status other than 200, with the body.
    Http(u16, String),
    /// The namespace's `connect_error` message.
    ConnectError(String),
}

impl PollingSession {
    /// Opens a session on the node on `port` and joins namespace `/`, waiting for the
    /// namespace's answer as a client does before it sends: an event posted before socketioxide
    /// has connected the socket is for a namespace the session is not in, and the session is
    /// closed (a test that did not wait failed about one run in ten).
    pub async fn open(port: u16) -> PollingSession {
        Self::join(port, &[], None)
            .await
            .unwrap_or_else(|refusal| panic!("the polling session was refused: {refusal:?}"))
    }

    /// Opens an Engine.IO session and does not join the chat.
    pub async fn open_only(port: u16) -> PollingSession {
        Self::handshake(port, &[]).await.expect("polling handshake")
    }

    /// Opens a session with `headers` on every request and joins `/` with `auth`, reading
    /// the namespace's answer: the session, or what refused it.
    pub async fn join(
        port: u16,
        headers: &[(&str, &str)],
        auth: Option<serde_json::Value>,
    ) -> Result<PollingSession, PollingRefusal> {
        let session = Self::handshake(port, headers).await?;
        let connect = match auth {
            Some(auth) => format!("40{auth}"),
            None => "40".to_owned(),
        };
        assert_eq!(session.post(&connect).await, 200, "CONNECT to /");
        // Pings may come first; the answer is among the next few payloads.
        let mut seen = Vec::new();
        for _ in 0..5 {
            let (status, body) = session.poll().await;
            if status != 200 {
                return Err(PollingRefusal::Http(status, body));
            }
            for packet in body.split('\u{1e}') {
                if packet.starts_with("40") {
                    return Ok(session);
                }
                if let Some(error) = packet.strip_prefix("44") {
                    let error: serde_json::Value = serde_json::from_str(error).expect("JSON error");
                    let message = error["message"].as_str().unwrap_or_default().to_owned();
                    return Err(PollingRefusal::ConnectError(message));
                }
            }
            seen.push(body);
        }
        panic!("no answer to CONNECT in {seen:?}")
    }

    /// The Engine.IO open request; the session it opened.
    async fn handshake(port: u16, headers: &[(&str, &str)]) -> Result<Self, PollingRefusal> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(GET_TIMEOUT)
            .build()
            .expect("an HTTP client without TLS builds");
        let mut map = reqwest::header::HeaderMap::new();
        for (name, value) in headers {
            map.append(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                reqwest::header::HeaderValue::from_str(value).expect("header value"),
            );
        }
        let base = format!("http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling");
        let response = client
            .get(&base)
            .headers(map.clone())
            .send()
            .await
            .expect("polling handshake");
        let status = response.status().as_u16();
        let open = response.text().await.expect("handshake body");
        if status != 200 {
            return Err(PollingRefusal::Http(status, open));
        }
        let json = open.strip_prefix('0').expect("an Engine.IO OPEN packet");
        let sid = serde_json::from_str::<serde_json::Value>(json).expect("OPEN is JSON")["sid"]
            .as_str()
            .expect("OPEN names the sid")
            .to_owned();
        Ok(PollingSession {
            client,
            url: format!("{base}&sid={sid}"),
            headers: map,
        })
    }

    /// POSTs one payload; the HTTP status.
    pub async fn post(&self, payload: &str) -> u16 {
        self.client
            .post(&self.url)
            .headers(self.headers.clone())
            .body(payload.to_owned())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Emits an event with `args` and ack id `id` and polls for its ack, skipping whatever else
    /// arrives (a few polls at most); `Err((status, body))` when the session answers otherwise.
    pub async fn emit_with_ack(
        &self,
        id: u64,
        args: &[serde_json::Value],
    ) -> Result<crate::Ack, (u16, String)> {
        let status = self
            .post(&format!("42{id}{}", serde_json::Value::from(args.to_vec())))
            .await;
        if status != 200 {
            return Err((status, String::new()));
        }
        let prefix = format!("43{id}");
        for _ in 0..20 {
            let (status, body) = self.poll().await;
            if status != 200 {
                return Err((status, body));
            }
            for packet in body.split('\u{1e}') {
                if let Some(args) = packet.strip_prefix(&prefix)
                    && args.starts_with('[')
                {
                    let args = serde_json::from_str(args).expect("ack arguments are JSON");
                    return Ok(crate::Ack(args));
                }
            }
        }
        panic!("no ack {id} within 20 polls")
    }

    /// GETs what the server queued; `(status, body)`. A closed session answers 400.
    pub async fn poll(&self) -> (u16, String) {
        match self
            .client
            .get(&self.url)
            .headers(self.headers.clone())
            .send()
            .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }
}
