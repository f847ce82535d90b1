//! llm-d's `EndpointPickerConfig`: plugins, scheduling profiles and a profile handler,
//! plus the settings llm-d keeps in plugin parameters (block size, hash seed, KV-event
//! subscription, speculative indexing) mapped onto kvroute's ([`EppSettings`]).

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::Value;

use crate::filters::{role_filter, DECODE_ROLES, PREFILL_ROLES};
use crate::pd::{Decider, TtftDecider};
use crate::pickers::{seeded, MaxScorePicker, RoundRobinPicker};
use crate::registry::{build_plugin, ignored_params};
use crate::scorers::{ActiveRequestScorer, NoHitLruScorer, PredictedTtftScorer};
use crate::{ConfigError, Plugin, PrefillStage, Profile};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EppConfig {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    plugins: Vec<PluginSpec>,
    #[serde(default)]
    scheduling_profiles: Vec<ProfileSpec>,
    /// Data sources and extractors: kvroute scrapes every backend itself.
    #[serde(default)]
    data_layer: Option<Value>,
    #[serde(default)]
    feature_gates: Option<Value>,
    #[serde(default)]
    saturation_detector: Option<Value>,
    #[serde(default)]
    flow_control: Option<Value>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
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
    #[serde(default)]
    plugins: Vec<PluginRef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginRef {
    plugin_ref: String,
    weight: Option<f64>,
}

/// `kvEventsConfig{discoverPods: true}`: dial each backend's publisher.
#[derive(Clone, Debug, PartialEq)]
pub struct DiscoverPods {
    /// `podDiscoveryConfig.socketPort` (llm-d's default 5557).
    pub socket_port: u16,
    /// `podDiscoveryConfig.replaySocketPort`.
    pub replay_port: Option<u16>,
}

/// Settings llm-d keeps in the parameters of `precise-prefix-cache-producer` (or the older
/// `precise-prefix-cache-scorer`), for `kvroute serve` to apply (`None`: not set).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EppSettings {
    /// `tokenProcessorConfig.blockSize` / `blockSizeTokens` → `hash.block_size`.
    pub block_size: Option<usize>,
    /// `tokenProcessorConfig.hashSeed` (vLLM's `PYTHONHASHSEED`) → `hash.seed`.
    pub hash_seed: Option<String>,
    /// `speculativeIndexing` (also under `indexerConfig`).
    pub speculative_indexing: Option<bool>,
    /// `speculativeTTL` → `index.speculative_ttl_ms`.
    pub speculative_ttl_ms: Option<u64>,
    /// `kvEventsConfig.zmqEndpoint` → `ingest.bind`.
    pub zmq_endpoint: Option<String>,
    /// `kvEventsConfig.topicFilter` → `ingest.topic_filter`.
    pub topic_filter: Option<String>,
    /// `kvEventsConfig.concurrency` → `ingest.workers`.
    pub concurrency: Option<usize>,
    /// `kvEventsConfig.discoverPods: true` → dial every backend (`ingest.connect`).
    pub discover_pods: Option<DiscoverPods>,
    /// Some profile scores with the precise (KV-event) index.
    pub precise: bool,
}

/// A loaded `EndpointPickerConfig`.
pub struct Loaded {
    /// The primary profile (the decode profile under a P/D handler, with its prefill stage).
    pub profile: Profile,
    pub settings: EppSettings,
    /// What kvroute ignores, by plugin and parameter name (to be logged as warnings).
    pub warnings: Vec<String>,
    /// How accepted llm-d plugins map onto kvroute (to be logged at info level).
    pub notes: Vec<String>,
}

const PRECISE_KINDS: &[&str] = &["precise-prefix-cache-producer", "precise-prefix-cache-scorer"];
const HANDLERS: &[&str] = &["single-profile-handler", "disagg-profile-handler", "pd-profile-handler"];

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k)).filter(|v| !v.is_null())
}

fn str_at(v: &Value, path: &str) -> Option<String> {
    at(v, path).and_then(Value::as_str).map(str::to_string)
}

