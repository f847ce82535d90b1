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
//!   engine restart: the pod is cleared and the new publisher's buffer replayed. Both
//!   only once the stream continues from the anomalous message (the confirmation rule,
//!   see `worker`): one forged or stray message cannot wipe a pod.
//!   Data-parallel ranks > 0 are separate pods named `<pod>#dp<rank>`; a rank not below
//!   `data_parallel_size` is dropped and counted.
//! * replays run on a bounded pool of threads; a replaying pod's later messages wait
//!   behind its replay, other pods' go on;
//! * integrity (bound sockets): a topic's pod must be known (a backend, a dial target or
//!   a listed pod) unless unknown pods are accepted; replays only go to a known pod's own
//!   host; frames over `max_frame_bytes` make libzmq drop the publisher's connection
//!   before the frame is read whole; batches over `max_batch_events` are dropped; an
//!   optional ZAP handler checks publishers' source addresses and CurveZMQ keys. Dropped
//!   and malformed messages are counted and logged, one warning per kind per interval.
//! * fleet changes while running ([`Control`], from discovery): pods are dialled and
//!   replayed when they join, forgotten (sockets closed, index entries removed) when they
//!   leave; in bind mode, messages of pods discovery has not seen yet are held a bounded
//!   time (`hold_unknown_ms`) instead of dropped.

mod auth;
mod control;
mod pipeline;
mod pod_metrics;
mod ratelog;
mod replay;
mod seq;
mod stats;
mod topic;
mod worker;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvroute_index::{BlockIndex, EventApplier, Pods};
use serde::{Deserialize, Serialize};

pub use control::{Control, IngestControl};
pub use pipeline::message_parts;
pub use replay::{replay, ReplayError, ReplayOutcome};
pub use seq::{SeqTracker, Verdict};
pub use stats::{Metrics, PodStatus, PodTable};
pub use topic::{is_pod_or_rank, offset_endpoint, parse_topic, pod_host, rank_pod, Topic};

use pipeline::{PodGuard, Receiver_, Source};
use worker::{Input, ReplayTimeouts, Shared, Worker};

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
    // ---- integrity (issue #14) ----
    /// Messages for pods that are not known (not a backend, dial target or `known_pods`
    /// entry): `auto` (default: drop them when any backend or dial target is configured,
    /// else accept), `drop`, or `accept` (any pod, up to `max_pods`; no replay for them).
    pub unknown_pods: UnknownPods,
    /// Pods accepted besides the backends and dial targets (`host:port` as in topics).
    pub known_pods: Vec<String>,
    /// With unknown pods accepted: most distinct pods accepted (default 4096).
    pub max_pods: usize,
    /// Most distinct unknown pods remembered for the metrics (default 1024).
    pub max_unknown_pods_tracked: usize,
    /// Largest ZMQ frame accepted, bytes (default 16 MiB): a bigger one makes libzmq drop
    /// the publisher's connection without reading the frame whole.
    pub max_frame_bytes: usize,
    /// Most events in one batch; bigger batches are dropped (default 65536).
    pub max_batch_events: usize,
    /// Replays running at once (default 4); other pods' events flow meanwhile.
    pub replay_concurrency: usize,
    /// Shortest time between two warnings about one kind of dropped message, ms
    /// (default 10000).
    pub log_interval_ms: u64,
    /// Source addresses or networks allowed to publish to bound sockets (`10.0.0.0/8`,
    /// `10.1.2.3`; default empty = any).
    pub allow_sources: Vec<String>,
    /// File holding the bound sockets' CurveZMQ secret key (Z85, 40 characters); set =
    /// CurveZMQ on, publishers must connect with the matching server public key.
    pub curve_secret_key_file: Option<std::path::PathBuf>,
    /// Publisher public keys (Z85) allowed with CurveZMQ (default empty = any key).
    pub curve_allowed_keys: Vec<String>,
    /// Bind mode with discovery: how long messages of a pod that is not (yet) in the fleet
    /// are held for discovery to catch up before they are dropped, ms (default none = auto:
    /// 10000 with Kubernetes discovery, 0 = drop at once without).
    pub hold_unknown_ms: Option<u64>,
    /// Most messages held at once (default 4096; the oldest go first).
    pub max_held_messages: usize,
}

/// What to do with a message whose topic names an unknown pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPods {
    /// Drop when any backend or dial target is configured, else accept.
    #[default]
    Auto,
    /// Drop and count.
    Drop,
    /// Accept (up to `max_pods` distinct pods).
    Accept,
}

impl std::str::FromStr for UnknownPods {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "drop" => Ok(Self::Drop),
            "accept" => Ok(Self::Accept),
            _ => Err(format!("expected auto, drop or accept, got {s:?}")),
        }
    }
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
            unknown_pods: UnknownPods::Auto,
            known_pods: Vec::new(),
            max_pods: 4096,
            max_unknown_pods_tracked: 1024,
            max_frame_bytes: 16 << 20,
            max_batch_events: 65536,
            replay_concurrency: 4,
            log_interval_ms: 10_000,
            allow_sources: Vec::new(),
            curve_secret_key_file: None,
            curve_allowed_keys: Vec::new(),
            hold_unknown_ms: None,
            max_held_messages: 4096,
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
    #[error("ingest configuration: {0}")]
    Config(String),
}

