//! Black-box tests: llm-d `EndpointPickerConfig` files in the shapes llm-d's guides and
//! KServe publish (`tests/fixtures/llmd/`), loaded unchanged by `kvroute serve
//! --scheduler-config` in front of real `kvroute sim` child processes that carry no role
//! labels; plus the start-up refusals, warnings and the block-size cross-check.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{free_ports, wait_healthy, words, Children};
use serde_json::{json, Value};

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llmd").join(name);
    std::fs::read_to_string(p).unwrap()
}

/// Writes `text` to a fresh file, its KV-event endpoint moved to `zmq` (the guides bind
/// tcp://*:5557; tests run side by side).
fn config_file(tag: &str, text: &str, zmq: u16) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvroute-llmd-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("epp.yaml");
    std::fs::write(&p, text.replace("tcp://*:5557", &format!("tcp://127.0.0.1:{zmq}"))).unwrap();
    p
}

/// A `kvroute sim` (model `m`) with this block size, publishing KV events to `zmq`.
fn sim(port: u16, zmq: u16, block_size: u32) -> Child {
    common::sim_with_block_size(port, zmq, block_size, &[])
}

/// `kvroute serve` on `port` routing to `backends`, its stderr lines sent to the receiver.
fn serve(port: u16, backends: &[u16], args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--health-interval-ms", "100"]);
    cmd.args(common::admin_args(port));
    for b in backends {
        cmd.args(["--backend", &format!("http://127.0.0.1:{b}")]);
    }
    let mut child = cmd
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for the child to exit (killing it after 15 s); its status and stderr.
fn exit_of(mut child: Child, rx: &mpsc::Receiver<String>) -> (Option<ExitStatus>, String) {
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(30));
    };
    std::thread::sleep(Duration::from_millis(100));
    (status, rx.try_iter().collect::<Vec<_>>().join("\n"))
}

/// Waits until a stderr line contains every one of `needles`.
fn log_line(rx: &mpsc::Receiver<String>, needles: &[&str]) -> String {
    let t = Instant::now();
    let mut seen = Vec::new();
    while t.elapsed() < Duration::from_secs(15) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            if needles.iter().all(|n| l.contains(n)) {
                return l;
            }
            seen.push(l);
        }
    }
    panic!("no log line with {needles:?}; saw:\n{}", seen.join("\n"));
}

fn complete(base: &str, prompt: &str) -> (u16, String) {
    let r = ureq::post(&format!("{base}/v1/completions"))
        .send_json(json!({"model": "m", "prompt": prompt, "max_tokens": 2}))
        .unwrap();
    (r.status(), r.header("x-kvroute-pod").unwrap_or_default().to_string())
}

fn explain(base: &str, body: Value) -> Value {
    ureq::post(&format!("{}/v1/route/explain", common::admin(base))).send_json(body).unwrap().into_json().unwrap()
}