/// A Go `time.Duration` as JSON: a string (`"2s"`, `"500ms"`, `"1m"`) or nanoseconds.
fn duration_ms(v: &Value) -> Option<u64> {
    if let Some(ns) = v.as_u64() {
        return Some(ns / 1_000_000);
    }
    let s = v.as_str()?.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let ms = match unit {
        "ns" => n / 1e6,
        "us" | "µs" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        _ => return None,
    };
    Some(ms.round() as u64)
}

/// Reads one precise plugin's parameters into `s`; two plugins that disagree are an error.
fn precise_settings(name: &str, p: &Value, s: &mut EppSettings, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
    let bad = |param: &str, why: &str| ConfigError::Param { plugin: name.into(), param: param.into(), why: why.into() };
    fn merge<T: PartialEq + std::fmt::Debug>(
        slot: &mut Option<T>,
        v: Option<T>,
        name: &str,
        param: &str,
    ) -> Result<(), ConfigError> {
        match (slot.as_ref(), v) {
            (Some(old), Some(new)) if *old != new => Err(ConfigError::Param {
                plugin: name.into(),
                param: param.into(),
                why: format!("{new:?} contradicts {old:?} set by another precise plugin"),
            }),
            (_, Some(new)) => {
                *slot = Some(new);
                Ok(())
            }
            _ => Ok(()),
        }
    }
    let bs = at(p, "tokenProcessorConfig.blockSize").or(at(p, "tokenProcessorConfig.blockSizeTokens"));
    let bs = match bs {
        Some(v) => Some(
            v.as_u64()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad("tokenProcessorConfig.blockSize", "not a positive integer"))? as usize,
        ),
        None => None,
    };
    merge(&mut s.block_size, bs, name, "tokenProcessorConfig.blockSize")?;
    let seed = at(p, "tokenProcessorConfig.hashSeed").map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
    merge(&mut s.hash_seed, seed, name, "tokenProcessorConfig.hashSeed")?;
    let spec = at(p, "speculativeIndexing").or(at(p, "indexerConfig.speculativeIndexing"));
    let spec = match spec {
        Some(v) => Some(v.as_bool().ok_or_else(|| bad("speculativeIndexing", "not a boolean"))?),
        None => None,
    };
    merge(&mut s.speculative_indexing, spec, name, "speculativeIndexing")?;
    let ttl = match at(p, "speculativeTTL").or(at(p, "indexerConfig.speculativeTTL")) {
        Some(v) => Some(duration_ms(v).ok_or_else(|| bad("speculativeTTL", "not a duration such as \"2s\""))?),
        None => None,
    };
    merge(&mut s.speculative_ttl_ms, ttl, name, "speculativeTTL")?;
    merge(&mut s.zmq_endpoint, str_at(p, "kvEventsConfig.zmqEndpoint"), name, "kvEventsConfig.zmqEndpoint")?;
    merge(&mut s.topic_filter, str_at(p, "kvEventsConfig.topicFilter"), name, "kvEventsConfig.topicFilter")?;
    let conc = match at(p, "kvEventsConfig.concurrency") {
        Some(v) => Some(
            v.as_u64().filter(|&n| n > 0).ok_or_else(|| bad("kvEventsConfig.concurrency", "not a positive integer"))?
                as usize,
        ),
        None => None,
    };
    merge(&mut s.concurrency, conc, name, "kvEventsConfig.concurrency")?;
    let port = |path: &str| -> Result<Option<u16>, ConfigError> {
        match at(p, path) {
            Some(v) => {
                Ok(Some(v.as_u64().and_then(|n| u16::try_from(n).ok()).ok_or_else(|| bad(path, "not a port number"))?))
            }
            None => Ok(None),
        }
    };
    let discover = match at(p, "kvEventsConfig.discoverPods").and_then(Value::as_bool) {
        Some(true) => Some(DiscoverPods {
            socket_port: port("kvEventsConfig.podDiscoveryConfig.socketPort")?.unwrap_or(5557),
            replay_port: port("kvEventsConfig.podDiscoveryConfig.replaySocketPort")?,
        }),
        _ => None,
    };
    merge(&mut s.discover_pods, discover, name, "kvEventsConfig.discoverPods")?;
    if let Some(e) = str_at(p, "kvEventsConfig.engineType").filter(|e| e != "vllm") {
        warnings.push(format!(
            "plugin {name:?}: kvEventsConfig.engineType {e:?} is treated as vllm (kvroute decodes vLLM's KV-event format)"
        ));
    }
    if s.speculative_indexing == Some(false) {
        warnings.push(format!(
            "plugin {name:?}: speculativeIndexing: false is not honoured: kvroute always records the pick as \
             speculative index entries until its KV events arrive (index.speculative_ttl_ms)"
        ));
    }
    Ok(())
}

