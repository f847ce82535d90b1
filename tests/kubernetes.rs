//! Issue #15: `kvroute serve --discovery kubernetes` against a real kube-apiserver (1.20,
//! with etcd; `common::kube`), with `kvroute sim` processes as the pods. Pod IPs are
//! loopback addresses (127.0.0.x) on which the sims listen; the tests play the kubelet
//! (they set each pod's podIP and Ready condition). Traffic flows while the fleet changes.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kube::Kube;
use common::{free_ports, wait_for, words, Children};
use serde_json::{json, Value};

const NS: &str = "default";

/// The pods' serving port (the same on every pod IP, as in a cluster) and a block of
/// KV-event ports: a vLLM publisher binds a wildcard address (`tcp://*:port`, vLLM's rule),
/// so the sims sharing this host each need their own port pair, announced to kvroute by
/// the pod annotations (as a pod would if its publisher listened elsewhere). `events`
/// itself is kvroute's default (`--pod-kv-events-port`).
#[derive(Clone, Copy)]
struct Ports {
    http: u16,
    events: u16,
}

fn ports() -> Ports {
    Ports { http: free_ports(1)[0], events: common::free_run(24) }
}

/// The event port pair of the pod at `ip` (127.0.0.N → events + 2 N, replay + 1).
fn ev(p: Ports, ip: &str) -> u16 {
    let n: u16 = ip.rsplit('.').next().and_then(|x| x.parse().ok()).unwrap_or(0);
    p.events + 2 * n
}

/// A sim as the pod at `ip` with its own event ports ([`ev`]).
fn pod_sim(ip: &str, p: Ports, extra: &[&str]) -> Child {
    pod_sim_at(ip, p.http, ev(p, ip), extra)
}

/// A sim as pod `ip`: HTTP on `ip:http`, its publisher bound at `*:events` (replay at
/// `events + 1`), topic `kv@ip:http@m`.
fn pod_sim_at(ip: &str, http: u16, events: u16, extra: &[&str]) -> Child {
    let p = Ports { http, events };
    let kv = json!({"enable_kv_cache_events": true, "publisher": "zmq",
        "endpoint": format!("tcp://*:{}", p.events), "replay_endpoint": format!("tcp://*:{}", p.events + 1),
        "topic": format!("kv@{ip}:{}@m", p.http)});
    common::sim_at(ip, p.http, 16, &kv, extra)
}

/// `kvroute serve` discovering pods of `default` through `kube`'s kubeconfig, dialling
/// each pod's publisher; `discovery` picks the pool or selector.
fn router(kubeconfig: &std::path::Path, rp: u16, p: Ports, discovery: &[&str]) -> Child {
    let c = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["serve", "--listen", &format!("127.0.0.1:{rp}"), "--kubeconfig", &kubeconfig.to_string_lossy()])
        .args(["--pool-namespace", NS, "--pod-kv-events-port", &p.events.to_string()])
        .args(["--pod-kv-replay-port", &(p.events + 1).to_string()])
        .args(["--block-size", "16", "--hash-algo", "sha256_cbor", "--hash-seed", "42", "--health-interval-ms", "100"])
        .args(common::admin_args(rp))
        .args(discovery)
        .env("RUST_LOG", std::env::var("SERVE_LOG").unwrap_or("warn".into()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_healthy(&format!("http://127.0.0.1:{rp}"));
    c
}

fn pool_yaml(name: &str, selector: &[(&str, &str)], port: u16) -> String {
    let labels: String = selector.iter().map(|(k, v)| format!("      {k}: {v}\n")).collect();
    format!(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata:\n  name: {name}\n  namespace: {NS}\n\
         spec:\n  selector:\n    matchLabels:\n{labels}  targetPorts:\n  - number: {port}\n  endpointPickerRef:\n    \
         name: kvroute-epp\n    port:\n      number: 9002\n"
    )
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(20)).build()
}

/// A completion through the router: (status, the pod that served it).
fn complete(rp: u16, prompt: &str) -> (u16, Option<String>) {
    let r = agent()
        .post(&format!("http://127.0.0.1:{rp}/v1/completions"))
        .send_json(json!({"model": "m", "prompt": prompt, "max_tokens": 2}));
    match r {
        Ok(r) => (r.status(), r.header("x-kvroute-pod").map(str::to_string)),
        Err(ureq::Error::Status(c, _)) => (c, None),
        Err(_) => (0, None),
    }
}

