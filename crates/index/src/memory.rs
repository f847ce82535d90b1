//! The in-memory block index: sharded hash tables with a true LRU per shard.
//!
//! Layout, per shard: a `hashbrown::HashTable<u32>` of slot numbers (4 bytes + 1 control
//! byte per block) and a slab of [`Slot`]s (block key, LRU links, and the pods holding
//! the block as packed 4-byte [`PodEntry`]s, inline up to 4). Memory is bounded by
//! `capacity` (block, pod) entries: past it, least-recently-used blocks are evicted
//! (a lookup or store makes a block most recently used).
//!
//! **Copies.** vLLM does not de-duplicate cached blocks: a block-aligned prompt sent again
//! (its last block is recomputed) or identical prompts prefilled together cache a second
//! physical copy of a block and publish `BlockStored` for it again; evicting one copy
//! publishes one `BlockRemoved` while the other stays usable. So an entry counts the
//! copies its pod holds on its tier: a store adds one, a remove takes one away, and the
//! entry goes at zero. Up to [`INLINE_COPIES`] are counted inside the 4-byte entry; the
//! rare rest in a per-shard side table (empty in most fleets, so it costs nothing).
//!
//! Clearing a pod is instant for lookups: each pod has an 8-bit epoch stamped into its
//! entries, and clearing bumps it, which makes every older entry invisible at once. The
//! memory is then reclaimed by a sweep of the shards; shards remember up to which clear
//! they are swept, so lookups check entry epochs only in shards a recent clear has not
//! reached yet (the check would otherwise cost ~1 ns per entry on every lookup).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::slab::{PodList, Slab, Slot};
use hashbrown::HashTable;
use parking_lot::Mutex;

use crate::entry::{PodEntry, PodId, TierId, INLINE_COPIES, MAX_PODS};
use crate::{BlockIndex, IndexStats};

/// Settings of an [`InMemoryIndex`].
#[derive(Clone, Debug, PartialEq)]
pub struct IndexConfig {
    /// Most (block, pod) entries kept; least-recently-used blocks are evicted beyond.
    /// Default 16 M (≈ 0.6 GB at the measured ≈ 40 B per entry).
    pub capacity: usize,
    /// Number of independently locked shards (rounded up to a power of two). Default 64;
    /// fewer for a small `capacity`, so that each shard holds at least
    /// [`MIN_ENTRIES_PER_SHARD`]: LRU is per shard, and keys spread unevenly over many
    /// small shards (256 entries over 64 shards evicted with a quarter of them in use).
    pub shards: usize,
    /// How long a speculative entry lives unless a `BlockStored` confirms it. Default 2 s
    /// (llm-d's `speculativeTTL`).
    pub speculative_ttl: Duration,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self { capacity: 16 << 20, shards: 64, speculative_ttl: Duration::from_secs(2) }
    }
}

/// A shard's least capacity (see [`IndexConfig::shards`]).
pub const MIN_ENTRIES_PER_SHARD: usize = 4096;

const NIL: u32 = u32::MAX;
/// At most this many speculative entries await expiry; older ones expire early.
const MAX_PENDING_SPECULATIVE: usize = 1 << 22;

struct Shard {
    table: HashTable<u32>,
    slots: Slab,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    entries: usize,
    /// Every clear with a sequence number below this has been swept from this shard, so
    /// when it equals the index's `clears`, no entry here can be stale.
    clean_upto: u64,
    /// Copies beyond [`INLINE_COPIES`], by (block key, holder).
    extra: hashbrown::HashMap<(u64, u32), u32>,
}

/// The (pod, tier) an entry belongs to, as a side-table key.
#[inline]
fn holder(e: PodEntry) -> u32 {
    e.pod() as u32 | (e.tier() as u32) << 16
}

#[inline]
fn mix(k: u64) -> u64 {
    let m = (k ^ 0x9E37_79B9_7F4A_7C15) as u128 * 0xD6E8_FEB8_6659_FD93u128;
    (m as u64) ^ ((m >> 64) as u64)
}

type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

struct PodState {
    epochs: Box<[AtomicU8]>,
    counts: Box<[AtomicI64]>,
}

impl PodState {
    #[inline]
    fn valid(&self, e: PodEntry) -> bool {
        e.epoch() == self.epochs[e.pod() as usize].load(Relaxed)
    }
}

