//! Hit attribution, black box: three sims behind `kvroute serve`, and a workload whose
//! misses are known by construction — new prompts (the workload's), a prompt cached on a
//! pod kept busy so the router sends it elsewhere (routing), a prompt whose pod restarted
//! without telling the router (stale index) — and the counters must say exactly that.
//! Streams a client did not ask usage for come through without the usage chunk the
//! gateway asked the engine for, byte for byte as the engine sends them without it.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Reply {
    status: u16,
    body: String,
    pod: String,
    request_id: Option<String>,
}

fn post(url: &str, body: &Value, request_id: Option<&str>) -> Reply {
    let mut req = ureq::post(url).timeout(Duration::from_secs(60));
    if let Some(id) = request_id {
        req = req.set("x-request-id", id);
    }
    let r = match req.send_json(body.clone()) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let pod = r.header("x-kvroute-pod").unwrap_or_default().to_string();
    let request_id = r.header("x-request-id").map(str::to_string);
    Reply { status: r.status(), pod, request_id, body: r.into_string().unwrap_or_default() }
}

fn get_json(url: &str) -> Value {
    ureq::get(url).call().unwrap().into_json().unwrap()
}

fn outcome(rp: u16, name: &str) -> f64 {
    metric_with(rp, "kvroute_cache_attribution_total", &format!("outcome=\"{name}\""))
}

fn metric_with(rp: u16, name: &str, label: &str) -> f64 {
    let text =
        ureq::get(&format!("http://127.0.0.1:{}/metrics", admin_port(rp))).call().unwrap().into_string().unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the router would pick for `body` now (dry run on the admin port).
fn pick(rp: u16, body: &Value) -> String {
    let base = format!("http://127.0.0.1:{rp}");
    let v: Value =
        ureq::post(&format!("{}/v1/route/explain", admin(&base))).send_json(body.clone()).unwrap().into_json().unwrap();
    v["pick"].as_str().unwrap_or_default().to_string()
}

fn completion(tag: &str) -> Value {
    json!({"model": "m", "prompt": words(tag, 90), "max_tokens": 2})
}

/// The most tokens vLLM can report cached for a prompt of `n` tokens (block 16).
fn cap(n: u64) -> u64 {
    (n - 1) / 16 * 16
}

fn prompt_tokens(r: &Reply) -> u64 {
    let v: Value = serde_json::from_str(&r.body).unwrap();
    v["usage"]["prompt_tokens"].as_u64().unwrap()
}

#[test]
fn misses_are_attributed_to_the_workload_the_routing_or_a_stale_index_exactly() {
    let ports = free_ports(5);
    let (rp, zp, sims) = (ports[0], ports[1], &ports[2..]);
    // One request at a time per sim, 10× faster than model time: a handful of long
    // requests sent straight to one sim keeps it busy for seconds.
    let slow = ["--speedup", "10", "--max-num-seqs", "1"];
    let mut kids = Children(sims.iter().map(|p| sim(*p, zp, &slow)).collect());
    // Health probes (and scrapes) each second: a sim restarted in a fraction of one is
    // never seen down, so the router keeps its index entries.
    kids.0.push(serve(rp, zp, sims, &["--health-interval-ms", "1000"]));
    let base = format!("http://127.0.0.1:{rp}");
    let url = format!("{base}/v1/completions");
    let (mut workload_tokens, mut routing_tokens, mut stale_tokens) = (0, 0, 0);

    // 1. New prompts: nothing cached anywhere (the workload's misses).
    for tag in ["new-a", "new-b", "new-c"] {
        let r = post(&url, &completion(tag), None);
        assert_eq!(r.status, 200, "{}", r.body);
        workload_tokens += cap(prompt_tokens(&r));
        let id = r.request_id.clone().unwrap_or_default();
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "a generated request id comes back: {id}");
    }
    // 2. The same prompt twice: a miss, then a hit where the router predicted it.
    let h = completion("hot");
    let first = post(&url, &h, Some("client-id-1"));
    assert_eq!(first.request_id.as_deref(), Some("client-id-1"), "the client's request id is kept");
    workload_tokens += cap(prompt_tokens(&first));
    wait_for(Duration::from_secs(5), "the hot prompt's blocks in the index", || pick(rp, &h) == first.pod);
    let again = post(&url, &h, None);
    assert_eq!(again.pod, first.pod);

    // 3. A prompt cached on pod X, then X kept busy: the router sends it elsewhere.
    let a = completion("busy");
    let primed = post(&url, &a, None);
    workload_tokens += cap(prompt_tokens(&primed));
    let x = primed.pod.clone();
    wait_for(Duration::from_secs(5), "the prompt's blocks in the index", || pick(rp, &a) == x);
    let busy: Vec<_> = (0..6)
        .map(|i| {
            let url = format!("http://{x}/v1/completions");
            std::thread::spawn(move || {
                let body = json!({"model": "m", "prompt": words(&format!("filler{i}"), 20), "max_tokens": 1500});
                let _ = ureq::post(&url).timeout(Duration::from_secs(60)).send_json(body);
            })
        })
        .collect();
    wait_for(Duration::from_secs(15), "the router to prefer another pod for the busy pod's prompt", || {
        pick(rp, &a) != x
    });
    let moved = post(&url, &a, None);
    assert_ne!(moved.pod, x, "{}", moved.body);
    routing_tokens += cap(prompt_tokens(&moved));

    // 4. A prompt cached on pod Z, then Z restarted without KV events: the router still
    //    predicts it there and the engine finds nothing (a stale index).
    let c = completion("stale");
    let stored = post(&url, &c, None);
    workload_tokens += cap(prompt_tokens(&stored));
    let z = stored.pod.clone();
    wait_for(Duration::from_secs(5), "the stale prompt's blocks in the index", || pick(rp, &c) == z);
    let zport: u16 = z.rsplit(':').next().unwrap().parse().unwrap();
    let i = sims.iter().position(|p| *p == zport).unwrap();
    let _ = kids.0[i].kill();
    let _ = kids.0[i].wait();
    kids.0[i] = sim_at("127.0.0.1", zport, 16, &json!({"enable_kv_cache_events": false}), &slow);
    wait_for(Duration::from_secs(10), "the stale prompt still predicted on the restarted pod", || pick(rp, &c) == z);
    let gone = post(&url, &c, None);
    assert_eq!(gone.pod, z, "{}", gone.body);
    stale_tokens += cap(prompt_tokens(&gone));

    // Counters: exactly the construction (responses are counted when their body ends).
    let expect =
        [("no_prefix", 6.0), ("hit", 1.0), ("routed_elsewhere", 1.0), ("stale_index", 1.0), ("unreported", 0.0)];
    wait_for(Duration::from_secs(5), "every request attributed", || {
        expect.iter().map(|(o, _)| outcome(rp, o)).sum::<f64>() == 9.0
    });
    for (o, n) in expect {
        assert_eq!(outcome(rp, o), n, "outcome {o}");
    }
    let missed = |cause: &str| metric_with(rp, "kvroute_prefix_missed_tokens_total", &format!("cause=\"{cause}\""));
    assert_eq!(missed("workload"), workload_tokens as f64);
    assert_eq!(missed("routing"), routing_tokens as f64);
    assert_eq!(missed("stale"), stale_tokens as f64);
    let over = metric_with(rp, "kvroute_prefix_overpredicted_tokens_total", &format!("pod=\"{z}\""));
    assert_eq!(over, stale_tokens as f64, "the restarted pod's over-prediction");
    // The admin view: newest first, both numbers.
    let recent = get_json(&format!("{}/v1/route/recent?limit=3", admin(&base)));
    let d = &recent["decisions"];
    assert_eq!(d.as_array().unwrap().len(), 3);
    assert_eq!(d[0]["outcome"], "stale_index");
    assert_eq!(d[0]["pod"], z.as_str());
    assert!(d[0]["predicted_tokens"].as_u64().unwrap() >= stale_tokens, "{}", d[0]);
    assert_eq!(d[0]["cached_tokens"], 0);
    assert_eq!(d[1]["outcome"], "no_prefix");
    assert_eq!(d[2]["outcome"], "routed_elsewhere");
    assert_eq!(d[2]["best_pod"], x.as_str());
    assert_eq!(d[2]["missed_tokens"]["routing"], routing_tokens);
    drop(busy);
}