fn ready(rp: u16) -> (u16, String) {
    match agent().get(&format!("http://127.0.0.1:{rp}/ready")).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Index entries of `pod` (`ip:port`).
fn blocks(rp: u16, pod: &str) -> u64 {
    let url = format!("{}/v1/kv/pods", common::admin(&format!("http://127.0.0.1:{rp}")));
    let v: Value = agent().get(&url).call().ok().and_then(|r| r.into_json().ok()).unwrap_or(Value::Null);
    let list = v.as_array().cloned().or_else(|| v["pods"].as_array().cloned()).unwrap_or_default();
    list.iter().find(|p| p["pod"] == pod).and_then(|p| p["blocks"].as_u64()).unwrap_or(0)
}

fn metric(rp: u16, name: &str) -> f64 {
    common::metric_sum(&[rp], name)
}

/// Pods served by the next `n` distinct-prompt requests.
fn served_by(rp: u16, tag: &str, n: usize) -> Vec<String> {
    (0..n).filter_map(|i| complete(rp, &words(&format!("{tag}{i}x"), 40)).1).collect()
}

/// Creates a Ready pod at `ip` annotated with its sim's event ports ([`ev`]).
fn add_pod(kube: &Kube, p: Ports, name: &str, ip: &str, labels: &[(&str, &str)]) -> Instant {
    let (e, r) = (ev(p, ip).to_string(), (ev(p, ip) + 1).to_string());
    kube.create_pod(NS, name, labels, &[("kvroute.io/kv-events-port", &e), ("kvroute.io/kv-replay-port", &r)]);
    kube.set_pod_status(NS, name, Some(ip), true);
    Instant::now()
}

/// KV-event batches ingestion applied for `pod` (events, not the router's own guesses).
fn applied(rp: u16, pod: &str) -> u64 {
    let url = format!("{}/v1/kv/pods", common::admin(&format!("http://127.0.0.1:{rp}")));
    let v: Value = agent().get(&url).call().ok().and_then(|r| r.into_json().ok()).unwrap_or(Value::Null);
    let list = v.as_array().cloned().or_else(|| v["pods"].as_array().cloned()).unwrap_or_default();
    list.iter().find(|p| p["pod"] == pod).and_then(|p| p["applied_batches"].as_u64()).unwrap_or(0)
}

#[test]
fn pods_joining_leaving_and_relabelled_follow_the_pool_with_traffic_flowing() {
    let kube = Kube::start();
    kube.install_crds();
    let p = ports();
    let rp = free_ports(1)[0];
    let mut kids = Children(vec![pod_sim("127.0.0.2", p, &[]), pod_sim("127.0.0.3", p, &[])]);
    // No pool yet: alive, not ready, and the reason is given.
    kids.0.push(router(kube.kubeconfig(), rp, p, &["--pool-name", "vllm"]));
    wait_for(Duration::from_secs(10), "readiness to name the missing pool", || {
        let (code, body) = ready(rp);
        code == 503 && body.contains("not found")
    });
    kube.apply(&pool_yaml("vllm", &[("app", "vllm")], p.http));
    wait_for(Duration::from_secs(5), "the empty pool's reason", || ready(rp).1.contains("matches no ready pod"));

    // A pod turning Ready gets requests, and its KV events are ingested, within 2 s.
    let t = add_pod(&kube, p, "a", "127.0.0.2", &[("app", "vllm")]);
    let mut first = None;
    wait_for(Duration::from_secs(2), "a request routed to the new pod", || {
        let ok = complete(rp, &words("warm", 40)).1.is_some_and(|s| s.starts_with("127.0.0.2"));
        if ok && first.is_none() {
            first = Some(t.elapsed());
        }
        ok
    });
    wait_for(
        Duration::from_secs(2) - t.elapsed().min(Duration::from_secs(2)),
        "the new pod's KV events applied",
        || applied(rp, &format!("127.0.0.2:{}", p.http)) > 0 && blocks(rp, &format!("127.0.0.2:{}", p.http)) > 0,
    );
    eprintln!("pod Ready → first routed request: {:?}", first.unwrap_or_default());
    wait_for(Duration::from_secs(2), "readiness", || ready(rp).0 == 200);

    // A second pod; a pod with other labels is not part of the pool.
    add_pod(&kube, p, "b", "127.0.0.3", &[("app", "vllm")]);
    add_pod(&kube, p, "other", "127.0.0.4", &[("app", "not-vllm")]);
    wait_for(Duration::from_secs(3), "both pods routed to", || {
        let s = served_by(rp, "spread", 12);
        s.iter().any(|x| x.starts_with("127.0.0.2")) && s.iter().any(|x| x.starts_with("127.0.0.3"))
    });
    // A label change takes the pod out of the pool at once (and back in).
    kube.label_pod(NS, "b", &[("app", Some("paused"))]);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let s = served_by(rp, "relabel", 12);
    assert!(s.len() == 12 && s.iter().all(|s| s.starts_with("127.0.0.2")), "b left with its label: {s:?}");
    wait_for(Duration::from_secs(2) - t.elapsed().min(Duration::from_secs(2)), "b's blocks leave the index", || {
        blocks(rp, &format!("127.0.0.3:{}", p.http)) == 0
    });

    // Deleted: no new request after 1 s, its blocks leave the index.
    let before = blocks(rp, &format!("127.0.0.2:{}", p.http));
    assert!(before > 0);
    kube.label_pod(NS, "b", &[("app", Some("vllm"))]);
    wait_for(Duration::from_secs(3), "b back", || served_by(rp, "back", 12).iter().any(|s| s.starts_with("127.0.0.3")));
    kube.delete_pod(NS, "a");
    let t = Instant::now();
    // Requests flow on; the last one routed to the deleted pod says when it left.
    let (mut last_to_a, mut gone) = (None, None);
    while t.elapsed() < Duration::from_secs(1) {
        let prompt = words(&format!("del{}", t.elapsed().as_micros()), 40);
        if complete(rp, &prompt).1.is_some_and(|s| s.starts_with("127.0.0.2")) {
            last_to_a = Some(t.elapsed());
        }
        if gone.is_none() && blocks(rp, &format!("127.0.0.2:{}", p.http)) == 0 {
            gone = Some(t.elapsed());
        }
    }
    eprintln!("pod deleted → last request routed to it: {last_to_a:?}; its blocks out of the index: {gone:?}");
    assert!(gone.is_some(), "the deleted pod's blocks are still in the index after 1 s");
    let after: Vec<String> = served_by(rp, "gone", 12);
    assert_eq!(after.len(), 12, "every request succeeded");
    assert!(after.iter().all(|s| s.starts_with("127.0.0.3")), "a pod deleted 1 s ago still got requests: {after:?}");

    // The pool's selector changes: the fleet swaps without a restart.
    add_pod(&kube, p, "c", "127.0.0.2", &[("app", "vllm2")]);
    kube.apply(&pool_yaml("vllm", &[("app", "vllm2")], p.http));
    wait_for(Duration::from_secs(3), "the pool's new selector", || {
        let s = served_by(rp, "swap", 8);
        s.len() == 8 && s.iter().all(|s| s.starts_with("127.0.0.2"))
    });
    assert!(metric(rp, "kvroute_discovery_errors_total") == 0.0);
}

/// The API server going away mid-run loses no pod (the last known fleet serves, the watch
/// resumes and sees pods added meanwhile); kvroute restarting rebuilds its index from a
/// list + each pod's replay before it reports ready; a malformed annotation is counted and
/// the pod still served.
#[test]
fn apiserver_and_router_restarts_lose_no_pod_and_rebuild_the_index() {
    let mut kube = Kube::start();
    kube.install_crds();
    let p = ports();
    let rp = free_ports(1)[0];
    let mut kids = Children(vec![pod_sim("127.0.0.2", p, &[]), pod_sim("127.0.0.3", p, &[])]);
    kube.apply(&pool_yaml("vllm", &[("app", "vllm")], p.http));
    add_pod(&kube, p, "a", "127.0.0.2", &[("app", "vllm")]);
    add_pod(&kube, p, "b", "127.0.0.3", &[("app", "vllm")]);
    kids.0.push(router(kube.kubeconfig(), rp, p, &["--pool-name", "vllm"]));
    wait_for(Duration::from_secs(10), "both pods routed to", || {
        let s = served_by(rp, "start", 12);
        s.iter().any(|x| x.starts_with("127.0.0.2")) && s.iter().any(|x| x.starts_with("127.0.0.3"))
    });
    let (a, b) = (format!("127.0.0.2:{}", p.http), format!("127.0.0.3:{}", p.http));
    wait_for(Duration::from_secs(3), "both pods' KV events applied", || applied(rp, &a) > 0 && applied(rp, &b) > 0);

    // The API server is down for 3 s: every request still succeeds on both pods.
    kube.stop_apiserver();
    let t0 = Instant::now();
    let mut served = Vec::new();
    while t0.elapsed() < Duration::from_secs(3) {
        served.extend(served_by(rp, &format!("down{}", served.len()), 4));
    }
    assert!(served.len() >= 8 && served.iter().any(|s| s.starts_with("127.0.0.3")), "{served:?}");
    assert!(metric(rp, "kvroute_discovery_errors_total") >= 1.0, "the broken watch is counted");
    kube.start_apiserver();
    // A pod added after the restart is seen: the watch resumed (after its backoff).
    let mut kids2 = Children(vec![pod_sim("127.0.0.4", p, &[])]);
    add_pod(&kube, p, "c", "127.0.0.4", &[("app", "vllm")]);
    let resumed = wait_for(Duration::from_secs(20), "the pod added after the restart", || {
        served_by(rp, "after", 6).iter().any(|s| s.starts_with("127.0.0.4"))
    });
    eprintln!("apiserver back → new pod routed: {resumed:?}");
    // A bad annotation: counted, and the pod served on the configured ports.
    kids2.0.push(pod_sim_at("127.0.0.5", p.http, p.events, &[]));
    kube.create_pod(NS, "d", &[("app", "vllm")], &[("kvroute.io/kv-events-port", "not-a-port")]);
    kube.set_pod_status(NS, "d", Some("127.0.0.5"), true);
    wait_for(Duration::from_secs(5), "the badly annotated pod served", || {
        served_by(rp, "bad", 8).iter().any(|s| s.starts_with("127.0.0.5"))
    });
    assert_eq!(metric(rp, "kvroute_discovery_bad_annotations_total"), 1.0);

    // kvroute restarts: it is ready only once the pods' replays rebuilt the index.
    let before = blocks(rp, &a);
    let mut old = kids.0.pop().unwrap();
    let _ = old.kill();
    let _ = old.wait();
    let rp2 = free_ports(1)[0];
    kids.0.push(router(kube.kubeconfig(), rp2, p, &["--pool-name", "vllm"]));
    wait_for(Duration::from_secs(10), "the restarted router ready", || ready(rp2).0 == 200);
    let rebuilt = blocks(rp2, &a);
    assert!(rebuilt > 0 && applied(rp2, &a) > 0, "index at readiness: {rebuilt} blocks of a (had {before}), replayed");
    assert!(metric(rp2, "kvroute_kv_replays_total") >= 4.0, "each pod replayed");
}

/// kvroute under exactly the base's Role (a real ServiceAccount token, RBAC on) discovers
/// the pool and its objectives with no error; InferenceObjective priorities decide which
/// requests are sheddable (every pod busy: queue_depth 0).
#[test]
fn least_privilege_role_suffices_and_objectives_set_priority() {
    let kube = Kube::start_with(common::kube::Auth::Rbac);
    kube.install_crds();
    let role =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/base/role.yaml")).unwrap();
    kube.kubectl_stdin(&["apply", "-n", NS, "-f", "-"], Some(&role)).unwrap();
    let token = kube.service_account_token(NS, "kvroute");
    let kubeconfig = kube.kubeconfig_for_token(&token, NS);
    let p = ports();
    let rp = free_ports(1)[0];
    let mut kids = Children(vec![pod_sim("127.0.0.2", p, &[])]);
    kube.apply(&pool_yaml("vllm", &[("app", "vllm")], p.http));
    add_pod(&kube, p, "a", "127.0.0.2", &[("app", "vllm")]);
    for (name, prio) in [("batch", -1), ("chat", 5)] {
        kube.apply(&format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\nmetadata:\n  name: {name}\n  \
             namespace: {NS}\nspec:\n  priority: {prio}\n  poolRef:\n    name: vllm\n"
        ));
    }
    let cfg = std::env::temp_dir().join(format!("kvroute-k8s-sat-{rp}.yaml"));
    std::fs::write(&cfg, "saturation:\n  queue_depth: 0\n").unwrap();
    kids.0.push(router(&kubeconfig, rp, p, &["--pool-name", "vllm", "--config", &cfg.to_string_lossy()]));
    wait_for(Duration::from_secs(10), "ready under the Role", || ready(rp).0 == 200);
    wait_for(Duration::from_secs(5), "both objectives", || metric(rp, "kvroute_discovery_objectives") == 2.0);
    assert_eq!(metric(rp, "kvroute_discovery_errors_total"), 0.0, "the Role allows every call kvroute makes");
    let with = |objective: &str| {
        std::thread::sleep(Duration::from_millis(300)); // a fresh scrape (waiting ≥ 0 = busy)
        match agent()
            .post(&format!("http://127.0.0.1:{rp}/v1/completions"))
            .set("x-gateway-inference-objective", objective)
            .send_json(json!({"model": "m", "prompt": "hello", "max_tokens": 2}))
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(c, _)) => c,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(with("batch"), 429, "priority -1: sheddable, shed when every pod is busy");
    assert_eq!(with("chat"), 200, "priority 5: served");
    assert_eq!(with("sheddable"), 429, "not an objective: the header rule applies");
    // A new objective takes effect without a restart.
    kube.apply(&format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\nmetadata:\n  name: chat\n  \
         namespace: {NS}\nspec:\n  priority: -3\n  poolRef:\n    name: vllm\n"
    ));
    wait_for(Duration::from_secs(5), "chat turned sheddable", || with("chat") == 429);
}

