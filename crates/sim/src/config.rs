//! `kvroute sim` flags, latency profiles and vLLM's `--kv-events-config`.

use std::time::Duration;

use clap::{Args, ValueEnum};
use kvroute_keys::{HashAlgo, VllmVersion};
use serde::Deserialize;

/// Latency figures of a deployment (model time).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latency {
    pub prefill_overhead: Duration,
    pub prefill_per_token: Duration,
    pub inter_token: Duration,
    pub kv_transfer_per_token: Duration,
    /// Slowdown at full batch (`max_num_seqs` running): f = 1 + (this − 1)·(running − 1)/(max − 1).
    pub load_factor: f64,
    pub max_num_seqs: usize,
    /// GPU time per prompt token inside a batched step (continuous-batching model): the
    /// profile's prefill throughput at full batch, `prefill_per_token × load_factor ÷
    /// max_num_seqs`, so both models saturate at the same prefill rate.
    pub batched_prefill_per_token: Duration,
}

/// Latency profiles (llm-d simulator's published profiles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// Llama-3-8B on one H100: ITL 12 ms, overhead 30 ms, prefill 250 µs/token, 16 seqs
    /// (batched prefill 31 µs/token: 32 K tokens/s).
    #[default]
    #[value(name = "8b-h100")]
    B8H100,
    /// 70B with TP8: ITL 25 ms, overhead 80 ms, prefill 500 µs/token, 64 seqs.
    #[value(name = "70b-tp8")]
    B70Tp8,
    /// 3B on an L40S: ITL 15 ms, overhead 20 ms, prefill 350 µs/token, 4 seqs.
    #[value(name = "3b-l40s")]
    B3L40s,
}

impl Profile {
    /// KV-cache bytes per token on one GPU (bf16 K and V, every layer, the model's KV
    /// heads ÷ tensor parallelism), for `vllm:nixl_bytes_transferred`: Llama-3-8B 32 layers
    /// × 8 heads × 128 × 2 × 2 B; 70B 80 layers × (8 ÷ 8) heads; Llama-3.2-3B 28 layers × 8
    /// heads.
    pub fn kv_bytes_per_token(self) -> u64 {
        match self {
            Profile::B8H100 => 32 * 8 * 128 * 4,
            Profile::B70Tp8 => 80 * 128 * 4,
            Profile::B3L40s => 28 * 8 * 128 * 4,
        }
    }

    pub fn latency(self) -> Latency {
        let (itl, ovh, pre, xfer, f, seqs) = match self {
            Profile::B8H100 => (12_000, 30_000, 250, 3, 2.0, 16),
            Profile::B70Tp8 => (25_000, 80_000, 500, 8, 3.0, 64),
            Profile::B3L40s => (15_000, 20_000, 350, 12, 1.5, 4),
        };
        Latency {
            prefill_overhead: Duration::from_micros(ovh),
            prefill_per_token: Duration::from_micros(pre),
            inter_token: Duration::from_micros(itl),
            kv_transfer_per_token: Duration::from_micros(xfer),
            load_factor: f,
            max_num_seqs: seqs,
            batched_prefill_per_token: Duration::from_nanos((pre as f64 * 1e3 * f / seqs as f64) as u64),
        }
    }
}

/// Event encoding (vLLM ≤ 0.23 arrays, ≥ 0.24 maps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum EventFormat {
    Array,
    #[default]
    Map,
}

/// vLLM's `--kv-events-config` JSON (its own keys and defaults).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct KvEventsConfig {
    pub enable_kv_cache_events: bool,
    pub publisher: String,
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub buffer_steps: usize,
    pub hwm: i32,
    pub max_queue_size: usize,
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enable_kv_cache_events: false,
            publisher: "null".into(),
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

fn parse_kv_events(s: &str) -> Result<KvEventsConfig, String> {
    serde_json::from_str(s).map_err(|e| format!("invalid --kv-events-config JSON: {e}"))
}

