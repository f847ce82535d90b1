//! Issue #14, the event plane: black-box tests of `kvroute serve` against forged and
//! oversized KV-event traffic. Real `kvroute sim` children publish real events; the
//! forger is a real libzmq PUB socket (the `zmq` crate) in this process.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{free_ports, metric_sum, serve, sim, wait_for, words, Children};
use kvroute_events::{encode_batch, BlockStored, EventBatch, KvEvent, WireFormat};
use serde_json::{json, Value};

/// A forging publisher: a PUB socket connected to the router's SUB socket.
struct Forger {
    sock: zmq::Socket,
}

impl Forger {
    fn connect(ctx: &zmq::Context, endpoint: &str) -> Self {
        let sock = ctx.socket(zmq::PUB).unwrap();
        sock.set_linger(0).unwrap();
        sock.connect(endpoint).unwrap();
        std::thread::sleep(Duration::from_millis(400)); // let the subscription arrive
        Self { sock }
    }

    fn send(&self, topic: &str, seq: u64, payload: &[u8]) {
        self.sock.send_multipart([topic.as_bytes(), &seq.to_be_bytes()[..], payload], 0).unwrap();
    }
}

/// A `BlockStored` of `blocks` blocks (block size 16) whose hashes start at `first`.
fn stored(blocks: u64, first: u64, rank: Option<i64>) -> Vec<u8> {
    let ev = KvEvent::BlockStored(BlockStored {
        block_hashes: (first..first + blocks).collect(),
        token_ids: (0..16 * blocks as u32).collect(),
        block_size: 16,
        ..Default::default()
    });
    encode_batch(
        &EventBatch { ts: 0.0, events: vec![ev], data_parallel_rank: rank, unknown_events: 0 },
        WireFormat::Map,
    )
}

fn pods(port: u16) -> Vec<Value> {
    let admin = common::admin_port(port);
    let v: Value = ureq::get(&format!("http://127.0.0.1:{admin}/v1/kv/pods")).call().unwrap().into_json().unwrap();
    v["pods"].as_array().cloned().unwrap_or_default()
}

fn pod(port: u16, name: &str) -> Option<Value> {
    pods(port).into_iter().find(|p| p["pod"] == name)
}

fn blocks(port: u16, name: &str) -> u64 {
    pod(port, name).and_then(|p| p["blocks"].as_u64()).unwrap_or(0)
}

