//! # kvroute-gateway — request → tokens → keys → scores → pick → proxy
//!
//! The OpenAI-compatible front door of `kvroute serve`: `POST /v1/completions` and
//! `POST /v1/chat/completions` are tokenized in-process (`kvroute-tokenize`, per model),
//! keyed like the index (`kvroute-api`'s [`RequestKeys`]), scored against the index
//! (`kvroute-score`) and the router's own load view, scheduled by a profile
//! (`kvroute-schedule`), and proxied to the chosen pod with the response streamed through
//! chunk by chunk. A pod that fails before the first byte (connection error, 429, 5xx) is
//! retried on the next best pod; two failures (requests or probes) take a pod out until a
//! probe succeeds. The chosen pod gets speculative index entries for the request's blocks.
//! `POST /v1/route/explain` shows the decision without forwarding.

// Handlers return `Result<_, Response>` to bail out with an HTTP error early.
#![allow(clippy::result_large_err)]

pub mod pool;

use std::collections::HashMap;
use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use kvroute_api::{RequestKeys, SharedIndex};
use kvroute_index::{BlockIndex, EventApplier, Tiers};
use kvroute_schedule::{PodView, Profile, RequestView};
use kvroute_score::{LongestPrefixScorer, Scratch};
use kvroute_tokenize::{normalize_messages, BuiltinTokenizer, Tokenizer};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use serde_json::{json, Value};
use tracing::warn;

pub use pool::{Backend, Pool};

pub struct Gateway {
    pub pool: Arc<Pool>,
    pub client: reqwest::Client,
    pub profile: Profile,
    pub applier: Arc<EventApplier<SharedIndex>>,
    pub keys: Arc<RequestKeys>,
    /// Tokenizer per served model name; others use the built-in tokenizer.
    pub tokenizers: HashMap<String, Box<dyn Tokenizer>>,
    pub max_retries: usize,
    pub scrape_max_age: Duration,
    scorer: LongestPrefixScorer,
    decisions: IntCounterVec,
    decision_seconds: Histogram,
    matched_blocks: Histogram,
}

/// What routing decided for one request.
struct Routed {
    /// Backends in the order to try them (the pick first).
    order: Vec<Arc<Backend>>,
    keys: Vec<u64>,
    explain: Value,
}

