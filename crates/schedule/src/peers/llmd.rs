//! llm-d's current approximate prefix producer (`approx-prefix-cache-producer`,
//! ../shared/research/peers-policies.md §4): it hashes token ids in blocks of
//! `blockSizeTokens` — auto-tuned from the engine's block size but clamped to ≥ 64 —,
//! matches at most `maxPrefixTokensToMatch` (131,072) tokens, keeps an LRU of
//! `lruCapacityPerServer` (31,250) blocks per endpoint, and records the chosen endpoint's
//! blocks when the request is sent (PreRequest). `prefix-cache-scorer` then scores
//! `matched blocks / total blocks` (`matchLengthWeight` 0). kvroute's request keys are
//! prefix-chained at the engine's block size, so the key ending each 64-token block stands
//! for that block (the same equality llm-d's chained hash gives).

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;

use crate::{PodView, RequestView, Scorer};

#[derive(Clone, Debug, PartialEq)]
pub struct LlmdApproxConfig {
    /// `blockSizeTokens` floor (llm-d #1158 clamps to ≥ 64).
    pub min_block_tokens: usize,
    /// `maxPrefixTokensToMatch`.
    pub max_prefix_tokens: usize,
    /// `lruCapacityPerServer`, blocks.
    pub lru_per_server: usize,
}

impl Default for LlmdApproxConfig {
    fn default() -> Self {
        Self { min_block_tokens: 64, max_prefix_tokens: 131_072, lru_per_server: 31_250 }
    }
}

#[derive(Default)]
struct Lru {
    tick: u64,
    at: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
}

pub struct LlmdApproxPrefix {
    pub cfg: LlmdApproxConfig,
    servers: Mutex<HashMap<String, Lru>>,
}

impl LlmdApproxPrefix {
    pub fn new(cfg: LlmdApproxConfig) -> Self {
        Self { cfg, servers: Mutex::default() }
    }

    /// The request's llm-d blocks: the key ending each `max(64, block size)`-token block.
    fn blocks(&self, req: &RequestView) -> Vec<u64> {
        let bs = req.block_size.max(1);
        let group = self.cfg.min_block_tokens.max(bs).div_ceil(bs);
        let max = self.cfg.max_prefix_tokens / (group * bs).max(1);
        req.keys.iter().skip(group - 1).step_by(group).take(max).copied().collect()
    }
}

impl Scorer for LlmdApproxPrefix {
    fn name(&self) -> &str {
        "llmd-approx-prefix-scorer"
    }
    fn score(&self, req: &RequestView, pods: &[PodView]) -> Vec<f64> {
        let blocks = self.blocks(req);
        if blocks.is_empty() {
            return vec![0.0; pods.len()];
        }
        let servers = self.servers.lock();
        pods.iter()
            .map(|p| {
                let n = servers.get(&p.name).map_or(0, |l| blocks.iter().take_while(|b| l.at.contains_key(b)).count());
                n as f64 / blocks.len() as f64
            })
            .collect()
    }
    fn observe_pick(&self, req: &RequestView, pods: &[PodView], pick: usize) {
        let blocks = self.blocks(req);
        let mut servers = self.servers.lock();
        let l = servers.entry(pods[pick].name.clone()).or_default();
        for b in blocks {
            l.tick += 1;
            if let Some(old) = l.at.insert(b, l.tick) {
                l.order.remove(&old);
            }
            l.order.insert(l.tick, b);
            while l.at.len() > self.cfg.lru_per_server {
                let Some((_, k)) = l.order.pop_first() else { break };
                l.at.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(keys: std::ops::Range<u64>) -> RequestView {
        let keys: Vec<u64> = keys.collect();
        RequestView {
            prompt_tokens: keys.len() * 16,
            block_size: 16,
            total_blocks: keys.len(),
            keys: keys.into(),
            ..Default::default()
        }
    }
    fn pods() -> Vec<PodView> {
        (0..2).map(|i| PodView { name: format!("p{i}"), ..Default::default() }).collect()
    }

    #[test]
    fn sixty_four_token_blocks_recorded_for_the_pick_and_matched_as_a_share() {
        let s = LlmdApproxPrefix::new(LlmdApproxConfig::default());
        // 10 engine blocks of 16 = 2 full llm-d blocks of 64 (keys 3 and 7); the tail is not hashed.
        assert_eq!(s.blocks(&req(0..10)), vec![3, 7]);
        s.observe_pick(&req(0..10), &pods(), 1);
        assert_eq!(s.score(&req(0..16), &pods()), vec![0.0, 0.5], "2 of the 4 blocks");
        // Fewer than 64 tokens: no block, no score.
        assert_eq!(s.score(&req(0..3), &pods()), vec![0.0, 0.0]);
    }

    #[test]
    fn each_server_keeps_its_most_recent_blocks() {
        let s = LlmdApproxPrefix::new(LlmdApproxConfig { lru_per_server: 2, ..Default::default() });
        s.observe_pick(&req(0..8), &pods(), 0); // blocks 3, 7
        s.observe_pick(&req(100..104), &pods(), 0); // block 103 evicts 3
        assert_eq!(s.score(&req(0..8), &pods()), vec![0.0, 0.0], "block 3 was evicted");
        assert_eq!(s.score(&req(100..104), &pods()), vec![1.0, 0.0]);
    }
}
