//! Black-box fidelity tests (issue #13): what benchmark tools (inference-perf, aiperf,
//! guidellm) see through `kvroute serve` in front of `kvroute sim` pods that use a real
//! tokenizer (Qwen3's `tokenizer.json`): streamed text, token counts, response ids, and
//! vLLM's other endpoints. Real child processes, real HTTP, real KV events over ZMQ.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

mod common;

use common::{free_ports, Children};
use kvroute_tokenize::HfTokenizer;
use serde_json::{json, Value};

fn qwen_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var("KVROUTE_TOKENIZERS").map(PathBuf::from).unwrap_or_else(|_| root.join("target/tokenizers"));
    let q = dir.join("qwen3");
    assert!(q.join("tokenizer.json").exists(), "{} missing: run scripts/fetch-tokenizers.sh", q.display());
    q
}

/// A router on `ports[0]` (events on `ports[1]`) in front of sims on the other ports, all
/// with the Qwen3 tokenizer for model `m`.
struct Fleet {
    router: String,
    sims: Vec<u16>,
    children: Children,
}

impl Fleet {
    fn start(n: usize) -> Fleet {
        let q = qwen_dir();
        let q = q.to_str().unwrap();
        let ports = free_ports(n + 2);
        let (rp, zp) = (ports[0], ports[1]);
        let model = format!("m={q}");
        // A benchmark fleet: /reset_prefix_cache also on the serving port (aiperf calls it there).
        let serve = common::serve(rp, zp, &ports[2..], &["--model", &model, "--reset-on-serving-port"]);
        let mut children: Vec<Child> = vec![serve];
        for &p in &ports[2..] {
            children.push(common::sim(p, zp, &["--tokenizer", q]));
        }
        let router = format!("http://127.0.0.1:{rp}");
        let f = Fleet { router, sims: ports[2..].to_vec(), children: Children(children) };
        // The router has probed every pod (models known) before the tests start.
        let t = Instant::now();
        while get(&f.router, "/v1/models").1["data"].as_array().is_none_or(|d| d.is_empty()) {
            assert!(t.elapsed() < Duration::from_secs(10), "no models through the router");
            std::thread::sleep(Duration::from_millis(50));
        }
        f
    }

    fn sim_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.sims[i])
    }
}

fn post(base: &str, path: &str, body: Value) -> (u16, Value, Option<String>) {
    match ureq::post(&format!("{base}{path}")).send_json(body) {
        Ok(r) => {
            let pod = r.header("x-kvroute-pod").map(str::to_string);
            let text = r.into_string().unwrap();
            (200, serde_json::from_str(&text).unwrap_or(Value::String(text)), pod)
        }
        Err(ureq::Error::Status(c, r)) => {
            let pod = r.header("x-kvroute-pod").map(str::to_string);
            let text = r.into_string().unwrap_or_default();
            (c, serde_json::from_str(&text).unwrap_or(Value::String(text)), pod)
        }
        Err(e) => panic!("{path}: {e}"),
    }
}

