//! Issue #15 item 5, the lifecycle: SIGTERM drains `kvroute serve` (readiness false, every
//! listener closed, streams in flight finish, exit 0 — or cut at the grace) and `kvroute sim`
//! (as vLLM's uvicorn) — black-box, real processes, real sockets, real signals.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{free_ports, Children};
use serde_json::json;

/// Output tokens of each test stream; with [`SLOW`] one every 100 ms: about 4 s a stream.
const TOKENS: u32 = 40;
/// `kvroute sim` flags for 100 ms per token (model time ÷ the helper's --speedup 100).
const SLOW: &[&str] = &["--inter-token-latency-us", "10000000"];

fn sigterm(c: &Child) {
    let ok = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM failed");
}

/// The child's exit status, or None if it still runs after `limit`.
fn wait_exit(c: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = c.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn refused(port: u16) -> bool {
    matches!(TcpStream::connect(("127.0.0.1", port)), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn get(url: &str) -> (u16, String) {
    match ureq::get(url).timeout(Duration::from_secs(5)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

fn wait_ready(base: &str) {
    let t = Instant::now();
    while get(&format!("{base}/ready")).0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(15), "{base} never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one streamed completion got: its SSE data lines, whether it ended with `[DONE]`,
/// when it ended, and the read error if it was cut.
struct Streamed {
    data: Vec<String>,
    done: bool,
    ended: Instant,
    error: Option<String>,
}

/// Starts a streamed completion of [`TOKENS`] tokens on `base`; `first` gets a message
/// when its first chunk has arrived.
fn stream(base: &str, i: usize, first: mpsc::Sender<()>) -> JoinHandle<Streamed> {
    let url = format!("{base}/v1/completions");
    std::thread::spawn(move || {
        let body = json!({"model": "m", "prompt": common::words(&format!("drain{i}-"), 40),
            "max_tokens": TOKENS, "stream": true});
        let r = ureq::post(&url).timeout(Duration::from_secs(60)).send_json(body).unwrap();
        assert_eq!(r.status(), 200);
        let mut out = Streamed { data: vec![], done: false, ended: Instant::now(), error: None };
        for line in BufReader::new(r.into_reader()).lines() {
            match line {
                Ok(l) => {
                    let Some(d) = l.strip_prefix("data: ") else { continue };
                    if out.data.is_empty() {
                        let _ = first.send(());
                    }
                    out.done |= d == "[DONE]";
                    out.data.push(d.to_string());
                }
                Err(e) => {
                    out.error = Some(e.to_string());
                    break;
                }
            }
        }
        out.ended = Instant::now();
        out
    })
}

/// `n` streams on `base`, returned once each has its first chunk.
fn streams_in_flight(base: &str, n: usize) -> Vec<JoinHandle<Streamed>> {
    let (tx, rx) = mpsc::channel();
    let hs: Vec<_> = (0..n).map(|i| stream(base, i, tx.clone())).collect();
    for _ in 0..n {
        rx.recv_timeout(Duration::from_secs(10)).expect("a stream's first chunk");
    }
    hs
}

/// A kept-alive connection that served one request and is idle now.
fn idle_keepalive(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s
}

/// True once the peer has closed `s`.
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// A child process, killed when dropped (a failed assertion leaves nothing running).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A router on `port` (admin port from `common::admin_args`) in front of `sims`, stderr
/// captured (the drain's log lines), plus `extra`.
fn router(port: u16, zmq: u16, sims: &[u16], extra: &[&str]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--zmq-bind", &format!("tcp://127.0.0.1:{zmq}")]);
    cmd.args(["--block-size", "16", "--hash-algo", "sha256_cbor", "--hash-seed", "42", "--health-interval-ms", "100"]);
    for p in sims {
        cmd.args(["--backend", &format!("http://127.0.0.1:{p}")]);
    }
    let child = cmd
        .args(common::admin_args(port))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = Proc(child);
    common::wait_healthy(&format!("http://127.0.0.1:{port}"));
    child
}

/// The router's log without ANSI colours.
fn plain(log: &str) -> String {
    let mut out = String::new();
    let mut it = log.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads the child's stderr to the end on a thread (the pipe never fills).
fn collect_stderr(c: &mut Child) -> JoinHandle<String> {
    let mut e = c.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = e.read_to_string(&mut s);
        plain(&s)
    })
}

/// The gRPC health status of the ext_proc service on `port` (None: no answer).
fn grpc_health(port: u16) -> Option<i32> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ch =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).ok()?.connect().await.ok()?;
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let req =
            tonic_health::pb::HealthCheckRequest { service: "envoy.service.ext_proc.v3.ExternalProcessor".into() };
        Some(h.check(req).await.ok()?.into_inner().status)
    })
}

fn metric(admin: &str, name: &str) -> f64 {
    let (_, text) = get(&format!("{admin}/metrics"));
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[test]
fn sigterm_drains_the_router_streams_finish_new_connections_refused_exit_0() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let p = free_ports(6);
    let (port, zmq, s1, s2, grpc, health) = (p[0], p[1], p[2], p[3], p[4], p[5]);
    let _kids = Children(vec![common::sim(s1, zmq, SLOW), common::sim(s2, zmq, SLOW)]);
    let (g, h) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{health}"));
    let delay = Duration::from_millis(2000);
    let extra =
        ["--ext-proc-listen", &g, "--grpc-health-listen", &h, "--shutdown-delay", "2", "--shutdown-grace", "20"];
    let mut r = router(port, zmq, &[s1, s2], &extra);
    let log = collect_stderr(&mut r);
    let base = format!("http://127.0.0.1:{port}");
    let admin = common::admin(&base);
    let admin_port: u16 = admin.rsplit(':').next().unwrap().parse().unwrap();
    wait_ready(&base);
    assert_eq!(grpc_health(health), Some(ServingStatus::Serving as i32));
    assert_eq!((metric(&admin, "kvroute_ready "), metric(&admin, "kvroute_draining ")), (1.0, 0.0));
    let streams = streams_in_flight(&base, 6);
    let mut idle = idle_keepalive(port);
    let t0 = Instant::now();
    sigterm(&r);
    // Readiness false at once; during the delay every listener still answers.
    std::thread::sleep(Duration::from_millis(200));
    let (code, body) = get(&format!("{base}/ready"));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(get(&format!("{base}/health")).0, 200, "liveness holds while draining");
    assert_eq!((metric(&admin, "kvroute_ready "), metric(&admin, "kvroute_draining ")), (0.0, 1.0));
    assert_eq!(grpc_health(health), Some(ServingStatus::NotServing as i32));
    assert!(t0.elapsed() < delay, "checked too late: {:?}", t0.elapsed());
    // After the delay: every listening socket is closed, idle connections too.
    std::thread::sleep((delay + Duration::from_millis(400)).saturating_sub(t0.elapsed()));
    for (what, p) in [("serving", port), ("admin", admin_port), ("ext_proc", grpc), ("gRPC health", health)] {
        assert!(refused(p), "the {what} port still accepts connections after the delay");
    }
    assert!(closed_by_peer(&mut idle, Duration::from_secs(1)), "an idle kept-alive connection stays open");
    let closed_at = t0.elapsed();
    // The streams in flight run to completion…
    let got: Vec<Streamed> = streams.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, s) in got.iter().enumerate() {
        assert!(s.done && s.error.is_none(), "stream {i} cut: {:?} after {} chunks", s.error, s.data.len());
        assert_eq!(s.data.len(), TOKENS as usize + 1, "stream {i}: every token, then [DONE]");
        assert!(s.ended.duration_since(t0) > closed_at, "stream {i} ended before the listeners closed");
    }
    // …then the router exits 0, well within the grace.
    let status = wait_exit(&mut r, Duration::from_secs(20)).expect("the router still runs after the grace");
    let exited = t0.elapsed();
    assert!(status.success(), "exit status {status:?}");
    let last = got.iter().map(|s| s.ended).max().unwrap().duration_since(t0);
    assert!(exited >= last && exited < last + Duration::from_secs(2), "exited at {exited:?}, last stream at {last:?}");
    let log = log.join().unwrap();
    assert!(log.contains("drained: every connection finished"), "{log}");
}

