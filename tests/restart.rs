//! A router that starts (or restarts) next to a running fleet rebuilds its index from
//! the pods' replay buffers **before** it serves: the first request already routes on
//! the pods' caches.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_ports, sim_publishing, wait_healthy, words, Children};
use serde_json::{json, Value};

#[test]
fn a_router_started_after_the_fleet_replays_its_caches_before_serving() {
    let ports = free_ports(7);
    let router = ports[0];
    let dial = [(ports[1], ports[2], ports[3]), (ports[4], ports[5], ports[6])];
    let mut children: Vec<_> = dial.iter().map(|&(p, z, r)| sim_publishing(p, z, r)).collect();
    // The fleet serves (and caches) a prompt while no router is running.
    let prompt = words("before", 160);
    let r = ureq::post(&format!("http://127.0.0.1:{}/v1/completions", dial[1].0))
        .send_json(json!({"model": "m", "prompt": prompt, "max_tokens": 1}));
    assert!(r.is_ok());
    std::thread::sleep(Duration::from_millis(200));
    let mut serve = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    serve.args(["serve", "--listen", &format!("127.0.0.1:{router}"), "--no-zmq-bind"]);
    serve.args(common::admin_args(router));
    for (p, z, r) in dial {
        serve.args(["--backend", &format!("http://127.0.0.1:{p}")]);
        serve.args(["--zmq-connect", &format!("127.0.0.1:{p}=tcp://127.0.0.1:{z},replay=tcp://127.0.0.1:{r}")]);
    }
    children.push(serve.env("RUST_LOG", "warn").stdout(Stdio::null()).spawn().unwrap());
    let _children = Children(children);
    wait_healthy(&format!("http://127.0.0.1:{router}"));
    // No live event has arrived since the router started; the replay filled the index.
    let ex: Value = ureq::post(&format!("http://127.0.0.1:{}/v1/route/explain", common::admin_port(router)))
        .send_json(json!({"model": "m", "prompt": prompt}))
        .unwrap()
        .into_json()
        .unwrap();
    let holder = format!("127.0.0.1:{}", dial[1].0);
    assert_eq!(ex["pick"], holder.as_str(), "{ex}");
    let matched =
        ex["pods"].as_array().unwrap().iter().find(|p| p["pod"] == holder.as_str()).unwrap()["matched_blocks"].clone();
    assert_eq!(matched, 10, "{ex}");
}
