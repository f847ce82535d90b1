//! # kvroute-schedule — scores → pick
//!
//! A scheduling profile is filters → weighted scorers → a picker, each a plugin behind one
//! trait ([`Filter`], [`Scorer`], [`Picker`]) and registered by name ([`build_plugin`]).
//! Scores are normalised to `0..=1` per plugin, multiplied by the plugin's weight and
//! summed. Profiles come from [`SchedulerConfig::default_profile`] or from a YAML file in
//! llm-d's `EndpointPickerConfig` format ([`SchedulerConfig::from_yaml`]), with llm-d's
//! plugin names where they mean the same thing.
//!
//! Plugins: scorers `precise-prefix-cache-scorer` (the KV-event index),
//! `prefix-cache-scorer` (approximate: router-side tracking of the prompt text it routed,
//! no events needed), `active-request-scorer` (alias `load-aware-scorer`: in-flight
//! requests counted by the router itself, no scrape lag), `queue-scorer` (scraped
//! `vllm:num_requests_waiting`), `lora-affinity-scorer` (adapter already active),
//! `kv-cache-utilization-scorer` (scraped `vllm:kv_cache_usage_perc`),
//! `session-affinity-scorer` (the pod a session last went to),
//! `predicted-ttft-scorer` (ours: queueing + uncached prefill in one cost), `no-hit-lru-scorer`;
//! filters `saturation-filter`, `label-selector-filter` (`matchLabels`), `decode-filter` and
//! `prefill-filter` (llm-d's `llm-d.ai/role` label); pickers `max-score-picker` (random tie-break), `weighted-random-picker`, `random-picker`,
//! `round-robin-picker`.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::Value;

/// What scorers know about a candidate pod for one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub name: String,
    /// Requests the router has in flight to this pod.
    pub in_flight: u32,
    /// Prompt tokens the router sent to this pod that the pod has not yet answered with a
    /// first token, less what the pod held in cache when each was routed: the prefill
    /// work queued ahead of a new request, known without waiting for a metrics scrape.
    pub pending_prefill_tokens: f64,
    /// Requests in flight to this pod that have no first token yet (queued or prefilling).
    pub queued: u32,
    /// How fast the router is filling this pod's cache with new blocks: uncached blocks
    /// routed here over the last ~minute (exponentially decayed) ÷ the pod's KV capacity.
    /// Near 0 the pod has room to spare; ≥ 1 its cache is rewritten within a minute, so
    /// new content there evicts blocks that are still being reused. `None`: unknown
    /// capacity.
    pub cache_turnover: Option<f64>,
    /// Consecutive prompt blocks from block 0 the pod holds (index).
    pub matched_blocks: usize,
    /// Tier-weighted match in `0..=1` (index).
    pub prefix_score: f64,
    /// Share of the prompt text the router last sent to this pod (approximate tracking).
    pub approx_prefix_score: f64,
    /// Scraped `vllm:kv_cache_usage_perc`, if known.
    pub kv_usage: Option<f64>,
    /// The request's session was last routed to this pod.
    pub session_pod: bool,
    /// Scraped `vllm:num_requests_waiting`, if fresh.
    pub waiting: Option<f64>,
    /// The request's LoRA adapter is active on the pod (`None`: not a LoRA request).
    pub lora_active: Option<bool>,
    /// The pod's labels (from the pool configuration).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The request being scheduled.
#[derive(Clone, Debug, Default)]
pub struct RequestView {
    pub prompt_tokens: usize,
    pub block_size: usize,
    pub total_blocks: usize,
}

pub trait Scorer: Send + Sync {
    fn name(&self) -> &str;
    /// One score per pod, in `0..=1` (higher is better).
    fn score(&self, req: &RequestView, pods: &[PodView]) -> Vec<f64>;
    /// Told which pod was picked (for scorers with memory).
    fn observe_pick(&self, _req: &RequestView, _pods: &[PodView], _pick: usize) {}
}