fn metric_line(base: &str, prefix: &str) -> Option<f64> {
    let text = ureq::get(&format!("{}/metrics", common::admin(base))).call().ok()?.into_string().ok()?;
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Three unlabelled sims behind `kvroute serve --scheduler-config <fixture>`: every request
/// is served (no 503 from the role filter), a repeated prompt goes back to the pod that
/// holds it, and with a precise config that pod's KV events are what says so.
fn routes_unlabelled_fleet(fixture_name: &str, block_size: u32, precise: bool) {
    let [s1, s2, s3, zmq, http] = free_ports(5).try_into().unwrap();
    let mut kids = Children(vec![sim(s1, zmq, block_size), sim(s2, zmq, block_size), sim(s3, zmq, block_size)]);
    let cfg = config_file(fixture_name, &fixture(fixture_name), zmq);
    let bind = format!("tcp://127.0.0.1:{zmq}");
    let mut args = vec!["--scheduler-config", cfg.to_str().unwrap()];
    if !precise {
        // The KServe shapes carry no KV-event settings (the precise ones bind zmqEndpoint).
        args.extend(["--zmq-bind", bind.as_str()]);
    }
    let (child, rx) = serve(http, &[s1, s2, s3], &args);
    kids.0.push(child);
    let base = format!("http://127.0.0.1:{http}");
    wait_healthy(&base);
    if precise {
        log_line(&rx, &["applied hash.block_size = 64"]);
    }
    let prompt = words("guide", 400);
    let (status, first) = complete(&base, &prompt);
    assert_eq!(status, 200);
    assert!(!first.is_empty());
    // The pod's KV events reach the index (precise), or the router's own record (approximate).
    let body = json!({"model": "m", "prompt": prompt});
    let t = Instant::now();
    loop {
        let e = explain(&base, body.clone());
        let pods = e["pods"].as_array().unwrap();
        assert_eq!(pods.iter().filter(|p| p["candidate"] == true).count(), 3, "no pod filtered out: {e}");
        let holder = pods.iter().find(|p| p["pod"] == first.as_str()).unwrap();
        let others_cold = pods.iter().filter(|p| p["pod"] != first.as_str()).all(|p| p["matched_blocks"] == 0);
        if !precise || (holder["matched_blocks"].as_u64().unwrap_or(0) >= 5 && others_cold) {
            if precise {
                let plugins: Vec<&str> =
                    holder["scores"].as_array().unwrap().iter().filter_map(|s| s["plugin"].as_str()).collect();
                assert!(plugins.contains(&"precise-prefix-cache-scorer"), "{plugins:?}");
            }
            assert_eq!(e["pick"], first.as_str(), "{e}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the KV events never reached the index: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..3 {
        assert_eq!(complete(&base, &prompt), (200, first.clone()), "a repeat goes to the pod holding the prompt");
    }
    let (status, _) = complete(&base, &words("other", 300));
    assert_eq!(status, 200);
    if precise {
        // The sims' block size equals the config's: no mismatch reported.
        let t = Instant::now();
        while metric_line(&base, &format!("kvroute_pod_block_size_mismatch{{pod=\"127.0.0.1:{s1}\"}}")).is_none() {
            assert!(t.elapsed() < Duration::from_secs(5), "no block-size gauge");
            std::thread::sleep(Duration::from_millis(50));
        }
        for s in [s1, s2, s3] {
            let m = metric_line(&base, &format!("kvroute_pod_block_size_mismatch{{pod=\"127.0.0.1:{s}\"}}"));
            assert_eq!(m, Some(0.0));
        }
    }
}

#[test]
fn onramp_precise_config_routes_on_unlabelled_fleet() {
    routes_unlabelled_fleet("onramp-precise.yaml", 64, true);
}

#[test]
fn precise_guide_config_routes_on_unlabelled_fleet() {
    routes_unlabelled_fleet("precise-guide.yaml", 64, true);
}

#[test]
fn kserve_default_config_routes_on_unlabelled_fleet() {
    routes_unlabelled_fleet("kserve-default.yaml", 16, false);
}

#[test]
fn kserve_pd_config_routes_on_unlabelled_fleet() {
    routes_unlabelled_fleet("kserve-pd.yaml", 16, false);
}

#[test]
fn kserve_pd_config_names_a_prefill_pod_when_roles_are_labelled() {
    let [s1, s2, zmq, http] = free_ports(4).try_into().unwrap();
    let mut kids = Children(vec![sim(s1, zmq, 16), sim(s2, zmq, 16)]);
    let epp = config_file("pd-labelled", &fixture("kserve-pd.yaml"), zmq);
    let serve_cfg = epp.with_file_name("serve.yaml");
    let yaml = format!(
        "backends:\n  - {{url: 'http://127.0.0.1:{s1}', labels: {{llm-d.ai/role: prefill}}}}\n  \
         - {{url: 'http://127.0.0.1:{s2}', labels: {{llm-d.ai/role: decode}}}}\n\
         scheduler_config: {}\ningest: {{bind: ['tcp://127.0.0.1:{zmq}']}}\n",
        epp.display()
    );
    std::fs::write(&serve_cfg, yaml).unwrap();
    let (child, _rx) = serve(http, &[], &["--config", serve_cfg.to_str().unwrap()]);
    kids.0.push(child);
    let base = format!("http://127.0.0.1:{http}");
    wait_healthy(&base);
    let e = explain(&base, json!({"model": "m", "prompt": words("pd", 200)}));
    assert_eq!(e["pick"], format!("127.0.0.1:{s2}"), "decode pod: {e}");
    assert_eq!(e["prefill"], format!("127.0.0.1:{s1}"), "prefill pod: {e}");
    assert_eq!(e["profile"], "decode");
    assert_eq!(complete(&base, &words("pd", 200)), (200, format!("127.0.0.1:{s2}")));
}

#[test]
fn config_block_size_contradicting_an_explicit_flag_refuses_to_start() {
    let [zmq, http] = free_ports(2).try_into().unwrap();
    let cfg = config_file("clash", &fixture("onramp-precise.yaml"), zmq);
    let (child, rx) = serve(http, &[1], &["--scheduler-config", cfg.to_str().unwrap(), "--block-size", "16"]);
    let (status, err) = exit_of(child, &rx);
    assert!(status.is_some_and(|s| !s.success()), "kvroute serve kept running:\n{err}");
    assert!(err.contains("tokenProcessorConfig.blockSize 64 but --block-size 16 was given"), "{err}");
    // The same value given explicitly is no contradiction.
    let (mut child, rx) = serve(http, &[1], &["--scheduler-config", cfg.to_str().unwrap(), "--block-size", "64"]);
    wait_healthy(&format!("http://127.0.0.1:{http}"));
    let _ = child.kill();
    let _ = child.wait();
    drop(rx);
}

#[test]
fn unsupported_plugins_fail_and_ignored_parameters_are_named() {
    let [zmq, http] = free_ports(2).try_into().unwrap();
    let text = fixture("kserve-default.yaml")
        .replace("- type: no-hit-lru-scorer", "- type: token-load-scorer")
        .replace("- pluginRef: no-hit-lru-scorer", "- pluginRef: token-load-scorer");
    let cfg = config_file("unsupported", &text, zmq);
    let (child, rx) = serve(http, &[1], &["--scheduler-config", cfg.to_str().unwrap()]);
    let (status, err) = exit_of(child, &rx);
    assert!(status.is_some_and(|s| !s.success()), "kvroute serve kept running:\n{err}");
    assert!(err.contains("plugin type \"token-load-scorer\" is not supported by kvroute"), "{err}");
    // Parameters that cannot change kvroute's routing: one warning each, by name.
    let text = fixture("onramp-precise.yaml")
        .replace("concurrency: 4", "concurrency: 4\n        engineType: vllm\n        extraKnob: 1");
    let cfg = config_file("ignored", &text, zmq);
    let (child, rx) = serve(http, &[1], &["--scheduler-config", cfg.to_str().unwrap()]);
    let _kid = Children(vec![child]);
    log_line(&rx, &["WARN", "\"token-producer\"", "parameter vllm.url is ignored"]);
    log_line(&rx, &["WARN", "parameter kvEventsConfig.extraKnob is ignored"]);
}

#[test]
fn block_size_mismatch_metric_fires_for_a_pod_with_another_block_size() {
    let [s1, s2, zmq, http] = free_ports(4).try_into().unwrap();
    let mut kids = Children(vec![sim(s1, zmq, 32), sim(s2, zmq, 16)]);
    let (child, rx) = serve(http, &[s1, s2], &["--zmq-bind", &format!("tcp://127.0.0.1:{zmq}"), "--block-size", "16"]);
    kids.0.push(child);
    let base = format!("http://127.0.0.1:{http}");
    wait_healthy(&base);
    let gauge = |p: u16| metric_line(&base, &format!("kvroute_pod_block_size_mismatch{{pod=\"127.0.0.1:{p}\"}}"));
    let t = Instant::now();
    while gauge(s1).is_none() || gauge(s2).is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "the block sizes were never compared");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!((gauge(s1), gauge(s2)), (Some(1.0), Some(0.0)));
    let line = log_line(&rx, &["WARN", &format!("127.0.0.1:{s1}"), "block size 32"]);
    assert!(line.contains("kvroute's is 16"), "{line}");
}
