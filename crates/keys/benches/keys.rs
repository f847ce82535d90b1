//! Block keys for an 8,192-token prompt (goal ≤ 0.5 ms), per algorithm.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvroute_keys::{BlockHasher, HashAlgo, HashConfig, RequestExtras, RequestKeyer};

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| i.wrapping_mul(2654435761) % 150_000).collect()
}

fn keys(c: &mut Criterion) {
    let tokens = prompt(8192);
    let mut g = c.benchmark_group("keys_8192_tokens");
    g.throughput(Throughput::Elements(tokens.len() as u64 / 16));
    let mut out = Vec::new();
    for algo in [HashAlgo::Sha256Cbor, HashAlgo::Sha256, HashAlgo::XxhashCbor, HashAlgo::Xxhash] {
        let h = BlockHasher::new(HashConfig { algo, seed: Some("0".into()), ..Default::default() }).unwrap();
        g.bench_function(BenchmarkId::new("vllm", algo.name()), |b| {
            b.iter(|| h.event_keys(&tokens, &RequestExtras::default(), &mut out))
        });
    }
    let k = RequestKeyer::new(16, "");
    g.bench_function(BenchmarkId::new("request_keys", "xxh3"), |b| {
        b.iter(|| k.keys("model", &tokens, &RequestExtras::default(), &mut out))
    });
    g.finish();
}

criterion_group!(benches, keys);
criterion_main!(benches);
