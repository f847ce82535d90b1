//! # kvroute-api — the router's HTTP surface (request → keys → scores)
//!
//! * `GET /health` — 200 `ok` (every listener, no token).
//!
//! Admin routes (served on the admin listener, see [`admin`]):
//! * `POST /v1/kv/score` — `{"model", "token_ids", "pods"?, "lora_name"?, "cache_salt"?}` →
//!   `{"block_size", "blocks", "scores": [{"pod", "matched_blocks", "score"}, …]}`, best
//!   first, every pod with at least one matched block (restricted to `pods` when given).
//! * `GET /v1/kv/pods` — per-pod index entries, last sequence number, gaps, replays, …
//! * `GET /metrics` — Prometheus text: ingestion counters, index size, lookup latency.
//!
//! Bad requests get a 4xx with `{"error": "<message>"}`.
//!
//! [`listen`] serves an app with client-side limits (timeouts, connection caps, TLS);
//! [`admin`] keeps the admin routes (`/v1/kv/*`, `/v1/route/explain`, `/metrics`) off the
//! serving port unless asked, behind an optional bearer token; [`lifecycle`] holds the
//! process's readiness (named holds, e.g. until discovery has synced) and its shutdown drain.

pub mod admin;
pub mod lifecycle;
pub mod listen;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvroute_index::{BlockIndex, EventApplier, PodId, Pods};
use kvroute_ingest::Ingestor;
use kvroute_keys::{BlockHasher, LoraRef, RequestExtras, RequestKeyer};
use kvroute_score::{LongestPrefixScorer, Scratch};
use prometheus::{Encoder, Histogram, HistogramOpts, IntGauge, Registry, TextEncoder};
use serde::{Deserialize, Serialize};

/// The index as the API and the ingestion share it.
pub type SharedIndex = Arc<dyn BlockIndex>;

/// How request tokens become block keys (must match how events are keyed).
pub enum RequestKeys {
    /// vLLM's own hashes, configured like the servers (engine-key mode).
    Vllm(BlockHasher),
    /// kvroute's request keys (request-key mode).
    Request(RequestKeyer),
}

impl RequestKeys {
    pub fn block_size(&self) -> usize {
        match self {
            RequestKeys::Vllm(h) => h.block_size(),
            RequestKeys::Request(k) => k.block_size(),
        }
    }

    pub fn keys(&self, tokens: &[u32], lora_name: Option<&str>, cache_salt: Option<&str>, out: &mut Vec<u64>) {
        let extras = RequestExtras {
            lora: lora_name.map(|n| LoraRef { name: n.to_string(), ..Default::default() }),
            cache_salt: cache_salt.map(str::to_string),
            mm: Vec::new(),
        };
        match self {
            RequestKeys::Vllm(h) => h.event_keys(tokens, &extras, out),
            RequestKeys::Request(k) => k.keys("", tokens, &extras, out),
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub applier: Arc<EventApplier<SharedIndex>>,
    pub pods: Arc<Pods>,
    pub keys: Arc<RequestKeys>,
    pub scorer: LongestPrefixScorer,
    pub ingestor: Option<Ingestor>,
    pub registry: Registry,
    lookup_seconds: Histogram,
    index_blocks: IntGauge,
    index_entries: IntGauge,
    index_capacity: IntGauge,
    index_evicted: IntGauge,
}

impl AppState {
    pub fn new(
        applier: Arc<EventApplier<SharedIndex>>,
        pods: Arc<Pods>,
        keys: Arc<RequestKeys>,
        ingestor: Option<Ingestor>,
        registry: Registry,
    ) -> Result<Self, prometheus::Error> {
        let lookup_seconds = Histogram::with_opts(
            HistogramOpts::new("kvroute_kv_lookup_seconds", "Time to key and score one request against the index")
                .buckets(vec![1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 1e-1]),
        )?;
        registry.register(Box::new(lookup_seconds.clone()))?;
        let gauge = |n: &str, h: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(n, h)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            index_blocks: gauge("kvroute_index_blocks", "Distinct block keys in the index")?,
            index_entries: gauge("kvroute_index_entries", "(block, pod, tier) entries in the index")?,
            index_capacity: gauge("kvroute_index_capacity_entries", "Entries kept before LRU eviction")?,
            index_evicted: gauge("kvroute_index_evicted_blocks", "Blocks evicted by the index's LRU so far")?,
            applier,
            pods,
            keys,
            scorer: LongestPrefixScorer::default(),
            ingestor,
            registry,
            lookup_seconds,
        })
    }
}

/// The HTTP routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/kv/score", post(score))
        .route("/v1/kv/pods", get(pods))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(32 << 20))
        .with_state(state)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreRequest {
    model: Option<String>,
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pods: Option<Vec<String>>,
    #[serde(default)]
    lora_name: Option<String>,
    #[serde(default)]
    cache_salt: Option<String>,
}

#[derive(Serialize)]
struct PodScoreOut {
    pod: String,
    matched_blocks: usize,
    score: f64,
}

#[derive(Serialize)]
struct ScoreResponse {
    block_size: usize,
    blocks: usize,
    scores: Vec<PodScoreOut>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

async fn score(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let req: ScoreRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")),
    };
    if req.model.as_deref().is_none_or(str::is_empty) {
        return error(StatusCode::BAD_REQUEST, "missing `model`");
    }
    let Some(tokens) = req.token_ids else {
        return error(StatusCode::BAD_REQUEST, "missing `token_ids` (an array of token ids)");
    };
    let t0 = Instant::now();
    let mut keys = Vec::new();
    st.keys.keys(&tokens, req.lora_name.as_deref(), req.cache_salt.as_deref(), &mut keys);
    let candidates: Option<Vec<PodId>> =
        req.pods.as_ref().map(|names| names.iter().filter_map(|n| st.pods.get(n)).collect());
    let scores =
        SCRATCH.with(|s| st.scorer.score(st.applier.index(), &keys, candidates.as_deref(), &mut s.borrow_mut()));
    st.lookup_seconds.observe(t0.elapsed().as_secs_f64());
    let scores = scores
        .into_iter()
        .filter(|s| s.matched_blocks > 0)
        .filter_map(|s| {
            Some(PodScoreOut { pod: st.pods.name(s.pod)?, matched_blocks: s.matched_blocks, score: s.score })
        })
        .collect();
    Json(ScoreResponse { block_size: st.keys.block_size(), blocks: keys.len(), scores }).into_response()
}

async fn pods(State(st): State<Arc<AppState>>) -> Response {
    let index = st.applier.index();
    let blocks = |name: &str| st.pods.get(name).map_or(0, |id| index.pod_entries(id));
    let list = st.ingestor.as_ref().map(|i| i.pod_status(blocks)).unwrap_or_default();
    Json(serde_json::json!({ "pods": list })).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let s = st.applier.index().stats();
    st.index_blocks.set(s.blocks as i64);
    st.index_entries.set(s.entries as i64);
    st.index_capacity.set(s.capacity as i64);
    st.index_evicted.set(s.evicted_blocks as i64);
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&st.registry.gather(), &mut buf) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response()
}
