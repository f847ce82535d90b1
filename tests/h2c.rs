//! The serving port speaks HTTP/2 cleartext with prior knowledge besides HTTP/1.1 (as Envoy
//! talks to an upstream configured for HTTP/2): many streams on one connection, bounded per
//! connection and counted against `--max-connections`, the timeouts, and the SIGTERM drain —
//! black-box with a real HTTP/2 client (hyper's), real `kvroute serve` and `kvroute sim`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_ports, sim, Children};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use serde_json::json;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// `kvroute sim` flags for 100 ms per token (model time ÷ the helper's --speedup 100).
const SLOW: &[&str] = &["--inter-token-latency-us", "10000000"];

type H2 = SendRequest<Full<Bytes>>;

/// An HTTP/2 connection with prior knowledge; the task ends when it has closed.
async fn connect(port: u16) -> (H2, tokio::task::JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(tcp);
    let (send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        // PINGs every 300 ms, idle or not (they must not keep an idle connection open).
        .keep_alive_interval(Duration::from_millis(300))
        .keep_alive_while_idle(true)
        .handshake(io)
        .await
        .unwrap();
    let done = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, done)
}

/// What one request got: status, `x-kvroute-pod`, SSE data lines (or the whole body).
struct Got {
    status: u16,
    pod: String,
    data: Vec<String>,
    body: String,
}

async fn request(h2: &H2, method: &str, path: &str, body: Option<serde_json::Value>) -> Got {
    let mut h2 = h2.clone();
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
        .unwrap();
    h2.ready().await.unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let pod = resp.headers().get("x-kvroute-pod").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&bytes).to_string();
    let data = body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect();
    Got { status, pod, data, body }
}

fn completion(i: usize, tokens: u32) -> serde_json::Value {
    json!({"model": "m", "prompt": common::words(&format!("h2-{i}-"), 40), "max_tokens": tokens, "stream": true})
}

