//! Black-box tests of `kvroute serve`: the binary runs as a child process; real libzmq
//! PUB / ROUTER sockets (the `zmq` crate) publish vLLM's recorded frames
//! (`../shared/vectors/vllm_kv_events.json`); assertions go through the HTTP API.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::free_port_pair;
use serde_json::{json, Value};

mod common;

fn vectors() -> Value {
    let dir = std::env::var("KVROUTE_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors"));
    serde_json::from_str(&std::fs::read_to_string(dir.join("vllm_kv_events.json")).unwrap()).unwrap()
}

/// Distinct free ports, below the ephemeral range (`common::free_run`).
fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| common::free_run(1))
}

fn free_port() -> u16 {
    free_ports::<1>()[0]
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

/// Recorded ZMQ messages: a list of messages, each a list of hex frames.
fn frames(v: &Value) -> Vec<Vec<Vec<u8>>> {
    v.as_array().unwrap().iter().map(|m| m.as_array().unwrap().iter().map(unhex).collect()).collect()
}

/// A running `kvroute serve`, killed on drop.
struct Server {
    child: Child,
    base: String,
    /// The admin listener (`/v1/kv/*`, `/metrics`).
    admin: String,
}

impl Server {
    fn start(args: &[String]) -> Server {
        // Retried with another HTTP port if the child exits early (port taken meanwhile).
        for _ in 0..3 {
            let (port, admin_port) = (free_port(), free_port());
            let mut child = Command::new(env!("CARGO_BIN_EXE_kvroute"))
                .arg("serve")
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
                .args(args)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let base = format!("http://127.0.0.1:{port}");
            let t = Instant::now();
            loop {
                if ureq::get(&format!("{base}/health")).call().is_ok() {
                    return Server { child, base, admin: format!("http://127.0.0.1:{admin_port}") };
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(15), "kvroute serve did not become healthy");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("kvroute serve exited before becoming healthy, three times");
    }

    fn score(&self, tokens: &[u32]) -> Value {
        ureq::post(&format!("{}/v1/kv/score", self.admin))
            .send_json(json!({"model": "m", "token_ids": tokens}))
            .unwrap()
            .into_json()
            .unwrap()
    }

    fn matched(&self, pod: &str, tokens: &[u32]) -> u64 {
        let r = self.score(tokens);
        r["scores"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["pod"] == pod)
            .map_or(0, |s| s["matched_blocks"].as_u64().unwrap())
    }

    fn pod(&self, pod: &str) -> Value {
        let v: Value = ureq::get(&format!("{}/v1/kv/pods", self.admin)).call().unwrap().into_json().unwrap();
        v["pods"].as_array().unwrap().iter().find(|p| p["pod"] == pod).cloned().unwrap_or(Value::Null)
    }

    fn metric(&self, name: &str) -> f64 {
        let text = ureq::get(&format!("{}/metrics", self.admin)).call().unwrap().into_string().unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// Polls until `cond` holds (events cross a socket and a queue).
    fn wait_for(&self, what: &str, mut cond: impl FnMut(&Server) -> bool) {
        let t = Instant::now();
        while !cond(self) {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real libzmq PUB socket, like vLLM's publisher.
struct Publisher {
    sock: zmq::Socket,
}

impl Publisher {
    fn connect(ctx: &zmq::Context, endpoint: &str) -> Publisher {
        let sock = ctx.socket(zmq::PUB).unwrap();
        sock.connect(endpoint).unwrap();
        std::thread::sleep(Duration::from_millis(400)); // let the subscription arrive
        Publisher { sock }
    }

    fn bind(ctx: &zmq::Context, endpoint: &str) -> Publisher {
        let sock = ctx.socket(zmq::PUB).unwrap();
        sock.set_linger(0).unwrap();
        sock.bind(endpoint).unwrap();
        std::thread::sleep(Duration::from_millis(600)); // let the subscriber (re)connect
        Publisher { sock }
    }

    fn send(&self, frames: &[Vec<u8>]) {
        self.sock.send_multipart(frames, 0).unwrap();
    }

    fn send_batch(&self, topic: &str, seq: u64, payload: &[u8]) {
        self.send(&[topic.as_bytes().to_vec(), seq.to_be_bytes().to_vec(), payload.to_vec()]);
    }
}

/// A ROUTER replay endpoint answering like vLLM (old 3-frame or new 4-frame replies).
struct ReplayServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ReplayServer {
    /// `replies(start)` gives the frames (without the identity) to send for a request.
    fn start(ctx: &zmq::Context, endpoint: &str, replies: impl Fn(u64) -> Vec<Vec<Vec<u8>>> + Send + 'static) -> Self {
        let sock = ctx.socket(zmq::ROUTER).unwrap();
        sock.bind(endpoint).unwrap();
        sock.set_rcvtimeo(50).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let Ok(req) = sock.recv_multipart(0) else { continue };
                assert_eq!(req.len(), 3, "replay request must be [identity, '', seq]");
                assert!(req[1].is_empty());
                let start = u64::from_be_bytes(req[2].as_slice().try_into().unwrap());
                for mut frames in replies(start) {
                    frames.insert(0, req[0].clone());
                    sock.send_multipart(frames, 0).unwrap();
                }
            }
        });
        ReplayServer { stop, thread: Some(thread) }
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tokens(n: u32) -> Vec<u32> {
    (0..n).collect()
}

#[test]
fn starts_with_the_documented_flags_and_answers_health() {
    let z = free_port();
    let s = Server::start(
        &[
            "--zmq-bind",
            &format!("tcp://127.0.0.1:{z}"),
            "--block-size",
            "16",
            "--hash-algo",
            "sha256_cbor",
            "--hash-seed",
            "42",
        ]
        .map(String::from),
    );
    let body = ureq::get(&format!("{}/health", s.base)).call().unwrap().into_string().unwrap();
    assert_eq!(body, "ok");
    assert_eq!(s.score(&tokens(64))["scores"], json!([]));
}

#[test]
fn recorded_live_frames_of_0_23_and_0_33_are_indexed() {
    let v = vectors();
    for ver in ["0.23.0", "0.33.0"] {
        let f = &v["frames"][ver];
        let z = free_port();
        let s = Server::start(&["--zmq-bind".into(), format!("tcp://127.0.0.1:{z}")]);
        let ctx = zmq::Context::new();
        let publisher = Publisher::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
        let live = frames(&f["live_frames_hex"]);
        // Frame 0: BlockStored of tokens 0..31 (2 blocks) on topic "kv-events".
        publisher.send(&live[0]);
        s.wait_for("2 blocks indexed", |s| s.matched("kv-events", &tokens(32)) == 2);
        assert_eq!(s.matched("kv-events", &tokens(16)), 1);
        // Frames 1 (BlockRemoved of another block) and 2 (AllBlocksCleared).
        publisher.send(&live[1]);
        publisher.send(&live[2]);
        s.wait_for("pod cleared", |s| s.pod("kv-events")["last_seq"] == 2);
        assert_eq!(s.matched("kv-events", &tokens(32)), 0, "{ver}: AllBlocksCleared");
        let p = s.pod("kv-events");
        assert_eq!(
            (p["received"].as_u64(), p["gaps"].as_u64(), p["malformed"].as_u64()),
            (Some(3), Some(0), Some(0)),
            "{ver}"
        );
    }
}

#[test]
fn a_gap_is_repaired_from_the_recorded_replay_frames() {
    let v = vectors();
    for ver in ["0.23.0", "0.33.0"] {
        let f = &v["frames"][ver];
        let [z, r] = free_ports::<2>();
        let ctx = zmq::Context::new();
        let recorded = frames(&f["replay_reply_frames_hex_received_by_DEALER"]);
        let requested_from =
            u64::from_be_bytes(unhex(&f["replay_request_frames_hex_sent_by_DEALER"][1]).try_into().unwrap());
        let _replay = ReplayServer::start(&ctx, &format!("tcp://127.0.0.1:{r}"), move |start| {
            if start == 0 {
                // kvroute's start-up rebuild: nothing buffered yet, just the end marker.
                return vec![vec![vec![], vec![], u64::MAX.to_be_bytes().to_vec(), vec![]]];
            }
            assert_eq!(start, requested_from, "kvroute asks from the first missing seq");
            recorded.clone()
        });
        let publisher = Publisher::bind(&ctx, &format!("tcp://127.0.0.1:{z}"));
        let s = Server::start(&[
            "--no-zmq-bind".into(),
            "--zmq-connect".into(),
            format!("vllm-a=tcp://127.0.0.1:{z},replay=tcp://127.0.0.1:{r}"),
        ]);
        std::thread::sleep(Duration::from_millis(500));
        let live = frames(&f["live_frames_hex"]);
        publisher.send(&live[0]);
        s.wait_for("seq 0 applied", |s| s.matched("vllm-a", &tokens(32)) == 2);
        // Seq 1 is lost; seq 2 arrives: kvroute replays 1.. and converges.
        publisher.send(&live[2]);
        s.wait_for("gap replayed", |s| s.pod("vllm-a")["applied_batches"] == 3);
        let p = s.pod("vllm-a");
        assert_eq!(p["gaps"], 1, "{ver}");
        assert_eq!(p["replay_failures"], 0, "{ver}: {p}");
        assert_eq!(p["applied_batches"], 3, "{ver}: 0 live, then 1 and 2 replayed: {p}");
        assert_eq!(s.matched("vllm-a", &tokens(32)), 0, "{ver}: the replayed AllBlocksCleared applied");
    }
}

/// Payloads of vLLM 0.33's real BlockPool (sha256, seed 0): blocks 0-1, then 2-3.
fn pool_payloads() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let v = vectors();
    let sc = &v["versions"]["0.33.0"]["scenarios"][0];
    let get = |name: &str| {
        unhex(
            &sc["batches"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap()
                ["payload_hex_with_dp_rank_0"],
        )
    };
    (get("store_no_parent"), get("store_with_parent"), get("store_extra_keys"))
}

#[test]
fn a_publisher_skipping_sequence_numbers_converges_through_replay() {
    let (b0, b1, b2) = pool_payloads();
    let [z, r] = free_ports::<2>();
    let ctx = zmq::Context::new();
    let topic = "kv@127.0.0.1:8000@Qwen/Qwen3-0.6B";
    let buffer = [(0u64, b0.clone()), (1, b1.clone()), (2, b2.clone())];
    let _replay = ReplayServer::start(&ctx, &format!("tcp://127.0.0.1:{r}"), move |start| {
        let mut out: Vec<Vec<Vec<u8>>> = buffer
            .iter()
            .filter(|(s, _)| *s >= start)
            .map(|(s, p)| vec![vec![], topic.as_bytes().to_vec(), s.to_be_bytes().to_vec(), p.clone()])
            .collect();
        out.push(vec![vec![], vec![], u64::MAX.to_be_bytes().to_vec(), vec![]]);
        out
    });
    // Replays go to known pods' hosts only.
    let s = Server::start(
        &["--zmq-bind", &format!("tcp://127.0.0.1:{z}"), "--replay-port", &r.to_string()]
            .map(String::from)
            .into_iter()
            .chain(["--zmq-known-pod".into(), "127.0.0.1:8000".into()])
            .collect::<Vec<_>>(),
    );
    let publisher = Publisher::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    publisher.send_batch(topic, 0, &b0);
    s.wait_for("blocks 0-1", |s| s.matched("127.0.0.1:8000", &tokens(64)) == 2);
    publisher.send_batch(topic, 2, &b2); // seq 1 (blocks 2-3) never arrives live
    s.wait_for("blocks 2-3 replayed", |s| s.matched("127.0.0.1:8000", &tokens(64)) == 4);
    let p = s.pod("127.0.0.1:8000");
    assert_eq!((p["gaps"].as_u64(), p["replays"].as_u64(), p["replay_failures"].as_u64()), (Some(1), Some(1), Some(0)));
    assert_eq!(p["model"], "Qwen/Qwen3-0.6B");
    assert_eq!(s.metric("kvroute_kv_seq_gaps_total"), 1.0);
}

#[test]
fn an_unrepairable_gap_stops_trusting_the_pod() {
    let (b0, b1, b2) = pool_payloads();
    let z = free_port();
    let ctx = zmq::Context::new();
    let s = Server::start(&["--zmq-bind".into(), format!("tcp://127.0.0.1:{z}")]); // no replay
    let publisher = Publisher::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    let topic = "kv@pod-b:8000@m";
    publisher.send_batch(topic, 0, &b0);
    publisher.send_batch(topic, 1, &b1);
    s.wait_for("4 blocks", |s| s.matched("pod-b:8000", &tokens(64)) == 4);
    publisher.send_batch(topic, 5, &b2);
    // The gap counts once the stream goes on from it (one stray message does not).
    publisher.send_batch(topic, 6, &b2);
    s.wait_for("gap seen", |s| s.pod("pod-b:8000")["gaps"] == 1);
    s.wait_for("pod cleared", |s| s.matched("pod-b:8000", &tokens(64)) == 0);
}

#[test]
fn a_restarted_publisher_leaves_no_stale_blocks_and_a_vanished_one_is_redialled() {
    let (b0, b1, b2) = pool_payloads();
    let z = free_port();
    let ctx = zmq::Context::new();
    let endpoint = format!("tcp://127.0.0.1:{z}");
    let first = Publisher::bind(&ctx, &endpoint);
    let s = Server::start(&["--no-zmq-bind".into(), "--zmq-connect".into(), format!("10.0.0.9:8000={endpoint}")]);
    std::thread::sleep(Duration::from_millis(500));
    first.send_batch("", 0, &b0);
    first.send_batch("", 1, &b1);
    s.wait_for("4 blocks", |s| s.matched("10.0.0.9:8000", &tokens(64)) == 4);
    // The engine goes away…
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    // …and comes back on the same port with an empty cache and a fresh sequence.
    let second = Publisher::bind(&ctx, &endpoint);
    second.send_batch("", 0, &b2); // a different request's blocks (LoRA + salt)
                                   // The restart counts once the new stream goes on (seq 1 after seq 0).
    second.send_batch("", 1, &b0);
    s.wait_for("restart seen", |s| s.pod("10.0.0.9:8000")["restarts"] == 1);
    // Blocks 0-1 again, not 2-3 from before the restart.
    s.wait_for("new blocks after re-dial, no stale ones", |s| s.matched("10.0.0.9:8000", &tokens(64)) == 2);
}

#[test]
fn garbage_frames_are_counted_not_fatal() {
    let (b0, _, _) = pool_payloads();
    let z = free_port();
    let ctx = zmq::Context::new();
    let s = Server::start(&["--zmq-bind".into(), format!("tcp://127.0.0.1:{z}")]);
    let publisher = Publisher::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    publisher.send(&[b"kv@p:1@m".to_vec(), vec![0; 8]]); // two frames
    publisher.send(&[b"kv@p:1@m".to_vec(), vec![0; 5], b0.clone()]); // short seq
    publisher.send(&[b"kv@p:1@m".to_vec(), 0u64.to_be_bytes().to_vec(), b"\xc1garbage".to_vec()]);
    publisher.send(&[b"kv@p:1@m".to_vec(), 1u64.to_be_bytes().to_vec(), b0[..b0.len() / 2].to_vec()]);
    publisher.send_batch("kv@p:1@m", 2, &b0);
    s.wait_for("valid batch applied", |s| s.matched("p:1", &tokens(64)) == 2);
    assert_eq!(s.metric("kvroute_kv_messages_malformed_total"), 4.0);
    assert_eq!(s.pod("p:1")["malformed"], 2);
    assert_eq!(s.pod("p:1")["gaps"], 0, "malformed payloads consume their sequence number");
}

#[test]
fn score_api_rejects_bad_requests_with_a_message() {
    let z = free_port();
    let s = Server::start(&["--zmq-bind".into(), format!("tcp://127.0.0.1:{z}")]);
    for (body, msg) in [
        ("{\"token_ids\": [1]}", "missing `model`"),
        ("{\"model\": \"m\"}", "missing `token_ids`"),
        ("{\"model\": \"m\", \"token_ids\": [-1]}", "invalid request body"),
        ("not json", "invalid request body"),
        ("{\"model\": \"m\", \"token_ids\": [], \"bogus\": 1}", "unknown field"),
    ] {
        let err = ureq::post(&format!("{}/v1/kv/score", s.admin))
            .set("content-type", "application/json")
            .send_string(body)
            .unwrap_err();
        let ureq::Error::Status(code, resp) = err else { panic!("{body}: transport error") };
        assert_eq!(code, 400, "{body}");
        let v: Value = resp.into_json().unwrap();
        assert!(v["error"].as_str().unwrap().contains(msg), "{body}: {v}");
    }
}

#[test]
fn data_parallel_ranks_are_separate_pods_with_their_own_sequences() {
    let (b0, b1, _) = pool_payloads();
    // The payload's last byte is its data_parallel_rank (0); rank 1 is the same batch
    // published by the engine's second rank.
    let rank1 = |p: &[u8]| {
        let mut v = p.to_vec();
        *v.last_mut().unwrap() = 1;
        v
    };
    let z = free_port_pair();
    let ctx = zmq::Context::new();
    // Ranks must be below the data-parallel size (rank r's socket binds port z + r).
    let s =
        Server::start(&["--zmq-bind", &format!("tcp://127.0.0.1:{z}"), "--data-parallel-size", "2"].map(String::from));
    let publisher = Publisher::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    let topic = "kv@10.1.1.1:8000@m";
    publisher.send_batch(topic, 0, &b0);
    publisher.send_batch(topic, 0, &rank1(&b0)); // each rank counts from 0: not a restart
    publisher.send_batch(topic, 1, &rank1(&b1));
    s.wait_for("rank 1 has 4 blocks", |s| s.matched("10.1.1.1:8000#dp1", &tokens(64)) == 4);
    assert_eq!(s.matched("10.1.1.1:8000", &tokens(64)), 2);
    for pod in ["10.1.1.1:8000", "10.1.1.1:8000#dp1"] {
        let p = s.pod(pod);
        assert_eq!((p["restarts"].as_u64(), p["gaps"].as_u64()), (Some(0), Some(0)), "{pod}: {p}");
    }
}
