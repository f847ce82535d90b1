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
///
/// The walk keeps pod sets as bitsets (one bit per pod id): per block, each entry only
/// sets a bit, so the cost per (block, pod) entry is a couple of instructions.
#[derive(Default)]
pub struct Scratch {
    /// Pods whose run is still going.
    alive: Vec<u64>,
    /// Pods holding the current block (any tier).
    present: Vec<u64>,
    /// Pods holding the current block on a top-weight tier.
    top: Vec<u64>,
    /// Candidate filter (all ones when scoring every pod).
    allowed: Vec<u64>,
    /// Matched blocks of pods whose run ended.
    len: Vec<u32>,
    /// Weight lost on blocks a pod held only on lower tiers.
    deduct: Vec<f64>,
    /// Best lower-tier weight this block (`stamp` = block + 1 when set).
    low_best: Vec<f64>,
    low_stamp: Vec<u32>,
    low_pods: Vec<PodId>,
    /// Pods holding block 0.
    first: Vec<PodId>,
}

impl Scratch {
    fn ensure(&mut self, pods: usize) {
        let words = pods.div_ceil(64);
        if self.alive.len() < words {
            for v in [&mut self.alive, &mut self.present, &mut self.top] {
                v.resize(words, 0);
            }
            self.allowed.resize(words, 0);
        }
        if self.len.len() < words * 64 {
            let n = words * 64;
            self.len.resize(n, 0);
            self.deduct.resize(n, 0.0);
            self.low_best.resize(n, 0.0);
            self.low_stamp.resize(n, 0);
        }
    }
}

#[inline]
fn bit(v: &[u64], p: usize) -> bool {
    v[p >> 6] & (1 << (p & 63)) != 0
}

/// Tier-weighted longest-consecutive-prefix scorer.
#[derive(Clone, Debug)]
pub struct LongestPrefixScorer {
    weights: [f64; MAX_TIERS],
    w_max: f64,
    is_top: [bool; MAX_TIERS],
}

impl Default for LongestPrefixScorer {
    fn default() -> Self {
        Self::new(kvroute_index::Tiers::default().weights())
    }
}

impl LongestPrefixScorer {
    pub fn new(weights: [f64; MAX_TIERS]) -> Self {
        let w_max = weights.iter().copied().fold(f64::MIN, f64::max);
        Self { weights, w_max, is_top: weights.map(|w| w == w_max) }
    }

    pub fn weights(&self) -> &[f64; MAX_TIERS] {
        &self.weights
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
        let max_cand = candidates.and_then(|c| c.iter().copied().max()).map_or(0, |m| m as usize + 1);
        scratch.ensure(max_cand.max(64));
        let filter = candidates.is_some();
        match candidates {
            Some(c) => c.iter().for_each(|&p| scratch.allowed[p as usize >> 6] |= 1 << (p & 63)),
            None => scratch.allowed.iter_mut().for_each(|w| *w = !0),
        }
        scratch.first.clear();
        let mut blocks_walked = 0u32;
        let mut visit = |i: usize, entries: &[PodEntry]| -> bool {
            let s = &mut *scratch;
            let i = i as u32;
            // 1. Mark who holds this block. Bits are gathered in registers and written
            //    when the word changes (OR-ing memory per entry would serialise on
            //    store forwarding: with ≤ 64 pods every entry hits the same word).
            let (mut word, mut pres, mut top) = (usize::MAX, 0u64, 0u64);
            for e in entries {
                let p = e.pod() as usize;
                let k = p >> 6;
                if k != word {
                    if word != usize::MAX {
                        s.present[word] |= pres;
                        s.top[word] |= top;
                    }
                    if k >= s.present.len() {
                        if filter {
                            word = usize::MAX;
                            continue; // beyond every candidate
                        }
                        s.ensure(p + 1);
                        s.allowed.iter_mut().for_each(|w| *w = !0);
                    }
                    (word, pres, top) = (k, 0, 0);
                }
                let b = 1u64 << (p & 63);
                pres |= b;
                let t = e.tier() as usize;
                if self.is_top[t] {
                    top |= b;
                } else {
                    // Lower tiers (rare: CPU offload) need per-pod bookkeeping.
                    let w = self.weights[t];
                    if s.low_stamp[p] != i + 1 {
                        s.low_stamp[p] = i + 1;
                        s.low_best[p] = w;
                        s.low_pods.push(p as PodId);
                    } else if w > s.low_best[p] {
                        s.low_best[p] = w;
                    }
                }
            }
            if word != usize::MAX {
                s.present[word] |= pres;
                s.top[word] |= top;
            }
            // 2. Intersect with the pods still running; record where runs end.
            let mut any = false;
            for k in 0..s.present.len() {
                let held = s.present[k] & s.allowed[k];
                let prev = if i == 0 { held } else { s.alive[k] };
                let next = prev & held;
                let mut ended = prev & !held;
                while ended != 0 {
                    s.len[k * 64 + ended.trailing_zeros() as usize] = i;
                    ended &= ended - 1;
                }
                if i == 0 {
                    let mut b = next;
                    while b != 0 {
                        s.first.push((k * 64 + b.trailing_zeros() as usize) as PodId);
                        b &= b - 1;
                    }
                }
                s.alive[k] = next;
                any |= next != 0;
            }
            // 3. Pods that hold this block only on lower tiers lose weight.
            for j in 0..s.low_pods.len() {
                let p = s.low_pods[j] as usize;
                if bit(&s.alive, p) && !bit(&s.top, p) {
                    s.deduct[p] += self.w_max - s.low_best[p];
                }
            }
            s.low_pods.clear();
            s.present.iter_mut().for_each(|w| *w = 0);
            s.top.iter_mut().for_each(|w| *w = 0);
            blocks_walked = i + 1;
            any
        };
        if !keys.is_empty() {
            index.prefix_lookup(keys, &mut visit);
        }
        let s = scratch;
        // Pods still running when the walk stopped matched every block walked.
        for k in 0..s.alive.len() {
            let mut b = std::mem::take(&mut s.alive[k]);
            while b != 0 {
                s.len[k * 64 + b.trailing_zeros() as usize] = blocks_walked;
                b &= b - 1;
            }
        }
        let total = keys.len().max(1) as f64;
        let mut out: Vec<PodScore> = s
            .first
            .iter()
            .map(|&p| {
                let pi = p as usize;
                let weighted = s.len[pi] as f64 * self.w_max - s.deduct[pi];
                PodScore { pod: p, matched_blocks: s.len[pi] as usize, weighted, score: weighted / total }
            })
            .collect();
        for &p in &s.first {
            s.len[p as usize] = 0;
            s.deduct[p as usize] = 0.0;
        }
        s.low_stamp.iter_mut().for_each(|x| *x = 0);
        s.allowed.iter_mut().for_each(|w| *w = 0);
        if let Some(c) = candidates {
            for &p in c {
                if !out.iter().any(|x| x.pod == p) {
                    out.push(PodScore { pod: p, matched_blocks: 0, weighted: 0.0, score: 0.0 });
                }
            }
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
