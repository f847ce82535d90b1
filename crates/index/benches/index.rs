//! Decode + apply of block events, and scoring a 512-block prompt over 64 pods on a warm
//! index (criterion for the mean; a separate pass prints p50/p99 per call).
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvroute_events::{decode_batch, encode_batch, BlockRemoved, BlockStored, EventBatch, KvEvent, WireFormat};
use kvroute_index::{BlockIndex, EventApplier, InMemoryIndex, IndexConfig, KeyMode, PodId, Tiers};
use kvroute_keys::RequestKeyer;
use kvroute_score::{LongestPrefixScorer, Scratch};

/// Batches like an engine publishes under load: each stores 32 new blocks chained on the
/// previous batch and removes the 32 stored 62 batches earlier (64 block-events). The
/// `n` batches form a cycle (batch i removes what batch i − 62 mod n stored), so applying
/// them over and over is a steady state: every block is stored and removed once a cycle,
/// as a pool that evicts what it caches (copies are counted: a stream that only stored
/// would pile copies up). With `copies` > 0, the first `copies` blocks of each batch are
/// stored a second time (vLLM caching a second copy) and removed twice later.
fn batches(n: usize, fmt: WireFormat, copies: u64) -> Vec<Vec<u8>> {
    let mut next = 1u64;
    let mut prev: Option<u64> = None;
    (0..n)
        .map(|i| {
            let hashes: Vec<u64> = (0..32)
                .map(|_| {
                    next += 1;
                    next.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                })
                .collect();
            let mut events = vec![KvEvent::BlockStored(BlockStored {
                block_hashes: hashes.clone(),
                parent_block_hash: prev,
                token_ids: (0..512).map(|i| ((next as u32).wrapping_mul(31) ^ i) % 150_000).collect(),
                block_size: 16,
                medium: Some("GPU".into()),
                extra_keys: Some(vec![None; 32]),
                group_idx: Some(0),
                ..Default::default()
            })];
            if copies > 0 {
                events.push(KvEvent::BlockStored(BlockStored {
                    block_hashes: hashes[..copies as usize].to_vec(),
                    parent_block_hash: prev,
                    token_ids: (0..16 * copies as u32).collect(),
                    block_size: 16,
                    medium: Some("GPU".into()),
                    group_idx: Some(0),
                    ..Default::default()
                }));
            }
            prev = hashes.last().copied();
            // Batch r stored the block numbers 2 + 32r .. 2 + 32r + 31.
            let old = 2 + 32 * ((i + n - 62) % n) as u64;
            events.extend((0..32u64).chain(0..copies).map(|i| {
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![(old + i).wrapping_mul(0x9E37_79B9_7F4A_7C15)],
                    medium: Some("GPU".into()),
                    group_idx: Some(0),
                    ..Default::default()
                })
            }));
            encode_batch(&EventBatch { ts: 0.0, events, data_parallel_rank: Some(0), unknown_events: 0 }, fmt)
        })
        .collect()
}

/// Decodes and applies every payload once, as pod 0.
fn apply_all(applier: &EventApplier<InMemoryIndex>, payloads: &[Vec<u8>]) {
    for p in payloads {
        applier.apply(0, "m", &decode_batch(p).unwrap());
    }
}

fn decode_apply(c: &mut Criterion) {
    let payloads = batches(256, WireFormat::Map, 0);
    let mut g = c.benchmark_group("decode_apply");
    g.throughput(Throughput::Elements(64 * payloads.len() as u64));
    let applier = EventApplier::new(InMemoryIndex::new(IndexConfig::default()), KeyMode::Engine);
    g.bench_function("engine_keys", |b| b.iter(|| apply_all(&applier, &payloads)));
    let applier =
        EventApplier::new(InMemoryIndex::new(IndexConfig::default()), KeyMode::Request(RequestKeyer::new(16, "")));
    g.bench_function("request_keys", |b| {
        b.iter(|| {
            applier.clear_pod(0);
            apply_all(&applier, &payloads)
        })
    });
    g.finish();
    // A quarter of the blocks cached twice: 8 more stores and removes per batch.
    let payloads = batches(256, WireFormat::Map, 8);
    let mut g = c.benchmark_group("decode_apply_copies");
    g.throughput(Throughput::Elements(80 * payloads.len() as u64));
    let applier = EventApplier::new(InMemoryIndex::new(IndexConfig::default()), KeyMode::Engine);
    g.bench_function("engine_keys", |b| b.iter(|| apply_all(&applier, &payloads)));
    g.finish();
}

/// 64 pods; pod i holds the first 8·(i+1) blocks of the prompt (so the walk reaches all
/// 512 blocks), plus 1 M unrelated entries in the index.
fn warm_index() -> (InMemoryIndex, Vec<u64>) {
    let idx = InMemoryIndex::new(IndexConfig::default());
    let prompt: Vec<u64> = (0..512u64).map(|i| i.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0x55).collect();
    for p in 0..64u16 {
        idx.store(p, Tiers::GPU, &prompt[..8 * (p as usize + 1)]);
        let other: Vec<u64> = (0..16_384u64).map(|i| (p as u64) << 40 | i).collect();
        idx.store(p, Tiers::GPU, &other);
    }
    (idx, prompt)
}

fn scoring(c: &mut Criterion) {
    let (idx, prompt) = warm_index();
    let scorer = LongestPrefixScorer::default();
    let mut scratch = Scratch::default();
    let all: Vec<PodId> = (0..64).collect();
    // Typical: 4 of the 64 pods hold the prompt (512, 384, 256, 128 blocks), every pod
    // holds 16 k blocks of its own.
    let typical = InMemoryIndex::new(IndexConfig::default());
    for p in 0..64u16 {
        let other: Vec<u64> = (0..16_384u64).map(|i| (p as u64) << 40 | i).collect();
        typical.store(p, Tiers::GPU, &other);
    }
    for (p, n) in [(3u16, 512), (17, 384), (42, 256), (60, 128)] {
        typical.store(p, Tiers::GPU, &prompt[..n]);
    }
    let mut g = c.benchmark_group("score_512_blocks_64_pods");
    g.bench_function("typical_4_holders", |b| b.iter(|| scorer.score(&typical, &prompt, Some(&all), &mut scratch)));
    g.bench_function("staircase", |b| b.iter(|| scorer.score(&idx, &prompt, Some(&all), &mut scratch)));
    // Worst case: every pod holds all 512 blocks.
    let full = InMemoryIndex::new(IndexConfig::default());
    for p in 0..64u16 {
        full.store(p, Tiers::GPU, &prompt);
    }
    g.bench_function("all_pods_full_prefix", |b| b.iter(|| scorer.score(&full, &prompt, Some(&all), &mut scratch)));
    g.finish();
    for (name, index) in [("typical_4_holders", &typical), ("staircase", &idx), ("all_pods_full_prefix", &full)] {
        let mut t: Vec<f64> = (0..20_000)
            .map(|_| {
                let s = Instant::now();
                std::hint::black_box(scorer.score(index, &prompt, Some(&all), &mut scratch));
                s.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        t.sort_by(f64::total_cmp);
        println!(
            "score_512_blocks_64_pods/{name}: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs over {} calls",
            t[t.len() / 2],
            t[t.len() * 99 / 100],
            t[t.len() - 1],
            t.len()
        );
    }
}

criterion_group!(benches, decode_apply, scoring);
criterion_main!(benches);
