//! Plugins registered by their llm-d type name.

use serde_json::Value;

use crate::filters::{self, DECODE_ROLES, ENCODE_ROLES, PREFILL_ROLES};
use crate::peers;
use crate::pickers::{seeded, MaxScorePicker, RandomPicker, RoundRobinPicker};
use crate::scorers::*;
use crate::{ConfigError, Plugin};

/// Scorers, filters and pickers kvroute runs.
const PROFILE_PLUGINS: &[&str] = &[
    "precise-prefix-cache-scorer",
    "prefix-cache-scorer",
    "active-request-scorer",
    "load-aware-scorer",
    "queue-scorer",
    "lora-affinity-scorer",
    "kv-cache-utilization-scorer",
    "session-affinity-scorer",
    "predicted-ttft-scorer",
    "no-hit-lru-scorer",
    "sglang-cache-aware-scorer",
    "smg-cache-aware-scorer",
    "prodstack-prefix-aware-scorer",
    "aibrix-prefix-cache-scorer",
    "dynamo-kv-scorer",
    "dynamo-approx-scorer",
    "llmd-approx-prefix-scorer",
    "saturation-filter",
    "label-selector-filter",
    "by-label",
    "decode-filter",
    "prefill-filter",
    "encode-filter",
    "max-score-picker",
    "weighted-random-picker",
    "random-picker",
    "round-robin-picker",
];

/// Plugins that configure the scheduler or kvroute rather than run in a profile
/// (parameters read by `SchedulerConfig::load`; what kvroute does with each is in
/// docs/configuration.md).
pub(crate) const CONFIG_PLUGINS: &[&str] = &[
    "single-profile-handler",
    "disagg-profile-handler",
    "pd-profile-handler",
    "always-disagg-pd-decider",
    "prefix-based-pd-decider",
    "predicted-ttft-pd-decider",
    "disagg-headers-handler",
    "prefill-header-handler",
    "precise-prefix-cache-producer",
    "approx-prefix-cache-producer",
    "token-producer",
    "tokenizer",
    "endpoint-notification-source",
    "k8s-notification-source",
    "metrics-data-source",
    "core-metrics-extractor",
    "model-server-protocol-metrics",
    "models-data-source",
    "models-data-extractor",
    "inflight-load-producer",
    "openai-parser",
    "utilization-detector",
    "concurrency-detector",
];

/// Every type name [`build_plugin`] accepts.
pub fn known_plugin_types() -> Vec<&'static str> {
    PROFILE_PLUGINS.iter().chain(CONFIG_PLUGINS).copied().collect()
}

