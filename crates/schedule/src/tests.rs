//! Unit tests of profiles and of loading llm-d configurations.

use crate::pickers::{seeded, MaxScorePicker};
use crate::*;

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
        ..Default::default()
    }
}

#[test]
fn default_profile_prefers_the_cached_pod_until_it_is_much_busier() {
    let p = SchedulerConfig::default_profile();
    let req = RequestView { prompt_tokens: 2048, block_size: 16, total_blocks: 128, ..Default::default() };
    let pods = vec![pod("a", 0, 0), pod("b", 1, 120), pod("c", 0, 0)];
    assert_eq!(p.schedule(&req, &pods).pick, Some(1), "a hit outweighs one request in flight");
    let pods = vec![pod("a", 0, 0), pod("b", 60, 120), pod("c", 0, 0)];
    let pick = p.schedule(&req, &pods).pick.unwrap();
    assert_ne!(pick, 1, "a hot prefix does not pile onto one pod");
}

#[test]
fn queued_prefill_and_cache_turnover_move_requests_off_a_cached_pod() {
    let p = SchedulerConfig::default_profile();
    let req = RequestView { prompt_tokens: 2048, block_size: 16, total_blocks: 128, ..Default::default() };
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
    let req = RequestView { prompt_tokens: 2048, block_size: 16, total_blocks: 128, ..Default::default() };
    // The cached pod owes 20 K tokens more than the others: with idle pods around,
    // a recompute there is quicker (the test above); with every pod 60 K behind, the
    // move saves a small share of a long wait and adds a recompute to a full fleet.
    let backlog = |n: &str, owed: f64, matched: usize| PodView { pending_prefill_tokens: owed, ..pod(n, 0, matched) };
    let busy = [backlog("a", 60_000.0, 0), backlog("b", 80_000.0, 120), backlog("c", 60_000.0, 0)];
    assert_eq!(p.schedule(&req, &busy).pick, Some(1));
    let idle = [backlog("a", 0.0, 0), backlog("b", 20_000.0, 120), backlog("c", 0.0, 0)];
    assert_ne!(p.schedule(&req, &idle).pick, Some(1));
    // Off, the same difference moves the request however busy the fleet is.
    let off = serde_json::json!({"relativeQueue": false});
    let Ok(Plugin::Scorer(scorer)) = build_plugin("predicted-ttft-scorer", &off) else { panic!("a scorer") };
    let absolute = Profile::new("absolute", vec![], vec![(scorer, 1.0)], Box::new(MaxScorePicker { rng: seeded() }));
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
    let req = RequestView { prompt_tokens: 160, block_size: 16, total_blocks: 10, ..Default::default() };
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

// ---------------------------------------------------------------------------------
// llm-d configurations as published (fixtures in tests/fixtures/llmd)
// ---------------------------------------------------------------------------------

const ONRAMP: &str = include_str!("../../../tests/fixtures/llmd/onramp-precise.yaml");
const PRECISE_GUIDE: &str = include_str!("../../../tests/fixtures/llmd/precise-guide.yaml");
const KSERVE_DEFAULT: &str = include_str!("../../../tests/fixtures/llmd/kserve-default.yaml");
const KSERVE_PD: &str = include_str!("../../../tests/fixtures/llmd/kserve-pd.yaml");

fn role(name: &str, matched: usize, role: Option<&str>) -> PodView {
    let mut p = pod(name, 0, matched);
    if let Some(r) = role {
        p.labels.insert(ROLE.into(), r.into());
    }
    p
}

#[test]
fn guide_configs_route_on_a_fleet_without_role_labels() {
    let req = RequestView { prompt_tokens: 640, block_size: 64, total_blocks: 10, ..Default::default() };
    let fleet = [pod("a", 0, 0), pod("b", 0, 8), pod("c", 0, 0)];
    for (name, text) in [("on-ramp", ONRAMP), ("precise guide", PRECISE_GUIDE), ("kserve", KSERVE_DEFAULT)] {
        let l = SchedulerConfig::load(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let d = l.profile.schedule(&req, &fleet);
        assert_eq!(d.candidates, vec![0, 1, 2], "{name}: no pod is filtered out");
        assert_eq!(d.pick, Some(1), "{name}: the pod holding the prefix wins");
    }
    let l = SchedulerConfig::load(KSERVE_PD).unwrap();
    assert_eq!(l.profile.name, "decode", "P/D: the decode profile is primary");
    let d = l.profile.schedule(&req, &fleet);
    assert_eq!((d.pick, d.prefill), (Some(1), None), "no pod carries a prefill role: decode only");
}

#[test]
fn precise_producer_means_precise_scoring_and_maps_its_settings() {
    let l = SchedulerConfig::load(ONRAMP).unwrap();
    let names: Vec<&str> = l.profile.scorers.iter().map(|(s, _)| s.name()).collect();
    assert_eq!(names, ["precise-prefix-cache-scorer", "kv-cache-utilization-scorer", "queue-scorer"]);
    let s = &l.settings;
    assert!(s.precise);
    assert_eq!((s.block_size, s.hash_seed.as_deref()), (Some(64), Some("42")));
    assert_eq!((s.speculative_indexing, s.speculative_ttl_ms), (Some(true), Some(2000)));
    assert_eq!((s.topic_filter.as_deref(), s.zmq_endpoint.as_deref()), (Some("kv@"), Some("tcp://*:5557")));
    assert_eq!((s.concurrency, &s.discover_pods), (Some(4), &None));
    // token-producer's modelName / vllm.url do not change routing: named, not fatal.
    assert!(
        l.warnings.iter().any(|w| w.contains("token-producer") && w.contains("parameter vllm.url")),
        "{:?}",
        l.warnings
    );
    assert!(!l.warnings.iter().any(|w| w.contains("precise-prefix-cache-producer")), "{:?}", l.warnings);
    assert!(l.notes.iter().any(|n| n.contains("dataLayer")));
    // The approximate scorer stays approximate without a producer (llm-d's fallback).
    let approx = SchedulerConfig::load(KSERVE_DEFAULT).unwrap();
    assert_eq!(approx.profile.scorers[2].0.name(), "prefix-cache-scorer");
    assert!(!approx.settings.precise && approx.warnings.is_empty(), "{:?}", approx.warnings);
    // The older guide: precise-prefix-cache-scorer; the UDS tokenizer pool is named as ignored.
    let g = SchedulerConfig::load(PRECISE_GUIDE).unwrap();
    assert_eq!(g.settings.block_size, Some(64));
    assert_eq!(g.settings.speculative_indexing, Some(true));
    assert!(g.warnings.iter().any(|w| w.contains("indexerConfig.tokenizersPoolConfig.modelName")), "{:?}", g.warnings);
}

#[test]
fn pd_handler_picks_a_prefill_pod_when_roles_are_labelled() {
    let l = SchedulerConfig::load(KSERVE_PD).unwrap();
    let req = RequestView { prompt_tokens: 160, block_size: 16, total_blocks: 10, ..Default::default() };
    let pods = [role("p", 0, Some("prefill")), role("d", 0, Some("decode")), role("x", 0, Some("encode"))];
    let d = l.profile.schedule(&req, &pods);
    assert_eq!((d.pick, d.prefill), (Some(1), Some(0)));
    // prefix-based decider: disaggregate only when the decode pod lacks enough tokens.
    let yaml = KSERVE_PD
        .replace(
            "- type: always-disagg-pd-decider",
            "- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 64}",
        )
        .replace("prefill: always-disagg-pd-decider", "prefill: prefix-based-pd-decider");
    let l = SchedulerConfig::load(&yaml).unwrap();
    let warm = [role("p", 0, Some("prefill")), role("d", 9, Some("decode"))];
    assert_eq!(l.profile.schedule(&req, &warm).prefill, None, "16 uncached tokens < 64");
    let cold = [role("p", 0, Some("prefill")), role("d", 0, Some("decode"))];
    assert_eq!(l.profile.schedule(&req, &cold).prefill, Some(0));
    // llm-d v0.2's pd-profile-handler{threshold}: characters, ⌈threshold/4⌉ tokens.
    let yaml = KSERVE_PD.replace(
        "- type: disagg-profile-handler\n  parameters:\n    deciders:\n      prefill: always-disagg-pd-decider",
        "- type: pd-profile-handler\n  parameters: {threshold: 400, hashBlockSize: 5}",
    );
    let l = SchedulerConfig::load(&yaml).unwrap();
    let stage = l.profile.prefill.as_ref().expect("a prefill stage");
    assert_eq!(stage.decider, Decider::PrefixBased { non_cached_tokens: 100 });
    assert!(l.warnings.iter().any(|w| w.contains("parameter hashBlockSize is ignored")), "{:?}", l.warnings);
}

#[test]
fn what_kvroute_cannot_honour_is_named() {
    let err = |yaml: &str| SchedulerConfig::load(yaml).err().map(|e| e.to_string()).unwrap_or_default();
    let e = err("plugins: [{type: token-load-scorer}]\nschedulingProfiles: [{name: x, plugins: [{pluginRef: token-load-scorer}]}]");
    assert!(e.contains("\"token-load-scorer\" is not supported"), "{e}");
    let e = err("plugins: [{type: data-parallel-profile-handler}, {type: queue-scorer}]\nschedulingProfiles: [{name: x, plugins: [{pluginRef: queue-scorer}]}]");
    assert!(e.contains("data-parallel-profile-handler"), "{e}");
    // Two profiles under single-profile-handler (llm-d answers 429 to everything).
    let e = err("plugins: [{type: single-profile-handler}, {type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}, {name: b, plugins: [{pluginRef: queue-scorer}]}]");
    assert!(e.contains("2 profiles (a, b) but single-profile-handler"), "{e}");
    let e =
        err(&KSERVE_PD
            .replace("prefill: always-disagg-pd-decider", "prefill: always-disagg-pd-decider\n      encode: x"));
    assert!(e.contains("deciders.encode"), "{e}");
    let e = err(&KSERVE_PD.replace("- name: decode", "- name: decoding"));
    assert!(e.contains("decode profile named \"decode\""), "{e}");
    let e = err(&ONRAMP
        .replace("prefixMatchInfoProducerName: precise-prefix-cache-producer", "prefixMatchInfoProducerName: nope"));
    assert!(e.contains("no plugin is named \"nope\""), "{e}");
    // Two precise plugins that disagree on the block size.
    let twice = ONRAMP.replace(
        "  - type: decode-filter\n",
        "  - type: precise-prefix-cache-scorer\n    parameters: {tokenProcessorConfig: {blockSize: 16}}\n  - type: decode-filter\n",
    );
    assert!(err(&twice).contains("contradicts"), "{}", err(&twice));
    // Unknown parameters and top-level sections: warnings naming them.
    let l = SchedulerConfig::load(
        "featureGates: [flowControl]\nplugins: [{type: queue-scorer, parameters: {depth: 3}}]\nschedulingProfiles: [{name: x, plugins: [{pluginRef: queue-scorer}]}]",
    )
    .unwrap();
    assert!(l.warnings.iter().any(|w| w.contains("\"queue-scorer\" (queue-scorer): parameter depth is ignored")));
    assert!(l.warnings.iter().any(|w| w.contains("featureGates")));
    let l = SchedulerConfig::load(&ONRAMP.replace("speculativeIndexing: true", "speculativeIndexing: false")).unwrap();
    assert!(l.warnings.iter().any(|w| w.contains("speculativeIndexing: false is not honoured")));
}

#[test]
fn dry_runs_leave_picks_unchanged() {
    let req = RequestView { prompt_tokens: 64, block_size: 16, total_blocks: 4, ..Default::default() };
    let pods = vec![pod("a", 0, 0), pod("b", 0, 0), pod("c", 0, 0)];
    for p in [SchedulerConfig::default_profile(), SchedulerConfig::round_robin()] {
        let dry: Vec<_> = (0..5).map(|_| p.schedule_dry(&req, &pods).pick).collect();
        assert!(dry.iter().all(|d| *d == dry[0]), "{}: dry runs agree: {dry:?}", p.name);
        assert_eq!(p.schedule(&req, &pods).pick, dry[0], "{}: the real pick is the one explained", p.name);
        assert_ne!(p.schedule_dry(&req, &pods).pick, dry[0], "{}: a real pick moves on", p.name);
    }
}

#[test]
fn the_default_profile_disaggregates_only_in_a_pool_with_both_roles() {
    let req = RequestView { prompt_tokens: 8192, block_size: 16, total_blocks: 512, ..Default::default() };
    let p = SchedulerConfig::default_profile();
    // No role labels: every pod decodes, nothing to decide.
    let plain = [pod("a", 0, 0), pod("b", 0, 0)];
    let d = p.schedule(&req, &plain);
    assert!(d.pick.is_some() && d.prefill.is_none() && d.pd.is_none(), "{d:?}");
    // Both roles, idle: decode picks a decode pod and keeps the prefill (TTFT is lower).
    let mut fleet = vec![role("p1", 0, Some("prefill")), role("p2", 0, Some("prefill")), role("d1", 0, Some("decode"))];
    let d = p.schedule(&req, &fleet);
    assert_eq!(d.pick, Some(2));
    let v = d.pd.clone().expect("a verdict");
    assert!(!v.split && d.prefill.is_none() && v.decider == "predicted-ttft-pd-decider", "{v:?}");
    // The decode pod owes a long prefill: the prompt goes to the idle prefill pod.
    fleet[2].pending_prefill_tokens = 16384.0;
    fleet[0].pending_prefill_tokens = 4096.0;
    let d = p.schedule(&req, &fleet);
    assert_eq!((d.pick, d.prefill), (Some(2), Some(1)), "{:?}", d.pd);
    assert!(d.pd.as_ref().is_some_and(|v| v.split && v.predicted_split_s < v.predicted_local_s));
}

#[test]
fn the_predicted_ttft_decider_loads_from_an_endpoint_picker_config() {
    let yaml = KSERVE_PD
        .replace(
            "- type: always-disagg-pd-decider",
            "- type: predicted-ttft-pd-decider\n  parameters: {transferSecondsPerToken: 0.00001, overheadSeconds: 0.02, bogus: 1}",
        )
        .replace("prefill: always-disagg-pd-decider", "prefill: predicted-ttft-pd-decider");
    let l = SchedulerConfig::load(&yaml).unwrap();
    let stage = l.profile.prefill.as_ref().expect("a prefill stage");
    let want = TtftDecider { transfer_s_per_token: 1e-5, overhead_s: 0.02, ..TtftDecider::default() };
    assert_eq!(stage.decider, Decider::PredictedTtft(want));
    assert!(l.warnings.iter().any(|w| w.contains("parameter bogus is ignored")), "{:?}", l.warnings);
}

#[test]
fn in_a_pd_pool_a_decode_pods_cache_saves_a_transfer_not_a_prefill() {
    // An 8 k-token prompt whose prefix decode pod d1 holds while it is busy with 12
    // streams; d2 is idle and cold; the prefill pod is idle and holds the prefix too.
    let req = RequestView { prompt_tokens: 8192, block_size: 16, total_blocks: 512, ..Default::default() };
    let mut fleet =
        vec![role("p", 400, Some("prefill")), role("d1", 400, Some("decode")), role("d2", 0, Some("decode"))];
    fleet[1].in_flight = 12;
    let p = SchedulerConfig::default_profile();
    let d = p.schedule(&req, &fleet);
    // Missing the prefix on d2 costs only its transfer (the prefill pod computes the rest
    // either way), so the idle decode pod takes the request, prefilled remotely.
    assert_eq!((d.pick, d.prefill), (Some(2), Some(0)), "{:?}", d.pd);
    // Without prefill pods, the same busy-but-cached pod keeps it (a full recompute on d2
    // would cost far more than 12 streams of queueing).
    let plain = [pod("d1", 12, 400), pod("d2", 0, 0)];
    assert_eq!(p.schedule(&req, &plain).pick, Some(0));
    // llm-d's deciders place decode pods as before: cache affinity decides.
    let llmd = SchedulerConfig::disaggregated("x", Decider::PrefixBased { non_cached_tokens: 16 });
    assert_eq!(llmd.schedule(&req, &fleet).pick, Some(1));
}

#[test]
fn requests_the_engine_reports_waiting_move_a_prompt_off_its_cached_pod_unless_its_kv_is_full() {
    // 2,048 tokens cached on a; b is cold: recomputing costs 2,048 × 3 token-equivalents.
    let req = RequestView { prompt_tokens: 2048, block_size: 16, total_blocks: 128, ..Default::default() };
    let p = SchedulerConfig::default_profile();
    let with_waiting = |w: f64, kv: Option<f64>| {
        let mut a = pod("a", 0, 128);
        (a.waiting, a.kv_usage) = (Some(w), kv);
        let mut b = pod("b", 0, 0);
        (b.waiting, b.kv_usage) = (Some(0.0), kv);
        p.schedule_dry(&req, &[a, b]).pick
    };
    // Each request the engine cannot admit counts 6,144 tokens × a's free KV share: with
    // KV to spare it waits for a sequence slot, which b has free.
    assert_eq!(with_waiting(2.0, None), Some(1), "2 waiting (12,288) > a recompute (6,144)");
    assert_eq!(with_waiting(2.0, Some(0.2)), Some(1), "2 × 6,144 × 0.8 > a recompute");
    // A full cache: they wait for blocks; moving adds a prefix copy to a full fleet.
    assert_eq!(with_waiting(2.0, Some(0.9)), Some(0), "2 × 6,144 × 0.1 < a recompute");
    assert_eq!(with_waiting(8.0, Some(0.95)), Some(0), "8 × 6,144 × 0.05 < a recompute");
    assert_eq!(with_waiting(0.0, Some(0.0)), Some(0), "nothing waiting: the hit decides");
}
