//! P/D deciders: given the decode pick, whether a prefill pod computes the prompt first.
//!
//! llm-d's deciders (`always-disagg-pd-decider`, `prefix-based-pd-decider{nonCachedTokens}`,
//! llm-d-router `pkg/plugins/profile/`; ../shared/research/epp-scheduler-sim.md §2) look at
//! the decode pod alone. kvroute's `predicted-ttft-pd-decider` ([`TtftDecider`]) asks the
//! question that matters for the request: is its first token sooner if the best prefill pod
//! computes the prompt and ships the KV to the decode pod, or if the decode pod computes it
//! itself — given both pods' queued prefill work, what each already holds in cache, the
//! transfer cost and the cost of the extra hop.

use serde::Serialize;

use crate::{PodView, RequestView};

/// Whether a P/D handler also schedules a prefill pod for a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decider {
    /// `always-disagg-pd-decider`.
    Always,
    /// `prefix-based-pd-decider{nonCachedTokens}`: when the decode pod lacks at least this
    /// many of the prompt's tokens (0 = never).
    PrefixBased { non_cached_tokens: usize },
    /// kvroute's `predicted-ttft-pd-decider`.
    PredictedTtft(TtftDecider),
}

/// kvroute's decider: split when the predicted time to first token through the prefill
/// pod is lower than on the decode pod alone.
///
/// ```text
/// local = c · (pending_d + uncached_d)
/// split = c · (pending_p + uncached_p) + x · uncached_d + h
/// ```
/// `c` is the GPU's prefill time per token, `pending` the prefill work the router has
/// routed to a pod and not yet seen answered (its queue, in tokens), `uncached` the
/// prompt tokens the pod does not hold, `x` the KV transfer time per token (only the blocks
/// the decode pod lacks are pulled, as vLLM's NixlConnector does) and `h` the fixed cost of
/// the second hop (the prefill request's round trip and the decode pod's admission step).
/// On an idle fleet splitting only adds `x · uncached + h`, so nothing splits; once decode
/// pods queue prefill work, long uncached prompts move to idle prefill pods, and prompts
/// whose prefix the decode pod already holds stay local.
///
/// `interference_weight` adds what a local prefill costs the decode pod's other requests:
/// each request in flight there waits `c · uncached_d` for its next token (or its slot)
/// while the prompt is computed (a chunked prefill shares the GPU's steps). 0 judges the
/// request's own TTFT only. The default, 0.2, comes from `kvroute simulate`'s P/D ladder
/// (docs/benchmarks.md, "Prefill/decode disaggregation"): with 0, a decode pod whose slots
/// are full of split requests owes no prefill, looks idle to the rule, and computes the
/// next prompt itself — stalling every stream on the pod that is the fleet's bottleneck;
/// 0.2 cut TTFT p90 up to 2× and raised throughput under load on two workloads and two
/// fleet shapes, for ≤ 16 ms at p90 on a lightly loaded fleet (a few more splits).
#[derive(Clone, Debug, PartialEq)]
pub struct TtftDecider {
    /// `prefillSecondsPerToken`: prefill GPU time per prompt token (default 31 µs: the
    /// simulator's 8B-on-H100 profile at full batch, 32 K tokens/s).
    pub prefill_s_per_token: f64,
    /// `transferSecondsPerToken`: KV transfer time per token (default 3 µs, the same profile).
    pub transfer_s_per_token: f64,
    /// `overheadSeconds`: fixed cost of splitting (default 15 ms: one extra HTTP round trip
    /// and one engine step on the decode pod).
    pub overhead_s: f64,
    /// `interferenceWeight` (default 0.2).
    pub interference_weight: f64,
}

impl Default for TtftDecider {
    fn default() -> Self {
        Self { prefill_s_per_token: 31e-6, transfer_s_per_token: 3e-6, overhead_s: 0.015, interference_weight: 0.2 }
    }
}

/// What a decider concluded, for `/v1/route/explain` and metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    /// The decider's plugin type name.
    pub decider: &'static str,
    /// A prefill pod computes the prompt (the prefill stage found one).
    pub split: bool,
    /// Why, in words.
    pub reason: String,
    /// Prompt tokens the decode pick does not hold.
    pub uncached_tokens: usize,
    /// kvroute's decider: predicted seconds to the first token, decode pod alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_local_s: Option<f64>,
    /// kvroute's decider: predicted seconds to the first token through the prefill pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_split_s: Option<f64>,
}