/// Running ingestion; stops when dropped or [`Ingestor::stop`] is called.
pub struct Ingestor {
    stop: Arc<AtomicBool>,
    resync: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    table: Arc<PodTable>,
    control: IngestControl,
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
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(ratelog::RateLog::new(Duration::from_millis(cfg.log_interval_ms.max(1))));
        let mut threads = Vec::new();
        let security = Security::from_config(cfg)?;
        if security.zap {
            let policy = auth::Policy { sources: security.sources.clone(), keys: security.keys.clone() };
            threads.push(auth::start_zap(&ctx, policy, stop.clone(), metrics.clone(), log.clone())?);
        }
        let max_msg = cfg.max_frame_bytes.min(i64::MAX as usize) as i64;
        let mut sockets = Vec::new();
        let mut monitors = Vec::new();
        let ranks = cfg.data_parallel_size.max(1);
        for ep in &cfg.bind {
            for r in 0..ranks {
                let ep = offset_endpoint(ep, r);
                let s = ctx.socket(zmq::SUB).map_err(sock_err(&ep))?;
                s.set_rcvhwm(100_000).map_err(sock_err(&ep))?;
                s.set_maxmsgsize(max_msg).map_err(sock_err(&ep))?;
                if security.zap {
                    s.set_zap_domain(auth::ZAP_DOMAIN).map_err(sock_err(&ep))?;
                }
                if let Some(secret) = &security.curve_secret {
                    s.set_curve_server(true).map_err(sock_err(&ep))?;
                    s.set_curve_secretkey(secret).map_err(sock_err(&ep))?;
                }
                s.set_subscribe(cfg.topic_filter.as_bytes()).map_err(sock_err(&ep))?;
                // Closed publisher connections (an oversized frame is one) are counted.
                let mon = format!("inproc://kvroute-sub-monitor-{}", monitors.len());
                s.monitor(&mon, zmq::SocketEvent::DISCONNECTED as i32).map_err(sock_err(&ep))?;
                let m = ctx.socket(zmq::PAIR).map_err(sock_err(&mon))?;
                m.connect(&mon).map_err(sock_err(&mon))?;
                monitors.push(m);
                s.bind(&ep).map_err(sock_err(&ep))?;
                sockets.push((s, Source::Bind { replay_port: cfg.replay_port }));
            }
        }
        let dial_opts = control::DialOpts { max_msg, ranks };
        for t in &cfg.connect {
            sockets.extend(control::dial_sockets(&ctx, t, dial_opts, None)?);
        }
        let table = metrics.pods.clone();
        let joins_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sh = Arc::new(Shared {
            applier,
            pods,
            table: table.clone(),
            metrics: metrics.clone(),
            log: log.clone(),
            ctx: ctx.clone(),
            timeouts: ReplayTimeouts {
                idle: Duration::from_millis(cfg.replay_idle_timeout_ms),
                total: Duration::from_millis(cfg.replay_total_timeout_ms),
            },
            max_frame_bytes: cfg.max_frame_bytes,
            max_batch_events: cfg.max_batch_events,
            data_parallel_size: ranks,
            stop: stop.clone(),
            joins_done: joins_done.clone(),
        });
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        let resync = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for _ in 0..cfg.workers.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Input>(cfg.queue_capacity.max(1));
            senders.push(tx);
            receivers.push(rx);
        }
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
        threads.extend(worker::spawn_replayers(sh.clone(), jobs_rx, senders.clone(), cfg.replay_concurrency)?);
        for (n, rx) in receivers.into_iter().enumerate() {
            let w = Worker {
                id: n,
                sh: sh.clone(),
                jobs: jobs_tx.clone(),
                streams: Default::default(),
                resync: resync.clone(),
                resync_seen: 0,
                forgotten: Default::default(),
            };
            threads.push(std::thread::Builder::new().name(format!("kv-worker-{n}")).spawn(move || w.run(rx))?);
        }
        let mut known: HashSet<String> = cfg.known_pods.iter().cloned().collect();
        known.extend(cfg.connect.iter().map(|t| t.pod.clone()));
        let accept_unknown = match cfg.unknown_pods {
            UnknownPods::Accept => true,
            UnknownPods::Drop => false,
            UnknownPods::Auto => known.is_empty(),
        };
        if accept_unknown && !cfg.bind.is_empty() {
            tracing::warn!(
                max_pods = cfg.max_pods,
                "KV events are accepted for any pod a topic names (no backend list, or unknown_pods: accept): \
                 anyone reaching the SUB socket can add pods; give backends or allow_sources/CurveZMQ"
            );
        }
        let guard = PodGuard {
            known,
            accept_unknown,
            max_pods: cfg.max_pods,
            max_unknown_tracked: cfg.max_unknown_pods_tracked,
            accepted: Default::default(),
            unknown: Default::default(),
        };
        let (control_tx, control_rx) = std::sync::mpsc::channel();
        let held = control::Held {
            ttl: Duration::from_millis(cfg.hold_unknown_ms.unwrap_or(0)),
            cap: cfg.max_held_messages,
            queue: Default::default(),
        };
        let r = Receiver_ {
            sockets,
            monitors,
            senders,
            stop: stop.clone(),
            table: table.clone(),
            metrics,
            guard,
            log,
            ctx: ctx.clone(),
            dial_opts,
            control: control_rx,
            held,
            bind_replay_port: cfg.replay_port,
            joins_done: joins_done.clone(),
            joins: Vec::new(),
            monitor_seq: 0,
        };
        threads.push(std::thread::Builder::new().name("kv-receiver".into()).spawn(move || r.run())?);
        Ok(Self {
            stop,
            resync,
            threads,
            table,
            control: IngestControl { tx: control_tx, ranks, joins_requested: Default::default(), joins_done },
        })
    }

    /// A handle for fleet changes (pods joining and leaving; see [`Control`]).
    pub fn control(&self) -> IngestControl {
        self.control.clone()
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
    /// events (from sequence 0, each data-parallel rank) that has a replay endpoint, up to
    /// `replay_concurrency` at once (a silent endpoint costs its idle timeout, not the
    /// others'). Returns (pods replayed, batches applied). Live streams later rejoin as usual.
    pub fn replay_dial_targets<I: BlockIndex>(
        cfg: &IngestConfig,
        applier: &EventApplier<I>,
        pods: &Pods,
        only: Option<&str>,
    ) -> (usize, usize) {
        let ctx = zmq::Context::new();
        let (idle, total) =
            (Duration::from_millis(cfg.replay_idle_timeout_ms), Duration::from_millis(cfg.replay_total_timeout_ms));
        let mut jobs = Vec::new();
        for t in cfg.connect.iter().filter(|t| only.is_none_or(|p| p == t.pod)) {
            let Some(ep) = &t.replay else { continue };
            for r in 0..cfg.data_parallel_size.max(1) {
                let name = rank_pod(&t.pod, r.into());
                jobs.push((name, offset_endpoint(ep, r)));
            }
        }
        let jobs = parking_lot::Mutex::new(jobs);
        let (replayed, batches) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for _ in 0..cfg.replay_concurrency.max(1) {
                scope.spawn(|| {
                    loop {
                        let job = jobs.lock().pop(); // not held during the replay
                        let Some((name, ep)) = job else { break };
                        let Ok(pod) = pods.intern(&name) else { continue };
                        // Batches the index already holds (a shared index written by another
                        // replica, or an earlier replay) are skipped by sequence number.
                        let res = replay::replay(&ctx, &ep, 0, idle, total, cfg.max_frame_bytes, |seq, payload| {
                            if let Ok(b) = kvroute_events::decode_batch(payload) {
                                if b.events.len() <= cfg.max_batch_events && applier.apply_seq(pod, "", seq, &b) {
                                    batches.fetch_add(1, Relaxed);
                                }
                            }
                        });
                        match res {
                            Ok(_) => _ = replayed.fetch_add(1, Relaxed),
                            Err(e) => tracing::warn!(pod = %name, endpoint = %ep, "start-up replay failed: {e}"),
                        }
                    }
                });
            }
        });
        (replayed.into_inner(), batches.into_inner())
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

