//! Prefill/decode disaggregation: the request flow of llm-d's routing sidecar (NIXL v2
//! connector, vLLM's `NixlConnector`), as one piece the gateway runs itself when the
//! scheduler's pick has a prefill pod.
//!
//! 1. **Prefill** (to the prefill pod): the client's body with
//!    `kv_transfer_params {do_remote_decode: true, do_remote_prefill: false, remote_*: null}`,
//!    `stream: false`, `stream_options` removed, the token limit set to 1 in whichever of
//!    `max_tokens` / `max_completion_tokens` / `max_output_tokens` the request used
//!    (`max_tokens` if none), and a fresh `x-request-id` ([`prefill_body`], [`prefill`]).
//! 2. **Decode** (to the decode pod): the client's body plus the `kv_transfer_params` the
//!    prefiller returned ([`decode_body`]); its response goes back as is, except that the
//!    prefiller's `usage.prompt_tokens_details.cached_tokens` replaces the decode pod's
//!    (non-streaming: the body; streaming: the final usage chunk when there is one —
//!    [`merge_body`], [`merge_sse`]).
//! 3. **Fallback**: a prefill that fails (connect error, timeout, non-2xx, a reply without
//!    `kv_transfer_params`) → the client's original request goes to the decode pod alone.
//!
//! Metrics: `kvroute_pd_requests_total{outcome}` (`disaggregated`, `decode_only` — the
//! scheduler chose not to split —, `fallback`), `kvroute_pd_prefill_failures_total{kind}`
//! (`connect`, `timeout`, `status`, `body`, `no_params`, `request`) and
//! `kvroute_pd_prefill_seconds`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use serde_json::{json, Value};

/// Who runs the flow when the pick has a prefill pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// The gateway sends the prefill request, then the decode request.
    #[default]
    Gateway,
    /// The decode pod runs a routing sidecar: the gateway only names the prefill pod in
    /// `x-prefiller-host-port`.
    Sidecar,
}

/// The token-limit fields, in the order they are looked for.
const LIMITS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// The prefill request's body (see the module docs).
pub fn prefill_body(orig: &Value) -> Value {
    let mut v = orig.clone();
    if let Some(m) = v.as_object_mut() {
        m.insert(
            "kv_transfer_params".into(),
            json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                   "remote_block_ids": null, "remote_host": null, "remote_port": null}),
        );
        m.insert("stream".into(), Value::Bool(false));
        m.remove("stream_options");
        let used: Vec<&str> = LIMITS.iter().copied().filter(|k| m.contains_key(*k)).collect();
        if used.is_empty() {
            m.insert("max_tokens".into(), json!(1));
        }
        for k in used {
            m.insert(k.into(), json!(1));
        }
    }
    v
}

/// The decode request's body: the client's, with the prefiller's `kv_transfer_params`.
pub fn decode_body(orig: &Value, params: &Value) -> Value {
    let mut v = orig.clone();
    if let Some(m) = v.as_object_mut() {
        m.insert("kv_transfer_params".into(), params.clone());
    }
    v
}

/// A fresh `x-request-id` for the prefill request (unique within and across processes).
pub fn fresh_request_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("pd-{:x}-{:x}-{n:x}", nanos as u64, std::process::id())
}

/// What a successful prefill hands to the decode request.
#[derive(Clone, Debug, PartialEq)]
pub struct Prefilled {
    pub params: Value,
    /// The prefiller's `usage.prompt_tokens_details.cached_tokens`, if it reported one.
    pub cached_tokens: Option<u64>,
}

/// Why a prefill failed, as `kvroute_pd_prefill_failures_total{kind}` counts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillError {
    pub kind: &'static str,
    pub message: String,
}

/// Reads a prefill reply: its `kv_transfer_params` (an object) and cached tokens.
pub fn parse_prefill_reply(body: &[u8]) -> Result<Prefilled, PrefillError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| PrefillError { kind: "body", message: format!("prefill reply is not JSON: {e}") })?;
    let params = v
        .get("kv_transfer_params")
        .filter(|p| p.is_object())
        .cloned()
        .ok_or_else(|| PrefillError { kind: "no_params", message: "prefill reply has no kv_transfer_params".into() })?;
    let cached_tokens = v.pointer("/usage/prompt_tokens_details/cached_tokens").and_then(Value::as_u64);
    Ok(Prefilled { params, cached_tokens })
}

