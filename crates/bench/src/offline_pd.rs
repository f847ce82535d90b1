//! Prefill/decode disaggregation in the offline simulation: the fleet's role labels and the
//! P/D policies (the default profile's plugins in both stages, with each decider).
//!
//! The request flow ([`crate::offline::run`]), as vLLM with the NixlConnector runs it: the
//! profile picks the decode server, then its P/D stage's decider may add a prefill pick.
//! A split request runs first as a one-token job on the prefill server (it computes and
//! caches the prompt there; that server's KV events announce the blocks); when that token
//! comes out, the decode server pulls the KV of the prompt blocks it does not hold yet
//! (`kv_transfer_per_token` × those tokens), then admits the request with its prompt KV
//! present: the blocks are allocated (so cached there, and announced by the decode
//! server), only the last prompt token is computed, and it decodes every output token.
//! TTFT is the decode server's first token − arrival. The router counts the prefill leg in
//! the prefill server's load (in flight, queued, pending prefill tokens) until its token,
//! and the request in the decode server's load from the start, with no pending prefill.

use std::collections::BTreeMap;

use kvroute_schedule::{ConfigError, Decider, Profile, SchedulerConfig, TtftDecider};
use kvroute_sim::config::Latency;

use crate::offline::FleetConfig;

/// The P/D policies `kvroute simulate` accepts (they need a fleet with prefill servers).
pub const PD_POLICIES: &str = "pd-kvroute, pd-kvroute:W, pd-always, pd-llmd:N";

/// `llm-d.ai/role` per server: prefill for the first `prefill_servers`, decode for the
/// rest; no labels on an aggregated fleet.
pub fn role_labels(cfg: &FleetConfig) -> Vec<BTreeMap<String, String>> {
    (0..cfg.servers)
        .map(|s| {
            if cfg.prefill_servers == 0 {
                return BTreeMap::new();
            }
            let role = if s < cfg.prefill_servers { "prefill" } else { "decode" };
            BTreeMap::from([("llm-d.ai/role".to_string(), role.to_string())])
        })
        .collect()
}

/// A P/D policy name (runs on the disaggregated fleet).
pub fn is_pd(name: &str) -> bool {
    name.starts_with("pd-")
}

/// kvroute's decider with the fleet's own figures: prefill GPU time per token as the
/// continuous engine spends it (`batched_prefill_per_token`), the transfer cost per token,
/// and one engine step (`inter_token`) for the extra step a split costs on the decode side.
pub fn ttft_decider(l: &Latency) -> TtftDecider {
    TtftDecider {
        prefill_s_per_token: l.batched_prefill_per_token.as_secs_f64(),
        transfer_s_per_token: l.kv_transfer_per_token.as_secs_f64(),
        overhead_s: l.inter_token.as_secs_f64(),
        ..TtftDecider::default()
    }
}