/// Sims whose streams last ~0.1–0.5 s (model time ÷ 4), so some are in flight on the pod
/// being deleted.
const SLOW: &[&str] = &["--speedup", "4"];

/// A rolling restart of every pod under steady streaming load: each old pod is replaced by
/// a new one (new IP), then deleted while its sim gets SIGTERM and drains. No client
/// request fails.
#[test]
fn a_rolling_restart_under_load_fails_no_request() {
    let kube = Kube::start();
    kube.install_crds();
    let p = ports();
    let rp = free_ports(1)[0];
    kube.apply(&pool_yaml("vllm", &[("app", "vllm")], p.http));
    let mut sims: Vec<(String, Child)> = Vec::new();
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().enumerate() {
        sims.push((format!("old{i}"), pod_sim(ip, p, SLOW)));
        add_pod(&kube, p, &format!("old{i}"), ip, &[("app", "vllm")]);
    }
    let _router = Children(vec![router(kube.kubeconfig(), rp, p, &["--pool-name", "vllm"])]);
    wait_for(Duration::from_secs(10), "ready", || ready(rp).0 == 200);
    let stop = Arc::new(AtomicBool::new(false));
    let rolling = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ttfts: Arc<samples::Samples> = Default::default();
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (stop, rolling, ok, failed, ttfts) =
                (stop.clone(), rolling.clone(), ok.clone(), failed.clone(), ttfts.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Relaxed) {
                    n += 1;
                    let t0 = Instant::now();
                    let r = agent().post(&format!("http://127.0.0.1:{rp}/v1/completions")).send_json(json!({
                        "model": "m", "prompt": words(&format!("w{w}r{}", n % 5), 60), "max_tokens": 40, "stream": true}));
                    let done = r.ok().and_then(|r| {
                        let mut body = r.into_reader();
                        let mut first = [0u8; 1];
                        std::io::Read::read_exact(&mut body, &mut first).ok()?;
                        let ttft = t0.elapsed();
                        let mut rest = String::new();
                        std::io::Read::read_to_string(&mut body, &mut rest).ok()?;
                        rest.contains("[DONE]").then_some(ttft)
                    });
                    match done {
                        Some(t) => {
                            ok.fetch_add(1, Relaxed);
                            ttfts.push(rolling.load(Relaxed), t);
                        }
                        None => _ = failed.fetch_add(1, Relaxed),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2)); // steady state
    rolling.store(true, Relaxed);
    let t_roll = Instant::now();
    let mut new_sims = Children(Vec::new());
    let ips_old = ["127.0.0.2", "127.0.0.3", "127.0.0.4"].map(|ip| format!("{ip}:{}", p.http));
    let sim_running = |pod: &str| -> f64 {
        let text = agent().get(&format!("http://{pod}/metrics")).call().ok().and_then(|r| r.into_string().ok());
        text.unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("vllm:num_requests_running"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    let mut in_flight_at_term = Vec::new();
    for (i, ip) in ["127.0.0.5", "127.0.0.6", "127.0.0.7"].iter().enumerate() {
        new_sims.0.push(pod_sim(ip, p, SLOW));
        add_pod(&kube, p, &format!("new{i}"), ip, &[("app", "vllm")]);
        wait_for(Duration::from_secs(5), "the new pod routed to", || ready(rp).1.contains("\"backends\":4"));
        // Kubernetes deletes the old pod and its kubelet sends SIGTERM at the same time.
        let (name, mut old) = sims.remove(0);
        in_flight_at_term.push(sim_running(&ips_old[i]));
        kube.delete_pod(NS, &name);
        common_signal(old.id(), &std::env::var("ROLL_SIGNAL").unwrap_or("-TERM".into()));
        let status = old.wait().unwrap();
        assert!(status.success(), "the old sim drained and exited 0: {status:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let roll = t_roll.elapsed();
    rolling.store(false, Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Relaxed);
    load.into_iter().for_each(|h| h.join().unwrap());
    let (steady, during) = ttfts.p99();
    eprintln!(
        "rolling restart of 3 pods (streams in flight at each SIGTERM: {:?}) in {roll:?}: {} requests ok, {} failed; TTFT p99 steady {steady:?}, during {during:?}",
        in_flight_at_term,
        ok.load(Relaxed),
        failed.load(Relaxed)
    );
    assert!(ok.load(Relaxed) > 30, "load flowed");
    assert!(in_flight_at_term.iter().any(|&n| n >= 1.0), "streams were in flight at SIGTERM: {in_flight_at_term:?}");
    assert_eq!(failed.load(Relaxed), 0, "no client request failed during the rolling restart");
}

fn common_signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// TTFT samples split by phase (steady, rolling).
mod samples {
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Default)]
    pub struct Samples(Mutex<(Vec<Duration>, Vec<Duration>)>);

    impl Samples {
        pub fn push(&self, rolling: bool, d: Duration) {
            let mut g = self.0.lock().unwrap();
            if rolling {
                g.1.push(d)
            } else {
                g.0.push(d)
            }
        }

        pub fn p99(&self) -> (Duration, Duration) {
            let g = self.0.lock().unwrap();
            let p = |v: &Vec<Duration>| {
                let mut v = v.clone();
                v.sort();
                v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1))).copied().unwrap_or_default()
            };
            (p(&g.0), p(&g.1))
        }
    }
}