/// One completion straight to a sim (it publishes the prompt's blocks).
fn complete(sim: u16, prompt: &str) {
    ureq::post(&format!("http://127.0.0.1:{sim}/v1/completions"))
        .send_json(json!({"model": "m", "prompt": prompt, "max_tokens": 1}))
        .unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Nobody connects to `l` within `within` (it is non-blocking).
fn no_connection(l: &TcpListener, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if l.accept().is_ok() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn events_for_unknown_pods_are_dropped_and_counted() {
    let [http, z, s] = free_ports(3)[..] else { unreachable!() };
    let router = serve(http, z, &[s], &[]);
    let sim = sim(s, z, &[]);
    let _c = Children(vec![router, sim]);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    for n in 0..50u64 {
        forger.send(&format!("kv@10.66.0.{n}:8000@m"), 0, &stored(4, 1000 * n, None));
    }
    complete(s, &words("known", 120));
    let real = format!("127.0.0.1:{s}");
    wait_for(Duration::from_secs(5), "the backend's blocks", || blocks(http, &real) > 0);
    wait_for(Duration::from_secs(5), "50 drops counted", || {
        metric_sum(&[http], "kvroute_ingest_unknown_pod_messages_total") >= 50.0
    });
    let names: Vec<Value> = pods(http).into_iter().map(|p| p["pod"].clone()).collect();
    assert_eq!(names, vec![json!(real)], "only the backend is a pod");
    assert_eq!(metric_sum(&[http], "kvroute_ingest_unknown_pods"), 50.0);
}

#[test]
fn unknown_pods_can_be_accepted_up_to_a_cap() {
    let [http, z] = free_ports(2)[..] else { unreachable!() };
    let router = serve(http, z, &[], &["--zmq-unknown-pods", "accept", "--config", &cap_config(3)]);
    let _c = Children(vec![router]);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    for n in 0..10u64 {
        forger.send(&format!("kv@10.66.0.{n}:8000@m"), 0, &stored(1, n, None));
    }
    wait_for(Duration::from_secs(5), "7 over the cap counted", || {
        metric_sum(&[http], "kvroute_ingest_unknown_pod_messages_total") >= 7.0
    });
    assert_eq!(pods(http).len(), 3, "at most max_pods pods");
}

fn cap_config(max_pods: usize) -> String {
    let dir = std::env::temp_dir().join(format!("kvroute-events-{}-{max_pods}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("cap.yaml");
    std::fs::write(&p, format!("ingest:\n  max_pods: {max_pods}\n  log_interval_ms: 500\n")).unwrap();
    p.display().to_string()
}

#[test]
fn a_data_parallel_rank_beyond_the_configured_size_is_dropped() {
    let [http, z] = free_ports(2)[..] else { unreachable!() };
    let router = serve(http, z, &[], &[]);
    let _c = Children(vec![router]);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    forger.send("kv@10.0.0.1:8000@m", 0, &stored(2, 1, Some(7))); // size is 1: rank 7 is forged
    forger.send("kv@10.0.0.1:8000@m", 0, &stored(2, 1, Some(-1)));
    forger.send("kv@10.0.0.1:8000@m", 0, &stored(2, 1, Some(0)));
    wait_for(Duration::from_secs(5), "rank 0 indexed", || blocks(http, "10.0.0.1:8000") == 2);
    wait_for(Duration::from_secs(5), "2 counted", || {
        metric_sum(&[http], "kvroute_ingest_bad_dp_rank_messages_total") == 2.0
    });
    let names: Vec<Value> = pods(http).into_iter().map(|p| p["pod"].clone()).collect();
    assert_eq!(names, vec![json!("10.0.0.1:8000")], "no `#dp7` pod");
}

#[test]
fn a_100_mb_frame_is_refused_with_memory_bounded_and_real_events_flow() {
    let [http, z, s] = free_ports(3)[..] else { unreachable!() };
    let router = serve(http, z, &[s], &[]);
    let pid = router.id();
    let sim = sim(s, z, &[]);
    let _c = Children(vec![router, sim]);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    // Peak RSS, sampled every 2 ms (the old code held the frame ~0.1 s: +200 MB).
    let base = rss_kib(pid);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !d2.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(2));
        }
        peak
    });
    let real = format!("127.0.0.1:{s}");
    forger.send(&format!("kv@{real}@m"), 0, &vec![0x90u8; 100 << 20]);
    std::thread::sleep(Duration::from_millis(1500)); // the frame crosses loopback (or not)
    complete(s, &words("after", 120));
    wait_for(Duration::from_secs(5), "real events after the big frame", || blocks(http, &real) > 0);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let grown = sampler.join().unwrap().saturating_sub(base);
    eprintln!("100 MB frame: router RSS peak {grown} KiB above base {base} KiB");
    assert!(grown < 32 << 10, "router RSS peaked {grown} KiB above its base for a refused 100 MB frame");
    assert!(metric_sum(&[http], "kvroute_ingest_publisher_disconnects_total") >= 1.0, "the refusal is counted");
    // A batch with more events than allowed is dropped (default cap 65536 events).
    let evs = (0..70_000u64)
        .map(|h| KvEvent::BlockRemoved(kvroute_events::BlockRemoved { block_hashes: vec![h], ..Default::default() }));
    let huge = EventBatch { ts: 0.0, events: evs.collect(), data_parallel_rank: None, unknown_events: 0 };
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    forger.send(&format!("kv@{real}@m"), 1_000, &encode_batch(&huge, WireFormat::Map));
    wait_for(Duration::from_secs(5), "oversized batch counted", || {
        metric_sum(&[http], "kvroute_ingest_oversized_batches_total") == 1.0
    });
}

