//! Compact storage for the in-memory index: a 16-byte pod list and a chunked slot slab.

use std::ops::{Index, IndexMut};

use crate::entry::PodEntry;

/// The pods holding one block: inline up to 3 (the common case), boxed beyond.
/// 16 bytes, against 24 for a `SmallVec` — this is most of an index's memory.
#[derive(Clone, Default)]
pub(crate) enum PodList {
    #[default]
    Empty,
    One(PodEntry),
    Two([PodEntry; 2]),
    Three([PodEntry; 3]),
    // Boxed: a bare Vec (24 bytes) would make every list 32 bytes.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<PodEntry>>),
}

const _: () = assert!(std::mem::size_of::<PodList>() == 16);

impl PodList {
    pub(crate) fn as_slice(&self) -> &[PodEntry] {
        match self {
            PodList::Empty => &[],
            PodList::One(e) => std::slice::from_ref(e),
            PodList::Two(a) => a,
            PodList::Three(a) => a,
            PodList::Many(v) => v,
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [PodEntry] {
        match self {
            PodList::Empty => &mut [],
            PodList::One(e) => std::slice::from_mut(e),
            PodList::Two(a) => a,
            PodList::Three(a) => a,
            PodList::Many(v) => v,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, PodList::Empty)
    }

    fn from_slice(s: &[PodEntry]) -> Self {
        match *s {
            [] => PodList::Empty,
            [a] => PodList::One(a),
            [a, b] => PodList::Two([a, b]),
            [a, b, c] => PodList::Three([a, b, c]),
            _ => PodList::Many(Box::new(s.to_vec())),
        }
    }

    pub(crate) fn push(&mut self, e: PodEntry) {
        *self = match std::mem::take(self) {
            PodList::Empty => PodList::One(e),
            PodList::One(a) => PodList::Two([a, e]),
            PodList::Two([a, b]) => PodList::Three([a, b, e]),
            PodList::Three([a, b, c]) => PodList::Many(Box::new(vec![a, b, c, e])),
            PodList::Many(mut v) => {
                v.push(e);
                PodList::Many(v)
            }
        }
    }

    /// Keeps the entries `keep` accepts; returns how many were dropped.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(PodEntry) -> bool) -> usize {
        let before = self.len();
        if self.as_slice().iter().all(|e| keep(*e)) {
            return 0;
        }
        // `keep` has been called once per entry; call it again only through the filter
        // below (the callers' predicates are pure).
        let kept: smallvec::SmallVec<[PodEntry; 8]> = self.as_slice().iter().copied().filter(|e| keep(*e)).collect();
        *self = PodList::from_slice(&kept);
        before - self.len()
    }

    pub(crate) fn remove(&mut self, j: usize) {
        let mut v: smallvec::SmallVec<[PodEntry; 8]> = self.as_slice().iter().copied().collect();
        v.remove(j);
        *self = PodList::from_slice(&v);
    }
}

/// One block in the index.
pub(crate) struct Slot {
    pub(crate) key: u64,
    pub(crate) prev: u32,
    pub(crate) next: u32,
    pub(crate) pods: PodList,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 32);

const CHUNK_BITS: u32 = 12;
const CHUNK: usize = 1 << CHUNK_BITS;

/// Slots in fixed chunks of 4096, so growing never copies or over-allocates by more
/// than one chunk (a `Vec` doubling would waste up to half its capacity).
#[derive(Default)]
pub(crate) struct Slab {
    chunks: Vec<Vec<Slot>>,
}

impl Slab {
    pub(crate) fn push(&mut self, s: Slot) -> u32 {
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let n = self.chunks.len() - 1;
        let last = &mut self.chunks[n];
        last.push(s);
        ((n << CHUNK_BITS) | (last.len() - 1)) as u32
    }
}

impl Index<u32> for Slab {
    type Output = Slot;
    #[inline]
    fn index(&self, i: u32) -> &Slot {
        &self.chunks[(i >> CHUNK_BITS) as usize][i as usize & (CHUNK - 1)]
    }
}

impl IndexMut<u32> for Slab {
    #[inline]
    fn index_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.chunks[(i >> CHUNK_BITS) as usize][i as usize & (CHUNK - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_list_grows_shrinks_and_keeps_order() {
        let e = |p| PodEntry::new(p, 0, 0, false);
        let mut l = PodList::default();
        for p in 0..6 {
            l.push(e(p));
        }
        assert_eq!(l.as_slice().iter().map(|x| x.pod()).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(l.retain(|x| x.pod() % 2 == 0), 3);
        assert!(matches!(l, PodList::Three(_)));
        l.remove(1);
        assert_eq!(l.as_slice().iter().map(|x| x.pod()).collect::<Vec<_>>(), vec![0, 4]);
        assert_eq!(l.retain(|_| false), 2);
        assert!(l.is_empty());
    }

    #[test]
    fn slab_indices_span_chunks() {
        let mut s = Slab::default();
        for k in 0..10_000u64 {
            let i = s.push(Slot { key: k, prev: 0, next: 0, pods: PodList::Empty });
            assert_eq!(i as u64, k);
        }
        assert_eq!(s[4097].key, 4097);
        s[9999].key = 1;
        assert_eq!(s[9999].key, 1);
    }
}