/// llm-d plugins kvroute does not implement, with what they would have done (an error
/// at start: running without them would route differently).
fn unsupported(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "data-parallel-profile-handler" => "data-parallel ranks are separate pods in kvroute (`<pod>#dp<r>`)",
        "always-disagg-multimodal-decider" => "encode (E/PD) disaggregation is not implemented",
        "prefix-cache-affinity-filter" => "not implemented; use the precise prefix scorer with a high weight",
        "slo-headroom-tier-filter" | "latency-scorer" | "predicted-latency-producer" | "latency-slo-admitter" => {
            "needs llm-d's latency-predictor sidecar"
        }
        "token-load-scorer" | "running-requests-size-scorer" => {
            "not implemented; active-request-scorer or predicted-ttft-scorer balance load"
        }
        "context-length-aware" => "not implemented",
        "burst-prefix-cache-producer" | "mm-embeddings-cache-producer" | "mm-embeddings-cache-scorer" => {
            "not implemented"
        }
        "header-based-testing-filter" | "sheddable-eviction-filter" | "probabilistic-admitter" => "not implemented",
        _ => return None,
    })
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
            waiting_tokens: f("waitingTokens", 0.0),
            turnover_weight: f("turnoverWeight", 4.0),
            pending_weight: f("pendingWeight", 1.0),
            relative_queue: params.get("relativeQueue").and_then(Value::as_bool).unwrap_or(true),
        })),
        "no-hit-lru-scorer" => Plugin::Scorer(Box::new(NoHitLruScorer::default())),
        "sglang-cache-aware-scorer" | "smg-cache-aware-scorer" => {
            let d = peers::CacheAwareConfig::default();
            let cfg = peers::CacheAwareConfig {
                cache_threshold: f("cacheThreshold", d.cache_threshold),
                balance_abs_threshold: f("balanceAbsThreshold", d.balance_abs_threshold),
                balance_rel_threshold: f("balanceRelThreshold", d.balance_rel_threshold),
                max_tree_size: f("maxTreeSize", d.max_tree_size as f64) as usize,
            };
            match kind {
                "sglang-cache-aware-scorer" => Plugin::Scorer(Box::new(peers::Sglang::new(cfg))),
                _ => Plugin::Scorer(Box::new(peers::Smg::new(cfg))),
            }
        }
        "prodstack-prefix-aware-scorer" => Plugin::Scorer(Box::new(peers::ProdstackPrefixAware::default())),
        "llmd-approx-prefix-scorer" => {
            let d = peers::LlmdApproxConfig::default();
            Plugin::Scorer(Box::new(peers::LlmdApproxPrefix::new(peers::LlmdApproxConfig {
                min_block_tokens: f("blockSizeTokens", d.min_block_tokens as f64).max(1.0) as usize,
                max_prefix_tokens: f("maxPrefixTokensToMatch", d.max_prefix_tokens as f64) as usize,
                lru_per_server: f("lruCapacityPerServer", d.lru_per_server as f64) as usize,
            })))
        }
        "aibrix-prefix-cache-scorer" => {
            let d = peers::AibrixConfig::default();
            Plugin::Scorer(Box::new(peers::AibrixPrefixCache::new(peers::AibrixConfig {
                block_bytes: f("blockBytes", d.block_bytes as f64).max(1.0) as usize,
                imbalance_abs: f("imbalanceAbsCount", d.imbalance_abs as f64) as u32,
                std_factor: f("standardDeviationFactor", d.std_factor),
                max_blocks: f("blockNumber", d.max_blocks as f64) as usize,
                ttl_s: f("ttlSeconds", d.ttl_s),
            })))
        }
        "dynamo-kv-scorer" | "dynamo-approx-scorer" => {
            let d = peers::DynamoConfig::default();
            Plugin::Scorer(Box::new(peers::Dynamo::new(peers::DynamoConfig {
                overlap_weight: f("overlapScoreWeight", d.overlap_weight),
                approximate: kind == "dynamo-approx-scorer",
                ttl_s: f("ttlSeconds", d.ttl_s),
                max_blocks: f("maxTreeSize", d.max_blocks as f64) as usize,
            })))
        }
        "saturation-filter" => {
            Plugin::Filter(Box::new(filters::SaturationFilter { threshold: f("kvCacheThreshold", 0.95) }))
        }
        "label-selector-filter" => Plugin::Filter(Box::new(filters::label_selector(params)?)),
        "by-label" => Plugin::Filter(Box::new(filters::by_label(params)?)),
        "decode-filter" => Plugin::Filter(Box::new(filters::role_filter("decode-filter", DECODE_ROLES, true))),
        "prefill-filter" => Plugin::Filter(Box::new(filters::role_filter("prefill-filter", PREFILL_ROLES, false))),
        "encode-filter" => Plugin::Filter(Box::new(filters::role_filter("encode-filter", ENCODE_ROLES, false))),
        "max-score-picker" => Plugin::Picker(Box::new(MaxScorePicker { rng: seeded() })),
        "random-picker" => Plugin::Picker(Box::new(RandomPicker { rng: seeded(), weighted: false })),
        "weighted-random-picker" => Plugin::Picker(Box::new(RandomPicker { rng: seeded(), weighted: true })),
        "round-robin-picker" => Plugin::Picker(Box::new(RoundRobinPicker::default())),
        k if CONFIG_PLUGINS.contains(&k) => Plugin::Config,
        other => {
            return Err(match unsupported(other) {
                Some(why) => ConfigError::Unsupported { plugin: other.into(), why: why.into() },
                None => ConfigError::UnknownPlugin(other.to_string()),
            })
        }
    })
}

