//! A pod that rejoins the rotation may have restarted: its GPU cache is then empty, but
//! the router's index still holds what it had (until its first event says otherwise). So
//! when a pod's health goes from down to up, its index entries (and its approximate prefix
//! records) are cleared — **unless its KV-event stream proves continuity**.
//!
//! The rule: the stream is continuous when, between the moment the pod went out of
//! rotation and the moment it came back, the pod's last received sequence number moved
//! forward and no engine restart (sequence going backwards) was seen. A pod that kept
//! publishing in sequence while its HTTP side failed (overload, a slow `/health`) keeps its
//! entries; a pod that was silent while down (stopped, partitioned, restarted and not yet
//! publishing) is cleared. Trade-off: a paused process (SIGSTOP, a long GC) comes back with
//! its cache intact but routes cold until its next events; keeping stale entries of a
//! restarted pod instead would route requests to a cache that is gone, which costs more.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use kvroute_api::SharedIndex;
use kvroute_index::EventApplier;
use parking_lot::Mutex;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::approx::ApproxPrefix;
use crate::pool::{Backend, HealthHook};

/// Where a pod's KV-event stream stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamMark {
    /// Last sequence number received live (`None`: nothing yet).
    pub last_seq: Option<u64>,
    /// Engine restarts detected so far.
    pub restarts: u64,
}

/// Reads a pod's stream mark by pod name (from the KV-event ingestion).
pub type Marker = Box<dyn Fn(&str) -> Option<StreamMark> + Send + Sync>;

/// A pod's other data-parallel ranks in the index (`<pod>#dp<r>`, r ≥ 1), by pod name:
/// they restart with the engine, so they are cleared with it.
pub type RankPods = Box<dyn Fn(&str) -> Vec<kvroute_index::PodId> + Send + Sync>;

/// Whether the stream went on, in sequence, from `before` (pod went down) to `now`.
pub fn continuous(before: StreamMark, now: StreamMark) -> bool {
    now.restarts == before.restarts && now.last_seq > before.last_seq
}

pub struct Recovery {
    applier: Arc<EventApplier<SharedIndex>>,
    approx: Arc<ApproxPrefix>,
    marker: OnceLock<Marker>,
    ranks: OnceLock<RankPods>,
    down_marks: Mutex<HashMap<String, StreamMark>>,
    clears: IntCounterVec,
}

impl Recovery {
    pub fn new(
        applier: Arc<EventApplier<SharedIndex>>,
        approx: Arc<ApproxPrefix>,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let clears = IntCounterVec::new(
            Opts::new(
                "kvroute_router_pod_recovery_clears_total",
                "Pods whose index entries were cleared when they rejoined the rotation (no proof of continuity)",
            ),
            &["pod"],
        )?;
        registry.register(Box::new(clears.clone()))?;
        Ok(Self {
            applier,
            approx,
            marker: OnceLock::new(),
            ranks: OnceLock::new(),
            down_marks: Mutex::new(HashMap::new()),
            clears,
        })
    }

    /// Sets where stream marks come from (once; without one, a returning pod is always
    /// cleared).
    pub fn set_marker(&self, m: Marker) {
        let _ = self.marker.set(m);
    }

    /// Sets how a pod's other data-parallel ranks are found (once).
    pub fn set_rank_pods(&self, f: RankPods) {
        let _ = self.ranks.set(f);
    }

    fn mark(&self, pod: &str) -> StreamMark {
        self.marker.get().and_then(|f| f(pod)).unwrap_or_default()
    }
}

impl HealthHook for Recovery {
    fn down(&self, b: &Backend) {
        let m = self.mark(&b.name);
        self.down_marks.lock().insert(b.name.clone(), m);
    }

    fn up(&self, b: &Backend) {
        let before = self.down_marks.lock().remove(&b.name).unwrap_or_default();
        let now = self.mark(&b.name);
        if self.marker.get().is_some() && continuous(before, now) {
            tracing::info!(pod = %b.name, ?before, ?now, "pod back; its KV events continued while it was out: index kept");
            return;
        }
        tracing::info!(pod = %b.name, "pod back without proof of continuity (it may have restarted): index entries cleared");
        self.clears.with_label_values(&[&b.name]).inc();
        self.approx.forget_pod(b.pod);
        let mut cleared = vec![b.pod];
        if let Some(f) = self.ranks.get() {
            cleared.extend(f(&b.name));
        }
        let applier = &self.applier;
        crate::blocking(|| cleared.iter().for_each(|&p| applier.clear_pod(p)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuity_needs_progress_and_no_restart() {
        let m = |s: Option<u64>, r| StreamMark { last_seq: s, restarts: r };
        assert!(continuous(m(Some(5), 0), m(Some(9), 0)));
        assert!(continuous(m(None, 0), m(Some(0), 0)));
        assert!(!continuous(m(Some(5), 0), m(Some(5), 0)), "silent while down");
        assert!(!continuous(m(Some(5), 0), m(Some(9), 1)), "restarted");
        assert!(!continuous(m(None, 0), m(None, 0)));
    }
}
