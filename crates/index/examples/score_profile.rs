//! Profiling helper: scores a 512-block prompt where all 64 pods hold every block,
//! in a loop (run under `perf record`).
use kvroute_index::{BlockIndex, InMemoryIndex, IndexConfig, PodId, Tiers};
use kvroute_score::{LongestPrefixScorer, Scratch};

fn main() {
    let full = InMemoryIndex::new(IndexConfig::default());
    let prompt: Vec<u64> = (0..512u64).map(|i| i.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0x55).collect();
    for p in 0..64u16 {
        full.store(p, Tiers::GPU, &prompt);
    }
    let all: Vec<PodId> = (0..64).collect();
    let s = LongestPrefixScorer::default();
    let mut scratch = Scratch::default();
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let t = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(s.score(&full, &prompt, Some(&all), &mut scratch));
    }
    println!("{:.1} µs per call", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    // The floor: the same walk with a visitor that only counts entries.
    let t = std::time::Instant::now();
    let mut total = 0usize;
    for _ in 0..n {
        full.prefix_lookup(&prompt, &mut |_, e| {
            total += e.len();
            true
        });
    }
    println!(
        "{:.1} µs per walk with a counting visitor ({} entries per walk)",
        t.elapsed().as_secs_f64() * 1e6 / n as f64,
        total / n
    );
}

#[allow(dead_code)]
fn floor() {}
