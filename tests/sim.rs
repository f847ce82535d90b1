//! Black-box tests of `kvroute sim`: child processes, a real HTTP client, a real libzmq
//! SUB socket, and the official `openai` Python client.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvroute_events::{decode_batch, KvEvent};
use kvroute_keys::{BlockHasher, HashAlgo, HashConfig, RequestExtras};
use serde_json::{json, Value};

mod common;

/// Distinct free ports, below the ephemeral range (`common::free_run`).
fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| common::free_run(1))
}

struct Sim {
    child: Child,
    base: String,
}

impl Sim {
    fn start(port: u16, args: &[&str]) -> Sim {
        let child = Command::new(env!("CARGO_BIN_EXE_kvroute"))
            .args(["sim", "--port", &port.to_string(), "--model", "m"])
            .args(args)
            .env("PYTHONHASHSEED", "42")
            .env("RUST_LOG", std::env::var("SIM_LOG").unwrap_or("warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let s = Sim { child, base: format!("http://127.0.0.1:{port}") };
        let t = Instant::now();
        while ureq::get(&format!("{}/health", s.base)).call().is_err() {
            assert!(t.elapsed() < Duration::from_secs(15), "kvroute sim did not become healthy");
            std::thread::sleep(Duration::from_millis(30));
        }
        s
    }

    fn post(&self, path: &str, body: Value) -> Result<Value, (u16, Value)> {
        match ureq::post(&format!("{}{path}", self.base)).send_json(body) {
            Ok(r) => Ok(r.into_json().unwrap()),
            Err(ureq::Error::Status(code, r)) => Err((code, r.into_json().unwrap_or(Value::Null))),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn metric(&self, name: &str) -> f64 {
        let text = ureq::get(&format!("{}/metrics", self.base)).call().unwrap().into_string().unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// vLLM's hasher as the sims in these tests run it (sha256_cbor, PYTHONHASHSEED=42, 16).
fn vllm_sha256_cbor_seed_42() -> BlockHasher {
    let cfg = HashConfig { algo: HashAlgo::Sha256Cbor, seed: Some("42".into()), block_size: 16, ..Default::default() };
    BlockHasher::new(cfg).unwrap()
}

fn prompt(words: usize, tag: &str) -> String {
    (0..words).map(|i| format!("{tag}{i}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn a_repeated_prompt_is_served_from_the_prefix_cache() {
    let [p] = free_ports::<1>();
    let s = Sim::start(p, &["--speedup", "1000"]);
    let body = json!({"model": "m", "prompt": prompt(100, "w"), "max_tokens": 5});
    let first = s.post("/v1/completions", body.clone()).unwrap();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let second = s.post("/v1/completions", body).unwrap();
    let n = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(n, 100);
    assert!(second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= (n - 1) / 16 * 16);
    assert_eq!(second["usage"]["completion_tokens"], 5);
    // Chat requests are cached too, and a different salt does not hit.
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": prompt(60, "c")}], "max_tokens": 2});
    s.post("/v1/chat/completions", chat.clone()).unwrap();
    let again = s.post("/v1/chat/completions", chat.clone()).unwrap();
    assert!(again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 48);
    let mut salted = chat;
    salted["cache_salt"] = json!("tenant-b");
    let r = s.post("/v1/chat/completions", salted).unwrap();
    assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[test]
fn block_stored_hashes_match_vllm_rules_and_eviction_emits_block_removed() {
    let [p, z] = free_ports::<2>();
    // A thread keeps calling into the SUB socket: libzmq only sends a SUB's subscription to
    // a newly connected publisher when the owning thread uses the socket.
    let (rx, stop) = subscriber(z);
    let cfg = format!(
        r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:{z}","topic":"kv@127.0.0.1:{p}@m"}}"#
    );
    // 8 blocks of 16 tokens: the second prompt evicts the first one's blocks.
    let s = Sim::start(
        p,
        &[
            "--block-size",
            "16",
            "--hash-algo",
            "sha256_cbor",
            "--speedup",
            "100",
            "--num-gpu-blocks",
            "8",
            "--kv-events-config",
            &cfg,
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let text = prompt(64, "a");
    let tokens: Vec<u32> =
        serde_json::from_value(s.post("/tokenize", json!({"model": "m", "prompt": text})).unwrap()["tokens"].clone())
            .unwrap();
    assert_eq!(tokens.len(), 64);
    s.post("/v1/completions", json!({"model": "m", "prompt": text, "max_tokens": 1})).unwrap();
    let frames = rx.recv_timeout(Duration::from_secs(5)).expect("a KV-event message");
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0], format!("kv@127.0.0.1:{p}@m").as_bytes());
    assert_eq!(frames[1], 0u64.to_be_bytes());
    let batch = decode_batch(&frames[2]).unwrap();
    let KvEvent::BlockStored(st) = &batch.events[0] else { panic!("{:?}", batch.events) };
    // Independently: vLLM's sha256_cbor with PYTHONHASHSEED=42 over the /tokenize ids.
    let h = vllm_sha256_cbor_seed_42();
    let mut want = Vec::new();
    h.event_keys(&tokens, &RequestExtras::default(), &mut want);
    assert_eq!(st.block_hashes, want);
    assert_eq!(st.parent_block_hash, None);
    assert_eq!(st.token_ids, tokens);
    // A different prompt needing the space evicts: BlockRemoved for the first blocks.
    s.post("/v1/completions", json!({"model": "m", "prompt": prompt(96, "b"), "max_tokens": 1})).unwrap();
    let mut removed = Vec::new();
    while let Ok(f) = rx.recv_timeout(Duration::from_secs(5)) {
        for e in decode_batch(&f[2]).unwrap().events {
            if let KvEvent::BlockRemoved(r) = e {
                removed.extend(r.block_hashes);
            }
        }
        if !removed.is_empty() {
            break;
        }
    }
    assert!(!removed.is_empty() && removed.iter().all(|r| want.contains(r)), "{removed:?}");
    stop();
}

#[test]
fn metrics_add_up() {
    let [p] = free_ports::<1>();
    let s = Sim::start(p, &["--speedup", "1000"]);
    let (mut prompt_total, mut cached_total, mut gen_total) = (0, 0, 0);
    for i in 0..6 {
        let r = s
            .post("/v1/completions", json!({"model": "m", "prompt": prompt(40 + i % 3, "x"), "max_tokens": 3}))
            .unwrap();
        prompt_total += r["usage"]["prompt_tokens"].as_u64().unwrap();
        cached_total += r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        gen_total += r["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert!(cached_total > 0);
    assert_eq!(s.metric("vllm:prefix_cache_queries_total"), prompt_total as f64);
    assert_eq!(s.metric("vllm:prefix_cache_hits_total"), cached_total as f64);
    assert_eq!(s.metric("vllm:prompt_tokens_total"), prompt_total as f64);
    assert_eq!(s.metric("vllm:generation_tokens_total"), gen_total as f64);
    assert_eq!(s.metric("vllm:request_success_total"), 6.0);
    assert_eq!(s.metric("vllm:time_to_first_token_seconds_count"), 6.0);
    assert_eq!(s.metric("vllm:num_requests_running"), 0.0);
    assert_eq!(s.metric("vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(s.metric("vllm:cache_config_info"), 1.0);
}

#[test]
fn a_full_queue_answers_429_and_errors_are_clear() {
    let [p] = free_ports::<1>();
    let s = Sim::start(p, &["--max-num-seqs", "1", "--max-waiting", "0", "--inter-token-latency-us", "20000"]);
    let base = s.base.clone();
    let long = std::thread::spawn(move || {
        ureq::post(&format!("{base}/v1/completions"))
            .send_json(json!({"model": "m", "prompt": "hello", "max_tokens": 60}))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(300));
    let (code, body) = s.post("/v1/completions", json!({"model": "m", "prompt": "hi", "max_tokens": 1})).unwrap_err();
    assert_eq!(code, 429, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("queue is full"));
    assert!(long.join().unwrap().is_ok());
    // Unknown model, bad body, forced error.
    assert_eq!(s.post("/v1/completions", json!({"model": "nope", "prompt": "x"})).unwrap_err().0, 404);
    assert_eq!(s.post("/v1/completions", json!({"prompt": "x"})).unwrap_err().0, 400);
    let r = ureq::post(&format!("{}/v1/completions", s.base))
        .set("X-Return-Error", "503")
        .send_json(json!({"model": "m", "prompt": "x"}));
    assert!(matches!(r, Err(ureq::Error::Status(503, _))));
}

#[test]
fn the_official_openai_python_client_streams_from_it() {
    let [p] = free_ports::<1>();
    let s = Sim::start(p, &["--speedup", "1000"]);
    let script = format!(
        r#"
import sys
try:
    from openai import OpenAI
except ImportError:
    sys.exit("the `openai` package is missing: pip install openai (scripts/test.sh does)")
c = OpenAI(base_url="{}/v1", api_key="unused")
text, usage = "", None
for chunk in c.chat.completions.create(model="m", messages=[{{"role": "user", "content": "hello there"}}],
                                       max_tokens=7, stream=True, stream_options={{"include_usage": True}}):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
assert len(text.split()) == 7, text
assert usage.completion_tokens == 7 and usage.prompt_tokens_details.cached_tokens == 0, usage
r = c.completions.create(model="m", prompt="hello there", max_tokens=2)
assert r.usage.completion_tokens == 2
print("ok")
"#,
        s.base
    );
    let out = Command::new("python3").args(["-c", &script]).output().expect("python3");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn with_a_real_tokenizer_chats_are_tokenized_like_the_reference_render() {
    use kvroute_tokenize::Tokenizer;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var("KVROUTE_TOKENIZERS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target/tokenizers"));
    let qwen = dir.join("qwen3");
    assert!(qwen.join("tokenizer.json").exists(), "run scripts/fetch-tokenizers.sh");
    let vectors = std::env::var("KVROUTE_VECTORS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("../shared/vectors"));
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(vectors.join("tokenizers/reference_renders.json")).unwrap())
            .unwrap();
    let [p] = free_ports::<1>();
    let s = Sim::start(p, &["--speedup", "1000", "--tokenizer", qwen.to_str().unwrap()]);
    let messages = json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is a KV cache?"},
        {"role": "assistant", "content": "A cache of attention keys and values."},
        {"role": "user", "content": "  And prefix caching? "}
    ]);
    let got: Vec<u32> = serde_json::from_value(
        s.post("/tokenize", json!({"model": "m", "messages": messages})).unwrap()["tokens"].clone(),
    )
    .unwrap();
    let hf = kvroute_tokenize::HfTokenizer::from_dir(&qwen).unwrap();
    assert_eq!(got, hf.encode(reference["chat"]["qwen3"].as_str().unwrap(), false));
    let r = s.post("/v1/chat/completions", json!({"model": "m", "messages": messages, "max_tokens": 3})).unwrap();
    assert_eq!(r["usage"]["prompt_tokens"].as_u64(), Some(got.len() as u64));
    assert!(!r["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
}

/// A thread that keeps receiving on a bound SUB socket: libzmq sends a SUB's subscription
/// to a newly connected publisher only when the owning thread calls into the socket, so an
/// idle socket would miss the first messages.
fn subscriber(z: u16) -> (std::sync::mpsc::Receiver<Vec<Vec<u8>>>, impl FnOnce()) {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Vec<u8>>>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let h = std::thread::spawn(move || {
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB).unwrap();
        sub.set_subscribe(b"").unwrap();
        sub.set_rcvtimeo(50).unwrap();
        sub.bind(&format!("tcp://127.0.0.1:{z}")).unwrap();
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(f) = sub.recv_multipart(0) {
                let _ = tx.send(f);
            }
        }
    });
    (rx, move || {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().unwrap();
    })
}

#[test]
fn lora_prefill_decode_and_replay_behave_like_vllm() {
    let [p, z, r] = free_ports::<3>();
    let (rx, stop) = subscriber(z);
    let cfg = format!(
        r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:{z}","replay_endpoint":"tcp://*:{r}","topic":"kv@127.0.0.1:{p}@m"}}"#
    );
    let s = Sim::start(
        p,
        &[
            "--speedup",
            "1000",
            "--hash-algo",
            "sha256_cbor",
            "--lora-modules",
            "sql-lora=/adapters/sql-lora",
            "--kv-events-config",
            &cfg,
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    // Models: the base model and the adapter (root = its path, parent = the base).
    let models: Value = ureq::get(&format!("{}/v1/models", s.base)).call().unwrap().into_json().unwrap();
    assert_eq!(models["data"][1]["id"], "sql-lora");
    assert_eq!(models["data"][1]["root"], "/adapters/sql-lora");
    assert_eq!(models["data"][1]["parent"], "m");
    // A LoRA request: its blocks are hashed with ("lora", name, path) as vLLM 0.33 does.
    let text = prompt(32, "q");
    let tokens: Vec<u32> =
        serde_json::from_value(s.post("/tokenize", json!({"model": "m", "prompt": text})).unwrap()["tokens"].clone())
            .unwrap();
    s.post("/v1/completions", json!({"model": "sql-lora", "prompt": text, "max_tokens": 1})).unwrap();
    let f = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let KvEvent::BlockStored(st) = &decode_batch(&f[2]).unwrap().events[0] else { panic!() };
    assert_eq!((st.lora_name.as_deref(), st.lora_id), (Some("sql-lora"), Some(1)));
    let h = vllm_sha256_cbor_seed_42();
    let lora = RequestExtras {
        lora: Some(kvroute_keys::LoraRef { name: "sql-lora".into(), path: "/adapters/sql-lora".into(), int_id: 1 }),
        ..Default::default()
    };
    let mut want = Vec::new();
    h.event_keys(&tokens, &lora, &mut want);
    assert_eq!(st.block_hashes, want);
    let text = ureq::get(&format!("{}/metrics", s.base)).call().unwrap().into_string().unwrap();
    assert!(text.contains("vllm:lora_requests_info{max_lora=\"1\""), "{text}");
    // P/D: the prefill side answers with kv_transfer_params; streaming it is refused.
    let pre = s
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": prompt(40, "pd"), "max_tokens": 50,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false}}),
        )
        .unwrap();
    assert_eq!(pre["kv_transfer_params"]["do_remote_prefill"], true);
    assert_eq!(pre["usage"]["completion_tokens"], 1);
    let err = s.post(
        "/v1/completions",
        json!({"model": "m", "prompt": "x", "stream": true, "kv_transfer_params": {"do_remote_decode": true}}),
    );
    assert_eq!(err.unwrap_err().0, 400);
    let dec = s
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": prompt(40, "pd"), "max_tokens": 3,
        "kv_transfer_params": pre["kv_transfer_params"].clone()}),
        )
        .unwrap();
    assert_eq!(dec["usage"]["completion_tokens"], 3);
    // Replay: a DEALER asking from seq 0 gets every batch so far, then the end marker.
    let mut published = 1;
    while rx.recv_timeout(Duration::from_millis(300)).is_ok() {
        published += 1;
    }
    let ctx = zmq::Context::new();
    let dealer = ctx.socket(zmq::DEALER).unwrap();
    dealer.set_rcvtimeo(3000).unwrap();
    dealer.connect(&format!("tcp://127.0.0.1:{r}")).unwrap();
    dealer.send_multipart([&b""[..], &0u64.to_be_bytes()[..]], 0).unwrap();
    let mut replies = 0;
    loop {
        let fr = dealer.recv_multipart(0).expect("replay reply");
        assert_eq!(fr.len(), 4, "vLLM >= 0.26 framing: ['', topic, seq, payload]");
        if fr[2] == u64::MAX.to_be_bytes() {
            assert!(fr[3].is_empty());
            break;
        }
        assert_eq!(u64::from_be_bytes(fr[2].as_slice().try_into().unwrap()), replies);
        decode_batch(&fr[3]).unwrap();
        replies += 1;
    }
    assert_eq!(replies, published);
    stop();
}