/// Sends the prefill request for `orig` to `url` (`http://host:port/v1/...`), with the
/// `authorization` header passed on, within `timeout`.
pub async fn prefill(
    client: &reqwest::Client,
    url: &str,
    orig: &Value,
    authorization: Option<&axum::http::HeaderValue>,
    timeout: Duration,
) -> Result<Prefilled, PrefillError> {
    let body = prefill_body(orig);
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-request-id", fresh_request_id())
        .body(body.to_string());
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let fail = |e: reqwest::Error| {
        let kind = match crate::upstream::error_kind(&e) {
            "timeout" => "timeout",
            "connect" => "connect",
            "body" => "body",
            _ => "request",
        };
        PrefillError { kind, message: crate::upstream::describe(e) }
    };
    let run = async {
        let resp = req.send().await.map_err(fail)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(PrefillError { kind: "status", message: format!("prefill pod answered {status}") });
        }
        let bytes = resp.bytes().await.map_err(fail)?;
        parse_prefill_reply(&bytes)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(PrefillError { kind: "timeout", message: format!("no prefill reply within {timeout:?}") }),
    }
}

/// Sets `usage.prompt_tokens_details.cached_tokens` of a response object whose `usage` is
/// an object; `false` when there was none.
pub fn merge_usage(v: &mut Value, cached: u64) -> bool {
    match v.get_mut("usage").and_then(Value::as_object_mut) {
        Some(u) => {
            let d = u.entry("prompt_tokens_details").or_insert_with(|| json!({}));
            if !d.is_object() {
                *d = json!({});
            }
            d["cached_tokens"] = json!(cached);
            true
        }
        None => false,
    }
}

/// A whole non-streaming response body with the cached tokens merged (unchanged if it is
/// not a JSON object with `usage`).
pub fn merge_body(body: &[u8], cached: u64) -> Bytes {
    if let Ok(mut v) = serde_json::from_slice::<Value>(body) {
        if merge_usage(&mut v, cached) {
            return Bytes::from(v.to_string());
        }
    }
    Bytes::copy_from_slice(body)
}

/// An SSE body with the cached tokens merged into each event that carries a `usage`
/// object (vLLM: the final usage chunk); every other byte passes unchanged
/// ([`crate::sse::map_events`]).
pub fn merge_sse<S, E>(body: S, cached: u64) -> BoxStream<'static, Result<Bytes, E>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    crate::sse::map_events(body, move |event| Some(merge_event(event, cached)))
}

/// A non-streaming body, held whole, then given back with the cached tokens merged
/// ([`merge_body`]); an error from the body ends it.
pub fn merge_whole<S, E>(body: S, cached: u64) -> BoxStream<'static, Result<Bytes, E>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    futures_util::stream::once(async move {
        let mut body = Box::pin(body);
        let mut buf = Vec::new();
        while let Some(c) = body.next().await {
            buf.extend_from_slice(&c?);
        }
        Ok(merge_body(&buf, cached))
    })
    .boxed()
}

/// One SSE event (`data: {...}\n\n`) with the cached tokens merged when it has `usage`.
fn merge_event(event: Bytes, cached: u64) -> Bytes {
    if let Some(mut v) = crate::sse::event_json(&event) {
        if merge_usage(&mut v, cached) {
            return Bytes::from(format!("data: {v}\n\n"));
        }
    }
    event
}

/// `kvroute_pd_*`.
#[derive(Clone)]
pub struct PdMetrics {
    pub requests: IntCounterVec,
    pub prefill_failures: IntCounterVec,
    pub prefill_seconds: Histogram,
}

