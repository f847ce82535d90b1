//! NVIDIA Dynamo's KV router, v1.1-era selection (../shared/research/dynamo-kv-router.md
//! §2.1–§2.5): for each worker `w` and a request of `ISL` tokens in `N` full blocks of `B`,
//!
//! ```text
//! cost_w = W · (A_w + ISL − B·O_w) / B  +  (U_w + N − depth_w)
//!          potential prefill blocks        potential decode (active) blocks
//! ```
//!
//! `O_w` the worker's cached prefix (blocks from block 0), `A_w` the prompt tokens routed to
//! it that have no first token yet (each counted as its uncached part at routing — kvroute's
//! `pending_prefill_tokens` is exactly that), `U_w` the distinct prompt blocks of its
//! in-flight requests and `depth_w` how many of this request's blocks are among them (the
//! router's own count: [`crate::PodView::active_blocks`], `active_prefix_blocks`).
//! Temperature 0 (the default): argmin, ties uniformly at random (the later code's rule;
//! v1.1 preferred the smaller cached tree). `W` = `overlap_score_weight` = 1.
//!
//! Two modes: with KV events (`O_w` from kvroute's index, as Dynamo's indexer), and
//! **approximate** (`use_kv_events=false`, §2.5): `O_w` from the router's own record of what
//! it routed where — every full block of the prompt believed cached on the chosen worker
//! at once, for `ttl_s` (120 s), re-inserting refreshes; past `max_blocks` (2^20) entries
//! the earliest-expiring go down to 80 %. Not reproduced: the queue gate that parks
//! requests when every worker is busy (`router_queue_threshold`), an admission policy
//! rather than a selection rule.

use std::collections::{BTreeSet, HashMap};

use parking_lot::Mutex;

use crate::{PodView, RequestView, Scorer};

#[derive(Clone, Debug, PartialEq)]
pub struct DynamoConfig {
    /// `overlap_score_weight` W.
    pub overlap_weight: f64,
    /// Approximate mode (no KV events): the router's own record of its picks.
    pub approximate: bool,
    /// `router_ttl_secs` (approximate mode).
    pub ttl_s: f64,
    /// `router_max_tree_size`, blocks (approximate mode).
    pub max_blocks: usize,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self { overlap_weight: 1.0, approximate: false, ttl_s: 120.0, max_blocks: 1 << 20 }
    }
}

/// Approximate mode's record: (key, worker) → expiry, and the eviction order (expiry
/// bits, then the deepest position first, key, worker).
#[derive(Default)]
struct Record {
    expiry: HashMap<(u64, String), f64>,
    order: BTreeSet<(u64, u64, u64, String)>,
}

pub struct Dynamo {
    pub cfg: DynamoConfig,
    record: Mutex<Record>,
}

impl Dynamo {
    pub fn new(cfg: DynamoConfig) -> Self {
        Self { cfg, record: Mutex::default() }
    }

    /// `O_w` in blocks.
    fn overlap(&self, req: &RequestView, pod: &PodView, rec: &Record) -> usize {
        if !self.cfg.approximate {
            return pod.matched_blocks;
        }
        req.keys.iter().take_while(|k| rec.expiry.get(&(**k, pod.name.clone())).is_some_and(|&e| e > req.now_s)).count()
    }

    /// Each pod's cost.
    pub fn costs(&self, req: &RequestView, pods: &[PodView]) -> Vec<f64> {
        let rec = self.record.lock();
        let b = req.block_size.max(1) as f64;
        let n = req.total_blocks as f64;
        pods.iter()
            .map(|p| {
                let o = self.overlap(req, p, &rec) as f64;
                let prefill = (p.pending_prefill_tokens.max(0.0) + (req.prompt_tokens as f64 - b * o).max(0.0)) / b;
                let decode = p.active_blocks as f64 + n - p.active_prefix_blocks as f64;
                self.cfg.overlap_weight * prefill + decode
            })
            .collect()
    }
}

