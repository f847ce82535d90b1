//! Black-box tests: prefill/decode disaggregation as llm-d deploys it, behind a **real
//! Envoy** (`common::envoy`). Envoy asks kvroute's ext_proc door (`kvroute serve
//! --ext-proc-listen`, llm-d's P/D `EndpointPickerConfig` with
//! `prefix-based-pd-decider{nonCachedTokens: 16}`) where each request goes; the door
//! answers with the decode pick as the destination and names the prefill pick in
//! `x-prefiller-host-port`. The decode pods are `kvroute sidecar` processes (the pool's
//! decode backends ARE the sidecar addresses, as in llm-d where the pod's target port is
//! the sidecar's) in front of decode `kvroute sim`s; the sidecars prefill at the named
//! prefill sim, then decode locally with the returned `kv_transfer_params`.
//!
//! How the decode sim's remote-prefill path is seen: the sim's TTFT is its queue time plus
//! its prefill time (model time), and with `kv_transfer_params.do_remote_prefill` the
//! prefill time is the KV transfer (3 µs per token in the default profile) instead of
//! local prefill (30 ms + 250 µs per uncached token). So `ttft_sum - queue_time_sum` on
//! the decode sims is the decode side's prefill time.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::envoy::post;
use common::pd::{body, role_backends, sse_content, sse_events};
use common::{free_ports, metric_sum, wait_healthy, words, Children};
use serde_json::{json, Value};

struct Fleet {
    envoy: String,
    router: u16,
    prefill: [u16; 2],
    /// The decode sims (the "vLLM" behind each sidecar).
    decode: [u16; 2],
    /// The decode pods' serving ports: the sidecars.
    sidecars: [u16; 2],
    /// A listener the sidecars are allowed to prefill at (so only the door can keep a
    /// forged header from reaching it) that must never see a connection.
    trap: TcpListener,
    _kids: Children,
}

fn sidecar(port: u16, vllm: u16, allow: &[String]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    cmd.args(["sidecar", "--port", &port.to_string(), "--vllm-port", &vllm.to_string(), "--connector", "nixlv2"]);
    for a in allow {
        cmd.args(["--prefill-allow", a]);
    }
    // A prefill sent to the trap (which never answers) must not hold a test for 2 minutes.
    let c = cmd.args(["--prefill-timeout-ms", "3000"]).env("RUST_LOG", "warn").stdout(Stdio::null()).spawn().unwrap();
    wait_healthy(&format!("http://127.0.0.1:{port}"));
    c
}

