//! # kvroute-index — events → index
//!
//! Owns the record of which pod holds which KV block:
//!
//! * [`BlockIndex`]: the backend trait (`store` / `remove` / `clear_pod` /
//!   speculative entries / ordered prefix lookup). Every scorer and test runs against it.
//! * [`InMemoryIndex`]: the default backend — concurrent (sharded locks), bounded
//!   (capacity in (block, pod) entries, LRU eviction), per-pod clear that is instant for
//!   lookups (epochs) and swept in the background of the event path, speculative
//!   entries that expire after a TTL unless a `BlockStored` confirms them.
//! * [`EventApplier`]: turns decoded vLLM event batches into index updates, keyed by the
//!   engine's hashes or by kvroute's own request keys with an engine→request map.
//! * [`Pods`] / [`Tiers`]: interning of pod names and cache tiers (with score weights).

mod applier;
mod entry;
mod memory;
mod pods;
mod slab;

pub use applier::{ApplySnapshot, EventApplier, KeyMode};
pub use entry::{PodEntry, PodId, TierId, MAX_PODS, MAX_TIERS};
pub use memory::{InMemoryIndex, IndexConfig, MIN_ENTRIES_PER_SHARD};
pub use pods::{Pods, Tiers};

/// Why an index operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("more than {MAX_PODS} pods")]
    TooManyPods,
}

/// Size and activity of an index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Distinct block keys held.
    pub blocks: u64,
    /// (block, pod, tier) entries held, stale ones of cleared pods included until purged.
    pub entries: u64,
    /// Most entries kept before LRU eviction.
    pub capacity: u64,
    pub evicted_blocks: u64,
    pub expired_speculative: u64,
    pub pending_speculative: u64,
}

/// A store of `block key → pods holding it`. Implementations are shared between threads.
/// Operations for one pod must be issued in event order; different pods may interleave.
pub trait BlockIndex: Send + Sync {
    /// Records that `pod` holds these blocks on `tier` (confirming speculative entries).
    fn store(&self, pod: PodId, tier: TierId, keys: &[u64]);
    /// Records that `pod` is expected to hold these blocks soon (it was just routed a
    /// request with them); the entries expire after the TTL unless confirmed.
    fn store_speculative(&self, pod: PodId, tier: TierId, keys: &[u64]);
    /// Forgets that `pod` holds these blocks on `tier` (`None`: on any tier).
    fn remove(&self, pod: PodId, tier: Option<TierId>, keys: &[u64]);
    /// Forgets every block of `pod`.
    fn clear_pod(&self, pod: PodId);
    /// Visits `keys` in order with the pods holding each, stopping at the first key no
    /// pod holds or when `f` returns false. `f` may run while index locks are held: it
    /// must not call back into the index.
    fn prefix_lookup(&self, keys: &[u64], f: &mut dyn FnMut(usize, &[PodEntry]) -> bool);
    /// Entries currently held by `pod`.
    fn pod_entries(&self, pod: PodId) -> u64;
    fn stats(&self) -> IndexStats;
    /// Lookups wait on the network (a shared index): callers on an async runtime should
    /// run them where blocking is allowed.
    fn blocks_on_network(&self) -> bool {
        false
    }
    /// The index itself records which event batch of each pod it holds the effects of
    /// (a shared index: another replica, or an earlier run, may have applied batches this
    /// process is about to replay). Copies are counted, so a batch applied twice would
    /// count twice: [`EventApplier::apply_seq`] skips batches at or below
    /// [`BlockIndex::applied_seq`]. `false` (the default): the applier keeps that record.
    fn tracks_applied_seq(&self) -> bool {
        false
    }
    /// The sequence number of the last batch of `pod` applied (`None`: none since the
    /// pod's last clear).
    fn applied_seq(&self, _pod: PodId) -> Option<u64> {
        None
    }
    /// Records that batch `seq` of `pod` has been applied.
    fn set_applied_seq(&self, _pod: PodId, _seq: u64) {}
}

impl<T: BlockIndex + ?Sized> BlockIndex for std::sync::Arc<T> {
    fn store(&self, pod: PodId, tier: TierId, keys: &[u64]) {
        (**self).store(pod, tier, keys)
    }
    fn store_speculative(&self, pod: PodId, tier: TierId, keys: &[u64]) {
        (**self).store_speculative(pod, tier, keys)
    }
    fn remove(&self, pod: PodId, tier: Option<TierId>, keys: &[u64]) {
        (**self).remove(pod, tier, keys)
    }
    fn clear_pod(&self, pod: PodId) {
        (**self).clear_pod(pod)
    }
    fn prefix_lookup(&self, keys: &[u64], f: &mut dyn FnMut(usize, &[PodEntry]) -> bool) {
        (**self).prefix_lookup(keys, f)
    }
    fn pod_entries(&self, pod: PodId) -> u64 {
        (**self).pod_entries(pod)
    }
    fn stats(&self) -> IndexStats {
        (**self).stats()
    }
    fn blocks_on_network(&self) -> bool {
        (**self).blocks_on_network()
    }
    fn tracks_applied_seq(&self) -> bool {
        (**self).tracks_applied_seq()
    }
    fn applied_seq(&self, pod: PodId) -> Option<u64> {
        (**self).applied_seq(pod)
    }
    fn set_applied_seq(&self, pod: PodId, seq: u64) {
        (**self).set_applied_seq(pod, seq)
    }
}
