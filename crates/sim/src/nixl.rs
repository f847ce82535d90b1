//! Prefill/decode as vLLM's NixlConnector plays it, both roles.
//!
//! **Prefill** (`kv_transfer_params.do_remote_decode: true`): the prompt is computed and
//! cached as for any request, one token is generated, and the reply names what a decoder
//! needs to read the KV: the real ids of the prompt's full blocks in this pool, this
//! process's engine id, the host and port of the side channel, the request id. Those blocks
//! stay **pinned** (allocated, not evictable) until a decoder has read them or
//! `--kv-transfer-timeout-s` passes (vLLM's `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, 480 s);
//! then they go to the cache's LRU like any finished request's blocks.
//!
//! **Decode** (`do_remote_prefill: true`): the decoder asks the prefiller named by the
//! params to confirm the read (a real network exchange, see below). Confirmed, the prompt
//! tokens the decoder does not already hold cost `kv_transfer_per_token` each instead of
//! the prefill, and the blocks are allocated (cached and published as `BlockStored`) here.
//! Invalid params, an unreachable prefiller, an unknown or expired request or mismatched
//! ids make the decoder recompute the prompt locally (vLLM's
//! `kv_load_failure_policy: "recompute"`), counted in `kvroute_sim_kv_transfer_recomputes_total{reason}`;
//! the client gets a normal answer either way.
//!
//! **The side channel.** vLLM's is a ZMQ handshake on `VLLM_NIXL_SIDE_CHANNEL_PORT` (5600)
//! followed by an RDMA read and a completion notification. The simulator's stand-in is one
//! HTTP call on the prefiller's own HTTP port (`remote_port` is that port):
//! `POST /nixl/read {engine_id, request_id, block_ids}` → 200 (the prefiller releases the
//! blocks: the read and its notification in one), 404 (no such pinned request: never
//! prefilled here, already read, expired), 409 (engine id or block ids differ). One port
//! per simulated pod keeps the fleet's port plan and the pod's Service unchanged.
//! `GET /nixl/engine` shows the engine id, the advertised host and port and what is pinned.

#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::engine::Running;
use crate::http::{error, Sim};