impl Scorer for Dynamo {
    fn name(&self) -> &str {
        if self.cfg.approximate {
            "dynamo-approx-scorer"
        } else {
            "dynamo-kv-scorer"
        }
    }
    fn score(&self, req: &RequestView, pods: &[PodView]) -> Vec<f64> {
        let c = self.costs(req, pods);
        let min = c.iter().copied().fold(f64::INFINITY, f64::min);
        c.iter().map(|&x| if x <= min + 1e-9 { 1.0 } else { 0.0 }).collect()
    }
    fn observe_pick(&self, req: &RequestView, pods: &[PodView], pick: usize) {
        if !self.cfg.approximate {
            return;
        }
        let name = &pods[pick].name;
        let expiry = req.now_s + self.cfg.ttl_s;
        let mut rec = self.record.lock();
        for (depth, k) in req.keys.iter().enumerate() {
            // A chained key always sits at the same depth.
            let deep = u64::MAX - depth as u64;
            if let Some(old) = rec.expiry.insert((*k, name.clone()), expiry) {
                rec.order.remove(&(old.to_bits(), deep, *k, name.clone()));
            }
            rec.order.insert((expiry.to_bits(), deep, *k, name.clone()));
        }
        // Expired entries, and past the budget the earliest-expiring down to 80 %.
        let keep = if rec.expiry.len() > self.cfg.max_blocks { self.cfg.max_blocks / 10 * 8 } else { usize::MAX };
        while let Some(first) = rec.order.first() {
            if f64::from_bits(first.0) > req.now_s && rec.expiry.len() <= keep {
                break;
            }
            if let Some((_, _, k, w)) = rec.order.pop_first() {
                rec.expiry.remove(&(k, w));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, matched: usize, pending: f64, active: usize, depth: usize) -> PodView {
        PodView {
            name: name.into(),
            matched_blocks: matched,
            pending_prefill_tokens: pending,
            active_blocks: active,
            active_prefix_blocks: depth,
            ..Default::default()
        }
    }
    fn req(blocks: usize, now_s: f64) -> RequestView {
        RequestView {
            prompt_tokens: blocks * 16,
            block_size: 16,
            total_blocks: blocks,
            keys: (1..=blocks as u64).collect::<Vec<_>>().into(),
            now_s,
            ..Default::default()
        }
    }

    #[test]
    fn the_docs_worked_example_and_the_cost_terms() {
        let d = Dynamo::new(DynamoConfig::default());
        // (prefill, decode) blocks = (8, 10) → 18; (5, 5) → 10; (2, 9) → 11: the second wins.
        // 10-block request: prefill = (A + 160 − 16·O)/16, decode = U + 10 − depth.
        let pods = [pod("a", 2, 0.0, 0, 0), pod("b", 5, 0.0, 0, 5), pod("c", 8, 0.0, 4, 5)];
        assert_eq!(d.costs(&req(10, 0.0), &pods), vec![18.0, 10.0, 11.0]);
        assert_eq!(d.score(&req(10, 0.0), &pods), vec![0.0, 1.0, 0.0]);
        // Queued prompt work counts in blocks: 64 pending tokens = 4 more blocks on b.
        let pods = [pod("a", 2, 0.0, 0, 0), pod("b", 5, 64.0, 0, 5)];
        assert_eq!(d.costs(&req(10, 0.0), &pods), vec![18.0, 14.0]);
        // Ties are all 1 (the picker chooses at random).
        assert_eq!(d.score(&req(10, 0.0), &[pod("x", 0, 0.0, 0, 0), pod("y", 0, 0.0, 0, 0)]), vec![1.0, 1.0]);
    }

    #[test]
    fn approximate_mode_believes_its_own_picks_until_the_ttl() {
        let d = Dynamo::new(DynamoConfig { approximate: true, ..Default::default() });
        let pods = [pod("a", 9, 0.0, 0, 0), pod("b", 0, 0.0, 0, 0)];
        // The index's matches are ignored: nothing routed yet, so a tie.
        assert_eq!(d.score(&req(10, 0.0), &pods), vec![1.0, 1.0]);
        d.observe_pick(&req(10, 0.0), &pods, 1);
        assert_eq!(d.costs(&req(10, 1.0), &pods), vec![20.0, 10.0], "b believed to hold all 10 blocks");
        assert_eq!(d.costs(&req(10, 121.0), &pods), vec![20.0, 20.0], "expired after 120 s");
    }

    #[test]
    fn approximate_mode_keeps_its_record_within_budget() {
        let d = Dynamo::new(DynamoConfig { approximate: true, max_blocks: 10, ..Default::default() });
        let pods = [pod("a", 0, 0.0, 0, 0)];
        d.observe_pick(&req(8, 0.0), &pods, 0);
        d.observe_pick(&req(8, 1.0).clone(), &[pod("b", 0, 0.0, 0, 0)], 0);
        let n = d.record.lock().expiry.len();
        assert!(n <= 10, "{n} entries");
        // a's entries expire first (earlier), b keeps its whole prompt.
        assert_eq!(d.costs(&req(8, 2.0), &[pod("b", 0, 0.0, 0, 0)]), vec![8.0]);
    }
}