/// The bound sockets' authentication settings, checked at start.
struct Security {
    zap: bool,
    sources: Vec<auth::Net>,
    keys: Vec<Vec<u8>>,
    curve_secret: Option<Vec<u8>>,
}

impl Security {
    fn from_config(cfg: &IngestConfig) -> Result<Self, IngestError> {
        let sources = cfg
            .allow_sources
            .iter()
            .map(|s| auth::Net::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(IngestError::Config)?;
        let z85 = |what: &str, k: &str| {
            zmq::z85_decode(k.trim())
                .ok()
                .filter(|k| k.len() == 32)
                .ok_or_else(|| IngestError::Config(format!("{what} must be a Z85 CurveZMQ key (40 characters)")))
        };
        let keys =
            cfg.curve_allowed_keys.iter().map(|k| z85("curve_allowed_keys entry", k)).collect::<Result<Vec<_>, _>>()?;
        let curve_secret = match &cfg.curve_secret_key_file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| IngestError::Config(format!("cannot read {}: {e}", p.display())))?;
                Some(z85(&format!("the key in {}", p.display()), &text)?)
            }
            None => None,
        };
        if curve_secret.is_some() && !zmq::has("curve").unwrap_or(false) {
            return Err(IngestError::Config("this libzmq has no CurveZMQ support".into()));
        }
        if !keys.is_empty() && curve_secret.is_none() {
            return Err(IngestError::Config("curve_allowed_keys needs curve_secret_key_file".into()));
        }
        let zap = !sources.is_empty() || !keys.is_empty();
        Ok(Self { zap, sources, keys, curve_secret })
    }
}
