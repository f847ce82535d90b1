//! Counters: per pod (for `/v1/kv/pods`) and fleet-wide (Prometheus).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use prometheus::{IntCounter, IntGauge, Opts, Registry};
use serde::Serialize;

/// Counters of one pod (one publisher stream; data-parallel ranks are separate pods).
#[derive(Debug, Default)]
pub struct PodCounters {
    pub received: AtomicU64,
    pub applied_batches: AtomicU64,
    pub malformed: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    pub replays: AtomicU64,
    pub replay_failures: AtomicU64,
    pub restarts: AtomicU64,
    /// Out-of-sequence messages held and then discarded (the stream went on without them).
    pub anomalies_ignored: AtomicU64,
    /// Last sequence number received live, + 1 (0 = none yet).
    pub last_seq_plus_one: AtomicU64,
    /// When the last live batch arrived (Unix seconds, f64 bits; 0 = none yet), and how far
    /// that was behind the batch's own engine timestamp `ts` (seconds, f64 bits).
    pub last_event_unix: AtomicU64,
    pub last_event_lag: AtomicU64,
    pub model: Mutex<String>,
}

/// A pod's status as `/v1/kv/pods` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct PodStatus {
    pub pod: String,
    pub model: String,
    /// (block, tier) entries the index holds for the pod.
    pub blocks: u64,
    pub last_seq: Option<u64>,
    pub received: u64,
    pub applied_batches: u64,
    pub malformed: u64,
    pub dropped: u64,
    pub duplicates: u64,
    pub gaps: u64,
    pub replays: u64,
    pub replay_failures: u64,
    pub restarts: u64,
    pub anomalies_ignored: u64,
}

/// Fleet-wide counters, registered in a Prometheus registry.
#[derive(Clone)]
pub struct Metrics {
    pub received: IntCounter,
    pub applied_batches: IntCounter,
    pub applied_events: IntCounter,
    pub malformed: IntCounter,
    pub dropped: IntCounter,
    pub gaps: IntCounter,
    pub replays: IntCounter,
    pub replay_failures: IntCounter,
    pub restarts: IntCounter,
    /// Messages whose topic names a pod that is not a known backend (or over the pod cap).
    pub unknown_pod: IntCounter,
    /// Distinct unknown pods seen (counted up to the tracking cap).
    pub unknown_pods: IntGauge,
    /// Batches whose data-parallel rank is not below the configured data-parallel size.
    pub bad_rank: IntCounter,
    /// Batches with more events than allowed.
    pub oversized: IntCounter,
    /// Gaps or backwards sequences held and then discarded because the stream went on
    /// from before them.
    pub anomalies_ignored: IntCounter,
    /// ZAP refusals (publisher key or source address not allowed).
    pub auth_denied: IntCounter,
    /// Publisher connections to bound sockets that closed (publisher gone, or a frame
    /// over the size limit refused by libzmq).
    pub disconnects: IntCounter,
    /// Messages of pods not (yet) in the fleet held for discovery to catch up, released
    /// once the pod joined, and dropped when the hold expired.
    pub held: IntCounter,
    pub held_released: IntCounter,
    pub held_expired: IntCounter,
    /// Pods that left the fleet (discovery) and were forgotten: sockets closed, index cleared.
    pub pods_removed: IntCounter,
    /// Every pod's counters: the ingestor keeps them here, and the registry reads them per
    /// pod at scrape time (`kvroute_ingest_pod_*`, see `pod_metrics.rs`).
    pub pods: Arc<PodTable>,
}

