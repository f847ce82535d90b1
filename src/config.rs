//! `kvroute serve` configuration: typed, with documented defaults. A YAML file
//! (`--config`) may carry any of it; command-line flags override the file.
//!
//! ```yaml
//! listen: 0.0.0.0:8080          # HTTP: OpenAI gateway and /health (admin routes: `admin:`)
//! shutdown_grace_s: 25          # SIGTERM/SIGINT: in-flight requests finish within this, then cut
//! shutdown_delay_s: 0           # readiness false → listeners closed after this (load balancers)
//! backends:                     # pods to route to (pod = host:port of the URL)
//!   - http://10.0.0.1:8000
//!   - {url: "http://10.0.0.2:8000", labels: {llm-d.ai/role: decode},
//!      zmq: "tcp://10.0.0.2:5557", replay: "tcp://10.0.0.2:5558"}   # dialled for KV events
//! discovery:                    # where the backends come from (docs/kubernetes.md)
//!   mode: static                # static (the backends list) | kubernetes
//!   kubernetes:
//!     kubeconfig: null          # null: in-cluster service account, else $KUBECONFIG
//!     namespace: null           # null: the service account's / kubeconfig's namespace
//!     pool_name: null           # an InferencePool to follow, or:
//!     pool_group: inference.networking.k8s.io   # v1; inference.networking.x-k8s.io = v1alpha2
//!     endpoint_selector: null   # pods by label selector (no pool), e.g. "app=vllm"
//!     target_ports: []          # their serving ports (default [8000])
//!     kv_events_port: null      # dial tcp://<podIP>:<port> per pod; null = bind mode
//!     kv_replay_port: null      # each pod's replay port
//!     objectives: true          # InferenceObjective priorities (x-gateway-inference-objective)
//! models: {my-model: /models/my-model}  # tokenizer.json dir per model (default: built-in)
//! scheduler_config: null        # llm-d EndpointPickerConfig YAML (default profile if null)
//! policy: null                  # or a built-in policy: default, llm-d, dynamo, sglang, smg,
//!                               # aibrix, prodstack, … (kvroute serve --help)
//! health_interval_ms: 1000
//! tokenize_deadline_ms: 50       # past it, route on the approximate (text) prefix
//! key_mode: request             # request | vllm (see docs/architecture.md)
//! hash:                         # how the vLLM servers hash (used by key_mode: vllm)
//!   algo: sha256                # vLLM's --prefix-caching-hash-algo
//!   seed: null                  # PYTHONHASHSEED as the servers have it; null = unset
//!   vllm_version: "0.33"
//!   block_size: 16
//! ext_proc:                     # Envoy ext_proc door (GIE endpoint picker); off when null
//!   listen: null                # e.g. 0.0.0.0:9002
//!   health_listen: null         # gRPC health, e.g. 0.0.0.0:9003
//!   max_connections: 1024       # per gRPC listener; beyond, new connections are closed
//!   max_concurrent_streams: 1024  # gRPC calls at once per connection
//!   handshake_timeout_ms: 10000 # first call must start within this of accept
//!   keepalive_interval_ms: 30000  # HTTP/2 PING after this much silence; 0 = off
//!   keepalive_timeout_ms: 10000 # unanswered PING: the peer is dead, connection closed
//! saturation:                   # both doors answer 429 when every candidate is saturated
//!   max_queued_per_pod: 512     # requests without a first byte: all pods there → 429
//!   queue_depth: 5              # scraped waiting requests: busy (sheddable requests → 429)
//!   kv_cache_utilization: 0.8   # scraped KV usage: busy
//! pd:                           # prefill/decode disaggregation (a profile with a prefill stage)
//!   mode: gateway               # gateway: the gateway prefills, then decodes (no sidecar needed)
//!                               # sidecar: only x-prefiller-host-port (decode pods run a sidecar)
//! upstream:                     # gateway → pod timeouts (docs/configuration.md)
//!   connect_timeout_ms: 5000
//!   first_byte_timeout_ms: 120000  # → next pod while nothing reached the client, else 504
//!   idle_timeout_ms: 60000      # between body chunks: SSE error event, stream ends
//!   total_timeout_ms: 600000    # whole request → 504
//! index:
//!   backend: memory             # memory | redis (shared by router replicas)
//!   capacity: 16777216          # memory: (block, pod) entries before LRU eviction
//!   speculative_ttl_ms: 2000
//!   url: redis://127.0.0.1:6379 # redis: server (Valkey alike); cluster: seeds, comma-separated
//!   cluster: false              # redis: a Redis/Valkey Cluster (block keys spread over slots)
//!   prefix: kvr                 # redis: key prefix (replicas sharing an index use the same)
//!   ttl_s: 3600                 # redis: a block key expires this long after its last write
//!   cache_ms: 0                 # redis: reuse values read this long (hot prefixes); 0 = off
//!   writer_lease_ms: null       # redis: one writer per pod, lease length; null = 3000
//! ingest:
//!   bind: ["tcp://*:5557"]      # SUB sockets vLLM servers connect to
//!   connect:                    # publishers to dial
//!     - {pod: "10.0.0.1:8000", endpoint: "tcp://10.0.0.1:5557", replay: "tcp://10.0.0.1:5558"}
//!   topic_filter: ""
//!   replay_port: null           # bind mode: replay port on each pod's host
//!   data_parallel_size: 1
//!   workers: 2
//!   queue_capacity: 65536
//!   replay_idle_timeout_ms: 2000
//!   replay_total_timeout_ms: 30000
//!   hold_unknown_ms: null       # bind mode: hold unknown pods' events for discovery; null =
//!                               # 10000 with Kubernetes discovery, else 0 (drop at once)
//!   max_held_messages: 4096
//! http:                         # client-side limits of the serving port
//!   header_timeout_ms: 10000    # request head complete within this of accept / first byte
//!   idle_timeout_ms: 60000      # kept-alive connection with nothing in flight: closed
//!   max_connections: 8192       # then reserve_connections more that get only /health
//!   reserve_connections: 64
//!   max_header_bytes: 65536     # larger request heads: 431
//!   max_concurrent_streams: 128 # HTTP/2 (h2c) streams per connection; each takes a slot
//! admin:                        # /v1/kv/*, /v1/route/explain, /metrics
//!   listen: 127.0.0.1:9090      # null = no admin listener
//!   on_serving_port: false      # also serve them on `listen`
//!   token_file: null            # bearer token they require (or KVROUTE_ADMIN_TOKEN)
//! observability:                # docs/observability.md
//!   log_format: text            # text | json (one object per line on stderr)
//!   hit_attribution: true       # predicted vs engine-reported cached tokens (kvroute_prefix_*)
//!   recent_decisions: 256       # requests kept for GET /v1/route/recent (admin)
//! tls:                          # rustls; off while cert is null
//!   cert: null                  # PEM chain (+ key): HTTPS on listen and admin.listen
//!   key: null
//!   grpc: false                 # ext_proc and gRPC health over TLS too
//! ```

