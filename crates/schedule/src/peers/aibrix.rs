//! AIBrix's `prefix-cache` routing (../shared/research/peers-policies.md §3), with the
//! shipped manifests' values (128-byte blocks, imbalance 16, σ-factor 2, 200,000 blocks,
//! 20-minute TTL):
//!
//! the routing text's UTF-8 bytes cut into 128-byte blocks (full blocks only), hashed as a
//! chain (`h_i = xxhash(LE(h_{i−1}) ‖ block_i)`); an LRU store maps each hash to the pods it
//! was routed to. Load is the router's in-flight count. When max − min load exceeds the
//! imbalance count, only the least-loaded pods may match. Walking the hashes, each pod
//! still matching records the percentage of blocks matched so far; among the matched pods,
//! sorted by (percentage desc, load asc) with random order among equals, the first whose
//! load ≤ mean + 2σ (sample σ over all pods) is the target; if none, a random least-loaded
//! pod. The request's hashes are then recorded for the target.
//!
//! The hash is XXH3-64 (AIBrix uses xxhash64): any well-mixed 64-bit hash gives the same
//! routing, as only equality of hashes matters.

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::{PodView, RequestView, Scorer};

#[derive(Clone, Debug, PartialEq)]
pub struct AibrixConfig {
    /// `AIBRIX_PREFIX_CACHE_BLOCK_SIZE`, bytes.
    pub block_bytes: usize,
    /// `AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT`.
    pub imbalance_abs: u32,
    /// `AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR`.
    pub std_factor: f64,
    /// `AIBRIX_PREFIX_CACHE_BLOCK_NUMBER`.
    pub max_blocks: usize,
    /// Blocks not recorded for this long are dropped (20 min).
    pub ttl_s: f64,
}

impl Default for AibrixConfig {
    /// The shipped manifests' values.
    fn default() -> Self {
        Self { block_bytes: 128, imbalance_abs: 16, std_factor: 2.0, max_blocks: 200_000, ttl_s: 1200.0 }
    }
}

struct Entry {
    /// Pod → last time recorded.
    pods: HashMap<String, f64>,
    tick: u64,
}

#[derive(Default)]
struct Store {
    blocks: HashMap<u64, Entry>,
    /// Recency order (tick → hash) for LRU eviction.
    order: BTreeMap<u64, u64>,
    tick: u64,
}

pub struct AibrixPrefixCache {
    pub cfg: AibrixConfig,
    store: Mutex<Store>,
}

impl AibrixPrefixCache {
    pub fn new(cfg: AibrixConfig) -> Self {
        Self { cfg, store: Mutex::default() }
    }

    fn hashes(&self, text: &str) -> Vec<u64> {
        let mut prev = 0u64;
        text.as_bytes()
            .chunks_exact(self.cfg.block_bytes.max(1))
            .map(|b| {
                let mut buf = Vec::with_capacity(8 + b.len());
                buf.extend_from_slice(&prev.to_le_bytes());
                buf.extend_from_slice(b);
                prev = xxh3_64_with_seed(&buf, 0);
                prev
            })
            .collect()
    }

    /// The pods equally entitled to the request (the target's tie group, or the
    /// least-loaded fallback).
    fn decide(&self, req: &RequestView, pods: &[PodView]) -> Vec<usize> {
        if pods.is_empty() {
            return vec![];
        }
        let cnt: Vec<u32> = pods.iter().map(|p| p.in_flight).collect();
        let (lo, hi) = (*cnt.iter().min().unwrap_or(&0), *cnt.iter().max().unwrap_or(&0));
        let mins: Vec<usize> = (0..pods.len()).filter(|&i| cnt[i] == lo).collect();
        let mut live: Vec<usize> =
            if hi - lo > self.cfg.imbalance_abs { mins.clone() } else { (0..pods.len()).collect() };
        let hashes = self.hashes(&req.text);
        let mut matched: HashMap<usize, usize> = HashMap::new();
        let store = self.store.lock();
        for (i, h) in hashes.iter().enumerate() {
            let Some(e) = store.blocks.get(h) else { break };
            let pct = (i + 1) * 100 / hashes.len();
            let fresh = |p: &PodView| e.pods.get(&p.name).is_some_and(|t| req.now_s - t <= self.cfg.ttl_s);
            let hit: Vec<usize> = live.iter().copied().filter(|&j| fresh(&pods[j])).collect();
            if hit.is_empty() {
                break;
            }
            for &j in &hit {
                matched.insert(j, pct);
            }
            live = hit;
        }
        drop(store);
        if !matched.is_empty() {
            let n = cnt.len() as f64;
            let mean = cnt.iter().map(|&c| c as f64).sum::<f64>() / n;
            let var = if cnt.len() > 1 {
                cnt.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)
            } else {
                0.0
            };
            let limit = mean + self.cfg.std_factor * var.sqrt();
            let mut order: Vec<(usize, u32, usize)> = matched.iter().map(|(&j, &pct)| (pct, cnt[j], j)).collect();
            order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            if let Some(&(pct, c, _)) = order.iter().find(|(_, c, _)| *c as f64 <= limit) {
                return order.iter().filter(|o| o.0 == pct && o.1 == c).map(|o| o.2).collect();
            }
        }
        mins
    }
}