impl Metrics {
    pub fn new(reg: &Registry) -> Result<Self, prometheus::Error> {
        let pods = Arc::new(PodTable::default());
        reg.register(Box::new(crate::pod_metrics::PodCollector::new(pods.clone())?))?;
        let c = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(Opts::new(name, help))?;
            reg.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            received: c("kvroute_kv_messages_received_total", "KV-event messages received over ZMQ")?,
            applied_batches: c("kvroute_kv_batches_applied_total", "KV-event batches applied to the index")?,
            applied_events: c("kvroute_kv_events_applied_total", "KV events applied to the index")?,
            malformed: c("kvroute_kv_messages_malformed_total", "Messages skipped as malformed (framing or payload)")?,
            dropped: c("kvroute_kv_messages_dropped_total", "Messages dropped because a worker queue was full")?,
            gaps: c("kvroute_kv_seq_gaps_total", "Sequence gaps detected")?,
            replays: c("kvroute_kv_replays_total", "Replay requests made")?,
            replay_failures: c("kvroute_kv_replay_failures_total", "Replays that failed or were incomplete")?,
            restarts: c(
                "kvroute_kv_engine_restarts_total",
                "Engine restarts detected (sequence went backwards and the stream continued from there)",
            )?,
            unknown_pod: c(
                "kvroute_ingest_unknown_pod_messages_total",
                "KV-event messages dropped because their topic names a pod that is not a known backend",
            )?,
            unknown_pods: {
                let g = IntGauge::with_opts(Opts::new(
                    "kvroute_ingest_unknown_pods",
                    "Distinct unknown pods seen in topics (counted up to the tracking cap)",
                ))?;
                reg.register(Box::new(g.clone()))?;
                g
            },
            bad_rank: c(
                "kvroute_ingest_bad_dp_rank_messages_total",
                "KV-event batches dropped because their data-parallel rank is not below the configured size",
            )?,
            oversized: c(
                "kvroute_ingest_oversized_batches_total",
                "KV-event batches dropped because they hold more events than allowed",
            )?,
            anomalies_ignored: c(
                "kvroute_ingest_seq_anomalies_ignored_total",
                "Out-of-sequence messages (gap or backwards) discarded because the stream continued without them",
            )?,
            auth_denied: c(
                "kvroute_ingest_auth_denied_total",
                "Publisher connections refused by the ZAP handler (key or source address not allowed)",
            )?,
            disconnects: c(
                "kvroute_ingest_publisher_disconnects_total",
                "Publisher connections to bound SUB sockets that closed (publisher gone, or a frame over max_frame_bytes refused)",
            )?,
            held: c(
                "kvroute_ingest_held_messages_total",
                "KV-event messages of pods not (yet) discovered, held until the pod joins the fleet",
            )?,
            held_released: c(
                "kvroute_ingest_held_released_total",
                "Held KV-event messages released because their pod joined the fleet",
            )?,
            held_expired: c(
                "kvroute_ingest_held_expired_total",
                "Held KV-event messages dropped because their pod did not join in time (or the hold was full)",
            )?,
            pods_removed: c(
                "kvroute_ingest_pods_removed_total",
                "Pods that left the fleet: their event sockets closed and index entries removed",
            )?,
            pods,
        })
    }
}

/// All pods' counters, by pod name.
#[derive(Default)]
pub struct PodTable {
    inner: RwLock<BTreeMap<String, Arc<PodCounters>>>,
}

impl PodTable {
    /// Every pod's counters now, by name.
    pub fn all(&self) -> Vec<(String, Arc<PodCounters>)> {
        self.inner.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn get(&self, pod: &str) -> Arc<PodCounters> {
        if let Some(c) = self.inner.read().get(pod) {
            return c.clone();
        }
        self.inner.write().entry(pod.to_string()).or_default().clone()
    }

    /// Forgets a pod's counters and its data-parallel ranks' (`<pod>#dp<r>`).
    pub fn remove(&self, pod: &str) {
        self.inner.write().retain(|k, _| !crate::topic::is_pod_or_rank(k, pod));
    }

    pub fn snapshot(&self, blocks: impl Fn(&str) -> u64) -> Vec<PodStatus> {
        self.inner
            .read()
            .iter()
            .map(|(pod, c)| {
                let l = c.last_seq_plus_one.load(Relaxed);
                PodStatus {
                    pod: pod.clone(),
                    model: c.model.lock().clone(),
                    blocks: blocks(pod),
                    last_seq: l.checked_sub(1),
                    received: c.received.load(Relaxed),
                    applied_batches: c.applied_batches.load(Relaxed),
                    malformed: c.malformed.load(Relaxed),
                    dropped: c.dropped.load(Relaxed),
                    duplicates: c.duplicates.load(Relaxed),
                    gaps: c.gaps.load(Relaxed),
                    replays: c.replays.load(Relaxed),
                    replay_failures: c.replay_failures.load(Relaxed),
                    restarts: c.restarts.load(Relaxed),
                    anomalies_ignored: c.anomalies_ignored.load(Relaxed),
                }
            })
            .collect()
    }
}