use std::net::SocketAddr;
use std::str::FromStr;

use kvroute_ingest::IngestConfig;
use kvroute_keys::{HashAlgo, VllmVersion};
use serde::{Deserialize, Serialize};

/// How blocks are keyed in the index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KeyModeName {
    /// kvroute hashes each event's token ids (works with any engine hash settings).
    #[default]
    Request,
    /// Index vLLM's own hashes; requests are hashed like the servers (`hash:` must match).
    Vllm,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HashSection {
    #[serde(with = "as_str")]
    pub algo: HashAlgo,
    pub seed: Option<String>,
    #[serde(with = "as_str")]
    pub vllm_version: VllmVersion,
    pub block_size: usize,
}

impl Default for HashSection {
    fn default() -> Self {
        Self { algo: HashAlgo::Sha256, seed: None, vllm_version: VllmVersion::LATEST, block_size: 16 }
    }
}

/// The Envoy ext_proc door, and the limits of its gRPC listeners (ext_proc and gRPC
/// health; `kvroute_extproc::listen`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExtProcSection {
    /// `envoy.service.ext_proc.v3.ExternalProcessor` gRPC address (llm-d: 9002).
    pub listen: Option<SocketAddr>,
    /// gRPC health address (llm-d: 9003).
    pub health_listen: Option<SocketAddr>,
    /// Connections served by each gRPC listener; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// gRPC calls at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// A connection's first call must start within this of its accept (TLS and the HTTP/2
    /// preface included), ms.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 PING after this long without traffic, ms; 0 = no pings.
    pub keepalive_interval_ms: u64,
    /// A PING unanswered this long closes the connection (a dead peer), ms.
    pub keepalive_timeout_ms: u64,
}