fn metric(admin: &str, line_start: &str) -> f64 {
    let text = ureq::get(&format!("{admin}/metrics")).call().unwrap().into_string().unwrap();
    text.lines().filter(|l| l.starts_with(line_start)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

fn wait_ready(base: &str) {
    let t = Instant::now();
    while ureq::get(&format!("{base}/ready")).call().is_err() {
        assert!(t.elapsed() < Duration::from_secs(15), "{base} never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn many_streams_share_one_h2c_connection_and_drain_on_sigterm() {
    let p = free_ports(3);
    let (port, zmq, s) = (p[0], p[1], p[2]);
    let mut kids = Children(vec![common::serve(port, zmq, &[s], &[]), sim(s, zmq, SLOW)]);
    let base = format!("http://127.0.0.1:{port}");
    let admin = common::admin(&base);
    wait_ready(&base);
    let pod = format!("127.0.0.1:{s}");
    let rt = rt();
    let (h2, done) = rt.block_on(connect(port));
    // Eight streams of 20 tokens (2 s each) at once, on one connection.
    let t0 = Instant::now();
    let running: Vec<_> = (0..8)
        .map(|i| {
            let h2 = h2.clone();
            rt.spawn(async move { request(&h2, "POST", "/v1/completions", Some(completion(i, 20))).await })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let open = metric(&admin, "kvroute_http_connections{listener=\"serving\",pool=\"main\"}");
    assert_eq!(open, 1.0, "eight streams, one connection");
    for r in running {
        let g = rt.block_on(r).unwrap();
        assert_eq!((g.status, g.pod.as_str()), (200, pod.as_str()), "{}", g.body);
        assert_eq!(g.data.last().map(String::as_str), Some("[DONE]"));
        assert_eq!(g.data.len(), 21, "every token, then [DONE]");
    }
    assert!(t0.elapsed() < Duration::from_secs(6), "the streams ran one after another: {:?}", t0.elapsed());
    // HTTP/1.1 on the same port as before.
    assert_eq!(ureq::get(&format!("{base}/health")).call().unwrap().status(), 200);
    // SIGTERM with streams in flight on the connection: they finish, then the router exits 0.
    let running: Vec<_> = (0..3)
        .map(|i| {
            let h2 = h2.clone();
            rt.spawn(async move { request(&h2, "POST", "/v1/completions", Some(completion(10 + i, 20))).await })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let router = &mut kids.0[0];
    assert!(Command::new("kill").args(["-TERM", &router.id().to_string()]).status().unwrap().success());
    for r in running {
        let g = rt.block_on(r).unwrap();
        assert_eq!(g.status, 200);
        assert_eq!(g.data.last().map(String::as_str), Some("[DONE]"), "cut by the drain: {}", g.body);
    }
    let t = Instant::now();
    let status = loop {
        if let Some(s) = router.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the router still runs");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), done).await })
        .expect("connection closed")
        .unwrap();
}

#[test]
fn h2c_streams_are_bounded_per_connection_and_count_against_max_connections() {
    let p = free_ports(3);
    let (port, zmq, s) = (p[0], p[1], p[2]);
    let extra = ["--max-connections", "3", "--reserve-connections", "0", "--max-concurrent-streams", "5"];
    let _kids = Children(vec![common::serve(port, zmq, &[s], &extra), sim(s, zmq, SLOW)]);
    let base = format!("http://127.0.0.1:{port}");
    let admin = common::admin(&base);
    wait_ready(&base);
    // The connection's SETTINGS carry MAX_CONCURRENT_STREAMS (0x3) = 5.
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.write_all(PREFACE).unwrap();
    raw.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut head = [0u8; 9];
    raw.read_exact(&mut head).unwrap();
    assert_eq!(head[3], 4, "the server's first frame is SETTINGS");
    let mut payload = vec![0u8; (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize];
    raw.read_exact(&mut payload).unwrap();
    let max = payload.chunks(6).find(|p| p[..2] == [0, 3]).map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
    assert_eq!(max, Some(5));
    drop(raw);
    std::thread::sleep(Duration::from_millis(200));
    let rt = rt();
    let (h2, _done) = rt.block_on(connect(port));
    // Three slow streams take the three slots (the connection's own and two more)…
    let running: Vec<_> = (0..3)
        .map(|i| {
            let h2 = h2.clone();
            rt.spawn(async move { request(&h2, "POST", "/v1/completions", Some(completion(i, 20))).await })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    // …so a fourth gets 503 with Retry-After, /health still answers on the connection…
    let g = rt.block_on(request(&h2, "POST", "/v1/completions", Some(completion(9, 1))));
    assert_eq!(g.status, 503, "{}", g.body);
    assert!(g.body.contains("too many open connections"), "{}", g.body);
    assert_eq!(rt.block_on(request(&h2, "GET", "/health", None)).status, 200);
    assert!(
        metric(&admin, "kvroute_http_connections_closed_total{listener=\"serving\",reason=\"over_capacity_stream\"}")
            >= 1.0
    );
    // …and the three finish.
    for r in running {
        let g = rt.block_on(r).unwrap();
        assert_eq!(g.data.last().map(String::as_str), Some("[DONE]"), "{}", g.body);
    }
    // Their slots are free again.
    let g = rt.block_on(request(&h2, "POST", "/v1/completions", Some(completion(10, 1))));
    assert_eq!(g.status, 200, "{}", g.body);
}

#[test]
fn h2c_connections_close_at_the_header_and_idle_timeouts() {
    let p = free_ports(3);
    let (port, zmq, s) = (p[0], p[1], p[2]);
    let extra = ["--header-timeout-ms", "1000", "--idle-timeout-ms", "1500"];
    let _kids = Children(vec![common::serve(port, zmq, &[s], &extra), sim(s, zmq, &[])]);
    let base = format!("http://127.0.0.1:{port}");
    let admin = common::admin(&base);
    wait_ready(&base);
    // The preface and SETTINGS, and no request: closed at the header timeout.
    let t0 = Instant::now();
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.write_all(PREFACE).unwrap();
    raw.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    let mut sink = [0u8; 1024];
    while matches!(raw.read(&mut sink), Ok(n) if n > 0) {}
    let closed = t0.elapsed();
    assert!(closed > Duration::from_millis(900) && closed < Duration::from_millis(2500), "closed after {closed:?}");
    // A connection that made a request, then idles: GOAWAY and closed at the idle timeout
    // (HTTP/2 PINGs from the client do not keep it).
    let rt = rt();
    let (h2, done) = rt.block_on(connect(port));
    let g = rt.block_on(request(&h2, "POST", "/v1/completions", Some(completion(0, 1))));
    assert_eq!(g.status, 200, "{}", g.body);
    let idle_from = Instant::now();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(4), done).await })
        .expect("idle connection held")
        .unwrap();
    let idle = idle_from.elapsed();
    assert!(idle > Duration::from_millis(1300) && idle < Duration::from_millis(3000), "closed after {idle:?}");
    assert!(
        metric(&admin, "kvroute_http_connections_closed_total{listener=\"serving\",reason=\"idle_timeout\"}") >= 1.0
    );
}
