//! # kvroute-score — keys → scores
//!
//! Owns the question "how much of this request's prefix does each pod already hold?".
//! [`LongestPrefixScorer`] walks a request's block keys from block 0 through a
//! [`BlockIndex`] and gives each pod the length of its run of consecutive cached blocks
//! (a pod drops out at its first missing block), weighted per block by the best tier
//! the pod holds it on (gpu 1.0, cpu 0.8 by default; see [`kvroute_index::Tiers`]).
//! The normalised score is the weighted run divided by the request's block count, so
//! 1.0 means "every full block is cached on GPU".

use kvroute_index::{BlockIndex, PodEntry, PodId, MAX_TIERS};
use serde::Serialize;

/// One pod's result for one request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PodScore {
    pub pod: PodId,
    /// Consecutive blocks from block 0 the pod holds (any tier).
    pub matched_blocks: usize,
    /// Sum over those blocks of the best tier weight the pod holds each on.
    pub weighted: f64,
    /// `weighted / total blocks`, in `0.0..=1.0` when weights are ≤ 1.
    pub score: f64,
}

/// Reusable per-thread scratch space, so scoring allocates nothing in steady state.
#[derive(Default)]
pub struct Scratch {
    run: Vec<u32>,
    cur: Vec<f32>,
    sum: Vec<f64>,
    allowed: Vec<bool>,
    touched: Vec<PodId>,
}

/// Tier-weighted longest-consecutive-prefix scorer.
#[derive(Clone, Debug)]
pub struct LongestPrefixScorer {
    weights: [f64; MAX_TIERS],
}

impl Default for LongestPrefixScorer {
    fn default() -> Self {
        Self::new(kvroute_index::Tiers::default().weights())
    }
}

impl LongestPrefixScorer {
    pub fn new(weights: [f64; MAX_TIERS]) -> Self {
        Self { weights }
    }

    /// Scores pods for `keys`. With `candidates`, only those pods are scored and every one
    /// of them is returned (0 when it holds nothing); without, every pod holding block 0.
    /// Sorted best first (ties by pod id).
    pub fn score<I: BlockIndex + ?Sized>(
        &self,
        index: &I,
        keys: &[u64],
        candidates: Option<&[PodId]>,
        scratch: &mut Scratch,
    ) -> Vec<PodScore> {
        let Scratch { run, cur, sum, allowed, touched } = scratch;
        touched.clear();
        if let Some(c) = candidates {
            let max = c.iter().copied().max().map_or(0, |m| m as usize + 1);
            if allowed.len() < max {
                allowed.resize(max, false);
            }
            for &p in c {
                allowed[p as usize] = true;
            }
        }
        let weights = &self.weights;
        let mut visit = |i: usize, entries: &[PodEntry]| -> bool {
            let i = i as u32;
            let mut advanced = false;
            for e in entries {
                let p = e.pod() as usize;
                if candidates.is_some() && !allowed.get(p).copied().unwrap_or(false) {
                    continue;
                }
                if p >= run.len() {
                    run.resize(p + 1, 0);
                    cur.resize(p + 1, 0.0);
                    sum.resize(p + 1, 0.0);
                }
                let w = weights[e.tier() as usize] as f32;
                if run[p] == i {
                    if i == 0 {
                        touched.push(p as PodId);
                    }
                    run[p] = i + 1;
                    cur[p] = w;
                    sum[p] += w as f64;
                    advanced = true;
                } else if run[p] == i + 1 && w > cur[p] {
                    sum[p] += (w - cur[p]) as f64;
                    cur[p] = w;
                }
            }
            advanced
        };
        if !keys.is_empty() {
            index.prefix_lookup(keys, &mut visit);
        }
        let total = keys.len().max(1) as f64;
        let mut out: Vec<PodScore> = touched
            .iter()
            .map(|&p| {
                let pi = p as usize;
                PodScore { pod: p, matched_blocks: run[pi] as usize, weighted: sum[pi], score: sum[pi] / total }
            })
            .collect();
        // Reset scratch for the next call.
        for &p in touched.iter() {
            let pi = p as usize;
            run[pi] = 0;
            cur[pi] = 0.0;
            sum[pi] = 0.0;
        }
        if let Some(c) = candidates {
            for &p in c {
                allowed[p as usize] = false;
                if !out.iter().any(|s| s.pod == p) {
                    out.push(PodScore { pod: p, matched_blocks: 0, weighted: 0.0, score: 0.0 });
                }
            }
            out.dedup_by_key(|s| s.pod);
        }
        out.sort_by(|a, b| b.weighted.total_cmp(&a.weighted).then(a.pod.cmp(&b.pod)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_index::{InMemoryIndex, IndexConfig, Tiers};

    #[test]
    fn longest_run_from_block_zero_with_tier_weights() {
        let idx = InMemoryIndex::new(IndexConfig::default());
        idx.store(0, Tiers::GPU, &[1, 2, 3]);
        idx.store(1, Tiers::GPU, &[1, 2]);
        idx.store(1, Tiers::CPU, &[3, 4]);
        idx.store(2, Tiers::GPU, &[2, 3, 4]); // no block 0: no score
        idx.store(3, Tiers::CPU, &[1]);
        idx.store(3, Tiers::GPU, &[1]); // best tier counts
        let s = LongestPrefixScorer::default();
        let mut scratch = Scratch::default();
        let r = s.score(&idx, &[1, 2, 3, 4], None, &mut scratch);
        let got: Vec<(PodId, usize, f64)> =
            r.iter().map(|x| (x.pod, x.matched_blocks, (x.weighted * 100.0).round() / 100.0)).collect();
        assert_eq!(got, vec![(1, 4, 3.6), (0, 3, 3.0), (3, 1, 1.0)]);
        assert!((r[0].score - 0.9).abs() < 1e-6);
        // Candidates: every candidate is reported, others are not.
        let r = s.score(&idx, &[1, 2, 3, 4], Some(&[2, 0]), &mut scratch);
        let got: Vec<(PodId, usize)> = r.iter().map(|x| (x.pod, x.matched_blocks)).collect();
        assert_eq!(got, vec![(0, 3), (2, 0)]);
        // Scratch is reset between calls.
        let r = s.score(&idx, &[1], None, &mut scratch);
        assert_eq!(r.iter().map(|x| x.matched_blocks).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert!(s.score(&idx, &[], None, &mut scratch).is_empty());
    }
}