/// Bind mode with discovery, on a legacy `inference.networking.x-k8s.io/v1alpha2` pool:
/// the pods connect to kvroute's SUB socket. Events a pod sends before discovery has seen
/// it are held and applied when it joins; those of a pod that never joins expire and are
/// counted.
#[test]
fn bind_mode_holds_events_of_pods_not_yet_discovered() {
    let kube = Kube::start();
    kube.install_crds();
    let [http, zp, rp] = free_ports(3)[..] else { unreachable!() };
    let connecting_sim = |ip: &str| {
        let kv = json!({"enable_kv_cache_events": true, "publisher": "zmq",
            "endpoint": format!("tcp://127.0.0.1:{zp}"), "topic": format!("kv@{ip}:{http}@m")});
        common::sim_at(ip, http, 16, &kv, &[])
    };
    let cfg = std::env::temp_dir().join(format!("kvroute-k8s-hold-{rp}.yaml"));
    std::fs::write(&cfg, "ingest:\n  hold_unknown_ms: 3000\n").unwrap();
    let router = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["serve", "--listen", &format!("127.0.0.1:{rp}"), "--kubeconfig", &kube.kubeconfig().to_string_lossy()])
        .args(["--pool-namespace", NS, "--pool-name", "vllm", "--zmq-bind", &format!("tcp://127.0.0.1:{zp}")])
        .args(["--pool-group", "inference.networking.x-k8s.io"])
        .args(["--config", &cfg.to_string_lossy(), "--block-size", "16", "--hash-algo", "sha256_cbor"])
        .args(["--hash-seed", "42", "--health-interval-ms", "100"])
        .args(common::admin_args(rp))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut kids = Children(vec![router]);
    common::wait_healthy(&format!("http://127.0.0.1:{rp}"));
    kube.apply(&format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferencePool\nmetadata:\n  name: vllm\n  \
         namespace: {NS}\nspec:\n  selector:\n    app: vllm\n  targetPortNumber: {http}\n  extensionRef:\n    \
         name: kvroute-epp\n"
    ));
    kids.0.push(connecting_sim("127.0.0.2"));
    kids.0.push(connecting_sim("127.0.0.3"));
    std::thread::sleep(Duration::from_millis(500)); // the publishers connect
                                                    // Both pods serve a prompt before either is in the pool: their events are held.
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let r = agent()
            .post(&format!("http://{ip}:{http}/v1/completions"))
            .send_json(json!({"model": "m", "prompt": words(ip, 64), "max_tokens": 2}));
        assert!(r.is_ok());
    }
    wait_for(Duration::from_secs(3), "both pods' events held", || {
        metric(rp, "kvroute_ingest_held_messages_total") >= 2.0
    });
    assert_eq!(blocks(rp, &format!("127.0.0.2:{http}")), 0);
    // One pod joins: its held events are applied without any new event.
    kube.create_pod(NS, "a", &[("app", "vllm")], &[]);
    kube.set_pod_status(NS, "a", Some("127.0.0.2"), true);
    let t = wait_for(Duration::from_secs(3), "the joined pod's held blocks", || {
        blocks(rp, &format!("127.0.0.2:{http}")) > 0
    });
    eprintln!("pod joined → its held events in the index: {t:?}");
    assert!(metric(rp, "kvroute_ingest_held_released_total") >= 1.0);
    // The other never joins: its held events expire, counted, and never reach the index.
    wait_for(Duration::from_secs(6), "the other pod's held events expired", || {
        metric(rp, "kvroute_ingest_held_expired_total") >= 1.0
    });
    assert_eq!(blocks(rp, &format!("127.0.0.3:{http}")), 0);
}

