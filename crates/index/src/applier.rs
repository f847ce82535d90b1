//! Applies decoded KV-event batches from one pod to a [`BlockIndex`].
//!
//! Two ways to key blocks ([`KeyMode`]):
//! * **Engine** keys: the index is keyed on the u64 hashes in the events, and requests are
//!   keyed with [`kvroute_keys::BlockHasher`] configured like the engines (same algorithm,
//!   `PYTHONHASHSEED`, block size, vLLM version). Fastest; needs that alignment.
//! * **Request** keys: kvroute hashes each event's `token_ids` itself
//!   ([`kvroute_keys::RequestKeyer`], chained through the parent) and keeps a per-pod map
//!   `engine hash → request key` to resolve parents and removals. Works with any engine
//!   hash (xxhash, `builtin`, random seeds) — what llm-d does since v0.5.
//!
//! Events for one pod must be applied in order (the ingestion layer shards by pod), and
//! each once: vLLM stores the same block again when it caches a second copy and removes
//! it once per copy evicted, so the index counts copies and a repeated event would count
//! twice (the ingestion layer skips batches already applied by sequence number).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kvroute_events::{BlockStored, EventBatch, KvEvent, Value};
use kvroute_keys::RequestKeyer;
use parking_lot::{Mutex, RwLock};

use crate::entry::{PodId, TierId};
use crate::pods::Tiers;
use crate::BlockIndex;

/// How blocks are keyed; see the module docs.
#[derive(Clone, Debug)]
pub enum KeyMode {
    Engine,
    Request(RequestKeyer),
}

/// Counters of what the applier did (all monotonic).
#[derive(Debug, Default)]
pub struct ApplyCounters {
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub blocks_stored: AtomicU64,
    pub blocks_removed: AtomicU64,
    pub clears: AtomicU64,
    /// BlockStored whose parent is unknown (request mode): cannot be chained, skipped.
    pub orphan_blocks: AtomicU64,
    /// BlockStored whose block size differs from the configured one (request mode), or
    /// whose token count is not `block_size × hashes`: skipped.
    pub mismatched_blocks: AtomicU64,
    /// Batches skipped because they had been applied already (a replay repeating them).
    pub repeated_batches: AtomicU64,
}

/// A snapshot of the applier's counters (`ApplyCounters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplySnapshot {
    pub batches: u64,
    pub events: u64,
    pub blocks_stored: u64,
    pub blocks_removed: u64,
    pub clears: u64,
    pub orphan_blocks: u64,
    pub mismatched_blocks: u64,
    pub repeated_batches: u64,
}

/// Copies of one engine block per tier (vLLM can cache a block more than once).
#[derive(Default)]
struct TierCopies(smallvec::SmallVec<[(TierId, u32); 2]>);

impl TierCopies {
    fn add(&mut self, tier: TierId) {
        match self.0.iter_mut().find(|c| c.0 == tier) {
            Some(c) => c.1 += 1,
            None => self.0.push((tier, 1)),
        }
    }
    /// One copy fewer on `tier`; false when there was none.
    fn take(&mut self, tier: TierId) -> bool {
        let Some(j) = self.0.iter().position(|c| c.0 == tier) else { return false };
        self.0[j].1 -= 1;
        if self.0[j].1 == 0 {
            self.0.remove(j);
        }
        true
    }
}

/// Per-pod `engine hash → (request key, copies per tier)`.
type EngineMap = HashMap<u64, (u64, TierCopies)>;

/// Feeds event batches into an index.
pub struct EventApplier<I: BlockIndex> {
    index: I,
    mode: KeyMode,
    tiers: Tiers,
    maps: RwLock<HashMap<PodId, Mutex<EngineMap>>>,
    /// Last batch applied per pod (when the index does not keep that record itself).
    seqs: Mutex<HashMap<PodId, u64>>,
    counters: ApplyCounters,
}

impl<I: BlockIndex> EventApplier<I> {
    pub fn new(index: I, mode: KeyMode) -> Self {
        Self {
            index,
            mode,
            tiers: Tiers::default(),
            maps: RwLock::new(HashMap::new()),
            seqs: Mutex::new(HashMap::new()),
            counters: ApplyCounters::default(),
        }
    }

    pub fn index(&self) -> &I {
        &self.index
    }

    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    pub fn mode(&self) -> &KeyMode {
        &self.mode
    }

    pub fn counters(&self) -> ApplySnapshot {
        let c = &self.counters;
        ApplySnapshot {
            batches: c.batches.load(Relaxed),
            events: c.events.load(Relaxed),
            blocks_stored: c.blocks_stored.load(Relaxed),
            blocks_removed: c.blocks_removed.load(Relaxed),
            clears: c.clears.load(Relaxed),
            orphan_blocks: c.orphan_blocks.load(Relaxed),
            mismatched_blocks: c.mismatched_blocks.load(Relaxed),
            repeated_batches: c.repeated_batches.load(Relaxed),
        }
    }

