//! SGLang's router and its successor SMG: `cache_aware` on an approximate character tree of
//! the routing text, balanced by the router's own in-flight counts
//! (../shared/research/peers-policies.md §1.2–§1.4).
//!
//! - `sglang` ([`Sglang`], "S-classic", §1.2 with the post-2025-12-08 miss rule, CLI
//!   defaults since 2025-08-15: cache threshold 0.3, balance abs 64, rel 1.5): when the
//!   fleet is imbalanced (max − min in-flight > abs **and** max > rel · min) the least-loaded
//!   worker; else the tree's match: above the threshold (strictly) the worker that owns the
//!   matched node — not load-aware —, otherwise the least-loaded worker. The text is inserted
//!   for the chosen worker at routing time. Least-loaded ties: fewer requests processed,
//!   then list order (2026 tie-break).
//! - `smg` ([`Smg`], §1.3, SMG @ 2026-08, HTTP string-tree mode, KV triggers off by
//!   default): a hit above the threshold picks the least-loaded of the matched node's
//!   holders (at most 8; ties at random); a miss the least-loaded worker; then the
//!   per-request gate: if the pick's load > mean · rel **and** > mean + abs, spill to the
//!   least-loaded worker (inserted as a new holder, so hot prefixes replicate).
//!
//! Each is a scorer giving 1 to the worker(s) it would choose and 0 elsewhere (use it alone,
//! with `max-score-picker`, which breaks ties at random); the tree learns in
//! [`Scorer::observe_pick`]. The tree is budgeted tree-wide at `max_tree_size` characters
//! (SMG's 2026-08-13 rule; SGLang's default 2^26 is rarely reached).

use parking_lot::Mutex;

use super::one_hot;
use super::tree::CharTree;
use crate::{PodView, RequestView, Scorer};

/// `cache_aware`'s knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheAwareConfig {
    /// `cache_threshold`: matched share of the text above which the cache decides.
    pub cache_threshold: f64,
    /// `balance_abs_threshold`, in requests.
    pub balance_abs_threshold: f64,
    /// `balance_rel_threshold`.
    pub balance_rel_threshold: f64,
    /// `max_tree_size`, characters.
    pub max_tree_size: usize,
}

impl Default for CacheAwareConfig {
    /// The CLI defaults since 2025-08-15 (sglang #9198), = SMG's Rust CLI.
    fn default() -> Self {
        Self { cache_threshold: 0.3, balance_abs_threshold: 64.0, balance_rel_threshold: 1.5, max_tree_size: 1 << 26 }
    }
}

struct State {
    tree: CharTree,
    processed: std::collections::HashMap<String, u64>,
}

fn state(cfg: &CacheAwareConfig) -> Mutex<State> {
    Mutex::new(State { tree: CharTree::new(cfg.max_tree_size), processed: Default::default() })
}

/// The least-loaded pod; ties → fewer processed, then list order.
fn least_loaded(pods: &[PodView], processed: &std::collections::HashMap<String, u64>) -> Option<usize> {
    (0..pods.len()).min_by_key(|&i| (pods[i].in_flight, processed.get(&pods[i].name).copied().unwrap_or(0), i))
}

/// SGLang's classic `cache_aware` (see the module docs).
pub struct Sglang {
    pub cfg: CacheAwareConfig,
    state: Mutex<State>,
}

impl Sglang {
    pub fn new(cfg: CacheAwareConfig) -> Self {
        let state = state(&cfg);
        Self { cfg, state }
    }

    /// The chosen pod, and whether the text is then inserted for it.
    fn decide(&self, req: &RequestView, pods: &[PodView]) -> Option<(usize, bool)> {
        let s = self.state.lock();
        let least = least_loaded(pods, &s.processed)?;
        let (lo, hi) = pods.iter().fold((u32::MAX, 0), |(a, b), p| (a.min(p.in_flight), b.max(p.in_flight)));
        let (lo, hi) = (lo as f64, hi as f64);
        if hi - lo > self.cfg.balance_abs_threshold && hi > self.cfg.balance_rel_threshold * lo {
            return Some((least, true));
        }
        let text: Vec<char> = req.text.chars().collect();
        let m = s.tree.find(&text);
        let rate = if text.is_empty() { 0.0 } else { m.chars as f64 / text.len() as f64 };
        if rate > self.cfg.cache_threshold {
            // The matched node's owner, if it is still a candidate; else the first
            // candidate, without training the tree.
            return match s.tree.owner(&m).and_then(|o| pods.iter().position(|p| p.name == o)) {
                Some(i) => Some((i, true)),
                None => Some((0, false)),
            };
        }
        Some((least, true))
    }
}

impl Scorer for Sglang {
    fn name(&self) -> &str {
        "sglang-cache-aware-scorer"
    }
    fn needs_text(&self) -> bool {
        true
    }
    fn score(&self, req: &RequestView, pods: &[PodView]) -> Vec<f64> {
        one_hot(pods.len(), &self.decide(req, pods).map(|d| d.0).into_iter().collect::<Vec<_>>())
    }
    fn observe_pick(&self, req: &RequestView, pods: &[PodView], pick: usize) {
        let insert = self.decide(req, pods).is_some_and(|d| d.1);
        let mut s = self.state.lock();
        if insert {
            let text: Vec<char> = req.text.chars().collect();
            s.tree.insert(&text, &pods[pick].name);
        }
        *s.processed.entry(pods[pick].name.clone()).or_default() += 1;
    }
}