/// How long a decoder waits for a prefiller's answer (real time).
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The NIXL metrics vLLM exposes (`NixlPromMetrics` in
/// `vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py`, added by
/// vllm-project/vllm#26811, first released after v0.11.0; same names, buckets and
/// `model_name`/`engine` labels) that a simulator can fill honestly, plus the simulator's
/// own counters where vLLM has none.
pub struct NixlMetrics {
    /// `vllm:nixl_xfer_time_seconds`: one observation per read, model time.
    xfer_time: Histogram,
    /// `vllm:nixl_bytes_transferred`: bytes per read (tokens × the profile's KV bytes per token).
    bytes: Histogram,
    /// `vllm:nixl_num_failed_transfers` (`_total` as prometheus_client exposes a counter):
    /// reads attempted that failed (prefiller unreachable or refusing).
    failed: IntCounter,
    /// `kvroute_sim_kv_transfer_recomputes_total{reason}`: decode requests that computed
    /// the prompt locally because the transfer could not happen.
    recomputes: IntCounterVec,
    /// `kvroute_sim_kv_transfer_expired_total`: pinned prefills no decoder read in time.
    expired: IntCounter,
    /// `kvroute_sim_kv_transfer_pinned_blocks`: blocks held for decoders' reads now.
    pinned_blocks: IntGauge,
}

impl NixlMetrics {
    fn new(registry: &Registry, model: &str) -> Result<Self, prometheus::Error> {
        let labels = |o: Opts| o.const_label("model_name", model).const_label("engine", "0");
        let hist = |n: &str, h: &str, b: Vec<f64>| -> Result<Histogram, prometheus::Error> {
            let o = HistogramOpts::new(n, h).const_label("model_name", model).const_label("engine", "0").buckets(b);
            let x = Histogram::with_opts(o)?;
            registry.register(Box::new(x.clone()))?;
            Ok(x)
        };
        let counter = |n: &str, h: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(labels(Opts::new(n, h)))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let recomputes = IntCounterVec::new(
            labels(Opts::new(
                "kvroute_sim_kv_transfer_recomputes_total",
                "Decode requests (do_remote_prefill) that recomputed the prompt locally because the KV transfer failed",
            )),
            &["reason"],
        )?;
        registry.register(Box::new(recomputes.clone()))?;
        let pinned_blocks = IntGauge::with_opts(labels(Opts::new(
            "kvroute_sim_kv_transfer_pinned_blocks",
            "KV blocks held for pending decoder reads",
        )))?;
        registry.register(Box::new(pinned_blocks.clone()))?;
        Ok(Self {
            xfer_time: hist(
                "vllm:nixl_xfer_time_seconds",
                "Histogram of transfer duration for NIXL KV Cache transfers.",
                vec![0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0],
            )?,
            bytes: hist(
                "vllm:nixl_bytes_transferred",
                "Histogram of bytes transferred per NIXL KV Cache transfers.",
                (1..25).step_by(2).map(|i| (1u64 << (10 + i)) as f64).collect(),
            )?,
            failed: counter("vllm:nixl_num_failed_transfers_total", "Number of failed NIXL KV Cache transfers.")?,
            recomputes,
            expired: counter(
                "kvroute_sim_kv_transfer_expired_total",
                "Prefilled requests whose pinned blocks no decoder read before --kv-transfer-timeout-s",
            )?,
            pinned_blocks,
        })
    }
}

/// A prefilled request's blocks, held for its decoder.
struct Pinned {
    hashes: Vec<u64>,
    block_ids: Vec<u32>,
    generation: u64,
}

/// One simulated NIXL agent: the prefill role's pinned requests and the decode role's client.
pub struct Nixl {
    /// vLLM's `kv_transfer_config.engine_id`: a uuid4 per process.
    pub engine_id: String,
    /// `remote_host` in the replies (`--kv-transfer-host`).
    pub host: String,
    /// `remote_port`: this server's HTTP port, where `/nixl/read` is served.
    pub port: u16,
    /// How long blocks stay pinned (real time: the model-time flag ÷ speedup).
    timeout: Duration,
    bytes_per_token: u64,
    pinned: Mutex<HashMap<String, Pinned>>,
    generation: AtomicU64,
    client: reqwest::Client,
    metrics: NixlMetrics,
}

/// The dashed uuid4 form of a 32-hex-digit id (vLLM's `str(uuid.uuid4())`).
fn dashed(h: &str) -> String {
    if h.len() != 32 {
        return h.to_string();
    }
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

impl Nixl {
    pub fn new(
        registry: &Registry,
        model: &str,
        engine_hex: &str,
        host: String,
        port: u16,
        timeout: Duration,
        bytes_per_token: u64,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self {
            engine_id: dashed(engine_hex),
            host,
            port,
            timeout,
            bytes_per_token,
            pinned: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            client: reqwest::Client::builder().connect_timeout(READ_TIMEOUT).build().unwrap_or_default(),
            metrics: NixlMetrics::new(registry, model)?,
        })
    }

    /// Takes `request_id`'s entry (if `generation` is given, only that pin), unpins its
    /// blocks and returns it.
    fn release(&self, sim: &Sim, request_id: &str, generation: Option<u64>) -> Option<Pinned> {
        let p = {
            let mut m = self.pinned.lock();
            match m.get(request_id) {
                Some(p) if generation.is_none_or(|g| g == p.generation) => m.remove(request_id),
                _ => None,
            }
        }?;
        sim.engine.unpin(&p.hashes);
        self.metrics.pinned_blocks.sub(p.hashes.len() as i64);
        Some(p)
    }

    /// Prefill side: pins `r`'s prompt blocks for a decoder and returns the reply's
    /// `kv_transfer_params`. Call before the request's blocks are released.
    pub fn pin(sim: &Arc<Sim>, r: &Running<'_>, request_id: &str, prompt_tokens: usize) -> Value {
        let nixl = &sim.nixl;
        // A client reusing a request id replaces the earlier pin.
        nixl.release(sim, request_id, None);
        let (hashes, block_ids) = sim.engine.pin(r);
        let generation = nixl.generation.fetch_add(1, Ordering::Relaxed);
        nixl.metrics.pinned_blocks.add(hashes.len() as i64);
        let params = json!({
            "do_remote_prefill": true, "do_remote_decode": false,
            "remote_block_ids": block_ids, "remote_engine_id": nixl.engine_id,
            "remote_request_id": request_id, "remote_host": nixl.host, "remote_port": nixl.port,
            "tp_size": 1, "remote_num_tokens": prompt_tokens});
        nixl.pinned.lock().insert(request_id.to_string(), Pinned { hashes, block_ids, generation });
        let (sim, id, timeout) = (sim.clone(), request_id.to_string(), nixl.timeout);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if sim.nixl.release(&sim, &id, Some(generation)).is_some() {
                sim.nixl.metrics.expired.inc();
                warn!(request_id = %id, "releasing KV blocks no decoder read within --kv-transfer-timeout-s");
            }
        });
        params
    }

    fn recompute(&self, reason: &'static str, why: &str) -> bool {
        warn!(reason, "KV transfer failed ({why}); recomputing the prompt locally");
        self.metrics.recomputes.with_label_values(&[reason]).inc();
        false
    }

    /// Decode side: asks the prefiller named by `kvp` to confirm the read. `true`: the KV
    /// arrives by transfer; `false`: recompute locally (counted).
    pub async fn pull(&self, kvp: &Value) -> bool {
        let Some(p) = ReadParams::parse(kvp) else {
            return self.recompute("invalid_params", "kv_transfer_params lack or mistype a remote_* field");
        };
        let host = if p.host.contains(':') && !p.host.starts_with('[') { format!("[{}]", p.host) } else { p.host };
        let url = format!("http://{host}:{}/nixl/read", p.port);
        let body = json!({"engine_id": p.engine_id, "request_id": p.request_id, "block_ids": p.block_ids});
        let sent = self.client.post(&url).json(&body).timeout(READ_TIMEOUT).send().await;
        let status = match sent {
            Ok(r) => r.status(),
            Err(e) => {
                self.metrics.failed.inc();
                return self.recompute("unreachable", &format!("{url}: {e}"));
            }
        };
        if status.is_success() {
            debug!(%url, request_id = %p.request_id, "KV read confirmed");
            return true;
        }
        self.metrics.failed.inc();
        match status {
            StatusCode::NOT_FOUND => self.recompute("unknown_request", "the prefiller holds no such request"),
            StatusCode::CONFLICT => self.recompute("mismatch", "engine id or block ids differ"),
            s => self.recompute("refused", &format!("the prefiller answered {s}")),
        }
    }

    /// Records a completed read of `tokens` prompt tokens.
    pub fn transferred(&self, sim: &Sim, tokens: usize) {
        let t = sim.engine.latency.kv_transfer_per_token * tokens as u32;
        self.metrics.xfer_time.observe(t.as_secs_f64());
        self.metrics.bytes.observe((tokens as u64 * self.bytes_per_token) as f64);
    }
}

