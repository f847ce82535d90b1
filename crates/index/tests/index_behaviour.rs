//! Behaviour specific to the in-memory index: eviction, epoch wraps, freed blocks,
//! speculative expiry. What every backend must do is `kvroute-index-conformance`
//! (run on this index by `reference_model.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_index::{BlockIndex, InMemoryIndex, IndexConfig, PodId, Tiers};

fn pods_of(idx: &InMemoryIndex, key: u64) -> Vec<(PodId, bool)> {
    let mut out = Vec::new();
    idx.prefix_lookup(&[key], &mut |_, e| {
        out = e.iter().map(|x| (x.pod(), x.speculative())).collect();
        true
    });
    out.sort();
    out
}

fn one_shard(capacity: usize) -> InMemoryIndex {
    InMemoryIndex::new(IndexConfig { capacity, shards: 1, ..Default::default() })
}

#[test]
fn capacity_is_enforced_by_evicting_least_recently_used_blocks() {
    let idx = one_shard(3);
    idx.store(0, Tiers::GPU, &[1, 2, 3]);
    // Touch 1 with a lookup, so 2 is now the least recently used.
    assert_eq!(pods_of(&idx, 1), vec![(0, false)]);
    idx.store(0, Tiers::GPU, &[4]);
    assert!(pods_of(&idx, 2).is_empty(), "LRU block evicted");
    assert_eq!(pods_of(&idx, 1), vec![(0, false)]);
    assert_eq!(pods_of(&idx, 3), vec![(0, false)]);
    let st = idx.stats();
    assert_eq!((st.entries, st.blocks, st.evicted_blocks), (3, 3, 1));
    assert_eq!(idx.pod_entries(0), 3);
    // Many more stores never exceed capacity.
    for k in 100..1000 {
        idx.store((k % 7) as PodId, Tiers::GPU, &[k]);
        assert!(idx.stats().entries <= 3);
    }
}

#[test]
fn a_small_index_holds_its_capacity_however_many_shards_were_asked_for() {
    // 64 shards of 4 entries each evicted blocks with a quarter of 256 in use (keys spread
    // unevenly); shards now hold at least MIN_ENTRIES_PER_SHARD each.
    let idx = InMemoryIndex::new(IndexConfig { capacity: 256, shards: 64, ..Default::default() });
    let keys: Vec<u64> = (0..256u64).map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    idx.store(0, Tiers::GPU, &keys);
    assert_eq!(idx.stats().evicted_blocks, 0);
    assert!(keys.iter().all(|&k| pods_of(&idx, k) == vec![(0, false)]));
}

#[test]
fn clear_pod_forgets_only_that_pod_even_across_epoch_wraps() {
    let idx = InMemoryIndex::new(IndexConfig::default());
    idx.store(1, Tiers::GPU, &[10, 11]);
    for round in 0..600u64 {
        idx.store(0, Tiers::GPU, &[10, 11, round + 1000]);
        idx.clear_pod(0);
        assert_eq!(pods_of(&idx, 10), vec![(1, false)], "round {round}");
        assert!(pods_of(&idx, round + 1000).is_empty());
        assert_eq!(idx.pod_entries(0), 0);
    }
    idx.store(0, Tiers::GPU, &[10]);
    assert_eq!(pods_of(&idx, 10), vec![(0, false), (1, false)]);
    assert_eq!(idx.pod_entries(1), 2);
}

#[test]
fn remove_is_per_tier() {
    let idx = InMemoryIndex::new(IndexConfig::default());
    idx.store(0, Tiers::GPU, &[5]);
    idx.store(0, Tiers::CPU, &[5]);
    idx.remove(0, Some(Tiers::GPU), &[5]);
    let mut tiers = Vec::new();
    idx.prefix_lookup(&[5], &mut |_, e| {
        tiers = e.iter().map(|x| x.tier()).collect();
        true
    });
    assert_eq!(tiers, vec![Tiers::CPU]);
    idx.remove(0, None, &[5, 6]);
    assert!(pods_of(&idx, 5).is_empty());
    assert_eq!(idx.stats().blocks, 0, "empty blocks are freed");
}

#[test]
fn speculative_entries_expire_unless_confirmed() {
    let t = Arc::new(AtomicU64::new(0));
    let base = Instant::now();
    let clock = {
        let t = t.clone();
        Arc::new(move || base + Duration::from_millis(t.load(Ordering::SeqCst)))
    };
    let idx = InMemoryIndex::with_clock(
        IndexConfig { speculative_ttl: Duration::from_millis(2000), ..Default::default() },
        clock,
    );
    idx.store(1, Tiers::GPU, &[1]);
    idx.store_speculative(0, Tiers::GPU, &[1, 2, 3]);
    idx.store_speculative(1, Tiers::GPU, &[1]); // already held for real: no speculative twin
    assert_eq!(pods_of(&idx, 1), vec![(0, true), (1, false)]);
    idx.store(0, Tiers::GPU, &[2]); // the engine confirms block 2
    t.store(1999, Ordering::SeqCst);
    idx.expire_speculative();
    assert_eq!(pods_of(&idx, 3), vec![(0, true)]);
    t.store(2000, Ordering::SeqCst);
    idx.expire_speculative();
    assert!(pods_of(&idx, 3).is_empty(), "expired");
    assert_eq!(pods_of(&idx, 2), vec![(0, false)], "confirmed entries stay");
    assert_eq!(pods_of(&idx, 1), vec![(1, false)]);
    let st = idx.stats();
    assert_eq!((st.expired_speculative, st.pending_speculative), (2, 0));
    assert_eq!(idx.pod_entries(0), 1);
}