impl Default for ExtProcSection {
    fn default() -> Self {
        Self {
            listen: None,
            health_listen: None,
            max_connections: 1024,
            max_concurrent_streams: 1024,
            handshake_timeout_ms: 10_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
        }
    }
}

impl ExtProcSection {
    pub fn limits(&self) -> kvroute_extproc::listen::GrpcLimits {
        let ms = std::time::Duration::from_millis;
        kvroute_extproc::listen::GrpcLimits {
            max_connections: self.max_connections,
            max_concurrent_streams: self.max_concurrent_streams,
            handshake_timeout: ms(self.handshake_timeout_ms),
            keepalive_interval: (self.keepalive_interval_ms > 0).then(|| ms(self.keepalive_interval_ms)),
            keepalive_timeout: ms(self.keepalive_timeout_ms),
        }
    }
}

/// When pods count as saturated (429 from both doors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SaturationSection {
    pub max_queued_per_pod: u32,
    pub queue_depth: f64,
    pub kv_cache_utilization: f64,
}

impl Default for SaturationSection {
    fn default() -> Self {
        let d = kvroute_gateway::Saturation::default();
        Self {
            max_queued_per_pod: d.max_queued_per_pod,
            queue_depth: d.queue_depth,
            kv_cache_utilization: d.kv_cache_utilization,
        }
    }
}

/// Prefill/decode disaggregation: who runs the prefill → decode flow when the scheduler's
/// pick has a prefill pod (`kvroute_gateway::pd`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PdSection {
    pub mode: PdMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PdMode {
    /// The gateway sends the prefill request, then the decode request with the returned
    /// `kv_transfer_params`.
    #[default]
    Gateway,
    /// The decode pods run llm-d's routing sidecar: the gateway only adds
    /// `x-prefiller-host-port`.
    Sidecar,
}

impl PdMode {
    pub fn gateway_mode(self) -> kvroute_gateway::pd::Mode {
        match self {
            PdMode::Gateway => kvroute_gateway::pd::Mode::Gateway,
            PdMode::Sidecar => kvroute_gateway::pd::Mode::Sidecar,
        }
    }
}

/// Timeouts of the gateway's requests to the pods (see `kvroute_gateway::upstream`);
/// each in ms, 0 = no limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    /// TCP connect to a pod; past it the next pod is tried.
    pub connect_timeout_ms: u64,
    /// Request sent → first body byte (nothing sent to the client yet); past it the next
    /// pod is tried (504 when none is left). Covers a whole non-streaming generation.
    pub first_byte_timeout_ms: u64,
    /// Longest gap between two body chunks once the response started; past it an SSE
    /// stream ends with an error event, other bodies are cut.
    pub idle_timeout_ms: u64,
    /// The whole request, retries included: 504 before the response started, else as idle.
    pub total_timeout_ms: u64,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        let d = kvroute_gateway::Timeouts::default();
        Self {
            connect_timeout_ms: d.connect.as_millis() as u64,
            first_byte_timeout_ms: d.first_byte.as_millis() as u64,
            idle_timeout_ms: d.idle.as_millis() as u64,
            total_timeout_ms: d.total.as_millis() as u64,
        }
    }
}

impl UpstreamSection {
    pub fn timeouts(&self) -> kvroute_gateway::Timeouts {
        // 0 = no limit (ten years).
        let ms = |v: u64| std::time::Duration::from_millis(if v == 0 { 315_360_000_000 } else { v });
        kvroute_gateway::Timeouts {
            connect: ms(self.connect_timeout_ms),
            first_byte: ms(self.first_byte_timeout_ms),
            idle: ms(self.idle_timeout_ms),
            total: ms(self.total_timeout_ms),
        }
    }
}

