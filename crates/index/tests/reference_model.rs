//! Property: any interleaving of store / remove / clear (and speculative entries that are
//! confirmed) gives the same scores as a naive reference model — the shared conformance
//! suite (`kvroute-index-conformance`) run on the in-memory index.

use std::sync::Arc;

use kvroute_index::{BlockIndex, InMemoryIndex, IndexConfig};

fn make(shards: usize) -> impl Fn() -> Arc<dyn BlockIndex> {
    move || Arc::new(InMemoryIndex::new(IndexConfig { shards, ..Default::default() }))
}

#[test]
fn sequential_ops_match_the_reference() {
    kvroute_index_conformance::sequential_ops_match_the_reference(&make(4), 300);
}

#[test]
fn concurrent_pods_match_the_reference() {
    kvroute_index_conformance::concurrent_pods_match_the_reference(&make(2), 300);
}

#[test]
fn conformance_behaviour() {
    kvroute_index_conformance::behaviour(&make(4));
}

/// vLLM 0.33's own `BlockPool`, recorded (`scripts/vllm-pool-trace.py`): after every step
/// each prompt's cached prefix in the index equals the pool's, with copies stored twice
/// and removed once, in engine-key and request-key mode.
#[test]
fn matches_vllm_block_pool_after_every_step() {
    kvroute_index_conformance::vllm_pool_trace(&make(4));
}