#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// HTTP port.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// HTTP bind host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Served model name.
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    /// LoRA adapters served on top of the model: NAME=PATH (repeatable).
    #[arg(long = "lora-modules", value_name = "NAME=PATH")]
    pub lora_modules: Vec<String>,
    /// Model directory with `tokenizer.json` (+ `tokenizer_config.json` for the chat
    /// template), as the router uses [default: the built-in deterministic tokenizer].
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// LoRA adapters resident at once (reported in `vllm:lora_requests_info`).
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// This pod's identity, sent as `x-inference-pod` [default: $POD_NAME, else HOST:PORT].
    #[arg(long)]
    pub pod_name: Option<String>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV cache capacity in blocks (default: room for ~1 M tokens at block size 16).
    #[arg(long, default_value_t = 65_536)]
    pub num_gpu_blocks: usize,
    /// Longest prompt + output accepted.
    #[arg(long, default_value_t = 32_768)]
    pub max_model_len: usize,
    /// vLLM's --prefix-caching-hash-algo.
    #[arg(long, default_value = "sha256")]
    pub hash_algo: HashAlgo,
    /// Hash seed; defaults to $PYTHONHASHSEED as vLLM reads it (unset = vLLM's rule).
    #[arg(long)]
    pub hash_seed: Option<String>,
    /// vLLM release to imitate (hashing rules).
    #[arg(long, default_value_t = VllmVersion::LATEST)]
    pub vllm_version: VllmVersion,
    /// vLLM's --kv-events-config JSON, e.g.
    /// '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:5557","topic":"kv@POD@MODEL"}'.
    #[arg(long, value_parser = parse_kv_events)]
    pub kv_events_config: Option<KvEventsConfig>,
    /// KV-event encoding: array (vLLM ≤ 0.23) or map (≥ 0.24).
    #[arg(long, value_enum, default_value_t = EventFormat::Map)]
    pub event_format: EventFormat,
    /// Data-parallel rank stamped on events (endpoints are offset by it).
    #[arg(long, default_value_t = 0)]
    pub data_parallel_rank: u16,
    /// Latency profile.
    #[arg(long, value_enum, default_value_t = Profile::B8H100)]
    pub profile: Profile,
    /// Overrides: concurrent sequences (profile's by default).
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Requests allowed to wait for a slot; beyond, 429.
    #[arg(long, default_value_t = 1000)]
    pub max_waiting: usize,
    /// Overrides: inter-token latency in µs.
    #[arg(long)]
    pub inter_token_latency_us: Option<u64>,
    /// Overrides: prefill overhead in µs.
    #[arg(long)]
    pub prefill_overhead_us: Option<u64>,
    /// Overrides: prefill time per uncached prompt token in µs.
    #[arg(long)]
    pub prefill_per_token_us: Option<u64>,
    /// Divide every delay by N (reported metrics stay in model time).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Output tokens when a request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: usize,
    /// Percentage of requests that fail with 503 (failure injection).
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Test knob: every stream sends this many tokens, then stalls (no more data, the
    /// connection held open until the client leaves) [default: off].
    #[arg(long)]
    pub stall_after_tokens: Option<usize>,
    /// P/D (NixlConnector): the host a prefill reply names in `kv_transfer_params.remote_host`
    /// for decoders to read from [default: --host, or $POD_IP when --host is a wildcard
    /// address, else 127.0.0.1]. The side channel is this server's own HTTP port.
    #[arg(long)]
    pub kv_transfer_host: Option<String>,
    /// P/D: seconds a prefill reply's blocks stay pinned for the decoder's read before they
    /// are released to the cache's LRU (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT); model time,
    /// divided by --speedup like every delay.
    #[arg(long, default_value_t = 480.0)]
    pub kv_transfer_timeout_s: f64,
    /// Seconds during which every endpoint answers 503 (startup).
    #[arg(long, default_value_t = 0.0)]
    pub startup_delay: f64,
    /// Seed of the generated text and the failure injection [default: random per process,
    /// as vLLM's sampling is]. A request's own `seed` field fixes its text on any pod.
    /// Response ids are unique either way.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SimArgs {
    pub fn latency(&self) -> Latency {
        let mut l = self.profile.latency();
        if let Some(n) = self.max_num_seqs {
            l.max_num_seqs = n.max(1);
        }
        if let Some(v) = self.inter_token_latency_us {
            l.inter_token = Duration::from_micros(v);
        }
        if let Some(v) = self.prefill_overhead_us {
            l.prefill_overhead = Duration::from_micros(v);
        }
        if let Some(v) = self.prefill_per_token_us {
            l.prefill_per_token = Duration::from_micros(v);
        }
        l
    }

    /// The host named in `remote_host` (see `--kv-transfer-host`).
    pub fn kv_transfer_host(&self) -> String {
        if let Some(h) = &self.kv_transfer_host {
            return h.clone();
        }
        match self.host.as_str() {
            "0.0.0.0" | "::" | "[::]" | "" => {
                std::env::var("POD_IP").ok().filter(|ip| !ip.is_empty()).unwrap_or_else(|| "127.0.0.1".into())
            }
            h => h.to_string(),
        }
    }

    pub fn pod(&self) -> String {
        self.pod_name
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .unwrap_or_else(|| format!("{}:{}", self.host, self.port))
    }
}