fn get(base: &str, path: &str) -> (u16, Value) {
    match ureq::get(&format!("{base}{path}")).call() {
        Ok(r) => (200, r.into_json().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{path}: {e}"),
    }
}

/// The `data:` payloads of an SSE response, up to `[DONE]` (which must come).
fn stream(base: &str, path: &str, body: Value) -> Vec<Value> {
    let r = ureq::post(&format!("{base}{path}")).send_json(body).unwrap();
    assert!(r.content_type().starts_with("text/event-stream"), "{}", r.content_type());
    let text = r.into_string().unwrap();
    let mut out = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("data:")) {
        let line = line.trim();
        if line == "[DONE]" {
            return out;
        }
        out.push(serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")));
    }
    panic!("no [DONE] in {text}");
}

fn content(chunk: &Value, chat: bool) -> Option<&str> {
    let c = chunk["choices"].get(0)?;
    if chat {
        c["delta"]["content"].as_str()
    } else {
        c["text"].as_str()
    }
}

fn is_uuid_hex(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[test]
fn streamed_text_equals_the_non_streamed_text_and_re_tokenizes_to_the_generated_count() {
    let f = Fleet::start(2);
    let hf = HfTokenizer::from_dir(&qwen_dir()).unwrap();
    let n = 48;
    for (path, chat) in [("/v1/completions", false), ("/v1/chat/completions", true)] {
        let mut body = if chat {
            json!({"model": "m", "messages": [{"role": "user", "content": "Tell me about KV caches."}]})
        } else {
            json!({"model": "m", "prompt": "A KV cache keeps"})
        };
        body["max_tokens"] = json!(n);
        body["seed"] = json!(1234);
        let (code, whole, pod) = post(&f.router, path, body.clone());
        assert_eq!(code, 200, "{whole}");
        assert!(pod.is_some(), "x-kvroute-pod");
        let text = if chat {
            whole["choices"][0]["message"]["content"].as_str()
        } else {
            whole["choices"][0]["text"].as_str()
        }
        .unwrap()
        .to_string();
        assert_eq!(whole["usage"]["completion_tokens"], n);
        let prefix = if chat { "chatcmpl-" } else { "cmpl-" };
        assert!(whole["id"].as_str().unwrap().strip_prefix(prefix).is_some_and(is_uuid_hex), "{}", whole["id"]);

        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
        let chunks = stream(&f.router, path, body);
        let deltas: Vec<&str> = chunks.iter().filter_map(|c| content(c, chat)).filter(|t| !t.is_empty()).collect();
        let streamed = deltas.concat();
        assert_eq!(streamed, text, "{path}: streamed concatenation = non-streamed text");
        // One chunk per token (the ITL a tool measures is the token interval) …
        assert_eq!(deltas.len(), n, "{deltas:?}");
        // … and the text is the generated tokens: re-tokenized, exactly `n` of them.
        let ids = hf.tokenizer_only(&streamed, false);
        assert_eq!(ids.len(), n, "{path}: {streamed:?} re-tokenizes to {} tokens", ids.len());
        let (code, t, _) =
            post(&f.router, "/tokenize", json!({"model": "m", "prompt": streamed, "add_special_tokens": false}));
        assert_eq!((code, t["count"].as_u64()), (200, Some(n as u64)), "{t}");
        assert!(!streamed.contains("  "), "no doubled spaces: {streamed:?}");
        // Usage: the final chunk (no choices), and a running count in every chunk.
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["completion_tokens"], n);
        let running: Vec<u64> = chunks
            .iter()
            .filter(|c| content(c, chat).is_some_and(|t| !t.is_empty()))
            .map(|c| c["usage"]["completion_tokens"].as_u64().unwrap())
            .collect();
        assert_eq!(running, (1..=n as u64).collect::<Vec<_>>());
        let finish: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
        assert_eq!(finish.len(), 1);
        assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
        if chat {
            assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        }
        // One id for every chunk of a response, and another for the next response.
        assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
        assert_ne!(chunks[0]["id"], whole["id"]);
    }
}

#[test]
fn response_ids_and_texts_differ_between_sims_and_requests_unless_seeded() {
    let f = Fleet::start(2);
    let body = json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 12});
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let (a1, a2) = (
        post(&f.sim_url(0), "/v1/completions", body.clone()).1,
        post(&f.sim_url(0), "/v1/completions", body.clone()).1,
    );
    let b1 = post(&f.sim_url(1), "/v1/completions", body.clone()).1;
    let ids = [&a1["id"], &a2["id"], &b1["id"]];
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2], "{ids:?}");
    assert_ne!(text(&a1), text(&b1), "two pods generate different text");
    assert_ne!(text(&a1), text(&a2), "two requests generate different text");
    // A request's seed fixes its text on any pod (its id stays unique).
    let mut seeded = body.clone();
    seeded["seed"] = json!(99);
    let (sa, sb) =
        (post(&f.sim_url(0), "/v1/completions", seeded.clone()).1, post(&f.sim_url(1), "/v1/completions", seeded).1);
    assert_eq!(text(&sa), text(&sb));
    assert_ne!(sa["id"], sb["id"]);
    // X-Request-Id names the response, as in vLLM.
    let r = ureq::post(&format!("{}/v1/completions", f.router))
        .set("x-request-id", "abc123")
        .send_json(body.clone())
        .unwrap();
    assert_eq!(r.into_json::<Value>().unwrap()["id"], "cmpl-abc123");
    // `--seed` makes a server's generation reproducible across restarts.
    let q = qwen_dir();
    let ports = free_ports(3);
    let run = |port: u16| -> String {
        let _c = Children(vec![common::sim(port, ports[2], &["--tokenizer", q.to_str().unwrap(), "--seed", "7"])]);
        text(&post(&format!("http://127.0.0.1:{port}"), "/v1/completions", body.clone()).1)
    };
    assert_eq!(run(ports[0]), run(ports[1]));
}

