//! Two `kvroute serve` replicas sharing one **real `redis-server`** (the test command
//! installs Debian's package): KV events ingested by one are scored by the other; killing
//! Redis mid-run loses no request, and the shared view comes back after a restart.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_ports, sim_publishing as sim, wait_for, wait_healthy, words, Children};
use serde_json::{json, Value};

fn redis(port: u16) -> Child {
    kvroute_index_conformance::redis_server(port)
}

/// A router on the shared Redis; `dial` = (pod port, publisher port, replay port) of the
/// sims whose events it ingests (none: it only reads the shared index).
fn serve_with(port: u16, redis_port: u16, dial: &[(u16, u16, u16)], sims: &[u16], extra: &[&str]) -> Child {
    serve_on(port, &format!("redis://127.0.0.1:{redis_port}"), dial, sims, extra)
}

fn serve_on(port: u16, redis_url: &str, dial: &[(u16, u16, u16)], sims: &[u16], extra: &[&str]) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    c.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--health-interval-ms", "100", "--no-zmq-bind"]);
    c.args(common::admin_args(port));
    c.args(["--index-backend", "redis", "--redis-url", redis_url]);
    for (p, z, r) in dial {
        c.args(["--zmq-connect", &format!("127.0.0.1:{p}=tcp://127.0.0.1:{z},replay=tcp://127.0.0.1:{r}")]);
    }
    for p in sims {
        c.args(["--backend", &format!("http://127.0.0.1:{p}")]);
    }
    let child = c.args(extra).env("RUST_LOG", "warn").stdout(Stdio::null()).spawn().unwrap();
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
    let ex: Value = ureq::post(&format!("http://127.0.0.1:{}/v1/route/explain", common::admin_port(router)))
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

/// Two publishing sims; replica A ingests their events, replica B only reads the shared
/// index at `url`. Returns (A, B, the sims' ports, the children to stop).
fn two_replicas(url: &str, extra: &[&str]) -> (u16, u16, [u16; 2], Children) {
    let ports = free_ports(8);
    let (a, b) = (ports[0], ports[1]);
    let dial = [(ports[2], ports[3], ports[4]), (ports[5], ports[6], ports[7])];
    let sims = [dial[0].0, dial[1].0];
    let mut children: Vec<Child> = dial.iter().map(|&(p, z, r)| sim(p, z, r)).collect();
    children.push(serve_on(a, url, &dial, &sims, extra));
    children.push(serve_on(b, url, &[], &sims, extra));
    std::thread::sleep(Duration::from_millis(300));
    (a, b, sims, Children(children))
}

#[test]
fn replicas_share_the_index_and_survive_a_redis_restart() {
    let rp = free_ports(1)[0];
    let mut redis_child = Some(redis(rp));
    let (a, b, sims, _children) = two_replicas(&format!("redis://127.0.0.1:{rp}"), &[]);
    // Events reach replica A only; replica B scores them from Redis.
    let prompt = words("shared", 160);
    let (status, pod) = complete(a, &prompt);
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(10), "replica B sees the blocks replica A ingested", || {
        matched(b, &prompt, &pod) == 10
    });
    // B would route that prompt to the same pod without having seen an event (explain:
    // the decision without forwarding, so no speculative entry is left behind in B).
    let ex: Value = ureq::post(&format!("http://127.0.0.1:{}/v1/route/explain", common::admin_port(b)))
        .send_json(json!({"model": "m", "prompt": prompt}))
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(ex["pick"], pod.as_str());

    // Redis dies mid-run: every request still succeeds on both replicas.
    let mut r = redis_child.take().unwrap();
    let _ = r.kill();
    let _ = r.wait();
    for i in 0..20 {
        let p = words(&format!("outage{i}x"), 40);
        assert_eq!(complete(if i % 2 == 0 { a } else { b }, &p).0, 200, "request {i} while Redis is down");
    }
    wait_for(Duration::from_secs(10), "replica A reports Redis down", || {
        let m = ureq::get(&format!("http://127.0.0.1:{}/metrics", common::admin_port(a)))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        m.contains("kvroute_index_redis_up 0")
    });
    // Back, empty: replica A replays every pod's buffered events into it (triggered by the
    // pods' next events), so even blocks stored before the outage come back.
    let _redis = Children(vec![redis(rp)]);
    std::thread::sleep(Duration::from_millis(1200));
    for p in sims {
        let r = ureq::post(&format!("http://127.0.0.1:{p}/v1/completions"))
            .send_json(json!({"model": "m", "prompt": words(&format!("poke{p}x"), 20), "max_tokens": 1}));
        assert!(r.is_ok());
    }
    wait_for(Duration::from_secs(10), "blocks from before the outage are rebuilt from the replay", || {
        matched(b, &prompt, &pod) == 10
    });
    let after = words("after", 160);
    let (status, pod2) = complete(a, &after);
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(10), "new events flow into the restarted Redis", || matched(b, &after, &pod2) == 10);
}