/// Why a parameter of `kind` is ignored, for the warning.
fn ignored_because(kind: &str) -> &'static str {
    match kind {
        "token-producer" | "tokenizer" => "kvroute tokenizes in process (--model NAME=DIR)",
        "metrics-data-source" | "core-metrics-extractor" | "model-server-protocol-metrics" => {
            "kvroute scrapes each backend's /metrics itself (--health-interval-ms)"
        }
        "precise-prefix-cache-producer" | "precise-prefix-cache-scorer" => {
            "no kvroute equivalent (index settings are index.*, tokenizers --model)"
        }
        _ => "not supported by kvroute",
    }
}

/// What an accepted configuration-only plugin becomes in kvroute (logged at info level).
fn note(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "token-producer" | "tokenizer" => "kvroute tokenizes prompts in process (--model NAME=DIR per model)",
        "endpoint-notification-source" | "k8s-notification-source" => {
            "endpoints are kvroute's backends (--backend / backends:)"
        }
        "metrics-data-source" | "core-metrics-extractor" | "model-server-protocol-metrics" => {
            "kvroute scrapes vLLM's /metrics of every backend (--health-interval-ms)"
        }
        "models-data-source" | "models-data-extractor" => "kvroute reads /v1/models of every backend",
        "precise-prefix-cache-producer" => "the KV-event index kvroute ingests (ingest.*, index.*)",
        "approx-prefix-cache-producer" => "kvroute's own approximate (text) prefix record",
        "inflight-load-producer" => "kvroute counts in-flight requests itself",
        "openai-parser" => "kvroute parses OpenAI requests itself",
        "disagg-headers-handler" | "prefill-header-handler" => {
            "the P/D handler's prefill pick goes to the decode pod as x-prefiller-host-port"
        }
        _ => return None,
    })
}

/// `predicted-ttft-pd-decider`'s parameters (defaults: [`TtftDecider::default`]).
pub(crate) fn ttft_decider(p: &Value) -> TtftDecider {
    let d = TtftDecider::default();
    let f = |k: &str, v: f64| p.get(k).and_then(Value::as_f64).unwrap_or(v);
    TtftDecider {
        prefill_s_per_token: f("prefillSecondsPerToken", d.prefill_s_per_token),
        transfer_s_per_token: f("transferSecondsPerToken", d.transfer_s_per_token),
        overhead_s: f("overheadSeconds", d.overhead_s),
        interference_weight: f("interferenceWeight", d.interference_weight),
    }
}

pub struct SchedulerConfig;

impl SchedulerConfig {
    /// kvroute's default: predicted TTFT (cache hits vs queueing in one cost, weight 3),
    /// plus in-flight balance (weight 1) and spreading of cold prefixes (weight 1), max-score.
    ///
    /// P/D comes built in: decode picks go to pods `decode-filter` keeps (every pod of a
    /// pool without `llm-d.ai/role` labels), and when the pool also has pods
    /// `prefill-filter` keeps, kvroute's `predicted-ttft-pd-decider` (default parameters)
    /// splits the requests whose first token is sooner through a prefill pod. A pool
    /// without prefill pods routes exactly as without the stage.
    pub fn default_profile() -> Profile {
        Self::disaggregated("default", Decider::PredictedTtft(TtftDecider::default()))
    }

