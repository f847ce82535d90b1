//! vLLM's other endpoints, through the gateway: the ones clients and benchmark tools call
//! besides generation.
//!
//! - `POST /tokenize`, `POST /detokenize`, `POST /v1/embeddings`: to the least-loaded
//!   healthy pod serving the body's `model` (any healthy pod when none is named); a
//!   connection error, 429 or 5xx tries the next one. The pod's answer passes through.
//! - `GET /version`: the first healthy pod's answer, else the gateway's own
//!   `{"version": …}` (vLLM's shape).
//! - `POST /reset_prefix_cache` (`?model=` or a JSON `model` picks the pods serving it;
//!   all pods otherwise): sent to every one of those pods at once; each pod that resets is
//!   forgotten by the router (its index entries, speculative ones included, and its
//!   approximate prefix records) — its `AllBlocksCleared` event says the same later. 200
//!   when every pod in rotation reset (a pod out of rotation is tried too, and listed as
//!   `unreachable` when it does not answer: one dead pod must not block every reset);
//!   otherwise 502 naming each failure.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::{error, Backend, Gateway};

/// Routes of this module, merged into the gateway's router.
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/tokenize", post(|s, h, b| forward(s, h, b, "/tokenize")))
        .route("/detokenize", post(|s, h, b| forward(s, h, b, "/detokenize")))
        .route("/v1/embeddings", post(|s, h, b| forward(s, h, b, "/v1/embeddings")))
        .route("/version", get(version))
        .route("/v1/models", get(models))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
}

/// Healthy pods serving `model` (every healthy pod for `None`), least loaded first.
fn candidates(gw: &Gateway, model: Option<&str>) -> Vec<Arc<Backend>> {
    let mut v: Vec<Arc<Backend>> =
        gw.pool.backends().iter().filter(|b| b.is_healthy() && model.is_none_or(|m| b.serves(m))).cloned().collect();
    v.sort_by_key(|b| b.in_flight.load(std::sync::atomic::Ordering::Relaxed));
    v
}

/// The pod's response, streamed through, with `x-kvroute-pod`.
fn pass_through(b: &Backend, resp: reqwest::Response) -> Response {
    let status = resp.status();
    let ctype = resp.headers().get("content-type").cloned();
    let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
    *out.status_mut() = status;
    if let Some(c) = ctype {
        out.headers_mut().insert("content-type", c);
    }
    if let Ok(p) = HeaderValue::from_str(&b.name) {
        out.headers_mut().insert("x-kvroute-pod", p);
    }
    out
}

async fn forward(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes, path: &'static str) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "the body must be a JSON object"),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")),
    };
    let model = v.get("model").and_then(Value::as_str).filter(|m| !m.is_empty());
    if let Some(m) = model.filter(|m| !gw.pool.backends().iter().any(|b| b.serves(m))) {
        return crate::model_not_found(m).into_response();
    }
    let pods = candidates(&gw, model);
    if pods.is_empty() {
        let msg = match model {
            Some(m) => format!("no ready endpoint serves model `{m}`"),
            None => "no ready endpoint".to_string(),
        };
        return error(StatusCode::SERVICE_UNAVAILABLE, &msg);
    }
    let mut last_err = String::new();
    for (i, b) in pods.iter().enumerate().take(gw.max_retries + 1) {
        if i > 0 {
            gw.upstream.retries.inc();
        }
        let mut req = gw.client.post(format!("{}{path}", b.url)).header("content-type", "application/json");
        for h in ["authorization", "x-request-id"] {
            if let Some(val) = headers.get(h) {
                req = req.header(h, val);
            }
        }
        let send = req.body(body.clone()).timeout(gw.timeouts.total).send();
        let m = &gw.upstream;
        match tokio::time::timeout(gw.timeouts.first_byte, send).await {
            Ok(Ok(r))
                if r.status() == StatusCode::TOO_MANY_REQUESTS
                    || r.status().is_server_error()
                    || r.status().is_redirection() =>
            {
                let kind = match r.status().as_u16() {
                    429 => "status_429",
                    300..=399 => "redirect",
                    _ => "status_5xx",
                };
                m.errors.with_label_values(&[&b.name, kind]).inc();
                last_err = format!("{} answered {}", b.name, r.status());
                if kind != "status_429" {
                    b.failed();
                }
            }
            Ok(Ok(r)) => return pass_through(b, r),
            Ok(Err(e)) => {
                m.errors.with_label_values(&[&b.name, crate::upstream::error_kind(&e)]).inc();
                let e = crate::upstream::describe(e);
                tracing::warn!(pod = %b.name, "{path} failed: {e}");
                last_err = format!("{}: {e}", b.name);
                b.failed();
            }
            Err(_) => {
                m.timeouts.with_label_values(&[&b.name, "first_byte"]).inc();
                last_err = format!("{}: no response within the first_byte timeout", b.name);
                b.failed();
            }
        }
    }
    error(StatusCode::SERVICE_UNAVAILABLE, &format!("no pod could serve {path} ({last_err})"))
}

