//! Rate-limited warnings: at most one line per kind of dropped or malformed message per
//! interval, with how many there were since the last line.

use std::collections::HashMap;
use std::fmt::Display;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::warn;

#[derive(Default)]
struct Kind {
    last: Option<Instant>,
    /// Messages of this kind not yet reported.
    unreported: u64,
    /// The latest one's description.
    example: String,
}

/// One warning per kind per `interval`.
pub(crate) struct RateLog {
    interval: Duration,
    kinds: Mutex<HashMap<&'static str, Kind>>,
}

impl RateLog {
    pub fn new(interval: Duration) -> Self {
        Self { interval, kinds: Mutex::default() }
    }

    /// Records one message of `kind`; logs now if this kind was not logged within the interval.
    pub fn note(&self, kind: &'static str, detail: impl Display) {
        let now = Instant::now();
        let mut kinds = self.kinds.lock();
        let k = kinds.entry(kind).or_default();
        k.unreported += 1;
        if k.last.is_none_or(|l| now.duration_since(l) >= self.interval) {
            warn!(
                kind,
                count = k.unreported,
                "dropped KV-event message: {detail} ({} of this kind since the last warning)",
                k.unreported
            );
            k.last = Some(now);
            k.unreported = 0;
        } else {
            k.example = detail.to_string();
        }
    }

    /// Reports kinds whose interval has passed with messages not yet reported.
    pub fn flush(&self) {
        let now = Instant::now();
        for (kind, k) in self.kinds.lock().iter_mut() {
            if k.unreported > 0 && k.last.is_none_or(|l| now.duration_since(l) >= self.interval) {
                warn!(
                    kind = *kind,
                    count = k.unreported,
                    "dropped {} KV-event messages of this kind in the last {:?}; latest: {}",
                    k.unreported,
                    self.interval,
                    k.example
                );
                k.last = Some(now);
                k.unreported = 0;
            }
        }
    }
}
