//! `kvroute sidecar`: llm-d's routing sidecar for decode pods. It listens on `--port` in
//! front of vLLM on `localhost:--vllm-port`. `POST /v1/completions` and
//! `/v1/chat/completions` carrying `x-prefiller-host-port` run the P/D flow of
//! `kvroute_gateway::pd` (prefill at that host, decode at the local vLLM, the prefiller's
//! cached tokens merged into usage; a failed prefill → decode only). Without the header,
//! and for every other path, requests pass through to vLLM unchanged; `GET /metrics` is
//! vLLM's metrics followed by the sidecar's (`kvroute_pd_*`,
//! `kvroute_sidecar_refused_prefillers_total`, `kvroute_sidecar_unverified_prefillers_total`,
//! with a pool `kvroute_discovery_*`).
//!
//! SSRF protection is on by default: the prefill target must be in the allow-list
//! (`--prefill-allow HOST:PORT`, `--prefill-allow-file`) or, with `--pool-name` /
//! `--endpoint-selector` (llm-d's `--enable-ssrf-protection` with the InferencePool), a
//! current endpoint of the pool (`podIP:port` of a Ready pod, for the pool's target ports),
//! followed by the same Kubernetes watchers as `kvroute serve --discovery kubernetes`
//! (`kvroute_discovery`). Anything else is answered 403 (OpenAI-style JSON error) and never
//! connected to. Until the pool's first listing has arrived, a target that no static entry
//! allows is answered 503 with `Retry-After` (the sidecar cannot tell yet: it may well be a
//! pool member, so this is "try again", not "forbidden"). `--insecure-any-prefiller` turns
//! the check off: then anyone who can reach the sidecar can make it POST prompts to any
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
use kvroute_discovery::{Fleet, KubeSection};
use kvroute_gateway::pd;
use serde_json::{json, Value};
use tokio::sync::watch;

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
    #[arg(long, conflicts_with_all = ["pool_name", "endpoint_selector"])]
    insecure_any_prefiller: bool,
    /// The pool whose Ready pods (podIP:port for the pool's target ports) are allowed
    /// prefill targets, followed live; --prefill-allow entries are allowed too.
    #[command(flatten)]
    pool: super::fleet::PoolArgs,
    /// Time for a prefill reply, ms; past it the request is decoded without it.
    #[arg(long, default_value_t = 120_000)]
    prefill_timeout_ms: u64,
}

struct Sidecar {
    client: reqwest::Client,
    vllm: String,
    allow: Allow,
    prefill_timeout: Duration,
    metrics: pd::PdMetrics,
    refused: prometheus::IntCounter,
    unverified: prometheus::IntCounter,
    registry: prometheus::Registry,
    /// Keeps the pool's watchers running.
    _discovery: Option<kvroute_discovery::Discovery>,
}

/// Which prefill targets the sidecar may connect to.
enum Allow {
    /// `--insecure-any-prefiller`.
    Any,
    /// The static entries, and the pool's current endpoints when it is followed.
    Listed { fixed: HashSet<String>, pool: Option<watch::Receiver<Fleet>> },
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Allowed,
    /// Not an allowed target: 403.
    Refused,
    /// Not a static entry, and the pool has not been listed yet: 503.
    Unverified,
}

impl Allow {
    fn check(&self, target: &str) -> Verdict {
        let Allow::Listed { fixed, pool } = self else { return Verdict::Allowed };
        if fixed.contains(target) {
            return Verdict::Allowed;
        }
        let Some(pool) = pool else { return Verdict::Refused };
        let fleet = pool.borrow();
        if fleet.endpoints.iter().any(|e| e.name == target) {
            Verdict::Allowed
        } else if fleet.synced {
            Verdict::Refused
        } else {
            Verdict::Unverified
        }
    }
}

