//! A character radix tree with tenants: SGLang's `cache_aware` approximate tree
//! (../shared/research/peers-policies.md §1.2): edges are Unicode characters of the routing
//! text, each node lists the workers ("tenants") that were routed text through it, with a
//! last-access tick, and remembers the worker that created or last split it.

use std::collections::HashMap;

struct Node {
    edge: Vec<char>,
    children: HashMap<char, usize>,
    /// Tenant id → last access tick.
    tenants: HashMap<u32, u64>,
    /// The tenant that created or last split this node (SGLang 2026's `last_tenant`).
    last_tenant: Option<u32>,
    parent: usize,
}

/// What [`CharTree::find`] found.
#[derive(Debug, PartialEq)]
pub(crate) struct Match {
    /// Characters of the text matched from the start (a partial last edge counts).
    pub chars: usize,
    /// The deepest node reached (a partially matched edge selects its node).
    node: usize,
}

pub(crate) struct CharTree {
    nodes: Vec<Node>,
    free: Vec<usize>,
    names: Vec<String>,
    ids: HashMap<String, u32>,
    /// Σ edge lengths of the nodes listing each tenant (SGLang's tree size per worker).
    tenant_chars: HashMap<u32, usize>,
    tick: u64,
    /// Tree-wide budget of Σ tenant chars (SMG ≥ 2026-08-13); past it, the least recently
    /// used leaves are dropped down to 90 % of it.
    max_chars: usize,
}

const ROOT: usize = 0;

impl CharTree {
    pub(crate) fn new(max_chars: usize) -> Self {
        let root =
            Node { edge: vec![], children: HashMap::new(), tenants: HashMap::new(), last_tenant: None, parent: ROOT };
        Self {
            nodes: vec![root],
            free: vec![],
            names: vec![],
            ids: HashMap::new(),
            tenant_chars: HashMap::new(),
            tick: 0,
            max_chars,
        }
    }

    fn id(&mut self, tenant: &str) -> u32 {
        if let Some(&i) = self.ids.get(tenant) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(tenant.to_string());
        self.ids.insert(tenant.to_string(), i);
        i
    }

    /// Walks `text` from the root: matched characters and the deepest node.
    pub(crate) fn find(&self, text: &[char]) -> Match {
        let (mut node, mut at) = (ROOT, 0);
        while at < text.len() {
            let Some(&child) = self.nodes[node].children.get(&text[at]) else { break };
            let edge = &self.nodes[child].edge;
            let common = edge.iter().zip(&text[at..]).take_while(|(a, b)| a == b).count();
            at += common;
            node = child;
            if common < edge.len() {
                break;
            }
        }
        Match { chars: at, node }
    }

    /// The tenant that created or last split the matched node (SGLang's "tenant" of a match).
    pub(crate) fn owner(&self, m: &Match) -> Option<&str> {
        self.nodes[m.node].last_tenant.map(|t| self.names[t as usize].as_str())
    }

    /// The tenants listed on the matched node.
    pub(crate) fn holders(&self, m: &Match) -> Vec<&str> {
        let mut t: Vec<u32> = self.nodes[m.node].tenants.keys().copied().collect();
        t.sort_unstable();
        t.into_iter().map(|t| self.names[t as usize].as_str()).collect()
    }

    /// Characters listed under `tenant`.
    #[cfg(test)]
    pub(crate) fn tenant_chars(&self, tenant: &str) -> usize {
        self.ids.get(tenant).and_then(|i| self.tenant_chars.get(i)).copied().unwrap_or(0)
    }

    fn total_chars(&self) -> usize {
        self.tenant_chars.values().sum()
    }

    fn touch(&mut self, node: usize, t: u32) {
        let len = self.nodes[node].edge.len();
        if self.nodes[node].tenants.insert(t, self.tick).is_none() {
            *self.tenant_chars.entry(t).or_default() += len;
        }
    }

