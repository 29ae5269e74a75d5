//! Who may open a socket: the page's origin, checked on every Socket.IO request, and the
//! handshake's signed token when authentication is configured.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind as JwtErrorKind};
use serde::Deserialize;
use serde_json::Value;

use crate::config::AccessSettings;

/// Why the access settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The public key file could not be read.
    #[error("cannot read access.jwt_public_key_file {path}")]
    KeyFile {
        /// The configured path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The secret cannot be used as an HMAC key.
    #[error("access.jwt_secret cannot be used: {0}")]
    Secret(String),
    /// The key is not a PEM public key of the configured algorithm.
    #[error("access.jwt_public_key_file {path} is not a {algorithm} public key in PEM: {reason}")]
    Key {
        /// The configured path.
        path: String,
        /// The configured algorithm.
        algorithm: String,
        /// What the parser said.
        reason: String,
    },
}

/// The origins whose pages may open a socket.
#[derive(Debug, Clone)]
pub struct Origins {
    any: bool,
    /// Lowercased, without a trailing slash.
    allowed: Vec<String>,
}

/// What an `Origin` header means for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// No `Origin`: not a browser's cross-site request (or a same-origin GET).
    Absent,
    /// The page is served by this host.
    SameOrigin,
    /// An allowed page of another origin: answered with CORS headers naming it.
    Cross(HeaderValue),
    /// Any other page.
    Refused,
}

impl Origins {
    /// From `access.allowed_origins`.
    pub fn new(settings: &AccessSettings) -> Self {
        Self {
            any: settings.allowed_origins.iter().any(|o| o == "*"),
            allowed: settings
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a request with these headers may reach Socket.IO.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        self.verdict(headers) != Verdict::Refused
    }

    fn verdict(&self, headers: &HeaderMap) -> Verdict {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Verdict::Absent;
        };
        let Ok(text) = origin.to_str() else {
            return Verdict::Refused;
        };
        let text = text.to_ascii_lowercase();
        let authority = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"));
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        if let (Some(authority), Some(host)) = (authority, host)
            && same_authority(authority, &host)
        {
            return Verdict::SameOrigin;
        }
        if self.any || self.allowed.contains(&text) {
            Verdict::Cross(origin.clone())
        } else {
            Verdict::Refused
        }
    }
}

/// `host[:port]` from an origin against a `Host` header, the default ports being implied.
fn same_authority(origin: &str, host: &str) -> bool {
    let strip = |s: &str| {
        s.strip_suffix(":80")
            .or_else(|| s.strip_suffix(":443"))
            .unwrap_or(s)
            .to_owned()
    };
    origin == host || strip(origin) == strip(host)
}

/// The middleware in front of Socket.IO: a page of a foreign origin gets `403` before any
/// session exists (so no cross-site page can open a socket with a visitor's cookies, over
/// websocket or polling); an allowed one gets CORS headers and its preflight answered.
pub async fn check_origin(
    State(origins): State<Arc<Origins>>,
    request: Request,
    next: Next,
) -> Response {
    match origins.verdict(request.headers()) {
        Verdict::Refused => refused_origin(),
        Verdict::Absent | Verdict::SameOrigin => next.run(request).await,
        Verdict::Cross(origin) if request.method() == Method::OPTIONS => {
            let asked = request
                .headers()
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned();
            let mut response = StatusCode::NO_CONTENT.into_response();
            let headers = response.headers_mut();
            cors(headers, origin);
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            if let Some(asked) = asked {
                headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
            }
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            response
        }
        Verdict::Cross(origin) => {
            let mut response = next.run(request).await;
            cors(response.headers_mut(), origin);
            response
        }
    }
}

fn cors(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}

fn refused_origin() -> Response {
    let body = r#"{"code":"origin_not_allowed","message":"this page's origin may not open a socket here"}"#;
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The token's `sub`.
    pub id: Arc<str>,
    /// The token's `name`, or its `sub` without one.
    pub name: Arc<str>,
}

/// Why a handshake's token was refused; the message is the `connect_error`'s stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token, a malformed one, a bad signature, another algorithm, or unusable claims.
    #[error("unauthorized")]
    Unauthorized,
    /// A valid token past its `exp`.
    #[error("token_expired")]
    Expired,
}

/// Longest accepted `sub`, in characters.
const MAX_ID_CHARS: usize = 128;

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    name: Option<String>,
}