/// Selector mode (no InferencePool, llm-d's `--endpoint-selector`): pods found by label,
/// and a pod's `llm-d.ai/role` label drives the decode filter of an llm-d scheduler
/// config — relabelling a pod moves it between roles at once.
#[test]
fn selector_mode_and_role_labels_drive_the_filters() {
    let kube = Kube::start();
    let p = ports();
    let rp = free_ports(1)[0];
    let epp = std::env::temp_dir().join(format!("kvroute-k8s-epp-{rp}.yaml"));
    std::fs::write(
        &epp,
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: single-profile-handler\n\
         - type: decode-filter\n- type: queue-scorer\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n  \
         plugins:\n  - pluginRef: decode-filter\n  - pluginRef: queue-scorer\n    weight: 1\n  - pluginRef: max-score-picker\n",
    )
    .unwrap();
    let mut kids = Children(vec![pod_sim("127.0.0.2", p, &[]), pod_sim("127.0.0.3", p, &[])]);
    add_pod(&kube, p, "d", "127.0.0.2", &[("app", "vllm"), ("llm-d.ai/role", "decode")]);
    add_pod(&kube, p, "p", "127.0.0.3", &[("app", "vllm"), ("llm-d.ai/role", "prefill")]);
    let port = p.http.to_string();
    let sel = ["--endpoint-selector", "app=vllm", "--endpoint-target-ports", &port, "--scheduler-config"];
    let mut args: Vec<&str> = sel.to_vec();
    let epp_path = epp.to_string_lossy().to_string();
    args.push(&epp_path);
    kids.0.push(router(kube.kubeconfig(), rp, p, &args));
    wait_for(Duration::from_secs(10), "ready", || ready(rp).0 == 200);
    wait_for(Duration::from_secs(3), "both pods discovered", || ready(rp).1.contains("\"backends\":2"));
    let s = served_by(rp, "role", 10);
    assert!(s.len() == 10 && s.iter().all(|x| x.starts_with("127.0.0.2")), "only the decode pod: {s:?}");
    // The prefill pod becomes a decode pod, the decode pod a prefill pod.
    kube.label_pod(NS, "p", &[("llm-d.ai/role", Some("decode"))]);
    kube.label_pod(NS, "d", &[("llm-d.ai/role", Some("prefill"))]);
    wait_for(Duration::from_secs(2), "the roles swapped", || {
        let s = served_by(rp, "swapped", 6);
        s.len() == 6 && s.iter().all(|x| x.starts_with("127.0.0.3"))
    });
}