impl Shard {
    fn new() -> Self {
        Self {
            table: HashTable::new(),
            slots: Slab::default(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            entries: 0,
            clean_upto: 0,
            extra: hashbrown::HashMap::new(),
        }
    }

    #[inline]
    fn find(&self, key: u64, h: u64) -> Option<u32> {
        let slots = &self.slots;
        self.table.find(h, |&i| slots[i].key == key).copied()
    }

    fn unlink(&mut self, i: u32) {
        let (p, n) = (self.slots[i].prev, self.slots[i].next);
        if p == NIL {
            self.head = n
        } else {
            self.slots[p].next = n
        }
        if n == NIL {
            self.tail = p
        } else {
            self.slots[n].prev = p
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i];
            s.prev = NIL;
            s.next = old;
        }
        if old == NIL {
            self.tail = i
        } else {
            self.slots[old].prev = i
        }
        self.head = i;
    }

    #[inline]
    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn find_or_insert(&mut self, key: u64, h: u64) -> u32 {
        if let Some(i) = self.find(key, h) {
            return i;
        }
        let slot = Slot { key, prev: NIL, next: NIL, pods: PodList::Empty };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => self.slots.push(slot),
        };
        let Shard { table, slots, .. } = self;
        table.insert_unique(h, i, |&j| mix(slots[j].key));
        self.push_front(i);
        i
    }

    /// Removes a slot whose entries have already been accounted for.
    fn free_slot(&mut self, i: u32) {
        let key = self.slots[i].key;
        let Shard { table, slots, .. } = self;
        if let Ok(entry) = table.find_entry(mix(key), |&j| slots[j].key == key) {
            entry.remove();
        }
        self.unlink(i);
        self.slots[i].pods = PodList::Empty;
        self.free.push(i);
    }

    /// Forgets the side-table copies of the entries of slot `i` that `dropped` selects
    /// (call before dropping them).
    fn forget_extra(&mut self, i: u32, dropped: impl Fn(PodEntry) -> bool) {
        if self.extra.is_empty() {
            return;
        }
        let Shard { slots, extra, .. } = self;
        let slot = &slots[i];
        for e in slot.pods.as_slice() {
            if e.copies() == INLINE_COPIES && dropped(*e) {
                extra.remove(&(slot.key, holder(*e)));
            }
        }
    }

    /// Copies an entry counts, side table included.
    fn copies(&self, key: u64, e: PodEntry) -> u32 {
        match e.copies() {
            INLINE_COPIES => INLINE_COPIES + self.extra.get(&(key, holder(e))).copied().unwrap_or(0),
            n => n,
        }
    }

    /// Drops a slot and all its entries (eviction, sweeps).
    fn drop_slot(&mut self, i: u32, pods: &PodState) {
        self.forget_extra(i, |_| true);
        for e in self.slots[i].pods.as_slice() {
            if pods.valid(*e) {
                pods.counts[e.pod() as usize].fetch_sub(1, Relaxed);
            }
        }
        self.entries -= self.slots[i].pods.len();
        self.free_slot(i);
    }

    /// Drops entries of cleared pods from a slot.
    fn purge_stale(&mut self, i: u32, pods: &PodState) {
        self.forget_extra(i, |e| !pods.valid(e));
        self.entries -= self.slots[i].pods.retain(|e| pods.valid(e));
    }
}

/// The default, in-process [`BlockIndex`].
pub struct InMemoryIndex {
    shards: Box<[Mutex<Shard>]>,
    mask: u64,
    cap_per_shard: usize,
    pods: PodState,
    pending: Mutex<VecDeque<(Instant, PodEntry, u64)>>,
    clock: Clock,
    ttl: Duration,
    evicted_blocks: AtomicU64,
    expired_speculative: AtomicU64,
    /// Number of `clear_pod` calls so far.
    clears: AtomicU64,
}

impl InMemoryIndex {
    pub fn new(cfg: IndexConfig) -> Self {
        Self::with_clock(cfg, Arc::new(Instant::now))
    }

    /// An index reading time from `clock` (tests drive speculative expiry with it).
    pub fn with_clock(cfg: IndexConfig, clock: Clock) -> Self {
        let mut n = cfg.shards.clamp(1, 1 << 12).next_power_of_two();
        while n > 1 && cfg.capacity / n < MIN_ENTRIES_PER_SHARD {
            n /= 2;
        }
        Self {
            shards: (0..n).map(|_| Mutex::new(Shard::new())).collect(),
            mask: (n - 1) as u64,
            cap_per_shard: cfg.capacity.div_ceil(n).max(1),
            pods: PodState {
                epochs: (0..MAX_PODS).map(|_| AtomicU8::new(0)).collect(),
                counts: (0..MAX_PODS).map(|_| AtomicI64::new(0)).collect(),
            },
            pending: Mutex::new(VecDeque::new()),
            clock,
            ttl: cfg.speculative_ttl,
            evicted_blocks: AtomicU64::new(0),
            expired_speculative: AtomicU64::new(0),
            clears: AtomicU64::new(0),
        }
    }