impl Gateway {
    pub fn new(
        pool: Arc<Pool>,
        profile: Profile,
        applier: Arc<EventApplier<SharedIndex>>,
        keys: Arc<RequestKeys>,
        tokenizers: HashMap<String, Box<dyn Tokenizer>>,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let decisions = IntCounterVec::new(
            Opts::new("kvroute_router_decisions_total", "Routing decisions by chosen pod"),
            &["pod"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        let decision_seconds = Histogram::with_opts(
            HistogramOpts::new("kvroute_router_decision_seconds", "Tokenize + keys + score + pick, per request")
                .buckets(vec![5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2]),
        )?;
        registry.register(Box::new(decision_seconds.clone()))?;
        let matched_blocks = Histogram::with_opts(
            HistogramOpts::new("kvroute_router_matched_blocks", "Prefix blocks the chosen pod had cached")
                .buckets(vec![0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]),
        )?;
        registry.register(Box::new(matched_blocks.clone()))?;
        Ok(Self {
            pool,
            client: reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap_or_default(),
            profile,
            applier,
            keys,
            tokenizers,
            max_retries: 2,
            scrape_max_age: Duration::from_secs(10),
            scorer: LongestPrefixScorer::default(),
            decisions,
            decision_seconds,
            matched_blocks,
        })
    }

    fn tokenizer(&self, model: &str) -> &dyn Tokenizer {
        static BUILTIN: BuiltinTokenizer = BuiltinTokenizer;
        self.tokenizers.get(model).map(|t| t.as_ref()).unwrap_or(&BUILTIN)
    }

    fn tokens(&self, chat: bool, model: &str, v: &Value) -> Result<Vec<u32>, Response> {
        let t = self.tokenizer(model);
        if chat {
            let m = v.get("messages").filter(|m| m.is_array()).ok_or_else(|| bad("`messages` must be an array"))?;
            return t
                .encode_chat(&normalize_messages(m), v.get("tools").filter(|x| !x.is_null()), true)
                .map_err(|e| bad(&e.to_string()));
        }
        match v.get("prompt") {
            Some(Value::String(s)) => Ok(t.encode(s, true)),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                Ok(t.encode(a[0].as_str().unwrap_or(""), true))
            }
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad("`prompt` token ids must be non-negative integers"))
                })
                .collect(),
            _ => Err(bad("`prompt` must be a string or an array of token ids")),
        }
    }

    /// Tokenize → keys → index scores → profile → candidates in order.
    fn route(&self, chat: bool, model: &str, v: &Value) -> Result<Routed, Response> {
        let t0 = Instant::now();
        let tokens = self.tokens(chat, model, v)?;
        let lora = self.pool.lora_names.read().contains(model).then_some(model);
        let salt = v.get("cache_salt").and_then(Value::as_str);
        let mut keys = Vec::new();
        self.keys.keys(&tokens, lora, salt, &mut keys);
        let backends: Vec<Arc<Backend>> =
            self.pool.backends.iter().filter(|b| b.is_healthy() && b.serves(model)).cloned().collect();
        if backends.is_empty() {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, &format!("no healthy pod serves model `{model}`")));
        }
        let ids: Vec<_> = backends.iter().map(|b| b.pod).collect();
        let scores = thread_local_scratch(|s| self.scorer.score(self.applier.index(), &keys, Some(&ids), s));
        let views: Vec<PodView> = backends
            .iter()
            .map(|b| {
                let s = scores.iter().find(|s| s.pod == b.pod);
                PodView {
                    name: b.name.clone(),
                    in_flight: b.in_flight.load(Relaxed),
                    matched_blocks: s.map_or(0, |s| s.matched_blocks),
                    prefix_score: s.map_or(0.0, |s| s.score),
                    kv_usage: b.kv_usage(self.scrape_max_age),
                }
            })
            .collect();
        let req =
            RequestView { prompt_tokens: tokens.len(), block_size: self.keys.block_size(), total_blocks: keys.len() };
        let d = self.profile.schedule(&req, &views);
        let Some(pick) = d.pick else {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, "no pod left after filtering"));
        };
        let mut rest: Vec<(usize, f64)> =
            d.candidates.iter().zip(&d.totals).filter(|(i, _)| **i != pick).map(|(i, t)| (*i, *t)).collect();
        rest.sort_by(|a, b| b.1.total_cmp(&a.1));
        let order: Vec<Arc<Backend>> =
            std::iter::once(pick).chain(rest.into_iter().map(|x| x.0)).map(|i| backends[i].clone()).collect();
        self.decision_seconds.observe(t0.elapsed().as_secs_f64());
        self.matched_blocks.observe(views[pick].matched_blocks as f64);
        let explain = json!({
            "model": model,
            "prompt_tokens": tokens.len(),
            "block_size": req.block_size,
            "blocks": keys.len(),
            "pods": views.iter().enumerate().map(|(i, p)| {
                let pos = d.candidates.iter().position(|c| *c == i);
                json!({"pod": p.name, "matched_blocks": p.matched_blocks, "in_flight": p.in_flight, "kv_cache_usage": p.kv_usage,
                       "candidate": pos.is_some(),
                       "scores": d.scores.iter().map(|(n, w, v)| json!({"plugin": n, "weight": w, "score": pos.map(|j| v[j])})).collect::<Vec<_>>(),
                       "total": pos.map(|j| d.totals[j])})
            }).collect::<Vec<_>>(),
            "profile": self.profile.name,
            "pick": views[pick].name,
            "decision_us": t0.elapsed().as_secs_f64() * 1e6,
        });
        Ok(Routed { order, keys, explain })
    }
}

