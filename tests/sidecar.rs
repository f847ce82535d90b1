//! Black-box tests of `kvroute sidecar` (llm-d's P/D routing sidecar) in front of a decode
//! `kvroute sim`, with a prefill `kvroute sim`: `x-prefiller-host-port` runs the prefill →
//! decode flow, no header passes through, a dead prefiller falls back to decode only, and
//! a prefill target outside the allow-list gets 403 without any connection (a test
//! listener proves it).

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_ports, metric_sum, wait_healthy, words, Children};
use serde_json::{json, Value};

fn sidecar(port: u16, vllm: u16, extra: &[&str]) -> Child {
    let c = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["sidecar", "--port", &port.to_string(), "--vllm-port", &vllm.to_string(), "--connector", "nixlv2"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // /health passes through to the sim.
    wait_healthy(&format!("http://127.0.0.1:{port}"));
    c
}

/// POSTs to the sidecar with an optional x-prefiller-host-port: status and body text.
fn post(port: u16, chat: bool, prefiller: Option<&str>, body: Value) -> (u16, String) {
    let path = if chat { "chat/completions" } else { "completions" };
    let mut req = ureq::post(&format!("http://127.0.0.1:{port}/v1/{path}"));
    if let Some(p) = prefiller {
        req = req.set("x-prefiller-host-port", p);
    }
    match req.send_json(body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn tokens(port: u16) -> f64 {
    metric_sum(&[port], "vllm:prompt_tokens_total")
}

#[test]
fn the_sidecar_prefills_at_the_named_pod_then_decodes_locally() {
    let [pre, dec, zmq, side] = free_ports(4).try_into().unwrap();
    let mut kids = Children(vec![common::sim(pre, zmq, &[]), common::sim(dec, zmq, &[])]);
    let allowed = format!("127.0.0.1:{pre}");
    kids.0.push(sidecar(side, dec, &["--prefill-allow", &allowed]));

    let (status, text) =
        post(side, false, Some(&allowed), json!({"model": "m", "prompt": words("sc", 200), "max_tokens": 4}));
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let n = v["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(tokens(pre), n, "the prefill pod must have computed the prompt");
    assert_eq!(tokens(dec), n);
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64(), "{v}");

    // Streaming chat, the same way.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": words("scchat", 150)}],
                      "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}});
    let (status, text) = post(side, true, Some(&allowed), body);
    assert_eq!(status, 200, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"cached_tokens\""), "no usage chunk: {text}");
    assert!(tokens(pre) > n, "the streaming request was not prefilled");

    // No header: a plain pass-through to the local vLLM.
    let before = tokens(pre);
    let (status, text) = post(side, false, None, json!({"model": "m", "prompt": words("plain", 100), "max_tokens": 2}));
    assert_eq!(status, 200, "{text}");
    assert_eq!(tokens(pre), before, "no header, no prefill");
    // The sidecar's /metrics: vLLM's, then its own.
    assert_eq!(metric_sum(&[side], "kvroute_pd_requests_total{outcome=\"disaggregated\"}"), 2.0);
    assert_eq!(metric_sum(&[side], "kvroute_pd_requests_total{outcome=\"decode_only\"}"), 1.0);
    assert!(metric_sum(&[side], "vllm:prompt_tokens_total") > 0.0);
}

#[test]
fn a_prefill_target_outside_the_allow_list_gets_403_and_no_connection() {
    let [pre, dec, zmq, side] = free_ports(4).try_into().unwrap();
    let mut kids = Children(vec![common::sim(pre, zmq, &[]), common::sim(dec, zmq, &[])]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let trap = listener.local_addr().unwrap().to_string();
    let list = std::env::temp_dir().join(format!("kvroute-sidecar-allow-{}", std::process::id()));
    std::fs::write(&list, format!("# prefill pods\n127.0.0.1:{pre}\n")).unwrap();
    kids.0.push(sidecar(side, dec, &["--prefill-allow-file", list.to_str().unwrap()]));

    let body = json!({"model": "m", "prompt": words("ssrf", 100), "max_tokens": 2});
    let (status, text) = post(side, false, Some(&trap), body.clone());
    assert_eq!(status, 403, "{text}");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["error"]["code"], 403, "{e}");
    assert_eq!(e["error"]["type"], "PermissionDeniedError", "{e}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(listener.accept().is_err(), "the sidecar connected to a target outside the allow-list");
    assert_eq!(tokens(dec), 0.0, "a refused request must not be decoded either");
    assert_eq!(metric_sum(&[side], "kvroute_sidecar_refused_prefillers_total"), 1.0);

    // The file's entry is allowed.
    let (status, text) = post(side, false, Some(&format!("127.0.0.1:{pre}")), body);
    assert_eq!(status, 200, "{text}");
    assert!(tokens(pre) > 0.0);
}

#[test]
fn a_dead_prefiller_means_decode_only_and_insecure_mode_accepts_any_target() {
    let [pre, dec, zmq, side, side2, dead] = free_ports(6).try_into().unwrap();
    let mut kids = Children(vec![common::sim(pre, zmq, &[]), common::sim(dec, zmq, &[])]);
    let dead = format!("127.0.0.1:{dead}");
    kids.0.push(sidecar(side, dec, &["--prefill-allow", &dead]));
    let body = json!({"model": "m", "prompt": words("dead", 100), "max_tokens": 2, "stream": true});
    let (status, text) = post(side, false, Some(&dead), body);
    assert_eq!(status, 200, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(tokens(dec) > 0.0);
    assert_eq!(metric_sum(&[side], "kvroute_pd_requests_total{outcome=\"fallback\"}"), 1.0);
    assert_eq!(metric_sum(&[side], "kvroute_pd_prefill_failures_total{kind=\"connect\"}"), 1.0);

    kids.0.push(sidecar(side2, dec, &["--insecure-any-prefiller"]));
    let body = json!({"model": "m", "prompt": words("any", 100), "max_tokens": 2});
    let (status, text) = post(side2, false, Some(&format!("127.0.0.1:{pre}")), body);
    assert_eq!(status, 200, "{text}");
    assert!(tokens(pre) > 0.0, "--insecure-any-prefiller must accept an unlisted prefiller");
}
