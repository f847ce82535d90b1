//! # kvroute-gateway — request → tokens → keys → scores → pick → proxy
//!
//! The OpenAI-compatible front door of `kvroute serve`: `POST /v1/completions` and
//! `POST /v1/chat/completions` are tokenized in-process (`kvroute-tokenize`, per model),
//! keyed like the index (`kvroute-api`'s [`RequestKeys`]), scored against the index
//! (`kvroute-score`) and the router's own load view, scheduled by a profile
//! (`kvroute-schedule`), and proxied to the chosen pod with the response streamed through
//! chunk by chunk. A pod that fails before the first byte (connection error, 429, 5xx, a
//! redirect, no first byte in time) is retried on the next best pod; two failures (requests,
//! timeouts or probes) take a pod out until a probe succeeds ([`upstream`] has the timeouts,
//! [`proxy`] the attempts, [`recovery`] what happens when a pod comes back). The chosen pod
//! gets speculative index entries for the request's blocks. `POST /v1/route/explain` shows
//! the decision without forwarding; `GET /ready` is readiness (503 when no pod is in
//! rotation, a readiness hold is outstanding or the router is draining:
//! `kvroute_api::lifecycle`). vLLM's other endpoints (`/v1/models`, `/tokenize`, `/detokenize`,
//! `/v1/embeddings`, `/version`, `/reset_prefix_cache`) are in [`passthrough`]. Errors are
//! OpenAI-style JSON (`{"error": {"message", "type", "code"}}`), `Retry-After` on 429/503.

// Handlers return `Result<_, Response>` to bail out with an HTTP error early.
#![allow(clippy::result_large_err)]

pub mod approx;
pub mod attribution;
mod errors;
pub mod passthrough;
pub mod pd;
pub mod pod_metrics;
pub mod pool;
pub mod proxy;
pub mod record;
pub mod recovery;
mod routes;
pub mod sse;
pub mod upstream;

use std::collections::HashMap;
use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_api::{RequestKeys, SharedIndex};
use kvroute_index::{BlockIndex, EventApplier, Tiers};
use kvroute_schedule::{PodView, Profile, RequestView};
use kvroute_score::{LongestPrefixScorer, Scratch};
use kvroute_tokenize::{normalize_messages, BuiltinTokenizer, Tokenizer};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use serde_json::{json, Value};

pub use axum::http::StatusCode;
use errors::{bad, error};
pub use errors::{error_type, model_not_found, parse_request, RouteError};
pub use pool::{Backend, DiscoveryStatus, Pool};
pub use routes::{pool_readiness, router};
pub use upstream::Timeouts;

/// Exact prompt → tokens entries, and their insertion order (FIFO eviction at 4,096).
type PromptCache = (HashMap<u64, Arc<Vec<u32>>>, std::collections::VecDeque<u64>);

