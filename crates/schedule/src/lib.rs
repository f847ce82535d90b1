//! # kvroute-schedule — scores → pick
//!
//! A scheduling profile is filters → weighted scorers → a picker, each a plugin behind one
//! trait ([`Filter`], [`Scorer`], [`Picker`]) and registered by name ([`build_plugin`]).
//! Scores are normalised to `0..=1` per plugin, multiplied by the plugin's weight and
//! summed. Profiles come from [`SchedulerConfig::default_profile`] or from a YAML file in
//! llm-d's `EndpointPickerConfig` format ([`SchedulerConfig::load`]), with llm-d's
//! plugin names where they mean the same thing; llm-d's data-layer, tokenizer and
//! prefix-producer plugins map onto kvroute's own settings ([`EppSettings`]), and what
//! kvroute cannot honour is either a warning naming it or an error.
//!
//! Plugins: scorers `precise-prefix-cache-scorer` (the KV-event index; also
//! `prefix-cache-scorer` fed by a `precise-prefix-cache-producer`),
//! `prefix-cache-scorer` (approximate: router-side tracking of the prompt text it routed,
//! no events needed), `active-request-scorer` (alias `load-aware-scorer`: in-flight
//! requests counted by the router itself, no scrape lag), `queue-scorer` (scraped
//! `vllm:num_requests_waiting`), `lora-affinity-scorer` (adapter already active),
//! `kv-cache-utilization-scorer` (scraped `vllm:kv_cache_usage_perc`),
//! `session-affinity-scorer` (the pod a session last went to),
//! `predicted-ttft-scorer` (ours: queueing + uncached prefill in one cost), `no-hit-lru-scorer`;
//! filters `saturation-filter`, `label-selector-filter`, `by-label`, `decode-filter`,
//! `prefill-filter` and `encode-filter` (llm-d's `llm-d.ai/role` label and role sets);
//! pickers `max-score-picker` (random tie-break), `weighted-random-picker`, `random-picker`,
//! `round-robin-picker`; profile handlers `single-profile-handler`, `disagg-profile-handler`
//! and `pd-profile-handler` with the deciders `always-disagg-pd-decider`,
//! `prefix-based-pd-decider` and kvroute's `predicted-ttft-pd-decider` ([`pd`]).
//!
//! The peers' policies ([`peers`]), reproduced from their specifications to be measured
//! against: `sglang-cache-aware-scorer`, `smg-cache-aware-scorer`,
//! `prodstack-prefix-aware-scorer`, `aibrix-prefix-cache-scorer`, `dynamo-kv-scorer`,
//! `dynamo-approx-scorer` and `llmd-approx-prefix-scorer`.
//!
//! Layout: one file per plugin family — `filters.rs`, `scorers.rs`, `pickers.rs`,
//! `pd.rs` (deciders), `peers/` (one file per peer) —, `registry.rs` (names → plugins),
//! `epp.rs` (llm-d's `EndpointPickerConfig` and kvroute's built-in profiles).

mod epp;
mod filters;
mod named;
pub mod pd;
pub mod peers;
mod pickers;
mod registry;
mod scorers;

pub use epp::{DiscoverPods, EppSettings, Loaded, SchedulerConfig};
pub use filters::{DECODE_ROLES, ENCODE_ROLES, PREFILL_ROLES, ROLE};
pub use named::{named_profile, NAMED};
pub use pd::{Decider, TtftDecider, Verdict};
pub use registry::{build_plugin, known_plugin_types};
pub use scorers::{decayed, NoHitLruScorer, PredictedTtftScorer, TURNOVER_TAU_S};

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
    /// Distinct prompt blocks of the requests the router has in flight to this pod (shared
    /// prefixes counted once): Dynamo's "active blocks", the decode load it predicts.
    pub active_blocks: usize,
    /// Of this request's blocks, how many from block 0 are among those active blocks.
    pub active_prefix_blocks: usize,
}

/// The request being scheduled.
#[derive(Clone, Debug, Default)]
pub struct RequestView {
    pub prompt_tokens: usize,
    pub block_size: usize,
    pub total_blocks: usize,
    /// The prompt's full-block keys, prefix-chained (equal keys ⇔ equal prefix): for
    /// policies that keep their own record of what went where (empty when untokenized).
    pub keys: std::sync::Arc<[u64]>,
    /// The routing text (the prompt, or the chat messages' text): for the peers' text-tree
    /// policies. The offline simulation, which has no text, derives one from the keys.
    pub text: std::sync::Arc<str>,
    /// The scheduler's clock, seconds (monotonic; virtual time in the offline simulation):
    /// for policies whose records expire.
    pub now_s: f64,
    /// P/D: what computing the prompt on the best prefill pod would cost, when the profile
    /// can split it (set by [`Profile::schedule`] for the decode stage of a profile whose
    /// decider is `predicted-ttft-pd-decider`): a decode pod's cost of lacking the prompt is
    /// then at most this, not a full local prefill.
    pub remote_prefill: Option<RemotePrefill>,
}