    #[inline]
    fn shard(&self, h: u64) -> &Mutex<Shard> {
        &self.shards[((h >> 40) & self.mask) as usize]
    }

    fn evict(&self, s: &mut Shard) {
        while s.entries > self.cap_per_shard && s.tail != NIL {
            let t = s.tail;
            s.drop_slot(t, &self.pods);
            self.evicted_blocks.fetch_add(1, Relaxed);
        }
    }

    /// Adds entries; returns the keys that gained a new entry.
    fn add(&self, pod: PodId, tier: TierId, keys: &[u64], speculative: bool, mut added: impl FnMut(u64)) {
        let epoch = self.pods.epochs[pod as usize].load(Acquire);
        let fresh = PodEntry::new(pod, tier, epoch, speculative);
        let clears = self.clears.load(Acquire);
        for &key in keys {
            let h = mix(key);
            let mut s = self.shard(h).lock();
            let i = s.find_or_insert(key, h);
            if s.clean_upto != clears {
                s.purge_stale(i, &self.pods);
            }
            let Shard { slots, extra, .. } = &mut *s;
            let list = &mut slots[i].pods;
            let mut grew = false;
            match list.as_slice().iter().position(|e| e.same_holder(pod, tier)) {
                Some(_) if speculative => {}
                Some(j) => {
                    let e = &mut list.as_mut_slice()[j];
                    match e.copies() {
                        _ if e.speculative() => *e = e.confirmed(),
                        INLINE_COPIES => *extra.entry((key, holder(*e))).or_insert(0) += 1,
                        n => *e = e.with_copies(n + 1),
                    }
                }
                None if speculative && list.as_slice().iter().any(|e| e.pod() == pod) => {}
                None => {
                    list.push(fresh);
                    grew = true;
                }
            }
            if grew {
                s.entries += 1;
                self.pods.counts[pod as usize].fetch_add(1, Relaxed);
                added(key);
            }
            s.touch(i);
            self.evict(&mut s);
        }
    }

    /// Expires due speculative entries (cheap when none are due or another thread is at it).
    pub fn expire_speculative(&self) {
        let Some(mut q) = self.pending.try_lock() else { return };
        let now = (self.clock)();
        while let Some(&(deadline, e, key)) = q.front() {
            if deadline > now && q.len() <= MAX_PENDING_SPECULATIVE {
                break;
            }
            q.pop_front();
            let h = mix(key);
            let mut s = self.shard(h).lock();
            let Some(i) = s.find(key, h) else { continue };
            let list = &mut s.slots[i].pods;
            if let Some(j) = list.as_slice().iter().position(|x| *x == e) {
                list.remove(j);
                s.entries -= 1;
                self.pods.counts[e.pod() as usize].fetch_sub(1, Relaxed);
                self.expired_speculative.fetch_add(1, Relaxed);
                if s.slots[i].pods.is_empty() {
                    s.free_slot(i);
                }
            }
        }
    }

    /// Removes entries of cleared pods from every shard, one shard lock at a time.
    /// `drop_pod` also removes that pod's entries whatever their epoch (epoch wrap).
    fn sweep(&self, drop_pod: Option<PodId>) {
        for shard in self.shards.iter() {
            let seq = self.clears.load(Acquire);
            let mut s = shard.lock();
            let live: Vec<u32> = s.table.iter().copied().collect();
            for i in live {
                let keep = |e: PodEntry| self.pods.valid(e) && Some(e.pod()) != drop_pod;
                s.forget_extra(i, |e| !keep(e));
                let removed = s.slots[i].pods.retain(keep);
                s.entries -= removed;
                if s.slots[i].pods.is_empty() {
                    s.free_slot(i);
                }
            }
            s.clean_upto = s.clean_upto.max(seq);
        }
    }
}

impl BlockIndex for InMemoryIndex {
    fn store(&self, pod: PodId, tier: TierId, keys: &[u64]) {
        self.add(pod, tier, keys, false, |_| {});
    }

    fn store_speculative(&self, pod: PodId, tier: TierId, keys: &[u64]) {
        self.expire_speculative();
        let deadline = (self.clock)() + self.ttl;
        let epoch = self.pods.epochs[pod as usize].load(Acquire);
        let e = PodEntry::new(pod, tier, epoch, true);
        let mut newly = Vec::new();
        self.add(pod, tier, keys, true, |k| newly.push(k));
        let mut q = self.pending.lock();
        q.extend(newly.into_iter().map(|k| (deadline, e, k)));
    }

