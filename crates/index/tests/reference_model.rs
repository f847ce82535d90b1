//! Property: any interleaving of store / remove / clear (and speculative entries that are
//! confirmed) gives the same scores as a naive reference model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kvroute_index::{BlockIndex, InMemoryIndex, IndexConfig, PodId, TierId, Tiers};
use kvroute_score::{LongestPrefixScorer, Scratch};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Store(PodId, TierId, Vec<u64>),
    Remove(PodId, Option<TierId>, Vec<u64>),
    Clear(PodId),
    /// Speculative then confirmed: must end up like a store.
    SpecThenStore(PodId, Vec<u64>),
}

fn op() -> impl Strategy<Value = Op> {
    let pod = 0u16..5;
    let tier = 0u8..3;
    let keys = proptest::collection::vec(1u64..13, 1..6);
    prop_oneof![
        5 => (pod.clone(), tier.clone(), keys.clone()).prop_map(|(p, t, k)| Op::Store(p, t, k)),
        3 => (pod.clone(), proptest::option::of(tier), keys.clone()).prop_map(|(p, t, k)| Op::Remove(p, t, k)),
        1 => pod.clone().prop_map(Op::Clear),
        1 => (pod, keys).prop_map(|(p, k)| Op::SpecThenStore(p, k)),
    ]
}

#[derive(Default)]
struct Reference(BTreeMap<u64, BTreeSet<(PodId, TierId)>>);

impl Reference {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Store(p, t, keys) => keys.iter().for_each(|k| {
                self.0.entry(*k).or_default().insert((*p, *t));
            }),
            Op::SpecThenStore(p, keys) => self.apply(&Op::Store(*p, Tiers::GPU, keys.clone())),
            Op::Remove(p, t, keys) => keys.iter().for_each(|k| {
                if let Some(s) = self.0.get_mut(k) {
                    s.retain(|(q, u)| !(q == p && t.is_none_or(|t| t == *u)));
                }
            }),
            Op::Clear(p) => self.0.values_mut().for_each(|s| s.retain(|(q, _)| q != p)),
        }
    }

    /// (pod, matched blocks, weighted) for pods holding block 0, best first.
    fn score(&self, keys: &[u64], w: &[f64]) -> Vec<(PodId, usize, f64)> {
        let mut out = Vec::new();
        for p in 0..5u16 {
            let (mut n, mut sum) = (0, 0.0);
            for k in keys {
                let best = self
                    .0
                    .get(k)
                    .into_iter()
                    .flatten()
                    .filter(|(q, _)| *q == p)
                    .map(|(_, t)| w[*t as usize])
                    .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))));
                match best {
                    Some(b) => {
                        n += 1;
                        sum += b;
                    }
                    None => break,
                }
            }
            if n > 0 {
                out.push((p, n, sum));
            }
        }
        out.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        out
    }
}

fn apply(idx: &InMemoryIndex, op: &Op) {
    match op {
        Op::Store(p, t, k) => idx.store(*p, *t, k),
        Op::Remove(p, t, k) => idx.remove(*p, *t, k),
        Op::Clear(p) => idx.clear_pod(*p),
        Op::SpecThenStore(p, k) => {
            idx.store_speculative(*p, Tiers::GPU, k);
            idx.store(*p, Tiers::GPU, k);
        }
    }
}

fn pod_of(op: &Op) -> PodId {
    match op {
        Op::Store(p, ..) | Op::Remove(p, ..) | Op::Clear(p) | Op::SpecThenStore(p, _) => *p,
    }
}

fn compare(idx: &InMemoryIndex, reference: &Reference) -> Result<(), TestCaseError> {
    let weights = Tiers::default().weights();
    let scorer = LongestPrefixScorer::new(weights);
    let mut scratch = Scratch::default();
    for start in 1..13u64 {
        let query: Vec<u64> = (start..13).collect();
        for len in [1, 3, query.len()] {
            let q = &query[..len.min(query.len())];
            // Scores are compared rounded, so float summation order cannot reorder ties.
            let canon = |mut v: Vec<(PodId, usize, f64)>| {
                v.iter_mut().for_each(|x| x.2 = (x.2 * 1e6).round() / 1e6);
                v.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
                v
            };
            let ours = canon(
                scorer
                    .score(idx, q, None, &mut scratch)
                    .iter()
                    .map(|s| (s.pod, s.matched_blocks, s.weighted))
                    .collect(),
            );
            let want = canon(reference.score(q, &weights));
            prop_assert_eq!(ours.len(), want.len(), "query {:?}", q);
            for (a, b) in ours.iter().zip(&want) {
                prop_assert!(
                    a.0 == b.0 && a.1 == b.1 && (a.2 - b.2).abs() < 1e-5,
                    "query {:?}: {:?} vs {:?}",
                    q,
                    ours,
                    want
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn sequential_ops_match_the_reference(ops in proptest::collection::vec(op(), 0..60)) {
        let idx = InMemoryIndex::new(IndexConfig { shards: 4, ..Default::default() });
        let mut reference = Reference::default();
        for op in &ops {
            apply(&idx, op);
            reference.apply(op);
        }
        compare(&idx, &reference)?;
        let live: u64 = (0..5).map(|p| idx.pod_entries(p)).sum();
        let want: u64 = reference.0.values().map(|s| s.len() as u64).sum();
        prop_assert_eq!(live, want);
    }

    /// Each pod's ops on its own thread, in order; pods interleave arbitrarily.
    #[test]
    fn concurrent_pods_match_the_reference(ops in proptest::collection::vec(op(), 0..80)) {
        let idx = Arc::new(InMemoryIndex::new(IndexConfig { shards: 2, ..Default::default() }));
        let mut reference = Reference::default();
        ops.iter().for_each(|o| reference.apply(o));
        std::thread::scope(|s| {
            for p in 0..5u16 {
                let mine: Vec<Op> = ops.iter().filter(|o| pod_of(o) == p).cloned().collect();
                let idx = idx.clone();
                s.spawn(move || mine.iter().for_each(|o| apply(&idx, o)));
            }
        });
        compare(&idx, &reference)?;
    }
}