    /// The last batch of `pod` applied (by sequence number) since its last clear.
    pub fn applied_seq(&self, pod: PodId) -> Option<u64> {
        if self.index.tracks_applied_seq() {
            self.index.applied_seq(pod)
        } else {
            self.seqs.lock().get(&pod).copied()
        }
    }

    /// Applies batch `seq` of `pod` unless a batch at or after `seq` has been applied since
    /// the pod's last clear (a replay repeating what a live stream, an earlier replay or —
    /// on a shared index — another replica already applied): copies are counted, so
    /// applying a batch twice would count its blocks twice. Returns whether it applied.
    /// A pod's batches must come in sequence order; a clear (restart, `AllBlocksCleared`)
    /// starts its sequence afresh.
    pub fn apply_seq(&self, pod: PodId, model: &str, seq: u64, batch: &EventBatch) -> bool {
        if self.applied_seq(pod).is_some_and(|a| seq <= a) {
            self.counters.repeated_batches.fetch_add(1, Relaxed);
            return false;
        }
        self.apply(pod, model, batch);
        if self.index.tracks_applied_seq() {
            self.index.set_applied_seq(pod, seq);
        } else {
            self.seqs.lock().insert(pod, seq);
        }
        true
    }

    /// Applies one batch from `pod`, whose topic named `model` (used as the key root in
    /// request mode unless the event names a LoRA adapter).
    pub fn apply(&self, pod: PodId, model: &str, batch: &EventBatch) {
        self.counters.batches.fetch_add(1, Relaxed);
        for ev in &batch.events {
            self.counters.events.fetch_add(1, Relaxed);
            match ev {
                KvEvent::BlockStored(s) => self.stored(pod, model, s),
                KvEvent::BlockRemoved(r) => {
                    let tier = self.tiers.intern(r.medium.as_deref());
                    self.removed(pod, tier, &r.block_hashes);
                }
                KvEvent::AllBlocksCleared => self.clear_pod(pod),
            }
        }
    }

    /// Forgets everything about `pod` (AllBlocksCleared, engine restart, pod gone).
    pub fn clear_pod(&self, pod: PodId) {
        self.counters.clears.fetch_add(1, Relaxed);
        self.seqs.lock().remove(&pod);
        self.index.clear_pod(pod);
        if let Some(m) = self.maps.read().get(&pod) {
            m.lock().clear();
        }
    }

    fn with_map<R>(&self, pod: PodId, f: impl FnOnce(&mut EngineMap) -> R) -> R {
        if let Some(m) = self.maps.read().get(&pod) {
            return f(&mut m.lock());
        }
        let mut w = self.maps.write();
        let m = w.entry(pod).or_default().get_mut();
        f(m)
    }

    fn stored(&self, pod: PodId, model: &str, s: &BlockStored) {
        let tier = self.tiers.intern(s.medium.as_deref());
        let n = s.block_hashes.len() as u64;
        let keyer = match &self.mode {
            KeyMode::Engine => {
                self.index.store(pod, tier, &s.block_hashes);
                self.counters.blocks_stored.fetch_add(n, Relaxed);
                return;
            }
            KeyMode::Request(k) => k,
        };
        let bs = s.block_size as usize;
        if s.token_ids.is_empty() {
            // A tier notice (e.g. CPU offload): the blocks are already known by hash.
            let keys: Vec<u64> = self.with_map(pod, |m| {
                s.block_hashes
                    .iter()
                    .filter_map(|h| {
                        m.get_mut(h).map(|v| {
                            v.1.add(tier);
                            v.0
                        })
                    })
                    .collect()
            });
            self.counters.orphan_blocks.fetch_add(n - keys.len() as u64, Relaxed);
            self.counters.blocks_stored.fetch_add(keys.len() as u64, Relaxed);
            self.index.store(pod, tier, &keys);
            return;
        }
        if bs != keyer.block_size() || s.token_ids.len() != bs * s.block_hashes.len() {
            self.counters.mismatched_blocks.fetch_add(n, Relaxed);
            return;
        }
        // Keys are rooted in the LoRA adapter (or none), not the model: topics often do
        // not name it, and pods are filtered by model before scoring anyway.
        let _ = model;
        let root_model = s.lora_name.as_deref().unwrap_or("");
        let keys = self.with_map(pod, |m| {
            let mut parent = match s.parent_block_hash {
                None | Some(0) => keyer.root(root_model),
                Some(p) => m.get(&p).map(|v| v.0)?,
            };
            let mut buf = Vec::with_capacity(8 + bs * 4);
            let mut keys = Vec::with_capacity(s.block_hashes.len());
            for (i, (&h, toks)) in s.block_hashes.iter().zip(s.token_ids.chunks_exact(bs)).enumerate() {
                let extra = s.extra_keys.as_ref().and_then(|e| e.get(i)).and_then(Option::as_ref);
                let parts = canonical_extras(extra, s.lora_name.as_deref(), s.lora_id);
                parent = keyer.chain(&mut buf, parent, toks, &parts);
                // Another copy of a known block keeps the key it was first stored under
                // (its remove must reach the same index entry).
                let entry = m.entry(h).or_insert_with(|| (parent, TierCopies::default()));
                entry.1.add(tier);
                keys.push(entry.0);
            }
            Some(keys)
        });
        match keys {
            Some(keys) => {
                self.index.store(pod, tier, &keys);
                self.counters.blocks_stored.fetch_add(n, Relaxed);
            }
            None => {
                self.counters.orphan_blocks.fetch_add(n, Relaxed);
            }
        }
    }

