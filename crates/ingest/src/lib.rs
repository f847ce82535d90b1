//! # kvroute-ingest — live KV events over ZMQ (… → event → index)
//!
//! Owns following a fleet of vLLM servers' KV-event streams in near real time:
//!
//! * **bind mode**: one SUB socket binds (default `tcp://*:5557`) and every vLLM
//!   connects to it; each message's pod and model come from its topic
//!   `kv@<pod>@<model>` (any other topic is the pod name itself);
//! * **dial mode**: a SUB socket connects to each known pod's publisher; libzmq
//!   reconnects by itself when the publisher goes away and comes back;
//! * frames must be `[topic, seq (8 bytes big-endian), msgpack batch]`; anything else is
//!   counted as malformed and skipped;
//! * one receiver thread, `workers` threads fed through bounded queues sharded by pod,
//!   so each pod's batches apply in order; a full queue drops (and counts) the message;
//! * per pod and data-parallel rank ([`SeqTracker`]): a sequence gap is repaired from
//!   the pod's ROUTER replay endpoint (both reply framings); an unrepairable gap clears
//!   the pod (its view can no longer be trusted); a sequence that goes backwards is an
//!   engine restart: the pod is cleared and the new publisher's buffer replayed.
//!   Data-parallel ranks > 0 are separate pods named `<pod>#dp<rank>`.

mod pipeline;
mod replay;
mod seq;
mod stats;
mod topic;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvroute_index::{BlockIndex, EventApplier, Pods};
use serde::{Deserialize, Serialize};

pub use replay::{replay, ReplayError, ReplayOutcome};
pub use seq::{SeqTracker, Verdict};
pub use stats::{Metrics, PodStatus, PodTable};
pub use topic::{offset_endpoint, parse_topic, pod_host, Topic};

use pipeline::{Msg, Receiver_, ReplayTimeouts, Source, Worker};

/// A publisher kvroute dials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialTarget {
    /// The pod's identity (`host:port` of its HTTP server).
    pub pod: String,
    /// Its KV-event PUB endpoint, e.g. `tcp://10.0.0.1:5557`.
    pub endpoint: String,
    /// Its ROUTER replay endpoint, e.g. `tcp://10.0.0.1:5558`.
    #[serde(default)]
    pub replay: Option<String>,
}

/// Ingestion settings (defaults in [`IngestConfig::default`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Endpoints to bind SUB sockets on (default `["tcp://*:5557"]`; empty = none).
    pub bind: Vec<String>,
    /// Publishers to dial (default none).
    pub connect: Vec<DialTarget>,
    /// Topic prefix the bound socket subscribes to (default `""`: everything).
    pub topic_filter: String,
    /// In bind mode, the replay port on each pod's host (default none: no replay).
    pub replay_port: Option<u16>,
    /// Data-parallel ranks per pod: each rank's endpoints are offset by its rank (default 1).
    pub data_parallel_size: u16,
    /// Worker threads applying events (default 2).
    pub workers: usize,
    /// Messages queued per worker before new ones are dropped (default 65536).
    pub queue_capacity: usize,
    /// Longest wait for one replay reply, in ms (default 2000).
    pub replay_idle_timeout_ms: u64,
    /// Longest time for a whole replay, in ms (default 30000).
    pub replay_total_timeout_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            bind: vec!["tcp://*:5557".into()],
            connect: Vec::new(),
            topic_filter: String::new(),
            replay_port: None,
            data_parallel_size: 1,
            workers: 2,
            queue_capacity: 65536,
            replay_idle_timeout_ms: 2000,
            replay_total_timeout_ms: 30000,
        }
    }
}

/// Why ingestion could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("zmq socket for {endpoint}: {source}")]
    Socket { endpoint: String, source: zmq::Error },
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Running ingestion; stops when dropped or [`Ingestor::stop`] is called.
pub struct Ingestor {
    stop: Arc<AtomicBool>,
    resync: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    table: Arc<PodTable>,
}

