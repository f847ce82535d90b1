//! Two `kvroute serve` replicas sharing one **real `redis-server`** (the test command
//! installs Debian's package): KV events ingested by one are scored by the other; killing
//! Redis mid-run loses no request, and the shared view comes back after a restart.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_ports, sim, wait_healthy, words, Children};
use serde_json::{json, Value};

fn redis(port: u16) -> Child {
    let c = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("\n\n*** redis-server not found ({e}): apt-get install redis-server ***\n\n"));
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

fn serve(port: u16, redis_port: u16, zmq: Option<u16>, sims: &[u16]) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    c.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--health-interval-ms", "100"]);
    c.args(["--index-backend", "redis", "--redis-url", &format!("redis://127.0.0.1:{redis_port}")]);
    match zmq {
        Some(z) => c.args(["--zmq-bind", &format!("tcp://127.0.0.1:{z}")]),
        None => c.arg("--no-zmq-bind"),
    };
    for p in sims {
        c.args(["--backend", &format!("http://127.0.0.1:{p}")]);
    }
    let child = c.env("RUST_LOG", "warn").stdout(Stdio::null()).spawn().unwrap();
    wait_healthy(&format!("http://127.0.0.1:{port}"));
    child
}

fn complete(router: u16, prompt: &str) -> (u16, String) {
    match ureq::post(&format!("http://127.0.0.1:{router}/v1/completions"))
        .send_json(json!({"model": "m", "prompt": prompt, "max_tokens": 2}))
    {
        Ok(r) => (r.status(), r.header("x-kvroute-pod").unwrap_or_default().to_string()),
        Err(ureq::Error::Status(c, _)) => (c, String::new()),
        Err(e) => panic!("{e}"),
    }
}

/// Blocks of `prompt` the router's index says `pod` holds.
fn matched(router: u16, prompt: &str, pod: &str) -> u64 {
    let ex: Value = ureq::post(&format!("http://127.0.0.1:{router}/v1/route/explain"))
        .send_json(json!({"model": "m", "prompt": prompt}))
        .unwrap()
        .into_json()
        .unwrap();
    ex["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == pod)
        .and_then(|p| p["matched_blocks"].as_u64())
        .unwrap_or(0)
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn replicas_share_the_index_and_survive_a_redis_restart() {
    let ports = free_ports(6);
    let (rp, zmq, a, b) = (ports[0], ports[1], ports[2], ports[3]);
    let sims = [ports[4], ports[5]];
    let mut redis_child = Some(redis(rp));
    let mut children = vec![serve(a, rp, Some(zmq), &sims), serve(b, rp, None, &sims)];
    for &p in &sims {
        children.push(sim(p, zmq, &[]));
    }
    let _children = Children(children);
    std::thread::sleep(Duration::from_millis(300));
    // Events reach replica A only; replica B scores them from Redis.
    let prompt = words("shared", 160);
    let (status, pod) = complete(a, &prompt);
    assert_eq!(status, 200);
    eventually("replica B sees the blocks replica A ingested", || matched(b, &prompt, &pod) == 10);
    // B now routes that prompt to the same pod without having seen an event.
    assert_eq!(complete(b, &prompt), (200, pod.clone()));

    // Redis dies mid-run: every request still succeeds on both replicas.
    let mut r = redis_child.take().unwrap();
    let _ = r.kill();
    let _ = r.wait();
    for i in 0..20 {
        let p = words(&format!("outage{i}x"), 40);
        assert_eq!(complete(if i % 2 == 0 { a } else { b }, &p).0, 200, "request {i} while Redis is down");
    }
    eventually("replica A reports Redis down", || {
        let m = ureq::get(&format!("http://127.0.0.1:{a}/metrics")).call().unwrap().into_string().unwrap();
        m.contains("kvroute_index_redis_up 0")
    });
    // Back (empty): new events flow into it and B sees them again.
    let _redis = Children(vec![redis(rp)]);
    std::thread::sleep(Duration::from_millis(700));
    let after = words("after", 160);
    let (status, pod2) = complete(a, &after);
    assert_eq!(status, 200);
    eventually("the shared view converges after Redis returns", || matched(b, &after, &pod2) == 10);
}