/// Verifies the handshake tokens of one configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// The verifier the settings configure, or `None` for an open chat.
    pub fn new(settings: &AccessSettings) -> Result<Option<Self>, AccessError> {
        let (key, algorithm) = if let Some(secret) = settings.jwt_secret() {
            let key = DecodingKey::from_secret(secret.as_bytes())
                .map_err(|error| AccessError::Secret(error.to_string()))?;
            (key, Algorithm::HS256)
        } else if let Some(path) = settings.jwt_public_key_file() {
            let pem = std::fs::read(path).map_err(|source| AccessError::KeyFile {
                path: path.to_owned(),
                source,
            })?;
            let (key, algorithm) = if settings.jwt_algorithm == "ES256" {
                (DecodingKey::from_ec_pem(&pem), Algorithm::ES256)
            } else {
                (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256)
            };
            let key = key.map_err(|error| AccessError::Key {
                path: path.to_owned(),
                algorithm: settings.jwt_algorithm.clone(),
                reason: error.to_string(),
            })?;
            (key, algorithm)
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(algorithm);
        // `exp` is optional: a token without one does not expire; one with it is checked.
        validation.set_required_spec_claims(&["sub"]);
        validation.validate_exp = true;
        Ok(Some(Self { key, validation }))
    }

    /// The user `auth.token` names, when it verifies.
    pub fn verify(&self, auth: Option<&Value>) -> Result<User, TokenError> {
        let token = auth
            .and_then(|auth| auth.get("token"))
            .and_then(Value::as_str)
            .ok_or(TokenError::Unauthorized)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| match error.kind() {
                JwtErrorKind::ExpiredSignature => TokenError::Expired,
                other => {
                    tracing::debug!(error = ?other, "handshake token refused");
                    TokenError::Unauthorized
                }
            })?
            .claims;
        let id = claims.sub;
        if id.is_empty() || id.chars().count() > MAX_ID_CHARS {
            return Err(TokenError::Unauthorized);
        }
        let name = crate::names::display_name(claims.name.as_deref().unwrap_or(&id))
            .map_err(|_| TokenError::Unauthorized)?;
        Ok(User {
            name: name.into(),
            id: id.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(pairs: &[(&str, &str)]) -> AccessSettings {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        crate::config::Settings::load_from(None, env)
            .unwrap()
            .access
    }

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        h
    }

    #[test]
    fn only_the_own_and_the_listed_origins_pass() {
        let origins = Origins::new(&settings(&[(
            "CHORUS__ACCESS__ALLOWED_ORIGINS",
            "https://chat.example.com",
        )]));
        let v = |origin, host| origins.verdict(&headers(origin, host));
        assert_eq!(v(None, "localhost:3000"), Verdict::Absent);
        assert_eq!(
            v(Some("http://localhost:3000"), "localhost:3000"),
            Verdict::SameOrigin
        );
        assert_eq!(
            v(Some("https://Chat.example.com"), "chat.example.com:443"),
            Verdict::SameOrigin
        );
        assert!(matches!(
            v(Some("https://chat.example.com"), "10.0.0.5:3000"),
            Verdict::Cross(_)
        ));
        assert_eq!(
            v(Some("https://evil.example"), "localhost:3000"),
            Verdict::Refused
        );
        assert_eq!(v(Some("null"), "localhost:3000"), Verdict::Refused);
        let any = Origins::new(&settings(&[("CHORUS__ACCESS__ALLOWED_ORIGINS", "*")]));
        assert!(matches!(
            any.verdict(&headers(Some("https://evil.example"), "localhost")),
            Verdict::Cross(_)
        ));
    }

    fn token(claims: &Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn tokens_verify_by_signature_expiry_and_claims() {
        let verifier = Verifier::new(&settings(&[("CHORUS__ACCESS__JWT_SECRET", "s3cret")]))
            .unwrap()
            .unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let check = |claims: Value, secret: &str| {
            verifier.verify(Some(&json!({ "token": token(&claims, secret) })))
        };
        assert_eq!(
            check(json!({"sub": "u1", "name": " Ada "}), "s3cret").unwrap(),
            User {
                id: "u1".into(),
                name: "Ada".into()
            }
        );
        assert_eq!(
            check(json!({"sub": "u2", "exp": now + 600}), "s3cret")
                .unwrap()
                .name
                .as_ref(),
            "u2"
        );
        assert_eq!(
            check(json!({"sub": "u1", "exp": now - 3600}), "s3cret"),
            Err(TokenError::Expired)
        );
        for (claims, secret) in [
            (json!({"sub": "u1"}), "other"),
            (json!({"name": "Ada"}), "s3cret"),
            (json!({"sub": "u1", "name": "@Ada"}), "s3cret"),
            (json!({"sub": "u1", "name": "a|b"}), "s3cret"),
            (json!({"sub": "u1", "name": "x".repeat(33)}), "s3cret"),
        ] {
            assert_eq!(check(claims, secret), Err(TokenError::Unauthorized));
        }
        for auth in [
            None,
            Some(json!({})),
            Some(json!({"token": 7})),
            Some(json!({"token": "a.b.c"})),
        ] {
            assert_eq!(
                verifier.verify(auth.as_ref()),
                Err(TokenError::Unauthorized)
            );
        }
        assert!(
            Verifier::new(&settings(&[])).unwrap().is_none(),
            "no key: an open chat"
        );
    }
}