fn fleet(tag: &str) -> Fleet {
    let envoy_bin = common::envoy::binary();
    let [p1, p2, d1, d2, s1, s2, zmq, http, grpc, health, listener, admin, trap] = free_ports(13).try_into().unwrap();
    let trap = TcpListener::bind(("127.0.0.1", trap)).unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_addr = trap.local_addr().unwrap().to_string();
    // Prefill sims name themselves; a decode sim's KV events name its pod as the pool
    // knows it: the sidecar's address.
    let mut kids = vec![common::sim(p1, zmq, &[]), common::sim(p2, zmq, &[])];
    for (d, s) in [(d1, s1), (d2, s2)] {
        let kv = json!({"enable_kv_cache_events": true, "publisher": "zmq",
            "endpoint": format!("tcp://127.0.0.1:{zmq}"), "topic": format!("kv@127.0.0.1:{s}@m")});
        kids.push(common::sim_at("127.0.0.1", d, 16, &kv, &[]));
    }
    let allow = [format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"), trap_addr];
    kids.push(sidecar(s1, d1, &allow));
    kids.push(sidecar(s2, d2, &allow));
    let dir = std::env::temp_dir().join(format!("kvroute-pd-envoy-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let epp = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llmd/llmd-pd-prefix.yaml");
    let yaml = format!("{}scheduler_config: {epp}\npd: {{mode: sidecar}}\n", role_backends(&[p1, p2], &[s1, s2]));
    let cfg = dir.join("serve.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let (g, h) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{health}"));
    let extra = ["--config", cfg.to_str().unwrap(), "--ext-proc-listen", &g, "--grpc-health-listen", &h];
    kids.push(common::serve(http, zmq, &[], &extra));
    kids.push(common::envoy::start(&envoy_bin, listener, grpc, admin, |c| c));
    Fleet {
        envoy: format!("http://127.0.0.1:{listener}"),
        router: http,
        prefill: [p1, p2],
        decode: [d1, d2],
        sidecars: [s1, s2],
        trap,
        _kids: Children(kids),
    }
}

/// What one request did, read from its response.
struct Served {
    /// `x-kvroute-pod`: the door's pick (a sidecar).
    picked: String,
    /// `x-inference-pod`: the sim that generated the answer.
    served: String,
    prompt_tokens: f64,
    cached_tokens: Option<u64>,
    text: String,
}

impl Fleet {
    fn send(&self, chat: bool, prompt: &str, stream: bool, headers: &[(&str, &str)]) -> Served {
        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        let (status, served, picked, text) = post(&self.envoy, path, &body(chat, prompt, stream).to_string(), headers);
        assert_eq!(status, 200, "{text}");
        let usage = if stream {
            let events = sse_events(&text);
            let content = sse_content(&events);
            assert!(!content.is_empty(), "no generated text: {text}");
            events.last().map(|e| e["usage"].clone()).unwrap_or_default()
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["choices"][0]["finish_reason"].is_string(), "{v}");
            v["usage"].clone()
        };
        let prompt_tokens = usage["prompt_tokens"].as_f64().unwrap_or(-1.0);
        let cached_tokens = usage["prompt_tokens_details"]["cached_tokens"].as_u64();
        Served { picked, served, prompt_tokens, cached_tokens, text }
    }

    fn prefill_tokens(&self) -> f64 {
        metric_sum(&self.prefill, "vllm:prompt_tokens_total")
    }

    fn decode_tokens(&self) -> f64 {
        metric_sum(&self.decode, "vllm:prompt_tokens_total")
    }

    /// The decode sims' prefill time so far (model seconds): TTFT minus queue time.
    fn decode_prefill_seconds(&self) -> f64 {
        metric_sum(&self.decode, "vllm:time_to_first_token_seconds_sum")
            - metric_sum(&self.decode, "vllm:request_queue_time_seconds_sum")
    }

    /// The sidecars' `kvroute_pd_requests_total{outcome}`.
    fn sidecar_pd(&self, outcome: &str) -> f64 {
        metric_sum(&self.sidecars, &format!("kvroute_pd_requests_total{{outcome=\"{outcome}\"}}"))
    }

    fn door_pd(&self, decision: &str) -> f64 {
        metric_sum(&[self.router], &format!("kvroute_extproc_pd_decisions_total{{decision=\"{decision}\"}}"))
    }

    /// The pick is a decode pod (a sidecar) and the answer came from the sim behind it.
    fn assert_decode_pod_answered(&self, r: &Served) {
        let i = self.sidecars.iter().position(|s| r.picked == format!("127.0.0.1:{s}"));
        let Some(i) = i else { panic!("picked {} — not a decode pod (sidecar)", r.picked) };
        assert_eq!(r.served, format!("127.0.0.1:{}", self.decode[i]), "the decode sim behind {} answers", r.picked);
    }

    /// No sidecar refused a prefill target along the way.
    fn none_refused(&self) -> bool {
        metric_sum(&self.sidecars, "kvroute_sidecar_refused_prefillers_total") == 0.0
    }

    fn assert_trap_untouched(&self) {
        std::thread::sleep(Duration::from_millis(200));
        assert!(self.trap.accept().is_err(), "a client-forged x-prefiller-host-port reached a sidecar");
    }
}

