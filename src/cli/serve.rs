//! `kvroute serve`: the router process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kvroute_api::{AppState, RequestKeys, SharedIndex};
use kvroute_index::{EventApplier, InMemoryIndex, IndexConfig, KeyMode, Pods};
use kvroute_ingest::{DialTarget, Ingestor, Metrics};
use kvroute_keys::{BlockHasher, HashAlgo, HashConfig, RequestKeyer, VllmVersion};

use crate::config::{Explicit, KeyModeName, ServeConfig};

/// Flags override the YAML file (`--config`), which overrides the defaults.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// YAML configuration file (same settings as the flags; see docs/configuration.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Bind a SUB socket here for vLLM publishers to connect to (repeatable)
    /// [default: tcp://*:5557, or the scheduler config's kvEventsConfig.zmqEndpoint].
    #[arg(long = "zmq-bind", value_name = "ENDPOINT")]
    zmq_bind: Vec<String>,
    /// A vLLM server to route to, `http://HOST:PORT` (repeatable); it is the pod `HOST:PORT`.
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    #[command(flatten)]
    discovery: super::fleet::DiscoveryArgs,
    #[command(flatten)]
    observe: super::observe::ObserveArgs,
    #[command(flatten)]
    record: super::record::RecordArgs,
    /// Tokenizer of a served model: NAME=DIR with tokenizer.json (+ tokenizer_config.json)
    /// (repeatable) [default: the built-in tokenizer, as `kvroute sim` uses].
    #[arg(long = "model", value_name = "NAME=DIR")]
    models: Vec<String>,
    /// An llm-d EndpointPickerConfig YAML: its scheduling profiles, plus the block size,
    /// hash seed and KV-event settings of its precise-prefix plugin (start is refused
    /// when they contradict a flag given) [default: kvroute's profile, which splits
    /// prefill/decode by predicted TTFT when pods are labelled llm-d.ai/role]. When a request
    /// is split the gateway prefills on the prefill pod, then decodes (config `pd.mode`).
    #[arg(long)]
    scheduler_config: Option<PathBuf>,
    /// A built-in policy instead: default, round-robin, random, llm-d, llm-d-approx,
    /// approximate, load-only, session-affinity, or a peer's — dynamo, dynamo-approx,
    /// sglang, smg, aibrix, prodstack (to A/B them on live traffic).
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    /// Health-probe and metric-scrape interval, ms [default: 1000].
    #[arg(long)]
    health_interval_ms: Option<u64>,
    /// Longest wait for tokenizing a prompt, ms; past it the request is routed on the
    /// approximate (text) prefix; 0 = never tokenize [default: 50].
    #[arg(long)]
    tokenize_deadline_ms: Option<u64>,
    /// Serve Envoy ext_proc (the Gateway API Inference Extension endpoint picker) here,
    /// e.g. 0.0.0.0:9002 [default: off].
    #[arg(long)]
    ext_proc_listen: Option<std::net::SocketAddr>,
    /// gRPC health service address, e.g. 0.0.0.0:9003 [default: off].
    #[arg(long)]
    grpc_health_listen: Option<std::net::SocketAddr>,
    /// Requests without a first byte per pod at which it takes no more; when every
    /// candidate is there, 429 [default: 512].
    #[arg(long)]
    max_queued_per_pod: Option<u32>,
    /// Where the block index lives: memory, or redis (shared by router replicas)
    /// [default: memory].
    #[arg(long, value_enum)]
    index_backend: Option<crate::config::IndexBackend>,
    /// Redis/Valkey URL of the shared index [default: redis://127.0.0.1:6379].
    #[arg(long)]
    redis_url: Option<String>,
    /// The shared index is a Redis/Valkey Cluster (--redis-url lists seed nodes,
    /// comma-separated).
    #[arg(long)]
    redis_cluster: bool,
    /// Shared index: each pod's events are written by one replica, elected by a Redis
    /// lease of this many ms (a pod's events pause this long when its writer dies)
    /// [default: 3000].
    #[arg(long)]
    redis_writer_lease_ms: Option<u64>,
    /// Do not bind any SUB socket (dial mode only).
    #[arg(long, conflicts_with = "zmq_bind")]
    no_zmq_bind: bool,
    /// Dial a pod's publisher: `POD=tcp://HOST:PORT[,replay=tcp://HOST:PORT]`
    /// (repeatable). POD is the pod's identity, e.g. its `host:port`.
    #[arg(long = "zmq-connect", value_name = "POD=ENDPOINT", value_parser = parse_dial)]
    zmq_connect: Vec<DialTarget>,
    /// Topic prefix the bound socket subscribes to [default: "" = all, or the scheduler
    /// config's kvEventsConfig.topicFilter].
    #[arg(long)]
    topic_filter: Option<String>,
    /// Bind mode: each pod's replay endpoint is tcp://<pod host>:<PORT> [default: none].
    #[arg(long)]
    replay_port: Option<u16>,
    /// Data-parallel ranks per pod; rank r's endpoints are the base port + r [default: 1].
    #[arg(long)]
    data_parallel_size: Option<u16>,
    /// How blocks are keyed: `request` (hash event token ids; works with any engine hash
    /// settings) or `vllm` (index vLLM's own hashes) [default: request].
    #[arg(long, value_enum)]
    key_mode: Option<KeyModeName>,
    /// Tokens per block, as vLLM's --block-size [default: 16, or the scheduler config's
    /// tokenProcessorConfig.blockSize].
    #[arg(long)]
    block_size: Option<usize>,
    /// vLLM's --prefix-caching-hash-algo (key-mode vllm) [default: sha256].
    #[arg(long)]
    hash_algo: Option<HashAlgo>,
    /// The servers' PYTHONHASHSEED (key-mode vllm) [default: unset, or the scheduler config's
    /// tokenProcessorConfig.hashSeed].
    #[arg(long)]
    hash_seed: Option<String>,
    /// vLLM release of the servers (key-mode vllm) [default: 0.33.0].
    #[arg(long)]
    vllm_version: Option<VllmVersion>,
    /// Index capacity in (block, pod) entries before LRU eviction [default: 16777216].
    #[arg(long)]
    capacity: Option<usize>,
    /// Lifetime of speculative index entries, ms [default: 2000, or the scheduler config's
    /// speculativeTTL].
    #[arg(long)]
    speculative_ttl_ms: Option<u64>,
    /// Event worker threads [default: 2, or the scheduler config's kvEventsConfig.concurrency].
    #[arg(long)]
    workers: Option<usize>,
    /// Messages queued per worker before dropping [default: 65536].
    #[arg(long)]
    queue_capacity: Option<usize>,
    // Upstream timeouts (gateway → pods; `upstream.*`; 0 = no limit).
    /// TCP connect timeout to a pod, ms; past it the next pod is tried; 0 = no limit
    /// [default: 5000].
    #[arg(long)]
    upstream_connect_timeout_ms: Option<u64>,
    /// Request sent → first response byte, ms; past it the next pod is tried while nothing
    /// reached the client, else 504; covers a whole non-streaming generation; 0 = no limit
    /// [default: 120000].
    #[arg(long)]
    upstream_first_byte_timeout_ms: Option<u64>,
    /// Longest gap between two response chunks, ms; past it a stream ends with an SSE
    /// error event; 0 = no limit [default: 60000].
    #[arg(long)]
    upstream_idle_timeout_ms: Option<u64>,
    /// Whole request (retries included), ms; past it 504 or, mid-stream, an SSE error
    /// event; 0 = no limit [default: 600000].
    #[arg(long)]
    upstream_timeout_ms: Option<u64>,

    // ---- KV-event integrity (config file: the `ingest:` section) ----
    /// Events whose topic names a pod that is not a --backend, --zmq-connect pod or
    /// --zmq-known-pod: auto (drop them when backends or dial targets are given, else
    /// accept), drop, or accept (any pod; no replay for them) [default: auto].
    #[arg(long, value_name = "auto|drop|accept")]
    zmq_unknown_pods: Option<kvroute_ingest::UnknownPods>,
    /// A pod (`host:port`, as in topics) whose events are accepted besides the backends
    /// (repeatable); with --replay-port its host is replayed from.
    #[arg(long = "zmq-known-pod", value_name = "POD")]
    zmq_known_pods: Vec<String>,
    /// Largest ZMQ frame accepted, bytes: a bigger one drops the publisher's connection
    /// [default: 16777216].
    #[arg(long)]
    zmq_max_frame_bytes: Option<usize>,
    /// Most events in one batch; bigger batches are dropped [default: 65536].
    #[arg(long)]
    zmq_max_batch_events: Option<usize>,
    /// Replays running at once [default: 4].
    #[arg(long)]
    zmq_replay_concurrency: Option<usize>,
    /// Source address or network allowed to publish to the bound SUB sockets, e.g.
    /// 10.0.0.0/8 (repeatable) [default: any].
    #[arg(long = "zmq-allow-source", value_name = "IP[/PREFIX]")]
    zmq_allow_sources: Vec<String>,
    /// CurveZMQ on the bound SUB sockets: file with their secret key (Z85, 40 characters)
    /// [default: off].
    #[arg(long, value_name = "FILE")]
    zmq_curve_secret_key_file: Option<PathBuf>,
    /// A publisher public key (Z85) allowed with CurveZMQ (repeatable) [default: any key].
    /// Z85 keys may start with `-`, so the value is never read as a flag.
    #[arg(long = "zmq-curve-allow", value_name = "KEY", allow_hyphen_values = true)]
    zmq_curve_allow: Vec<String>,
    // Listeners: the admin surface, client limits, TLS (docs/security.md).
    /// Admin listener for /v1/kv/score, /v1/kv/pods, /v1/route/explain and /metrics (the
    /// serving port answers them 404); `off` for none [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR|off", value_parser = parse_admin_listen)]
    admin_listen: Option<AdminListen>,
    /// Serve the admin routes on the serving port (--listen) too.
    #[arg(long)]
    admin_on_serving_port: bool,
    /// Serve POST /reset_prefix_cache on the serving port too, without the token (as vLLM
    /// does in dev mode; for benchmark fleets, e.g. aiperf's --reset-kv-cache).
    #[arg(long)]
    reset_on_serving_port: bool,
    /// File holding the bearer token the admin routes require (`Authorization: Bearer …`);
    /// without it, the KVROUTE_ADMIN_TOKEN environment variable [default: no token].
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// A request head must be complete this long after the connection opened (or after the
    /// first byte of a kept-alive connection's next request), ms [default: 10000].
    #[arg(long)]
    header_timeout_ms: Option<u64>,
    /// A client connection with no request in flight and nothing received this long is
    /// closed, ms [default: 60000].
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// Client connections served on the serving port [default: 8192].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections accepted beyond --max-connections that get only /health (503 with
    /// Retry-After for the rest) [default: 64].
    #[arg(long)]
    reserve_connections: Option<usize>,
    /// Largest request head (request line + headers), bytes; larger: 431 [default: 65536].
    #[arg(long)]
    max_header_bytes: Option<usize>,
    /// HTTP/2 (h2c) streams at once on one client connection; each beyond a connection's
    /// first also takes a --max-connections slot [default: 128].
    #[arg(long)]
    max_concurrent_streams: Option<u32>,
    /// PEM certificate chain: serve HTTPS on --listen and --admin-listen (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve --ext-proc-listen and --grpc-health-listen over TLS too (with --tls-cert).
    #[arg(long)]
    tls_grpc: bool,
    /// Connections served by each gRPC listener (ext_proc, gRPC health); beyond, new ones
    /// are closed at once [default: 1024].
    #[arg(long)]
    ext_proc_max_connections: Option<usize>,
    /// gRPC calls at once on one connection (HTTP/2 max concurrent streams) [default: 1024].
    #[arg(long)]
    ext_proc_max_concurrent_streams: Option<u32>,
    /// A gRPC connection's first call must start within this of its accept, ms
    /// [default: 10000].
    #[arg(long)]
    ext_proc_handshake_timeout_ms: Option<u64>,
    /// HTTP/2 PING on a gRPC connection after this long without traffic, ms; 0 = none
    /// [default: 30000].
    #[arg(long)]
    ext_proc_keepalive_interval_ms: Option<u64>,
    /// A PING unanswered this long closes the gRPC connection (dead peer), ms [default: 10000].
    #[arg(long)]
    ext_proc_keepalive_timeout_ms: Option<u64>,
    // Shutdown (SIGTERM/SIGINT): docs/configuration.md "Shutdown".
    /// Seconds requests in flight may take to finish after SIGTERM/SIGINT (the delay
    /// included); then they are cut and the process exits 0 [default: 25].
    #[arg(long, value_name = "SECONDS")]
    shutdown_grace: Option<f64>,
    /// Seconds between SIGTERM/SIGINT (readiness turns false at once) and closing the
    /// listeners, for load balancers to notice first [default: 0].
    #[arg(long, value_name = "SECONDS")]
    shutdown_delay: Option<f64>,
}

