//! Router-side, approximate prefix tracking (llm-d's `prefix-cache-scorer` idea): the
//! prompt *text* is cut into 256-byte chunks whose hashes are chained like block keys, and
//! after each decision the chosen pod is recorded as holding them. No tokenizer and no KV
//! events are needed, so this is also the fallback when tokenization misses its deadline.
//! The record is an [`InMemoryIndex`] (bounded, LRU) of its own.

use kvroute_index::{BlockIndex, InMemoryIndex, IndexConfig, PodId, Tiers};
use kvroute_score::{LongestPrefixScorer, PodScore, Scratch};
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub const CHUNK_BYTES: usize = 256;

pub struct ApproxPrefix {
    index: InMemoryIndex,
    scorer: LongestPrefixScorer,
}

impl Default for ApproxPrefix {
    fn default() -> Self {
        Self {
            index: InMemoryIndex::new(IndexConfig { capacity: 4 << 20, ..Default::default() }),
            scorer: LongestPrefixScorer::default(),
        }
    }
}

/// Chained hashes of the text's full 256-byte chunks (cut on char boundaries).
pub fn chunk_keys(model: &str, text: &str) -> Vec<u64> {
    let mut keys = Vec::with_capacity(text.len() / CHUNK_BYTES);
    let mut parent = xxh3_64_with_seed(model.as_bytes(), 0x6b76);
    let mut start = 0;
    while start + CHUNK_BYTES <= text.len() {
        let mut end = start + CHUNK_BYTES;
        while !text.is_char_boundary(end) {
            end += 1;
        }
        parent = xxh3_64_with_seed(&text.as_bytes()[start..end], parent);
        keys.push(parent);
        start = end;
    }
    keys
}

impl ApproxPrefix {
    pub fn record(&self, pod: PodId, keys: &[u64]) {
        self.index.store(pod, Tiers::GPU, keys);
    }

    pub fn score(&self, keys: &[u64], pods: &[PodId], scratch: &mut Scratch) -> Vec<PodScore> {
        self.scorer.score(&self.index, keys, Some(pods), scratch)
    }

    pub fn forget_pod(&self, pod: PodId) {
        self.index.clear_pod(pod);
    }
}
