//! Black-box tests: `kvroute sim` plays both P/D roles as vLLM with the NixlConnector does.
//! Real sim processes, real HTTP between the test and the sims and between the decode sim
//! and the prefill sim (the side channel), a real libzmq SUB socket for the KV events.
//! Latency: prefill costs 20 ms of model time per uncached token here, the KV transfer
//! 3 µs per token (the 8b-h100 profile), so which one a request paid is unmistakable in
//! the TTFT histogram (model time).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{free_ports, Children};
use kvroute_events::{decode_batch, KvEvent};
use serde_json::{json, Value};

const SLOW_PREFILL: [&str; 2] = ["--prefill-per-token-us", "20000"];

fn base(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// POSTs `body` to `path`, with `x-request-id` if given: status and JSON body.
fn post(port: u16, path: &str, body: Value, request_id: Option<&str>) -> (u16, Value) {
    let mut req = ureq::post(&format!("{}{path}", base(port)));
    if let Some(id) = request_id {
        req = req.set("x-request-id", id);
    }
    match req.send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{path}: {e}"),
    }
}

fn get(port: u16, path: &str) -> Value {
    ureq::get(&format!("{}{path}", base(port))).call().unwrap().into_json().unwrap()
}

fn metric(port: u16, name: &str) -> f64 {
    common::metric_sum(&[port], name)
}

fn recomputes(port: u16, reason: &str) -> f64 {
    metric(
        port,
        &format!("kvroute_sim_kv_transfer_recomputes_total{{engine=\"0\",model_name=\"m\",reason=\"{reason}\"}}"),
    )
}

/// The token ids of `text` on the sim at `port`.
fn tokenize(port: u16, text: &str) -> Vec<u64> {
    let (_, v) = post(port, "/tokenize", json!({"model": "m", "prompt": text}), None);
    v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

/// The prefill leg as the gateway sends it: the reply's `kv_transfer_params`.
fn prefill(port: u16, prompt: Value, request_id: &str) -> Value {
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 1, "stream": false,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null}});
    let (status, v) = post(port, "/v1/completions", body, Some(request_id));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 1, "{v}");
    v["kv_transfer_params"].clone()
}

/// The decode leg: the prompt with the prefiller's params; asserts a normal 200 answer.
fn decode(port: u16, prompt: Value, kvp: Value) -> Value {
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 3, "kv_transfer_params": kvp});
    let (status, v) = post(port, "/v1/completions", body, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty(), "{v}");
    v
}

/// TTFT (model seconds) summed over the sim's requests so far.
fn ttft_sum(port: u16) -> f64 {
    metric(port, "vllm:time_to_first_token_seconds_sum")
}