/// `--admin-listen`: an address, or `off`.
#[derive(Clone, Debug)]
struct AdminListen(Option<std::net::SocketAddr>);

fn parse_admin_listen(s: &str) -> Result<AdminListen, String> {
    match s {
        "off" | "none" => Ok(AdminListen(None)),
        _ => s.parse().map(|a| AdminListen(Some(a))).map_err(|e| format!("expected ADDR:PORT or off: {e}")),
    }
}

fn parse_dial(s: &str) -> Result<DialTarget, String> {
    let (pod, rest) = s.split_once('=').ok_or_else(|| format!("expected POD=ENDPOINT, got {s:?}"))?;
    let mut parts = rest.split(',');
    let endpoint = parts.next().unwrap_or_default().to_string();
    let mut replay = None;
    for p in parts {
        match p.split_once('=') {
            Some(("replay", ep)) => replay = Some(ep.to_string()),
            _ => return Err(format!("unknown option {p:?} in {s:?} (expected replay=ENDPOINT)")),
        }
    }
    if pod.is_empty() || !endpoint.contains("://") {
        return Err(format!("expected POD=tcp://HOST:PORT, got {s:?}"));
    }
    Ok(DialTarget { pod: pod.to_string(), endpoint, replay })
}

impl ServeArgs {
    /// The effective configuration.
    pub fn config(&self) -> anyhow::Result<ServeConfig> {
        let mut c = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
                serde_yaml::from_str(&text).with_context(|| format!("invalid configuration in {}", p.display()))?
            }
            None => ServeConfig::default(),
        };
        // A given flag overrides; `some`: for settings that are themselves optional.
        macro_rules! set {
            ($flag:expr, $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
            (some $flag:expr, $field:expr) => {
                if $flag.is_some() {
                    $field = $flag.clone();
                }
            };
        }
        set!(self.listen, c.listen);
        set!(self.key_mode, c.key_mode);
        set!(self.block_size, c.hash.block_size);
        set!(self.hash_algo, c.hash.algo);
        set!(self.vllm_version, c.hash.vllm_version);
        set!(self.capacity, c.index.capacity);
        set!(self.speculative_ttl_ms, c.index.speculative_ttl_ms);
        set!(self.topic_filter, c.ingest.topic_filter);
        set!(self.data_parallel_size, c.ingest.data_parallel_size);
        set!(self.workers, c.ingest.workers);
        set!(self.queue_capacity, c.ingest.queue_capacity);
        if !self.backends.is_empty() {
            c.backends = self.backends.iter().cloned().map(crate::config::BackendSpec::Url).collect();
        }
        self.discovery.apply(&mut c.discovery);
        self.observe.apply(&mut c.observability);
        self.record.apply(&mut c.record);
        for m in &self.models {
            let (name, dir) = m.split_once('=').with_context(|| format!("--model expects NAME=DIR, got {m:?}"))?;
            c.models.insert(name.to_string(), dir.into());
        }
        set!(some self.scheduler_config, c.scheduler_config);
        set!(some self.policy, c.policy);
        set!(self.health_interval_ms, c.health_interval_ms);
        set!(self.tokenize_deadline_ms, c.tokenize_deadline_ms);
        set!(some self.ext_proc_listen, c.ext_proc.listen);
        set!(some self.grpc_health_listen, c.ext_proc.health_listen);
        set!(self.max_queued_per_pod, c.saturation.max_queued_per_pod);
        set!(self.index_backend, c.index.backend);
        set!(self.redis_url, c.index.url);
        if self.redis_cluster {
            c.index.cluster = true;
        }
        set!(some self.redis_writer_lease_ms, c.index.writer_lease_ms);
        set!(some self.hash_seed, c.hash.seed);
        set!(some self.replay_port, c.ingest.replay_port);
        if self.no_zmq_bind {
            c.ingest.bind.clear();
        } else if !self.zmq_bind.is_empty() {
            c.ingest.bind = self.zmq_bind.clone();
        }
        if !self.zmq_connect.is_empty() {
            c.ingest.connect = self.zmq_connect.clone();
        }
        // Upstream timeouts.
        set!(self.upstream_connect_timeout_ms, c.upstream.connect_timeout_ms);
        set!(self.upstream_first_byte_timeout_ms, c.upstream.first_byte_timeout_ms);
        set!(self.upstream_idle_timeout_ms, c.upstream.idle_timeout_ms);
        set!(self.upstream_timeout_ms, c.upstream.total_timeout_ms);
        // KV-event integrity.
        set!(self.zmq_unknown_pods, c.ingest.unknown_pods);
        if !self.zmq_known_pods.is_empty() {
            c.ingest.known_pods = self.zmq_known_pods.clone();
        }
        set!(self.zmq_max_frame_bytes, c.ingest.max_frame_bytes);
        set!(self.zmq_max_batch_events, c.ingest.max_batch_events);
        set!(self.zmq_replay_concurrency, c.ingest.replay_concurrency);
        if !self.zmq_allow_sources.is_empty() {
            c.ingest.allow_sources = self.zmq_allow_sources.clone();
        }
        set!(some self.zmq_curve_secret_key_file, c.ingest.curve_secret_key_file);
        if !self.zmq_curve_allow.is_empty() {
            c.ingest.curve_allowed_keys = self.zmq_curve_allow.clone();
        }
        // Listeners.
        if let Some(AdminListen(a)) = &self.admin_listen {
            c.admin.listen = *a;
        }
        if self.admin_on_serving_port {
            c.admin.on_serving_port = true;
        }
        if self.reset_on_serving_port {
            c.admin.reset_on_serving_port = true;
        }
        set!(some self.admin_token_file, c.admin.token_file);
        set!(self.header_timeout_ms, c.http.header_timeout_ms);
        set!(self.idle_timeout_ms, c.http.idle_timeout_ms);
        set!(self.max_connections, c.http.max_connections);
        set!(self.reserve_connections, c.http.reserve_connections);
        set!(self.max_header_bytes, c.http.max_header_bytes);
        set!(self.max_concurrent_streams, c.http.max_concurrent_streams);
        if self.tls_cert.is_some() {
            c.tls.cert = self.tls_cert.clone();
            c.tls.key = self.tls_key.clone();
        }
        if self.tls_grpc {
            c.tls.grpc = true;
        }
        set!(self.ext_proc_max_connections, c.ext_proc.max_connections);
        set!(self.ext_proc_max_concurrent_streams, c.ext_proc.max_concurrent_streams);
        set!(self.ext_proc_handshake_timeout_ms, c.ext_proc.handshake_timeout_ms);
        set!(self.ext_proc_keepalive_interval_ms, c.ext_proc.keepalive_interval_ms);
        set!(self.ext_proc_keepalive_timeout_ms, c.ext_proc.keepalive_timeout_ms);
        set!(self.shutdown_grace, c.shutdown_grace_s);
        set!(self.shutdown_delay, c.shutdown_delay_s);
        Ok(c)
    }
}

