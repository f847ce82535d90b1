//! Black-box tests: prefill/decode disaggregation run by the gateway itself. Two prefill
//! and two decode `kvroute sim`s (roles from `llm-d.ai/role` labels on the `backends:`
//! entries) behind `kvroute serve --scheduler-config <llm-d's P/D config with
//! prefix-based-pd-decider{nonCachedTokens: 16}>`. The sims play vLLM with NixlConnector:
//! a `do_remote_decode` request computes the prompt (counted in the prefill pod's
//! `vllm:prompt_tokens_total`) and returns `kv_transfer_params`; a `do_remote_prefill`
//! request takes the blocks into the decode pod's cache.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pd::{body, role_backends, sse_content, sse_events};
use common::{free_ports, metric_sum, wait_healthy, words, Children};
use serde_json::{json, Value};

struct Fleet {
    kids: Children,
    base: String,
    http: u16,
    prefill: [u16; 2],
    decode: [u16; 2],
}

/// The fleet behind a router; `pd_yaml` is added to the router's YAML (e.g. `pd: ...`).
fn fleet(tag: &str, pd_yaml: &str) -> Fleet {
    let epp = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llmd/llmd-pd-prefix.yaml");
    fleet_with(tag, &format!("scheduler_config: {}\n{pd_yaml}", epp.display()), &[])
}