    /// The default profile's plugins for both stages, with this P/D decider.
    pub fn disaggregated(name: &str, decider: Decider) -> Profile {
        let stage = |name: &str, filter: Box<dyn crate::Filter>| {
            Profile::new(
                name,
                vec![filter],
                vec![
                    (
                        Box::new(PredictedTtftScorer {
                            queue_tokens: 128.0,
                            recompute_penalty: 2.0,
                            queued_tokens: 0.0,
                            waiting_tokens: 6144.0,
                            turnover_weight: 4.0,
                            pending_weight: 1.0,
                            relative_queue: true,
                        }) as Box<dyn crate::Scorer>,
                        3.0,
                    ),
                    (Box::new(ActiveRequestScorer), 1.0),
                    (Box::new(NoHitLruScorer::default()), 1.0),
                ],
                Box::new(MaxScorePicker { rng: seeded() }),
            )
        };
        let mut decode = stage(name, Box::new(role_filter("decode-filter", DECODE_ROLES, true)));
        let prefill = stage("prefill", Box::new(role_filter("prefill-filter", PREFILL_ROLES, false)));
        decode.prefill = Some(Box::new(PrefillStage { profile: prefill, decider }));
        decode
    }

    /// Round-robin over all pods (a baseline).
    pub fn round_robin() -> Profile {
        Profile::new("round-robin", vec![], vec![], Box::new(RoundRobinPicker::default()))
    }

    /// The primary profile of an llm-d `EndpointPickerConfig` YAML (settings and warnings
    /// dropped; see [`SchedulerConfig::load`]).
    pub fn from_yaml(text: &str) -> Result<Profile, ConfigError> {
        Self::load(text).map(|l| l.profile)
    }

    /// Loads an llm-d `EndpointPickerConfig`: profiles, the profile handler, the settings
    /// kvroute applies elsewhere, and warnings naming every plugin parameter it ignores.
    /// Plugins and handlers kvroute does not implement are errors.
    pub fn load(text: &str) -> Result<Loaded, ConfigError> {
        let cfg: EppConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
        if let Some(k) = cfg.kind.as_deref().filter(|k| *k != "EndpointPickerConfig") {
            return Err(ConfigError::Yaml(format!("kind is {k:?}, expected EndpointPickerConfig")));
        }
        let _ = cfg.api_version;
        let (mut warnings, mut notes) = (Vec::new(), Vec::new());
        let mut settings = EppSettings::default();
        let mut defined: HashMap<String, &PluginSpec> = HashMap::new();
        for p in &cfg.plugins {
            let name = p.name.clone().unwrap_or_else(|| p.kind.clone());
            // Fails on unknown and unsupported types, and on bad filter parameters.
            build_plugin(&p.kind, &p.parameters)?;
            if defined.insert(name.clone(), p).is_some() {
                return Err(ConfigError::Yaml(format!("two plugins are named {name:?}")));
            }
            for param in ignored_params(&p.kind, &p.parameters) {
                warnings.push(format!(
                    "plugin {name:?} ({}): parameter {param} is ignored: {}",
                    p.kind,
                    ignored_because(&p.kind)
                ));
            }
            if PRECISE_KINDS.contains(&p.kind.as_str()) {
                precise_settings(&name, &p.parameters, &mut settings, &mut warnings)?;
            }
            if matches!(p.kind.as_str(), "utilization-detector" | "concurrency-detector") {
                warnings.push(format!(
                    "plugin {name:?} ({}) is ignored: kvroute's saturation.* settings decide 429s",
                    p.kind
                ));
            }
            if let Some(n) = note(&p.kind) {
                notes.push(format!("plugin {name:?} ({}): {n}", p.kind));
            }
        }
        if cfg.data_layer.is_some() {
            notes.push("dataLayer: kvroute discovers, scrapes and subscribes to its backends itself".into());
        }
        if let Some(g) = &cfg.feature_gates {
            warnings.push(format!("featureGates {g} are ignored: kvroute has no llm-d feature gates"));
        }
        if cfg.flow_control.is_some() {
            warnings
                .push("flowControl is ignored: kvroute queues nothing in the router; saturation.* decides 429s".into());
        }
        if cfg.saturation_detector.is_some() {
            warnings.push("saturationDetector is ignored: kvroute's saturation.* settings decide 429s".into());
        }
        for k in cfg.other.keys() {
            warnings.push(format!("top-level key {k:?} is ignored (not part of kvroute's EndpointPickerConfig)"));
        }
        let mut profiles: BTreeMap<String, Profile> = BTreeMap::new();
        for spec in &cfg.scheduling_profiles {
            let profile = build_profile(spec, &defined, &mut settings)?;
            if profiles.insert(spec.name.clone(), profile).is_some() {
                return Err(ConfigError::Profiles(format!("two profiles are named {:?}", spec.name)));
            }
        }
        let profile = pick_handler(&cfg, &defined, profiles, &mut warnings)?;
        Ok(Loaded { profile, settings, warnings, notes })
    }
}

