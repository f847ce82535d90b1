//! Issue #14 on the gRPC doors (`--ext-proc-listen`, `--grpc-health-listen`): a connection
//! cap, a handshake timeout, max concurrent streams per connection and HTTP/2 keepalive —
//! black-box, against real `kvroute serve` and `kvroute sim` processes, with a real gRPC
//! client (tonic) and hand-written HTTP/2 frames where a client must misbehave.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{free_ports, sim, Children};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Req, processing_response::Response as Resp, HttpBody, HttpHeaders,
    ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use serde_json::json;
use tokio::sync::mpsc::Sender;
use tonic::Streaming;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK: every header a literal without indexing, new name (lengths < 127).
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in headers {
        b.push(0);
        b.push(k.len() as u8);
        b.extend_from_slice(k.as_bytes());
        b.push(v.len() as u8);
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// An HTTP/2 frame read: type, flags, payload.
type Frame = (u8, u8, Vec<u8>);

/// Reads frames from `s` for up to `limit`: (the frames, when the peer closed).
fn read_frames(s: &mut TcpStream, limit: Duration) -> (Vec<Frame>, Option<Duration>) {
    let t = Instant::now();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 4096];
    while t.elapsed() < limit {
        s.set_read_timeout(Some((limit - t.elapsed()).max(Duration::from_millis(1)))).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return (frames, Some(t.elapsed())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(_) => return (frames, Some(t.elapsed())),
        }
        while buf.len() >= 9 {
            let n = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
            if buf.len() < 9 + n {
                break;
            }
            frames.push((buf[3], buf[4], buf[9..9 + n].to_vec()));
            buf.drain(..9 + n);
        }
    }
    (frames, None)
}

/// The router's admin metric (summed over the lines starting with `line_start`).
fn metric(admin: &str, line_start: &str) -> f64 {
    let text = ureq::get(&format!("{admin}/metrics")).call().unwrap().into_string().unwrap();
    text.lines().filter(|l| l.starts_with(line_start)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

fn closed_metric(admin: &str, listener: &str, reason: &str) -> f64 {
    metric(admin, &format!("kvroute_http_connections_closed_total{{listener=\"{listener}\",reason=\"{reason}\"}}"))
}

/// A router with its ext_proc and gRPC health listeners on (`ports`: router, zmq, sim,
/// ext_proc, health), the sim started, plus `extra`.
fn start(ports: &[u16], extra: &[&str]) -> (Children, String) {
    let (router, zmq, s, grpc, health) = (ports[0], ports[1], ports[2], ports[3], ports[4]);
    let (g, h) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{health}"));
    let mut args = vec!["--ext-proc-listen", &g, "--grpc-health-listen", &h];
    args.extend_from_slice(extra);
    let kids = Children(vec![common::serve(router, zmq, &[s], &args), sim(s, zmq, &[])]);
    let admin = common::admin(&format!("http://127.0.0.1:{router}"));
    (kids, admin)
}

type Replies = Streaming<ProcessingResponse>;

fn header(k: &str, v: &str) -> HeaderValue {
    HeaderValue { key: k.into(), raw_value: v.as_bytes().to_vec(), ..Default::default() }
}

/// Opens an ext_proc stream on `client` and sends the request headers (full-duplex mode:
/// the answer waits for the body).
async fn open_stream(
    client: &mut ExternalProcessorClient<tonic::transport::Channel>,
) -> (Sender<ProcessingRequest>, Replies) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hs = vec![header(":path", "/v1/completions"), header(":method", "POST")];
    tx.send(ProcessingRequest {
        request: Some(Req::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers: hs }),
            end_of_stream: false,
            ..Default::default()
        })),
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: 4,
            response_body_mode: 4,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let replies = client.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, replies)
}