impl ServeArgs {
    /// Which settings an llm-d scheduler config may not override: given as a flag, or
    /// present in the `--config` file.
    fn explicit(&self) -> anyhow::Result<Explicit> {
        let file: serde_yaml::Value = match &self.config {
            Some(p) => serde_yaml::from_str(&std::fs::read_to_string(p)?)?,
            None => serde_yaml::Value::Null,
        };
        let path = self.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let in_file = |section: &str, key: &str| {
            let v = file.get(section)?.get(key)?;
            let v = serde_yaml::to_string(v).unwrap_or_default();
            Some(format!("{section}.{key} is {} in {path}", v.trim()))
        };
        let flag = |name: &str, v: Option<String>| v.map(|v| format!("--{name} {v} was given"));
        Ok(Explicit {
            block_size: flag("block-size", self.block_size.map(|v| v.to_string()))
                .or_else(|| in_file("hash", "block_size")),
            hash_seed: flag("hash-seed", self.hash_seed.clone()).or_else(|| in_file("hash", "seed")),
            speculative_ttl_ms: flag("speculative-ttl-ms", self.speculative_ttl_ms.map(|v| v.to_string()))
                .or_else(|| in_file("index", "speculative_ttl_ms")),
            topic_filter: flag("topic-filter", self.topic_filter.as_ref().map(|v| format!("{v:?}")))
                .or_else(|| in_file("ingest", "topic_filter")),
            workers: flag("workers", self.workers.map(|v| v.to_string())).or_else(|| in_file("ingest", "workers")),
            bind: if self.no_zmq_bind {
                Some("--no-zmq-bind was given".into())
            } else {
                flag("zmq-bind", (!self.zmq_bind.is_empty()).then(|| self.zmq_bind.join(" ")))
                    .or_else(|| in_file("ingest", "bind"))
            },
            connect: (!self.zmq_connect.is_empty())
                .then(|| "--zmq-connect was given".to_string())
                .or_else(|| in_file("ingest", "connect")),
        })
    }
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = a.config()?;
    let kubernetes = cfg.discovery.mode == kvroute_discovery::Mode::Kubernetes;
    if kubernetes {
        cfg.discovery.kubernetes.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            cfg.backends.is_empty(),
            "discovery: kubernetes finds the backends; drop --backend / `backends:` (or use discovery: static)"
        );
        // Pods are known once discovered: others' events are held a while, then dropped.
        if cfg.ingest.unknown_pods == kvroute_ingest::UnknownPods::Auto {
            cfg.ingest.unknown_pods = kvroute_ingest::UnknownPods::Drop;
        }
        cfg.ingest.hold_unknown_ms.get_or_insert(10_000);
        // Dial mode needs no bound SUB socket unless one was asked for.
        if cfg.discovery.kubernetes.kv_events_port.is_some() && a.explicit()?.bind.is_none() {
            cfg.ingest.bind.clear();
        }
    }
    // Backends with their own KV-event endpoints are dialled under their pod identity.
    for b in &cfg.backends {
        if let crate::config::BackendSpec::Full { url, zmq: Some(ep), replay, .. } = b {
            let pod = url.trim_end_matches('/').trim_start_matches("http://").to_string();
            cfg.ingest.connect.push(DialTarget { pod, endpoint: ep.clone(), replay: replay.clone() });
        }
    }
    // Backends are known pods: their events are accepted on the bound sockets.
    for b in &cfg.backends {
        let pod = b.url().trim_end_matches('/').trim_start_matches("http://").to_string();
        if !cfg.ingest.known_pods.contains(&pod) {
            cfg.ingest.known_pods.push(pod);
        }
    }
    super::observe::init_logs(cfg.observability.log_format);
    // Readiness holds and the shutdown drain (kvroute_api::lifecycle): /ready answers 503
    // while a hold is out, e.g. `let synced = lifecycle.hold("discovery")` until discovery
    // has synced.
    let lifecycle = kvroute_api::lifecycle::Lifecycle::new();
    let shutdown = super::lifecycle::Shutdown::from_secs(cfg.shutdown_grace_s, cfg.shutdown_delay_s)?;
    // An llm-d EndpointPickerConfig (its settings checked against explicit ones before
    // anything uses them), a named policy, or the default.
    let profile = super::profile::load(&mut cfg, || a.explicit())?;
    let hash_cfg = HashConfig {
        algo: cfg.hash.algo,
        vllm_version: cfg.hash.vllm_version,
        seed: cfg.hash.seed.clone(),
        block_size: cfg.hash.block_size,
    };
    anyhow::ensure!(cfg.hash.block_size > 0, "block size must be at least 1");
    let (mode, keys) = match cfg.key_mode {
        KeyModeName::Request => {
            let k = RequestKeyer::new(cfg.hash.block_size, cfg.hash.seed.clone().unwrap_or_default());
            (KeyMode::Request(k.clone()), RequestKeys::Request(k))
        }
        KeyModeName::Vllm => {
            let h = BlockHasher::new(hash_cfg).context("key-mode vllm needs reproducible vLLM hashes")?;
            (KeyMode::Engine, RequestKeys::Vllm(h))
        }
    };
    let pods = Arc::new(Pods::new());
    let mut redis_index = None;
    let index: SharedIndex = match cfg.index.backend {
        crate::config::IndexBackend::Memory => Arc::new(InMemoryIndex::new(IndexConfig {
            capacity: cfg.index.capacity,
            speculative_ttl: Duration::from_millis(cfg.index.speculative_ttl_ms),
            ..Default::default()
        })),
        crate::config::IndexBackend::Redis => {
            let redis = kvroute_index_redis::RedisConfig {
                url: cfg.index.url.clone(),
                cluster: cfg.index.cluster,
                prefix: cfg.index.prefix.clone(),
                ttl: Duration::from_secs(cfg.index.ttl_s.max(1)),
                speculative_ttl: Duration::from_millis(cfg.index.speculative_ttl_ms),
                cache_ttl: Duration::from_millis(cfg.index.cache_ms),
                writer_lease: Duration::from_millis(cfg.index.writer_lease_ms.unwrap_or(3000).max(1)),
                replica_id: format!("{}#{}", cfg.listen, std::process::id()),
                ..Default::default()
            };
            let idx = kvroute_index_redis::RedisIndex::new(redis, pods.clone())
                .with_context(|| format!("index backend redis at {}", cfg.index.url))?;
            if idx.ping().is_none() {
                tracing::warn!(url = %cfg.index.url, "redis index not reachable yet; routing on the local view until it is");
            }
            let idx = Arc::new(idx);
            redis_index = Some(idx.clone());
            idx
        }
    };
    let applier = Arc::new(EventApplier::new(index, mode));
    let registry = prometheus::Registry::new();
    lifecycle.register(&registry)?;
    let metrics = Metrics::new(&registry)?;
    let ingestor = Ingestor::start(&cfg.ingest, applier.clone(), pods.clone(), metrics)
        .context("cannot start KV-event ingestion")?;
    // Rebuild before serving: replay what dialled pods have buffered (HTTP, and so
    // /health, only comes up afterwards).
    if cfg.ingest.connect.iter().any(|t| t.replay.is_some()) {
        let (n, batches) = Ingestor::replay_dial_targets(&cfg.ingest, &applier, &pods, None);
        tracing::info!(pods = n, batches, "replayed buffered KV events before serving");
    }
    if let Some(idx) = redis_index {
        let resync = ingestor.resync_handle();
        // Taking over a pod's writer lease: replay what the previous writer may have
        // missed (dialled pods at once; bound pods with their next message).
        let on_lease = ingestor.resync_handle();
        let (ingest_cfg, applier2, pods2) = (cfg.ingest.clone(), applier.clone(), pods.clone());
        idx.on_lease_acquired(move |pod| {
            on_lease();
            let (c, a, p, pod) = (ingest_cfg.clone(), applier2.clone(), pods2.clone(), pod.to_string());
            std::thread::spawn(move || {
                let (_, batches) = Ingestor::replay_dial_targets(&c, &a, &p, Some(&pod));
                tracing::info!(%pod, batches, "replayed after taking the writer lease");
            });
        });
        let up = prometheus::IntGauge::new("kvroute_index_redis_up", "1 while the shared Redis index answers")?;
        let errors = prometheus::IntGauge::new("kvroute_index_redis_errors", "Failed Redis index calls so far")?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        // Poll Redis; when it comes back after an outage, rebuild the shared index by
        // replaying every pod's buffered events.
        let (ingest_cfg3, applier3, pods3) = (cfg.ingest.clone(), applier.clone(), pods.clone());
        std::thread::spawn(move || {
            let mut was_up = true;
            loop {
                let now_up = idx.ping().is_some();
                idx.maintain_leases();
                up.set(now_up as i64);
                errors.set(idx.errors() as i64);
                if now_up && !was_up {
                    tracing::info!("redis index back: replaying every pod's buffered events");
                    resync();
                    let (_, batches) = Ingestor::replay_dial_targets(&ingest_cfg3, &applier3, &pods3, None);
                    tracing::info!(batches, "replayed dialled pods into the shared index");
                }
                was_up = now_up;
                std::thread::sleep(Duration::from_millis(250));
            }
        });
    }
    let keys = Arc::new(keys);
    let mut tokenizers: std::collections::HashMap<String, Box<dyn kvroute_tokenize::Tokenizer>> = Default::default();
    for (name, dir) in &cfg.models {
        let t = kvroute_tokenize::load(Some(dir)).with_context(|| format!("tokenizer of model {name}"))?;
        tokenizers.insert(name.clone(), t);
    }
    let mut backends = Vec::new();
    for spec in &cfg.backends {
        let url = spec.url();
        anyhow::ensure!(url.starts_with("http://"), "a backend must be http://HOST:PORT, got {url:?}");
        let name = url.trim_end_matches('/').trim_start_matches("http://");
        let b = kvroute_gateway::Backend::new(url, pods.intern(name)?);
        if let crate::config::BackendSpec::Full { labels, .. } = spec {
            *b.labels.write() = labels.clone();
        }
        backends.push(Arc::new(b));
    }
    let pool = Arc::new(kvroute_gateway::Pool::new(backends));
    let control = ingestor.control();
    let mut gateway =
        kvroute_gateway::Gateway::new(pool.clone(), profile, applier.clone(), keys.clone(), tokenizers, &registry)?;
    gateway.tokenize_deadline = Duration::from_millis(cfg.tokenize_deadline_ms);
    gateway.set_lifecycle(lifecycle.clone());
    gateway.set_timeouts(cfg.upstream.timeouts());
    gateway.pd_mode = cfg.pd.mode.gateway_mode();
    gateway.configure_attribution(cfg.observability.hit_attribution, cfg.observability.recent_decisions);
    super::record::start(&cfg, &registry, &mut gateway)?;
    gateway.saturation = kvroute_gateway::Saturation {
        max_queued_per_pod: cfg.saturation.max_queued_per_pod,
        queue_depth: cfg.saturation.queue_depth,
        kv_cache_utilization: cfg.saturation.kv_cache_utilization,
    };
    let gateway = kvroute_gateway::pod_metrics::shared(gateway, &registry)?;
    let block_mismatch = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "kvroute_pod_block_size_mismatch",
            "1 while the pod's vllm:cache_config_info{block_size} differs from kvroute's block size",
        ),
        &["pod"],
    )?;
    registry.register(Box::new(block_mismatch.clone()))?;
    let ext_proc = match cfg.ext_proc.listen {
        Some(_) => Some(kvroute_extproc::ExtProc::new(gateway.clone(), &registry)?),
        None => None,
    };
    let listen_metrics = kvroute_api::listen::ListenMetrics::new(&registry)?;
    let tls = cfg.tls.acceptor()?;
    let serving = kvroute_api::listen::Listener::new("serving", &cfg.http, tls.clone(), listen_metrics.clone())?;
    let admin_token = cfg.admin.token()?;
    let discovery_registry = registry.clone();
    let state = Arc::new(AppState::new(applier, pods, keys, Some(ingestor), registry)?);
    // A pod rejoining the rotation keeps its index entries only if its KV events went on
    // in sequence while it was out (kvroute_gateway::recovery).
    let st = state.clone();
    gateway.recovery.set_marker(Box::new(move |pod| {
        let s = st.ingestor.as_ref()?.pod_status(|_| 0).into_iter().find(|s| s.pod == pod)?;
        Some(kvroute_gateway::recovery::StreamMark { last_seq: s.last_seq, restarts: s.restarts })
    }));
    let (pods2, ranks) = (state.pods.clone(), cfg.ingest.data_parallel_size);
    gateway.recovery.set_rank_pods(Box::new(move |name| {
        (1..ranks).filter_map(|r| pods2.get(&kvroute_ingest::rank_pod(name, r.into()))).collect()
    }));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let open = listen_metrics.clone();
        super::lifecycle::handle_signals(lifecycle.clone(), shutdown, move || open.open_connections())?;
        let listener =
            kvroute_api::listen::bind(cfg.listen).with_context(|| format!("cannot listen on {}", cfg.listen))?;
        tracing::info!(
            listen = %cfg.listen,
            bind = ?cfg.ingest.bind,
            dial = cfg.ingest.connect.len(),
            key_mode = ?cfg.key_mode,
            "kvroute serving"
        );
        let reconciler = super::fleet::Reconciler {
            pool: pool.clone(),
            gateway: gateway.clone(),
            pods: state.pods.clone(),
            control: control.clone(),
            replay_wait: Duration::from_millis(cfg.ingest.replay_total_timeout_ms),
        };
        // (Held while serving: dropping it stops the watches.)
        let _discovery = match kubernetes {
            true => Some(reconciler.start(&cfg.discovery.kubernetes, &discovery_registry).await?),
            false => None,
        };
        pool.spawn_probes(gateway.client.clone(), Duration::from_millis(cfg.health_interval_ms.max(50)));
        watch_block_sizes(pool.clone(), block_mismatch, cfg.hash.block_size, cfg.health_interval_ms.max(50));
        let mut tasks = super::grpc::spawn(&cfg, ext_proc, &lifecycle, &listen_metrics).await?;
        let app = kvroute_api::router(state).merge(kvroute_gateway::router(gateway));
        let lc = lifecycle.clone();
        tasks.extend(serve_http(listener, app, serving, tls, &cfg, admin_token, listen_metrics.clone(), &lc)?);
        let open = || listen_metrics.open_connections();
        super::lifecycle::until_drained(lifecycle, shutdown.grace, tasks, open).await;
        anyhow::Ok(())
    })?;
    // Drained (or the grace is over): exit now, without tearing down the ingest threads,
    // ZMQ sockets and index one by one (nothing of them needs to outlive the process).
    std::process::exit(0)
}