pub trait Filter: Send + Sync {
    fn name(&self) -> &str;
    /// Indices of the pods that stay candidates.
    fn filter(&self, req: &RequestView, pods: &[PodView]) -> Vec<usize>;
}

pub trait Picker: Send + Sync {
    fn name(&self) -> &str;
    /// Restarts the picker's random tie-breaking from `seed` (deterministic simulations).
    fn reseed(&self, _seed: u64) {}
    /// Index of the chosen pod (`scores` are the weighted totals).
    fn pick(&self, scores: &[f64]) -> Option<usize>;
}

/// Any plugin.
pub enum Plugin {
    Scorer(Box<dyn Scorer>),
    Filter(Box<dyn Filter>),
    Picker(Box<dyn Picker>),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown plugin type {0:?} (known: {KNOWN})")]
    UnknownPlugin(String),
    #[error("profile {profile:?} refers to undefined plugin {name:?}")]
    UndefinedRef { profile: String, name: String },
    #[error("invalid scheduler configuration: {0}")]
    Yaml(String),
    #[error("profile {0:?} has no picker")]
    NoPicker(String),
}

const KNOWN: &str = "precise-prefix-cache-scorer, prefix-cache-scorer, active-request-scorer, load-aware-scorer, \
queue-scorer, lora-affinity-scorer, kv-cache-utilization-scorer, session-affinity-scorer, predicted-ttft-scorer, no-hit-lru-scorer, saturation-filter, \
label-selector-filter, decode-filter, prefill-filter, max-score-picker, weighted-random-picker, random-picker, round-robin-picker";

// ---------------------------------------------------------------------------------
// Scorers
// ---------------------------------------------------------------------------------

/// llm-d's approximate `prefix-cache-scorer`: what the router itself sent where.
struct ApproxPrefixScorer;
impl Scorer for ApproxPrefixScorer {
    fn name(&self) -> &str {
        "prefix-cache-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        pods.iter().map(|p| p.approx_prefix_score.clamp(0.0, 1.0)).collect()
    }
}

/// 1 for the pod the request's session (`x-session-id` / `x-session-token`) last went to.
struct SessionAffinityScorer;
impl Scorer for SessionAffinityScorer {
    fn name(&self) -> &str {
        "session-affinity-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        pods.iter().map(|p| if p.session_pod { 1.0 } else { 0.0 }).collect()
    }
}

struct PrefixScorer;
impl Scorer for PrefixScorer {
    fn name(&self) -> &str {
        "precise-prefix-cache-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        pods.iter().map(|p| p.prefix_score.clamp(0.0, 1.0)).collect()
    }
}

/// llm-d's `queue-scorer`: the scraped waiting queue, min-max normalised (shortest = 1);
/// the router's in-flight counts stand in while no fresh scrape exists.
struct QueueScorer;
impl Scorer for QueueScorer {
    fn name(&self) -> &str {
        "queue-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        let q: Vec<f64> = pods.iter().map(|p| p.waiting.unwrap_or(p.in_flight as f64)).collect();
        let (lo, hi) = q.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        q.iter().map(|&x| if hi > lo { (hi - x) / (hi - lo) } else { 1.0 }).collect()
    }
}

/// For LoRA requests: 1 where the adapter is already active, 0 elsewhere (neutral for
/// base-model requests).
struct LoraAffinityScorer;
impl Scorer for LoraAffinityScorer {
    fn name(&self) -> &str {
        "lora-affinity-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        pods.iter().map(|p| if p.lora_active.unwrap_or(true) { 1.0 } else { 0.0 }).collect()
    }
}

/// Fewer in-flight requests is better: `1 − n / (max n + 1)`.
struct ActiveRequestScorer;
impl Scorer for ActiveRequestScorer {
    fn name(&self) -> &str {
        "active-request-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        let max = pods.iter().map(|p| p.in_flight).max().unwrap_or(0) as f64;
        pods.iter().map(|p| 1.0 - p.in_flight as f64 / (max + 1.0)).collect()
    }
}