/// Sends the body on an open stream; the pod the answer routes to.
async fn finish_stream(tx: &Sender<ProcessingRequest>, replies: &mut Replies) -> String {
    let body = json!({"model": "m", "prompt": "capped", "max_tokens": 1}).to_string().into_bytes();
    let msg = ProcessingRequest {
        request: Some(Req::RequestBody(HttpBody { body, end_of_stream: true, ..Default::default() })),
        ..Default::default()
    };
    tx.send(msg).await.unwrap();
    let Some(Resp::RequestHeaders(h)) = replies.message().await.unwrap().unwrap().response else {
        panic!("expected the headers answer")
    };
    let set = h.response.unwrap().header_mutation.unwrap().set_headers;
    let dest = set.iter().find(|o| o.header.as_ref().unwrap().key == "x-gateway-destination-endpoint").unwrap();
    String::from_utf8_lossy(&dest.header.as_ref().unwrap().raw_value).to_string()
}

async fn client(port: u16) -> ExternalProcessorClient<tonic::transport::Channel> {
    let ch =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await.unwrap();
    ExternalProcessorClient::new(ch)
}

async fn health_status(port: u16) -> i32 {
    let ch =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await.unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let req = tonic_health::pb::HealthCheckRequest { service: "envoy.service.ext_proc.v3.ExternalProcessor".into() };
    h.check(req).await.unwrap().into_inner().status
}

#[test]
fn beyond_the_connection_cap_new_ext_proc_connections_are_closed_while_established_ones_work() {
    let p = free_ports(5);
    let (_kids, admin) = start(&p, &["--ext-proc-max-connections", "4"]);
    let (s, grpc, health) = (p[2], p[3], p[4]);
    let pod = format!("127.0.0.1:{s}");
    std::thread::sleep(Duration::from_millis(300));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // Four connections (the cap), each with a stream in flight.
        let mut clients = Vec::new();
        let mut streams = Vec::new();
        for _ in 0..4 {
            let mut c = client(grpc).await;
            streams.push(open_stream(&mut c).await);
            clients.push(c);
        }
        // A fifth connection is closed at once, again and again.
        for i in 0..3 {
            let mut extra = TcpStream::connect(("127.0.0.1", grpc)).unwrap();
            extra.write_all(PREFACE).unwrap();
            let (_, eof) = read_frames(&mut extra, Duration::from_secs(2));
            assert!(eof.is_some_and(|t| t < Duration::from_secs(1)), "connection {} over the cap held: {eof:?}", 5 + i);
        }
        assert!(closed_metric(&admin, "ext_proc", "over_capacity") >= 3.0);
        // The established connections go on: the streams in flight finish, and a new
        // stream on an established connection is served.
        for (tx, replies) in &mut streams {
            assert_eq!(finish_stream(tx, replies).await, pod);
        }
        let (tx, mut replies) = open_stream(&mut clients[1]).await;
        assert_eq!(finish_stream(&tx, &mut replies).await, pod);
        // The gRPC health port has its own cap: it answers.
        assert_eq!(health_status(health).await, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        // Connections closing free their slots.
        drop((streams, tx, replies));
        clients.truncate(2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = client(grpc).await;
        let (tx, mut replies) = open_stream(&mut c).await;
        assert_eq!(finish_stream(&tx, &mut replies).await, pod);
    });
}