async fn version(State(gw): State<Arc<Gateway>>) -> Response {
    for b in candidates(&gw, None).iter().take(gw.max_retries + 1) {
        match gw.client.get(format!("{}/version", b.url)).timeout(Duration::from_secs(2)).send().await {
            Ok(r) if r.status().is_success() => return pass_through(b, r),
            Ok(r) => tracing::debug!(pod = %b.name, status = %r.status(), "/version"),
            Err(e) => tracing::debug!(pod = %b.name, "/version: {e}"),
        }
    }
    Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// The models the healthy pods serve (the first pod's card for each id), with every
/// field of vLLM's `ModelCard` present (a backend that leaves some out gets vLLM's
/// defaults).
async fn models(State(gw): State<Arc<Gateway>>) -> Response {
    let mut seen = std::collections::BTreeMap::new();
    for b in gw.pool.backends().iter().filter(|b| b.is_healthy()) {
        for m in b.models.read().iter() {
            if let Some(id) = m.get("id").and_then(Value::as_str) {
                seen.entry(id.to_string()).or_insert_with(|| model_card(m, id));
            }
        }
    }
    Json(json!({"object": "list", "data": seen.into_values().collect::<Vec<_>>()})).into_response()
}

fn model_card(m: &Value, id: &str) -> Value {
    let mut card = m.clone();
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let defaults = [
        ("object", json!("model")),
        ("created", json!(created)),
        ("owned_by", json!("vllm")),
        ("root", json!(id)),
        ("parent", Value::Null),
        ("max_model_len", Value::Null),
        ("permission", json!([])),
    ];
    if let Value::Object(o) = &mut card {
        for (k, v) in defaults {
            o.entry(k).or_insert(v);
        }
    }
    card
}

/// The `model` of `?model=…` or of a JSON body (an empty body names none).
fn reset_model(query: Option<&str>, body: &[u8]) -> Result<Option<String>, Response> {
    let from_query = query
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find_map(|(k, v)| (k == "model").then(|| v.into_owned())));
    if from_query.is_some() || body.iter().all(u8::is_ascii_whitespace) {
        return Ok(from_query);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v.get("model").and_then(Value::as_str).map(str::to_string)),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}"))),
    }
}

async fn reset_prefix_cache(State(gw): State<Arc<Gateway>>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    let model = match reset_model(query.as_deref(), &body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    // Every pod of the model, healthy or not: a pod out of rotation still holds its cache.
    let pods: Vec<Arc<Backend>> =
        gw.pool.backends().iter().filter(|b| model.as_deref().is_none_or(|m| b.serves(m))).cloned().collect();
    if pods.is_empty() {
        let m = model.as_deref().unwrap_or_default();
        return error(StatusCode::NOT_FOUND, &format!("no pod serves model `{m}`"));
    }
    let suffix = query.map(|q| format!("?{q}")).unwrap_or_default();
    let calls = pods.iter().map(|b| {
        let req = gw.client.post(format!("{}/reset_prefix_cache{suffix}", b.url)).timeout(Duration::from_secs(35));
        async move {
            match req.send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    let msg = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
                        .unwrap_or(text);
                    Err(format!("answered {status}: {}", msg.trim()))
                }
                Err(e) => Err(crate::upstream::describe(e)),
            }
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let (mut reset, mut failed, mut unreachable) = (Vec::new(), Vec::new(), Vec::new());
    for (b, r) in pods.iter().zip(results) {
        match r {
            Ok(()) => reset.push(b.clone()),
            // Out of rotation and not answering: it serves nothing until it is back.
            Err(e) if !b.is_healthy() => unreachable.push(json!({"pod": b.name, "error": e})),
            Err(e) => failed.push(json!({"pod": b.name, "error": e})),
        }
    }
    // The router forgets what those pods held (a shared index is written over the network).
    let (applier, approx_pods) = (gw.applier.clone(), reset.iter().map(|b| b.pod).collect::<Vec<_>>());
    for &pod in &approx_pods {
        gw.approx.forget_pod(pod);
    }
    let cleared = tokio::task::spawn_blocking(move || {
        for pod in approx_pods {
            applier.clear_pod(pod);
        }
    })
    .await;
    if let Err(e) = cleared {
        return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("clearing the router's index failed: {e}"));
    }
    let names: Vec<&str> = reset.iter().map(|b| b.name.as_str()).collect();
    tracing::info!(pods = ?names, failed = failed.len(), unreachable = unreachable.len(), "prefix caches reset");
    if failed.is_empty() {
        return Json(json!({"reset": names, "unreachable": unreachable})).into_response();
    }
    let detail: Vec<String> = failed
        .iter()
        .map(|f| format!("{}: {}", f["pod"].as_str().unwrap_or(""), f["error"].as_str().unwrap_or("")))
        .collect();
    let msg = format!("prefix cache reset failed on {} of {} pods: {}", failed.len(), pods.len(), detail.join("; "));
    let body = json!({"error": {"message": msg, "code": 502}, "reset": names, "failed": failed});
    (StatusCode::BAD_GATEWAY, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_names_its_model_by_query_or_body() {
        assert_eq!(reset_model(Some("model=my%2Fmodel&x=1"), b"").ok(), Some(Some("my/model".into())));
        assert_eq!(reset_model(None, b"{\"model\": \"m\"}").ok(), Some(Some("m".into())));
        assert_eq!(reset_model(Some("reset_running_requests=true"), b" ").ok(), Some(None));
        assert!(reset_model(None, b"{nope").is_err());
        assert_eq!(reset_model(Some("model=a+b%20c"), b"").ok(), Some(Some("a b c".into())));
    }

    #[test]
    fn model_cards_get_vllms_fields() {
        let c = model_card(&json!({"id": "m", "owned_by": "someone"}), "m");
        for k in ["object", "created", "owned_by", "root", "parent", "max_model_len", "permission"] {
            assert!(c.get(k).is_some(), "{k}: {c}");
        }
        assert_eq!(c["owned_by"], "someone");
        assert_eq!(c["object"], "model");
    }
}
