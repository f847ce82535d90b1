//! Black-box tests of the gateway's upstream side (issue #14): timeouts against a stopped
//! (SIGSTOP) or stalling `kvroute sim`, redirects never followed, readiness, a returning
//! pod's index cleared, OpenAI-style errors, and the simulator's vLLM-like validation.
//! Real `kvroute serve` / `kvroute sim` child processes, real sockets, loopback only.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{free_ports, wait_for, words, Children};
use serde_json::{json, Value};

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build()
}

/// POST JSON: (status, body text, `x-kvroute-pod`, `retry-after`).
fn post(url: &str, body: &Value) -> (u16, String, Option<String>, Option<String>) {
    let r = match agent().post(url).send_json(body.clone()) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let (pod, retry) = (r.header("x-kvroute-pod").map(str::to_string), r.header("retry-after").map(str::to_string));
    (r.status(), r.into_string().unwrap_or_default(), pod, retry)
}

fn get(url: &str) -> (u16, String, Option<String>) {
    let r = match agent().get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let retry = r.header("retry-after").map(str::to_string);
    (r.status(), r.into_string().unwrap_or_default(), retry)
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

/// A router's metric (on its admin port), summed over the series with all `labels`.
fn metric(router: u16, name: &str, labels: &[&str]) -> f64 {
    let text = get(&format!("http://127.0.0.1:{}/metrics", common::admin_port(router))).1;
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sims on their ports (started first, so the router's first probe finds them), then the
/// router; waits until the router knows the sims' models.
fn fleet(sims: &[(u16, &[&str])], serve_extra: &[&str]) -> (u16, Children) {
    let (rp, _, kids) = fleet_z(sims, serve_extra);
    (rp, kids)
}

/// [`fleet`], also returning the router's bound KV-event port (`zp + 1` free too: a
/// second data-parallel rank binds it).
fn fleet_z(sims: &[(u16, &[&str])], serve_extra: &[&str]) -> (u16, u16, Children) {
    let (rp, zp) = (free_ports(1)[0], common::free_port_pair());
    // Children as they start: a start that fails (panics) still stops the earlier ones.
    let mut kids = Children(Vec::new());
    for (p, extra) in sims {
        kids.0.push(common::sim(*p, zp, extra));
    }
    let backends: Vec<u16> = sims.iter().map(|s| s.0).collect();
    kids.0.push(common::serve(rp, zp, &backends, serve_extra));
    wait_for(Duration::from_secs(5), "the router's model list", || {
        get(&format!("http://127.0.0.1:{rp}/v1/models")).1.contains("\"m\"")
    });
    // The sims' KV-event publishers (re)connect and subscribe.
    std::thread::sleep(Duration::from_millis(500));
    (rp, zp, kids)
}

fn healthy_backends(router: u16) -> i64 {
    let (code, body, _) = get(&format!("http://127.0.0.1:{router}/ready"));
    if code == 503 {
        return 0;
    }
    serde_json::from_str::<Value>(&body).ok().and_then(|v| v["healthy_backends"].as_i64()).unwrap_or(-1)
}

#[test]
fn a_stopped_pod_fails_over_within_the_first_byte_timeout_then_504_and_health_takes_it_out() {
    let ports = free_ports(2);
    let (rp, kids) = fleet(
        &[(ports[0], &[]), (ports[1], &[])],
        &["--upstream-first-byte-timeout-ms", "1000", "--upstream-timeout-ms", "4000"],
    );
    let url = format!("http://127.0.0.1:{rp}/v1/completions");
    let prompt = words("stopme", 200);
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 2});
    let (code, text, pod, _) = post(&url, &body);
    assert_eq!(code, 200, "{text}");
    let victim = pod.unwrap();
    let (vi, other) = if victim.ends_with(&format!(":{}", ports[0])) { (0, 1) } else { (1, 0) };
    std::thread::sleep(Duration::from_millis(300)); // the sim's events reach the index
    signal(kids.0[vi].id(), "-STOP");

    // The same prompt goes to the stopped pod (its prefix is there): no first byte within
    // 1 s, so the other pod answers it.
    let t = Instant::now();
    let (code, text, pod, _) = post(&url, &body);
    let took = t.elapsed();
    assert_eq!(code, 200, "{text}");
    assert_eq!(pod.as_deref(), Some(format!("127.0.0.1:{}", ports[other]).as_str()));
    eprintln!("failover past a stopped pod (first byte 1 s): {took:?}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "failover took {took:?}");
    assert!(metric(rp, "kvroute_upstream_timeouts_total", &[&victim, "first_byte"]) >= 1.0);
    assert!(metric(rp, "kvroute_upstream_retries_total", &[]) >= 1.0);

    // Health takes it out; then requests go straight to the other pod.
    wait_for(Duration::from_secs(5), "the stopped pod out of rotation", || healthy_backends(rp) == 1);
    let t = Instant::now();
    let (code, _, pod, _) = post(&url, &body);
    assert_eq!((code, pod.as_deref()), (200, Some(format!("127.0.0.1:{}", ports[other]).as_str())));
    assert!(t.elapsed() < Duration::from_millis(800), "{:?}", t.elapsed());

    // The last pod stops too: 504 within the first-byte timeout, no URL in the message.
    signal(kids.0[other].id(), "-STOP");
    let t = Instant::now();
    let (code, text, _, _) = post(&url, &json!({"model": "m", "prompt": "a new one", "max_tokens": 2}));
    assert_eq!(code, 504, "{text}");
    eprintln!("504 with every pod stopped: {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["error"]["code"], 504);
    assert!(!text.contains("http://"), "internal URL in {text}");

    // Nothing usable: not ready (503 + Retry-After), but alive. Requests are still tried
    // on the model's pods (panic mode) and time out: 504.
    wait_for(Duration::from_secs(5), "no pod in rotation", || healthy_backends(rp) == 0);
    let (code, text, retry) = get(&format!("http://127.0.0.1:{rp}/ready"));
    assert_eq!((code, retry.as_deref()), (503, Some("1")), "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["code"], 503);
    assert_eq!(get(&format!("http://127.0.0.1:{rp}/health")).0, 200);
    let (code, text, _, _) = post(&url, &body);
    assert_eq!(code, 504, "{text}");
    assert!(metric(rp, "kvroute_router_panic_routes_total", &[]) >= 1.0);
    for k in &kids.0[..2] {
        signal(k.id(), "-CONT");
    }
}

#[test]
fn a_request_waiting_on_a_pod_that_health_takes_out_moves_to_another_pod_at_once() {
    // Default timeouts (first byte: 120 s); probes every 100 ms with a 1 s timeout.
    let ports = free_ports(2);
    let (rp, kids) = fleet(&[(ports[0], &[]), (ports[1], &[])], &[]);
    let url = format!("http://127.0.0.1:{rp}/v1/completions");
    let body = json!({"model": "m", "prompt": words("probeout", 200), "max_tokens": 2});
    let (code, text, pod, _) = post(&url, &body);
    assert_eq!(code, 200, "{text}");
    let vi = if pod.unwrap().ends_with(&format!(":{}", ports[0])) { 0 } else { 1 };
    std::thread::sleep(Duration::from_millis(300));
    signal(kids.0[vi].id(), "-STOP");
    let t = Instant::now();
    let (code, text, pod, _) = post(&url, &body);
    let took = t.elapsed();
    signal(kids.0[vi].id(), "-CONT");
    assert_eq!(code, 200, "{text}");
    assert_eq!(pod.as_deref(), Some(format!("127.0.0.1:{}", ports[1 - vi]).as_str()));
    eprintln!("request moved off a pod health took out (default timeouts): {took:?}");
    // Two failed probes (1 s each) and the request moves; far below the 120 s timeout.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(metric(rp, "kvroute_upstream_errors_total", &["taken_out"]) >= 1.0);
}

#[test]
fn a_stream_that_stalls_after_its_first_chunk_ends_with_an_sse_error_event() {
    let sim = free_ports(1)[0];
    let (rp, _kids) = fleet(&[(sim, &["--stall-after-tokens", "1"])], &["--upstream-idle-timeout-ms", "700"]);
    let t = Instant::now();
    let r = agent()
        .post(&format!("http://127.0.0.1:{rp}/v1/completions"))
        .send_json(json!({"model": "m", "prompt": "stall", "max_tokens": 8, "stream": true}))
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.into_string().unwrap();
    let took = t.elapsed();
    eprintln!("stalled stream ended (idle 700 ms): {took:?}");
    assert!(took < Duration::from_secs(3), "the stream ended after {took:?}");
    let events: Vec<&str> = text.split("\n\n").map(str::trim).filter(|e| !e.is_empty()).collect();
    assert!(events.len() >= 2, "{text}");
    assert!(events[0].starts_with("data: {") && events[0].contains("\"choices\""), "{text}");
    let last: Value = serde_json::from_str(events.last().unwrap().trim_start_matches("data: ")).unwrap();
    assert_eq!(last["error"]["code"], 504, "{text}");
    assert!(last["error"]["message"].as_str().unwrap().contains("700 ms"), "{last}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(metric(rp, "kvroute_upstream_timeouts_total", &["idle"]) >= 1.0);
}

#[test]
fn a_pod_that_dies_mid_stream_ends_the_stream_with_an_sse_error_event() {
    use std::io::BufRead;
    let sim = free_ports(1)[0];
    let (rp, mut kids) = fleet(&[(sim, &["--stall-after-tokens", "1"])], &[]);
    let r = agent()
        .post(&format!("http://127.0.0.1:{rp}/v1/completions"))
        .send_json(json!({"model": "m", "prompt": "die", "max_tokens": 8, "stream": true}))
        .unwrap();
    let mut lines = std::io::BufReader::new(r.into_reader()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("data: {") && first.contains("\"choices\""), "{first}");
    let t = Instant::now();
    kids.0[0].kill().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).filter(|l| !l.is_empty()).collect();
    eprintln!("stream ended after the pod died: {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let last: Value = serde_json::from_str(rest.last().unwrap().trim_start_matches("data: ")).unwrap();
    assert_eq!((last["error"]["code"].as_u64(), last["error"]["type"].as_str()), (Some(502), Some("BadGatewayError")));
    assert!(!rest.iter().any(|l| l.contains("[DONE]")), "{rest:?}");
    assert!(metric(rp, "kvroute_upstream_errors_total", &["body"]) >= 1.0);
}

/// A backend that answers `/health` and every other request with a 307 to `target`.
fn redirecting_backend(target: u16) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let resp = if head.starts_with("GET /health") {
                    "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                } else {
                    format!(
                        "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{target}/v1/completions\r\n\
                         content-length: 0\r\nconnection: close\r\n\r\n"
                    )
                };
                let _ = s.write_all(resp.as_bytes());
            });
        }
    });
    port
}