/// The profile of a P/D policy: `pd-kvroute` (kvroute's predicted-ttft decider, see
/// [`ttft_decider`]; `pd-kvroute:W` with interferenceWeight W), `pd-always` (always-disagg), `pd-llmd:N` (llm-d's prefix-based decider,
/// nonCachedTokens N). Both stages score with the default profile's plugins, so policies
/// differ only in the decider. `None`: not a P/D policy name.
pub fn policy(name: &str, l: &Latency) -> Option<Result<Profile, ConfigError>> {
    let bad = |what: &str| Some(Err(ConfigError::UnknownPlugin(format!("policy {name}: {what}"))));
    let decider = match name {
        "pd-kvroute" => Decider::PredictedTtft(ttft_decider(l)),
        "pd-always" => Decider::Always,
        _ if name.starts_with("pd-kvroute:") => match name["pd-kvroute:".len()..].parse::<f64>() {
            Ok(w) if w >= 0.0 => Decider::PredictedTtft(TtftDecider { interference_weight: w, ..ttft_decider(l) }),
            _ => return bad("pd-kvroute:W takes an interference weight ≥ 0"),
        },
        _ => match name.strip_prefix("pd-llmd:") {
            Some(n) => match n.parse() {
                Ok(non_cached_tokens) => Decider::PrefixBased { non_cached_tokens },
                Err(_) => return bad("pd-llmd:N takes a token count"),
            },
            None if is_pd(name) => {
                return Some(Err(ConfigError::UnknownPlugin(format!("policy {name} (P/D policies: {PD_POLICIES})"))))
            }
            None => return None,
        },
    };
    Some(Ok(SchedulerConfig::disaggregated(name, decider)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::offline::{run, EngineModel, PolicyResult};
    use crate::workload::{SharedPrefix, SimRequest};
    use kvroute_sim::config::Profile as LatencyProfile;

    fn fleet(prefill: usize, decode: usize) -> FleetConfig {
        FleetConfig {
            servers: prefill + decode,
            gpu_blocks: 65_536,
            block_size: 16,
            latency: LatencyProfile::B8H100.latency(),
            event_delay: Duration::from_millis(10),
            scrape_interval: Duration::from_millis(50),
            seed: 1,
            engine: EngineModel::Continuous,
            max_batched_tokens: kvroute_sim::batch::DEFAULT_MAX_BATCHED_TOKENS,
            prefill_servers: prefill,
        }
    }

    fn sim(name: &str, reqs: &[SimRequest], cfg: &FleetConfig) -> PolicyResult {
        let profile = match policy(name, &cfg.latency) {
            Some(p) => p.unwrap(),
            None => crate::policy(name).unwrap(),
        };
        run(name, &profile, reqs, cfg)
    }

    /// A prompt of `blocks` full blocks whose keys start at `from`.
    fn req(at: f64, from: u64, blocks: u64, output: usize) -> SimRequest {
        SimRequest {
            arrival_s: at,
            keys: (from..from + blocks).collect(),
            prompt_tokens: blocks as usize * 16,
            output_tokens: output,
            session: from,
        }
    }

    fn long_prompts(qps: f64) -> Vec<SimRequest> {
        SharedPrefix { groups: 4, per_group: 12, system: 6000, question: 2000, output: 50, qps, stages: vec![] }
            .generate(16, 7)
    }

    #[test]
    fn a_split_request_is_cached_on_both_servers_and_its_prefix_then_stays_on_the_decode_server() {
        let cfg = fleet(1, 1);
        // Server 0 prefills, server 1 decodes. Request 0 finds the decode server idle and
        // stays; request 1 finds it owing 8192 prefill tokens and goes through server 0;
        // request 2 (request 1's prompt + 4 blocks, later) finds those blocks on the
        // decode server, transferred there, and stays.
        let mut again = req(30.0, 1000, 512, 8);
        again.keys.extend(5000..5004);
        again.prompt_tokens += 64;
        let reqs = vec![req(0.0, 0, 512, 8), req(0.001, 1000, 512, 8), again];
        let r = sim("pd-kvroute", &reqs, &cfg);
        let o = &r.outcomes;
        assert_eq!(o.iter().map(|x| (x.server, x.prefill)).collect::<Vec<_>>(), [(1, None), (1, Some(0)), (1, None)]);
        assert_eq!(r.split_requests, 1);
        assert_eq!(r.stored_blocks[0], 512, "the prefill server cached (and announced) request 1's prompt");
        assert_eq!(
            r.stored_blocks[1],
            512 + 512 + 4,
            "the decode server: request 0's, request 1's (transferred), 4 new"
        );
        assert_eq!(o[2].uncached_at_server, 64, "the router saw the transferred blocks on the decode server");
        assert_eq!(o[2].cached_tokens, 8192, "and the decode server had them");
        assert_eq!(r.kv_transfer_tokens, 8192);
        assert!(o.iter().all(|x| x.ttft_s.is_some()));
    }

    #[test]
    fn the_router_counts_a_split_requests_prefill_on_the_prefill_server_until_its_token() {
        // kvroute's decider without the interference term, on 1 prefill + 1 decode server;
        // c = 31.25 µs, a new 8192-token prompt: 256 ms of prefill, split adds 36.6 ms.
        let cfg = fleet(1, 1);
        let reqs = [req(0.0, 0, 512, 8), req(0.001, 1000, 512, 8), req(0.002, 2000, 512, 8), req(0.28, 3000, 512, 8)];
        let r = sim("pd-kvroute:0", &reqs, &cfg);
        let routes: Vec<_> = r.outcomes.iter().map(|o| (o.server, o.prefill)).collect();
        // 0: idle decode server, local. 1: the decode server owes 8192 → split.
        // 2: both owe 8192 (request 1's prompt is the prefill server's, not the decode
        //    server's), so local: 512 ms < 512 + 36.6 ms.
        // 3: request 1's prefill answered at 269 ms; the prefill server owes nothing, the
        //    decode server still owes request 2's prompt → split.
        assert_eq!(routes, [(1, None), (1, Some(0)), (1, None), (1, Some(0))], "{:?}", r.outcomes);
    }

    #[test]
    fn a_split_requests_ttft_on_an_idle_fleet_is_prefill_then_transfer_then_one_decode_step() {
        let cfg = fleet(1, 1);
        let l = cfg.latency;
        let r = sim("pd-always", &[req(0.0, 0, 512, 200)], &cfg);
        assert_eq!(r.split_requests, 1);
        // Prefill step: 12 ms + 8192 × 31.25 µs = 268 ms; transfer: 8192 × 3 µs = 24.576 ms;
        // the decode server's step computing the last prompt token: 12 ms + 31.25 µs.
        let prefill = l.inter_token + l.batched_prefill_per_token * 8192;
        let transfer = l.kv_transfer_per_token * 8192;
        let step = l.inter_token + l.batched_prefill_per_token;
        assert_eq!(prefill + transfer + step, Duration::from_nanos(304_607_250));
        let ttft = r.outcomes[0].ttft_s.unwrap();
        assert!((ttft - 0.30460725).abs() < 1e-8, "{ttft}");
        // One request decoding alone: every gap is one 12 ms step.
        assert!((r.itl_p90_s - 0.012).abs() < 1e-9, "{}", r.itl_p90_s);
        // Aggregated, the same request on one server: one prefill step, no transfer.
        let agg = sim("default", &[req(0.0, 0, 512, 200)], &fleet(0, 1));
        assert!((agg.ttft_p50_s - prefill.as_secs_f64()).abs() < 1e-8, "{agg:?}");
        assert_eq!(agg.split_requests, 0);
    }

    #[test]
    fn always_splits_every_request_and_llmd_splits_exactly_at_its_threshold() {
        let reqs = long_prompts(4.0);
        let cfg = fleet(2, 2);
        let always = sim("pd-always", &reqs, &cfg);
        assert_eq!(always.split_requests, reqs.len());
        assert!(always.outcomes.iter().all(|o| o.prefill.is_some_and(|p| p < 2) && o.server >= 2));
        // 2000 question tokens are never cached on first sight; repeats of a prompt on the
        // same decode server are (≤ 15 tokens uncached).
        for n in [16, 1000, 4000] {
            let r = sim(&format!("pd-llmd:{n}"), &reqs, &cfg);
            for o in &r.outcomes {
                assert_eq!(o.prefill.is_some(), o.uncached_at_server >= n, "pd-llmd:{n}: {o:?}");
            }
            let splits = r.outcomes.iter().filter(|o| o.prefill.is_some()).count();
            assert!(splits > 0 && splits == r.split_requests, "pd-llmd:{n}: {splits}");
        }
        let never = sim("pd-llmd:0", &reqs, &cfg);
        assert_eq!(never.split_requests, 0);
        assert!(never.outcomes.iter().all(|o| o.server >= 2), "decode servers only");
    }

    #[test]
    fn pd_runs_are_deterministic_for_a_seed() {
        let reqs = long_prompts(6.0);
        let cfg = fleet(2, 2);
        for name in ["pd-kvroute", "pd-llmd:16"] {
            let (a, b) = (sim(name, &reqs, &cfg), sim(name, &reqs, &cfg));
            assert_eq!(a.outcomes, b.outcomes, "{name}");
            assert_eq!((a.itl_p90_s, a.output_tokens_per_s), (b.itl_p90_s, b.output_tokens_per_s), "{name}");
        }
    }

    #[test]
    fn policy_names() {
        let l = LatencyProfile::B8H100.latency();
        assert!(policy("default", &l).is_none());
        assert!(policy("pd-llmd:x", &l).is_some_and(|p| p.is_err()));
        assert!(policy("pd-nope", &l).is_some_and(|p| p.is_err()));
        assert!(policy("pd-kvroute:-1", &l).is_some_and(|p| p.is_err()));
        assert!(policy("pd-kvroute:0.05", &l).is_some_and(|p| p.is_ok()));
        let d = ttft_decider(&l);
        assert_eq!((d.prefill_s_per_token, d.transfer_s_per_token, d.overhead_s), (31.25e-6, 3e-6, 0.012));
    }
}
