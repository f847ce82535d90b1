//! A vLLM-like KV block pool: full prompt blocks are cached under their block hash and
//! shared between requests (ref-counted); blocks no request uses stay cached and are
//! evicted least-recently-freed first; allocation is all-or-nothing, so a request that
//! does not fit waits instead of failing.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Block hashes are already uniformly distributed: one multiply spreads them over the
/// table (SipHash costs more than the rest of an allocation).
#[derive(Default)]
pub struct BlockKeyHasher(u64);
impl Hasher for BlockKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = (self.0 ^ k).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
}
type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<BlockKeyHasher>>;

#[derive(Clone, Copy)]
struct Entry {
    refs: u32,
    tick: u64,
}

/// What an allocation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Indices (into the request's hashes) of blocks newly cached by this request.
    pub created: Vec<usize>,
    /// Cached blocks evicted to make room (their hashes).
    pub evicted: Vec<u64>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct NoSpace;

pub struct BlockPool {
    capacity: usize,
    cached: KeyMap<Entry>,
    free_lru: VecDeque<(u64, u64)>,
    free_cached: usize,
    in_use_cached: usize,
    anon_in_use: usize,
    tick: u64,
}

impl BlockPool {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            cached: KeyMap::default(),
            free_lru: VecDeque::new(),
            free_cached: 0,
            in_use_cached: 0,
            anon_in_use: 0,
            tick: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks held by running requests.
    pub fn used(&self) -> usize {
        self.in_use_cached + self.anon_in_use
    }

    /// `vllm:kv_cache_usage_perc`: fraction of blocks held by running requests.
    pub fn usage(&self) -> f64 {
        self.used() as f64 / self.capacity.max(1) as f64
    }

    /// Cached blocks (in use or free).
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Consecutive blocks from the start that are cached.
    pub fn prefix_hits(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.cached.contains_key(h)).count()
    }

    fn evict_one(&mut self) -> Option<u64> {
        while let Some((h, tick)) = self.free_lru.pop_front() {
            if let Some(e) = self.cached.get(&h) {
                if e.refs == 0 && e.tick == tick {
                    self.cached.remove(&h);
                    self.free_cached -= 1;
                    return Some(h);
                }
            }
        }
        None
    }

    /// Takes the request's full prompt blocks (`hashes`, cached and shared) and `anon`
    /// more private blocks (partial prompt block, decode), or nothing if they cannot fit.
    pub fn allocate(&mut self, hashes: &[u64], anon: usize) -> Result<Allocation, NoSpace> {
        let mut create = 0;
        let mut reused_free = 0;
        for h in hashes {
            match self.cached.get(h) {
                Some(e) if e.refs == 0 => reused_free += 1,
                Some(_) => {}
                None => create += 1,
            }
        }
        let unallocated = self.capacity - (self.used() + self.free_cached);
        if create + anon > unallocated + (self.free_cached - reused_free) {
            return Err(NoSpace);
        }
        let mut out = Allocation::default();
        for (i, &h) in hashes.iter().enumerate() {
            if let Some(e) = self.cached.get_mut(&h) {
                if e.refs == 0 {
                    self.free_cached -= 1;
                    self.in_use_cached += 1;
                }
                e.refs += 1;
                continue;
            }
            if self.used() + self.free_cached >= self.capacity {
                if let Some(ev) = self.evict_one() {
                    out.evicted.push(ev);
                }
            }
            self.cached.insert(h, Entry { refs: 1, tick: 0 });
            self.in_use_cached += 1;
            out.created.push(i);
        }
        for _ in 0..anon {
            if self.used() + self.free_cached >= self.capacity {
                if let Some(ev) = self.evict_one() {
                    out.evicted.push(ev);
                }
            }
            self.anon_in_use += 1;
        }
        Ok(out)
    }

    /// Gives back what `allocate` took. The request's blocks are freed tail first, so
    /// its last blocks are evicted before its first ones (as vLLM does).
    pub fn release(&mut self, hashes: &[u64], anon: usize) {
        for &h in hashes.iter().rev() {
            if let Some(e) = self.cached.get_mut(&h) {
                e.refs = e.refs.saturating_sub(1);
                if e.refs == 0 {
                    self.tick += 1;
                    e.tick = self.tick;
                    self.free_lru.push_back((h, self.tick));
                    self.free_cached += 1;
                    self.in_use_cached -= 1;
                }
            }
        }
        self.anon_in_use -= anon.min(self.anon_in_use);
    }

    /// `reset_prefix_cache()`: drops every cached block if none is in use.
    pub fn reset(&mut self) -> bool {
        if self.used() > 0 {
            return false;
        }
        self.cached.clear();
        self.free_lru.clear();
        self.free_cached = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_evicts_lru_and_refuses_what_cannot_fit() {
        let mut p = BlockPool::new(4);
        let a = p.allocate(&[1, 2], 1).unwrap();
        assert_eq!(a.created, vec![0, 1]);
        assert_eq!(p.used(), 3);
        // A second request sharing block 1 fits; one that needs 2 new blocks does not.
        let b = p.allocate(&[1], 0).unwrap();
        assert!(b.created.is_empty());
        assert_eq!(p.allocate(&[7, 8], 0), Err(NoSpace));
        p.release(&[1], 0);
        p.release(&[1, 2], 1);
        assert_eq!((p.used(), p.cached_blocks()), (0, 2));
        assert_eq!(p.prefix_hits(&[1, 2, 3]), 2);
        // Needs 3 new blocks: 2 free, then evicts the least recently freed (2, the tail).
        let c = p.allocate(&[5, 6, 7], 0).unwrap();
        assert_eq!(c.evicted, vec![2]);
        assert_eq!(p.prefix_hits(&[1]), 1);
        assert!(!p.reset());
        p.release(&[5, 6, 7], 0);
        assert!(p.reset());
        assert_eq!(p.cached_blocks(), 0);
    }
}
