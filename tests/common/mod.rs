//! Helpers shared by the black-box tests: ports, readiness, child processes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod envoy;
pub mod kube;
pub mod pd;

/// `n` distinct free ports, drawn below the ephemeral range (see [`free_run`]).
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_run(1)).collect()
}

/// A port `p` with `p + 1` free too (a second data-parallel rank binds the next port).
pub fn free_port_pair() -> u16 {
    free_run(2)
}

/// The first of `len` consecutive ports free on every interface, drawn from 20,000–31,999:
/// below the ephemeral range, where the OS picks the source ports of outgoing connections
/// and `bind(0)` ports — a port found free there and released was taken by another test's
/// connection before the router bound it (clean-clone CI runs, several times). Each
/// process walks the range from its own offset (a stride coprime with the range), so
/// concurrent test processes rarely try the same ports.
pub fn free_run(len: u16) -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const SPAN: u32 = 12_000;
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = 20_000 + (std::process::id().wrapping_mul(7_907).wrapping_add(n.wrapping_mul(7_919)) % SPAN) as u16;
        if p + len > 20_000 + SPAN as u16 {
            continue;
        }
        if (p..p + len).all(|q| TcpListener::bind(("0.0.0.0", q)).is_ok()) {
            return p;
        }
    }
    panic!("no {len} consecutive free ports in 20000–31999");
}

pub fn wait_healthy(base: &str) {
    let t = Instant::now();
    while ureq::get(&format!("{base}/health")).call().is_err() {
        assert!(t.elapsed() < Duration::from_secs(15), "{base} not healthy");
        std::thread::sleep(Duration::from_millis(30));
    }
}

pub fn words(tag: &str, n: usize) -> String {
    (0..n).map(|i| format!("{tag}{i}")).collect::<Vec<_>>().join(" ")
}

/// A `kvroute sim` on `port` publishing KV events to `zmq_port` (model `m`, block 16,
/// `sha256_cbor`, `PYTHONHASHSEED=42`, 100× faster than model time).
pub fn sim(port: u16, zmq_port: u16, extra: &[&str]) -> Child {
    sim_with_block_size(port, zmq_port, 16, extra)
}

/// [`sim`] with another block size.
pub fn sim_with_block_size(port: u16, zmq_port: u16, block_size: u32, extra: &[&str]) -> Child {
    let kv = serde_json::json!({"enable_kv_cache_events": true, "publisher": "zmq",
        "endpoint": format!("tcp://127.0.0.1:{zmq_port}"), "topic": format!("kv@127.0.0.1:{port}@m")});
    sim_at("127.0.0.1", port, block_size, &kv, extra)
}

/// A `kvroute sim` serving `host:port` with the KV-event config `kv` (model `m`,
/// `sha256_cbor`, `PYTHONHASHSEED=42`, 100× faster than model time unless `extra` gives
/// `--speedup`), plus `extra`; returns once `/health` answers.
pub fn sim_at(host: &str, port: u16, block_size: u32, kv: &serde_json::Value, extra: &[&str]) -> Child {
    let bs = block_size.to_string();
    let speedup: &[&str] = if extra.contains(&"--speedup") { &[] } else { &["--speedup", "100"] };
    let c = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["sim", "--host", host, "--port", &port.to_string(), "--model", "m", "--block-size", &bs])
        .args(["--hash-algo", "sha256_cbor", "--kv-events-config", &kv.to_string()])
        .args(speedup)
        .args(extra)
        .env("PYTHONHASHSEED", "42")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&format!("http://{host}:{port}"));
    c
}

/// A sim whose publisher binds `pub_port` with a replay endpoint on `replay_port`.
pub fn sim_publishing(port: u16, pub_port: u16, replay_port: u16) -> Child {
    let kv = serde_json::json!({"enable_kv_cache_events": true, "publisher": "zmq",
        "endpoint": format!("tcp://*:{pub_port}"), "replay_endpoint": format!("tcp://*:{replay_port}"),
        "topic": format!("kv@127.0.0.1:{port}@m")});
    let c = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["sim", "--port", &port.to_string(), "--model", "m", "--speedup", "100"])
        .args(["--kv-events-config", &kv.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&format!("http://127.0.0.1:{port}"));
    c
}

/// Admin port of each router these helpers started (serving port → admin port).
static ADMIN: Mutex<Option<HashMap<u16, u16>>> = Mutex::new(None);

/// `--admin-listen` on a free loopback port for the router serving on `port`; [`admin`]
/// and [`metric_sum`] find it from then on.
pub fn admin_args(port: u16) -> Vec<String> {
    let a = free_ports(1)[0];
    ADMIN.lock().unwrap().get_or_insert_with(HashMap::new).insert(port, a);
    vec!["--admin-listen".into(), format!("127.0.0.1:{a}")]
}

/// The admin port of the router serving on `port` (`port` itself for anything else).
pub fn admin_port(port: u16) -> u16 {
    ADMIN.lock().unwrap().as_ref().and_then(|m| m.get(&port).copied()).unwrap_or(port)
}

/// `http://127.0.0.1:<admin port>` of the router at `base` (`http://127.0.0.1:<port>`).
pub fn admin(base: &str) -> String {
    let port = base.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).unwrap_or(0);
    format!("http://127.0.0.1:{}", admin_port(port))
}

/// `kvroute serve` on `port` with KV events bound on `zmq` and the sims on `backends`
/// as backends, hashing like [`sim`] (block 16, `sha256_cbor`, seed 42), probing every
/// 100 ms (unless `extra` says otherwise), its admin routes on a free loopback port ([`admin`]), plus `extra`; returns
/// once `/health` answers. `SERVE_LOG` sets the router's `RUST_LOG` (e.g. `kvroute_gateway=debug` logs every
/// routing decision).
pub fn serve(port: u16, zmq: u16, backends: &[u16], extra: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--zmq-bind", &format!("tcp://127.0.0.1:{zmq}")]);
    cmd.args(["--block-size", "16", "--hash-algo", "sha256_cbor", "--hash-seed", "42"]);
    if !extra.contains(&"--health-interval-ms") {
        cmd.args(["--health-interval-ms", "100"]);
    }
    for p in backends {
        cmd.args(["--backend", &format!("http://127.0.0.1:{p}")]);
    }
    if !extra.contains(&"--admin-listen") {
        cmd.args(admin_args(port));
    }
    let child = cmd
        .args(extra)
        .env("RUST_LOG", std::env::var("SERVE_LOG").unwrap_or("warn".into()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&format!("http://127.0.0.1:{port}"));
    child
}

/// Sum of a metric over the servers' `/metrics` (a router's on its admin port).
pub fn metric_sum(ports: &[u16], name: &str) -> f64 {
    ports
        .iter()
        .map(|p| {
            let text = ureq::get(&format!("http://127.0.0.1:{}/metrics", admin_port(*p)))
                .call()
                .unwrap()
                .into_string()
                .unwrap();
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum()
}

/// Kills child processes when dropped.
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after `limit`. Returns how
/// long it took.
pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}
