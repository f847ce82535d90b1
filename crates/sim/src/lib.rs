//! # kvroute-sim — a vLLM-compatible model-server simulator
//!
//! Behaves on the wire like `vllm serve --enable-prefix-caching --kv-events-config …`:
//! the OpenAI API (completions and chat, streamed as SSE with vLLM's incremental
//! detokenization), `/v1/models`, `/tokenize`, `/detokenize`, `/version`,
//! `/reset_prefix_cache`, `/health`, `/metrics` with vLLM's metric names; a prefix cache
//! whose blocks are hashed exactly as vLLM hashes them (`kvroute-keys`), ref-counted while in use and evicted
//! least-recently-freed first; KV events over ZMQ in vLLM's framing and encodings, with a
//! replay endpoint; a latency model in model time (`--speedup` divides the real delays);
//! both P/D roles as vLLM's NixlConnector plays them (`nixl`).
//! Tokens come from `kvroute-tokenize`, the router's own tokenizer code.

pub mod admin;
pub mod batch;
pub mod config;
pub mod engine;
pub mod http;
pub mod nixl;
pub mod pool;
pub mod publisher;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_events::WireFormat;
use kvroute_keys::{BlockHasher, HashConfig, KeyError};
use parking_lot::Mutex;
use rand::SeedableRng;
use tracing::{info, warn};

use config::EventFormat;
pub use config::SimArgs;
use engine::{Engine, SimMetrics};
use publisher::Publisher;

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("hash configuration: {0}")]
    Hash(#[from] KeyError),
    #[error("KV-event sockets: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// The hasher vLLM would use: seed from `--hash-seed`, else `$PYTHONHASHSEED`; where vLLM
/// would seed from `os.urandom`, so does the simulator (its hashes are then unique).
fn hasher(a: &SimArgs) -> Result<BlockHasher, SimError> {
    let seed = a.hash_seed.clone().or_else(|| std::env::var("PYTHONHASHSEED").ok());
    let cfg = HashConfig { algo: a.hash_algo, vllm_version: a.vllm_version, seed, block_size: a.block_size };
    match BlockHasher::new(cfg.clone()) {
        Err(KeyError::NotReproducible(why)) => {
            warn!("{why}; using a random seed, as vLLM would");
            let random = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ ((std::process::id() as u64) << 32);
            let cfg = HashConfig { seed: Some(format!("{random:016x}")), ..cfg };
            Ok(BlockHasher::new(cfg)?)
        }
        other => Ok(other?),
    }
}

/// 32 bytes no other process gets: std's per-process random hash keys (drawn from the
/// OS), the clock and the process id, mixed.
pub fn entropy() -> [u8; 32] {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// Runs the simulator until SIGTERM or SIGINT, then drains (`shutdown_signals`).
pub fn run(a: SimArgs) -> Result<(), SimError> {
    let hasher = hasher(&a)?;
    let tokenizer = kvroute_tokenize::load(a.tokenizer.as_deref()).map_err(|e| SimError::Config(e.to_string()))?;
    // Builds the generated-word table now rather than on the first request.
    let _ = tokenizer.output_token(0);
    let latency = a.latency();
    let metrics = SimMetrics::new(
        &a.model,
        a.block_size,
        a.num_gpu_blocks,
        if a.lora_modules.is_empty() { 0 } else { a.max_loras },
    )?;
    let mut events_tx = None;
    let mut publisher_thread = None;
    if let Some(kv) = a.kv_events_config.clone().filter(|k| k.enable_kv_cache_events) {
        if kv.publisher != "zmq" && kv.publisher != "null" {
            return Err(SimError::Config(format!("unknown KV-event publisher {:?} (expected zmq)", kv.publisher)));
        }
        // vLLM ≥ 0.11.2 publishes with zmq when events are enabled and no publisher is named.
        let ctx = zmq::Context::new();
        let p = Publisher {
            cfg: kv,
            format: match a.event_format {
                EventFormat::Array => WireFormat::Array,
                EventFormat::Map => WireFormat::Map,
            },
            rank: a.data_parallel_rank,
        };
        let (pub_sock, router) = p.open(&ctx)?;
        let (tx, rx) = std::sync::mpsc::channel();
        events_tx = Some(tx);
        publisher_thread = Some(std::thread::Builder::new().name("kv-publisher".into()).spawn(move || {
            let _ctx = ctx;
            p.run(pub_sock, router, rx)
        })?);
    }
    let engine = Engine::new(hasher, latency, a.speedup, a.max_waiting, a.num_gpu_blocks, metrics, events_tx);
    let mut ids = rand::rngs::StdRng::from_seed(entropy());
    let pin_timeout = Duration::try_from_secs_f64(a.kv_transfer_timeout_s / engine.speedup).map_err(|_| {
        SimError::Config(format!("--kv-transfer-timeout-s must be a duration ≥ 0, got {}", a.kv_transfer_timeout_s))
    })?;
    let nixl = nixl::Nixl::new(
        &engine.metrics.registry,
        &a.model,
        &http::uuid_hex(&mut ids),
        a.kv_transfer_host(),
        a.port,
        pin_timeout,
        a.profile.kv_bytes_per_token(),
    )?;
    let loras = a
        .lora_modules
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once('=') {
            Some((n, p)) => Ok((n.to_string(), p.to_string(), i as i64 + 1)),
            None => Err(SimError::Config(format!("--lora-modules expects NAME=PATH, got {m:?}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sim = Arc::new(http::Sim {
        engine,
        model: a.model.clone(),
        loras,
        pod: a.pod(),
        max_model_len: a.max_model_len,
        default_max_tokens: a.default_max_tokens,
        failure_rate: a.failure_rate,
        stall_after_tokens: a.stall_after_tokens,
        ready_at: Instant::now() + Duration::from_secs_f64(a.startup_delay.max(0.0)),
        tokenizer,
        rng: Mutex::new(match a.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_seed(entropy()),
        }),
        ids: Mutex::new(ids),
        version: a.vllm_version.to_string(),
        created: http::created_now(),
        nixl,
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let addr = format!("{}:{}", a.host, a.port);
    rt.block_on(async move {
        let signals = shutdown_signals()?;
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        info!(%addr, model = %a.model, pod = %sim.pod, "kvroute sim serving");
        // TCP_NODELAY: small streamed chunks (SSE) go out at once instead of waiting ~40 ms
        // for Nagle + delayed ACK.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, http::router(sim)).with_graceful_shutdown(signals).await
    })?;
    info!("every request finished; exiting");
    drop(publisher_thread);
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. As vLLM's server (uvicorn) does then, the simulator
/// closes its listening socket and idle connections and lets the requests and streams in
/// flight finish before it exits 0; a second signal exits at once. The handlers are
/// installed here, before the socket is bound.
fn shutdown_signals() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "shutting down: no new connections; requests in flight finish");
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            warn!(signal = name, "second signal: exiting at once");
            std::process::exit(0);
        });
    })
}