/// The serving port (OpenAI routes, /health, and the admin routes if asked) and the admin
/// listener, each under its client limits (`kvroute_api::listen`) and closing with the
/// lifecycle (their tasks end once their connections have finished). Connections set
/// TCP_NODELAY: small streamed chunks (SSE) go out at once instead of waiting ~40 ms for
/// Nagle + delayed ACK.
#[allow(clippy::too_many_arguments)]
fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    serving: kvroute_api::listen::Listener,
    tls: Option<kvroute_api::listen::TlsAcceptor>,
    cfg: &ServeConfig,
    token: Option<String>,
    metrics: kvroute_api::listen::ListenMetrics,
    lc: &Arc<kvroute_api::lifecycle::Lifecycle>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use kvroute_api::admin::{gated, Gate};
    let admin_here = cfg.admin.on_serving_port;
    let nofile = kvroute_api::listen::raise_nofile_limit();
    let admin_max = 256;
    // A proxied request holds two descriptors: the client's connection and the upstream one
    // (the soak ran out at 2 × 9,990 streams under a hard limit of 20,000).
    let wanted = (2 * cfg.http.max_connections + cfg.http.reserve_connections + admin_max + 1024) as u64;
    if nofile < wanted {
        tracing::warn!(
            nofile,
            wanted,
            "the open-files limit is below 2 × max_connections + reserve_connections + 1280 (each proxied \
             request holds a client and an upstream socket; admin, probes, events): raise it (ulimit -n) or \
             lower --max-connections"
        );
    }
    let mut tasks = Vec::new();
    if let Some(addr) = cfg.admin.listen {
        let l = kvroute_api::listen::bind(addr)
            .with_context(|| format!("cannot listen on {addr} (admin; --admin-listen off for none)"))?;
        let limits = kvroute_api::listen::ClientLimits {
            max_connections: admin_max,
            reserve_connections: 0,
            ..cfg.http.clone()
        };
        let admin = kvroute_api::listen::Listener::new("admin", &limits, tls, metrics)?;
        let app = gated(app.clone(), Gate { admin: true, public: false, token: token.clone(), public_reset: false });
        tracing::info!(%addr, token = token.is_some(), "admin routes serving");
        tasks.push(tokio::spawn(admin.serve(l, app, lc.closing())));
    }
    let public_reset = cfg.admin.reset_on_serving_port;
    let app = gated(app, Gate { admin: admin_here, public: true, token, public_reset });
    tasks.push(tokio::spawn(serving.serve(listener, app, lc.closing())));
    Ok(tasks)
}