#[test]
fn the_door_names_the_prefill_pod_and_the_sidecar_prefills_there_then_decodes() {
    let f = fleet("split");
    // A long new prompt: prefill at a prefill pod, decode at the decode pod the door picked.
    let prompt = words("envoysplit", 200);
    let r = f.send(false, &prompt, false, &[]);
    f.assert_decode_pod_answered(&r);
    let n = r.prompt_tokens;
    assert!(n >= 200.0, "{}", r.text);
    assert_eq!(f.prefill_tokens(), n, "a prefill pod must have computed the prompt");
    assert_eq!(f.decode_tokens(), n);
    assert!(r.cached_tokens.is_some(), "the prefiller's cached tokens merged into usage: {}", r.text);
    assert_eq!(f.sidecar_pd("disaggregated"), 1.0);
    assert_eq!(f.door_pd("split"), 1.0);
    // The decode sim took the KV transfer (µs per token), not a local prefill (≥ 30 ms).
    let remote = f.decode_prefill_seconds();
    assert!(remote < 0.005, "the decode sim prefilled locally ({remote} s): no kv_transfer_params reached it");

    // The same prompt again: the decode pod holds the transferred blocks (its KV events
    // told the router), so no split.
    let hits_before = metric_sum(&f.decode, "vllm:prefix_cache_hits_total");
    let again = f.send(false, &prompt, false, &[]);
    assert_eq!(again.picked, r.picked, "the prefix must stay on the decode pod that holds it");
    assert_eq!(again.served, r.served);
    assert_eq!(f.prefill_tokens(), n, "no second prefill for a cached prefix");
    let hits = metric_sum(&f.decode, "vllm:prefix_cache_hits_total") - hits_before;
    assert!(hits >= n - 16.0, "the decode pod's cache must hold the transferred blocks ({hits} of {n} hit)");
    assert_eq!((f.sidecar_pd("decode_only"), f.door_pd("decode_only")), (1.0, 1.0));
    assert!(f.decode_prefill_seconds() - remote >= 0.03, "a decode-only request prefills locally");

    // A short prompt is never split (streaming chat here).
    let short = f.send(true, "hello there", true, &[]);
    f.assert_decode_pod_answered(&short);
    assert_eq!(f.prefill_tokens(), n, "a short prompt must not be prefilled remotely");
    assert_eq!((f.sidecar_pd("decode_only"), f.door_pd("decode_only")), (2.0, 2.0));

    // Long new prompts of every kind are split: streaming chat and completions, and
    // non-streaming chat.
    let mut prefilled = n;
    for (i, (chat, stream)) in [(true, true), (false, true), (true, false)].into_iter().enumerate() {
        let r = f.send(chat, &words(&format!("envoykind{i}x"), 150), stream, &[]);
        f.assert_decode_pod_answered(&r);
        assert!(r.cached_tokens.is_some(), "usage without cached tokens: {}", r.text);
        prefilled += r.prompt_tokens;
        assert_eq!(f.prefill_tokens(), prefilled, "request {i} (chat {chat}, stream {stream}) was not prefilled");
    }
    assert_eq!((f.sidecar_pd("disaggregated"), f.door_pd("split")), (4.0, 4.0));
    assert_eq!(f.sidecar_pd("fallback"), 0.0);
    assert!(f.none_refused());
}

#[test]
fn a_client_forged_prefiller_header_never_reaches_the_sidecar() {
    let f = fleet("forged");
    let trap = f.trap.local_addr().unwrap().to_string();
    let prefill_pod = format!("127.0.0.1:{}", f.prefill[0]);
    // Short prompts: the door picks no prefill pod, so it removes the client's header —
    // whether it names an allowed prefill pod or the trap, streaming or not.
    for (i, (forged, chat, stream)) in
        [(&trap, false, false), (&prefill_pod, true, false), (&trap, true, true), (&prefill_pod, false, true)]
            .into_iter()
            .enumerate()
    {
        let r = f.send(chat, &format!("short prompt {i}"), stream, &[("x-prefiller-host-port", forged)]);
        f.assert_decode_pod_answered(&r);
        assert_eq!(f.prefill_tokens(), 0.0, "request {i}: the client's x-prefiller-host-port ({forged}) was used");
        let plain = f.sidecar_pd("decode_only");
        assert_eq!(plain, (i + 1) as f64, "request {i}: the sidecar got an x-prefiller-host-port ({forged})");
    }
    assert_eq!(f.door_pd("decode_only"), 4.0);
    f.assert_trap_untouched();

    // A long prompt: the door's own prefill pick overwrites the client's.
    let r = f.send(false, &words("forgedlong", 200), false, &[("x-prefiller-host-port", &trap)]);
    f.assert_decode_pod_answered(&r);
    assert_eq!(f.prefill_tokens(), r.prompt_tokens, "the door's prefill pick was used");
    assert_eq!((f.sidecar_pd("disaggregated"), f.sidecar_pd("fallback")), (1.0, 0.0));
    f.assert_trap_untouched();
    assert!(f.none_refused());
}
