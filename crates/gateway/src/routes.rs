//! The gateway's HTTP routes: the OpenAI endpoints ([`crate::proxy`]), readiness, and the
//! admin views `/v1/route/explain` and `/v1/route/recent`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::errors::{error, json_rejections};
use crate::{parse_request, passthrough, proxy, Gateway, Pool, RouteRequest};

/// The gateway's routes (merged into the router's HTTP app).
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/completions", post(|s, h, b| proxy::proxy(s, h, b, false)))
        .route("/v1/chat/completions", post(|s, h, b| proxy::proxy(s, h, b, true)))
        .route("/v1/route/explain", post(explain))
        .route("/v1/route/recent", get(recent))
        .route("/ready", get(ready))
        .merge(passthrough::routes())
        .layer(axum::extract::DefaultBodyLimit::max(32 << 20))
        .layer(axum::middleware::map_response(json_rejections))
        .with_state(gw)
}

impl Gateway {
    /// Hit attribution on or off, and how many requests `/v1/route/recent` keeps (before
    /// the gateway is shared).
    pub fn configure_attribution(&mut self, enabled: bool, recent: usize) {
        if let Some(a) = Arc::get_mut(&mut self.attribution) {
            a.enabled = enabled;
            a.set_capacity(recent);
        }
    }

    /// Answers readiness with `lifecycle` (its holds and drain), whose extra check becomes
    /// this gateway's rule ([`pool_readiness`]) so that `kvroute_ready` agrees with `/ready`.
    pub fn set_lifecycle(&mut self, lifecycle: Arc<kvroute_api::lifecycle::Lifecycle>) {
        let pool = self.pool.clone();
        lifecycle.set_check(Box::new(move || pool_readiness(&pool).map(|_| ())));
        self.lifecycle = lifecycle;
    }
}

/// The pool's part of readiness: (backends in rotation, backends) while some backend is in
/// rotation and has passed a probe, or none is configured (an index-only router); else why not.
/// A discovered pool is also not ready before discovery's first full listing (and the
/// replays of the pods it found), or while it has no endpoint (the reason says why, e.g.
/// the pool does not exist).
pub fn pool_readiness(pool: &Pool) -> Result<(usize, usize), String> {
    let healthy = pool.ready_backends();
    let total = pool.backends().len();
    let discovery = pool.discovery.read().clone();
    if let Some(d) = discovery {
        if !d.synced {
            let why = d.problem.map(|p| format!(" ({p})")).unwrap_or_default();
            return Err(format!("not ready: discovery has not listed the fleet yet{why}"));
        }
        if total == 0 {
            return Err(format!("not ready: {}", d.problem.unwrap_or_else(|| "discovery found no endpoint".into())));
        }
    }
    if healthy == 0 && total > 0 {
        return Err(format!("not ready: none of {total} backends is in rotation"));
    }
    Ok((healthy, total))
}

/// Readiness (`GET /ready`): 200 while no readiness hold is outstanding, the router is not
/// draining, and [`pool_readiness`] passes; else 503 (with the holds' names). `/health`
/// stays liveness (the router process answers).
async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    if let Some(not_ready) = gw.lifecycle.not_ready() {
        return not_ready.into_response();
    }
    match pool_readiness(&gw.pool) {
        Ok((healthy, total)) => {
            Json(json!({"status": "ready", "healthy_backends": healthy, "backends": total})).into_response()
        }
        Err(why) => error(StatusCode::SERVICE_UNAVAILABLE, &why),
    }
}

async fn explain(State(gw): State<Arc<Gateway>>, body: Bytes) -> Response {
    let (v, model) = match parse_request(&body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let chat = v.get("messages").is_some();
    match gw.route(&RouteRequest { chat, model: &model, body: &v, dry_run: true, ..Default::default() }).await {
        Ok(r) => Json(r.explain).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/route/recent?limit=N` (admin): the last N attributed requests, newest first —
/// predicted and engine-reported cached tokens, outcome, causes of the miss.
async fn recent(State(gw): State<Arc<Gateway>>, q: axum::extract::RawQuery) -> Response {
    let mut limit = 50;
    for (k, v) in form_urlencoded::parse(q.0.unwrap_or_default().as_bytes()) {
        if k == "limit" {
            match v.parse::<usize>() {
                Ok(n) => limit = n,
                Err(_) => return error(StatusCode::BAD_REQUEST, &format!("limit must be a count, not `{v}`")),
            }
        }
    }
    Json(gw.attribution.recent(limit)).into_response()
}