/// Builds one profile; a `prefix-cache-scorer` fed by a precise producer (or `mode:
/// cache_tracking`) scores with the KV-event index.
fn build_profile(
    spec: &ProfileSpec,
    defined: &HashMap<String, &PluginSpec>,
    settings: &mut EppSettings,
) -> Result<Profile, ConfigError> {
    let mut profile = Profile::new(&spec.name, vec![], vec![], Box::new(MaxScorePicker { rng: seeded() }));
    for r in &spec.plugins {
        let p = defined
            .get(&r.plugin_ref)
            .ok_or_else(|| ConfigError::UndefinedRef { profile: spec.name.clone(), name: r.plugin_ref.clone() })?;
        let mut kind = p.kind.as_str();
        if kind == "prefix-cache-scorer" {
            if let Some(producer) = str_at(&p.parameters, "prefixMatchInfoProducerName") {
                let fed_by = defined.get(&producer).map(|q| q.kind.as_str()).ok_or_else(|| ConfigError::Param {
                    plugin: r.plugin_ref.clone(),
                    param: "prefixMatchInfoProducerName".into(),
                    why: format!("no plugin is named {producer:?}"),
                })?;
                match fed_by {
                    "precise-prefix-cache-producer" => kind = "precise-prefix-cache-scorer",
                    "approx-prefix-cache-producer" => {}
                    other => {
                        return Err(ConfigError::Param {
                            plugin: r.plugin_ref.clone(),
                            param: "prefixMatchInfoProducerName".into(),
                            why: format!("{producer:?} is a {other}, not a prefix-cache producer"),
                        })
                    }
                }
            } else if str_at(&p.parameters, "mode").as_deref() == Some("cache_tracking") {
                kind = "precise-prefix-cache-scorer";
            }
        }
        if kind == "precise-prefix-cache-scorer" {
            settings.precise = true;
        }
        match build_plugin(kind, &p.parameters)? {
            Plugin::Scorer(s) => profile.scorers.push((s, r.weight.unwrap_or(1.0))),
            Plugin::Filter(f) => profile.filters.push(f),
            // llm-d defaults to max-score when a profile names no picker.
            Plugin::Picker(k) => profile.picker = k,
            // Handlers, producers and tokenizers listed in a profile run once per request
            // in kvroute anyway.
            Plugin::Config => {}
        }
    }
    Ok(profile)
}