struct KvUtilScorer;
impl Scorer for KvUtilScorer {
    fn name(&self) -> &str {
        "kv-cache-utilization-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        pods.iter().map(|p| 1.0 - p.kv_usage.unwrap_or(0.0).clamp(0.0, 1.0)).collect()
    }
}

/// Predicted time to first token, in prompt-token equivalents: this request's uncached
/// prompt tokens on the pod, plus the prefill the pod still owes earlier requests
/// (`pending_prefill_tokens`, which the router tracks itself), plus `queue_tokens` per
/// request in flight (each slows the pod's batched steps). Recomputing a prefix the fleet
/// already holds also costs everyone else (GPU time, and the copy evicts other cached
/// blocks), so uncached tokens count `1 + recompute_penalty` times.
///
/// New blocks also evict: on a pod whose cache already turns over fast
/// (`cache_turnover`), uncached tokens cost `1 + turnover_weight × turnover` more, so a
/// pod that holds a popular shared prefix does not draw every conversation onto itself
/// and thrash (the hot spot llm-d users report).
///
/// Scores are relative to the cheapest pod and scaled by the request's own size:
/// `P / (P + cost − min_cost)` with `P` the prompt tokens, so a pod that costs one extra
/// full prefill scores ½ however long every pod's queue is (a plain `min / cost` would
/// flatten toward 1 under load and let other scorers undo cache affinity).
pub struct PredictedTtftScorer {
    pub queue_tokens: f64,
    pub recompute_penalty: f64,
    /// Token-equivalents per request still waiting for its first token on the pod.
    pub queued_tokens: f64,
    /// Weight of the pod's cache turnover on the cost of its uncached tokens.
    pub turnover_weight: f64,
    /// Weight of the prefill the pod still owes earlier requests.
    pub pending_weight: f64,
    /// Weigh the pods' queue differences by how idle the least busy pod is,
    /// `P / (P + q_min)` (`P` the prompt tokens, `q_min` the shortest queue in
    /// token-equivalents): when every pod is backed up, moving a request off its cached
    /// pod saves little wait and its recompute costs the saturated fleet; when some pod is
    /// idle, queue differences count in full.
    pub relative_queue: bool,
}
impl Scorer for PredictedTtftScorer {
    fn name(&self) -> &str {
        "predicted-ttft-scorer"
    }
    fn score(&self, r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        let scale = r.prompt_tokens.max(1) as f64;
        let queues: Vec<f64> = pods
            .iter()
            .map(|p| {
                self.pending_weight * p.pending_prefill_tokens.max(0.0)
                    + self.queue_tokens * p.in_flight as f64
                    + self.queued_tokens * p.queued as f64
            })
            .collect();
        let qmin = queues.iter().copied().fold(f64::INFINITY, f64::min).max(0.0);
        let damp = if self.relative_queue { scale / (scale + qmin) } else { 1.0 };
        let costs: Vec<f64> = pods
            .iter()
            .zip(&queues)
            .map(|(p, q)| {
                let cached = (p.matched_blocks * r.block_size).min(r.prompt_tokens) as f64;
                let eviction = 1.0 + self.turnover_weight * p.cache_turnover.unwrap_or(0.0).max(0.0);
                (r.prompt_tokens as f64 - cached) * (1.0 + self.recompute_penalty.max(0.0)) * eviction
                    + (q - qmin) * damp
            })
            .collect();
        let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
        costs.iter().map(|c| scale / (scale + c - min)).collect()
    }
}

/// Time constant of [`PodView::cache_turnover`]'s decayed block count, seconds.
pub const TURNOVER_TAU_S: f64 = 60.0;

/// A decayed count `value` last updated `elapsed_s` ago, brought forward to now.
pub fn decayed(value: f64, elapsed_s: f64) -> f64 {
    value * (-elapsed_s.max(0.0) / TURNOVER_TAU_S).exp()
}

