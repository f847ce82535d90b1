//! Conformance with vLLM's own prefix cache: a trace recorded from vLLM 0.33's unmodified
//! `BlockPool` (driven like its scheduler drives it, `scripts/vllm-pool-trace.py`) is
//! replayed into an index through the [`EventApplier`], in engine-key and request-key
//! mode, and after every step each prompt's longest cached prefix in the index must equal
//! the pool's (`get_cached_block` from the first block on).
//!
//! The trace holds the case that one-event-one-state-change gets wrong: vLLM caches a
//! second copy of a block (block-aligned prompts recompute their last block; identical
//! prompts prefilled together each cache their own) and publishes `BlockStored` again,
//! then removes one copy while the other stays cached.

use std::collections::HashSet;
use std::path::PathBuf;

use kvroute_events::{decode_batch, KvEvent};
use kvroute_index::{BlockIndex, EventApplier, KeyMode, PodId};
use kvroute_keys::{RequestExtras, RequestKeyer};
use serde_json::Value;

use crate::Make;

/// The pod the trace is applied to.
const POD: PodId = 1;

/// One recorded run of the pool.
pub struct TraceRun {
    pub seed: u64,
    /// Every prompt the run saw: token ids and vLLM's block hashes as events carry them.
    pub prompts: Vec<(Vec<u32>, Vec<u64>)>,
    pub steps: Vec<TraceStep>,
    /// The generator's counts (`stored_again`, `removed_with_copy_left`, …).
    pub stats: Value,
}

/// One scheduler step: the batch the pool published (if any), how many prompts were known
/// then, and the prompts whose cached prefix (in blocks) changed.
pub struct TraceStep {
    pub payload: Option<Vec<u8>>,
    pub known: usize,
    pub changed: Vec<(usize, usize)>,
}

/// Where the trace lives: `KVROUTE_POOL_TRACE`, else the repository's `tests/data`.
fn trace_path() -> PathBuf {
    match std::env::var_os("KVROUTE_POOL_TRACE") {
        Some(p) => p.into(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/vllm_pool_trace.json"),
    }
}

/// Loads the recorded runs (panics with the path when the file is missing or malformed:
/// this is test support).
pub fn vllm_pool_trace_runs() -> Vec<TraceRun> {
    let path = trace_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let nums = |v: &Value| -> Vec<u64> { v.as_array().into_iter().flatten().filter_map(Value::as_u64).collect() };
    let runs = doc["runs"].as_array().expect("runs");
    runs.iter()
        .map(|r| TraceRun {
            seed: r["seed"].as_u64().unwrap_or(0),
            prompts: r["prompts"]
                .as_array()
                .expect("prompts")
                .iter()
                .map(|p| (nums(&p["tokens"]).into_iter().map(|t| t as u32).collect(), nums(&p["hashes"])))
                .collect(),
            steps: r["steps"]
                .as_array()
                .expect("steps")
                .iter()
                .map(|s| TraceStep {
                    payload: s["payload_hex"].as_str().map(|h| hex_decode(h).expect("payload hex")),
                    known: s["probes"].as_u64().unwrap_or(0) as usize,
                    changed: s["changed"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| (c[0].as_u64().unwrap_or(0) as usize, c[1].as_u64().unwrap_or(0) as usize))
                        .collect(),
                })
                .collect(),
            stats: r["stats"].clone(),
        })
        .collect()
}

fn hex_decode(h: &str) -> Option<Vec<u8>> {
    (0..h.len()).step_by(2).map(|i| h.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

/// Leading blocks of `keys` that `POD` holds (confirmed) in `idx`.
pub fn held_prefix(idx: &dyn BlockIndex, pod: PodId, keys: &[u64]) -> usize {
    let mut n = 0;
    idx.prefix_lookup(keys, &mut |i, e| {
        let held = e.iter().any(|x| x.pod() == pod && !x.speculative());
        if held {
            n = i + 1;
        }
        held
    });
    n
}

/// Replays every recorded run into fresh indexes from `make`, in both key modes, and
/// checks every prompt's cached prefix after every step. Shared backends, where each
/// lookup is a round trip, can check only the prompts a step's events touch, with a full
/// check every `full_every` steps ([`vllm_pool_trace`] checks all every step).
pub fn vllm_pool_trace_with(make: Make<'_>, full_every: usize) {
    let runs = vllm_pool_trace_runs();
    assert!(!runs.is_empty(), "the trace has no runs");
    for run in &runs {
        // The trace must hold what it is for: copies stored again and removed while
        // another stays.
        for what in ["stored_again", "removed_with_copy_left", "cleared"] {
            assert!(run.stats[what].as_u64().unwrap_or(0) > 0, "seed {}: the trace has no {what}", run.seed);
        }
        let keyer = RequestKeyer::new(16, "0");
        let request_keys: Vec<Vec<u64>> = run
            .prompts
            .iter()
            .map(|(toks, _)| {
                let mut out = Vec::new();
                keyer.keys("", toks, &RequestExtras::default(), &mut out);
                out
            })
            .collect();
        let engine_keys: Vec<Vec<u64>> = run.prompts.iter().map(|p| p.1.clone()).collect();
        for (mode, keys) in [(KeyMode::Engine, &engine_keys), (KeyMode::Request(keyer.clone()), &request_keys)] {
            let name = if matches!(mode, KeyMode::Engine) { "engine" } else { "request" };
            let applier = EventApplier::new(make(), mode);
            let mut expect = vec![0usize; run.prompts.len()];
            for (n, step) in run.steps.iter().enumerate() {
                let mut touched: HashSet<u64> = HashSet::new();
                let mut cleared = false;
                if let Some(p) = &step.payload {
                    let batch = decode_batch(p).unwrap_or_else(|e| panic!("seed {} step {n}: {e}", run.seed));
                    for ev in &batch.events {
                        match ev {
                            KvEvent::BlockStored(s) => touched.extend(&s.block_hashes),
                            KvEvent::BlockRemoved(r) => touched.extend(&r.block_hashes),
                            KvEvent::AllBlocksCleared => cleared = true,
                        }
                    }
                    applier.apply(POD, "m", &batch);
                }
                for &(i, v) in &step.changed {
                    expect[i] = v;
                }
                let full = cleared || full_every <= 1 || n % full_every == 0 || n + 1 == run.steps.len();
                for i in 0..step.known.min(run.prompts.len()) {
                    let relevant = full
                        || step.changed.iter().any(|c| c.0 == i)
                        || run.prompts[i].1.iter().any(|h| touched.contains(h));
                    if !relevant {
                        continue;
                    }
                    let got = held_prefix(&**applier.index(), POD, &keys[i]);
                    assert_eq!(
                        got, expect[i],
                        "seed {} ({name} keys), step {n}: prompt {i} has {} cached blocks in vLLM's pool, {got} in the index",
                        run.seed, expect[i]
                    );
                }
            }
        }
    }
}

/// [`vllm_pool_trace_with`] checking every prompt after every step.
pub fn vllm_pool_trace(make: Make<'_>) {
    vllm_pool_trace_with(make, 1)
}