/// The `remote_*` fields a read needs, with the types vLLM expects.
struct ReadParams {
    engine_id: String,
    request_id: String,
    host: String,
    port: u16,
    block_ids: Vec<u64>,
}

impl ReadParams {
    fn parse(kvp: &Value) -> Option<Self> {
        let s = |k: &str| kvp.get(k).and_then(Value::as_str).map(str::to_string);
        let block_ids = kvp.get("remote_block_ids")?.as_array()?.iter().map(Value::as_u64).collect::<Option<_>>()?;
        Some(Self {
            engine_id: s("remote_engine_id")?,
            request_id: s("remote_request_id")?,
            host: s("remote_host").filter(|h| !h.is_empty())?,
            port: kvp.get("remote_port")?.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0)?,
            block_ids,
        })
    }
}

/// `POST /nixl/read`: a decoder reads a pinned request's blocks (see the module docs).
pub async fn read(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    struct Req {
        engine_id: String,
        request_id: String,
        block_ids: Vec<u64>,
    }
    let req: Req = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid read request: {e}"), "BadRequestError"),
    };
    let nixl = &sim.nixl;
    if req.engine_id != nixl.engine_id {
        let msg = format!("engine id {:?} is not this engine's ({})", req.engine_id, nixl.engine_id);
        return error(StatusCode::CONFLICT, msg, "ConflictError");
    }
    {
        let m = nixl.pinned.lock();
        let Some(p) = m.get(&req.request_id) else {
            let msg = format!(
                "no blocks pinned for request {:?} (never prefilled here, already read, or expired)",
                req.request_id
            );
            return error(StatusCode::NOT_FOUND, msg, "NotFoundError");
        };
        if !p.block_ids.iter().map(|&b| b as u64).eq(req.block_ids.iter().copied()) {
            return error(StatusCode::CONFLICT, "block ids differ from the pinned request's", "ConflictError");
        }
    }
    // The read is done: the prefiller frees the blocks (vLLM: on the decoder's notification).
    match nixl.release(&sim, &req.request_id, None) {
        Some(p) => Json(json!({"request_id": req.request_id, "num_blocks": p.block_ids.len()})).into_response(),
        None => error(StatusCode::NOT_FOUND, "the request was released meanwhile", "NotFoundError"),
    }
}

/// `GET /nixl/engine`: this agent's identity and what it holds.
pub async fn engine(State(sim): State<Arc<Sim>>) -> Response {
    let nixl = &sim.nixl;
    let (requests, blocks) = {
        let m = nixl.pinned.lock();
        (m.len(), m.values().map(|p| p.hashes.len()).sum::<usize>())
    };
    Json(json!({"engine_id": nixl.engine_id, "remote_host": nixl.host, "remote_port": nixl.port, "tp_size": 1,
        "pinned_requests": requests, "pinned_blocks": blocks,
        "kv_transfer_timeout_s": nixl.timeout.as_secs_f64() * sim.engine.speedup}))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_params_need_every_remote_field_with_its_type() {
        let ok = json!({"do_remote_prefill": true, "remote_engine_id": "e", "remote_request_id": "r",
            "remote_host": "10.0.0.1", "remote_port": 8000, "remote_block_ids": [3, 1]});
        let p = ReadParams::parse(&ok).unwrap();
        assert_eq!((p.engine_id.as_str(), p.port, p.block_ids), ("e", 8000, vec![3, 1]));
        for (k, bad) in [
            ("remote_block_ids", json!("x")),
            ("remote_block_ids", json!([1, -2])),
            ("remote_port", json!("8000")),
            ("remote_port", json!(70000)),
            ("remote_host", json!(null)),
            ("remote_engine_id", json!(7)),
        ] {
            let mut v = ok.clone();
            v[k] = bad;
            assert!(ReadParams::parse(&v).is_none(), "{v}");
        }
        let mut v = ok;
        v.as_object_mut().unwrap().remove("remote_request_id");
        assert!(ReadParams::parse(&v).is_none());
    }

    #[test]
    fn engine_ids_are_dashed_uuids() {
        assert_eq!(dashed("0123456789abcdef0123456789abcdef"), "01234567-89ab-cdef-0123-456789abcdef");
    }
}
