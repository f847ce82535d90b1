//! Per-pod ingestion series, read from the [`PodTable`] at scrape time: when each pod's
//! last KV-event batch arrived (the "ingestion stalled" alert and the time-since-last-event
//! panel), how far behind the engine's clock it was, and the pod's own message, gap and
//! replay-failure counts. A pod discovery removed leaves the table, and its series go with it.
//! Data-parallel ranks above 0 are their own pods (`<pod>#dp<rank>`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounterVec, Opts};

use crate::stats::PodTable;

pub(crate) struct PodCollector {
    table: Arc<PodTable>,
    last_event: GaugeVec,
    lag: GaugeVec,
    messages: IntCounterVec,
    gaps: IntCounterVec,
    replay_failures: IntCounterVec,
    /// One scrape fills the vectors at a time (they are reset, filled, then gathered).
    lock: Mutex<()>,
}

impl PodCollector {
    pub(crate) fn new(table: Arc<PodTable>) -> Result<Self, prometheus::Error> {
        let gauge = |n: &str, h: &str| GaugeVec::new(Opts::new(n, h), &["pod"]);
        let counter = |n: &str, h: &str| IntCounterVec::new(Opts::new(n, h), &["pod"]);
        Ok(Self {
            table,
            last_event: gauge(
                "kvroute_ingest_pod_last_event_timestamp_seconds",
                "When the pod's last live KV-event batch arrived (Unix time, router clock)",
            )?,
            lag: gauge(
                "kvroute_ingest_pod_event_lag_seconds",
                "Arrival of the pod's last live KV-event batch minus the batch's engine timestamp `ts` (clock skew included)",
            )?,
            messages: counter(
                "kvroute_ingest_pod_messages_total",
                "Live KV-event messages received from the pod (malformed ones included)",
            )?,
            gaps: counter("kvroute_ingest_pod_seq_gaps_total", "Sequence gaps detected in the pod's stream")?,
            replay_failures: counter(
                "kvroute_ingest_pod_replay_failures_total",
                "Replays of the pod's stream that failed or were incomplete",
            )?,
            lock: Mutex::new(()),
        })
    }
}

impl Collector for PodCollector {
    fn desc(&self) -> Vec<&Desc> {
        [self.last_event.desc(), self.lag.desc(), self.messages.desc(), self.gaps.desc(), self.replay_failures.desc()]
            .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self.lock.lock();
        self.last_event.reset();
        self.lag.reset();
        self.messages.reset();
        self.gaps.reset();
        self.replay_failures.reset();
        for (pod, c) in self.table.all() {
            let last = f64::from_bits(c.last_event_unix.load(Relaxed));
            if last > 0.0 {
                self.last_event.with_label_values(&[&pod]).set(last);
                self.lag.with_label_values(&[&pod]).set(f64::from_bits(c.last_event_lag.load(Relaxed)));
            }
            self.messages.with_label_values(&[&pod]).inc_by(c.received.load(Relaxed));
            self.gaps.with_label_values(&[&pod]).inc_by(c.gaps.load(Relaxed));
            self.replay_failures.with_label_values(&[&pod]).inc_by(c.replay_failures.load(Relaxed));
        }
        [
            self.last_event.collect(),
            self.lag.collect(),
            self.messages.collect(),
            self.gaps.collect(),
            self.replay_failures.collect(),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metrics;
    use prometheus::{Encoder, Registry, TextEncoder};

    fn scrape(reg: &Registry) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&reg.gather(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn each_pod_is_a_series_read_at_scrape_time_and_a_removed_pod_leaves() {
        let reg = Registry::new();
        let m = Metrics::new(&reg).unwrap();
        let a = m.pods.get("10.0.0.1:8000");
        a.received.fetch_add(3, Relaxed);
        a.gaps.fetch_add(1, Relaxed);
        a.last_event_unix.store(1_700_000_000.5f64.to_bits(), Relaxed);
        a.last_event_lag.store(0.25f64.to_bits(), Relaxed);
        let b = m.pods.get("10.0.0.2:8000");
        b.replay_failures.fetch_add(2, Relaxed);
        let text = scrape(&reg);
        for line in [
            "kvroute_ingest_pod_last_event_timestamp_seconds{pod=\"10.0.0.1:8000\"} 1700000000.5",
            "kvroute_ingest_pod_event_lag_seconds{pod=\"10.0.0.1:8000\"} 0.25",
            "kvroute_ingest_pod_messages_total{pod=\"10.0.0.1:8000\"} 3",
            "kvroute_ingest_pod_seq_gaps_total{pod=\"10.0.0.1:8000\"} 1",
            "kvroute_ingest_pod_replay_failures_total{pod=\"10.0.0.2:8000\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        // No event yet from .2: no timestamp (an alert on its age must not see 1970).
        assert!(!text.contains("kvroute_ingest_pod_last_event_timestamp_seconds{pod=\"10.0.0.2:8000\"}"));
        // Counters move between scrapes; a forgotten pod's series disappear.
        a.received.fetch_add(1, Relaxed);
        m.pods.remove("10.0.0.2:8000");
        let text = scrape(&reg);
        assert!(text.lines().any(|l| l == "kvroute_ingest_pod_messages_total{pod=\"10.0.0.1:8000\"} 4"), "{text}");
        assert!(!text.contains("10.0.0.2:8000"), "{text}");
    }
}