#[test]
fn a_redirecting_backend_gets_no_prompt_sent_elsewhere_and_the_client_a_502() {
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let backend = redirecting_backend(target.local_addr().unwrap().port());
    let ports = free_ports(2);
    let _serve = Children(vec![common::serve(ports[0], ports[1], &[backend], &[])]);
    let (code, text, _, _) = post(
        &format!("http://127.0.0.1:{}/v1/completions", ports[0]),
        &json!({"model": "m", "prompt": "secret prompt", "max_tokens": 2}),
    );
    assert_eq!(code, 502, "{text}");
    let e: Value = serde_json::from_str(&text).unwrap();
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("redirect") && !msg.contains("http://"), "{msg}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(target.accept().is_err(), "the gateway connected to the redirect target");
    assert!(metric(ports[0], "kvroute_upstream_errors_total", &["redirect"]) >= 1.0);
}

fn pod_blocks(router: u16, pod: &str) -> u64 {
    let v: Value =
        serde_json::from_str(&get(&format!("http://127.0.0.1:{}/v1/kv/pods", common::admin_port(router))).1).unwrap();
    let list = v.as_array().cloned().or_else(|| v["pods"].as_array().cloned()).unwrap_or_default();
    list.iter().find(|p| p["pod"] == pod).and_then(|p| p["blocks"].as_u64()).unwrap_or(0)
}

