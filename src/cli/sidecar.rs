//! `kvroute sidecar`: llm-d's routing sidecar for decode pods. It listens on `--port` in
//! front of vLLM on `localhost:--vllm-port`. `POST /v1/completions` and
//! `/v1/chat/completions` carrying `x-prefiller-host-port` run the P/D flow of
//! `kvroute_gateway::pd` (prefill at that host, decode at the local vLLM, the prefiller's
//! cached tokens merged into usage; a failed prefill → decode only). Without the header,
//! and for every other path, requests pass through to vLLM unchanged; `GET /metrics` is
//! vLLM's metrics followed by the sidecar's (`kvroute_pd_*`,
//! `kvroute_sidecar_refused_prefillers_total`).
//!
//! SSRF protection is on by default: the prefill target must be in the allow-list
//! (`--prefill-allow HOST:PORT`, `--prefill-allow-file`); anything else is answered 403
//! (OpenAI-style JSON error) and never connected to. `--insecure-any-prefiller` turns the
//! check off: then anyone who can reach the sidecar can make it POST prompts to any
//! address it can reach.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use kvroute_gateway::pd;
use serde_json::{json, Value};

/// The KV connector protocol spoken with vLLM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Connector {
    /// vLLM's NixlConnector: `kv_transfer_params` (do_remote_decode / do_remote_prefill).
    Nixlv2,
}

#[derive(Args, Debug)]
pub struct SidecarArgs {
    /// Port to serve on (all interfaces); the decode pod's serving port.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The local vLLM's port (decode requests go to 127.0.0.1:PORT).
    #[arg(long, default_value_t = 8001)]
    vllm_port: u16,
    /// KV connector protocol.
    #[arg(long, value_enum, default_value_t = Connector::Nixlv2)]
    connector: Connector,
    /// A prefill pod the sidecar may send prefill requests to, as HOST:PORT exactly as the
    /// scheduler writes it in x-prefiller-host-port (repeatable). Any other target → 403.
    #[arg(long = "prefill-allow", value_name = "HOST:PORT")]
    prefill_allow: Vec<String>,
    /// A file of allowed prefill targets: one HOST:PORT per line (`#` comments).
    #[arg(long, value_name = "FILE")]
    prefill_allow_file: Option<PathBuf>,
    /// UNSAFE: accept any x-prefiller-host-port (no SSRF protection: whoever reaches the
    /// sidecar can make it POST to any address it can reach). Only behind a gateway that
    /// strips client-set x-prefiller-host-port headers.
    #[arg(long)]
    insecure_any_prefiller: bool,
    /// Time for a prefill reply, ms; past it the request is decoded without it.
    #[arg(long, default_value_t = 120_000)]
    prefill_timeout_ms: u64,
}

struct Sidecar {
    client: reqwest::Client,
    vllm: String,
    /// `None`: any prefiller (`--insecure-any-prefiller`).
    allow: Option<HashSet<String>>,
    prefill_timeout: Duration,
    metrics: pd::PdMetrics,
    refused: prometheus::IntCounter,
    registry: prometheus::Registry,
}

/// The allow-list from the flags and the file.
fn allow_list(a: &SidecarArgs) -> anyhow::Result<Option<HashSet<String>>> {
    if a.insecure_any_prefiller {
        return Ok(None);
    }
    let mut set: HashSet<String> = a.prefill_allow.iter().map(|s| s.trim().to_string()).collect();
    if let Some(f) = &a.prefill_allow_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        set.extend(
            text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).map(String::from),
        );
    }
    for s in &set {
        let ok = s.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        anyhow::ensure!(ok, "--prefill-allow {s:?}: expected HOST:PORT");
    }
    Ok(Some(set))
}

pub fn run(a: SidecarArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let Connector::Nixlv2 = a.connector;
    let allow = allow_list(&a)?;
    if allow.is_none() {
        tracing::warn!("--insecure-any-prefiller: prefill targets are not checked (no SSRF protection)");
    } else if allow.as_ref().is_some_and(HashSet::is_empty) {
        tracing::warn!("no --prefill-allow given: every request naming a prefiller is refused (403)");
    }
    let registry = prometheus::Registry::new();
    let metrics = pd::PdMetrics::new(&registry)?;
    let refused = prometheus::IntCounter::new(
        "kvroute_sidecar_refused_prefillers_total",
        "Requests refused (403) because x-prefiller-host-port named a target outside the allow-list",
    )?;
    registry.register(Box::new(refused.clone()))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let st = Arc::new(Sidecar {
        client,
        vllm: format!("http://127.0.0.1:{}", a.vllm_port),
        allow,
        prefill_timeout: Duration::from_millis(a.prefill_timeout_ms),
        metrics,
        refused,
        registry,
    });
    let app = Router::new()
        .route("/v1/completions", post(|s, h, b| flow(s, h, b, "/v1/completions")))
        .route("/v1/chat/completions", post(|s, h, b| flow(s, h, b, "/v1/chat/completions")))
        .fallback(passthrough)
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(st);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(("0.0.0.0", a.port))
            .await
            .with_context(|| format!("cannot listen on port {}", a.port))?;
        tracing::info!(port = a.port, vllm_port = a.vllm_port, "kvroute sidecar listening");
        axum::serve(l, app).with_graceful_shutdown(stop_signal()).await?;
        Ok(())
    })
}