/// For requests no pod has cached: prefer the pod that least recently got such a request,
/// so cold prefixes spread instead of piling up. Neutral (all 1) when some pod has a hit.
#[derive(Default)]
pub struct NoHitLruScorer {
    last: Mutex<std::collections::HashMap<String, u64>>,
    tick: AtomicUsize,
}
impl Scorer for NoHitLruScorer {
    fn name(&self) -> &str {
        "no-hit-lru-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        if pods.iter().any(|p| p.matched_blocks > 0) {
            return vec![1.0; pods.len()];
        }
        let last = self.last.lock();
        let ages: Vec<u64> = pods.iter().map(|p| last.get(&p.name).copied().unwrap_or(0)).collect();
        let (lo, hi) = (ages.iter().min().copied().unwrap_or(0), ages.iter().max().copied().unwrap_or(0));
        let out = ages.iter().map(|&a| if hi == lo { 1.0 } else { 1.0 - (a - lo) as f64 / (hi - lo) as f64 }).collect();
        drop(last);
        out
    }
    fn observe_pick(&self, _req: &RequestView, pods: &[PodView], pick: usize) {
        if pods.iter().all(|p| p.matched_blocks == 0) {
            self.served(&pods[pick].name);
        }
    }
}
impl NoHitLruScorer {
    /// Records that `pod` got a request no pod had cached.
    pub fn served(&self, pod: &str) {
        let t = self.tick.fetch_add(1, Relaxed) as u64 + 1;
        self.last.lock().insert(pod.to_string(), t);
    }
}

// ---------------------------------------------------------------------------------
// Filters and pickers
// ---------------------------------------------------------------------------------

/// Drops pods whose KV cache is fuller than `threshold` (unless that drops every pod).
struct SaturationFilter {
    threshold: f64,
}
impl Filter for SaturationFilter {
    fn name(&self) -> &str {
        "saturation-filter"
    }
    fn filter(&self, _r: &RequestView, pods: &[PodView]) -> Vec<usize> {
        let keep: Vec<usize> =
            (0..pods.len()).filter(|&i| pods[i].kv_usage.is_none_or(|u| u <= self.threshold)).collect();
        if keep.is_empty() {
            (0..pods.len()).collect()
        } else {
            keep
        }
    }
}

/// Keeps pods whose labels include every `key: value` of `matchLabels`.
struct LabelSelectorFilter {
    name: &'static str,
    match_labels: Vec<(String, Vec<String>)>,
}
impl Filter for LabelSelectorFilter {
    fn name(&self) -> &str {
        self.name
    }
    fn filter(&self, _r: &RequestView, pods: &[PodView]) -> Vec<usize> {
        (0..pods.len())
            .filter(|&i| {
                self.match_labels.iter().all(|(k, allowed)| pods[i].labels.get(k).is_some_and(|v| allowed.contains(v)))
            })
            .collect()
    }
}

/// llm-d's role label.
const ROLE: &str = "llm-d.ai/role";

struct MaxScorePicker {
    rng: Mutex<rand::rngs::StdRng>,
}
impl Picker for MaxScorePicker {
    fn name(&self) -> &str {
        "max-score-picker"
    }
    fn reseed(&self, seed: u64) {
        *self.rng.lock() = rand::rngs::StdRng::seed_from_u64(seed);
    }
    fn pick(&self, scores: &[f64]) -> Option<usize> {
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let best: Vec<usize> = (0..scores.len()).filter(|&i| scores[i] >= max - 1e-9).collect();
        (!best.is_empty()).then(|| best[self.rng.lock().random_range(0..best.len())])
    }
}