    fn removed(&self, pod: PodId, tier: TierId, hashes: &[u64]) {
        self.counters.blocks_removed.fetch_add(hashes.len() as u64, Relaxed);
        match &self.mode {
            KeyMode::Engine => self.index.remove(pod, Some(tier), hashes),
            KeyMode::Request(_) => {
                let keys: Vec<u64> = self.with_map(pod, |m| {
                    hashes
                        .iter()
                        .filter_map(|h| {
                            let v = m.get_mut(h)?;
                            let key = v.0;
                            if !v.1.take(tier) {
                                return None; // no copy on that tier: nothing to remove
                            }
                            if v.1 .0.is_empty() {
                                m.remove(h);
                            }
                            Some(key)
                        })
                        .collect()
                });
                self.index.remove(pod, Some(tier), &keys);
            }
        }
    }
}

/// An event's per-block `extra_keys` entry → the canonical extras request keys use:
/// multimodal identifiers and the cache salt, in order, without the LoRA adapter (which is
/// in the key root). Handles every era: bare values (≤ 0.18), `(identifier, offset)`
/// (0.19–0.30), tag-stripped (≥ 0.31), and tagged tuples.
fn canonical_extras<'a>(extra: Option<&'a Value>, lora_name: Option<&str>, lora_id: Option<i64>) -> Vec<&'a [u8]> {
    let Some(Value::Array(items)) = extra else { return Vec::new() };
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        match it {
            // The adapter comes first: by name (≥ 0.11.1) or by int id (older).
            Value::Str(s) if i == 0 && lora_name == Some(s.as_str()) => {}
            Value::Int(_) | Value::UInt(_) if i == 0 && lora_id.is_some() => {}
            Value::Str(s) => out.push(s.as_bytes()),
            Value::Bin(b) => out.push(b.as_slice()),
            Value::Array(t) => match t.as_slice() {
                [Value::Str(tag), ..] if tag == "lora" => {}
                [Value::Str(tag), Value::Str(id), ..] if tag == "mm" || tag == "cache_salt" => out.push(id.as_bytes()),
                [Value::Str(tag), Value::Bin(d)] if tag == "prompt_embeds" => out.push(d.as_slice()),
                [Value::Str(id), ..] => out.push(id.as_bytes()),
                _ => {}
            },
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extras_of_every_era_normalise_alike() {
        let s = |x: &str| Value::Str(x.into());
        let want: Vec<&[u8]> = vec![b"img", b"salt"];
        // ≤ 0.18: bare LoRA name, bare mm id, bare salt.
        let old = Value::Array(vec![s("ad"), s("img"), s("salt")]);
        assert_eq!(canonical_extras(Some(&old), Some("ad"), Some(1)), want);
        // 0.19–0.30: (id, offset).
        let mid = Value::Array(vec![s("ad"), Value::Array(vec![s("img"), Value::Int(-4)]), s("salt")]);
        assert_eq!(canonical_extras(Some(&mid), Some("ad"), Some(1)), want);
        // Tagged tuples (hash form ≥ 0.31).
        let tagged = Value::Array(vec![
            Value::Array(vec![s("lora"), s("ad"), s("/p")]),
            Value::Array(vec![s("mm"), s("img"), Value::UInt(3)]),
            Value::Array(vec![s("cache_salt"), s("salt")]),
        ]);
        assert_eq!(canonical_extras(Some(&tagged), Some("ad"), Some(1)), want);
        // ≤ 0.11.0: LoRA by int id.
        let int_id = Value::Array(vec![Value::UInt(1), s("img"), s("salt")]);
        assert_eq!(canonical_extras(Some(&int_id), None, Some(1)), want);
        assert!(canonical_extras(None, None, None).is_empty());
    }
}
