//! `kvroute_pod_*`: the router's per-pod view, read from the pool (and the index) at
//! scrape time — nothing on the request path. In rotation or not, the requests the router
//! has in flight and waiting for a first byte, the uncached prompt tokens queued for
//! prefill, what the last scrape of the pod's own `/metrics` said (KV-cache usage, waiting
//! requests, KV capacity), the index entries held for it, and whether it counts as
//! saturated by the gateway's rule. Pods that leave the pool (discovery) leave the output.
//! With a shared (Redis) index, the index count is one round trip per pod per scrape.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};

use crate::Gateway;

/// The configured gateway, shared, with its per-pod collector registered (the collector
/// holds it weakly: once the gateway is gone, it reports nothing).
pub fn shared(gateway: Gateway, registry: &Registry) -> Result<Arc<Gateway>, prometheus::Error> {
    let gateway = Arc::new(gateway);
    registry.register(Box::new(PodCollector::new(Arc::downgrade(&gateway))?))?;
    Ok(gateway)
}

struct PodCollector {
    gateway: Weak<Gateway>,
    up: IntGaugeVec,
    in_flight: IntGaugeVec,
    queued: IntGaugeVec,
    pending_prefill: IntGaugeVec,
    kv_usage: GaugeVec,
    waiting: GaugeVec,
    capacity: IntGaugeVec,
    index_blocks: IntGaugeVec,
    saturated: IntGaugeVec,
    /// One scrape fills the vectors at a time (they are reset, filled, then gathered).
    lock: Mutex<()>,
}

impl PodCollector {
    fn new(gateway: Weak<Gateway>) -> Result<Self, prometheus::Error> {
        let int = |n: &str, h: &str| IntGaugeVec::new(Opts::new(n, h), &["pod"]);
        let float = |n: &str, h: &str| GaugeVec::new(Opts::new(n, h), &["pod"]);
        Ok(Self {
            gateway,
            up: int("kvroute_pod_up", "1 while the pod is in rotation (health probes and requests succeed), else 0")?,
            in_flight: int("kvroute_pod_in_flight", "Requests the router has in flight to the pod")?,
            queued: int("kvroute_pod_queued", "Requests sent to the pod that have no first byte back yet")?,
            pending_prefill: int(
                "kvroute_pod_pending_prefill_tokens",
                "Uncached prompt tokens of the pod's requests without a first byte yet (the router's estimate)",
            )?,
            kv_usage: float(
                "kvroute_pod_kv_cache_usage_ratio",
                "The pod's vllm:kv_cache_usage_perc (0-1) at the last scrape (absent when the scrape is stale)",
            )?,
            waiting: float(
                "kvroute_pod_engine_waiting_requests",
                "The pod's vllm:num_requests_waiting at the last scrape (absent when the scrape is stale)",
            )?,
            capacity: int(
                "kvroute_pod_kv_capacity_blocks",
                "The pod's KV capacity in blocks, from vllm:cache_config_info{num_gpu_blocks} (absent until scraped)",
            )?,
            index_blocks: int(
                "kvroute_pod_index_blocks",
                "(block, tier) entries the router's index holds for the pod (as /v1/kv/pods `blocks`)",
            )?,
            saturated: int(
                "kvroute_pod_saturated",
                "1 while the pod counts as saturated (router queue full, or engine queue or KV-cache usage at the saturation thresholds)",
            )?,
            lock: Mutex::new(()),
        })
    }

    fn all(&self) -> [&dyn Collector; 9] {
        [
            &self.up,
            &self.in_flight,
            &self.queued,
            &self.pending_prefill,
            &self.kv_usage,
            &self.waiting,
            &self.capacity,
            &self.index_blocks,
            &self.saturated,
        ]
    }
}

impl Collector for PodCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.all().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self.lock.lock();
        let ints = [
            &self.up,
            &self.in_flight,
            &self.queued,
            &self.pending_prefill,
            &self.capacity,
            &self.index_blocks,
            &self.saturated,
        ];
        for v in ints {
            v.reset();
        }
        self.kv_usage.reset();
        self.waiting.reset();
        let Some(gw) = self.gateway.upgrade() else { return Vec::new() };
        let index = gw.applier.index();
        let max_age = gw.scrape_max_age;
        for b in gw.pool.backends().iter() {
            let pod = [b.name.as_str()];
            let queued = b.queued.load(Relaxed);
            let (kv, waiting) = (b.kv_usage(max_age), b.waiting(max_age));
            self.up.with_label_values(&pod).set(b.is_healthy() as i64);
            self.in_flight.with_label_values(&pod).set(i64::from(b.in_flight.load(Relaxed)));
            self.queued.with_label_values(&pod).set(i64::from(queued));
            self.pending_prefill
                .with_label_values(&pod)
                .set(b.pending_prefill.load(Relaxed).min(i64::MAX as u64) as i64);
            if let Some(k) = kv {
                self.kv_usage.with_label_values(&pod).set(k);
            }
            if let Some(w) = waiting {
                self.waiting.with_label_values(&pod).set(w);
            }
            if let Some(n) = b.gpu_blocks() {
                self.capacity.with_label_values(&pod).set(n.min(i64::MAX as u64) as i64);
            }
            self.index_blocks.with_label_values(&pod).set(index.pod_entries(b.pod).min(i64::MAX as u64) as i64);
            self.saturated.with_label_values(&pod).set(gw.saturation.busy(queued, waiting, kv) as i64);
        }
        self.all().into_iter().flat_map(|c| c.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::Saturation;

    #[test]
    fn a_pod_is_saturated_by_any_one_threshold_and_unknown_scrapes_do_not_count() {
        let s = Saturation { max_queued_per_pod: 4, queue_depth: 5.0, kv_cache_utilization: 0.8 };
        assert!(!s.busy(3, Some(4.0), Some(0.79)));
        assert!(s.busy(4, None, None), "router queue full");
        assert!(s.busy(0, Some(5.0), None), "engine queue at depth");
        assert!(s.busy(0, None, Some(0.8)), "KV cache at the threshold");
        assert!(!s.busy(0, None, None), "nothing scraped: not saturated");
    }
}