/// Where the block index lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IndexBackend {
    /// In this process (each replica ingests its own events).
    #[default]
    Memory,
    /// A Redis or Valkey server shared by router replicas.
    Redis,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexSection {
    pub backend: IndexBackend,
    /// In-memory backend: (block, pod) entries before LRU eviction.
    pub capacity: usize,
    pub speculative_ttl_ms: u64,
    /// Redis backend: server URL (`redis://host:port[/db]`; Valkey alike).
    pub url: String,
    /// Redis backend: the server is a Redis/Valkey Cluster (`url` lists one or more seed
    /// nodes, comma-separated); block keys spread over its slots.
    pub cluster: bool,
    /// Redis backend: prefix of kvroute's keys (replicas sharing an index use the same).
    pub prefix: String,
    /// Redis backend: a block key expires this long after its last write.
    pub ttl_s: u64,
    /// Redis backend: reuse block values read for this long (0 = off; other replicas'
    /// writes show within this bound).
    pub cache_ms: u64,
    /// Redis backend: each pod's events are written by one replica, elected by a lease of
    /// this length (null: 3000 ms). Copies of a block are counted, so replicas cannot all
    /// write the same events (each copy would count once per replica).
    pub writer_lease_ms: Option<u64>,
}

impl Default for IndexSection {
    fn default() -> Self {
        Self {
            backend: IndexBackend::Memory,
            capacity: 16 << 20,
            speculative_ttl_ms: 2000,
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            prefix: "kvr".into(),
            ttl_s: 3600,
            cache_ms: 0,
            writer_lease_ms: None,
        }
    }
}

/// A backend: its URL, or the URL with labels and its own KV-event endpoints (dialled).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BackendSpec {
    Url(String),
    Full {
        url: String,
        #[serde(default)]
        labels: std::collections::BTreeMap<String, String>,
        /// The pod's KV-event PUB endpoint, dialled by kvroute (e.g. `tcp://10.0.0.1:5557`).
        #[serde(default)]
        zmq: Option<String>,
        /// Its replay endpoint (e.g. `tcp://10.0.0.1:5558`).
        #[serde(default)]
        replay: Option<String>,
    },
}

impl BackendSpec {
    pub fn url(&self) -> &str {
        match self {
            BackendSpec::Url(u) | BackendSpec::Full { url: u, .. } => u,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// On SIGTERM/SIGINT, requests in flight may finish for this long (from the signal,
    /// the delay included); then the rest are cut and the process exits 0.
    pub shutdown_grace_s: f64,
    /// On SIGTERM/SIGINT, readiness turns false at once; the listeners close this much
    /// later (so load balancers stop sending before connections are refused).
    pub shutdown_delay_s: f64,
    /// vLLM servers to route to; each is the pod `host:port` of its URL.
    pub backends: Vec<BackendSpec>,
    /// Where the backends come from (default static: `backends`).
    pub discovery: kvroute_discovery::DiscoverySection,
    /// Tokenizer directory per served model name (others: the built-in tokenizer).
    pub models: std::collections::BTreeMap<String, std::path::PathBuf>,
    /// An llm-d `EndpointPickerConfig` YAML file; default: kvroute's default profile.
    pub scheduler_config: Option<std::path::PathBuf>,
    /// A built-in policy by name instead (`kvroute_schedule::NAMED`: baselines and the
    /// peers' policies).
    pub policy: Option<String>,
    /// Interval of health probes and metric scrapes, ms.
    pub health_interval_ms: u64,
    /// Longest wait for tokenizing a prompt, ms; past it, the request is routed on the
    /// approximate (text) prefix.
    pub tokenize_deadline_ms: u64,
    pub key_mode: KeyModeName,
    pub hash: HashSection,
    pub index: IndexSection,
    pub ingest: IngestConfig,
    pub ext_proc: ExtProcSection,
    pub saturation: SaturationSection,
    pub pd: PdSection,
    pub upstream: UpstreamSection,
    /// Client-side limits and TLS of the serving port (`kvroute_api::listen`).
    pub http: kvroute_api::listen::ClientLimits,
    /// The admin surface: `/v1/kv/*`, `/v1/route/explain`, `/metrics` (`kvroute_api::admin`).
    pub admin: kvroute_api::admin::AdminSection,
    /// TLS of the HTTP (and gRPC) listeners.
    pub tls: kvroute_api::listen::TlsSection,
    /// Logs, hit attribution and the recent-decisions view.
    pub observability: ObservabilitySection,
}

/// Log line format on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line (fields flattened: `timestamp`, `level`, `target`, …).
    Json,
}

/// Logs, hit attribution and the recent-decisions view (docs/observability.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObservabilitySection {
    pub log_format: LogFormat,
    /// Compare the predicted cached prefix on each pick with the engine's
    /// `usage.prompt_tokens_details.cached_tokens` (asks streaming requests for their usage
    /// chunk and removes it again when the client did not ask for it).
    pub hit_attribution: bool,
    /// Requests kept for `GET /v1/route/recent`.
    pub recent_decisions: usize,
}