impl PdMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "kvroute_pd_requests_total",
                "Requests to a pool with prefill pods, by outcome (disaggregated, decode_only, fallback)",
            ),
            &["outcome"],
        )?;
        let prefill_failures = IntCounterVec::new(
            Opts::new(
                "kvroute_pd_prefill_failures_total",
                "Prefill requests that failed (the request then went to the decode pod alone), by kind",
            ),
            &["kind"],
        )?;
        let prefill_seconds = Histogram::with_opts(
            HistogramOpts::new("kvroute_pd_prefill_seconds", "Prefill request latency (P/D), successful or not")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(prefill_failures.clone()))?;
        registry.register(Box::new(prefill_seconds.clone()))?;
        Ok(Self { requests, prefill_failures, prefill_seconds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_body_asks_for_a_remote_decode_of_one_token_without_streaming() {
        let orig = json!({"model": "m", "prompt": "hi", "stream": true,
                          "stream_options": {"include_usage": true}, "max_tokens": 200, "temperature": 0.5});
        let p = prefill_body(&orig);
        assert_eq!(
            p["kv_transfer_params"],
            json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                   "remote_block_ids": null, "remote_host": null, "remote_port": null})
        );
        assert_eq!(p["stream"], json!(false));
        assert!(p.get("stream_options").is_none());
        assert_eq!(p["max_tokens"], json!(1));
        assert_eq!(p["temperature"], json!(0.5));
        assert_eq!(p["prompt"], json!("hi"));
        assert!(p.get("max_completion_tokens").is_none());
    }

    #[test]
    fn the_token_limit_is_set_in_the_field_the_request_used() {
        let p = prefill_body(&json!({"messages": [], "max_completion_tokens": 50}));
        assert_eq!(p["max_completion_tokens"], json!(1));
        assert!(p.get("max_tokens").is_none());
        let p = prefill_body(&json!({"input": "x", "max_output_tokens": 9}));
        assert_eq!(p["max_output_tokens"], json!(1));
        assert!(p.get("max_tokens").is_none());
        let p = prefill_body(&json!({"prompt": "x"}));
        assert_eq!(p["max_tokens"], json!(1));
        let p = prefill_body(&json!({"prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}));
        assert_eq!((p["max_tokens"].clone(), p["max_completion_tokens"].clone()), (json!(1), json!(1)));
    }

    #[test]
    fn the_decode_body_is_the_original_plus_the_returned_params() {
        let orig = json!({"prompt": "x", "stream": true, "max_tokens": 200, "stream_options": {"include_usage": true}});
        let params =
            json!({"do_remote_prefill": true, "remote_block_ids": [1, 2], "remote_host": "h", "remote_port": 5});
        let d = decode_body(&orig, &params);
        assert_eq!(d["kv_transfer_params"], params);
        assert_eq!(d["stream"], json!(true));
        assert_eq!(d["max_tokens"], json!(200));
        assert_eq!(d["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn request_ids_are_fresh() {
        assert_ne!(fresh_request_id(), fresh_request_id());
    }

    #[test]
    fn a_prefill_reply_without_params_is_a_failure() {
        assert_eq!(parse_prefill_reply(b"{\"choices\": []}").unwrap_err().kind, "no_params");
        assert_eq!(parse_prefill_reply(b"{\"kv_transfer_params\": null}").unwrap_err().kind, "no_params");
        assert_eq!(parse_prefill_reply(b"<html>").unwrap_err().kind, "body");
        let ok = parse_prefill_reply(
            br#"{"kv_transfer_params": {"remote_port": 1}, "usage": {"prompt_tokens_details": {"cached_tokens": 32}}}"#,
        )
        .unwrap();
        assert_eq!(ok.params, json!({"remote_port": 1}));
        assert_eq!(ok.cached_tokens, Some(32));
    }

    #[test]
    fn cached_tokens_are_merged_into_the_body_usage() {
        let b = merge_body(br#"{"id": "x", "usage": {"prompt_tokens": 100, "prompt_tokens_details": null}}"#, 64);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], json!(64));
        assert_eq!(v["usage"]["prompt_tokens"], json!(100));
        let raw = br#"{"id": "x"}"#;
        assert_eq!(&merge_body(raw, 64)[..], &raw[..]);
    }

    #[tokio::test]
    async fn cached_tokens_are_merged_into_the_final_usage_chunk_of_a_stream() {
        let chunks = vec![
            "data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choi",
            "ces\":[],\"usage\":{\"prompt_tokens\":7}}\n\n",
            "data: [DONE]\n\n",
        ];
        let body = futures_util::stream::iter(chunks.into_iter().map(|c| Ok::<_, ()>(Bytes::from(c))));
        let out: Vec<u8> =
            merge_sse(body, 5).collect::<Vec<_>>().await.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
        let out = String::from_utf8(out).unwrap();
        let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{out}");
        assert_eq!(events[0], "data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}");
        let usage: Value = serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], json!(5));
        assert_eq!(events[2], "data: [DONE]");
    }
}