/// The API server unreachable when kvroute starts: alive, not ready (and saying why), then
/// ready once the server answers and the pool is listed.
#[test]
fn an_unreachable_apiserver_at_start_means_not_ready_until_it_answers() {
    let mut kube = Kube::start();
    kube.install_crds();
    let p = ports();
    let rp = free_ports(1)[0];
    let mut kids = Children(vec![pod_sim("127.0.0.2", p, &[])]);
    kube.apply(&pool_yaml("vllm", &[("app", "vllm")], p.http));
    add_pod(&kube, p, "a", "127.0.0.2", &[("app", "vllm")]);
    kube.stop_apiserver();
    kids.0.push(router(kube.kubeconfig(), rp, p, &["--pool-name", "vllm"]));
    std::thread::sleep(Duration::from_secs(2));
    let (code, body) = ready(rp);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("discovery has not listed the fleet yet"), "{body}");
    assert!(metric(rp, "kvroute_discovery_errors_total") >= 1.0);
    kube.start_apiserver();
    let t = wait_for(Duration::from_secs(30), "ready once the API server answers", || ready(rp).0 == 200);
    eprintln!("apiserver up → router ready: {t:?}");
    let s = served_by(rp, "late", 4);
    assert!(s.len() == 4 && s.iter().all(|x| x.starts_with("127.0.0.2")), "{s:?}");
}

