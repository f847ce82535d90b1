//! One scheduling decision (`Profile::schedule`: filters, scorers, picker) per named
//! policy — kvroute's default and the peers' policies — on fleets of 8 and 64 pods with
//! a 2,048-token prompt (128 blocks) whose prefix some pods hold. Policies with state
//! (SGLang's and production-stack's trees, AIBrix's table) see 64 prompts in rotation, so
//! their structures stay at a steady size as in production.
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kvroute_schedule::{named_profile, PodView, RequestView, NAMED};

fn pods(n: usize) -> Vec<PodView> {
    (0..n)
        .map(|i| PodView {
            name: format!("10.0.{}.{}:8000", i / 250, i % 250),
            in_flight: (i % 7) as u32,
            pending_prefill_tokens: ((i * 613) % 4096) as f64,
            queued: (i % 3) as u32,
            matched_blocks: if i % 4 == 0 { (i * 37) % 128 } else { 0 },
            prefix_score: if i % 4 == 0 { ((i * 37) % 128) as f64 / 128.0 } else { 0.0 },
            kv_usage: Some(((i * 13) % 100) as f64 / 100.0),
            waiting: Some((i % 5) as f64),
            active_blocks: (i * 97) % 2048,
            active_prefix_blocks: (i * 11) % 64,
            ..Default::default()
        })
        .collect()
}

fn requests() -> Vec<RequestView> {
    (0..64u64)
        .map(|r| {
            let keys: Arc<[u64]> = (0..128u64).map(|b| (r << 32 | b).wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
            let text: String = (0..512).map(|w| format!("group{} word{w} ", r % 8)).collect();
            RequestView {
                prompt_tokens: 2048,
                block_size: 16,
                total_blocks: 128,
                keys,
                text: text.as_str().into(),
                now_s: r as f64 * 0.01,
                remote_prefill: None,
            }
        })
        .collect()
}

fn schedule(c: &mut Criterion) {
    let reqs = requests();
    let mut g = c.benchmark_group("schedule");
    for n in [8, 64] {
        let views = pods(n);
        for (name, _) in NAMED {
            let Ok(profile) = named_profile(name) else { continue };
            let mut i = 0;
            g.bench_with_input(BenchmarkId::new(*name, n), &views, |b, views| {
                b.iter(|| {
                    i = (i + 1) % reqs.len();
                    profile.schedule(&reqs[i], views)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, schedule);
criterion_main!(benches);