pub struct Gateway {
    pub pool: Arc<Pool>,
    pub client: reqwest::Client,
    pub profile: Profile,
    pub applier: Arc<EventApplier<SharedIndex>>,
    pub keys: Arc<RequestKeys>,
    /// Tokenizer per served model name; others use the built-in tokenizer.
    pub tokenizers: HashMap<String, Arc<dyn Tokenizer>>,
    /// Bounded tokenization pool (blocking threads) and the deadline per prompt; past it,
    /// the request is routed on the approximate (text) prefix instead.
    tokenize_permits: Arc<tokio::sync::Semaphore>,
    pub tokenize_deadline: Duration,
    /// Exact prompt → tokens cache (repeated prompts are not re-tokenized).
    prompt_cache: parking_lot::Mutex<PromptCache>,
    /// Decisions on one prefix are taken one at a time (shard = first text chunk): a
    /// request right behind another with the same new prefix sees its pick.
    route_locks: Vec<tokio::sync::Mutex<()>>,
    /// Prompts being tokenized now (hash → the result when it comes).
    tokenizing: parking_lot::Mutex<HashMap<u64, tokio::sync::watch::Receiver<Tokens>>>,
    approx: Arc<approx::ApproxPrefix>,
    /// Upstream timeouts (set with [`Gateway::set_timeouts`], which rebuilds the client).
    pub timeouts: Timeouts,
    upstream: upstream::UpstreamMetrics,
    /// Clears a pod's index entries when it rejoins the rotation (see [`recovery`]).
    pub recovery: Arc<recovery::Recovery>,
    tokenize_fallbacks: prometheus::IntCounter,
    /// Session → the pod it last went to (bounded: cleared when it reaches 100 k).
    sessions: parking_lot::Mutex<HashMap<String, String>>,
    /// Time to first byte through the gateway, by whether the pick had the prefix cached.
    ttft: prometheus::HistogramVec,
    /// Time each scorer plugin takes per decision.
    plugin_seconds: prometheus::HistogramVec,
    pub max_retries: usize,
    pub scrape_max_age: Duration,
    pub saturation: Saturation,
    /// InferenceObjective priorities by name (discovery fills it; empty = header rules only).
    pub objectives: Arc<parking_lot::RwLock<HashMap<String, i64>>>,
    shed: prometheus::IntCounter,
    scorer: LongestPrefixScorer,
    decisions: IntCounterVec,
    decision_seconds: Histogram,
    matched_blocks: Histogram,
    panic_routes: prometheus::IntCounter,
    /// Readiness holds and the drain (`GET /ready` consults it; see [`Gateway::set_lifecycle`]).
    pub lifecycle: Arc<kvroute_api::lifecycle::Lifecycle>,
    /// P/D: who runs the prefill → decode flow ([`pd`]), and its metrics.
    pub pd_mode: pd::Mode,
    pd: pd::PdMetrics,
    /// Predicted vs engine-reported cached tokens ([`attribution`]); its `sink` records traffic.
    pub attribution: Arc<attribution::Attribution>,
}

/// What routing decided for one request.
pub struct Routed {
    /// Backends in the order to try them (the pick first).
    pub order: Vec<Arc<Backend>>,
    pub keys: Arc<[u64]>,
    pub text_keys: Vec<u64>,
    /// The decision, as `/v1/route/explain` shows it.
    pub explain: Value,
    /// The pick had some of the prefix cached.
    pub hit: bool,
    /// Estimated uncached prompt tokens on each backend of `order`.
    pub uncached: Vec<u64>,
    /// P/D: the prefill pick and its estimated uncached prompt tokens.
    pub prefill: Option<(Arc<Backend>, u64)>,
    /// Prompt tokens (estimated when not tokenized) and the block size.
    pub prompt_tokens: u64,
    pub block_size: u64,
    /// The longest prefix (tokens) any candidate had, and a pod that had it.
    pub best: (u64, Option<String>),
    /// Why the pick, in a phrase (the decision's log line, `/v1/route/recent`).
    pub reason: String,
}

impl Routed {
    /// Prefix tokens the router predicted cached on `order[i]`.
    pub fn predicted(&self, i: usize) -> u64 {
        self.uncached.get(i).map_or(0, |u| self.prompt_tokens.saturating_sub(*u))
    }

    /// Prefix tokens the router predicted cached on the prefill pick (0 without one).
    pub fn prefill_predicted(&self) -> u64 {
        self.prefill.as_ref().map_or(0, |(_, u)| self.prompt_tokens.saturating_sub(*u))
    }
}

/// A request to route, from either door.
#[derive(Clone, Copy, Default)]
pub struct RouteRequest<'a> {
    /// `/v1/chat/completions` (else `/v1/completions`).
    pub chat: bool,
    pub model: &'a str,
    pub body: &'a Value,
    /// `x-session-id` / `x-session-token`.
    pub session: Option<&'a str>,
    /// May be refused (429) when every candidate is busy, not only when all are full.
    pub sheddable: bool,
    /// Only these endpoints (`ip:port` or `ip`) are candidates (Envoy's subset hint).
    pub subset: Option<&'a [String]>,
    /// Decide only (`/v1/route/explain`): leave no trace of the pick in the index.
    pub dry_run: bool,
    /// The request's id (`x-request-id`), for the decision's log line.
    pub request_id: Option<&'a str>,
}

/// When a pod counts as saturated (llm-d's saturation detector, plus the router's own
/// count of requests waiting for a first byte).
#[derive(Clone, Debug)]
pub struct Saturation {
    /// Requests without a first byte at which a pod takes no more (every request gets 429
    /// when all candidates are there).
    pub max_queued_per_pod: u32,
    /// Scraped `vllm:num_requests_waiting` at which a pod is busy (sheddable requests get
    /// 429 when all candidates are busy).
    pub queue_depth: f64,
    /// Scraped `vllm:kv_cache_usage_perc` at which a pod is busy.
    pub kv_cache_utilization: f64,
}