#[test]
fn replays_go_only_to_known_pods_never_to_a_host_named_by_a_topic() {
    let [http, z, r] = free_ports(3)[..] else { unreachable!() };
    // Listeners on the replay port of a forged host and of a listed pod's host.
    let forged_host = TcpListener::bind(("127.0.0.2", r)).unwrap();
    let known_host = TcpListener::bind(("127.0.0.3", r)).unwrap();
    forged_host.set_nonblocking(true).unwrap();
    known_host.set_nonblocking(true).unwrap();
    let router = serve(http, z, &[], &["--replay-port", &r.to_string(), "--zmq-known-pod", "127.0.0.3:8000"]);
    let _c = Children(vec![router]);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    // Joining mid-stream (seq > 0) asks the pod's replay endpoint for its history.
    forger.send("kv@127.0.0.2:8000@m", 42, &stored(1, 1, None));
    forger.send("kv@127.0.0.3:8000@m", 42, &stored(1, 1, None));
    assert!(no_connection(&forged_host, Duration::from_millis(1500)), "the router dialled a host a topic named");
    // The control: the listed pod's own host is dialled.
    let t = Instant::now();
    while known_host.accept().is_err() {
        assert!(t.elapsed() < Duration::from_secs(5), "no replay to the known pod's host");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(metric_sum(&[http], "kvroute_ingest_unknown_pod_messages_total") >= 1.0);
}

#[test]
fn replays_with_unknown_pods_accepted_still_never_dial_topic_hosts() {
    let [http, z, r] = free_ports(3)[..] else { unreachable!() };
    let forged_host = TcpListener::bind(("127.0.0.2", r)).unwrap();
    forged_host.set_nonblocking(true).unwrap();
    let router = serve(http, z, &[], &["--replay-port", &r.to_string(), "--zmq-unknown-pods", "accept"]);
    let _c = Children(vec![router]);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    forger.send("kv@127.0.0.2:8000@m", 42, &stored(1, 1, None));
    wait_for(Duration::from_secs(5), "the accepted pod's batch applied", || blocks(http, "127.0.0.2:8000") == 1);
    assert!(no_connection(&forged_host, Duration::from_millis(1000)), "the router dialled a host a topic named");
}

#[test]
fn twenty_stalled_replays_do_not_delay_a_real_pods_events() {
    let [http, z, s, r, dead] = free_ports(5)[..] else { unreachable!() };
    // 20 known pods whose replay endpoints never answer (nothing listens there).
    let mut extra: Vec<String> = vec!["--replay-port".into(), r.to_string()];
    for n in 0..20 {
        extra.extend(["--backend".into(), format!("http://127.0.0.{}:{dead}", 10 + n)]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let router = serve(http, z, &[s], &extra);
    let sim = sim(s, z, &[]);
    let _c = Children(vec![router, sim]);
    let real = format!("127.0.0.1:{s}");
    std::thread::sleep(Duration::from_millis(300));
    complete(s, &words("warm", 40)); // the real stream starts at seq 0: no replay
    wait_for(Duration::from_secs(5), "warm-up blocks", || blocks(http, &real) > 0);
    let warm = blocks(http, &real);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    for n in 0..20 {
        // Each joins mid-stream: a replay from its (silent) endpoint, 2 s idle timeout.
        forger.send(&format!("kv@127.0.0.{}:{dead}@m", 10 + n), 5, &stored(1, n, None));
    }
    std::thread::sleep(Duration::from_millis(100)); // the replays have started
    complete(s, &words("measured", 120));
    let t = Instant::now();
    wait_for(Duration::from_secs(5), "the real pod's new blocks", || blocks(http, &real) > warm);
    let took = t.elapsed();
    eprintln!("real events visible {took:?} after the completion, 20 replays stalled");
    assert!(took < Duration::from_millis(100), "real events took {took:?} behind 20 stalled replays");
    wait_for(Duration::from_secs(5), "replays counted", || metric_sum(&[http], "kvroute_kv_replays_total") >= 4.0);
}

#[test]
fn one_forged_gap_or_backwards_message_leaves_a_pods_index_intact() {
    let [http, z, s] = free_ports(3)[..] else { unreachable!() };
    let router = serve(http, z, &[s], &[]);
    let sim = sim(s, z, &[]);
    let _c = Children(vec![router, sim]);
    let real = format!("127.0.0.1:{s}");
    std::thread::sleep(Duration::from_millis(300));
    complete(s, &words("first", 200));
    wait_for(Duration::from_secs(5), "first blocks", || blocks(http, &real) > 0);
    let first = blocks(http, &real);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    let clear = encode_batch(
        &EventBatch { ts: 0.0, events: vec![KvEvent::AllBlocksCleared], data_parallel_rank: None, unknown_events: 0 },
        WireFormat::Map,
    );
    forger.send(&format!("kv@{real}@m"), 1_000_000, &clear); // a gap
    forger.send(&format!("kv@{real}@m"), 0, &clear); // backwards
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(blocks(http, &real), first, "a held suspect changes nothing");
    // The real stream goes on from where it was: both suspects are discarded.
    complete(s, &words("second", 60));
    wait_for(Duration::from_secs(5), "second blocks", || blocks(http, &real) > first);
    let p = pod(http, &real).unwrap();
    assert_eq!((p["restarts"].as_u64(), p["anomalies_ignored"].as_u64()), (Some(0), Some(2)), "{p}");
    assert_eq!(metric_sum(&[http], "kvroute_ingest_seq_anomalies_ignored_total"), 2.0);
}

/// `kvroute serve` on `http`, SUB bound on `z`, its stderr collected (`RUST_LOG=warn`).
fn serve_logged(http: u16, z: u16, extra: &[&str]) -> (std::process::Child, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["serve", "--listen", &format!("127.0.0.1:{http}"), "--zmq-bind", &format!("tcp://127.0.0.1:{z}")])
        .args(common::admin_args(http))
        .args(extra)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (err, l2) = (child.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let mut l = l2.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    common::wait_healthy(&format!("http://127.0.0.1:{http}"));
    (child, log)
}

#[test]
fn dropped_messages_are_logged_once_per_kind_and_interval_with_counts() {
    let [http, z] = free_ports(2)[..] else { unreachable!() };
    let (router, log) = serve_logged(http, z, &["--zmq-known-pod", "10.0.0.1:8000", "--config", &cap_config(16)]);
    let _c = Children(vec![router]);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    for n in 0..100u64 {
        forger.send("kv@10.0.0.1:8000@m", n, b"\xc1 not msgpack");
        forger.send(&format!("kv@10.9.9.{n}:8000@m"), 0, &stored(1, n, None));
    }
    wait_for(Duration::from_secs(5), "100 malformed counted", || {
        metric_sum(&[http], "kvroute_kv_messages_malformed_total") == 100.0
    });
    // log_interval_ms is 500: the first of each kind at once, the other 99 in one line.
    std::thread::sleep(Duration::from_millis(1200));
    let text = log.lock().unwrap().clone();
    for kind in ["malformed", "unknown_pod"] {
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&format!("kind=\"{kind}\""))).collect();
        assert_eq!(lines.len(), 2, "{kind}: one line, then a summary: {text}");
        assert!(lines[1].contains("count=99"), "{kind}: {}", lines[1]);
    }
}

/// Writes a CurveZMQ secret key to a file; returns (path, public key).
fn server_key_file(tag: &str) -> (String, String) {
    let kp = zmq::CurveKeyPair::new().unwrap();
    let p = key_file(tag, &zmq::z85_encode(&kp.secret_key).unwrap());
    (p, zmq::z85_encode(&kp.public_key).unwrap())
}

fn key_file(tag: &str, z85: &str) -> String {
    let dir = std::env::temp_dir().join(format!("kvroute-events-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("server.key");
    std::fs::write(&p, z85).unwrap();
    p.display().to_string()
}

fn curve_forger(ctx: &zmq::Context, endpoint: &str, server_pub: &str, kp: &zmq::CurveKeyPair) -> Forger {
    let sock = ctx.socket(zmq::PUB).unwrap();
    sock.set_linger(0).unwrap();
    sock.set_curve_serverkey(&zmq::z85_decode(server_pub).unwrap()).unwrap();
    sock.set_curve_publickey(&kp.public_key).unwrap();
    sock.set_curve_secretkey(&kp.secret_key).unwrap();
    sock.connect(endpoint).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    Forger { sock }
}

/// Without CurveZMQ in the linked libzmq (the workspace's vendored build has none),
/// asking for it is a start-up error, never a silently open socket.
#[test]
fn curve_without_libzmq_support_refuses_to_start() {
    if zmq::has("curve") == Some(true) {
        return; // covered by with_curve_only_publishers_with_an_allowed_key_are_heard
    }
    let [http, z] = free_ports(2)[..] else { unreachable!() };
    let secret = zmq::z85_encode(&[7u8; 32]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["serve", "--listen", &format!("127.0.0.1:{http}"), "--zmq-bind", &format!("tcp://127.0.0.1:{z}")])
        .args(common::admin_args(http))
        .args(["--zmq-curve-secret-key-file", &key_file("nocurve", &secret)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no CurveZMQ support"), "{err}");
}

/// Needs a libzmq with CURVE (libsodium): the zmq crate's vendored copy has none, so
/// `scripts/test.sh` links Debian's libzmq and sets `KVROUTE_REQUIRE_CURVE=1`, which turns a
/// missing CURVE into a failure; a plain `cargo test` on the vendored build skips it (the
/// refusal test above covers that build).
#[test]
fn with_curve_only_publishers_with_an_allowed_key_are_heard() {
    if zmq::has("curve") != Some(true) {
        assert!(
            std::env::var_os("KVROUTE_REQUIRE_CURVE").is_none(),
            "KVROUTE_REQUIRE_CURVE is set but the linked libzmq has no CURVE (link the system libzmq: see scripts/test.sh)"
        );
        eprintln!("libzmq without CurveZMQ: see curve_without_libzmq_support_refuses_to_start");
        return;
    }
    let [http, z] = free_ports(2)[..] else { unreachable!() };
    let (key_file, server_pub) = server_key_file("curve");
    let allowed = zmq::CurveKeyPair::new().unwrap();
    let other = zmq::CurveKeyPair::new().unwrap();
    let allowed_pub = zmq::z85_encode(&allowed.public_key).unwrap();
    let mut extra = vec!["--zmq-curve-secret-key-file", &key_file, "--zmq-curve-allow", &allowed_pub];
    for p in ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"] {
        extra.extend(["--zmq-known-pod", p]);
    }
    let router = serve(http, z, &[], &extra);
    let _c = Children(vec![router]);
    let ctx = zmq::Context::new();
    let ep = format!("tcp://127.0.0.1:{z}");
    let good = curve_forger(&ctx, &ep, &server_pub, &allowed);
    let wrong_key = curve_forger(&ctx, &ep, &server_pub, &other);
    let plain = Forger::connect(&ctx, &ep);
    wrong_key.send("kv@10.0.0.2:8000@m", 0, &stored(2, 1, None));
    plain.send("kv@10.0.0.3:8000@m", 0, &stored(2, 1, None));
    good.send("kv@10.0.0.1:8000@m", 0, &stored(2, 1, None));
    wait_for(Duration::from_secs(5), "the allowed publisher's blocks", || blocks(http, "10.0.0.1:8000") == 2);
    std::thread::sleep(Duration::from_millis(300));
    let names: Vec<Value> = pods(http).into_iter().map(|p| p["pod"].clone()).collect();
    assert_eq!(names, vec![json!("10.0.0.1:8000")]);
    assert!(metric_sum(&[http], "kvroute_ingest_auth_denied_total") >= 1.0, "the wrong key was refused by ZAP");
}

#[test]
fn only_allowed_source_addresses_are_heard() {
    let [http, z] = free_ports(2)[..] else { unreachable!() };
    let extra =
        ["--zmq-allow-source", "127.0.0.2/32", "--zmq-known-pod", "10.0.0.1:8000", "--zmq-known-pod", "10.0.0.2:8000"];
    let router = serve(http, z, &[], &extra);
    let _c = Children(vec![router]);
    let ctx = zmq::Context::new();
    // libzmq's `tcp://SOURCE:0;DEST` picks the publisher's source address.
    let allowed = Forger::connect(&ctx, &format!("tcp://127.0.0.2:0;127.0.0.1:{z}"));
    let other = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    other.send("kv@10.0.0.2:8000@m", 0, &stored(2, 1, None));
    allowed.send("kv@10.0.0.1:8000@m", 0, &stored(2, 1, None));
    wait_for(Duration::from_secs(5), "the allowed source's blocks", || blocks(http, "10.0.0.1:8000") == 2);
    std::thread::sleep(Duration::from_millis(300));
    let names: Vec<Value> = pods(http).into_iter().map(|p| p["pod"].clone()).collect();
    assert_eq!(names, vec![json!("10.0.0.1:8000")]);
    assert!(metric_sum(&[http], "kvroute_ingest_auth_denied_total") >= 1.0);
}

/// A payload's lengths are only bounded by its bytes: a 15 MiB batch announcing 15.7 M
/// events made the decoder reserve 15.7 M events up front (VmPeak +4.7 GB, then an
/// error at the first event); a larger frame limit or a smaller machine would abort.
#[test]
fn a_batch_announcing_millions_of_events_reserves_no_memory() {
    let [http, z] = free_ports(2)[..] else { unreachable!() };
    let router = serve(http, z, &[], &["--zmq-known-pod", "10.0.0.1:8000"]);
    let pid = router.id();
    let _c = Children(vec![router]);
    let ctx = zmq::Context::new();
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    let vm_peak = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines().find(|l| l.starts_with("VmPeak:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let before = vm_peak();
    // [ts, events (array32 of 0xF00000), …] then zero bytes: not one valid event.
    let mut p = vec![0x93u8, 0xcb];
    p.extend(0f64.to_be_bytes());
    p.push(0xdd);
    p.extend(0x00f0_0000u32.to_be_bytes());
    p.resize(0x00f0_0000 + 16, 0);
    forger.send("kv@10.0.0.1:8000@m", 0, &p);
    wait_for(Duration::from_secs(5), "counted malformed", || {
        metric_sum(&[http], "kvroute_kv_messages_malformed_total") == 1.0
    });
    let grown = vm_peak().saturating_sub(before);
    assert!(grown < 256 << 10, "virtual memory peaked {grown} KiB higher for one 15 MiB payload");
}

/// A replay is off the worker, but a pod's own live messages still apply after it, in
/// order (a regression guard for the replay pool; the old synchronous replay did too).
#[test]
fn a_pods_live_messages_wait_behind_its_own_replay_in_order() {
    let [http, z, r] = free_ports(3)[..] else { unreachable!() };
    let ctx = zmq::Context::new();
    let replay = ctx.socket(zmq::ROUTER).unwrap();
    replay.bind(&format!("tcp://127.0.0.1:{r}")).unwrap();
    let server = std::thread::spawn(move || {
        let req = replay.recv_multipart(0).unwrap(); // [identity, "", start]
        assert_eq!(req[2], 0u64.to_be_bytes(), "joining mid-stream replays from 0");
        std::thread::sleep(Duration::from_millis(700)); // a slow replay endpoint
        for seq in 0..5u64 {
            let p = stored(1, 100 + seq, None);
            replay.send_multipart([&req[0][..], b"", &seq.to_be_bytes(), &p], 0).unwrap();
        }
        replay.send_multipart([&req[0][..], b"", &u64::MAX.to_be_bytes(), b""], 0).unwrap();
    });
    let router = serve(http, z, &[], &["--replay-port", &r.to_string(), "--zmq-known-pod", "127.0.0.1:8000"]);
    let _c = Children(vec![router]);
    let forger = Forger::connect(&ctx, &format!("tcp://127.0.0.1:{z}"));
    for seq in 5..8u64 {
        forger.send("kv@127.0.0.1:8000@m", seq, &stored(1, 100 + seq, None));
    }
    std::thread::sleep(Duration::from_millis(300));
    let p = pod(http, "127.0.0.1:8000").unwrap();
    assert_eq!(p["applied_batches"], 0, "live 6 and 7 wait behind the replay: {p}");
    wait_for(Duration::from_secs(5), "all 8 batches", || {
        pod(http, "127.0.0.1:8000").is_some_and(|p| p["applied_batches"] == 8)
    });
    let p = pod(http, "127.0.0.1:8000").unwrap();
    let counts = ["gaps", "duplicates", "replay_failures", "anomalies_ignored"].map(|k| p[k].as_u64());
    assert_eq!(counts, [Some(0); 4], "{p}");
    server.join().unwrap();
}

/// Start-up rebuild: dialled pods' buffers are replayed before `/health` answers; silent
/// replay endpoints cost their idle timeout (2 s) each, but up to `replay_concurrency`
/// (4) at once, not one after the other (8 of them held the router 16 s).
#[test]
fn start_up_replays_of_silent_pods_run_concurrently() {
    let ports = free_ports(2 + 16);
    let (http, z) = (ports[0], ports[1]);
    let mut extra = Vec::new();
    for (n, pair) in ports[2..].chunks(2).enumerate() {
        let (p, r) = (pair[0], pair[1]); // nothing listens on either
        extra.extend([
            "--zmq-connect".to_string(),
            format!("10.9.0.{n}:8000=tcp://127.0.0.1:{p},replay=tcp://127.0.0.1:{r}"),
        ]);
    }
    let t = Instant::now();
    let router = std::process::Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["serve", "--listen", &format!("127.0.0.1:{http}"), "--zmq-bind", &format!("tcp://127.0.0.1:{z}")])
        .args(common::admin_args(http))
        .args(&extra)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // One at a time: 8 × the 2 s idle timeout = 16 s; 4 at once: ~4 s. The bound leaves
    // room for a loaded CI machine (a clean-clone run beside a build took > 10 s to answer).
    let _c = Children(vec![router]); // killed even when the wait below fails
    wait_for(Duration::from_secs(14), "/health", || {
        ureq::get(&format!("http://127.0.0.1:{http}/health")).call().is_ok()
    });
    let took = t.elapsed();
    eprintln!("/health after {took:?} with 8 silent replay endpoints");
    assert!(took < Duration::from_secs(12), "/health after {took:?} with 8 silent replay endpoints");
    assert_eq!(metric_sum(&[http], "kvroute_kv_replays_total"), 0.0, "live replays are another matter");
}
