//! The Redis backend against the in-memory one, side by side in one run, with a real
//! `redis-server` on loopback started here: lookup latency of a 512-block prompt
//! (p50/p99), block events written per second, memory per (block, pod) entry.
//!
//!     cargo bench -p kvroute-index-redis --bench shared_index
//!
//! (`-- --test` runs each measurement once, as the CI smoke run does.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_index::{BlockIndex, InMemoryIndex, IndexConfig, Pods, Tiers};
use kvroute_index_redis::{RedisConfig, RedisIndex};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn keys(prompt: u64, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| (prompt << 20 | i).wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect()
}

fn run(name: &str, idx: &dyn BlockIndex, smoke: bool) {
    let (prompts, pods) = if smoke { (4u64, 8u16) } else { (2_000, 8) };
    // Fill: each prompt of 512 blocks on one pod, in batches of 16 blocks (vLLM's events).
    let t = Instant::now();
    let mut events = 0usize;
    for p in 0..prompts {
        let k = keys(p, 512);
        for chunk in k.chunks(16) {
            idx.store((p % pods as u64) as u16, Tiers::GPU, chunk);
            events += chunk.len();
        }
    }
    let write = events as f64 / t.elapsed().as_secs_f64();
    // Lookups of whole prompts (every block held).
    let iters = if smoke { 3 } else { 2_000 };
    let mut lat = Vec::with_capacity(iters);
    let mut found = 0usize;
    for i in 0..iters {
        let k = keys(i as u64 % prompts, 512);
        let t = Instant::now();
        idx.prefix_lookup(&k, &mut |_, e| {
            found += e.len();
            true
        });
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    assert_eq!(found, iters * 512, "{name}: every block found");
    println!("| {name} | {:.0} | {:.0} | {:.0} |", pct(&mut lat, 0.5), pct(&mut lat, 0.99), write);
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = kvroute_index_conformance::redis_server(port);
    let pods = Arc::new(Pods::new());
    for i in 0..8 {
        pods.intern(&format!("10.0.0.{i}:8000")).unwrap();
    }
    println!("| backend | lookup 512 blocks p50 (µs) | p99 (µs) | block events written /s |");
    println!("|---|---|---|---|");
    run("in-memory", &InMemoryIndex::new(IndexConfig::default()), smoke);
    let url = format!("redis://127.0.0.1:{port}");
    let cached = RedisConfig { url: url.clone(), cache_ttl: Duration::from_millis(50), ..Default::default() };
    let redis = RedisIndex::new(cached, pods).unwrap();
    run("redis (loopback, 50 ms local cache)", &redis, smoke);
    // The same data read by a replica without the local cache, interleaved with reads by
    // the cached one (cold reads for both: each prompt comes back after the 50 ms bound).
    let pods2 = Arc::new(Pods::new());
    for i in 0..8 {
        pods2.intern(&format!("10.0.0.{i}:8000")).unwrap();
    }
    let nocache =
        RedisIndex::new(RedisConfig { url: url.clone(), cache_ttl: Duration::ZERO, ..Default::default() }, pods2)
            .unwrap();
    let iters = if smoke { 3 } else { 2_000 };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..iters {
        let k = keys((i as u64 * 7 + 3) % if smoke { 4 } else { 2_000 }, 512);
        // Alternate which goes first: the second read of a prompt finds Redis warmer.
        let first_cached = i % 2 == 0;
        for cached in [first_cached, !first_cached] {
            let (idx, lat) = if cached { (&redis, &mut with) } else { (&nocache, &mut without) };
            let t = Instant::now();
            idx.prefix_lookup(&k, &mut |_, _| true);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    println!(
        "| redis, cold prompts, with the local cache (interleaved) | {:.0} | {:.0} | – |",
        pct(&mut with, 0.5),
        pct(&mut with, 0.99)
    );
    println!(
        "| redis, cold prompts, no local cache (interleaved) | {:.0} | {:.0} | – |",
        pct(&mut without, 0.5),
        pct(&mut without, 0.99)
    );
    // A hot prompt (the same 512 blocks again and again): the local cache answers.
    let k = keys(0, 512);
    let mut lat: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            redis.prefix_lookup(&k, &mut |_, _| true);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    println!(
        "| redis, hot prompt (first 128 blocks from the 50 ms local cache) | {:.0} | {:.0} | – |",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    // Memory per entry: the server's own accounting.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("memory").query(&mut c).unwrap();
    let used: f64 =
        info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0);
    let entries = redis.stats().entries as f64;
    let sample: Vec<String> = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg("kvr:b:*")
        .arg("COUNT")
        .arg(100)
        .query::<(u64, Vec<String>)>(&mut c)
        .unwrap()
        .1;
    let per_key: Vec<f64> = sample
        .iter()
        .filter_map(|k| redis::cmd("MEMORY").arg("USAGE").arg(k).query::<Option<f64>>(&mut c).ok().flatten())
        .collect();
    let mean_key = per_key.iter().sum::<f64>() / per_key.len().max(1) as f64;
    println!(
        "\nredis: {entries:.0} entries, used_memory {:.1} MB = {:.0} B per entry; MEMORY USAGE of a block key (1 pod) {:.0} B",
        used / 1e6,
        used / entries.max(1.0),
        mean_key
    );
    ownership(&url, smoke);
    let _ = server.kill();
    let _ = server.wait();
    cluster(smoke);
}

/// The load replicas put on Redis: one writer per pod by lease (the only mode since copies
/// are counted; every replica writing cost n× and would now count each copy n times). `n`
/// replicas ingest the same stream of block events (each event applied by each replica,
/// as when every replica subscribes to every pod); Redis' own counters say what it cost.
fn ownership(url: &str, smoke: bool) {
    fn info(c: &mut redis::Connection) -> (f64, f64, f64) {
        let s: String = redis::cmd("INFO").query(c).unwrap();
        let get = |k: &str| -> f64 {
            s.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
        };
        (get("used_cpu_user:") + get("used_cpu_sys:"), get("total_net_input_bytes:"), get("total_commands_processed:"))
    }
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    println!("\n| writers | replicas | Redis CPU ms per 1k block events | KB sent to Redis per 1k events | commands per 1k events | stream time (s) |");
    println!("|---|---|---|---|---|---|");
    let prompts = if smoke { 2u64 } else { 200 };
    for lease in [Duration::from_secs(10)] {
        for n in [1usize, 2, 4] {
            let replicas: Vec<RedisIndex> = (0..n)
                .map(|r| {
                    let pods = Arc::new(Pods::new());
                    for i in 0..8 {
                        pods.intern(&format!("10.0.0.{i}:8000")).unwrap();
                    }
                    let cfg = RedisConfig {
                        url: url.into(),
                        prefix: format!("own-{n}"),
                        writer_lease: lease,
                        replica_id: format!("r{r}"),
                        ..Default::default()
                    };
                    RedisIndex::new(cfg, pods).unwrap()
                })
                .collect();
            for r in &replicas {
                r.maintain_leases();
            }
            let (cpu0, in0, cmd0) = info(&mut c);
            let t = Instant::now();
            let mut events = 0usize;
            for p in 0..prompts {
                for chunk in keys(1_000_000 + p, 512).chunks(16) {
                    for r in &replicas {
                        r.store((p % 8) as u16, Tiers::GPU, chunk);
                    }
                    events += chunk.len();
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let (cpu1, in1, cmd1) = info(&mut c);
            let k = events as f64 / 1000.0;
            println!(
                "| one per pod (lease) | {n} | {:.1} | {:.1} | {:.1} | {secs:.2} |",
                (cpu1 - cpu0) * 1000.0 / k,
                (in1 - in0) / 1000.0 / k,
                (cmd1 - cmd0) / k,
            );
        }
    }
}

/// The same lookups and writes on a three-node Redis Cluster on loopback.
fn cluster(smoke: bool) {
    let cluster = kvroute_index_conformance::LocalCluster::start();
    let url = cluster.url.clone();
    let pods = Arc::new(Pods::new());
    for i in 0..8 {
        pods.intern(&format!("10.0.0.{i}:8000")).unwrap();
    }
    let idx = RedisIndex::new(RedisConfig { url, cluster: true, ..Default::default() }, pods).unwrap();
    println!("\n| backend | lookup 512 blocks p50 (µs) | p99 (µs) | block events written /s |");
    println!("|---|---|---|---|");
    run("redis cluster, 3 nodes (loopback, no local cache)", &idx, smoke);
}
