//! Decoding KV-event batches, in block-events per second.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvroute_events::{decode_batch, encode_batch, BlockRemoved, BlockStored, EventBatch, KvEvent, WireFormat};

/// One engine step: a 32-block BlockStored (16 tokens per block) and 32 single-block removals.
pub fn step_batch() -> EventBatch {
    let stored = KvEvent::BlockStored(BlockStored {
        block_hashes: (0..32).map(|i| 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i + 1)).collect(),
        parent_block_hash: Some(12345678901234567890),
        token_ids: (0..512).map(|i| (i * 7919) % 150_000).collect(),
        block_size: 16,
        medium: Some("GPU".into()),
        extra_keys: Some(vec![None; 32]),
        group_idx: Some(0),
        ..Default::default()
    });
    let mut events = vec![stored];
    events.extend((0..32u64).map(|i| {
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![i.wrapping_mul(0xD6E8_FEB8_6659_FD93)],
            medium: Some("GPU".into()),
            group_idx: Some(0),
            ..Default::default()
        })
    }));
    EventBatch { ts: 1.7e9, events, data_parallel_rank: Some(0), unknown_events: 0 }
}

fn decode(c: &mut Criterion) {
    let batch = step_batch();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(64)); // 32 stored + 32 removed block-events
    for (name, fmt) in [("map_0.33", WireFormat::Map), ("array_0.23", WireFormat::Array)] {
        let bytes = encode_batch(&batch, fmt);
        g.bench_function(name, |b| b.iter(|| decode_batch(&bytes).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