/// The calls aiperf, inference-perf and guidellm make besides generation.
#[test]
fn vllms_other_endpoints_answer_through_the_gateway() {
    let mut f = Fleet::start(2);
    let r = &f.router;
    // /v1/models: vLLM's model cards.
    let (code, models) = get(r, "/v1/models");
    assert_eq!(code, 200);
    let card = &models["data"][0];
    assert_eq!(
        (card["id"].as_str(), card["object"].as_str(), card["owned_by"].as_str()),
        (Some("m"), Some("model"), Some("vllm"))
    );
    assert_eq!(card["root"], "m");
    assert!(card["parent"].is_null() && card["created"].is_u64() && card["max_model_len"].is_u64(), "{card}");
    assert_eq!(card["permission"][0]["object"], "model_permission", "{card}");
    // /tokenize and /detokenize, as vLLM shapes them.
    let hf = HfTokenizer::from_dir(&qwen_dir()).unwrap();
    let (code, t, pod) =
        post(r, "/tokenize", json!({"model": "m", "prompt": "Hello, prefix caches!", "return_token_strs": true}));
    assert_eq!(code, 200, "{t}");
    assert!(pod.is_some());
    let ids: Vec<u32> = serde_json::from_value(t["tokens"].clone()).unwrap();
    assert_eq!(ids, hf.tokenizer_only("Hello, prefix caches!", true));
    assert_eq!(t["count"], ids.len());
    assert_eq!(t["max_model_len"], 32768);
    assert_eq!(t["token_strs"].as_array().map(Vec::len), Some(ids.len()));
    let (code, t2, _) = post(r, "/tokenize", json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(code, 200);
    assert!(t2["count"].as_u64().unwrap() > 3 && t2["token_strs"].is_null(), "{t2}");
    let (code, d, _) = post(r, "/detokenize", json!({"model": "m", "tokens": ids}));
    assert_eq!((code, d["prompt"].as_str()), (200, Some("Hello, prefix caches!")), "{d}");
    let (code, d, _) = post(r, "/detokenize", json!({"model": "m", "tokens": [u32::MAX]}));
    assert_eq!(code, 400, "{d}");
    assert!(d["error"]["message"].as_str().unwrap().contains("vocabulary"));
    assert_eq!(post(r, "/tokenize", json!({"model": "other", "prompt": "x"})).0, 404);
    assert_eq!(post(r, "/tokenize", json!([1])).0, 400);
    // /version: a pod's answer, vLLM's shape.
    let (code, v) = get(r, "/version");
    assert_eq!((code, v["version"].as_str()), (200, Some("0.33.0")), "{v}");
    // /v1/embeddings reaches a pod (a generative sim has no such endpoint: its 404).
    let (code, _, pod) = post(r, "/v1/embeddings", json!({"model": "m", "input": "x"}));
    assert_eq!(code, 404);
    assert!(pod.is_some(), "answered by a pod");

    // /reset_prefix_cache (an admin route) empties the pods' caches and the router's view of them.
    let admin = common::admin(r);
    let prompt = common::words("reset", 300);
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 2});
    let (_, first, pod) = post(r, "/v1/completions", body.clone());
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let pod = pod.unwrap();
    let holder = f.sims.iter().position(|p| pod.ends_with(&format!(":{p}"))).unwrap();
    let (_, second, pod2) = post(r, "/v1/completions", body.clone());
    assert_eq!(pod2.as_deref(), Some(pod.as_str()));
    assert!(second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 100, "{second}");
    let matched = |f: &Fleet| -> u64 {
        let (_, ex, _) = post(&common::admin(&f.router), "/v1/route/explain", json!({"model": "m", "prompt": prompt}));
        ex["pods"].as_array().unwrap().iter().map(|p| p["matched_blocks"].as_u64().unwrap()).max().unwrap()
    };
    let t = Instant::now();
    while matched(&f) == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the router never saw the prompt's blocks");
        std::thread::sleep(Duration::from_millis(20));
    }
    // aiperf's call (--reset-kv-cache): POST, no body, to the URL it benchmarks.
    let resp = ureq::post(&format!("{r}/reset_prefix_cache")).call();
    let reset: Value = resp.unwrap().into_json().unwrap();
    assert_eq!(reset["reset"].as_array().map(Vec::len), Some(2), "{reset}");
    assert_eq!(matched(&f), 0, "the router forgot the pods' blocks at once");
    let (_, direct, _) = post(&f.sim_url(holder), "/v1/completions", body.clone());
    assert_eq!(direct["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "the pod's cache is empty");
    // A pod reset directly (not through the gateway) reaches the router by its
    // AllBlocksCleared event.
    let t = Instant::now();
    while matched(&f) == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the router never saw the re-cached blocks");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(post(&f.sim_url(holder), "/reset_prefix_cache", json!({})).0, 200);
    let t = Instant::now();
    while matched(&f) > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "AllBlocksCleared never reached the router");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A model nobody serves; then a dead pod: a clear error naming it.
    assert_eq!(post(&admin, "/reset_prefix_cache?model=nope", json!({})).0, 404);
    let victim = f.sims[1 - holder];
    let mut c = f.children.0.remove(2 - holder); // children: [serve, sim0, sim1]
    let _ = c.kill();
    let _ = c.wait();
    let (code, e, _) = post(&admin, "/reset_prefix_cache", json!({"model": "m"}));
    assert_eq!(code, 502, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!(":{victim}")) && msg.contains("1 of 2"), "{msg}");
    assert_eq!(e["reset"].as_array().map(Vec::len), Some(1), "{e}");
    // /tokenize keeps working: a refused connection moves on to the live pod.
    for _ in 0..6 {
        assert_eq!(post(r, "/tokenize", json!({"model": "m", "prompt": "still here"})).0, 200);
    }
    // Once the router has taken the dead pod out of rotation, it no longer blocks resets:
    // the live pod resets, the dead one is listed as unreachable.
    let t = Instant::now();
    let e = loop {
        let (code, e, _) = post(&admin, "/reset_prefix_cache", json!({"model": "m"}));
        if code == 200 {
            break e;
        }
        assert_eq!(code, 502, "{e}");
        assert!(t.elapsed() < Duration::from_secs(15), "the dead pod never left rotation: {e}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(e["reset"].as_array().map(Vec::len), Some(1), "{e}");
    let unreachable = e["unreachable"].to_string();
    assert!(unreachable.contains(&format!(":{victim}")), "{e}");
}

#[test]
fn a_reset_during_a_running_request_is_refused_by_the_sim_and_reported_by_the_gateway() {
    let f = Fleet::start(1);
    let r = f.router.clone();
    // 5,000 tokens at 12 ms ÷ 100 each: ~600 ms of decoding holds the request's blocks.
    let long = std::thread::spawn(move || {
        post(&r, "/v1/completions", json!({"model": "m", "prompt": "x", "max_tokens": 5000})).0
    });
    let t = Instant::now();
    while common::metric_sum(&f.sims, "vllm:num_requests_running") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the long request never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let (code, e, _) = post(&f.sim_url(0), "/reset_prefix_cache", json!({}));
    assert_eq!(code, 409, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("not freed yet"), "{e}");
    // ?reset_running_requests=true waits for the running request instead.
    let ok = ureq::post(&format!("{}/reset_prefix_cache?reset_running_requests=true", common::admin(&f.router))).call();
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(long.join().unwrap(), 200);
}
