//! The admin surface: which routes a listener serves, and the admin bearer token.
//!
//! Admin routes (`/v1/kv/score`, `/v1/kv/pods`, `/v1/route/explain`, `/metrics`) reveal the
//! fleet's cache contents (explain is a prompt oracle across tenants) and its internals;
//! `/reset_prefix_cache` empties every pod's cache (vLLM serves it only in dev mode).
//! By default they are served only on the admin listener (loopback); the serving port
//! answers them 404. `/health` is public on both. `reset_on_serving_port` puts
//! `/reset_prefix_cache` alone back on the serving port (what vLLM's dev mode does for a
//! single server; benchmark tools such as aiperf's `--reset-kv-cache` call it there).

use std::sync::Arc;

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::{Deserialize, Serialize};

/// The admin routes.
pub const ADMIN_PATHS: &[&str] =
    &["/v1/kv/score", "/v1/kv/pods", "/v1/route/explain", "/v1/route/recent", "/metrics", "/reset_prefix_cache"];

/// `admin:` in the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// The admin listener; null: none.
    pub listen: Option<std::net::SocketAddr>,
    /// Serve the admin routes on the serving port too.
    pub on_serving_port: bool,
    /// A file holding the bearer token admin routes require (also `KVROUTE_ADMIN_TOKEN`).
    pub token_file: Option<std::path::PathBuf>,
    /// Serve `/reset_prefix_cache` on the serving port too (without the token), as vLLM does
    /// with `VLLM_SERVER_DEV_MODE=1`: for benchmark fleets, not for shared ones.
    pub reset_on_serving_port: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9090))),
            on_serving_port: false,
            token_file: None,
            reset_on_serving_port: false,
        }
    }
}

impl AdminSection {
    /// The token: `token_file`'s content (trimmed), else `KVROUTE_ADMIN_TOKEN`; none if unset.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        let t = match &self.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read the admin token file {}: {e}", p.display()))?,
            ),
            None => std::env::var("KVROUTE_ADMIN_TOKEN").ok(),
        };
        let t = t.map(|t| t.trim().to_string());
        if let Some(t) = &t {
            anyhow::ensure!(!t.is_empty(), "the admin token is empty");
        }
        Ok(t)
    }
}

/// What a listener serves.
#[derive(Clone, Debug)]
pub struct Gate {
    /// Serve the admin routes here.
    pub admin: bool,
    /// Serve the other (OpenAI) routes here.
    pub public: bool,
    /// Bearer token the admin routes require.
    pub token: Option<String>,
    /// `/reset_prefix_cache` is served here as a public route (no token).
    pub public_reset: bool,
}

/// `app` with its routes restricted by `gate` (by the matched route, so no spelling of a
/// path gets around it).
pub fn gated(app: Router, gate: Gate) -> Router {
    let gate = Arc::new(gate);
    app.route_layer(axum::middleware::from_fn(move |req: Request, next: Next| {
        let gate = gate.clone();
        async move { check(&gate, req, next).await }
    }))
}

async fn check(gate: &Gate, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_default();
    if route == "/health" {
        return next.run(req).await;
    }
    let is_admin = ADMIN_PATHS.contains(&route.as_str()) && !(gate.public_reset && route == "/reset_prefix_cache");
    if (is_admin && !gate.admin) || (!is_admin && !gate.public) {
        return json_error(StatusCode::NOT_FOUND, "NotFoundError", format!("no route {}", req.uri().path()));
    }
    if let (true, Some(token)) = (is_admin, &gate.token) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time (for equal lengths): no timing oracle on the token's bytes.
        if !bool::from(subtle::ConstantTimeEq::ct_eq(given.trim().as_bytes(), token.as_bytes())) {
            let mut r = json_error(
                StatusCode::UNAUTHORIZED,
                "AuthenticationError",
                "admin route: missing or wrong bearer token".to_string(),
            );
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// An OpenAI-style error response.
pub fn json_error(status: StatusCode, kind: &str, message: String) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": status.as_u16()}});
    (status, axum::Json(body)).into_response()
}