struct RandomPicker {
    rng: Mutex<rand::rngs::StdRng>,
    weighted: bool,
}
impl Picker for RandomPicker {
    fn name(&self) -> &str {
        if self.weighted {
            "weighted-random-picker"
        } else {
            "random-picker"
        }
    }
    fn reseed(&self, seed: u64) {
        *self.rng.lock() = rand::rngs::StdRng::seed_from_u64(seed);
    }
    fn pick(&self, scores: &[f64]) -> Option<usize> {
        if scores.is_empty() {
            return None;
        }
        let mut rng = self.rng.lock();
        let total: f64 = scores.iter().map(|s| s.max(0.0)).sum();
        if !self.weighted || total <= 0.0 {
            return Some(rng.random_range(0..scores.len()));
        }
        let mut x = rng.random_range(0.0..total);
        for (i, s) in scores.iter().enumerate() {
            x -= s.max(0.0);
            if x <= 0.0 {
                return Some(i);
            }
        }
        Some(scores.len() - 1)
    }
}

#[derive(Default)]
struct RoundRobinPicker {
    next: AtomicUsize,
}
impl Picker for RoundRobinPicker {
    fn name(&self) -> &str {
        "round-robin-picker"
    }
    fn pick(&self, scores: &[f64]) -> Option<usize> {
        (!scores.is_empty()).then(|| self.next.fetch_add(1, Relaxed) % scores.len())
    }
}

fn seeded() -> Mutex<rand::rngs::StdRng> {
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7);
    Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))
}

/// Builds a plugin from its llm-d type name and parameters.
pub fn build_plugin(kind: &str, params: &Value) -> Result<Plugin, ConfigError> {
    let f = |k: &str, d: f64| params.get(k).and_then(Value::as_f64).unwrap_or(d);
    Ok(match kind {
        "precise-prefix-cache-scorer" => Plugin::Scorer(Box::new(PrefixScorer)),
        "prefix-cache-scorer" => Plugin::Scorer(Box::new(ApproxPrefixScorer)),
        "active-request-scorer" | "load-aware-scorer" => Plugin::Scorer(Box::new(ActiveRequestScorer)),
        "queue-scorer" => Plugin::Scorer(Box::new(QueueScorer)),
        "lora-affinity-scorer" => Plugin::Scorer(Box::new(LoraAffinityScorer)),
        "kv-cache-utilization-scorer" => Plugin::Scorer(Box::new(KvUtilScorer)),
        "session-affinity-scorer" => Plugin::Scorer(Box::new(SessionAffinityScorer)),
        "predicted-ttft-scorer" => Plugin::Scorer(Box::new(PredictedTtftScorer {
            queue_tokens: f("queueTokens", 128.0),
            recompute_penalty: f("recomputePenalty", 2.0),
            queued_tokens: f("queuedTokens", 0.0),
            turnover_weight: f("turnoverWeight", 4.0),
            pending_weight: f("pendingWeight", 1.0),
            relative_queue: params.get("relativeQueue").and_then(Value::as_bool).unwrap_or(true),
        })),
        "no-hit-lru-scorer" => Plugin::Scorer(Box::new(NoHitLruScorer::default())),
        "saturation-filter" => Plugin::Filter(Box::new(SaturationFilter { threshold: f("kvCacheThreshold", 0.95) })),
        "label-selector-filter" => {
            let m = params.get("matchLabels").and_then(Value::as_object).cloned().unwrap_or_default();
            let match_labels =
                m.into_iter().map(|(k, v)| (k, vec![v.as_str().unwrap_or_default().to_string()])).collect();
            Plugin::Filter(Box::new(LabelSelectorFilter { name: "label-selector-filter", match_labels }))
        }
        "decode-filter" => Plugin::Filter(Box::new(LabelSelectorFilter {
            name: "decode-filter",
            match_labels: vec![(ROLE.into(), vec!["decode".into(), "both".into()])],
        })),
        "prefill-filter" => Plugin::Filter(Box::new(LabelSelectorFilter {
            name: "prefill-filter",
            match_labels: vec![(ROLE.into(), vec!["prefill".into(), "both".into()])],
        })),
        "max-score-picker" => Plugin::Picker(Box::new(MaxScorePicker { rng: seeded() })),
        "random-picker" => Plugin::Picker(Box::new(RandomPicker { rng: seeded(), weighted: false })),
        "weighted-random-picker" => Plugin::Picker(Box::new(RandomPicker { rng: seeded(), weighted: true })),
        "round-robin-picker" => Plugin::Picker(Box::new(RoundRobinPicker::default())),
        other => return Err(ConfigError::UnknownPlugin(other.to_string())),
    })
}