#[test]
fn a_grace_shorter_than_the_streams_cuts_them_and_exits_0() {
    let p = free_ports(3);
    let (port, zmq, s1) = (p[0], p[1], p[2]);
    let _kids = Children(vec![common::sim(s1, zmq, SLOW)]);
    let mut r = router(port, zmq, &[s1], &["--shutdown-grace", "1.5"]);
    let log = collect_stderr(&mut r);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base);
    let streams = streams_in_flight(&base, 4);
    let t0 = Instant::now();
    sigterm(&r);
    // No delay: the serving port closes at once.
    std::thread::sleep(Duration::from_millis(300));
    assert!(refused(port), "the serving port still accepts connections");
    let status = wait_exit(&mut r, Duration::from_secs(10)).expect("the router ignores its grace");
    let exited = t0.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(exited >= Duration::from_millis(1400) && exited < Duration::from_millis(3500), "exited after {exited:?}");
    for (i, h) in streams.into_iter().enumerate() {
        let s = h.join().unwrap();
        assert!(!s.done && s.data.len() < TOKENS as usize, "stream {i} was not cut: {} chunks", s.data.len());
        assert!(s.ended.duration_since(t0) < exited + Duration::from_millis(500), "stream {i} ended late");
    }
    let log = log.join().unwrap();
    assert!(log.contains("shutdown grace expired") && log.contains("cut=4"), "{log}");
}