/// Prompt tokens `pod` does not hold.
pub fn uncached(req: &RequestView, pod: &PodView) -> usize {
    req.prompt_tokens - (pod.matched_blocks * req.block_size).min(req.prompt_tokens)
}

impl Decider {
    /// The plugin type name.
    pub fn name(&self) -> &'static str {
        match self {
            Decider::Always => "always-disagg-pd-decider",
            Decider::PrefixBased { .. } => "prefix-based-pd-decider",
            Decider::PredictedTtft(_) => "predicted-ttft-pd-decider",
        }
    }

    /// Whether to disaggregate, given the decode pick and the prefill
    /// stage's best pod (only kvroute's decider reads it).
    pub fn decide(&self, req: &RequestView, decode: &PodView, prefill: Option<&PodView>) -> Verdict {
        let u = uncached(req, decode);
        let verdict = |split: bool, reason: String| Verdict {
            decider: self.name(),
            split,
            reason,
            uncached_tokens: u,
            predicted_local_s: None,
            predicted_split_s: None,
        };
        match self {
            Decider::Always => verdict(true, "always disaggregate".into()),
            Decider::PrefixBased { non_cached_tokens: 0 } => verdict(false, "nonCachedTokens is 0 (never)".into()),
            Decider::PrefixBased { non_cached_tokens: t } if u >= *t => {
                verdict(true, format!("{u} uncached tokens on the decode pod ≥ nonCachedTokens {t}"))
            }
            Decider::PrefixBased { non_cached_tokens: t } => {
                verdict(false, format!("{u} uncached tokens on the decode pod < nonCachedTokens {t}"))
            }
            Decider::PredictedTtft(m) => {
                let c = m.prefill_s_per_token.max(0.0);
                let local_own = c * (decode.pending_prefill_tokens.max(0.0) + u as f64);
                let local = local_own + m.interference_weight * decode.in_flight as f64 * c * u as f64;
                let Some(p) = prefill else {
                    return Verdict { predicted_local_s: Some(local_own), ..verdict(false, "no prefill pod".into()) };
                };
                if p.name == decode.name {
                    return Verdict {
                        predicted_local_s: Some(local_own),
                        ..verdict(false, "the best prefill pod is the decode pod".into())
                    };
                }
                let split = c * (p.pending_prefill_tokens.max(0.0) + uncached(req, p) as f64)
                    + m.transfer_s_per_token.max(0.0) * u as f64
                    + m.overhead_s.max(0.0);
                let yes = split < local;
                let reason = format!(
                    "predicted TTFT {:.1} ms via prefill pod {} {} {:.1} ms on the decode pod{}",
                    split * 1e3,
                    p.name,
                    if yes { "<" } else { "≥" },
                    local_own * 1e3,
                    if local > local_own {
                        format!(" (+{:.1} ms its other requests would wait)", (local - local_own) * 1e3)
                    } else {
                        String::new()
                    }
                );
                Verdict { predicted_local_s: Some(local_own), predicted_split_s: Some(split), ..verdict(yes, reason) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, matched: usize, pending: f64, in_flight: u32) -> PodView {
        PodView {
            name: name.into(),
            matched_blocks: matched,
            pending_prefill_tokens: pending,
            in_flight,
            ..Default::default()
        }
    }
    fn req() -> RequestView {
        RequestView { prompt_tokens: 8192, block_size: 16, total_blocks: 512, ..Default::default() }
    }

    /// The rule without the interference term: the request's own TTFT only.
    fn own_ttft_only() -> Decider {
        Decider::PredictedTtft(TtftDecider { interference_weight: 0.0, ..Default::default() })
    }

    #[test]
    fn an_idle_fleet_never_splits_a_long_prompt() {
        let d = Decider::PredictedTtft(TtftDecider::default());
        let v = d.decide(&req(), &pod("d", 0, 0.0, 0), Some(&pod("p", 0, 0.0, 0)));
        assert!(!v.split, "{v:?}");
        // 8192 · 31 µs = 254 ms local; split adds 8192 · 3 µs + 15 ms.
        assert!((v.predicted_local_s.unwrap() - 0.253952).abs() < 1e-9, "{v:?}");
        assert!((v.predicted_split_s.unwrap() - (0.253952 + 0.024576 + 0.015)).abs() < 1e-9, "{v:?}");
    }

    #[test]
    fn a_queued_decode_pod_sends_the_prefill_to_an_idle_prefill_pod() {
        let d = own_ttft_only();
        // The decode pod owes 8192 tokens of prefill already: split wins by 254 − 40 ms.
        let v = d.decide(&req(), &pod("d", 0, 8192.0, 1), Some(&pod("p", 0, 0.0, 0)));
        assert!(v.split, "{v:?}");
        // Unless the prefill pod is just as busy.
        let v = d.decide(&req(), &pod("d", 0, 8192.0, 1), Some(&pod("p", 0, 8192.0, 1)));
        assert!(!v.split, "{v:?}");
        // The break-even point: split when the decode pod's queue exceeds the transfer and
        // the hop, (8192 · 3 µs + 15 ms) / 31 µs ≈ 1277 tokens.
        let at = |q: f64| d.decide(&req(), &pod("d", 0, q, 1), Some(&pod("p", 0, 0.0, 0))).split;
        assert!(!at(1270.0) && at(1290.0));
        // With the default interference weight, the one request decoding there counts
        // 0.2 · 254 ms: the break-even queue drops by 0.2 · 8192 tokens to ≈ -361, so an
        // otherwise idle decode pod with one stream already splits.
        let d = Decider::PredictedTtft(TtftDecider::default());
        assert!(d.decide(&req(), &pod("d", 0, 0.0, 1), Some(&pod("p", 0, 0.0, 0))).split);
        assert!(!d.decide(&req(), &pod("d", 0, 0.0, 0), Some(&pod("p", 0, 0.0, 0))).split);
    }

    #[test]
    fn a_decode_pod_holding_the_prefix_keeps_the_request() {
        let d = Decider::PredictedTtft(TtftDecider::default());
        // 500 of 512 blocks cached on the decode pod: 192 tokens to compute locally, even
        // behind a queue of 1000 tokens and with 3 streams stalled 0.2 · 6 ms each, beats
        // a full prefill elsewhere.
        let v = d.decide(&req(), &pod("d", 500, 1000.0, 3), Some(&pod("p", 0, 0.0, 0)));
        assert!(!v.split, "{v:?}");
        assert_eq!(v.uncached_tokens, 192);
        // A prefill pod holding the prefix too, and idle: 192 tokens there + transfer + hop
        // vs 1192 locally — splitting wins.
        let v = d.decide(&req(), &pod("d", 500, 1000.0, 3), Some(&pod("p", 500, 0.0, 0)));
        assert!(v.split, "{v:?}");
    }

    #[test]
    fn interference_counts_the_decode_pods_other_requests() {
        let m = TtftDecider { interference_weight: 0.1, ..Default::default() };
        let d = Decider::PredictedTtft(m);
        // Idle prefill pod, decode pod with 20 requests decoding and nothing queued: the
        // request's own TTFT is better locally, but 20 streams would stall for 254 ms.
        let v = d.decide(&req(), &pod("d", 0, 0.0, 20), Some(&pod("p", 0, 0.0, 0)));
        assert!(v.split, "{v:?}");
        assert!(v.reason.contains("its other requests would wait"), "{}", v.reason);
        let v = own_ttft_only().decide(&req(), &pod("d", 0, 0.0, 20), Some(&pod("p", 0, 0.0, 0)));
        assert!(!v.split, "{v:?}");
    }

    #[test]
    fn no_prefill_pod_or_the_same_pod_means_local() {
        let d = Decider::PredictedTtft(TtftDecider::default());
        assert_eq!(d.decide(&req(), &pod("d", 0, 1e6, 1), None).reason, "no prefill pod");
        let v = d.decide(&req(), &pod("d", 0, 1e6, 1), Some(&pod("d", 0, 1e6, 1)));
        assert!(!v.split && v.reason.contains("is the decode pod"), "{v:?}");
    }

    #[test]
    fn llm_d_deciders_read_the_decode_pod_only() {
        let d = Decider::PrefixBased { non_cached_tokens: 16 };
        assert!(d.decide(&req(), &pod("d", 511, 0.0, 0), None).split, "16 uncached ≥ 16");
        assert!(!d.decide(&req(), &pod("d", 512, 0.0, 0), None).split);
        assert!(!Decider::PrefixBased { non_cached_tokens: 0 }.decide(&req(), &pod("d", 0, 0.0, 0), None).split);
        assert!(Decider::Always.decide(&req(), &pod("d", 512, 0.0, 0), None).split);
    }
}
