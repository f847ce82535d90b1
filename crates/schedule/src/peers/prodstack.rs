//! vLLM production-stack's `prefixaware` routing (../shared/research/peers-policies.md §2):
//! a trie of the routing text cut into 128-character chunks, each chunk hashed on its own
//! (not chained); a request walks the trie while some available endpoint holds every chunk
//! so far, and goes to one of the endpoints of the longest match **at random** — every
//! endpoint when nothing matched. The text is then inserted for the chosen endpoint at the
//! root and on every chunk node. No load signal at all (the QPS fallback needs
//! `--prefix-min-match-length` > 0, default 0). production-stack never evicts (its trie
//! grows until the router is OOM-killed, PR #711); kvroute stops inserting past
//! `max_nodes` so a live A/B cannot exhaust memory.

use std::collections::{HashMap, HashSet};

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64;

use crate::{PodView, RequestView, Scorer};

/// Characters per chunk (hard-coded in production-stack).
pub const CHUNK_CHARS: usize = 128;

#[derive(Default)]
struct Node {
    children: HashMap<u64, usize>,
    endpoints: HashSet<String>,
}

pub struct ProdstackPrefixAware {
    nodes: Mutex<Vec<Node>>,
    pub max_nodes: usize,
}

impl Default for ProdstackPrefixAware {
    fn default() -> Self {
        Self { nodes: Mutex::new(vec![Node::default()]), max_nodes: 1 << 22 }
    }
}

/// The chunk hashes of `text` (a partial last chunk is a chunk).
fn chunks(text: &str) -> Vec<u64> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(CHUNK_CHARS).map(|c| xxh3_64(c.iter().collect::<String>().as_bytes())).collect()
}

impl Scorer for ProdstackPrefixAware {
    fn name(&self) -> &str {
        "prodstack-prefix-aware-scorer"
    }
    fn needs_text(&self) -> bool {
        true
    }
    fn score(&self, req: &RequestView, pods: &[PodView]) -> Vec<f64> {
        let nodes = self.nodes.lock();
        let mut live: Vec<usize> = (0..pods.len()).collect();
        let mut node = 0;
        for h in chunks(&req.text) {
            let Some(&child) = nodes[node].children.get(&h) else { break };
            let hit: Vec<usize> =
                live.iter().copied().filter(|&i| nodes[child].endpoints.contains(&pods[i].name)).collect();
            if hit.is_empty() {
                break;
            }
            live = hit;
            node = child;
        }
        super::one_hot(pods.len(), &live)
    }
    fn observe_pick(&self, req: &RequestView, pods: &[PodView], pick: usize) {
        let name = &pods[pick].name;
        let mut nodes = self.nodes.lock();
        nodes[0].endpoints.insert(name.clone());
        let mut node = 0;
        for h in chunks(&req.text) {
            node = match nodes[node].children.get(&h) {
                Some(&c) => c,
                None if nodes.len() < self.max_nodes => {
                    nodes.push(Node::default());
                    let c = nodes.len() - 1;
                    nodes[node].children.insert(h, c);
                    c
                }
                None => return,
            };
            nodes[node].endpoints.insert(name.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(n: usize) -> Vec<PodView> {
        (0..n).map(|i| PodView { name: format!("e{i}"), in_flight: 100 * i as u32, ..Default::default() }).collect()
    }
    fn req(text: &str) -> RequestView {
        RequestView { text: text.into(), ..Default::default() }
    }

    #[test]
    fn the_longest_match_set_wins_whatever_the_load_and_nothing_matched_means_everyone() {
        let p = ProdstackPrefixAware::default();
        let sys = "s".repeat(256);
        let a = format!("{sys}{}", "a".repeat(200));
        assert_eq!(p.score(&req(&a), &pods(3)), vec![1.0; 3], "nothing matched: uniform over all");
        p.observe_pick(&req(&a), &pods(3), 2);
        let b = format!("{sys}{}", "b".repeat(200));
        // Two full chunks of the system prompt match on e2 only, however loaded.
        assert_eq!(p.score(&req(&b), &pods(3)), vec![0.0, 0.0, 1.0]);
        p.observe_pick(&req(&b), &pods(3), 1);
        // Both hold the system prompt; only e2 holds a's third chunk.
        assert_eq!(p.score(&req(&b), &pods(3)), vec![0.0, 1.0, 0.0]);
        assert_eq!(p.score(&req(&format!("{sys}zz")), &pods(3)), vec![0.0, 1.0, 1.0]);
        // A chunk differing by one character is a different chunk (128-char granularity).
        assert_eq!(p.score(&req(&format!("x{}", &sys[1..])), &pods(3)), vec![1.0; 3]);
    }
}