#[test]
fn one_writer_per_pod_and_a_survivor_takes_over_with_a_replay() {
    let ports = free_ports(9);
    let (rp, a, b) = (ports[0], ports[1], ports[2]);
    let dial = [(ports[3], ports[4], ports[5]), (ports[6], ports[7], ports[8])];
    let sims = [dial[0].0, dial[1].0];
    let _redis = Children(vec![redis(rp)]);
    let mut fleet: Vec<Child> = dial.iter().map(|&(p, z, r)| sim(p, z, r)).collect();
    // Both replicas dial both pods; a lease elects one writer per pod.
    let lease = ["--redis-writer-lease-ms", "1500"];
    let mut ra = serve_with(a, rp, &dial, &sims, &lease);
    let mut rb = serve_with(b, rp, &dial, &sims, &lease);
    let prompt = words("lease", 160);
    let (status, pod) = complete(a, &prompt);
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(10), "the pod's writer stored the blocks", || matched(b, &prompt, &pod) == 10);
    let owner = |pod: &str| -> String {
        let o = Command::new("redis-cli").args(["-p", &rp.to_string(), "GET", &format!("kvr:owner:{pod}")]).output();
        String::from_utf8_lossy(&o.unwrap().stdout).trim().to_string()
    };
    let holder = owner(&pod);
    assert!(
        holder.starts_with(&format!("127.0.0.1:{a}#")) || holder.starts_with(&format!("127.0.0.1:{b}#")),
        "{holder}"
    );
    // Kill the writer of that pod; the survivor takes the lease over and replays the pod,
    // so blocks the pod stores meanwhile are not lost.
    let (dead, survivor) = if holder.starts_with(&format!("127.0.0.1:{a}#")) { (&mut ra, b) } else { (&mut rb, a) };
    let _ = dead.kill();
    let _ = dead.wait();
    let pod_port: u16 = pod.rsplit(':').next().unwrap().parse().unwrap();
    let after = words("takeover", 160);
    let r = ureq::post(&format!("http://127.0.0.1:{pod_port}/v1/completions"))
        .send_json(json!({"model": "m", "prompt": after, "max_tokens": 1}));
    assert!(r.is_ok());
    wait_for(Duration::from_secs(10), "the survivor holds the lease", || {
        owner(&pod).starts_with(&format!("127.0.0.1:{survivor}#"))
    });
    wait_for(Duration::from_secs(10), "blocks stored during the takeover are in the index", || {
        matched(survivor, &after, &pod) == 10
    });
    fleet.push(ra);
    fleet.push(rb);
    let _fleet = Children(fleet);
}

#[test]
fn replicas_share_the_index_on_a_redis_cluster() {
    let cluster = kvroute_index_conformance::LocalCluster::start();
    let (a, b, _sims, _children) = two_replicas(&cluster.url, &["--redis-cluster"]);
    // Events reach replica A only; replica B reads the blocks from the cluster's nodes.
    let prompt = words("clustered", 160);
    let (status, pod) = complete(a, &prompt);
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(10), "replica B sees the blocks replica A ingested", || {
        matched(b, &prompt, &pod) == 10
    });
    let (status, again) = complete(b, &prompt);
    assert_eq!((status, again.as_str()), (200, pod.as_str()), "B routes to the pod holding the prefix");
    // The ten blocks are spread over the nodes, not on one.
    let holding = cluster
        .ports
        .iter()
        .filter(|p| {
            let out = Command::new("redis-cli").args(["-p", &p.to_string(), "dbsize"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap_or(0) > 0
        })
        .count();
    assert!(holding >= 2, "block keys on {holding} of 3 nodes");
}