/// An ext_proc stream open when SIGTERM arrives carries on: Envoy's request is routed and
/// its response passes through after the listeners have closed.
#[test]
fn an_ext_proc_stream_in_flight_finishes_after_sigterm() {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        processing_request::Request as Req, processing_response::Response as Resp, HttpBody, HttpHeaders,
        ProcessingRequest, ProtocolConfiguration,
    };
    let p = free_ports(4);
    let (port, zmq, s1, grpc) = (p[0], p[1], p[2], p[3]);
    let _kids = Children(vec![common::sim(s1, zmq, &[])]);
    let g = format!("127.0.0.1:{grpc}");
    let mut r = router(port, zmq, &[s1], &["--ext-proc-listen", &g, "--shutdown-delay", "0.5"]);
    let log = collect_stderr(&mut r);
    wait_ready(&format!("http://127.0.0.1:{port}"));
    let header =
        |k: &str, v: &str| HeaderValue { key: k.into(), raw_value: v.as_bytes().to_vec(), ..Default::default() };
    let headers = |hs: Vec<HeaderValue>, end| HttpHeaders {
        headers: Some(HeaderMap { headers: hs }),
        end_of_stream: end,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = ExternalProcessorClient::connect(format!("http://{g}")).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(ProcessingRequest {
            request: Some(Req::RequestHeaders(headers(
                vec![header(":path", "/v1/completions"), header(":method", "POST")],
                false,
            ))),
            protocol_config: Some(ProtocolConfiguration {
                request_body_mode: 4,
                response_body_mode: 4,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut replies = client.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        sigterm(&r);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(refused(grpc), "the ext_proc port still accepts connections");
        // The request body: routed on the open stream.
        let body = json!({"model": "m", "prompt": "drain me", "max_tokens": 1}).to_string().into_bytes();
        let msg = ProcessingRequest {
            request: Some(Req::RequestBody(HttpBody { body, end_of_stream: true, ..Default::default() })),
            ..Default::default()
        };
        tx.send(msg).await.unwrap();
        let Some(Resp::RequestHeaders(h)) = replies.message().await.unwrap().unwrap().response else {
            panic!("expected the headers answer")
        };
        let set = h.response.unwrap().header_mutation.unwrap().set_headers;
        assert!(set.iter().any(|o| o.header.as_ref().unwrap().raw_value == format!("127.0.0.1:{s1}").as_bytes()));
        while let Some(m) = replies.message().await.unwrap() {
            if matches!(m.response, Some(Resp::RequestBody(_))) {
                break;
            }
        }
        // The response passes through the same stream.
        let msg = ProcessingRequest {
            request: Some(Req::ResponseHeaders(headers(vec![header(":status", "200")], false))),
            ..Default::default()
        };
        tx.send(msg).await.unwrap();
        let m = replies.message().await.unwrap().unwrap();
        assert!(matches!(m.response, Some(Resp::ResponseHeaders(_))), "{m:?}");
        let msg = ProcessingRequest {
            request: Some(Req::ResponseBody(HttpBody {
                body: b"{}".to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        };
        tx.send(msg).await.unwrap();
        let m = replies.message().await.unwrap().unwrap();
        assert!(matches!(m.response, Some(Resp::ResponseBody(_))), "{m:?}");
        assert!(r.try_wait().unwrap().is_none(), "the router exited with an ext_proc stream open");
        drop(tx);
        assert!(replies.message().await.unwrap().is_none(), "the stream ends when Envoy's side does");
    });
    let status = wait_exit(&mut r, Duration::from_secs(10)).expect("the router still runs");
    assert!(status.success(), "exit status {status:?}");
    assert!(log.join().unwrap().contains("drained: every connection finished"));
}

/// `kvroute sim` on SIGTERM, like vLLM (uvicorn): stops accepting, finishes the streams in
/// flight, exits 0.
#[test]
fn sim_sigterm_finishes_streams_in_flight_and_exits_0() {
    let p = free_ports(2);
    let (port, zmq) = (p[0], p[1]);
    let mut kids = Children(vec![common::sim(port, zmq, SLOW)]);
    let base = format!("http://127.0.0.1:{port}");
    let streams = streams_in_flight(&base, 4);
    let mut idle = idle_keepalive(port);
    let sim = &mut kids.0[0];
    let t0 = Instant::now();
    sigterm(sim);
    std::thread::sleep(Duration::from_millis(300));
    assert!(refused(port), "the sim still accepts connections");
    assert!(closed_by_peer(&mut idle, Duration::from_secs(1)), "an idle kept-alive connection stays open");
    for (i, h) in streams.into_iter().enumerate() {
        let s = h.join().unwrap();
        assert!(s.done && s.error.is_none(), "stream {i} cut: {:?} after {} chunks", s.error, s.data.len());
        assert_eq!(s.data.len(), TOKENS as usize + 1);
        assert!(s.ended.duration_since(t0) > Duration::from_millis(300));
    }
    let status = wait_exit(sim, Duration::from_secs(10)).expect("the sim still runs");
    assert!(status.success(), "exit status {status:?}");
}