#[test]
fn readiness_waits_for_a_backend_that_passed_a_probe_and_liveness_does_not() {
    let p = free_ports(3);
    let (rp, zp, sim) = (p[0], p[1], p[2]);
    // (common::serve probes every 100 ms; here every 1.5 s, so the first probe's failure
    // is all there is when readiness is asked.)
    let serve = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["serve", "--listen", &format!("127.0.0.1:{rp}"), "--zmq-bind", &format!("tcp://127.0.0.1:{zp}")])
        .args(["--backend", &format!("http://127.0.0.1:{sim}"), "--health-interval-ms", "1500"])
        .args(common::admin_args(rp))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut kids = Children(vec![serve]);
    common::wait_healthy(&format!("http://127.0.0.1:{rp}"));
    std::thread::sleep(Duration::from_millis(200)); // the first probe has failed
                                                    // The backend is not up yet: alive, not ready.
    assert_eq!(get(&format!("http://127.0.0.1:{rp}/health")).0, 200);
    let (code, text, retry) = get(&format!("http://127.0.0.1:{rp}/ready"));
    assert_eq!((code, retry.as_deref()), (503, Some("1")), "{text}");
    kids.0.push(common::sim(sim, zp, &[]));
    wait_for(Duration::from_secs(4), "ready once a probe passes", || healthy_backends(rp) == 1);
}