impl Default for ObservabilitySection {
    fn default() -> Self {
        Self { log_format: LogFormat::Text, hit_attribution: true, recent_decisions: 256 }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            shutdown_grace_s: 25.0,
            shutdown_delay_s: 0.0,
            backends: Vec::new(),
            discovery: Default::default(),
            models: Default::default(),
            scheduler_config: None,
            policy: None,
            health_interval_ms: 1000,
            tokenize_deadline_ms: 50,
            key_mode: KeyModeName::default(),
            hash: HashSection::default(),
            index: IndexSection::default(),
            ingest: IngestConfig::default(),
            ext_proc: ExtProcSection::default(),
            saturation: SaturationSection::default(),
            pd: PdSection::default(),
            upstream: UpstreamSection::default(),
            http: Default::default(),
            admin: Default::default(),
            tls: Default::default(),
            observability: Default::default(),
        }
    }
}

/// Settings given explicitly (on the command line or in the `--config` file), each with
/// where it came from: an llm-d scheduler config that says otherwise is refused.
#[derive(Clone, Debug, Default)]
pub struct Explicit {
    pub block_size: Option<String>,
    pub hash_seed: Option<String>,
    pub speculative_ttl_ms: Option<String>,
    pub topic_filter: Option<String>,
    pub workers: Option<String>,
    pub bind: Option<String>,
    pub connect: Option<String>,
}