fn thread_local_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    thread_local!(static S: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default()));
    S.with(|s| f(&mut s.borrow_mut()))
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({"error": {"message": msg, "code": status.as_u16()}}))).into_response()
}

fn bad(msg: &str) -> Response {
    error(StatusCode::BAD_REQUEST, msg)
}

/// The gateway's routes (merged into the router's HTTP app).
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/completions", post(|s, h, b| proxy(s, h, b, false)))
        .route("/v1/chat/completions", post(|s, h, b| proxy(s, h, b, true)))
        .route("/v1/models", get(models))
        .route("/v1/route/explain", post(explain))
        .with_state(gw)
}

fn parse(body: &Bytes) -> Result<(Value, String), Response> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(&format!("invalid JSON body: {e}")))?;
    let model =
        v.get("model").and_then(Value::as_str).filter(|m| !m.is_empty()).ok_or_else(|| bad("missing `model`"))?;
    Ok((v.clone(), model.to_string()))
}

async fn explain(State(gw): State<Arc<Gateway>>, body: Bytes) -> Response {
    let (v, model) = match parse(&body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let chat = v.get("messages").is_some();
    match gw.route(chat, &model, &v) {
        Ok(r) => Json(r.explain).into_response(),
        Err(r) => r,
    }
}

async fn models(State(gw): State<Arc<Gateway>>) -> Response {
    let mut seen = std::collections::BTreeMap::new();
    for b in gw.pool.backends.iter().filter(|b| b.is_healthy()) {
        for m in b.models.read().iter() {
            if let Some(id) = m.get("id").and_then(Value::as_str) {
                seen.entry(id.to_string()).or_insert_with(|| m.clone());
            }
        }
    }
    Json(json!({"object": "list", "data": seen.into_values().collect::<Vec<_>>()})).into_response()
}

/// Decrements a pod's in-flight count when the response (stream) is done.
struct InFlight(Arc<Backend>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, AcqRel);
    }
}

async fn proxy(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes, chat: bool) -> Response {
    let (v, model) = match parse(&body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let routed = match gw.route(chat, &model, &v) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
    let mut last_err = String::new();
    for b in routed.order.iter().take(gw.max_retries + 1) {
        b.in_flight.fetch_add(1, AcqRel);
        let guard = InFlight(b.clone());
        let mut req =
            gw.client.post(format!("{}{path}", b.url)).header("content-type", "application/json").body(body.clone());
        for h in ["authorization", "x-request-id", "x-session-id"] {
            if let Some(val) = headers.get(h) {
                req = req.header(h, val);
            }
        }
        match req.send().await {
            Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS || resp.status().is_server_error() => {
                last_err = format!("{} answered {}", b.name, resp.status());
                if resp.status().is_server_error() {
                    b.failed();
                }
            }
            Ok(resp) => {
                gw.applier.index().store_speculative(b.pod, Tiers::GPU, &routed.keys);
                gw.decisions.with_label_values(&[&b.name]).inc();
                let status = resp.status();
                let ctype = resp.headers().get("content-type").cloned();
                let stream = resp.bytes_stream().map(move |chunk| {
                    let _hold = &guard;
                    chunk
                });
                let mut out = Response::new(Body::from_stream(stream));
                *out.status_mut() = status;
                if let Some(c) = ctype {
                    out.headers_mut().insert("content-type", c);
                }
                if let Ok(p) = HeaderValue::from_str(&b.name) {
                    out.headers_mut().insert("x-kvroute-pod", p);
                }
                return out;
            }
            Err(e) => {
                warn!(pod = %b.name, "request failed before the first byte: {e}");
                last_err = format!("{}: {e}", b.name);
                b.failed();
            }
        }
    }
    error(StatusCode::SERVICE_UNAVAILABLE, &format!("no pod could serve the request ({last_err})"))
}