/// The server-sent events of `body` as text, with `"created"` (a clock) blanked.
fn normalized(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some(i) = rest.find("\"created\":") {
        out.push_str(&rest[..i + 10]);
        rest = rest[i + 10..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('0');
    }
    out + rest
}

#[test]
fn streaming_clients_see_exactly_the_engines_stream_and_usage_only_if_they_asked() {
    let ports = free_ports(3);
    let (rp, zp, s) = (ports[0], ports[1], ports[2]);
    let mut kids = Children(vec![sim(s, zp, &[])]);
    kids.0.push(serve(rp, zp, &[s], &[]));
    let via = format!("http://127.0.0.1:{rp}");
    let direct = format!("http://127.0.0.1:{s}");
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": words("chat", 40)}], "max_tokens": 5, "stream": true, "seed": 7}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": words("text", 40), "max_tokens": 5, "stream": true, "seed": 7,
                                   "stream_options": {"continuous_usage_stats": true}}),
        ),
    ] {
        let id = format!("same-id{}", path.len());
        let through = post(&format!("{via}{path}"), &body, Some(&id));
        assert_eq!(through.status, 200, "{}", through.body);
        assert!(!through.body.contains("\"usage\""), "no usage chunk the client did not ask for: {}", through.body);
        let engine = post(&format!("{direct}{path}"), &body, Some(&id));
        assert_eq!(normalized(&through.body), normalized(&engine.body), "{path}: the engine's own stream");
        assert!(through.body.ends_with("data: [DONE]\n\n"));
    }
    // Asked for: the usage chunk passes, and was read.
    let body = json!({"model": "m", "prompt": words("text", 40), "max_tokens": 5, "stream": true,
                      "stream_options": {"include_usage": true}});
    let r = post(&format!("{via}/v1/completions"), &body, None);
    assert!(r.body.contains("\"cached_tokens\""), "{}", r.body);
    wait_for(Duration::from_secs(5), "three requests attributed", || {
        ["hit", "no_prefix"].iter().map(|o| outcome(rp, o)).sum::<f64>() == 3.0
    });
    // The third repeats the second's prompt on the same pod: a hit the engine confirms.
    assert_eq!(outcome(rp, "hit"), 1.0);
    assert_eq!(outcome(rp, "unreported"), 0.0);
}

