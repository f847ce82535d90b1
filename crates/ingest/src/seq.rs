//! Per-stream sequence tracking: in order, duplicate, gap, or engine restart.

/// What to do with a live message, given its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The next one expected: apply it.
    Apply,
    /// First message seen from this stream and it is not seq 0: history was missed
    /// (kvroute started after the engine); replay from 0 if possible, else apply.
    Joined,
    /// Already applied through a replay: skip it.
    Duplicate,
    /// Messages `from..seq` were lost: replay them (or, without replay, stop trusting
    /// what the index holds for this pod).
    Gap { from: u64 },
    /// The sequence went backwards: the engine restarted with a fresh publisher and an
    /// empty cache. Clear the pod, then replay the new publisher's buffer.
    Restart,
}

/// Sequence state of one publisher (one pod, one data-parallel rank).
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqTracker {
    last_live: Option<u64>,
    last_applied: Option<u64>,
}

impl SeqTracker {
    pub fn on_live(&mut self, seq: u64) -> Verdict {
        let restart = self.last_live.is_some_and(|l| seq <= l);
        self.last_live = Some(seq);
        if restart {
            return Verdict::Restart;
        }
        match self.last_applied {
            None if seq == 0 => Verdict::Apply,
            None => Verdict::Joined,
            Some(a) if seq <= a => Verdict::Duplicate,
            Some(a) if seq == a + 1 => Verdict::Apply,
            Some(a) => Verdict::Gap { from: a + 1 },
        }
    }

    /// Records that the batch `seq` has been applied (live or replayed).
    pub fn applied(&mut self, seq: u64) {
        self.last_applied = Some(self.last_applied.map_or(seq, |a| a.max(seq)));
    }

    /// Forgets what was applied (after a restart or an unrecoverable gap).
    pub fn reset_applied(&mut self) {
        self.last_applied = None;
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

    #[test]
    fn in_order_gap_duplicate_restart() {
        let mut t = SeqTracker::default();
        assert_eq!(t.on_live(0), Verdict::Apply);
        t.applied(0);
        assert_eq!(t.on_live(1), Verdict::Apply);
        t.applied(1);
        assert_eq!(t.on_live(4), Verdict::Gap { from: 2 });
        // The replay applied 2..=5; 5 then arrives live.
        (2..=5).for_each(|s| t.applied(s));
        assert_eq!(t.on_live(5), Verdict::Duplicate);
        assert_eq!(t.on_live(6), Verdict::Apply);
        t.applied(6);
        assert_eq!(t.on_live(0), Verdict::Restart);
        t.reset_applied();
        t.applied(0);
        assert_eq!(t.on_live(1), Verdict::Apply);
    }

    #[test]
    fn joining_mid_stream() {
        let mut t = SeqTracker::default();
        assert_eq!(t.on_live(41), Verdict::Joined);
        t.applied(41);
        assert_eq!(t.on_live(42), Verdict::Apply);
    }
}
