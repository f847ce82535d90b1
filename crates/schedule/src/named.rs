//! Built-in profiles by name: kvroute's default, baselines, llm-d's guide profiles and the
//! peers' policies ([`crate::peers`]), for `kvroute simulate --policies` and
//! `kvroute serve --policy`, so a policy measured offline can be A/B-tested live.

use crate::{ConfigError, Profile, SchedulerConfig};

/// Every name [`named_profile`] knows, with what it is.
pub const NAMED: &[(&str, &str)] = &[
    ("default", "kvroute's default (predicted TTFT + in-flight + cold spreading; P/D built in)"),
    ("round-robin", "round-robin over all pods"),
    ("random", "uniform random"),
    ("llm-d", "llm-d's precise-prefix guide: precise prefix 3, kv-util 2, queue 2, no-hit-lru 2"),
    ("llm-d-approx", "llm-d's scheduling guide on its current approximate producer: prefix 3, kv-util 2, queue 2"),
    ("approximate", "llm-d's scheduling guide weights on kvroute's text-chunk record (no events)"),
    ("load-only", "queue 1 + kv-util 1"),
    ("session-affinity", "session affinity 3 + queue 1"),
    ("dynamo", "Dynamo's KV router (v1.1 cost, temperature 0, KV events)"),
    ("dynamo-approx", "Dynamo's KV router without KV events (own record, 120 s TTL)"),
    ("sglang", "SGLang's classic cache_aware (char tree, 0.3 / 64 / 1.5)"),
    ("smg", "SMG 2026 cache_aware (least-loaded holder, per-request gate)"),
    ("aibrix", "AIBrix prefix-cache (manifest values: 128-byte blocks, 16, 2σ)"),
    ("prodstack", "vLLM production-stack prefixaware (128-char trie, random among the longest)"),
];

/// The profile of a named policy (see [`NAMED`]).
pub fn named_profile(name: &str) -> Result<Profile, ConfigError> {
    let yaml = |plugins: &[(&str, f64)], picker: &str| {
        let mut s = String::from("plugins:\n");
        for (p, _) in plugins {
            s += &format!("- type: {p}\n");
        }
        s += &format!("- type: {picker}\nschedulingProfiles:\n- name: {name}\n  plugins:\n");
        for (p, w) in plugins {
            s += &format!("  - pluginRef: {p}\n    weight: {w}\n");
        }
        s += &format!("  - pluginRef: {picker}\n");
        SchedulerConfig::from_yaml(&s)
    };
    let alone = |scorer: &str| yaml(&[(scorer, 1.0)], "max-score-picker");
    match name {
        "default" => Ok(SchedulerConfig::default_profile()),
        "round-robin" => Ok(SchedulerConfig::round_robin()),
        "random" => yaml(&[], "random-picker"),
        "llm-d" => yaml(
            &[
                ("precise-prefix-cache-scorer", 3.0),
                ("kv-cache-utilization-scorer", 2.0),
                ("queue-scorer", 2.0),
                ("no-hit-lru-scorer", 2.0),
            ],
            "max-score-picker",
        ),
        "llm-d-approx" => yaml(
            &[("llmd-approx-prefix-scorer", 3.0), ("kv-cache-utilization-scorer", 2.0), ("queue-scorer", 2.0)],
            "max-score-picker",
        ),
        "approximate" => yaml(
            &[("prefix-cache-scorer", 3.0), ("kv-cache-utilization-scorer", 2.0), ("queue-scorer", 2.0)],
            "max-score-picker",
        ),
        "load-only" => yaml(&[("queue-scorer", 1.0), ("kv-cache-utilization-scorer", 1.0)], "max-score-picker"),
        "session-affinity" => yaml(&[("session-affinity-scorer", 3.0), ("queue-scorer", 1.0)], "max-score-picker"),
        "dynamo" => alone("dynamo-kv-scorer"),
        "dynamo-approx" => alone("dynamo-approx-scorer"),
        "sglang" => alone("sglang-cache-aware-scorer"),
        "smg" => alone("smg-cache-aware-scorer"),
        "aibrix" => alone("aibrix-prefix-cache-scorer"),
        "prodstack" => alone("prodstack-prefix-aware-scorer"),
        other => Err(ConfigError::UnknownPlugin(format!(
            "policy {other} (policies: {})",
            NAMED.iter().map(|n| n.0).collect::<Vec<_>>().join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_policy_builds_and_routes() {
        let req = crate::RequestView { prompt_tokens: 64, block_size: 16, total_blocks: 4, ..Default::default() };
        let pods: Vec<crate::PodView> =
            (0..3).map(|i| crate::PodView { name: format!("p{i}"), ..Default::default() }).collect();
        for (name, _) in NAMED {
            let p = named_profile(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(p.schedule(&req, &pods).pick.is_some(), "{name}");
        }
        assert!(named_profile("nope").is_err());
    }
}