/// [`fleet`] with this router YAML after `backends:` and these extra sim flags.
fn fleet_with(tag: &str, yaml_tail: &str, sim_extra: &[&str]) -> Fleet {
    let [p1, p2, d1, d2, zmq, http] = free_ports(6).try_into().unwrap();
    let mut kids = Children([p1, p2, d1, d2].iter().map(|p| common::sim(*p, zmq, sim_extra)).collect());
    let dir = std::env::temp_dir().join(format!("kvroute-pd-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = format!("{}{yaml_tail}", role_backends(&[p1, p2], &[d1, d2]));
    let cfg = dir.join("serve.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    kids.0.push(serve(http, zmq, &cfg));
    let base = format!("http://127.0.0.1:{http}");
    wait_healthy(&base);
    Fleet { kids, base, http, prefill: [p1, p2], decode: [d1, d2] }
}

/// `kvroute serve` with this YAML, hashing like the sims; health probes every 2 s (a
/// killed prefill pod stays in rotation long enough for the fallback to be exercised).
fn serve(http: u16, zmq: u16, cfg: &std::path::Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{http}"), "--zmq-bind", &format!("tcp://127.0.0.1:{zmq}")]);
    cmd.args(["--block-size", "16", "--hash-algo", "sha256_cbor", "--hash-seed", "42", "--health-interval-ms", "2000"]);
    cmd.args(common::admin_args(http));
    cmd.args(["--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", std::env::var("SERVE_LOG").unwrap_or("warn".into()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

impl Fleet {
    fn prefill_tokens(&self) -> f64 {
        metric_sum(&self.prefill, "vllm:prompt_tokens_total")
    }

    fn decode_tokens(&self) -> f64 {
        metric_sum(&self.decode, "vllm:prompt_tokens_total")
    }

    fn pd(&self, outcome: &str) -> f64 {
        metric_sum(&[self.http], &format!("kvroute_pd_requests_total{{outcome=\"{outcome}\"}}"))
    }

    /// `/v1/route/explain` for this body.
    fn explain(&self, body: &Value) -> Value {
        ureq::post(&format!("{}/v1/route/explain", common::admin(&self.base)))
            .send_json(body.clone())
            .unwrap()
            .into_json()
            .unwrap()
    }

    fn is_decode(&self, pod: &str) -> bool {
        self.decode.iter().any(|p| pod == format!("127.0.0.1:{p}"))
    }

    /// POSTs `body` to `/v1/completions` or `/v1/chat/completions`: status, pod, body text.
    fn post(&self, chat: bool, body: Value) -> (u16, String, String) {
        let path = if chat { "chat/completions" } else { "completions" };
        let r = match ureq::post(&format!("{}/v1/{path}", self.base)).send_json(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let pod = r.header("x-kvroute-pod").unwrap_or_default().to_string();
        (r.status(), pod, r.into_string().unwrap())
    }
}

#[test]
fn a_long_new_prompt_is_prefilled_then_decoded_and_its_prefix_then_stays_on_the_decode_pod() {
    let f = fleet("split", "");
    let prompt = words("split", 200);
    let (status, pod, text) = f.post(false, body(false, &prompt, false));
    assert_eq!(status, 200, "{text}");
    assert!(f.is_decode(&pod), "served by {pod}, not a decode pod");
    let v: Value = serde_json::from_str(&text).unwrap();
    let n = v["usage"]["prompt_tokens"].as_f64().unwrap();
    assert!(n >= 200.0, "{v}");
    // The prefill pod computed the prompt; the decode pod received it.
    assert_eq!(f.prefill_tokens(), n, "a prefill pod must have computed the prompt");
    assert_eq!(f.decode_tokens(), n);
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64(), "{v}");
    assert_eq!(f.pd("disaggregated"), 1.0);

    // The same prompt again: the decode pod holds the transferred blocks, so no split.
    let hits_before = metric_sum(&f.decode, "vllm:prefix_cache_hits_total");
    let (status, again, text) = f.post(false, body(false, &prompt, false));
    assert_eq!(status, 200, "{text}");
    assert_eq!(again, pod, "the prefix must stay on the decode pod that holds it");
    assert_eq!(f.prefill_tokens(), n, "no second prefill for a cached prefix");
    let hits = metric_sum(&f.decode, "vllm:prefix_cache_hits_total") - hits_before;
    assert!(hits >= n - 16.0, "the decode pod's cache must hold the transferred blocks ({hits} of {n} hit)");
    assert_eq!(f.pd("decode_only"), 1.0);

    // A short prompt is never split.
    let (status, pod, text) = f.post(true, body(true, "hello there", false));
    assert_eq!(status, 200, "{text}");
    assert!(f.is_decode(&pod), "{pod}");
    assert_eq!(f.prefill_tokens(), n, "a short prompt must not be prefilled remotely");
    assert_eq!(f.pd("disaggregated"), 1.0);
    assert_eq!(f.pd("decode_only"), 2.0);
}

#[test]
fn streaming_and_non_streaming_chat_and_completions_are_disaggregated() {
    let f = fleet("kinds", "pd: {mode: gateway}\n");
    let mut prefilled = 0.0;
    for (i, (chat, stream)) in [(true, true), (false, true), (true, false)].into_iter().enumerate() {
        let (status, pod, text) = f.post(chat, body(chat, &words(&format!("kind{i}x"), 150), stream));
        assert_eq!(status, 200, "{text}");
        assert!(f.is_decode(&pod), "{pod}");
        let usage = if stream {
            let events = sse_events(&text);
            let content = sse_content(&events);
            assert!(!content.is_empty(), "no generated text: {text}");
            events.last().unwrap()["usage"].clone()
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["choices"][0]["finish_reason"].is_string(), "{v}");
            v["usage"].clone()
        };
        assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64(), "usage without cached tokens: {text}");
        let n = usage["prompt_tokens"].as_f64().unwrap();
        prefilled += n;
        assert_eq!(f.prefill_tokens(), prefilled, "request {i} (chat {chat}, stream {stream}) was not prefilled");
    }
    assert_eq!(f.pd("disaggregated"), 3.0);
}

#[test]
fn a_dead_prefill_pod_means_decode_only_and_no_client_error() {
    let mut f = fleet("dead", "");
    // Both prefill pods die; the router has not noticed yet (probes every 2 s).
    for c in f.kids.0.iter_mut().take(2) {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let t = Instant::now();
    let (status, pod, text) = f.post(false, body(false, &words("dead", 200), false));
    assert_eq!(status, 200, "{text}");
    assert!(f.is_decode(&pod), "{pod}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(f.pd("fallback"), 1.0, "the failed prefill must be counted");
    assert_eq!(metric_sum(&[f.http], "kvroute_pd_prefill_failures_total{kind=\"connect\"}"), 1.0);
    // Streaming, after the router took the dead pods out or not: still served.
    let (status, pod, text) = f.post(true, body(true, &words("dead2x", 200), true));
    assert_eq!(status, 200, "{text}");
    assert!(f.is_decode(&pod), "{pod}");
    assert!(!sse_events(&text).is_empty());
    assert_eq!(f.pd("disaggregated"), 0.0);
}

#[test]
fn sidecar_mode_only_names_the_prefill_pod() {
    let f = fleet("sidecar", "pd: {mode: sidecar}\n");
    let (status, pod, text) = f.post(false, body(false, &words("side", 200), false));
    assert_eq!(status, 200, "{text}");
    assert!(f.is_decode(&pod), "{pod}");
    assert_eq!(f.prefill_tokens(), 0.0, "in sidecar mode the gateway must not prefill");
    assert_eq!(f.pd("disaggregated"), 0.0);
}

#[test]
fn kvroutes_default_profile_splits_only_when_the_decode_pods_are_backed_up() {
    // No scheduler config: kvroute's default profile, whose P/D stage wakes up because the
    // pool has prefill-role pods. Sims at model time, so requests stay in flight a while.
    let f = fleet_with("default", "", &["--speedup", "1"]);
    let long = |tag: &str| {
        let mut b = body(false, &words(tag, 1500), false);
        b["max_tokens"] = json!(150);
        b
    };
    // Idle fleet: a long new prompt stays on a decode pod (splitting only adds the transfer
    // and the hop), and the explanation says so with both predictions.
    let e = f.explain(&long("idle"));
    assert!(f.is_decode(e["pick"].as_str().unwrap()), "{e}");
    assert!(e["prefill"].is_null(), "{e}");
    let pd = &e["pd"];
    assert_eq!(pd["decider"], "predicted-ttft-pd-decider", "{e}");
    assert_eq!(pd["split"], false, "{e}");
    assert!(pd["predicted_split_s"].as_f64().unwrap() > pd["predicted_local_s"].as_f64().unwrap(), "{e}");
    // Two long requests keep both decode pods busy (each routed locally: idle fleet).
    let workers: Vec<_> = ["busyA", "busyB"]
        .into_iter()
        .map(|t| {
            let (b, base) = (long(t), f.base.clone());
            std::thread::spawn(move || {
                let r = ureq::post(&format!("{base}/v1/completions")).send_json(b).unwrap();
                r.header("x-kvroute-pod").unwrap_or_default().to_string()
            })
        })
        .collect();
    // While they run, a third long prompt is predicted sooner through an idle prefill pod.
    let deadline = Instant::now() + Duration::from_secs(3);
    let split = loop {
        let e = f.explain(&long("third"));
        if e["pd"]["split"] == true || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(split["pd"]["split"], true, "{split}");
    let pre = split["prefill"].as_str().unwrap().to_string();
    assert!(f.prefill.iter().any(|p| pre == format!("127.0.0.1:{p}")), "{split}");
    assert!(split["pd"]["reason"].as_str().unwrap().contains(&pre), "{split}");
    // And the real request follows the explanation: prefilled remotely, decoded locally;
    // while the prefill leg runs, it counts in the prefill pod's load.
    let before = f.prefill_tokens();
    let third = {
        let (b, base) = (long("third"), f.base.clone());
        std::thread::spawn(move || {
            let r = ureq::post(&format!("{base}/v1/completions")).send_json(b).unwrap();
            (r.status(), r.header("x-kvroute-pod").unwrap_or_default().to_string(), r.into_string().unwrap())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let loaded = loop {
        let e = f.explain(&long("probe"));
        let n = e["pods"].as_array().unwrap().iter().find(|p| p["pod"] == pre.as_str()).unwrap()["in_flight"].clone();
        if n == 1 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(loaded, 1, "the prefill leg must count in the prefill pod's in-flight load");
    let (status, pod, text) = third.join().unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(f.is_decode(&pod), "{pod}");
    assert!(f.prefill_tokens() > before, "the prefill pod must have computed the prompt");
    assert_eq!(f.pd("disaggregated"), 1.0);
    let busy: Vec<String> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(busy.iter().all(|p| f.is_decode(p)), "{busy:?}");
    assert_ne!(busy[0], busy[1], "the two cold prompts spread over both decode pods");
    assert_eq!(f.pd("decode_only"), 2.0, "the two local decisions are counted");
}