impl Scorer for AibrixPrefixCache {
    fn name(&self) -> &str {
        "aibrix-prefix-cache-scorer"
    }
    fn needs_text(&self) -> bool {
        true
    }
    fn score(&self, req: &RequestView, pods: &[PodView]) -> Vec<f64> {
        super::one_hot(pods.len(), &self.decide(req, pods))
    }
    fn observe_pick(&self, req: &RequestView, pods: &[PodView], pick: usize) {
        let hashes = self.hashes(&req.text);
        let mut s = self.store.lock();
        for h in hashes {
            s.tick += 1;
            let tick = s.tick;
            let old = s.blocks.get(&h).map(|e| e.tick);
            if let Some(t) = old {
                s.order.remove(&t);
            }
            let e = s.blocks.entry(h).or_insert_with(|| Entry { pods: HashMap::new(), tick });
            e.tick = tick;
            e.pods.retain(|_, t| req.now_s - *t <= self.cfg.ttl_s);
            e.pods.insert(pods[pick].name.clone(), req.now_s);
            s.order.insert(tick, h);
            while s.blocks.len() > self.cfg.max_blocks {
                let Some((_, old)) = s.order.pop_first() else { break };
                s.blocks.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::peers::loaded as pods;
    fn req(text: &str, now_s: f64) -> RequestView {
        RequestView { text: text.into(), now_s, ..Default::default() }
    }
    fn picks(a: &AibrixPrefixCache, r: &RequestView, p: &[PodView]) -> Vec<usize> {
        let v = a.score(r, p);
        (0..v.len()).filter(|&i| v[i] == 1.0).collect()
    }

    #[test]
    fn the_best_match_under_mean_plus_two_sigma_else_least_loaded() {
        let a = AibrixPrefixCache::new(AibrixConfig::default());
        let text = "x".repeat(512); // 4 blocks
        assert_eq!(picks(&a, &req(&text, 0.0), &pods(&[3, 1, 1, 5])), vec![1, 2], "no match: the least loaded");
        a.observe_pick(&req(&text, 0.0), &pods(&[3, 1, 1, 5]), 3);
        // p3 holds it; loads 3,1,1,5: mean 2.5, σ ≈ 1.91 → limit 6.33 ≥ 5.
        assert_eq!(picks(&a, &req(&text, 1.0), &pods(&[3, 1, 1, 5])), vec![3]);
        // p3 at 9: mean 3.5, σ ≈ 3.79 → limit 11.1: still p3.
        assert_eq!(picks(&a, &req(&text, 1.0), &pods(&[3, 1, 1, 9])), vec![3]);
        // Imbalance > 16: only the least-loaded pods may match → none holds it → least loaded.
        assert_eq!(picks(&a, &req(&text, 1.0), &pods(&[3, 1, 1, 18])), vec![1, 2]);
        // A longer match beats a shorter one; equal matches go to the less loaded.
        let longer = format!("{text}{}", "y".repeat(128));
        a.observe_pick(&req(&longer, 2.0), &pods(&[0, 0, 0, 0]), 0);
        assert_eq!(picks(&a, &req(&longer, 3.0), &pods(&[4, 1, 1, 2])), vec![0], "100 % on p0 vs 80 % on p3");
        assert_eq!(picks(&a, &req(&text, 3.0), &pods(&[4, 1, 1, 2])), vec![3], "both 100 %: p3 less loaded");
        // Past the TTL the record no longer counts.
        assert_eq!(picks(&a, &req(&text, 2000.0), &pods(&[4, 1, 1, 2])), vec![1, 2]);
    }

    #[test]
    fn the_store_keeps_the_most_recent_blocks() {
        let a = AibrixPrefixCache::new(AibrixConfig { max_blocks: 4, ..Default::default() });
        a.observe_pick(&req(&"a".repeat(512), 0.0), &pods(&[0, 0]), 1);
        a.observe_pick(&req(&"b".repeat(256), 0.0), &pods(&[0, 0]), 1);
        assert_eq!(picks(&a, &req(&"b".repeat(256), 0.0), &pods(&[0, 0])), vec![1]);
        assert_eq!(picks(&a, &req(&"a".repeat(512), 0.0), &pods(&[0, 0])), vec![0, 1], "a's first blocks were evicted");
    }
}
