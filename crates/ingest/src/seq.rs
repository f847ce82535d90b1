//! Per-stream sequence tracking: in order, duplicate, gap, or a backwards sequence.
//!
//! The tracker only classifies; what the worker does with an anomaly (a gap or a
//! backwards sequence) is its *confirmation rule* (see [`crate::Ingestor`]): an anomalous
//! message is held as a suspect and acted upon only when the stream continues from it.

/// What a live message's sequence number says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The next one expected: apply it.
    Apply,
    /// First message seen from this stream and it is not seq 0: history was missed
    /// (kvroute started after the engine); replay from 0 if possible, else apply.
    Joined,
    /// Already applied through a replay: skip it.
    Duplicate,
    /// Messages `from..seq` were not seen: replay them if possible; without a replay that
    /// covers them, the gap only counts once the stream continues after it.
    Gap { from: u64 },
    /// The sequence went back to or below one already seen live: an engine restart (fresh
    /// publisher, empty cache) — or a forged or stray message. Acted upon only once the
    /// stream continues from it.
    Backwards,
}

/// Sequence state of one publisher (one pod, one data-parallel rank).
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqTracker {
    last_live: Option<u64>,
    last_applied: Option<u64>,
}

impl SeqTracker {
    /// Classifies a live message (does not record it: see [`SeqTracker::seen`]).
    pub fn on_live(&self, seq: u64) -> Verdict {
        if self.last_live.is_some_and(|l| seq <= l) {
            return Verdict::Backwards;
        }
        match self.last_applied {
            None if seq == 0 => Verdict::Apply,
            None => Verdict::Joined,
            Some(a) if seq <= a => Verdict::Duplicate,
            Some(a) if seq == a + 1 => Verdict::Apply,
            Some(a) => Verdict::Gap { from: a + 1 },
        }
    }

    /// Records a live message accepted as part of the stream (not a held suspect).
    pub fn seen(&mut self, seq: u64) {
        self.last_live = Some(self.last_live.map_or(seq, |l| l.max(seq)));
    }

    /// Records that the batch `seq` has been applied (live or replayed).
    pub fn applied(&mut self, seq: u64) {
        self.last_applied = Some(self.last_applied.map_or(seq, |a| a.max(seq)));
    }

    /// Forgets everything (a confirmed restart or unrepairable gap).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub fn last_applied(&self) -> Option<u64> {
        self.last_applied
    }

    pub fn last_live(&self) -> Option<u64> {
        self.last_live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(t: &mut SeqTracker, seq: u64) -> Verdict {
        let v = t.on_live(seq);
        if matches!(v, Verdict::Apply | Verdict::Joined | Verdict::Duplicate) {
            t.seen(seq);
        }
        v
    }

    #[test]
    fn in_order_gap_duplicate_backwards() {
        let mut t = SeqTracker::default();
        assert_eq!(live(&mut t, 0), Verdict::Apply);
        t.applied(0);
        assert_eq!(live(&mut t, 1), Verdict::Apply);
        t.applied(1);
        assert_eq!(live(&mut t, 4), Verdict::Gap { from: 2 });
        // The replay applied 2..=5; 5 then arrives live.
        (2..=5).for_each(|s| t.applied(s));
        assert_eq!(live(&mut t, 5), Verdict::Duplicate);
        assert_eq!(live(&mut t, 6), Verdict::Apply);
        t.applied(6);
        assert_eq!(live(&mut t, 0), Verdict::Backwards);
        t.reset();
        t.applied(0);
        assert_eq!(live(&mut t, 1), Verdict::Apply);
    }

    #[test]
    fn a_held_suspect_does_not_move_the_stream() {
        let mut t = SeqTracker::default();
        assert_eq!(live(&mut t, 0), Verdict::Apply);
        t.applied(0);
        assert_eq!(live(&mut t, 1_000_000), Verdict::Gap { from: 1 });
        // Not recorded as seen: the real next message is still in order.
        assert_eq!(live(&mut t, 1), Verdict::Apply);
    }

    #[test]
    fn joining_mid_stream() {
        let mut t = SeqTracker::default();
        assert_eq!(live(&mut t, 41), Verdict::Joined);
        t.applied(41);
        assert_eq!(live(&mut t, 42), Verdict::Apply);
    }
}