impl ServeConfig {
    /// Applies the settings an llm-d `EndpointPickerConfig` (`epp`, named `file`) keeps in
    /// its precise-prefix plugin: set where nothing explicit says otherwise, an error
    /// where an explicit setting contradicts it. Returns what was applied, for the log.
    pub fn apply_epp(
        &mut self,
        s: &kvroute_schedule::EppSettings,
        explicit: &Explicit,
        file: &str,
    ) -> anyhow::Result<Vec<String>> {
        let mut applied = Vec::new();
        let clash = |param: &str, v: &dyn std::fmt::Display, src: &str, what: &str| {
            anyhow::anyhow!(
                "the scheduler config {file} sets {param} {v} but {src}: they must agree ({what}); \
                 change one of them or drop the explicit setting"
            )
        };
        fn check<T: PartialEq + Clone + std::fmt::Display>(
            slot: &mut T,
            v: Option<&T>,
            explicit: &Option<String>,
            name: &str,
            applied: &mut Vec<String>,
        ) -> Result<(), (T, String)> {
            let Some(v) = v else { return Ok(()) };
            match explicit {
                Some(src) if slot != v => return Err((v.clone(), src.clone())),
                Some(_) => {}
                None => {
                    *slot = v.clone();
                    applied.push(format!("{name} = {v}"));
                }
            }
            Ok(())
        }
        check(&mut self.hash.block_size, s.block_size.as_ref(), &explicit.block_size, "hash.block_size", &mut applied)
            .map_err(|(v, src)| clash("tokenProcessorConfig.blockSize", &v, &src, "vLLM's --block-size"))?;
        if let Some(seed) = &s.hash_seed {
            match &explicit.hash_seed {
                Some(src) if self.hash.seed.as_deref() != Some(seed.as_str()) => {
                    return Err(clash(
                        "tokenProcessorConfig.hashSeed",
                        &format!("{seed:?}"),
                        src,
                        "the servers' PYTHONHASHSEED",
                    ))
                }
                Some(_) => {}
                None => {
                    self.hash.seed = Some(seed.clone());
                    applied.push(format!("hash.seed = {seed:?}"));
                }
            }
        }
        check(
            &mut self.index.speculative_ttl_ms,
            s.speculative_ttl_ms.as_ref(),
            &explicit.speculative_ttl_ms,
            "index.speculative_ttl_ms",
            &mut applied,
        )
        .map_err(|(v, src)| clash("speculativeTTL (ms)", &v, &src, "lifetime of speculative entries"))?;
        check(
            &mut self.ingest.topic_filter,
            s.topic_filter.as_ref(),
            &explicit.topic_filter,
            "ingest.topic_filter",
            &mut applied,
        )
        .map_err(|(v, src)| {
            clash("kvEventsConfig.topicFilter", &format!("{v:?}"), &src, "the KV-event topic prefix")
        })?;
        check(&mut self.ingest.workers, s.concurrency.as_ref(), &explicit.workers, "ingest.workers", &mut applied)
            .map_err(|(v, src)| clash("kvEventsConfig.concurrency", &v, &src, "event worker threads"))?;
        if let Some(ep) = &s.zmq_endpoint {
            match &explicit.bind {
                Some(src) if self.ingest.bind != [ep.clone()] => {
                    return Err(clash("kvEventsConfig.zmqEndpoint", ep, src, "where KV-event publishers connect"))
                }
                Some(_) => {}
                None => {
                    self.ingest.bind = vec![ep.clone()];
                    applied.push(format!("ingest.bind = [{ep}]"));
                }
            }
        }
        if let Some(d) = &s.discover_pods {
            if let Some(src) = &explicit.connect {
                return Err(clash("kvEventsConfig.discoverPods", &true, src, "who names the publishers to dial"));
            }
            if s.zmq_endpoint.is_none() && explicit.bind.is_none() {
                self.ingest.bind.clear();
            }
            for b in &self.backends {
                let pod = b.url().trim_end_matches('/').trim_start_matches("http://").to_string();
                if self.ingest.connect.iter().any(|t| t.pod == pod) {
                    continue; // its own `zmq:` endpoint is dialled already
                }
                let host = pod.rsplit_once(':').map_or(pod.as_str(), |x| x.0).to_string();
                let replay = d.replay_port.map(|p| format!("tcp://{host}:{p}"));
                let endpoint = format!("tcp://{host}:{}", d.socket_port);
                applied.push(format!("ingest.connect += {pod}={endpoint}"));
                self.ingest.connect.push(kvroute_ingest::DialTarget { pod, endpoint, replay });
            }
        }
        Ok(applied)
    }
}