/// The profile handler: one profile, or decode + prefill (P/D).
fn pick_handler(
    cfg: &EppConfig,
    defined: &HashMap<String, &PluginSpec>,
    mut profiles: BTreeMap<String, Profile>,
    warnings: &mut Vec<String>,
) -> Result<Profile, ConfigError> {
    let handlers: Vec<&PluginSpec> = cfg.plugins.iter().filter(|p| HANDLERS.contains(&p.kind.as_str())).collect();
    let names: Vec<String> = cfg.scheduling_profiles.iter().map(|p| p.name.clone()).collect();
    let handler = match handlers.as_slice() {
        [] => None,
        [h] => Some(*h),
        _ => return Err(ConfigError::Profiles("more than one profile handler".into())),
    };
    let Some(h) = handler.filter(|h| h.kind != "single-profile-handler") else {
        // single-profile-handler, or none with one profile (llm-d's default).
        return match names.as_slice() {
            [one] => profiles.remove(one).ok_or_else(|| ConfigError::Profiles("no profile".into())),
            [] => Err(ConfigError::Yaml("no schedulingProfiles".into())),
            _ => Err(ConfigError::Profiles(format!(
                "{} profiles ({}) but {}: it runs exactly one (name disagg-profile-handler for P/D)",
                names.len(),
                names.join(", "),
                if handler.is_some() { "single-profile-handler" } else { "no profile handler" }
            ))),
        };
    };
    let p = &h.parameters;
    let decode = str_at(p, "profiles.decode").or(str_at(p, "decodeProfile")).unwrap_or_else(|| "decode".into());
    let prefill = str_at(p, "profiles.prefill").or(str_at(p, "prefillProfile")).unwrap_or_else(|| "prefill".into());
    if let Some(e) = at(p, "deciders.encode").or(at(p, "encodeDeciderPluginName")) {
        return Err(ConfigError::Unsupported {
            plugin: h.kind.clone(),
            why: format!("deciders.encode ({e}): encode (E/PD) disaggregation is not implemented"),
        });
    }
    let decider_name =
        str_at(p, "deciders.prefill").or(str_at(p, "prefillDeciderPluginName")).or(str_at(p, "deciderPluginName"));
    let decider = match decider_name {
        Some(n) => {
            let d = defined.get(&n).ok_or_else(|| ConfigError::Param {
                plugin: h.kind.clone(),
                param: "deciders.prefill".into(),
                why: format!("no plugin is named {n:?}"),
            })?;
            Some(match d.kind.as_str() {
                "always-disagg-pd-decider" => Decider::Always,
                "prefix-based-pd-decider" => Decider::PrefixBased {
                    non_cached_tokens: at(&d.parameters, "nonCachedTokens").and_then(Value::as_u64).unwrap_or(0)
                        as usize,
                },
                "predicted-ttft-pd-decider" => Decider::PredictedTtft(ttft_decider(&d.parameters)),
                other => {
                    return Err(ConfigError::Param {
                        plugin: h.kind.clone(),
                        param: "deciders.prefill".into(),
                        why: format!("{n:?} is a {other}, not a P/D decider"),
                    })
                }
            })
        }
        // llm-d v0.2's pd-profile-handler compared uncached prompt characters with
        // `threshold` (0: always); KServe migrates it to nonCachedTokens = ⌈threshold/4⌉.
        None if h.kind == "pd-profile-handler" => Some(match at(p, "threshold").and_then(Value::as_u64).unwrap_or(0) {
            0 => Decider::Always,
            t => Decider::PrefixBased { non_cached_tokens: t.div_ceil(4) as usize },
        }),
        None => None,
    };
    let mut primary = profiles.remove(&decode).ok_or_else(|| {
        ConfigError::Profiles(format!(
            "{} needs a decode profile named {decode:?} (have: {})",
            h.kind,
            names.join(", ")
        ))
    })?;
    if let Some(decider) = decider {
        match profiles.remove(&prefill) {
            Some(profile) => primary.prefill = Some(Box::new(PrefillStage { profile, decider })),
            None => warnings.push(format!(
                "{}: no profile named {prefill:?}, so no request is disaggregated (decode only)",
                h.kind
            )),
        }
    }
    for unused in profiles.keys() {
        warnings.push(format!("profile {unused:?} is never run by {}", h.kind));
    }
    Ok(primary)
}