#[test]
fn a_pod_that_comes_back_without_events_while_down_loses_its_index_entries() {
    let sim = free_ports(1)[0];
    let (rp, kids) = fleet(&[(sim, &[])], &[]);
    let pod = format!("127.0.0.1:{sim}");
    let (code, text, _, _) = post(
        &format!("http://127.0.0.1:{rp}/v1/completions"),
        &json!({"model": "m", "prompt": words("restart", 100), "max_tokens": 2}),
    );
    assert_eq!(code, 200, "{text}");
    wait_for(Duration::from_secs(5), "the pod's blocks in the index", || pod_blocks(rp, &pod) > 0);
    signal(kids.0[0].id(), "-STOP");
    wait_for(Duration::from_secs(6), "the pod out of rotation", || healthy_backends(rp) == 0);
    signal(kids.0[0].id(), "-CONT");
    wait_for(Duration::from_secs(5), "the pod back", || healthy_backends(rp) == 1);
    wait_for(Duration::from_secs(2), "its entries cleared", || pod_blocks(rp, &pod) == 0);
    assert_eq!(metric(rp, "kvroute_router_pod_recovery_clears_total", &[&pod]), 1.0);
}

/// The pod's other data-parallel ranks (`<pod>#dp1`) restart with it: they are cleared
/// with it when it comes back without proof of continuity.
#[test]
fn a_returning_pods_data_parallel_ranks_are_cleared_with_it() {
    use kvroute_events::{encode_batch, BlockStored, EventBatch, KvEvent, WireFormat};
    let sim = free_ports(1)[0];
    let (rp, zp, kids) = fleet_z(&[(sim, &[])], &["--data-parallel-size", "2"]);
    let pod = format!("127.0.0.1:{sim}");
    let rank1 = format!("{pod}#dp1");
    // Rank 1's events, published under the pod's topic as vLLM's rank-1 publisher does.
    let ctx = zmq::Context::new();
    let publisher = ctx.socket(zmq::PUB).unwrap();
    publisher.set_linger(0).unwrap();
    publisher.connect(&format!("tcp://127.0.0.1:{zp}")).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let ev = KvEvent::BlockStored(BlockStored {
        block_hashes: vec![11, 12, 13],
        token_ids: (0..48).collect(),
        block_size: 16,
        ..Default::default()
    });
    let batch = EventBatch { ts: 0.0, events: vec![ev], data_parallel_rank: Some(1), unknown_events: 0 };
    let payload = encode_batch(&batch, WireFormat::Map);
    let topic = format!("kv@{pod}@m");
    publisher.send_multipart([topic.as_bytes(), &0u64.to_be_bytes()[..], &payload[..]], 0).unwrap();
    wait_for(Duration::from_secs(5), "rank 1's blocks in the index", || pod_blocks(rp, &rank1) == 3);
    signal(kids.0[0].id(), "-STOP");
    wait_for(Duration::from_secs(6), "the pod out of rotation", || healthy_backends(rp) == 0);
    signal(kids.0[0].id(), "-CONT");
    wait_for(Duration::from_secs(5), "the pod back", || healthy_backends(rp) == 1);
    wait_for(Duration::from_secs(2), "rank 1's entries cleared too", || pod_blocks(rp, &rank1) == 0);
}