/// The pool to follow (`--pool-name` / `--endpoint-selector`), if any.
fn pool_section(a: &SidecarArgs) -> anyhow::Result<Option<KubeSection>> {
    if !a.pool.named() {
        anyhow::ensure!(
            !a.pool.any_detail(),
            "--pool-namespace, --pool-group, --endpoint-target-ports and --kubeconfig need --pool-name or \
             --endpoint-selector"
        );
        return Ok(None);
    }
    // Only who the pods are; request priorities are the endpoint picker's business.
    let mut k = KubeSection { objectives: false, ..KubeSection::default() };
    a.pool.apply(&mut k);
    k.validate().map_err(anyhow::Error::msg)?;
    Ok(Some(k))
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
    let fixed = allow_list(&a)?;
    let pool = pool_section(&a)?;
    if fixed.is_none() {
        tracing::warn!("--insecure-any-prefiller: prefill targets are not checked (no SSRF protection)");
    } else if fixed.as_ref().is_some_and(HashSet::is_empty) && pool.is_none() {
        tracing::warn!("no --prefill-allow or pool given: every request naming a prefiller is refused (403)");
    }
    let registry = prometheus::Registry::new();
    let metrics = pd::PdMetrics::new(&registry)?;
    let refused = prometheus::IntCounter::new(
        "kvroute_sidecar_refused_prefillers_total",
        "Requests refused (403) because x-prefiller-host-port named a target outside the allow-list",
    )?;
    registry.register(Box::new(refused.clone()))?;
    let unverified = prometheus::IntCounter::new(
        "kvroute_sidecar_unverified_prefillers_total",
        "Requests answered 503 because the pool had not been listed yet (x-prefiller-host-port could not be checked)",
    )?;
    registry.register(Box::new(unverified.clone()))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        // The pool's watchers retry on their own: an unreachable API server is not fatal,
        // targets outside the static list just wait for the first listing (503).
        let discovery = match &pool {
            Some(k) => Some(
                kvroute_discovery::start_kubernetes(k, &registry, Default::default())
                    .await
                    .map_err(anyhow::Error::msg)
                    .context("the pool's allow-list (Kubernetes discovery)")?,
            ),
            None => None,
        };
        let allow = match fixed {
            None => Allow::Any,
            Some(fixed) => Allow::Listed { fixed, pool: discovery.as_ref().map(|d| d.fleet.clone()) },
        };
        let st = Arc::new(Sidecar {
            client,
            vllm: format!("http://127.0.0.1:{}", a.vllm_port),
            allow,
            prefill_timeout: Duration::from_millis(a.prefill_timeout_ms),
            metrics,
            refused,
            unverified,
            registry,
            _discovery: discovery,
        });
        let app = Router::new()
            .route("/v1/completions", post(|s, h, b| flow(s, h, b, "/v1/completions")))
            .route("/v1/chat/completions", post(|s, h, b| flow(s, h, b, "/v1/chat/completions")))
            .fallback(passthrough)
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(st);
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
    match st.allow.check(&target) {
        Verdict::Allowed => {}
        Verdict::Refused => {
            st.refused.inc();
            tracing::warn!(%target, "prefill target not in the allow-list; refused");
            return error(StatusCode::FORBIDDEN, &format!("prefill target {target} is not an allowed prefill pod"));
        }
        Verdict::Unverified => {
            st.unverified.inc();
            tracing::warn!(%target, "the pool has not been listed yet; prefill target not checked, refused (503)");
            let msg = format!("prefill target {target} cannot be checked yet: the pool has not been listed; retry");
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &msg);
            r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
            return r;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_discovery::Endpoint;

    fn endpoint(name: &str) -> Endpoint {
        let (ip, port) = name.rsplit_once(':').unwrap();
        Endpoint {
            name: name.into(),
            pod: "p".into(),
            ip: ip.into(),
            port: port.parse().unwrap(),
            labels: Default::default(),
            events: None,
            replay: None,
        }
    }

    #[test]
    fn the_pool_allows_its_current_endpoints_and_static_entries_add_to_them() {
        let (tx, rx) = watch::channel(Fleet::default());
        let allow = Allow::Listed { fixed: ["10.0.0.9:8000".to_string()].into(), pool: Some(rx) };
        // Not listed yet: a static entry passes, anything else cannot be checked.
        assert_eq!(allow.check("10.0.0.9:8000"), Verdict::Allowed);
        assert_eq!(allow.check("10.0.0.1:8000"), Verdict::Unverified);
        tx.send_replace(Fleet { endpoints: vec![endpoint("10.0.0.1:8000")], synced: true, problem: None });
        assert_eq!(allow.check("10.0.0.1:8000"), Verdict::Allowed);
        assert_eq!(allow.check("10.0.0.1:8001"), Verdict::Refused, "another port of a pool pod");
        assert_eq!(allow.check("10.0.0.2:8000"), Verdict::Refused);
        assert_eq!(allow.check("10.0.0.9:8000"), Verdict::Allowed);
        // The pod left the pool.
        tx.send_replace(Fleet { endpoints: vec![], synced: true, problem: None });
        assert_eq!(allow.check("10.0.0.1:8000"), Verdict::Refused);
        let fixed_only = Allow::Listed { fixed: HashSet::new(), pool: None };
        assert_eq!(fixed_only.check("10.0.0.1:8000"), Verdict::Refused);
        assert_eq!(Allow::Any.check("anything:1"), Verdict::Allowed);
    }
}
