//! vLLM's own event payloads (`../shared/vectors/vllm_kv_events.json`, from its real
//! BlockPool) applied to the index, then a request for the same tokens scored: the keys
//! kvroute computes for the request must find exactly the blocks vLLM announced.

use std::path::PathBuf;

use kvroute_events::decode_batch;
use kvroute_index::{BlockIndex, EventApplier, InMemoryIndex, IndexConfig, KeyMode};
use kvroute_keys::{BlockHasher, HashAlgo, HashConfig, RequestExtras, RequestKeyer};
use kvroute_score::{LongestPrefixScorer, Scratch};
use serde_json::Value;

fn doc() -> Value {
    let dir = std::env::var("KVROUTE_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors"));
    serde_json::from_str(&std::fs::read_to_string(dir.join("vllm_kv_events.json")).expect("vectors present")).unwrap()
}

fn batch(sc: &Value, name: &str) -> kvroute_events::EventBatch {
    let b = sc["batches"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap();
    decode_batch(&hex::decode(b["payload_hex_with_dp_rank_0"].as_str().unwrap()).unwrap()).unwrap()
}

/// Scores the request "tokens 0..63" (4 blocks) on pod 0 after each scenario step.
fn run(version: &str, algo: &str, mode: impl Fn() -> KeyMode, request_keys: &[u64]) {
    let d = doc();
    for sc in d["versions"][version]["scenarios"].as_array().unwrap() {
        if sc["algo"] != algo {
            continue;
        }
        let ctx = format!("{version} {algo} env={}", sc["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"]);
        let applier = EventApplier::new(InMemoryIndex::new(IndexConfig::default()), mode());
        let scorer = LongestPrefixScorer::default();
        let mut scratch = Scratch::default();
        let matched = |a: &EventApplier<InMemoryIndex>, s: &mut Scratch| {
            scorer.score(a.index(), request_keys, None, s).first().map_or(0, |x| x.matched_blocks)
        };
        applier.apply(0, "m", &batch(sc, "store_no_parent"));
        assert_eq!(matched(&applier, &mut scratch), 2, "{ctx}: blocks 0-1 stored");
        applier.apply(0, "m", &batch(sc, "store_with_parent"));
        assert_eq!(matched(&applier, &mut scratch), 4, "{ctx}: blocks 2-3 chained on the parent");
        applier.apply(0, "m", &batch(sc, "store_extra_keys"));
        assert_eq!(matched(&applier, &mut scratch), 4, "{ctx}: a LoRA/salted request does not collide");
        applier.apply(0, "m", &batch(sc, "evict"));
        assert_eq!(matched(&applier, &mut scratch), 0, "{ctx}: evicted");
        assert_eq!(applier.index().stats().entries, 0, "{ctx}: nothing left");
        applier.apply(0, "m", &batch(sc, "store_no_parent"));
        applier.apply(0, "m", &batch(sc, "all_cleared"));
        assert_eq!(matched(&applier, &mut scratch), 0, "{ctx}: cleared");
        let c = applier.counters();
        assert_eq!((c.orphan_blocks, c.mismatched_blocks), (0, 0), "{ctx}");
    }
}

#[test]
fn engine_keys_from_our_hasher_find_vllm_blocks() {
    let tokens: Vec<u32> = (0..64).collect();
    for (version, algo) in
        [("0.33.0", "sha256"), ("0.33.0", "sha256_cbor"), ("0.23.0", "sha256"), ("0.11.2", "sha256_cbor")]
    {
        let h = BlockHasher::new(HashConfig {
            algo: algo.parse::<HashAlgo>().unwrap(),
            vllm_version: version.parse().unwrap(),
            seed: Some("0".into()),
            block_size: 16,
        })
        .unwrap();
        let mut keys = Vec::new();
        h.event_keys(&tokens, &RequestExtras::default(), &mut keys);
        run(version, algo, || KeyMode::Engine, &keys);
    }
}

#[test]
fn request_keys_work_without_reproducing_engine_hashes() {
    let keyer = RequestKeyer::new(16, "any-seed");
    let mut keys = Vec::new();
    keyer.keys("", &(0..64).collect::<Vec<u32>>(), &RequestExtras::default(), &mut keys);
    // Every version's payloads, including builtin and int-era ones.
    for (version, algo) in [
        ("0.33.0", "sha256"),
        ("0.24.0", "sha256_cbor"),
        ("0.20.2", "sha256"),
        ("0.10.0", "builtin"),
        ("0.10.0", "sha256_cbor_64bit"),
        ("0.9.2", "builtin"),
    ] {
        run(version, algo, || KeyMode::Request(keyer.clone()), &keys);
    }
}

#[test]
fn request_mode_counts_orphans_instead_of_guessing() {
    let keyer = RequestKeyer::new(16, "");
    let applier = EventApplier::new(InMemoryIndex::new(IndexConfig::default()), KeyMode::Request(keyer));
    let d = doc();
    let sc = &d["versions"]["0.33.0"]["scenarios"][0];
    // The child batch without its parent: cannot be chained.
    applier.apply(0, "m", &batch(sc, "store_with_parent"));
    assert_eq!(applier.counters().orphan_blocks, 2);
    assert_eq!(applier.index().stats().entries, 0);
}