impl Saturation {
    /// Whether a pod counts as saturated (busy): its router queue full, or the scraped
    /// engine queue or KV-cache usage at their thresholds. Shedding (`Gateway::route`) and
    /// `kvroute_pod_saturated` both use it.
    pub fn busy(&self, queued: u32, waiting: Option<f64>, kv_usage: Option<f64>) -> bool {
        queued >= self.max_queued_per_pod
            || waiting.is_some_and(|w| w >= self.queue_depth)
            || kv_usage.is_some_and(|k| k >= self.kv_cache_utilization)
    }
}

impl Default for Saturation {
    fn default() -> Self {
        Self { max_queued_per_pod: 512, queue_depth: 5.0, kv_cache_utilization: 0.8 }
    }
}

/// llm-d's sheddable requests: `x-gateway-inference-objective: sheddable` or a negative
/// `x-gateway-inference-priority`.
pub fn is_sheddable<'a>(header: impl Fn(&str) -> Option<&'a str>) -> bool {
    header("x-gateway-inference-objective").is_some_and(|v| v.eq_ignore_ascii_case("sheddable"))
        || header("x-gateway-inference-priority").and_then(|v| v.trim().parse::<i64>().ok()).is_some_and(|p| p < 0)
}

impl Gateway {
    /// Whether a request may be shed: `x-gateway-inference-objective: <name>` of a known
    /// InferenceObjective with a negative priority (llm-d's rule); for unknown names, the
    /// header rules of [`is_sheddable`].
    pub fn sheddable<'a>(&self, header: impl Fn(&str) -> Option<&'a str>) -> bool {
        if let Some(name) = header("x-gateway-inference-objective") {
            if let Some(&p) = self.objectives.read().get(name.trim()) {
                return p < 0;
            }
        }
        is_sheddable(header)
    }

    pub fn new(
        pool: Arc<Pool>,
        profile: Profile,
        applier: Arc<EventApplier<SharedIndex>>,
        keys: Arc<RequestKeys>,
        tokenizers: HashMap<String, Box<dyn Tokenizer>>,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let tokenize_fallbacks = prometheus::IntCounter::new(
            "kvroute_router_tokenize_fallbacks_total",
            "Requests routed on the approximate prefix because tokenization missed its deadline or the pool was full",
        )?;
        registry.register(Box::new(tokenize_fallbacks.clone()))?;
        let ttft = prometheus::HistogramVec::new(
            HistogramOpts::new("kvroute_router_ttft_seconds", "Time to the first response byte through the gateway")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["cache"],
        )?;
        registry.register(Box::new(ttft.clone()))?;
        let plugin_seconds = prometheus::HistogramVec::new(
            HistogramOpts::new("kvroute_router_plugin_seconds", "Time one scorer plugin takes per decision")
                .buckets(vec![1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]),
            &["plugin"],
        )?;
        registry.register(Box::new(plugin_seconds.clone()))?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "kvroute_router_decisions_total",
                "Routing decisions by chosen pod (P/D: the prefill pick counts for its pod too)",
            ),
            &["pod"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        let decision_seconds = Histogram::with_opts(
            HistogramOpts::new("kvroute_router_decision_seconds", "Tokenize + keys + score + pick, per request")
                .buckets(vec![5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2]),
        )?;
        registry.register(Box::new(decision_seconds.clone()))?;
        let panic_routes = prometheus::IntCounter::new(
            "kvroute_router_panic_routes_total",
            "Requests routed over every pod of the model because none was in rotation",
        )?;
        registry.register(Box::new(panic_routes.clone()))?;
        let matched_blocks = Histogram::with_opts(
            HistogramOpts::new("kvroute_router_matched_blocks", "Prefix blocks the chosen pod had cached")
                .buckets(vec![0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]),
        )?;
        registry.register(Box::new(matched_blocks.clone()))?;
        let shed = prometheus::IntCounter::new(
            "kvroute_router_saturated_rejections_total",
            "Requests refused with 429 because every candidate pod was saturated",
        )?;
        registry.register(Box::new(shed.clone()))?;
        let approx = Arc::new(approx::ApproxPrefix::default());
        let recovery = Arc::new(recovery::Recovery::new(applier.clone(), approx.clone(), registry)?);
        pool.set_hook(recovery.clone());
        let timeouts = Timeouts::default();
        Ok(Self {
            pool,
            client: upstream::client(&timeouts),
            timeouts,
            upstream: upstream::UpstreamMetrics::new(registry)?,
            pd_mode: pd::Mode::default(),
            pd: pd::PdMetrics::new(registry)?,
            attribution: Arc::new(attribution::Attribution::new(registry, 256)?),
            recovery,
            profile,
            applier,
            keys,
            tokenizers: tokenizers.into_iter().map(|(k, v)| (k, Arc::from(v))).collect(),
            tokenize_permits: Arc::new(tokio::sync::Semaphore::new(2)),
            tokenize_deadline: Duration::from_millis(50),
            prompt_cache: parking_lot::Mutex::new((HashMap::new(), std::collections::VecDeque::new())),
            route_locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            tokenizing: parking_lot::Mutex::new(HashMap::new()),
            approx,
            tokenize_fallbacks,
            sessions: parking_lot::Mutex::new(HashMap::new()),
            ttft,
            plugin_seconds,
            max_retries: 2,
            scrape_max_age: Duration::from_secs(10),
            saturation: Saturation::default(),
            objectives: Default::default(),
            shed,
            scorer: LongestPrefixScorer::default(),
            decisions,
            decision_seconds,
            matched_blocks,
            panic_routes,
            lifecycle: kvroute_api::lifecycle::Lifecycle::new(),
        })
    }

    /// Forgets what the router recorded for a pod that left the fleet (its approximate
    /// prefixes; its index entries go with its KV-event streams).
    pub fn forget_pod(&self, pod: kvroute_index::PodId) {
        self.approx.forget_pod(pod);
    }

    /// Sets the upstream timeouts (and rebuilds the client for the connect timeout).
    pub fn set_timeouts(&mut self, t: Timeouts) {
        self.timeouts = t;
        self.client = upstream::client(&t);
    }

    fn tokenizer(&self, model: &str) -> Arc<dyn Tokenizer> {
        self.tokenizers.get(model).cloned().unwrap_or_else(|| Arc::new(BuiltinTokenizer))
    }

    /// The prompt as text (rendered with the chat template for chats) and, when the body
    /// gives token ids, those ids.
    fn prompt(&self, chat: bool, model: &str, v: &Value) -> Result<(String, Option<Vec<u32>>), RouteError> {
        if chat {
            let m = v.get("messages").filter(|m| m.is_array()).ok_or_else(|| bad("`messages` must be an array"))?;
            let text = self
                .tokenizer(model)
                .render_chat(&normalize_messages(m), v.get("tools").filter(|x| !x.is_null()), true)
                .map_err(|e| bad(&e.to_string()))?;
            return Ok((text, None));
        }
        // A batch (several prompts, strings or token-id arrays) is routed by its first
        // prompt: one pod serves the whole batch, as vLLM serves it in one request.
        let prompt = match v.get("prompt") {
            Some(Value::Array(a)) if a.first().is_some_and(|p| p.is_string() || p.is_array()) => {
                if !a.iter().all(|p| p.is_string() || p.is_array()) {
                    return Err(bad("`prompt` must be a string, an array of strings, an array of token ids or an array of token-id arrays"));
                }
                a.first()
            }
            Some(Value::Array(a)) if a.is_empty() => return Err(bad("`prompt` must not be empty")),
            p => p,
        };
        match prompt {
            Some(Value::String(s)) => Ok((s.clone(), None)),
            Some(Value::Array(a)) => {
                let ids = a
                    .iter()
                    .map(|x| {
                        x.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| bad("`prompt` token ids must be non-negative integers"))
                    })
                    .collect::<Result<Vec<u32>, RouteError>>()?;
                let text = ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
                Ok((text, Some(ids)))
            }
            _ => Err(bad("`prompt` must be a string, an array of strings or an array of token ids")),
        }
    }

    /// Token ids of `text`: from the prompt cache, or the bounded pool within the deadline;
    /// `None` when the deadline passes or the pool is full (the caller falls back).
    async fn tokenize(&self, chat: bool, model: &str, text: &str) -> Option<Arc<Vec<u32>>> {
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(
            text.as_bytes(),
            xxhash_rust::xxh3::xxh3_64(model.as_bytes()) ^ chat as u64,
        );
        if self.tokenize_deadline.is_zero() {
            return None; // configured to route on the approximate prefix only
        }
        if let Some(t) = self.prompt_cache.lock().0.get(&h) {
            return Some(t.clone());
        }
        // One tokenization per prompt at a time: a burst of the same new prompt waits for
        // the first one's result instead of queueing for the permits or falling back.
        let lead = {
            let mut running = self.tokenizing.lock();
            match running.get(&h).cloned() {
                Some(rx) => Err(rx),
                None => {
                    let permit = self.tokenize_permits.clone().try_acquire_owned().ok()?;
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    running.insert(h, rx);
                    Ok((permit, tx, Tokenizing { running: &self.tokenizing, prompt: h }))
                }
            }
        };
        let (permit, tx, _leader) = match lead {
            Ok(l) => l,
            Err(rx) => return tokio::time::timeout(self.tokenize_deadline, first_value(rx)).await.ok().flatten(),
        };
        let (tok, text_owned) = (self.tokenizer(model), text.to_string());
        // Completion prompts get the tokenizer's special tokens (as vLLM adds them);
        // rendered chats already contain theirs.
        let job = tokio::task::spawn_blocking(move || {
            let _p = permit;
            tok.encode(&text_owned, !chat)
        });
        let tokens = Arc::new(tokio::time::timeout(self.tokenize_deadline, job).await.ok()?.ok()?);
        let mut c = self.prompt_cache.lock();
        if c.0.len() >= 4096 {
            if let Some(old) = c.1.pop_front() {
                c.0.remove(&old);
            }
        }
        c.0.insert(h, tokens.clone());
        c.1.push_back(h);
        drop(c);
        let _ = tx.send(Some(tokens.clone()));
        Some(tokens)
    }

    /// The least-loaded healthy pod the subset hint admits, for requests with nothing to
    /// route on (no body, or an API the gateway does not parse).
    pub fn any_ready(&self, subset: Option<&[String]>) -> Option<Arc<Backend>> {
        self.pool
            .backends()
            .iter()
            .filter(|b| b.is_healthy() && b.in_subset(subset))
            .min_by_key(|b| b.in_flight.load(Relaxed))
            .cloned()
    }

    /// Sends the request to `routed.order[i]`: records the pick before the pod answers
    /// (new blocks; for a fallback `i > 0` also the speculative index entries and the
    /// approximate prefix, which `route` recorded for the pick itself) and counts it in
    /// flight.
    pub fn commit(&self, routed: &Routed, i: usize) -> InFlight {
        let b = &routed.order[i];
        let uncached = routed.uncached.get(i).copied().unwrap_or(0);
        if i > 0 {
            // The pick (i = 0) was recorded while its decision held the prefix's lock.
            self.applier.index().store_speculative(b.pod, Tiers::GPU, &routed.keys);
            self.approx.record(b.pod, &routed.text_keys);
        }
        b.add_new_blocks(uncached as usize / self.keys.block_size().max(1));
        self.decisions.with_label_values(&[&b.name]).inc();
        InFlight::new(b.clone(), uncached, routed.keys.clone())
    }

    /// P/D: counts the prefill pick's request in its pod's load (in flight, pending prefill,
    /// the prompt's active blocks) until the guard sees the first byte or drops; `None`
    /// without a prefill pick.
    pub fn commit_prefill(&self, routed: &Routed) -> Option<InFlight> {
        let (b, uncached) = routed.prefill.as_ref()?;
        self.decisions.with_label_values(&[&b.name]).inc();
        b.add_new_blocks(*uncached as usize / self.keys.block_size().max(1));
        Some(InFlight::new(b.clone(), *uncached, routed.keys.clone()))
    }

    /// Tokenize → keys → index scores → profile → candidates in order.
    pub async fn route(&self, req: &RouteRequest<'_>) -> Result<Routed, RouteError> {
        let (chat, model, v, session) = (req.chat, req.model, req.body, req.session);
        let (dry_run, request_id) = (req.dry_run, req.request_id);
        let t0 = Instant::now();
        let (text, given) = self.prompt(chat, model, v)?;
        let tokens = match given {
            Some(ids) => Some(Arc::new(ids)),
            None => self.tokenize(chat, model, &text).await,
        };
        if tokens.is_none() {
            self.tokenize_fallbacks.inc();
        }
        let lora = self.pool.lora_names.read().contains(model).then_some(model);
        let salt = v.get("cache_salt").and_then(Value::as_str);
        let mut keys = Vec::new();
        if let Some(t) = &tokens {
            self.keys.keys(t, lora, salt, &mut keys);
        }
        let keys: Arc<[u64]> = keys.into();
        let text_keys = approx::chunk_keys(&format!("{model}\0{}", salt.unwrap_or("")), &text);
        let all = self.pool.backends();
        if !all.iter().any(|b| b.serves(model)) {
            return Err(model_not_found(model));
        }
        let in_rotation = |healthy: bool| -> Vec<Arc<Backend>> {
            all.iter()
                .filter(|b| (b.is_healthy() || !healthy) && b.serves(model) && b.in_subset(req.subset))
                .cloned()
                .collect()
        };
        let mut backends = in_rotation(true);
        if backends.is_empty() {
            // Panic mode (Envoy's healthy-panic threshold, at zero): with no pod of the model
            // in rotation, try them all rather than refuse everything — a saturated fleet
            // fails its 1 s health probes while still serving, and refusing every request
            // would turn slowness into an outage. Dead pods still fail fast (connect errors,
            // timeouts) and the client gets 503/504 after the attempts.
            backends = in_rotation(false);
            if !backends.is_empty() && !req.dry_run {
                self.panic_routes.inc();
            }
        }
        if backends.is_empty() {
            return Err(RouteError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no ready endpoint serves model `{model}`"),
            ));
        }
        let ids: Vec<_> = backends.iter().map(|b| b.pod).collect();
        // From the lookup to the speculative record of the pick, same-prefix decisions do
        // not overlap (else concurrent cold requests of one prefix all route cold).
        let shard = text_keys.first().or(keys.first()).map_or(0, |k| (*k % self.route_locks.len() as u64) as usize);
        // (An async lock: with a shared index the lookup under it is a network round trip,
        // and same-prefix requests wait without holding a worker thread.)
        let decision = if req.dry_run { None } else { Some(self.route_locks[shard].lock().await) };
        let index = self.applier.index();
        let score = || thread_local_scratch(|s| self.scorer.score(index, &keys, Some(&ids), s));
        // A shared index answers over the network: keep that round trip off the async
        // workers' run queue (other requests' tasks move to another worker meanwhile).
        let scores = if index.blocks_on_network() { blocking(score) } else { score() };
        let approx_scores = thread_local_scratch(|s| self.approx.score(&text_keys, &ids, s));
        // Without token ids, estimate them (≈ 4 bytes a token) and the cached share from the
        // approximate index, so cost-based scorers still see a prefix.
        let est_tokens = tokens.as_ref().map_or(text.len().div_ceil(4), |t| t.len());
        let precise_known = scores.iter().any(|s| s.matched_blocks > 0);
        let bs = self.keys.block_size();
        let session_pod = session.and_then(|s| self.sessions.lock().get(s).cloned());
        let views: Vec<PodView> = backends
            .iter()
            .map(|b| {
                let s = scores.iter().find(|s| s.pod == b.pod);
                let approx = approx_scores.iter().find(|s| s.pod == b.pod).map_or(0.0, |s| s.score);
                // The router's own record of recent picks stands in where the index cannot
                // know: no block keys (tokenization was late), or a pod that publishes no
                // KV events while no pod's index entries match. A pod whose events the
                // index follows is taken at its word: the record never learns evictions,
                // so after one it would predict a prefix the pod no longer has.
                let follows_events = || self.applier.applied_seq(b.pod).is_some();
                let matched = match &tokens {
                    Some(_) if precise_known || follows_events() => s.map_or(0, |s| s.matched_blocks),
                    _ => (approx * est_tokens as f64) as usize / bs.max(1),
                };
                let (active_blocks, active_prefix_blocks) = b.active_blocks(&keys);
                PodView {
                    name: b.name.clone(),
                    in_flight: b.in_flight.load(Relaxed),
                    pending_prefill_tokens: b.pending_prefill.load(Relaxed) as f64,
                    queued: b.queued.load(Relaxed),
                    cache_turnover: b.cache_turnover(),
                    matched_blocks: matched,
                    prefix_score: s.map_or(0.0, |s| s.score),
                    approx_prefix_score: approx,
                    kv_usage: b.kv_usage(self.scrape_max_age),
                    session_pod: session_pod.as_deref() == Some(b.name.as_str()),
                    waiting: b.waiting(self.scrape_max_age),
                    lora_active: lora.map(|l| b.running_loras.read().iter().any(|x| x == l)),
                    labels: b.labels.read().clone(),
                    active_blocks,
                    active_prefix_blocks,
                }
            })
            .collect();
        let sat = &self.saturation;
        let full = |p: &PodView| p.queued >= sat.max_queued_per_pod;
        let busy = |p: &PodView| sat.busy(p.queued, p.waiting, p.kv_usage);
        if views.iter().all(full) || (req.sheddable && views.iter().all(busy)) {
            self.shed.inc();
            return Err(RouteError::new(StatusCode::TOO_MANY_REQUESTS, "every candidate pod is saturated"));
        }
        let req = RequestView {
            prompt_tokens: est_tokens,
            block_size: bs,
            total_blocks: est_tokens / bs.max(1),
            keys: keys.clone(),
            text: text.as_str().into(),
            now_s: clock_s(),
            remote_prefill: None,
        };
        // A dry run (explain, `decision` is None) leaves the pickers' and scorers' state alone.
        let d = if decision.is_none() {
            self.profile.schedule_dry(&req, &views)
        } else {
            self.profile.schedule(&req, &views)
        };
        for (name, secs) in &d.scorer_seconds {
            self.plugin_seconds.with_label_values(&[name]).observe(*secs);
        }
        let Some(pick) = d.pick else {
            return Err(RouteError::new(StatusCode::SERVICE_UNAVAILABLE, "no pod left after filtering"));
        };
        if let Some(lock) = decision {
            // Record the pick, then let the next same-prefix decision see it.
            index.store_speculative(backends[pick].pod, Tiers::GPU, &keys);
            self.approx.record(backends[pick].pod, &text_keys);
            if let Some(j) = d.prefill {
                // The prefill pod computes (and caches) the prompt too.
                index.store_speculative(backends[j].pod, Tiers::GPU, &keys);
            }
            drop(lock);
        }
        let mut rest: Vec<(usize, f64)> =
            d.candidates.iter().zip(&d.totals).filter(|(i, _)| **i != pick).map(|(i, t)| (*i, *t)).collect();
        rest.sort_by(|a, b| b.1.total_cmp(&a.1));
        let idx: Vec<usize> = std::iter::once(pick).chain(rest.into_iter().map(|x| x.0)).collect();
        let order: Vec<Arc<Backend>> = idx.iter().map(|&i| backends[i].clone()).collect();
        let uncached = idx.iter().map(|&i| est_tokens.saturating_sub(views[i].matched_blocks * bs) as u64).collect();
        self.decision_seconds.observe(t0.elapsed().as_secs_f64());
        self.matched_blocks.observe(views[pick].matched_blocks as f64);
        let explain = json!({
            "model": model,
            "prompt_tokens": est_tokens,
            "tokenized": tokens.is_some(),
            "block_size": req.block_size,
            "blocks": keys.len(),
            "pods": views.iter().enumerate().map(|(i, p)| {
                let pos = d.candidates.iter().position(|c| *c == i);
                json!({"pod": p.name, "matched_blocks": p.matched_blocks, "approx_prefix": p.approx_prefix_score, "in_flight": p.in_flight, "kv_cache_usage": p.kv_usage,
                       "candidate": pos.is_some(),
                       "scores": d.scores.iter().map(|(n, w, v)| json!({"plugin": n, "weight": w, "score": pos.map(|j| v[j])})).collect::<Vec<_>>(),
                       "total": pos.map(|j| d.totals[j])})
            }).collect::<Vec<_>>(),
            "profile": self.profile.name,
            "pick": views[pick].name,
            "prefill": d.prefill.map(|j| views[j].name.clone()),
            "pd": d.pd,
            "decision_us": t0.elapsed().as_secs_f64() * 1e6,
        });
        if let Some(s) = session {
            let mut m = self.sessions.lock();
            if m.len() >= 100_000 {
                m.clear();
            }
            m.insert(s.to_string(), views[pick].name.clone());
        }
        let hit = views[pick].matched_blocks > 0;
        let best = views.iter().max_by_key(|p| p.matched_blocks).filter(|p| p.matched_blocks > 0);
        let best = (best.map_or(0, |p| (p.matched_blocks * bs) as u64), best.map(|p| p.name.clone()));
        let predicted = views[pick].matched_blocks * bs;
        let reason = if let Some(pd) = d.pd.as_ref().filter(|_| d.prefill.is_some()) {
            format!("P/D split: {}", pd.reason)
        } else if best.0 == 0 {
            "no cached prefix anywhere".to_string()
        } else if predicted as u64 >= best.0 {
            "longest cached prefix".to_string()
        } else {
            format!("load over cache: {} tokens cached on {}", best.0, best.1.as_deref().unwrap_or("?"))
        };
        if !dry_run {
            tracing::debug!(
                request_id = request_id.unwrap_or(""), model, pick = %views[pick].name,
                prefill = d.prefill.map(|j| views[j].name.as_str()), prompt_tokens = est_tokens,
                predicted_tokens = predicted, best_tokens = best.0, reason = %reason,
                decision_us = (t0.elapsed().as_secs_f64() * 1e6) as u64, "routed"
            );
            tracing::trace!(decision = %explain, "routed (explain)");
        }
        let prefill =
            d.prefill.map(|j| (backends[j].clone(), est_tokens.saturating_sub(views[j].matched_blocks * bs) as u64));
        Ok(Routed {
            order,
            keys,
            text_keys,
            explain,
            hit,
            uncached,
            prefill,
            prompt_tokens: est_tokens as u64,
            block_size: bs as u64,
            best,
            reason,
        })
    }
}