/// SMG's 2026 `cache_aware` (see the module docs).
pub struct Smg {
    pub cfg: CacheAwareConfig,
    state: Mutex<State>,
}

impl Smg {
    pub fn new(cfg: CacheAwareConfig) -> Self {
        let state = state(&cfg);
        Self { cfg, state }
    }

    fn decide(&self, req: &RequestView, pods: &[PodView]) -> Vec<usize> {
        let s = self.state.lock();
        let Some(least) = least_loaded(pods, &s.processed) else { return vec![] };
        let text: Vec<char> = req.text.chars().collect();
        let m = s.tree.find(&text);
        let rate = if text.is_empty() { 0.0 } else { m.chars as f64 / text.len() as f64 };
        let mut picks = vec![least];
        if rate > self.cfg.cache_threshold {
            let holders: Vec<usize> =
                s.tree.holders(&m).into_iter().filter_map(|h| pods.iter().position(|p| p.name == h)).take(8).collect();
            if let Some(min) = holders.iter().map(|&i| pods[i].in_flight).min() {
                picks = holders.into_iter().filter(|&i| pods[i].in_flight == min).collect();
            }
        }
        // The per-request gate (mean in-flight over the candidates).
        let mean = pods.iter().map(|p| p.in_flight as f64).sum::<f64>() / pods.len() as f64;
        let load = pods[picks[0]].in_flight as f64;
        if load > mean * self.cfg.balance_rel_threshold && load > mean + self.cfg.balance_abs_threshold {
            picks = vec![least];
        }
        picks
    }
}

impl Scorer for Smg {
    fn name(&self) -> &str {
        "smg-cache-aware-scorer"
    }
    fn needs_text(&self) -> bool {
        true
    }
    fn score(&self, req: &RequestView, pods: &[PodView]) -> Vec<f64> {
        one_hot(pods.len(), &self.decide(req, pods))
    }
    fn observe_pick(&self, req: &RequestView, pods: &[PodView], pick: usize) {
        let mut s = self.state.lock();
        let text: Vec<char> = req.text.chars().collect();
        s.tree.insert(&text, &pods[pick].name);
        *s.processed.entry(pods[pick].name.clone()).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::peers::loaded as pods;
    fn req(text: &str) -> RequestView {
        RequestView { text: text.into(), ..Default::default() }
    }
    fn route(s: &dyn Scorer, r: &RequestView, p: &[PodView]) -> usize {
        let v = s.score(r, p);
        let pick = v.iter().position(|&x| x == 1.0).unwrap();
        s.observe_pick(r, p, pick);
        pick
    }

    #[test]
    fn sglang_sticks_to_the_owner_until_both_balance_thresholds_trip() {
        let s = Sglang::new(CacheAwareConfig::default());
        let text = "the system prompt of a popular app, then the question";
        // Cold: least loaded (w1).
        assert_eq!(route(&s, &req(text), &pods(&[3, 0, 5])), 1);
        // Hot: w1 owns the prefix and keeps it however busy it is while the fleet is
        // "balanced" — abs 64 exceeded but not rel 1.5 (max 200 ≤ 1.5 · 140)…
        assert_eq!(route(&s, &req(text), &pods(&[140, 200, 150])), 1);
        // …or rel exceeded but not abs (max − min = 64, not > 64).
        assert_eq!(route(&s, &req(text), &pods(&[0, 64, 10])), 1);
        // Both trip (max − min = 65 > 64 and 65 > 1.5 · 0): shortest queue.
        assert_eq!(route(&s, &req(text), &pods(&[0, 65, 10])), 0);
        // A share matched at or below the threshold is a miss → least loaded.
        let other = format!("{}{}", &text[..10], "x".repeat(40));
        assert_eq!(route(&s, &req(&other), &pods(&[5, 4, 9])), 1, "10 of 50 chars = 0.2 ≤ 0.3");
    }

    #[test]
    fn sglang_least_loaded_ties_go_to_the_worker_that_processed_fewer() {
        let s = Sglang::new(CacheAwareConfig::default());
        assert_eq!(route(&s, &req("a"), &pods(&[0, 0])), 0);
        assert_eq!(route(&s, &req("b"), &pods(&[0, 0])), 1, "w0 processed one already");
    }

    #[test]
    fn smg_picks_the_least_loaded_holder_and_spills_past_the_gate() {
        let s = Smg::new(CacheAwareConfig { balance_abs_threshold: 4.0, ..Default::default() });
        let text = "shared prefix shared prefix shared prefix";
        assert_eq!(route(&s, &req(text), &pods(&[1, 0, 0, 0])), 1);
        // Spilled there by the gate later, w2 becomes a second holder.
        s.observe_pick(&req(text), &pods(&[0, 0, 0, 0]), 2);
        // Among holders w1 (load 3) and w2 (load 2): w2.
        assert_eq!(route(&s, &req(text), &pods(&[0, 3, 2, 0])), 2);
        // The gate: the holders at 10 > mean 5 · 1.5 and > mean + 4 → the least loaded (w0)…
        assert_eq!(route(&s, &req(text), &pods(&[0, 10, 10, 0])), 0);
        // …which now holds the prefix too.
        assert_eq!(route(&s, &req(text), &pods(&[2, 3, 3, 5])), 0);
    }
}
