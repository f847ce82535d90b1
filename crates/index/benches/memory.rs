//! Bytes per (block, pod) entry in the in-memory index at 10 M entries, measured with a
//! counting global allocator (heap bytes live after the inserts ÷ entries).
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use kvroute_index::{BlockIndex, InMemoryIndex, IndexConfig, Tiers};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n, Relaxed);
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn measure(entries: usize, pods_per_block: usize) {
    measure_copies(entries, pods_per_block, 0);
}

/// With `every` > 0, every `every`-th block is stored 9 times by each pod (9 copies:
/// 7 counted in the entry, 2 in the side table) — an upper bound on what copies cost.
fn measure_copies(entries: usize, pods_per_block: usize, every: usize) {
    let before = LIVE.load(Relaxed);
    let idx = InMemoryIndex::new(IndexConfig { capacity: entries * 2, ..Default::default() });
    let blocks = entries / pods_per_block;
    let keys: Vec<u64> = (0..blocks as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let keys_bytes = keys.len() * 8;
    for p in 0..pods_per_block as u16 {
        for chunk in keys.chunks(4096) {
            idx.store(p, Tiers::GPU, chunk);
        }
        if every > 0 {
            let many: Vec<u64> = keys.iter().step_by(every).copied().collect();
            for _ in 1..9 {
                for chunk in many.chunks(4096) {
                    idx.store(p, Tiers::GPU, chunk);
                }
            }
        }
    }
    let st = idx.stats();
    let used = LIVE.load(Relaxed) - before - keys_bytes;
    let copies = if every > 0 { format!(", every {every}th block in 9 copies") } else { String::new() };
    println!(
        "memory: {} entries ({} blocks × {} pods each{copies}): {:.1} MiB, {:.1} bytes per (block, pod) entry",
        st.entries,
        st.blocks,
        pods_per_block,
        used as f64 / (1 << 20) as f64,
        used as f64 / st.entries as f64
    );
    drop(idx);
}

fn main() {
    // `cargo bench` passes --bench; a smoke run (`-- --test`, as in CI) uses 100 k entries.
    let n = if std::env::args().any(|a| a == "--test" || a == "--smoke") { 100_000 } else { 10_000_000 };
    for per in [1, 2, 4, 8] {
        measure(n, per);
    }
    measure_copies(n, 1, 10);
}