impl Ingestor {
    pub fn start<I: BlockIndex + 'static>(
        cfg: &IngestConfig,
        applier: Arc<EventApplier<I>>,
        pods: Arc<Pods>,
        metrics: Metrics,
    ) -> Result<Self, IngestError> {
        let ctx = zmq::Context::new();
        let sock_err = |endpoint: &str| {
            let endpoint = endpoint.to_string();
            move |source| IngestError::Socket { endpoint: endpoint.clone(), source }
        };
        let mut sockets = Vec::new();
        let ranks = cfg.data_parallel_size.max(1);
        for ep in &cfg.bind {
            for r in 0..ranks {
                let ep = offset_endpoint(ep, r);
                let s = ctx.socket(zmq::SUB).map_err(sock_err(&ep))?;
                s.set_rcvhwm(100_000).map_err(sock_err(&ep))?;
                s.set_subscribe(cfg.topic_filter.as_bytes()).map_err(sock_err(&ep))?;
                s.bind(&ep).map_err(sock_err(&ep))?;
                sockets.push((s, Source::Bind { replay_port: cfg.replay_port }));
            }
        }
        for t in &cfg.connect {
            for r in 0..ranks {
                let ep = offset_endpoint(&t.endpoint, r);
                let s = ctx.socket(zmq::SUB).map_err(sock_err(&ep))?;
                s.set_rcvhwm(100_000).map_err(sock_err(&ep))?;
                s.set_reconnect_ivl(100).map_err(sock_err(&ep))?;
                s.set_reconnect_ivl_max(5000).map_err(sock_err(&ep))?;
                s.set_subscribe(b"").map_err(sock_err(&ep))?;
                s.connect(&ep).map_err(sock_err(&ep))?;
                sockets.push((s, Source::Dial { pod: t.pod.clone(), replay: t.replay.clone() }));
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let table = Arc::new(PodTable::default());
        let timeouts = ReplayTimeouts {
            idle: Duration::from_millis(cfg.replay_idle_timeout_ms),
            total: Duration::from_millis(cfg.replay_total_timeout_ms),
        };
        let mut threads = Vec::new();
        let mut senders = Vec::new();
        let resync = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for n in 0..cfg.workers.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(cfg.queue_capacity.max(1));
            senders.push(tx);
            let w = Worker {
                applier: applier.clone(),
                pods: pods.clone(),
                table: table.clone(),
                metrics: metrics.clone(),
                ctx: ctx.clone(),
                timeouts,
                streams: Default::default(),
                resync: resync.clone(),
                resync_seen: 0,
            };
            threads.push(std::thread::Builder::new().name(format!("kv-worker-{n}")).spawn(move || w.run(rx))?);
        }
        let r = Receiver_ { sockets, senders, stop: stop.clone(), table: table.clone(), metrics };
        threads.push(std::thread::Builder::new().name("kv-receiver".into()).spawn(move || r.run())?);
        Ok(Self { stop, resync, threads, table })
    }

    /// A handle that makes every pod's stream rejoin: its next message triggers a replay
    /// of the pod's buffered events from the start (used to rebuild a shared index that
    /// lost its data, e.g. after a Redis restart).
    pub fn resync_handle(&self) -> impl Fn() + Send + Sync + 'static {
        let r = self.resync.clone();
        move || {
            r.fetch_add(1, Relaxed);
        }
    }

    /// Rebuilds the index: replays every dialled pod's (or only pod `only`'s) buffered
    /// events (from sequence 0, each data-parallel rank) that has a replay endpoint. Returns
    /// (pods replayed, batches applied). Live streams later rejoin as usual.
    pub fn replay_dial_targets<I: BlockIndex>(
        cfg: &IngestConfig,
        applier: &EventApplier<I>,
        pods: &Pods,
        only: Option<&str>,
    ) -> (usize, usize) {
        let ctx = zmq::Context::new();
        let (idle, total) =
            (Duration::from_millis(cfg.replay_idle_timeout_ms), Duration::from_millis(cfg.replay_total_timeout_ms));
        let (mut replayed, mut batches) = (0, 0);
        for t in cfg.connect.iter().filter(|t| only.is_none_or(|p| p == t.pod)) {
            let Some(ep) = &t.replay else { continue };
            for r in 0..cfg.data_parallel_size.max(1) {
                let name = if r == 0 { t.pod.clone() } else { format!("{}#dp{r}", t.pod) };
                let Ok(pod) = pods.intern(&name) else { continue };
                let ep = offset_endpoint(ep, r);
                // Batches the index already holds (a shared index written by another
                // replica, or an earlier replay) are skipped by sequence number.
                let res = replay::replay(&ctx, &ep, 0, idle, total, |seq, payload| {
                    if let Ok(b) = kvroute_events::decode_batch(payload) {
                        batches += applier.apply_seq(pod, "", seq, &b) as usize;
                    }
                });
                match res {
                    Ok(_) => replayed += 1,
                    Err(e) => tracing::warn!(pod = %name, endpoint = %ep, "start-up replay failed: {e}"),
                }
            }
        }
        (replayed, batches)
    }

    /// Per-pod counters, with `blocks(pod)` filled in by the caller (from the index).
    pub fn pod_status(&self, blocks: impl Fn(&str) -> u64) -> Vec<PodStatus> {
        self.table.snapshot(blocks)
    }

    /// Stops the threads and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Ingestor {
    fn drop(&mut self) {
        self.shutdown();
    }
}