/// The remote alternative to prefilling on a decode pod, in prefill-token equivalents.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RemotePrefill {
    /// The best prefill pod's queued prefill, the prompt tokens it lacks, and the split's
    /// fixed cost (`overheadSeconds ÷ prefillSecondsPerToken`).
    pub base_tokens: f64,
    /// `transferSecondsPerToken ÷ prefillSecondsPerToken`: what each prompt token the decode
    /// pod lacks costs when it arrives by KV transfer.
    pub transfer_ratio: f64,
}

pub trait Scorer: Send + Sync {
    fn name(&self) -> &str;
    /// One score per pod, in `0..=1` (higher is better).
    fn score(&self, req: &RequestView, pods: &[PodView]) -> Vec<f64>;
    /// Told which pod was picked (for scorers with memory).
    fn observe_pick(&self, _req: &RequestView, _pods: &[PodView], _pick: usize) {}
    /// Reads [`RequestView::text`] (harnesses without text synthesize one only then).
    fn needs_text(&self) -> bool {
        false
    }
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
    /// What [`Picker::pick`] would choose now, leaving the picker's state (rotation,
    /// random stream) as it is: dry runs (`/v1/route/explain`).
    fn peek(&self, scores: &[f64]) -> Option<usize>;
}

/// Any plugin.
pub enum Plugin {
    Scorer(Box<dyn Scorer>),
    Filter(Box<dyn Filter>),
    Picker(Box<dyn Picker>),
    /// A profile handler, P/D decider, tokenizer, prefix producer or data-layer plugin:
    /// it configures the scheduler (or kvroute) rather than taking part in a profile;
    /// [`SchedulerConfig::load`] reads its parameters.
    Config,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown plugin type {0:?} (known: {known})", known = known_plugin_types().join(", "))]
    UnknownPlugin(String),
    #[error("plugin type {plugin:?} is not supported by kvroute: {why}")]
    Unsupported { plugin: String, why: String },
    #[error("plugin {plugin:?}, parameter {param:?}: {why}")]
    Param { plugin: String, param: String, why: String },
    #[error("profile {profile:?} refers to undefined plugin {name:?}")]
    UndefinedRef { profile: String, name: String },
    #[error("invalid scheduler configuration: {0}")]
    Yaml(String),
    #[error("profile {0:?} has no picker")]
    NoPicker(String),
    #[error("scheduling profiles: {0}")]
    Profiles(String),
}

/// The prefill stage of a disaggregating profile handler: when the decider approves,
/// [`Profile::schedule`] also picks a prefill pod with this profile (over every pod).
pub struct PrefillStage {
    pub profile: Profile,
    pub decider: Decider,
}

impl PrefillStage {
    /// For kvroute's decider, the best prefill pod (a dry run of the prefill profile) and
    /// what a split through it costs, for the decode stage's scorers; llm-d's deciders read
    /// the decode pick alone, so their prefill profile runs only once they split. `None`
    /// when no pod passes the prefill filters.
    fn remote(&self, req: &RequestView, pods: &[PodView]) -> Option<(Option<Decision>, Option<RemotePrefill>)> {
        if self.profile.filtered(req, pods).is_empty() {
            return None;
        }
        let Decider::PredictedTtft(m) = &self.decider else { return Some((None, None)) };
        let dry = self.profile.run(req, pods, false);
        let remote = dry.pick.map(|j| {
            let c = m.prefill_s_per_token.max(1e-12);
            let p = &pods[j];
            RemotePrefill {
                base_tokens: p.pending_prefill_tokens.max(0.0)
                    + pd::uncached(req, p) as f64
                    + m.overhead_s.max(0.0) / c,
                transfer_ratio: m.transfer_s_per_token.max(0.0) / c,
            }
        });
        Some((Some(dry), remote))
    }

    /// Decode picked `decode`: the decider's verdict and, if it splits, the prefill pick
    /// (`dry`: the prefill profile's dry run from [`Self::remote`], if it made one).
    fn run(
        &self,
        req: &RequestView,
        pods: &[PodView],
        decode: &PodView,
        dry: Option<Decision>,
        commit: bool,
        scorer_seconds: &mut Vec<(String, f64)>,
    ) -> (Option<usize>, Option<Verdict>) {
        let best = dry.as_ref().and_then(|d| d.pick).map(|j| &pods[j]);
        let mut verdict = self.decider.decide(req, decode, best);
        if let Some(d) = &dry {
            scorer_seconds.extend(d.scorer_seconds.iter().cloned());
        }
        if !verdict.split {
            return (None, Some(verdict));
        }
        // A real run after a dry one makes the same pick (pickers peek first).
        let prefill = match dry {
            Some(d) if !commit => d.pick,
            _ => {
                let d = self.profile.run(req, pods, commit);
                scorer_seconds.extend(d.scorer_seconds);
                d.pick
            }
        };
        if prefill.is_none() {
            verdict.split = false;
            verdict.reason = format!("{}, but the prefill profile picked no pod", verdict.reason);
        }
        (prefill, Some(verdict))
    }
}