#[test]
fn json_logs_have_one_line_per_decision_with_its_request_id_pick_and_prediction() {
    let ports = free_ports(3);
    let (rp, zp, s) = (ports[0], ports[1], ports[2]);
    let mut kids = Children(vec![sim(s, zp, &[])]);
    let log = std::env::temp_dir().join(format!("kvroute-json-log-{}-{rp}", std::process::id()));
    let file = std::fs::File::create(&log).unwrap();
    let router = std::process::Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["serve", "--listen", &format!("127.0.0.1:{rp}"), "--zmq-bind", &format!("tcp://127.0.0.1:{zp}")])
        .args(["--block-size", "16", "--hash-algo", "sha256_cbor", "--hash-seed", "42"])
        .args(["--backend", &format!("http://127.0.0.1:{s}"), "--log-format", "json"])
        .args(admin_args(rp))
        .env("RUST_LOG", "info,kvroute_gateway=debug")
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    kids.0.push(router);
    wait_healthy(&format!("http://127.0.0.1:{rp}"));
    let r = post(&format!("http://127.0.0.1:{rp}/v1/completions"), &completion("logged"), Some("req-42"));
    assert_eq!(r.status, 200, "{}", r.body);
    let lines = || -> Vec<Value> {
        let text = std::fs::read_to_string(&log).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
    };
    wait_for(Duration::from_secs(5), "the attributed line", || {
        lines().iter().any(|l| l["message"] == "attributed" && l["request_id"] == "req-42")
    });
    let all = lines();
    let routed: Vec<&Value> = all.iter().filter(|l| l["message"] == "routed").collect();
    assert_eq!(routed.len(), 1, "{all:?}");
    let d = routed[0];
    assert_eq!(d["level"], "DEBUG");
    assert_eq!(d["request_id"], "req-42");
    assert_eq!(d["pick"], format!("127.0.0.1:{s}"));
    assert_eq!(d["predicted_tokens"], 0);
    assert_eq!(d["reason"], "no cached prefix anywhere");
    let _ = std::fs::remove_file(&log);
}

/// A pod that publishes KV events is taken at its word: once it has evicted a prompt, the
/// router predicts nothing of it there. (Its own record of past picks used to stand in
/// whenever no pod's index entries matched a prompt, and predicted the evicted prefix on
/// the pod it last went to: a `stale_index` miss on every prompt evicted everywhere.)
#[test]
fn an_evicted_prompt_is_not_predicted_from_the_routers_record_of_its_picks() {
    let ports = free_ports(3);
    let (rp, zp, sp) = (ports[0], ports[1], ports[2]);
    // 24 blocks: a 184-token prompt takes 12 (11 full, 1 partial), so two more prompts
    // evict the first one entirely (freed tail first, its first block last).
    let mut kids = Children(vec![sim(sp, zp, &["--num-gpu-blocks", "24"])]);
    kids.0.push(serve(rp, zp, &[sp], &[]));
    std::thread::sleep(Duration::from_millis(500)); // the sim's publisher connects
    let url = format!("http://127.0.0.1:{rp}/v1/completions");
    let body = |t: &str| json!({"model": "m", "prompt": format!("{} {}", words(t, 160), words(&format!("{t}q"), 24)), "max_tokens": 2});
    let batches = || metric_sum(&[rp], "kvroute_kv_batches_applied_total");
    let send = |t: &str| {
        let before = batches();
        let r = post(&url, &body(t), None);
        assert_eq!(r.status, 200, "{}", r.body);
        wait_for(Duration::from_secs(5), &format!("{t}: KV events past {before}"), || batches() > before);
    };
    send("evicted");
    for t in ["second", "third", "fourth"] {
        send(t);
    }
    let v: Value = ureq::post(&format!("{}/v1/route/explain", admin(&format!("http://127.0.0.1:{rp}"))))
        .send_json(body("evicted"))
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(v["pods"][0]["matched_blocks"], 0, "{v}");
    send("evicted");
    wait_for(Duration::from_secs(5), "five requests attributed", || {
        metric_sum(&[rp], "kvroute_cache_attribution_total") == 5.0
    });
    assert_eq!((outcome(rp, "stale_index"), outcome(rp, "no_prefix")), (0.0, 5.0));
}