    fn alloc(&mut self, n: Node) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i] = n;
                i
            }
            None => {
                self.nodes.push(n);
                self.nodes.len() - 1
            }
        }
    }

    /// Records that `text` was routed to `tenant`: every node on its path lists the tenant,
    /// a partially matched edge is split, the rest becomes a new leaf.
    pub(crate) fn insert(&mut self, text: &[char], tenant: &str) {
        self.tick += 1;
        let t = self.id(tenant);
        self.touch(ROOT, t);
        let (mut node, mut at) = (ROOT, 0);
        while at < text.len() {
            let c = text[at];
            let Some(&child) = self.nodes[node].children.get(&c) else {
                let leaf = Node {
                    edge: text[at..].to_vec(),
                    children: HashMap::new(),
                    tenants: HashMap::new(),
                    last_tenant: Some(t),
                    parent: node,
                };
                let leaf = self.alloc(leaf);
                self.nodes[node].children.insert(c, leaf);
                self.touch(leaf, t);
                break;
            };
            let common = self.nodes[child].edge.iter().zip(&text[at..]).take_while(|(a, b)| a == b).count();
            if common < self.nodes[child].edge.len() {
                // Split: a new parent holds the common part and inherits the tenants.
                let rest = self.nodes[child].edge.split_off(common);
                let head = std::mem::replace(&mut self.nodes[child].edge, rest);
                let mid = Node {
                    edge: head,
                    children: HashMap::from([(self.nodes[child].edge[0], child)]),
                    tenants: self.nodes[child].tenants.clone(),
                    last_tenant: Some(t),
                    parent: node,
                };
                let mid = self.alloc(mid);
                self.nodes[child].parent = mid;
                self.nodes[node].children.insert(c, mid);
                self.touch(mid, t);
                node = mid;
            } else {
                self.touch(child, t);
                node = child;
            }
            at += common;
        }
        if self.total_chars() > self.max_chars {
            self.evict();
        }
    }

    /// Drops the least recently used (leaf, tenant) pairs until Σ tenant chars ≤ 90 % of the
    /// budget; nodes left without tenants go, and their parents may become leaves.
    fn evict(&mut self) {
        let target = self.max_chars / 10 * 9;
        while self.total_chars() > target {
            let mut leaves: Vec<(u64, usize, u32)> = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                if i != ROOT && n.children.is_empty() && !n.tenants.is_empty() {
                    leaves.extend(n.tenants.iter().map(|(&t, &ts)| (ts, i, t)));
                }
            }
            if leaves.is_empty() {
                return;
            }
            leaves.sort_unstable();
            for (_, i, t) in leaves {
                if self.total_chars() <= target {
                    return;
                }
                let len = self.nodes[i].edge.len();
                if self.nodes[i].tenants.remove(&t).is_some() {
                    if let Some(c) = self.tenant_chars.get_mut(&t) {
                        *c -= len;
                    }
                }
                if self.nodes[i].tenants.is_empty() {
                    let (p, first) = (self.nodes[i].parent, self.nodes[i].edge[0]);
                    self.nodes[p].children.remove(&first);
                    self.nodes[i].edge.clear();
                    self.free.push(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Vec<char> {
        s.chars().collect()
    }

    #[test]
    fn matches_count_partial_edges_and_splits_keep_the_first_owner_of_the_prefix() {
        let mut t = CharTree::new(1 << 20);
        t.insert(&c("hello world"), "a");
        let m = t.find(&c("hello there"));
        assert_eq!(m.chars, 6, "'hello ' matched, partially into the edge");
        assert_eq!(t.owner(&m), Some("a"));
        // b's text splits the edge: the split node names b (SGLang 2026: last_tenant is
        // the worker that created or split the node) and keeps a as a holder.
        t.insert(&c("hello there"), "b");
        let m = t.find(&c("hello"));
        assert_eq!(m.chars, 5);
        assert_eq!(t.owner(&m), Some("b"));
        assert_eq!(t.holders(&m), vec!["a", "b"]);
        assert_eq!(t.owner(&t.find(&c("hello world!"))), Some("a"));
        assert_eq!(t.tenant_chars("a"), 11);
        assert_eq!(t.tenant_chars("b"), 11);
        assert_eq!(t.find(&c("xyz")).chars, 0);
    }

    #[test]
    fn over_budget_the_least_recently_used_leaves_go() {
        let mut t = CharTree::new(40);
        t.insert(&c("aaaaaaaaaa"), "x"); // 10
        t.insert(&c("bbbbbbbbbb"), "x"); // 20
        t.insert(&c("cccccccccc"), "y"); // 30
        t.insert(&c("aaaaaaaaaa"), "x"); // refreshes a
        t.insert(&c("dddddddddddddddddddd"), "y"); // 50 > 40 → down to ≤ 36: b goes first
        assert_eq!(t.find(&c("bbbbbbbbbb")).chars, 0, "the oldest leaf was evicted");
        assert_eq!(t.find(&c("aaaaaaaaaa")).chars, 10, "the refreshed leaf stays");
        assert!(t.total_chars() <= 36);
    }
}