/// `pods` at `idx` (an increasing subsequence): borrowed when it is all of them.
fn subset<'a>(pods: &'a [PodView], idx: &[usize]) -> std::borrow::Cow<'a, [PodView]> {
    if idx.len() == pods.len() {
        std::borrow::Cow::Borrowed(pods)
    } else {
        std::borrow::Cow::Owned(idx.iter().map(|&i| pods[i].clone()).collect())
    }
}

/// One scheduling profile, ready to run.
pub struct Profile {
    pub name: String,
    pub filters: Vec<Box<dyn Filter>>,
    pub scorers: Vec<(Box<dyn Scorer>, f64)>,
    pub picker: Box<dyn Picker>,
    /// P/D: a prefill pod is picked after this (decode) profile's pick.
    pub prefill: Option<Box<PrefillStage>>,
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
    /// P/D: the prefill pod (index into the pods given), when a prefill stage ran and
    /// found one (llm-d's `x-prefiller-host-port`).
    pub prefill: Option<usize>,
    /// P/D: the decider's verdict, when the profile has a prefill stage and some pod
    /// passes its filters (a pool without prefill pods has nothing to decide).
    pub pd: Option<Verdict>,
}

impl Profile {
    /// A profile of these plugins, without a prefill stage.
    pub fn new(
        name: &str,
        filters: Vec<Box<dyn Filter>>,
        scorers: Vec<(Box<dyn Scorer>, f64)>,
        picker: Box<dyn Picker>,
    ) -> Self {
        Self { name: name.into(), filters, scorers, picker, prefill: None }
    }

    /// Some scorer reads the routing text.
    pub fn needs_text(&self) -> bool {
        self.scorers.iter().any(|(s, _)| s.needs_text())
            || self.prefill.as_ref().is_some_and(|p| p.profile.needs_text())
    }

    /// Makes random tie-breaks reproducible.
    pub fn reseed(&self, seed: u64) {
        self.picker.reseed(seed);
        if let Some(p) = &self.prefill {
            p.profile.reseed(seed);
        }
    }

    pub fn schedule(&self, req: &RequestView, pods: &[PodView]) -> Decision {
        self.run(req, pods, true)
    }

    /// [`Profile::schedule`] without side effects: pickers peek, scorers with memory are
    /// not told the pick (the next real decision is the same as without this call).
    pub fn schedule_dry(&self, req: &RequestView, pods: &[PodView]) -> Decision {
        self.run(req, pods, false)
    }

    /// Indices of the pods that pass the profile's filters.
    fn filtered(&self, req: &RequestView, pods: &[PodView]) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..pods.len()).collect();
        for f in &self.filters {
            let kept = f.filter(req, &subset(pods, &idx));
            idx = kept.into_iter().filter_map(|j| idx.get(j).copied()).collect();
        }
        idx
    }

    fn run(&self, req: &RequestView, pods: &[PodView], commit: bool) -> Decision {
        // P/D: the prefill stage's best pod first, so the decode stage knows what a split
        // would cost.
        let remote = self.prefill.as_ref().and_then(|stage| stage.remote(req, pods));
        let split_req;
        let decode_req = match remote.as_ref().and_then(|r| r.1) {
            Some(rp) => {
                split_req = RequestView { remote_prefill: Some(rp), ..req.clone() };
                &split_req
            }
            None => req,
        };
        let idx = self.filtered(req, pods);
        let view = subset(pods, &idx);
        let mut totals = vec![0.0; view.len()];
        let mut scores = Vec::new();
        let mut scorer_seconds = Vec::new();
        for (s, w) in &self.scorers {
            let t = std::time::Instant::now();
            let v = s.score(decode_req, &view);
            scorer_seconds.push((s.name().to_string(), t.elapsed().as_secs_f64()));
            for (t, x) in totals.iter_mut().zip(&v) {
                *t += w * x;
            }
            scores.push((s.name().to_string(), *w, v));
        }
        let pick = if commit { self.picker.pick(&totals) } else { self.picker.peek(&totals) };
        if let (Some(j), true) = (pick, commit) {
            for (s, _) in &self.scorers {
                s.observe_pick(decode_req, &view, j);
            }
        }
        let pick = pick.map(|j| idx[j]);
        let (prefill, pd) = match (&self.prefill, remote, pick) {
            (Some(stage), Some((dry, _)), Some(p)) => stage.run(req, pods, &pods[p], dry, commit, &mut scorer_seconds),
            _ => (None, None),
        };
        Decision { pick, candidates: idx, scores, totals, scorer_seconds, prefill, pd }
    }
}

#[cfg(test)]
mod tests;