    fn remove(&self, pod: PodId, tier: Option<TierId>, keys: &[u64]) {
        for &key in keys {
            let h = mix(key);
            let mut s = self.shard(h).lock();
            let Some(i) = s.find(key, h) else { continue };
            let hit = |e: PodEntry| e.pod() == pod && tier.is_none_or(|t| e.tier() == t);
            // One copy fewer of each matching entry; an entry goes with its last copy
            // (a speculative or stale one at once).
            let mut gone: smallvec::SmallVec<[PodEntry; 4]> = smallvec::SmallVec::new();
            for j in 0..s.slots[i].pods.len() {
                let e = s.slots[i].pods.as_slice()[j];
                if !hit(e) {
                    continue;
                }
                let n = if self.pods.valid(e) { s.copies(key, e) } else { 0 };
                match n {
                    0 | 1 => gone.push(e),
                    n if n > INLINE_COPIES => {
                        let k = (key, holder(e));
                        match n - INLINE_COPIES {
                            1 => s.extra.remove(&k),
                            _ => s.extra.get_mut(&k).map(|x| {
                                *x -= 1;
                                *x
                            }),
                        };
                    }
                    n => s.slots[i].pods.as_mut_slice()[j] = e.with_copies(n - 1),
                }
            }
            if gone.is_empty() {
                continue;
            }
            let valid_removed = gone.iter().filter(|e| self.pods.valid(**e)).count() as i64;
            s.forget_extra(i, |e| gone.contains(&e));
            let removed = s.slots[i].pods.retain(|e| !gone.contains(&e));
            s.entries -= removed;
            self.pods.counts[pod as usize].fetch_sub(valid_removed, Relaxed);
            if s.slots[i].pods.is_empty() {
                s.free_slot(i);
            }
        }
    }

    /// Invisible to lookups at once (the pod's epoch moves on); the memory is reclaimed by
    /// a sweep of all shards before returning, after which lookups skip validity checks
    /// again. O(index size), but clears are rare (engine reset or restart).
    fn clear_pod(&self, pod: PodId) {
        let epoch = &self.pods.epochs[pod as usize];
        let wrap = epoch.load(Acquire) == u8::MAX;
        if wrap {
            // Old epochs would become valid again: drop every entry of the pod first.
            self.clears.fetch_add(1, AcqRel);
            self.sweep(Some(pod));
            epoch.store(0, Release);
        } else {
            epoch.fetch_add(1, AcqRel);
            self.clears.fetch_add(1, AcqRel);
        }
        self.pods.counts[pod as usize].store(0, Relaxed);
        self.sweep(None);
    }

    fn prefix_lookup(&self, keys: &[u64], f: &mut dyn FnMut(usize, &[PodEntry]) -> bool) {
        self.expire_speculative();
        let clears = self.clears.load(Acquire);
        for (pos, &key) in keys.iter().enumerate() {
            let h = mix(key);
            let mut s = self.shard(h).lock();
            let Some(i) = s.find(key, h) else { return };
            // Entries of cleared pods are dropped here, so `f` sees only live ones and
            // no copy is needed; `f` runs under the shard lock (it must not re-enter).
            // Only shards not yet swept since the last clear can hold stale entries.
            let stale = s.clean_upto != clears
                && s.slots[i].pods.as_slice().iter().fold(false, |acc, e| acc | !self.pods.valid(*e));
            if stale {
                s.purge_stale(i, &self.pods);
            }
            s.touch(i);
            let list = s.slots[i].pods.as_slice();
            if list.is_empty() {
                if s.slots[i].pods.is_empty() {
                    s.free_slot(i);
                }
                return;
            }
            if !f(pos, list) {
                return;
            }
        }
    }

    fn pod_entries(&self, pod: PodId) -> u64 {
        self.pods.counts[pod as usize].load(Relaxed).max(0) as u64
    }

    fn stats(&self) -> IndexStats {
        let (mut blocks, mut entries) = (0, 0);
        for s in self.shards.iter() {
            let s = s.lock();
            blocks += s.table.len() as u64;
            entries += s.entries as u64;
        }
        IndexStats {
            blocks,
            entries,
            capacity: (self.cap_per_shard * self.shards.len()) as u64,
            evicted_blocks: self.evicted_blocks.load(Relaxed),
            expired_speculative: self.expired_speculative.load(Relaxed),
            pending_speculative: self.pending.lock().len() as u64,
        }
    }
}