/// One scheduling profile, ready to run.
pub struct Profile {
    pub name: String,
    pub filters: Vec<Box<dyn Filter>>,
    pub scorers: Vec<(Box<dyn Scorer>, f64)>,
    pub picker: Box<dyn Picker>,
}

/// Per-plugin scores and the pick, for `/v1/route/explain`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Decision {
    /// Index into the pods given, `None` when no pod is left.
    pub pick: Option<usize>,
    /// Candidate indices after the filters.
    pub candidates: Vec<usize>,
    /// (plugin, weight, score per candidate).
    pub scores: Vec<(String, f64, Vec<f64>)>,
    pub totals: Vec<f64>,
    /// Time each scorer took, seconds.
    pub scorer_seconds: Vec<(String, f64)>,
}

impl Profile {
    /// Makes random tie-breaks reproducible.
    pub fn reseed(&self, seed: u64) {
        self.picker.reseed(seed);
    }

    pub fn schedule(&self, req: &RequestView, pods: &[PodView]) -> Decision {
        let mut idx: Vec<usize> = (0..pods.len()).collect();
        for f in &self.filters {
            let view: Vec<PodView> = idx.iter().map(|&i| pods[i].clone()).collect();
            idx = f.filter(req, &view).into_iter().map(|j| idx[j]).collect();
        }
        let view: Vec<PodView> = idx.iter().map(|&i| pods[i].clone()).collect();
        let mut totals = vec![0.0; view.len()];
        let mut scores = Vec::new();
        let mut scorer_seconds = Vec::new();
        for (s, w) in &self.scorers {
            let t = std::time::Instant::now();
            let v = s.score(req, &view);
            scorer_seconds.push((s.name().to_string(), t.elapsed().as_secs_f64()));
            for (t, x) in totals.iter_mut().zip(&v) {
                *t += w * x;
            }
            scores.push((s.name().to_string(), *w, v));
        }
        let pick = self.picker.pick(&totals);
        if let Some(j) = pick {
            for (s, _) in &self.scorers {
                s.observe_pick(req, &view, j);
            }
        }
        Decision { pick: pick.map(|j| idx[j]), candidates: idx, scores, totals, scorer_seconds }
    }
}

