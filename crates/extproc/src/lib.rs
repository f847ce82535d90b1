//! # kvroute-extproc — the Endpoint Picker door: Envoy `ext_proc` → the same scheduler
//!
//! Owns the Gateway API Inference Extension protocol: `kvroute serve --ext-proc-listen`
//! serves `envoy.service.ext_proc.v3.ExternalProcessor/Process` (types from the
//! `envoy-types` crate) and gRPC health. Envoy carries the traffic; for each request
//! this server reads the headers and the whole body, runs the gateway's routing
//! ([`kvroute_gateway::Gateway::route`]: tokenize → keys → index scores → profile — one
//! scheduler, two doors) and answers with `x-gateway-destination-endpoint: ip:port[,fallbacks]`,
//! `clear_route_cache`, the `envoy.lb` dynamic metadata and (full-duplex mode) the body
//! re-sent in chunks of at most 62,000 bytes. Prefill/decode disaggregation: when the
//! scheduler also picked a prefill pod, the destination is the decode pick and
//! `x-prefiller-host-port: host:port` names the prefill pod for the decode pod's routing
//! sidecar (`kvroute sidecar`, llm-d's pd-sidecar), as llm-d's endpoint picker does. A
//! client-sent `x-prefiller-host-port` never reaches a pod: the door overwrites it with
//! its own pick or removes it, on every request it routes (else a client would choose
//! where the sidecar sends prompts). Errors are `ImmediateResponse`s: 400 bad
//! body or no model, 404 a model no pod serves, 503 no ready endpoint, 429 saturated (the
//! gateway's OpenAI-style body, `Retry-After` on 429 and 503). Upstream timeouts on this
//! door are Envoy's (its route and cluster timeouts): Envoy, not kvroute, proxies the
//! request. On the response side it marks
//! the pod's first byte (the router's in-flight view), adds `x-kvroute-pod`, and reads
//! `usage` (vLLM's `prompt_tokens_details.cached_tokens`) from streamed and buffered
//! bodies into metrics and the gateway's hit attribution and traffic record
//! (`attribute.rs`; a request id is set on the request when Envoy sent none).
//! [`listen`] serves the gRPC listeners under client limits (connection cap, handshake
//! timeout, streams per connection, keepalive).

mod attribute;
pub mod listen;
mod metrics;
pub mod proto;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{processing_request, ProcessingRequest, ProcessingResponse};
use futures_util::Stream;
use kvroute_gateway::attribution::{self, Arrival, Prediction};
use kvroute_gateway::{Gateway, InFlight, RouteError, RouteRequest};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

pub use metrics::ExtProcMetrics;
use proto::{BodyMode, Reply};

/// `x-gateway-destination-endpoint`: where Envoy's ORIGINAL_DST cluster sends the request.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// `x-prefiller-host-port`: the prefill pod (`host:port`) the decode pod's routing sidecar
/// prefills at (P/D), as llm-d's endpoint picker sets it.
pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";
/// Body chunks sent back to Envoy are at most this long (as llm-d's EPP).
pub const MAX_CHUNK: usize = 62_000;

/// The ext_proc service.
#[derive(Clone)]
pub struct ExtProc {
    gw: Arc<Gateway>,
    metrics: Arc<ExtProcMetrics>,
}

impl ExtProc {
    pub fn new(gw: Arc<Gateway>, registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        Ok(Self { gw, metrics: Arc::new(ExtProcMetrics::new(registry)?) })
    }