#[test]
fn silent_and_handshake_only_grpc_connections_are_closed_at_the_handshake_timeout() {
    let p = free_ports(5);
    let (_kids, admin) = start(&p, &["--ext-proc-handshake-timeout-ms", "1000"]);
    let (s, grpc, health) = (p[2], p[3], p[4]);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    // Silent, on each gRPC port; the HTTP/2 preface and SETTINGS but no call.
    let mut silent = TcpStream::connect(("127.0.0.1", grpc)).unwrap();
    let mut silent_health = TcpStream::connect(("127.0.0.1", health)).unwrap();
    let mut preface_only = TcpStream::connect(("127.0.0.1", grpc)).unwrap();
    preface_only.write_all(PREFACE).unwrap();
    preface_only.write_all(&frame(4, 0, 0, &[])).unwrap();
    // A real client that made a call, then stays quiet past the timeout.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut c = rt.block_on(async {
        let mut c = client(grpc).await;
        let (tx, mut replies) = open_stream(&mut c).await;
        assert_eq!(finish_stream(&tx, &mut replies).await, format!("127.0.0.1:{s}"));
        c
    });
    for (what, conn) in
        [("silent", &mut silent), ("silent (health)", &mut silent_health), ("preface only", &mut preface_only)]
    {
        let (_, eof) = read_frames(conn, Duration::from_secs(3));
        let at = eof.map(|_| t0.elapsed());
        assert!(
            at.is_some_and(|t| t > Duration::from_millis(900) && t < Duration::from_millis(2500)),
            "{what} connection closed at {at:?} (timeout 1 s)"
        );
    }
    assert_eq!(closed_metric(&admin, "ext_proc", "handshake_timeout"), 2.0);
    assert_eq!(closed_metric(&admin, "grpc_health", "handshake_timeout"), 1.0);
    // The connection that made a call was not closed (nothing else counted; it still serves).
    rt.block_on(async {
        let (tx, mut replies) = open_stream(&mut c).await;
        assert_eq!(finish_stream(&tx, &mut replies).await, format!("127.0.0.1:{s}"));
    });
    assert_eq!(
        metric(&admin, "kvroute_http_connections{listener=\"ext_proc\""),
        1.0,
        "the caller's connection is the one open"
    );
}

#[test]
fn grpc_connections_get_the_stream_limit_and_dead_peers_are_found_by_keepalive() {
    let p = free_ports(5);
    let extra = ["--ext-proc-max-concurrent-streams", "3", "--ext-proc-keepalive-interval-ms", "500"];
    let (_kids, _admin) = start(&p, &[&extra[..], &["--ext-proc-keepalive-timeout-ms", "500"]].concat());
    let (grpc, health) = (p[3], p[4]);
    std::thread::sleep(Duration::from_millis(300));
    // The server's SETTINGS carry MAX_CONCURRENT_STREAMS (0x3) = 3.
    let mut c = TcpStream::connect(("127.0.0.1", grpc)).unwrap();
    c.write_all(PREFACE).unwrap();
    c.write_all(&frame(4, 0, 0, &[])).unwrap();
    let (frames, _) = read_frames(&mut c, Duration::from_millis(500));
    let settings = frames.iter().find(|(kind, flags, _)| *kind == 4 && flags & 1 == 0).expect("server SETTINGS");
    let max_streams =
        settings.2.chunks(6).find(|p| p[..2] == [0, 3]).map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
    assert_eq!(max_streams, Some(3));
    // A peer that starts a Watch (which never ends) and then answers nothing — not even
    // PINGs — is closed after interval + timeout, its stream with it…
    let mut dead = TcpStream::connect(("127.0.0.1", health)).unwrap();
    let headers = hpack(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Watch"),
        (":authority", "x"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    dead.write_all(PREFACE).unwrap();
    dead.write_all(&frame(4, 0, 0, &[])).unwrap();
    dead.write_all(&frame(1, 4, 1, &headers)).unwrap();
    dead.write_all(&frame(0, 1, 1, &[0, 0, 0, 0, 0])).unwrap();
    let t0 = Instant::now();
    // …while a live client's Watch on the same port goes on (its PING answers keep it; a
    // worker thread runs its connection while this thread reads the dead one).
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut live = rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{health}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let mut w = h.watch(req).await.unwrap().into_inner();
        assert!(w.message().await.unwrap().is_some(), "the first status");
        w
    });
    let (frames, eof) = read_frames(&mut dead, Duration::from_secs(4));
    assert!(frames.iter().any(|(kind, flags, _)| *kind == 6 && flags & 1 == 0), "no PING sent");
    assert!(frames.iter().any(|(kind, _, _)| *kind == 0), "the Watch was served (DATA)");
    let closed = eof.map(|_| t0.elapsed());
    assert!(closed.is_some_and(|t| t < Duration::from_millis(3000)), "a dead peer held: closed at {closed:?}");
    rt.block_on(async {
        // Still open after the dead one's interval + timeout (a closed stream errors at once).
        let r = tokio::time::timeout(Duration::from_millis(1500), live.message()).await;
        assert!(r.is_err(), "the live Watch ended: {r:?}");
    });
}