/// Parameters (dotted paths) kvroute reads for each plugin type; any other parameter set
/// in a file is reported by name as ignored.
pub(crate) fn honoured_params(kind: &str) -> &'static [&'static str] {
    match kind {
        "predicted-ttft-scorer" => &[
            "queueTokens",
            "recomputePenalty",
            "queuedTokens",
            "waitingTokens",
            "turnoverWeight",
            "pendingWeight",
            "relativeQueue",
        ],
        "saturation-filter" => &["kvCacheThreshold"],
        "sglang-cache-aware-scorer" | "smg-cache-aware-scorer" => {
            &["cacheThreshold", "balanceAbsThreshold", "balanceRelThreshold", "maxTreeSize"]
        }
        "aibrix-prefix-cache-scorer" => {
            &["blockBytes", "imbalanceAbsCount", "standardDeviationFactor", "blockNumber", "ttlSeconds"]
        }
        "dynamo-kv-scorer" => &["overlapScoreWeight"],
        "llmd-approx-prefix-scorer" => &["blockSizeTokens", "maxPrefixTokensToMatch", "lruCapacityPerServer"],
        "dynamo-approx-scorer" => &["overlapScoreWeight", "ttlSeconds", "maxTreeSize"],
        "label-selector-filter" => &["matchLabels", "matchExpressions"],
        "by-label" => &["label", "validValues", "allowsNoLabel"],
        "prefix-cache-scorer" => &["prefixMatchInfoProducerName", "mode"],
        "no-hit-lru-scorer" => &["prefixMatchInfoProducerName"],
        "precise-prefix-cache-scorer" | "precise-prefix-cache-producer" => &[
            "tokenProcessorConfig.blockSize",
            "tokenProcessorConfig.blockSizeTokens",
            "tokenProcessorConfig.hashSeed",
            "speculativeIndexing",
            "speculativeTTL",
            "indexerConfig.speculativeIndexing",
            "indexerConfig.speculativeTTL",
            "indexerConfig.kvBlockIndexConfig.enableMetrics",
            "indexerConfig.kvBlockIndexConfig.metricsLoggingInterval",
            "kvEventsConfig.zmqEndpoint",
            "kvEventsConfig.topicFilter",
            "kvEventsConfig.concurrency",
            "kvEventsConfig.engineType",
            "kvEventsConfig.discoverPods",
            "kvEventsConfig.podDiscoveryConfig.socketPort",
            "kvEventsConfig.podDiscoveryConfig.replaySocketPort",
        ],
        "disagg-profile-handler" => &[
            "profiles.decode",
            "profiles.prefill",
            "deciders.prefill",
            "decodeProfile",
            "prefillProfile",
            "deciderPluginName",
            "prefillDeciderPluginName",
        ],
        "pd-profile-handler" => &["threshold", "decodeProfile", "prefillProfile", "deciderPluginName"],
        "prefix-based-pd-decider" => &["nonCachedTokens"],
        "predicted-ttft-pd-decider" => {
            &["prefillSecondsPerToken", "transferSecondsPerToken", "overheadSeconds", "interferenceWeight"]
        }
        _ => &[],
    }
}

/// Dotted paths of the leaves of `v` (objects are walked; arrays and scalars are
/// leaves; nulls are skipped).
pub(crate) fn leaf_paths(v: &Value) -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        match v {
            Value::Null => {}
            Value::Object(m) => {
                for (k, x) in m {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(x, &p, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    walk(v, "", &mut out);
    out
}

/// The parameters of a `kind` plugin that kvroute does not read.
pub(crate) fn ignored_params(kind: &str, params: &Value) -> Vec<String> {
    let honoured = honoured_params(kind);
    leaf_paths(params)
        .into_iter()
        .filter(|p| !honoured.iter().any(|h| p == h || p.starts_with(&format!("{h}."))))
        .collect()
}