/// Two replicas on one real Redis index, both discovering the pool: a pod's blocks reach
/// the shared index, and when the pod is deleted they leave it (checked in Redis itself).
#[test]
fn a_departed_pods_entries_leave_the_shared_redis_index() {
    let kube = Kube::start();
    kube.install_crds();
    let p = ports();
    let [rp1, rp2, redis_port] = free_ports(3)[..] else { unreachable!() };
    let mut kids = Children(vec![kvroute_index_conformance::redis_server(redis_port)]);
    kids.0.push(pod_sim("127.0.0.2", p, &[]));
    kube.apply(&pool_yaml("vllm", &[("app", "vllm")], p.http));
    add_pod(&kube, p, "a", "127.0.0.2", &[("app", "vllm")]);
    let url = format!("redis://127.0.0.1:{redis_port}");
    let shared = ["--pool-name", "vllm", "--index-backend", "redis", "--redis-url", url.as_str()];
    kids.0.push(router(kube.kubeconfig(), rp1, p, &shared));
    kids.0.push(router(kube.kubeconfig(), rp2, p, &shared));
    let pod = format!("127.0.0.2:{}", p.http);
    let in_redis = || -> i64 {
        let out = Command::new("redis-cli")
            .args(["-p", &redis_port.to_string(), "HGET", "kvr:counts", &pod])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    };
    wait_for(Duration::from_secs(10), "both replicas ready", || ready(rp1).0 == 200 && ready(rp2).0 == 200);
    // Requests right after readiness: the events they cause must not be lost to the
    // subscription still being set up (the join replay runs once the publisher's
    // connection is up).
    for i in 0..4 {
        assert_eq!(complete(rp1, &words(&format!("redis{i}"), 60)).0, 200);
    }
    wait_for(Duration::from_secs(5), "the pod's blocks in Redis", || in_redis() > 0);
    kube.delete_pod(NS, "a");
    let t = wait_for(Duration::from_secs(5), "the pod's blocks gone from Redis", || in_redis() == 0);
    eprintln!("pod deleted → its entries out of the shared Redis index: {t:?}");
}