/// SIGTERM or SIGINT: stop accepting, let requests in flight finish.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn error(status: StatusCode, msg: &str) -> Response {
    let body = json!({"error": {"message": msg, "type": kvroute_gateway::error_type(status), "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

async fn flow(State(st): State<Arc<Sidecar>>, headers: HeaderMap, body: Bytes, path: &'static str) -> Response {
    let target = headers.get("x-prefiller-host-port").map(|h| h.to_str().map(str::trim));
    let target = match target {
        None => {
            st.metrics.requests.with_label_values(&["decode_only"]).inc();
            return send(&st, Method::POST, path, &headers, Body::from(body), None).await;
        }
        Some(Ok(t)) if !t.is_empty() => t.to_string(),
        Some(_) => return error(StatusCode::BAD_REQUEST, "x-prefiller-host-port must be HOST:PORT"),
    };
    if st.allow.as_ref().is_some_and(|a| !a.contains(&target)) {
        st.refused.inc();
        tracing::warn!(%target, "prefill target not in the allow-list; refused");
        return error(StatusCode::FORBIDDEN, &format!("prefill target {target} is not an allowed prefill pod"));
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        // vLLM answers what it makes of it.
        _ => return send(&st, Method::POST, path, &headers, Body::from(body), None).await,
    };
    let t = std::time::Instant::now();
    let url = format!("http://{target}{path}");
    let r = pd::prefill(&st.client, &url, &v, headers.get("authorization"), st.prefill_timeout).await;
    st.metrics.prefill_seconds.observe(t.elapsed().as_secs_f64());
    match r {
        Ok(p) => {
            st.metrics.requests.with_label_values(&["disaggregated"]).inc();
            let b = pd::decode_body(&v, &p.params).to_string();
            send(&st, Method::POST, path, &headers, Body::from(b), p.cached_tokens).await
        }
        Err(e) => {
            tracing::warn!(%target, kind = e.kind, "prefill failed ({}); decoding without it", e.message);
            st.metrics.prefill_failures.with_label_values(&[e.kind]).inc();
            st.metrics.requests.with_label_values(&["fallback"]).inc();
            send(&st, Method::POST, path, &headers, Body::from(body), None).await
        }
    }
}

/// Headers not passed on (hop-by-hop, and those the client library sets itself).
const SKIP: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "content-length",
    "x-prefiller-host-port",
];

/// Sends a request to the local vLLM and streams its answer back (`cached`: merge the
/// prefiller's cached tokens into the usage of a successful answer).
async fn send(
    st: &Sidecar,
    method: Method,
    path_query: &str,
    headers: &HeaderMap,
    body: Body,
    cached: Option<u64>,
) -> Response {
    let mut req = st.client.request(method, format!("{}{path_query}", st.vllm));
    for (k, v) in headers {
        if !SKIP.contains(&k.as_str()) {
            req = req.header(k, v);
        }
    }
    let resp = match req.body(reqwest::Body::wrap_stream(body.into_data_stream())).send().await {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("vLLM is unreachable: {}", kvroute_gateway::upstream::describe(e));
            return error(StatusCode::BAD_GATEWAY, &msg);
        }
    };
    let status = resp.status();
    let mut out_headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        if !SKIP.contains(&k.as_str()) {
            out_headers.append(k, v.clone());
        }
    }
    let sse = out_headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    let mut stream = resp.bytes_stream().boxed();
    if let Some(c) = cached.filter(|_| status.is_success()) {
        stream = if sse { pd::merge_sse(stream, c) } else { pd::merge_whole(stream, c) };
    }
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    *out.headers_mut() = out_headers;
    out
}

/// Everything else goes to vLLM unchanged; `GET /metrics` adds the sidecar's metrics.
async fn passthrough(State(st): State<Arc<Sidecar>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    if parts.method == Method::GET && parts.uri.path() == "/metrics" {
        let vllm = match st.client.get(format!("{}/metrics", st.vllm)).send().await {
            Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
            _ => String::new(),
        };
        let mut own = Vec::new();
        let _ = prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &st.registry.gather(), &mut own);
        let text = format!("{vllm}{}", String::from_utf8_lossy(&own));
        let mut r = Response::new(Body::from(text));
        r.headers_mut().insert("content-type", HeaderValue::from_static("text/plain; version=0.0.4"));
        return r;
    }
    send(&st, parts.method, &pq, &parts.headers, body, None).await
}
