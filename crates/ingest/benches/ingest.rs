//! Events through a real loopback ZMQ socket into the index:
//! 1. throughput: batches published as fast as possible until all are applied;
//! 2. event-to-visible latency at a paced 100 k block-events/s: for each batch, the time
//!    from `send` until a lookup finds its first block.
//!
//! `cargo bench -p kvroute-ingest --bench ingest` (`-- --test`: a short smoke run).
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_events::{encode_batch, BlockStored, EventBatch, KvEvent, WireFormat};
use kvroute_index::{BlockIndex, EventApplier, InMemoryIndex, IndexConfig, KeyMode, Pods};
use kvroute_ingest::{IngestConfig, Ingestor, Metrics};

fn payload(first_key: u64, blocks: u64) -> Vec<u8> {
    let hashes: Vec<u64> = (first_key..first_key + blocks).collect();
    let batch = EventBatch {
        ts: 0.0,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: hashes,
            parent_block_hash: None,
            token_ids: (0..blocks as u32 * 16).collect(),
            block_size: 16,
            medium: Some("GPU".into()),
            extra_keys: Some(vec![None; blocks as usize]),
            group_idx: Some(0),
            ..Default::default()
        })],
        data_parallel_rank: Some(0),
        unknown_events: 0,
    };
    encode_batch(&batch, WireFormat::Map)
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let index = InMemoryIndex::new(IndexConfig::default());
    let applier = Arc::new(EventApplier::new(index, KeyMode::Engine));
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let cfg = IngestConfig { bind: vec![endpoint.clone()], ..Default::default() };
    let ingestor = Ingestor::start(&cfg, applier.clone(), Arc::new(Pods::new()), metrics.clone()).unwrap();
    let ctx = zmq::Context::new();
    let publisher = ctx.socket(zmq::PUB).unwrap();
    publisher.set_sndhwm(0).unwrap();
    publisher.connect(&endpoint).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let topic = b"kv@10.0.0.1:8000@m".to_vec();

    // 1. Throughput: 32-block batches, as fast as the publisher can send.
    let (n, blocks) = if smoke { (200u64, 32u64) } else { (40_000, 32) };
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| payload(1 + i * blocks, blocks)).collect();
    let t = Instant::now();
    for (i, p) in payloads.iter().enumerate() {
        publisher.send_multipart([&topic[..], &(i as u64).to_be_bytes()[..], &p[..]], 0).unwrap();
    }
    while metrics.applied_batches.get() + metrics.dropped.get() < n {
        assert!(t.elapsed() < Duration::from_secs(120), "ingestion stalled");
        std::thread::sleep(Duration::from_micros(200));
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "ingest throughput: {n} batches × {blocks} blocks in {secs:.3} s = {:.2} M block-events/s ({} dropped, {} gaps)",
        (n * blocks) as f64 / secs / 1e6,
        metrics.dropped.get(),
        metrics.gaps.get()
    );

    // 2. Latency at a paced rate: 32 blocks per batch (one engine step), 3,125 batches/s
    //    = 100 k block-events/s (e.g. 64 engines at ~50 steps/s).
    let (batches, per, rate) = if smoke { (300u64, 32u64, 3_125.0) } else { (30_000, 32, 3_125.0) };
    let base = 1u64 << 40;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..batches).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let origin = Instant::now();
    let checker = {
        let (sent_at, applier, done) = (sent_at.clone(), applier.clone(), done.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::with_capacity(batches as usize);
            let mut next = 0u64;
            while next < batches && !(done.load(Acquire) && origin.elapsed() > Duration::from_secs(600)) {
                let s = sent_at[next as usize].load(Acquire);
                if s == 0 {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                }
                let key = base + next * per;
                let mut found = false;
                applier.index().prefix_lookup(&[key], &mut |_, _| {
                    found = true;
                    false
                });
                if found {
                    lat.push(origin.elapsed().as_nanos() as u64 - s);
                    next += 1;
                } else {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
            lat
        })
    };
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let seq0 = n;
    for i in 0..batches {
        let due = start + interval * i as u32;
        // Sleep most of the wait (a spinning sender would steal a core from ingestion on
        // a small machine), spin the last 60 µs.
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            if d > Duration::from_micros(60) {
                std::thread::sleep(d - Duration::from_micros(60));
            }
        }
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let p = payload(base + i * per, per);
        let now = origin.elapsed().as_nanos() as u64;
        publisher.send_multipart([&topic[..], &(seq0 + i).to_be_bytes()[..], &p[..]], 0).unwrap();
        sent_at[i as usize].store(now.max(1), Release);
    }
    let achieved = (batches * per) as f64 / start.elapsed().as_secs_f64();
    done.store(true, Release);
    let mut lat = checker.join().unwrap();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1e3;
    println!(
        "event-to-visible latency at {:.0} k block-events/s ({} batches of {per}): p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        achieved / 1e3,
        lat.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    ingestor.stop();
}