/// A thread receiving on a bound SUB socket (it keeps calling into the socket, so libzmq
/// sends the subscription to the sim's publisher when it connects).
struct Subscriber {
    rx: std::sync::mpsc::Receiver<Vec<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    fn bind(port: u16) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let ctx = zmq::Context::new();
            let sub = ctx.socket(zmq::SUB).unwrap();
            sub.set_subscribe(b"").unwrap();
            sub.set_rcvtimeo(50).unwrap();
            sub.bind(&format!("tcp://127.0.0.1:{port}")).unwrap();
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(f) = sub.recv_multipart(0) {
                    let _ = tx.send(f);
                }
            }
        });
        Self { rx, stop, thread: Some(thread) }
    }

    /// Every event received until none came for `quiet`.
    fn drain(&self, quiet: Duration) -> Vec<KvEvent> {
        let mut out = Vec::new();
        while let Ok(f) = self.rx.recv_timeout(quiet) {
            out.extend(decode_batch(&f[2]).unwrap().events);
        }
        out
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn stored(events: &[KvEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| if let KvEvent::BlockStored(s) = e { Some(s.block_hashes.clone()) } else { None })
        .flatten()
        .collect()
}

fn removed(events: &[KvEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| if let KvEvent::BlockRemoved(r) = e { Some(r.block_hashes.clone()) } else { None })
        .flatten()
        .collect()
}

#[test]
fn the_decoder_reads_the_prefillers_real_blocks_caches_them_and_is_charged_the_transfer() {
    let [p, zp, d, zd] = free_ports(4).try_into().unwrap();
    let events = Subscriber::bind(zd);
    let _kids = Children(vec![common::sim(p, zp, &SLOW_PREFILL), common::sim(d, zd, &SLOW_PREFILL)]);
    std::thread::sleep(Duration::from_millis(300));
    let engine = get(p, "/nixl/engine");
    let engine_id = engine["engine_id"].as_str().unwrap().to_string();
    assert_eq!(engine_id.len(), 36, "a uuid: {engine}");
    assert_ne!(engine_id, get(d, "/nixl/engine")["engine_id"].as_str().unwrap(), "one engine id per process");

    let tokens = tokenize(p, &common::words("nixa", 200));
    let n = tokens.len();
    assert!(n >= 200);
    let kvp = prefill(p, json!(tokens), "req-a");
    assert_eq!(kvp["do_remote_prefill"], true, "{kvp}");
    assert_eq!(kvp["do_remote_decode"], false, "{kvp}");
    assert_eq!(kvp["remote_engine_id"], engine_id.as_str(), "{kvp}");
    assert_eq!(kvp["remote_request_id"], "cmpl-req-a-0", "{kvp}");
    assert_eq!(kvp["remote_host"], "127.0.0.1", "{kvp}");
    assert_eq!(kvp["remote_port"], p, "the side channel is the prefiller's own port: {kvp}");
    assert_eq!(kvp["tp_size"], 1);
    assert_eq!(kvp["remote_num_tokens"], n);
    let ids_a: Vec<u64> = kvp["remote_block_ids"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
    assert_eq!(ids_a.len(), n / 16, "one id per full prompt block: {kvp}");
    assert_eq!(ids_a.iter().collect::<HashSet<_>>().len(), ids_a.len(), "distinct: {ids_a:?}");
    // Another prompt, while A's blocks are pinned: its blocks are other blocks of the pool.
    let kvp_b = prefill(p, json!(common::words("nixb", 100)), "req-b");
    let ids_b: HashSet<u64> =
        kvp_b["remote_block_ids"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
    assert!(!ids_b.is_empty() && ids_a.iter().all(|i| !ids_b.contains(i)), "{ids_a:?} vs {ids_b:?}");
    let engine = get(p, "/nixl/engine");
    assert_eq!(engine["pinned_requests"], 2, "{engine}");
    assert_eq!(metric(p, "kvroute_sim_kv_transfer_pinned_blocks"), (ids_a.len() + ids_b.len()) as f64);
    // The prefiller paid the prefill (20 ms per token).
    assert!(ttft_sum(p) > 0.02 * n as f64, "prefill TTFT {}", ttft_sum(p));
    let _ = events.drain(Duration::from_millis(300));

    // The decoder reads A: charged the transfer (3 µs per token), not the prefill.
    let v = decode(d, json!(tokens), kvp.clone());
    assert_eq!(v["usage"]["prompt_tokens"], n);
    // (Half the prefill's cost: room for 20 ms of real scheduling delay, ×100 in model time.)
    let ttft = ttft_sum(d);
    assert!(ttft < 0.02 * n as f64 / 2.0, "the decoder recomputed instead of reading (TTFT {ttft} s)");
    assert_eq!(metric(d, "vllm:nixl_xfer_time_seconds_count"), 1.0);
    let xfer = metric(d, "vllm:nixl_xfer_time_seconds_sum");
    assert!((xfer - 3e-6 * n as f64).abs() < 1e-6, "transfer {xfer} s for {n} tokens");
    assert_eq!(metric(d, "vllm:nixl_bytes_transferred_sum"), (n * 131_072) as f64);
    assert_eq!(metric(d, "kvroute_sim_kv_transfer_recomputes_total"), 0.0);
    assert_eq!(metric(d, "vllm:nixl_num_failed_transfers_total"), 0.0);
    // The prefiller released A (B stays pinned).
    let engine = get(p, "/nixl/engine");
    assert_eq!(
        (engine["pinned_requests"].as_u64(), engine["pinned_blocks"].as_u64()),
        (Some(1), Some(ids_b.len() as u64))
    );
    // The decode sim announced the blocks: BlockStored for every full prompt block.
    let got = stored(&events.drain(Duration::from_millis(500)));
    assert_eq!(got.len(), n / 16, "BlockStored on the decode sim: {got:?}");
    // The same prompt again on the decode sim, no params: a cache hit.
    let hits_before = metric(d, "vllm:prefix_cache_hits_total");
    let (status, again) = post(d, "/v1/completions", json!({"model": "m", "prompt": tokens, "max_tokens": 2}), None);
    assert_eq!(status, 200, "{again}");
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() as usize;
    assert_eq!(cached, (n - 1) / 16 * 16, "{again}");
    assert_eq!(metric(d, "vllm:prefix_cache_hits_total") - hits_before, cached as f64);

    // A longer prompt sharing A's blocks: the decoder reads only what it lacks.
    let mut longer = tokens.clone();
    longer.extend(tokenize(p, &common::words("nixc", 80)));
    let kvp = prefill(p, json!(longer), "req-c");
    let (xfer, bytes) = (metric(d, "vllm:nixl_xfer_time_seconds_sum"), metric(d, "vllm:nixl_bytes_transferred_sum"));
    let v = decode(d, json!(longer), kvp);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], n / 16 * 16, "{v}");
    let lacking = longer.len() - n / 16 * 16;
    assert_eq!(metric(d, "vllm:nixl_bytes_transferred_sum") - bytes, (lacking * 131_072) as f64);
    let t = metric(d, "vllm:nixl_xfer_time_seconds_sum") - xfer;
    assert!((t - 3e-6 * lacking as f64).abs() < 1e-6, "transfer {t} s for {lacking} lacking tokens");
}

#[test]
fn params_read_twice_or_after_expiry_mean_a_local_recompute() {
    let [p, zp, d1, d2, zd] = free_ports(5).try_into().unwrap();
    // 200 s of model time pinned = 2 s real at the sims' 100× speedup.
    let extra = [SLOW_PREFILL[0], SLOW_PREFILL[1], "--kv-transfer-timeout-s", "200"];
    let _kids = Children(vec![
        common::sim(p, zp, &extra),
        common::sim(d1, zd, &SLOW_PREFILL),
        common::sim(d2, zd, &SLOW_PREFILL),
    ]);
    let prompt = json!(common::words("twice", 150));
    let kvp = prefill(p, prompt.clone(), "req-twice");
    decode(d1, prompt.clone(), kvp.clone());
    assert_eq!(metric(d1, "vllm:nixl_xfer_time_seconds_count"), 1.0);
    // The same params again, on another decoder: the prefiller released them after the
    // first read, so this one computes the prompt itself — and still answers.
    let v = decode(d2, prompt, kvp);
    let n = v["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(recomputes(d2, "unknown_request"), 1.0);
    assert_eq!(metric(d2, "vllm:nixl_num_failed_transfers_total"), 1.0);
    assert_eq!(metric(d2, "vllm:nixl_xfer_time_seconds_count"), 0.0);
    assert!(ttft_sum(d2) >= 0.02 * n, "a recompute pays the prefill (TTFT {} s)", ttft_sum(d2));

    // Expiry: nobody reads B within the timeout; its blocks go back to the LRU.
    let prompt_b = json!(common::words("expire", 150));
    let kvp_b = prefill(p, prompt_b.clone(), "req-expire");
    assert_eq!(get(p, "/nixl/engine")["pinned_requests"], 1);
    let t = Instant::now();
    while get(p, "/nixl/engine")["pinned_requests"] != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the pin never expired");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(p, "kvroute_sim_kv_transfer_expired_total"), 1.0);
    assert_eq!(metric(p, "kvroute_sim_kv_transfer_pinned_blocks"), 0.0);
    assert_eq!(metric(p, "vllm:kv_cache_usage_perc"), 0.0, "expired blocks are free");
    decode(d1, prompt_b.clone(), kvp_b);
    assert_eq!(recomputes(d1, "unknown_request"), 1.0);
    // Still cached on the prefiller: the prompt again there is a hit.
    let (_, again) = post(p, "/v1/completions", json!({"model": "m", "prompt": prompt_b, "max_tokens": 1}), None);
    assert!(again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 128, "{again}");
}

#[test]
fn garbage_transfer_params_mean_a_local_recompute_and_no_panic() {
    let [p, zp, d, dead] = free_ports(4).try_into().unwrap();
    let _kids = Children(vec![common::sim(p, zp, &SLOW_PREFILL), common::sim(d, zp, &SLOW_PREFILL)]);
    let prompt = json!(common::words("garbage", 120));
    let kvp = prefill(p, prompt.clone(), "req-g");
    let with = |k: &str, v: Value| {
        let mut x = kvp.clone();
        x[k] = v;
        x
    };
    let cases = [
        (with("remote_block_ids", json!("x")), "invalid_params"),
        (with("remote_port", json!("not a port")), "invalid_params"),
        (json!({"do_remote_prefill": true}), "invalid_params"),
        (with("remote_engine_id", json!("00000000-0000-4000-8000-000000000000")), "mismatch"),
        (with("remote_block_ids", json!([1, 2, 3])), "mismatch"),
        (with("remote_request_id", json!("cmpl-nobody-0")), "unknown_request"),
        (with("remote_port", json!(dead)), "unreachable"),
        (with("remote_host", json!("127.0.0.1:99999")), "unreachable"),
    ];
    let ttft_local = 0.02 * 120.0;
    for (i, (params, reason)) in cases.iter().enumerate() {
        let before = (recomputes(d, reason), ttft_sum(d));
        // Each case a prompt of its own, so no case is a cache hit of an earlier one.
        let prompt = json!(common::words(&format!("garbage{i}x"), 120));
        decode(d, prompt, params.clone());
        assert_eq!(recomputes(d, reason), before.0 + 1.0, "case {i}: {params}");
        assert!(ttft_sum(d) - before.1 >= ttft_local, "case {i} was not recomputed: {params}");
    }
    assert_eq!(metric(d, "kvroute_sim_kv_transfer_recomputes_total"), cases.len() as f64);
    // Failed reads (attempted, refused or unreachable) are vLLM's failed transfers.
    assert_eq!(metric(d, "vllm:nixl_num_failed_transfers_total"), 5.0);
    assert_eq!(metric(d, "vllm:nixl_xfer_time_seconds_count"), 0.0);
    // None of it released the pinned request: the genuine read still works.
    assert_eq!(get(p, "/nixl/engine")["pinned_requests"], 1);
    decode(d, prompt, kvp);
    assert_eq!(metric(d, "vllm:nixl_xfer_time_seconds_count"), 1.0);
    common::wait_healthy(&base(d));
    common::wait_healthy(&base(p));
}

#[test]
fn blocks_pinned_for_a_pending_read_are_not_evicted_by_cache_pressure() {
    let [p, zp, d, zd] = free_ports(4).try_into().unwrap();
    let events = Subscriber::bind(zp);
    // 40 blocks of 16 tokens on the prefiller.
    let kids = Children(vec![common::sim(p, zp, &["--num-gpu-blocks", "40"]), common::sim(d, zd, &SLOW_PREFILL)]);
    std::thread::sleep(Duration::from_millis(300));
    let ids = tokenize(p, &common::words("pressure", 400));
    let block = |i: usize, len: usize| -> Vec<u64> { ids[i..i + len].to_vec() };
    // A: 20 full blocks, pinned for its decoder.
    let a = block(0, 320);
    let kvp = prefill(p, json!(a), "req-pinned");
    let hashes_a: HashSet<u64> = stored(&events.drain(Duration::from_millis(300))).into_iter().collect();
    assert_eq!(hashes_a.len(), 20);
    assert!(metric(p, "vllm:kv_cache_usage_perc") >= 0.5, "pinned blocks count as used");
    // B then C, 15 blocks each (+1 for the output): C only fits by evicting.
    let (b, c): (Vec<u64>, Vec<u64>) =
        (block(400 - 240, 240), tokenize(p, &common::words("other", 300))[..240].to_vec());
    for prompt in [b, c] {
        let (status, v) = post(p, "/v1/completions", json!({"model": "m", "prompt": prompt, "max_tokens": 1}), None);
        assert_eq!(status, 200, "{v}");
    }
    let gone = removed(&events.drain(Duration::from_millis(300)));
    assert!(!gone.is_empty(), "the cache was not under pressure");
    assert!(gone.iter().all(|h| !hashes_a.contains(h)), "pinned blocks were evicted: {gone:?}");
    // The decoder's read still finds A's blocks.
    decode(d, json!(a), kvp);
    assert_eq!(metric(d, "vllm:nixl_xfer_time_seconds_count"), 1.0);
    assert_eq!(metric(d, "kvroute_sim_kv_transfer_recomputes_total"), 0.0);
    drop(kids);
}