/// (De)serialises a `FromStr + Display` value as a string.
mod as_str {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        T::from_str(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_overrides_defaults_and_rejects_unknown_keys() {
        let c: ServeConfig = serde_yaml::from_str(
            "listen: 127.0.0.1:9000\nkey_mode: vllm\nhash: {algo: sha256_cbor, seed: '42', vllm_version: '0.30'}\n\
             ingest: {bind: [], connect: [{pod: 'a:1', endpoint: 'tcp://127.0.0.1:1'}]}\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.key_mode, KeyModeName::Vllm);
        assert_eq!(c.hash.algo, HashAlgo::Sha256Cbor);
        assert_eq!(c.hash.block_size, 16);
        assert!(c.ingest.bind.is_empty());
        assert_eq!(c.ingest.connect[0].replay, None);
        assert_eq!(c.index, IndexSection::default());
        let b: ServeConfig = serde_yaml::from_str(
            "backends: [http://a:1, {url: 'http://b:2', labels: {llm-d.ai/role: decode}, zmq: 'tcp://b:5557'}]",
        )
        .unwrap();
        assert_eq!(b.backends[0], BackendSpec::Url("http://a:1".into()));
        assert!(
            matches!(&b.backends[1], BackendSpec::Full { labels, zmq: Some(_), .. } if labels["llm-d.ai/role"] == "decode")
        );
        let l: ServeConfig = serde_yaml::from_str(
            "shutdown_grace_s: 600\nshutdown_delay_s: 5\nhttp: {max_concurrent_streams: 64}\n\
             ext_proc: {listen: 0.0.0.0:9002, max_connections: 16, keepalive_interval_ms: 0}\n",
        )
        .unwrap();
        assert_eq!((l.shutdown_grace_s, l.shutdown_delay_s), (600.0, 5.0));
        assert_eq!(l.http.max_concurrent_streams, 64);
        let g = l.ext_proc.limits();
        assert_eq!((g.max_connections, g.max_concurrent_streams, g.keepalive_interval), (16, 1024, None));
        assert_eq!(g.handshake_timeout, std::time::Duration::from_secs(10));
        assert_eq!(ServeConfig::default().shutdown_grace_s, 25.0, "below Kubernetes' default grace of 30 s");
        assert!(serde_yaml::from_str::<ServeConfig>("ext_proc: {max_conections: 1}").is_err());
        assert!(serde_yaml::from_str::<ServeConfig>("listne: x").is_err());
        assert!(serde_yaml::from_str::<ServeConfig>("hash: {algo: md5}").is_err());
    }

    #[test]
    fn epp_settings_apply_unless_an_explicit_setting_contradicts_them() {
        let s = kvroute_schedule::EppSettings {
            block_size: Some(64),
            hash_seed: Some("42".into()),
            topic_filter: Some("kv@".into()),
            zmq_endpoint: Some("tcp://*:5557".into()),
            concurrency: Some(4),
            speculative_ttl_ms: Some(1500),
            ..Default::default()
        };
        let mut c = ServeConfig::default();
        let applied = c.apply_epp(&s, &Explicit::default(), "epp.yaml").unwrap();
        assert_eq!((c.hash.block_size, c.hash.seed.as_deref(), c.ingest.workers), (64, Some("42"), 4));
        assert_eq!((c.ingest.topic_filter.as_str(), c.index.speculative_ttl_ms), ("kv@", 1500));
        assert_eq!(applied.len(), 6);
        // Explicitly the same: fine. Explicitly different: refused, naming both.
        let same = Explicit { block_size: Some("--block-size 64".into()), ..Default::default() };
        let mut c = ServeConfig { hash: HashSection { block_size: 64, ..Default::default() }, ..Default::default() };
        assert!(c.apply_epp(&s, &same, "epp.yaml").is_ok());
        let other = Explicit { block_size: Some("--block-size 16 was given".into()), ..Default::default() };
        let e = ServeConfig::default().apply_epp(&s, &other, "epp.yaml").unwrap_err().to_string();
        assert!(e.contains("tokenProcessorConfig.blockSize 64 but --block-size 16 was given"), "{e}");
        let seed = Explicit { hash_seed: Some("--hash-seed 7 was given".into()), ..Default::default() };
        let mut c =
            ServeConfig { hash: HashSection { seed: Some("7".into()), ..Default::default() }, ..Default::default() };
        assert!(c.apply_epp(&s, &seed, "f").unwrap_err().to_string().contains("hashSeed"));
        // discoverPods: dial every backend's publisher.
        let d = kvroute_schedule::EppSettings {
            discover_pods: Some(kvroute_schedule::DiscoverPods { socket_port: 5556, replay_port: Some(5559) }),
            ..Default::default()
        };
        let mut c =
            ServeConfig { backends: vec![BackendSpec::Url("http://10.0.0.1:8000".into())], ..Default::default() };
        c.apply_epp(&d, &Explicit::default(), "f").unwrap();
        assert!(c.ingest.bind.is_empty());
        assert_eq!(c.ingest.connect[0].endpoint, "tcp://10.0.0.1:5556");
        assert_eq!(c.ingest.connect[0].replay.as_deref(), Some("tcp://10.0.0.1:5559"));
    }
}