type Tokens = Option<Arc<Vec<u32>>>;

/// Seconds since the first call (the scheduler's monotonic clock).
fn clock_s() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// The first tokenization result a waiting request sees (`None` if the leader gave up).
async fn first_value(mut rx: tokio::sync::watch::Receiver<Tokens>) -> Tokens {
    loop {
        if let Some(t) = rx.borrow_and_update().clone() {
            return Some(t);
        }
        rx.changed().await.ok()?;
    }
}

/// Marks a prompt as being tokenized until dropped (also when the request is cancelled).
struct Tokenizing<'a> {
    running: &'a parking_lot::Mutex<HashMap<u64, tokio::sync::watch::Receiver<Tokens>>>,
    prompt: u64,
}
impl Drop for Tokenizing<'_> {
    fn drop(&mut self) {
        self.running.lock().remove(&self.prompt);
    }
}

/// Runs `f`, which may block, without stalling this worker's other tasks (multi-thread
/// runtimes; elsewhere it just runs).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread) {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

fn thread_local_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    thread_local!(static S: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default()));
    S.with(|s| f(&mut s.borrow_mut()))
}

/// A request in flight to a pod: counted in `in_flight` until the response (stream) is
/// done, and its uncached prompt tokens in `pending_prefill` until the first byte.
pub struct InFlight {
    backend: Arc<Backend>,
    prefill: u64,
    answered: bool,
    /// The request's prompt blocks, active on the pod while it is in flight.
    keys: Arc<[u64]>,
}
impl InFlight {
    fn new(backend: Arc<Backend>, prefill: u64, keys: Arc<[u64]>) -> Self {
        backend.in_flight.fetch_add(1, AcqRel);
        backend.queued.fetch_add(1, AcqRel);
        backend.pending_prefill.fetch_add(prefill, AcqRel);
        backend.add_active(&keys);
        Self { backend, prefill, answered: false, keys }
    }
    /// The pod answered: its prefill for this request is done.
    pub fn first_byte(&mut self) {
        if !std::mem::replace(&mut self.answered, true) {
            self.backend.pending_prefill.fetch_sub(self.prefill, AcqRel);
            self.backend.queued.fetch_sub(1, AcqRel);
        }
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        self.first_byte();
        self.backend.in_flight.fetch_sub(1, AcqRel);
        self.backend.remove_active(&self.keys);
    }
}