/// Compares each pod's scraped block size with kvroute's: a gauge per pod, and one warning
/// each time a pod starts to differ (its blocks would never match kvroute's keys).
fn watch_block_sizes(pool: Arc<kvroute_gateway::Pool>, gauge: prometheus::IntGaugeVec, ours: usize, every_ms: u64) {
    tokio::spawn(async move {
        let mut warned = std::collections::HashSet::new();
        loop {
            for b in pool.backends().iter() {
                let Some(theirs) = b.block_size() else { continue };
                let differs = theirs != ours as u64;
                gauge.with_label_values(&[b.name.as_str()]).set(differs as i64);
                if differs && warned.insert(b.name.clone()) {
                    tracing::warn!(
                        pod = %b.name,
                        "pod reports block size {theirs} (vllm:cache_config_info) but kvroute's is {ours}: \
                         its KV events will not match requests; set --block-size (or the scheduler config's \
                         tokenProcessorConfig.blockSize) to the servers' --block-size"
                    );
                } else if !differs {
                    warned.remove(&b.name);
                }
            }
            tokio::time::sleep(Duration::from_millis(every_ms)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_targets_parse() {
        let d = parse_dial("10.0.0.1:8000=tcp://10.0.0.1:5557,replay=tcp://10.0.0.1:5558").unwrap();
        assert_eq!(d.pod, "10.0.0.1:8000");
        assert_eq!(d.endpoint, "tcp://10.0.0.1:5557");
        assert_eq!(d.replay.as_deref(), Some("tcp://10.0.0.1:5558"));
        assert!(parse_dial("tcp://x:1").is_err());
        assert!(parse_dial("p=tcp://x:1,foo=bar").is_err());
    }

    #[test]
    fn a_z85_key_starting_with_a_hyphen_is_a_value() {
        use clap::Parser;
        let cli =
            crate::cli::Cli::try_parse_from(["kvroute", "serve", "--zmq-curve-allow", "-^x", "--zmq-curve-allow=-y"]);
        let Ok(crate::cli::Cli { command: crate::cli::Command::Serve(a) }) = cli else { panic!("{cli:?}") };
        assert_eq!(a.zmq_curve_allow, ["-^x", "-y"]);
    }
}