#[test]
fn gateway_errors_are_openai_json_unknown_models_404_batches_route_and_big_bodies_413() {
    let sim = free_ports(1)[0];
    let (rp, _kids) = fleet(&[(sim, &[])], &[]);
    let base = format!("http://127.0.0.1:{rp}");
    // vLLM's 404 for a model nobody serves.
    let (code, text, _, _) = post(&format!("{base}/v1/completions"), &json!({"model": "x", "prompt": "hi"}));
    assert_eq!(code, 404, "{text}");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e, json!({"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}}));
    assert_eq!(post(&format!("{base}/tokenize"), &json!({"model": "x", "prompt": "hi"})).0, 404);
    // Batches are routed by their first prompt (strings or token-id arrays).
    for prompt in [json!(["first prompt", "second"]), json!([[1, 2, 3], [4, 5]])] {
        let (code, text, pod, _) =
            post(&format!("{base}/v1/completions"), &json!({"model": "m", "prompt": prompt, "max_tokens": 1}));
        assert_eq!((code, pod.is_some()), (200, true), "{text}");
        // The sim answers a batch as vLLM does: one choice per prompt.
        let v: Value = serde_json::from_str(&text).unwrap();
        let idx: Vec<_> = v["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64()).collect();
        assert_eq!(idx, [Some(0), Some(1)], "{text}");
        assert_eq!(v["usage"]["completion_tokens"], 2, "{text}");
        let explain = format!("{}/v1/route/explain", common::admin(&base));
        let (code, text, _, _) = post(&explain, &json!({"model": "m", "prompt": prompt}));
        assert_eq!(code, 200, "{text}");
    }
    // 400s of the gateway carry a type.
    let (code, text, _, _) = post(&format!("{base}/v1/completions"), &json!({"model": "m", "prompt": []}));
    assert_eq!(code, 400, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["type"], "BadRequestError");
    // A body over the limit: 413 as JSON.
    let mut s = TcpStream::connect(("127.0.0.1", rp)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let len = 33 << 20;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let block = vec![b' '; 1 << 20];
        for _ in 0..33 {
            if w.write_all(&block).is_err() {
                return;
            }
        }
    });
    let mut resp = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        resp.extend_from_slice(&chunk[..n]);
        if resp.windows(4).any(|w| w == b"\r\n\r\n") && resp.ends_with(b"}}") {
            break;
        }
    }
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    let e: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {resp}"));
    assert_eq!(e["error"]["code"], 413);
}

#[test]
fn the_sim_rejects_invalid_sampling_parameters_as_vllm_does() {
    let p = free_ports(2);
    let _sim = Children(vec![common::sim(p[0], p[1], &["--max-model-len", "1000"])]);
    let url = format!("http://127.0.0.1:{}/v1/completions", p[0]);
    let cases = [
        (json!({"max_tokens": -1}), "max_tokens", "max_tokens must be at least 1, got -1."),
        (json!({"max_tokens": 0}), "max_tokens", "max_tokens must be at least 1, got 0."),
        (json!({"max_tokens": 5000}), "max_tokens", "'max_tokens' or 'max_completion_tokens' is too large: 5000."),
        (json!({"max_tokens": "sixteen"}), "max_tokens", "unable to parse string as an integer"),
        (json!({"max_tokens": 1.5}), "max_tokens", "got a number with a fractional part"),
        (json!({"temperature": -0.5}), "temperature", "temperature must be non-negative, got -0.5."),
        (json!({"top_p": 0}), "top_p", "top_p must be in (0, 1], got 0.0."),
        (json!({"top_p": 1.5}), "top_p", "top_p must be in (0, 1], got 1.5."),
        (json!({"n": 0}), "n", "n must be at least 1, got 0."),
    ];
    for (extra, param, msg) in cases {
        let mut body = json!({"model": "m", "prompt": "hello there"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (code, text, _, _) = post(&url, &body);
        assert_eq!(code, 400, "{body}: {text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (&e["error"]["type"], &e["error"]["param"], &e["error"]["code"]),
            (&json!("BadRequestError"), &json!(param), &json!(400)),
            "{text}"
        );
        assert!(e["error"]["message"].as_str().unwrap().contains(msg), "{body}: {text}");
    }
    // As pydantic reads them: a numeric string and a whole float are integers.
    for mt in [json!("3"), json!(3.0)] {
        let (code, text, _, _) = post(&url, &json!({"model": "m", "prompt": "hi", "max_tokens": mt}));
        assert_eq!(code, 200, "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["usage"]["completion_tokens"], 3);
    }
}

/// Panic mode: when no pod of the model is in rotation (a saturated fleet fails its health
/// probes while still serving), requests are tried on every pod of the model instead of
/// all being refused with 503. Here the only pod is taken out by two timed-out requests and
/// probes are too rare to bring it back; it serves again, so the next request succeeds.
#[test]
fn with_no_pod_in_rotation_requests_are_still_tried_on_the_models_pods() {
    let ports = free_ports(3);
    let (sim, rp, zp) = (ports[0], ports[1], ports[2]);
    let mut kids = Children(vec![common::sim(sim, zp, &[])]);
    // Probes every minute: the pod stays out once requests took it out.
    let serve = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["serve", "--listen", &format!("127.0.0.1:{rp}"), "--zmq-bind", &format!("tcp://127.0.0.1:{zp}")])
        .args(["--backend", &format!("http://127.0.0.1:{sim}"), "--health-interval-ms", "60000"])
        .args(["--upstream-first-byte-timeout-ms", "300"])
        .args(common::admin_args(rp))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kids.0.push(serve);
    common::wait_healthy(&format!("http://127.0.0.1:{rp}"));
    wait_for(Duration::from_secs(5), "the first probe", || healthy_backends(rp) == 1);
    let ports = [sim];
    let url = format!("http://127.0.0.1:{rp}/v1/completions");
    // Two requests time out on the paused pod: that takes it out of rotation; then it
    // resumes (and serves), but no probe brings it back for a minute.
    signal(kids.0[0].id(), "-STOP");
    for _ in 0..2 {
        let (code, text, _, _) = post(&url, &json!({"model": "m", "prompt": "paused", "max_tokens": 1}));
        assert_eq!(code, 504, "{text}");
    }
    signal(kids.0[0].id(), "-CONT");
    wait_for(Duration::from_secs(3), "the pod out of rotation", || healthy_backends(rp) == 0);
    let (code, text, pod, _) = post(&url, &json!({"model": "m", "prompt": "still served", "max_tokens": 2}));
    assert_eq!(code, 200, "{text}");
    assert_eq!(pod.as_deref(), Some(format!("127.0.0.1:{}", ports[0]).as_str()));
    assert!(metric(rp, "kvroute_router_panic_routes_total", &[]) >= 1.0);
}
