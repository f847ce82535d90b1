//! Scorers: one score per candidate pod in `0..=1`, higher is better.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::{PodView, RequestView, Scorer};

/// llm-d's approximate `prefix-cache-scorer`: what the router itself sent where.
pub(crate) struct ApproxPrefixScorer;
impl Scorer for ApproxPrefixScorer {
    fn name(&self) -> &str {
        "prefix-cache-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        pods.iter().map(|p| p.approx_prefix_score.clamp(0.0, 1.0)).collect()
    }
}

/// 1 for the pod the request's session (`x-session-id` / `x-session-token`) last went to.
pub(crate) struct SessionAffinityScorer;
impl Scorer for SessionAffinityScorer {
    fn name(&self) -> &str {
        "session-affinity-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        pods.iter().map(|p| if p.session_pod { 1.0 } else { 0.0 }).collect()
    }
}

pub(crate) struct PrefixScorer;
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
pub(crate) struct QueueScorer;
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
pub(crate) struct LoraAffinityScorer;
impl Scorer for LoraAffinityScorer {
    fn name(&self) -> &str {
        "lora-affinity-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        pods.iter().map(|p| if p.lora_active.unwrap_or(true) { 1.0 } else { 0.0 }).collect()
    }
}

/// Fewer in-flight requests is better: `1 − n / (max n + 1)`.
pub(crate) struct ActiveRequestScorer;
impl Scorer for ActiveRequestScorer {
    fn name(&self) -> &str {
        "active-request-scorer"
    }
    fn score(&self, _r: &RequestView, pods: &[PodView]) -> Vec<f64> {
        let max = pods.iter().map(|p| p.in_flight).max().unwrap_or(0) as f64;
        pods.iter().map(|p| 1.0 - p.in_flight as f64 / (max + 1.0)).collect()
    }
}

pub(crate) struct KvUtilScorer;
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
/// In a P/D pool (`RequestView::remote_prefill` set), lacking the prompt costs a decode pod
/// at most what computing it on the best prefill pod and transferring the missing blocks
/// costs: its cache then saves a transfer, not a prefill, and load decides more.
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
    /// Token-equivalents per request the engine reports waiting (scraped
    /// `vllm:num_requests_waiting`: not admitted for want of a sequence slot or KV blocks —
    /// a wait the prefill queue does not show), scaled by the pod's free KV share
    /// (`1 − kv_usage`, 1 when unknown): with KV to spare the request waits for a sequence
    /// slot, which elsewhere it would not; with the cache full it waits for blocks, and
    /// moving it puts another copy of its prefix into caches that are full too.
    pub waiting_tokens: f64,
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
                    + self.waiting_tokens
                        * p.waiting.unwrap_or(0.0).max(0.0)
                        * (1.0 - p.kv_usage.unwrap_or(0.0).clamp(0.0, 1.0))
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
                let uncached = r.prompt_tokens as f64 - cached;
                let local = uncached * (1.0 + self.recompute_penalty.max(0.0)) * eviction;
                // P/D: a decode pod lacking the prompt can have it computed on the best
                // prefill pod and transferred, so missing it costs at most that.
                let miss = match r.remote_prefill {
                    Some(rp) => local.min(rp.base_tokens + rp.transfer_ratio * uncached),
                    None => local,
                };
                miss + (q - qmin) * damp
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