/// llm-d's `EndpointPickerConfig` (the subset that means something here).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EppConfig {
    #[serde(default)]
    plugins: Vec<PluginSpec>,
    #[serde(default)]
    scheduling_profiles: Vec<ProfileSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginSpec {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    #[serde(default)]
    parameters: Value,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileSpec {
    name: String,
    plugins: Vec<PluginRef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginRef {
    plugin_ref: String,
    weight: Option<f64>,
}

pub struct SchedulerConfig;

impl SchedulerConfig {
    /// kvroute's default: predicted TTFT (cache hits vs queueing in one cost, weight 3),
    /// plus in-flight balance (weight 1) and spreading of cold prefixes (weight 1), max-score.
    pub fn default_profile() -> Profile {
        Profile {
            name: "default".into(),
            filters: vec![],
            scorers: vec![
                (
                    Box::new(PredictedTtftScorer {
                        queue_tokens: 128.0,
                        recompute_penalty: 2.0,
                        queued_tokens: 0.0,
                        turnover_weight: 4.0,
                        pending_weight: 1.0,
                        relative_queue: true,
                    }),
                    3.0,
                ),
                (Box::new(ActiveRequestScorer), 1.0),
                (Box::new(NoHitLruScorer::default()), 1.0),
            ],
            picker: Box::new(MaxScorePicker { rng: seeded() }),
        }
    }

    /// Round-robin over all pods (a baseline).
    pub fn round_robin() -> Profile {
        Profile {
            name: "round-robin".into(),
            filters: vec![],
            scorers: vec![],
            picker: Box::new(RoundRobinPicker::default()),
        }
    }

    /// The first profile of an llm-d `EndpointPickerConfig` YAML.
    pub fn from_yaml(text: &str) -> Result<Profile, ConfigError> {
        let cfg: EppConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
        let mut defined = std::collections::HashMap::new();
        for p in &cfg.plugins {
            defined.insert(p.name.clone().unwrap_or_else(|| p.kind.clone()), p);
        }
        let spec = cfg.scheduling_profiles.first().ok_or_else(|| ConfigError::Yaml("no schedulingProfiles".into()))?;
        let mut profile = Profile {
            name: spec.name.clone(),
            filters: vec![],
            scorers: vec![],
            picker: Box::new(MaxScorePicker { rng: seeded() }),
        };
        let mut has_picker = false;
        for r in &spec.plugins {
            let p = defined
                .get(&r.plugin_ref)
                .ok_or_else(|| ConfigError::UndefinedRef { profile: spec.name.clone(), name: r.plugin_ref.clone() })?;
            match build_plugin(&p.kind, &p.parameters)? {
                Plugin::Scorer(s) => profile.scorers.push((s, r.weight.unwrap_or(1.0))),
                Plugin::Filter(f) => profile.filters.push(f),
                Plugin::Picker(k) => {
                    profile.picker = k;
                    has_picker = true;
                }
            }
        }
        // llm-d defaults to max-score when a profile names no picker.
        let _ = has_picker;
        Ok(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, in_flight: u32, matched: usize) -> PodView {
        PodView {
            name: name.into(),
            in_flight,
            pending_prefill_tokens: 0.0,
            queued: 0,
            cache_turnover: None,
            matched_blocks: matched,
            prefix_score: matched as f64 / 10.0,
            approx_prefix_score: matched as f64 / 10.0,
            kv_usage: None,
            session_pod: false,
            waiting: None,
            lora_active: None,
            labels: Default::default(),
        }
    }

    #[test]
    fn default_profile_prefers_the_cached_pod_until_it_is_much_busier() {
        let p = SchedulerConfig::default_profile();
        let req = RequestView { prompt_tokens: 2048, block_size: 16, total_blocks: 128 };
        let pods = vec![pod("a", 0, 0), pod("b", 1, 120), pod("c", 0, 0)];
        assert_eq!(p.schedule(&req, &pods).pick, Some(1), "a hit outweighs one request in flight");
        let pods = vec![pod("a", 0, 0), pod("b", 60, 120), pod("c", 0, 0)];
        let pick = p.schedule(&req, &pods).pick.unwrap();
        assert_ne!(pick, 1, "a hot prefix does not pile onto one pod");
    }

    #[test]
    fn queued_prefill_and_cache_turnover_move_requests_off_a_cached_pod() {
        let p = SchedulerConfig::default_profile();
        let req = RequestView { prompt_tokens: 2048, block_size: 16, total_blocks: 128 };
        // The cached pod owes 20 K tokens of prefill to earlier requests: a full
        // recompute elsewhere (3 × 2048 with the recompute penalty) is cheaper.
        let mut b = pod("b", 1, 120);
        b.pending_prefill_tokens = 20_000.0;
        assert_ne!(p.schedule(&req, &[pod("a", 0, 0), b.clone(), pod("c", 0, 0)]).pick, Some(1));
        b.pending_prefill_tokens = 2_000.0;
        assert_eq!(p.schedule(&req, &[pod("a", 0, 0), b, pod("c", 0, 0)]).pick, Some(1));
        // Only a shared system prompt (40 of 128 blocks) is cached on b: with b's cache
        // rewritten twice a minute already, the new 88 blocks go elsewhere.
        let idle = |n: &str| PodView { cache_turnover: Some(0.0), ..pod(n, 0, 0) };
        let mut b = PodView { cache_turnover: Some(0.0), ..pod("b", 0, 40) };
        assert_eq!(p.schedule(&req, &[idle("a"), b.clone(), idle("c")]).pick, Some(1));
        b.cache_turnover = Some(2.0);
        assert_ne!(p.schedule(&req, &[idle("a"), b, idle("c")]).pick, Some(1));
    }

    #[test]
    fn a_backed_up_fleet_keeps_requests_on_their_cached_pod() {
        let p = SchedulerConfig::default_profile();
        let req = RequestView { prompt_tokens: 2048, block_size: 16, total_blocks: 128 };
        // The cached pod owes 20 K tokens more than the others: with idle pods around,
        // a recompute there is quicker (the test above); with every pod 60 K behind, the
        // move saves a small share of a long wait and adds a recompute to a full fleet.
        let backlog =
            |n: &str, owed: f64, matched: usize| PodView { pending_prefill_tokens: owed, ..pod(n, 0, matched) };
        let busy = [backlog("a", 60_000.0, 0), backlog("b", 80_000.0, 120), backlog("c", 60_000.0, 0)];
        assert_eq!(p.schedule(&req, &busy).pick, Some(1));
        let idle = [backlog("a", 0.0, 0), backlog("b", 20_000.0, 120), backlog("c", 0.0, 0)];
        assert_ne!(p.schedule(&req, &idle).pick, Some(1));
        // Off, the same difference moves the request however busy the fleet is.
        let off = serde_json::json!({"relativeQueue": false});
        let Ok(Plugin::Scorer(scorer)) = build_plugin("predicted-ttft-scorer", &off) else { panic!("a scorer") };
        let absolute = Profile {
            name: "absolute".into(),
            filters: vec![],
            scorers: vec![(scorer, 1.0)],
            picker: Box::new(MaxScorePicker { rng: seeded() }),
        };
        assert_ne!(absolute.schedule(&req, &busy).pick, Some(1));
    }

    #[test]
    fn llm_d_endpoint_picker_config_loads() {
        let yaml = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters: {hashBlockSize: 64, maxPrefixBlocksToMatch: 256}
- type: kv-cache-utilization-scorer
- type: queue-scorer
- type: no-hit-lru-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: no-hit-lru-scorer
    weight: 2
  - pluginRef: max-score-picker
"#;
        let p = SchedulerConfig::from_yaml(yaml).unwrap();
        assert_eq!(p.scorers.iter().map(|s| s.1).collect::<Vec<_>>(), vec![3.0, 2.0, 2.0, 2.0]);
        let req = RequestView { prompt_tokens: 160, block_size: 16, total_blocks: 10 };
        let d = p.schedule(&req, &[pod("a", 0, 10), pod("b", 0, 0)]);
        assert_eq!(d.pick, Some(0));
        assert_eq!(d.scores.len(), 4);
        // no-hit-lru spreads cold requests: after a miss went to `a`, the next goes elsewhere.
        let p = SchedulerConfig::default_profile();
        let cold = [pod("a", 0, 0), pod("b", 0, 0), pod("c", 0, 0)];
        let first = p.schedule(&req, &cold).pick.unwrap();
        let second = p.schedule(&req, &cold).pick.unwrap();
        assert_ne!(first, second);
        assert!(matches!(
            SchedulerConfig::from_yaml(
                "plugins: [{type: nope}]\nschedulingProfiles: [{name: x, plugins: [{pluginRef: nope}]}]"
            ),
            Err(ConfigError::UnknownPlugin(_))
        ));
        assert!(matches!(
            SchedulerConfig::from_yaml("schedulingProfiles: [{name: x, plugins: [{pluginRef: ghost}]}]"),
            Err(ConfigError::UndefinedRef { .. })
        ));
    }
}