    pub fn into_server(self) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(self).max_decoding_message_size(64 << 20)
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = ReplyStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let this = self.clone();
        tokio::spawn(async move {
            let mut s = StreamState::default();
            if let Err(e) = this.run(inbound, &tx, &mut s).await {
                tracing::debug!("ext_proc stream ended: {e}");
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// One HTTP request's conversation with Envoy.
#[derive(Default)]
struct StreamState {
    request_mode: BodyMode,
    response_mode: BodyMode,
    headers: Vec<(String, String)>,
    subset: Option<Vec<String>>,
    body: Vec<u8>,
    /// Routing is done (headers-only request, body complete, or an error answered).
    routed: bool,
    pod: Option<String>,
    /// P/D: the prefill pick (`host:port`), sent in [`PREFILLER_HEADER`].
    prefill: Option<String>,
    guard: Option<InFlight>,
    /// P/D: the prefill pick's load, until the decode pod's first byte (its sidecar
    /// prefills before answering).
    prefill_guard: Option<InFlight>,
    started: Option<Instant>,
    arrival: Option<SystemTime>,
    /// The request's id, when the door made one (set on the request for the pod).
    new_request_id: Option<String>,
    /// What routing predicted on the pod serving the prompt (hit attribution on).
    prediction: Option<Prediction>,
    /// The door asked the engine for the stream's usage chunk: remove it from the response.
    strip_usage: bool,
    /// The response on its way back (usage, attribution).
    response: Option<attribute::ResponseReader>,
}

impl StreamState {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

type Tx = mpsc::Sender<Result<ProcessingResponse, Status>>;

async fn send(tx: &Tx, r: ProcessingResponse) -> Result<(), Status> {
    tx.send(Ok(r)).await.map_err(|_| Status::cancelled("envoy closed the stream"))
}

impl ExtProc {
    async fn run(&self, mut inbound: Streaming<ProcessingRequest>, tx: &Tx, s: &mut StreamState) -> Result<(), Status> {
        while let Some(msg) = inbound.message().await? {
            if let Some(pc) = &msg.protocol_config {
                s.request_mode = BodyMode::from_i32(pc.request_body_mode);
                s.response_mode = BodyMode::from_i32(pc.response_body_mode);
            }
            let Some(req) = msg.request else { continue };
            match req {
                processing_request::Request::RequestHeaders(h) => {
                    s.started = Some(Instant::now());
                    s.arrival = Some(SystemTime::now());
                    s.headers = proto::headers(h.headers.as_ref());
                    s.subset = proto::subset_hint(msg.metadata_context.as_ref());
                    if h.end_of_stream {
                        // No body (e.g. GET /v1/models): any ready pod.
                        self.route_headers_only(tx, s).await?;
                    } else if s.request_mode == BodyMode::Streamed {
                        // Streamed: Envoy waits for this answer before the body and would
                        // route on it; ask for the body buffered instead (honoured with
                        // `allow_mode_override: true`), so the pick can go on the body answer.
                        let mut r = Reply::request_headers(vec![], &[PREFILLER_HEADER], false);
                        r.mode_override = Some(proto::buffer_request_body(s.response_mode));
                        s.request_mode = BodyMode::Buffered;
                        send(tx, r).await?;
                    } else if s.request_mode != BodyMode::FullDuplexStreamed {
                        // Buffered: Envoy waits for this answer before the body.
                        send(tx, Reply::request_headers(vec![], &[PREFILLER_HEADER], false)).await?;
                    }
                    // Full duplex: hold the answer until the body has arrived.
                }
                processing_request::Request::RequestBody(b) => {
                    if s.routed {
                        // Past an answered request (should not happen): pass chunks along.
                        send(tx, Reply::request_body_chunk(s.request_mode, b.body, b.end_of_stream)).await?;
                        continue;
                    }
                    s.body.extend_from_slice(&b.body);
                    if b.end_of_stream {
                        self.route_body(tx, s).await?;
                    } else if s.request_mode == BodyMode::Streamed {
                        // Streamed mode wants an answer per chunk; the destination goes on
                        // the last one.
                        send(tx, Reply::request_body_continue(vec![], &[], false)).await?;
                    }
                }
                processing_request::Request::RequestTrailers(_) => {
                    if !s.routed {
                        self.route_body(tx, s).await?;
                    }
                    send(tx, Reply::request_trailers()).await?;
                }
                processing_request::Request::ResponseHeaders(h) => {
                    if let Some(g) = s.guard.as_mut() {
                        g.first_byte();
                    }
                    s.prefill_guard = None;
                    let headers = proto::headers(h.headers.as_ref());
                    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
                    let status = header(":status").unwrap_or_default();
                    self.metrics.responses.with_label_values(&[status]).inc();
                    s.response = Some(attribute::ResponseReader::new(
                        &self.gw.attribution,
                        s.prediction.take(),
                        status.parse().unwrap_or(0),
                        header("content-type"),
                        s.strip_usage,
                    ));
                    let set = s.pod.iter().map(|p| ("x-kvroute-pod".to_string(), p.clone())).collect();
                    send(tx, Reply::response_headers(set)).await?;
                    if h.end_of_stream {
                        s.guard = None;
                    }
                }
                processing_request::Request::ResponseBody(b) => {
                    let (recut, usage) = match s.response.as_mut() {
                        Some(r) => r.chunk(&b.body, b.end_of_stream),
                        None => (None, None),
                    };
                    if b.end_of_stream {
                        self.metrics.usage(usage);
                        s.guard = None;
                    }
                    // Re-cut (full duplex only): whole events, sent once there are some.
                    match recut {
                        Some(out) if s.response_mode == BodyMode::FullDuplexStreamed => {
                            if !out.is_empty() || b.end_of_stream {
                                send(tx, Reply::response_body(s.response_mode, out, b.end_of_stream)).await?;
                            }
                        }
                        _ => send(tx, Reply::response_body(s.response_mode, b.body, b.end_of_stream)).await?,
                    }
                }
                processing_request::Request::ResponseTrailers(_) => {
                    s.guard = None;
                    send(tx, Reply::response_trailers()).await?;
                }
            }
        }
        Ok(())
    }

    async fn route_headers_only(&self, tx: &Tx, s: &mut StreamState) -> Result<(), Status> {
        s.routed = true;
        let Some(b) = self.gw.any_ready(s.subset.as_deref()) else {
            let e = RouteError::new(kvroute_gateway::StatusCode::SERVICE_UNAVAILABLE, "no ready endpoint");
            return self.refuse(tx, &e).await;
        };
        s.pod = Some(b.name.clone());
        self.metrics.outcome("headers_only");
        let set = vec![(DESTINATION_HEADER.to_string(), b.name.clone())];
        let mut r = Reply::request_headers(set, &[PREFILLER_HEADER], true);
        r.dynamic_metadata = Some(proto::lb_metadata(&b.name));
        send(tx, r).await
    }

    async fn route_body(&self, tx: &Tx, s: &mut StreamState) -> Result<(), Status> {
        s.routed = true;
        let path = s.header(":path").or_else(|| s.header("x-original-path")).unwrap_or("/v1/completions").to_string();
        let path = path.split('?').next().unwrap_or_default().to_string();
        let chat = path.ends_with("/chat/completions");
        if !chat && !path.ends_with("/completions") {
            // Unknown API: pass through to any ready pod, body untouched.
            return self.pass_through(tx, s).await;
        }
        let (mut v, model) = match kvroute_gateway::parse_request(&s.body) {
            Ok(x) => x,
            Err(e) => return self.refuse(tx, &e).await,
        };
        let session = s.header("x-session-id").or_else(|| s.header("x-session-token"));
        let sheddable = self.gw.sheddable(|h| s.header(h));
        let request_id = attribution::request_id(s.header("x-request-id"));
        let new_request_id = (s.header("x-request-id") != Some(request_id.as_str())).then(|| request_id.clone());
        let req = RouteRequest {
            chat,
            model: &model,
            body: &v,
            session,
            sheddable,
            subset: s.subset.as_deref(),
            dry_run: false,
            request_id: Some(&request_id),
        };
        let routed = match self.gw.route(&req).await {
            Ok(r) => r,
            Err(e) => return self.refuse(tx, &e).await,
        };
        s.new_request_id = new_request_id;
        let endpoints: Vec<String> = routed.order.iter().map(|b| b.name.clone()).collect();
        s.pod = endpoints.first().cloned();
        s.prefill = routed.explain["prefill"].as_str().map(str::to_string);
        s.guard = Some(self.gw.commit(&routed, 0));
        s.prefill_guard = self.gw.commit_prefill(&routed);
        self.metrics.outcome("routed");
        // A verdict exists when the pool has prefill pods to decide about.
        if !routed.explain["pd"].is_null() {
            self.metrics.pd(if s.prefill.is_some() { "split" } else { "decode_only" });
        }
        if let Some(t) = s.started {
            self.metrics.decision.observe(t.elapsed().as_secs_f64());
        }
        if self.gw.attribution.enabled {
            self.predict(s, &routed, &mut v, &model, &request_id);
        }
        self.answer(tx, s, &endpoints.join(",")).await
    }

    /// Keeps what routing predicted for the response to be compared with; in full-duplex
    /// mode both ways, asks the engine for a stream's usage (the body is re-sent anyway).
    fn predict(
        &self,
        s: &mut StreamState,
        routed: &kvroute_gateway::Routed,
        v: &mut serde_json::Value,
        model: &str,
        id: &str,
    ) {
        let stream = v.get("stream").and_then(serde_json::Value::as_bool) == Some(true);
        let a = Arrival {
            request_id: id,
            model,
            arrival: s.arrival.unwrap_or_else(SystemTime::now),
            started: s.started.unwrap_or_else(Instant::now),
            stream,
        };
        s.prediction = Prediction::of(routed, 0, s.prefill.as_deref(), &a);
        let duplex = BodyMode::FullDuplexStreamed;
        if s.request_mode == duplex && s.response_mode == duplex {
            let body = bytes::Bytes::from(std::mem::take(&mut s.body));
            let asked = attribution::ask_for_usage(v, &body);
            s.strip_usage = asked.is_some();
            s.body = Vec::from(asked.unwrap_or(body));
        }
    }

    async fn pass_through(&self, tx: &Tx, s: &mut StreamState) -> Result<(), Status> {
        let Some(pod) = self.gw.any_ready(s.subset.as_deref()).map(|b| b.name.clone()) else {
            let e = RouteError::new(kvroute_gateway::StatusCode::SERVICE_UNAVAILABLE, "no ready endpoint");
            return self.refuse(tx, &e).await;
        };
        s.pod = Some(pod.clone());
        self.metrics.outcome("pass_through");
        self.answer(tx, s, &pod).await
    }

    /// Sends the destination (and, in full-duplex mode, the body back in chunks).
    ///
    /// The header carries the pick only — Envoy's ORIGINAL_DST cluster parses it as one
    /// address — and the `envoy.lb` metadata the ordered list with the fallbacks, for
    /// proxies that retry on it. `x-prefiller-host-port` is set to the prefill pick, or
    /// removed when there is none (a client's own never passes).
    async fn answer(&self, tx: &Tx, s: &mut StreamState, endpoints: &str) -> Result<(), Status> {
        let pick = endpoints.split(',').next().unwrap_or_default();
        let mut set = vec![(DESTINATION_HEADER.to_string(), pick.to_string())];
        if let Some(id) = s.new_request_id.take() {
            set.push(("x-request-id".into(), id));
        }
        let remove: &[&str] = match &s.prefill {
            Some(p) => {
                set.push((PREFILLER_HEADER.to_string(), p.clone()));
                &[]
            }
            None => &[PREFILLER_HEADER],
        };
        let meta = proto::lb_metadata(endpoints);
        if s.request_mode == BodyMode::FullDuplexStreamed {
            set.push(("content-length".into(), s.body.len().to_string()));
            let mut r = Reply::request_headers(set, remove, true);
            r.dynamic_metadata = Some(meta);
            send(tx, r).await?;
            let body = std::mem::take(&mut s.body);
            let n = body.len().div_ceil(MAX_CHUNK).max(1);
            for (i, chunk) in body.chunks(MAX_CHUNK).chain((n == 1 && body.is_empty()).then_some(&[][..])).enumerate() {
                send(tx, Reply::request_body_chunk(BodyMode::FullDuplexStreamed, chunk.to_vec(), i + 1 == n)).await?;
            }
            return Ok(());
        }
        let mut r = Reply::request_body_continue(set, remove, true);
        r.dynamic_metadata = Some(meta);
        s.body.clear();
        send(tx, r).await
    }

    async fn refuse(&self, tx: &Tx, e: &RouteError) -> Result<(), Status> {
        self.metrics.outcome(match e.status.as_u16() {
            400 => "bad_request",
            404 => "not_found",
            429 => "saturated",
            503 => "unavailable",
            _ => "error",
        });
        send(tx, Reply::immediate(e.status.as_u16(), &e.message)).await
    }
}
