//! `POST /v1/completions` and `/v1/chat/completions`: route, then send to the pick and,
//! while nothing has reached the client, to the next pods on failure.
//!
//! An attempt fails (and the next pod is tried, up to `max_retries` more) on a connection
//! error, a 429, a 5xx, a redirect (never followed) or no first body byte within the
//! first-byte timeout. The response headers are held until the first body byte, so a
//! retry is always invisible to the client. When every attempt fails the client gets:
//! 504 if an attempt timed out or the total time ran out, 429 if every pod answered 429,
//! 502 if a pod answered a redirect, else 503 — with `Retry-After` on 429 and 503. Messages
//! name pods (`host:port`), never URLs.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use crate::pd::{self, Mode, Prefilled};
use crate::upstream::{describe, error_kind, guard};
use crate::{attribution, error, parse_request, Gateway, RouteRequest};

/// An attempt that ended before the pod's first byte.
enum Outcome {
    Client(reqwest::Error),
    TakenOut,
}

/// Why an attempt failed, worst last: decides the status when every attempt fails.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Failure {
    Unavailable,
    Redirect,
    Timeout,
}

pub async fn proxy(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes, chat: bool) -> Response {
    let (mut v, model) = match parse_request(&body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let (t0, arrival) = (Instant::now(), std::time::SystemTime::now());
    let deadline = t0 + gw.timeouts.total;
    let session = ["x-session-id", "x-session-token"].iter().find_map(|h| headers.get(*h)?.to_str().ok());
    let sheddable = gw.sheddable(|h| headers.get(h).and_then(|v| v.to_str().ok()));
    let request_id = attribution::request_id(headers.get("x-request-id").and_then(|h| h.to_str().ok()));
    let request_id_header = HeaderValue::from_str(&request_id).ok();
    let req = RouteRequest {
        chat,
        model: &model,
        body: &v,
        session,
        sheddable,
        subset: None,
        dry_run: false,
        request_id: Some(&request_id),
    };
    let routed = match gw.route(&req).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // Hit attribution: a streaming request is asked for its final usage chunk, which the
    // client gets only if it asked for it itself.
    let attribute = gw.attribution.enabled;
    let asked = if attribute { attribution::ask_for_usage(&mut v, &body) } else { None };
    let strip_usage = asked.is_some();
    let body = asked.unwrap_or(body);
    let stream = v.get("stream").and_then(serde_json::Value::as_bool) == Some(true);
    let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
    // P/D in gateway mode: prefill first; its kv_transfer_params go with the decode request,
    // and the decode pod then computes no prompt (its pending prefill is only the rest).
    let mut routed = routed;
    let mut prefilled_on: Option<String> = None;
    let (body, cached) = match &routed.prefill {
        Some((p, _)) if gw.pd_mode == Mode::Gateway => {
            match gw.prefill(p.clone(), &routed, path, &v, &headers, deadline).await {
                Some(done) => {
                    prefilled_on = Some(p.name.clone());
                    if let Some(u) = routed.uncached.first_mut() {
                        *u = 0;
                    }
                    (Bytes::from(pd::decode_body(&v, &done.params).to_string()), done.cached_tokens)
                }
                None => (body, None),
            }
        }
        None if gw.pd_mode == Mode::Gateway && !routed.explain["pd"].is_null() => {
            gw.pd.requests.with_label_values(&["decode_only"]).inc();
            (body, None)
        }
        _ => (body, None),
    };
    // In sidecar mode the decode pod's sidecar prefills on the named pod before the first
    // byte comes back: count that prefill in the prefill pod's load until then.
    let mut sidecar_prefill = if gw.pd_mode == Mode::Sidecar { gw.commit_prefill(&routed) } else { None };
    if gw.pd_mode == Mode::Sidecar {
        prefilled_on = routed.prefill.as_ref().map(|(p, _)| p.name.clone());
    }
    let (mut last_err, mut worst, mut all_busy) = (String::new(), Failure::Unavailable, true);
    let m = &gw.upstream;
    for (i, b) in routed.order.iter().enumerate().take(gw.max_retries + 1) {
        let now = Instant::now();
        if now >= deadline {
            m.timeouts.with_label_values(&[&b.name, "total"]).inc();
            worst = Failure::Timeout;
            last_err = "the request exceeded its total time".into();
            break;
        }
        if i > 0 {
            m.retries.inc();
        }
        let mut guard_ = gw.commit(&routed, i);
        let mut req =
            gw.client.post(format!("{}{path}", b.url)).header("content-type", "application/json").body(body.clone());
        for h in ["authorization", "x-session-id"] {
            if let Some(val) = headers.get(h) {
                req = req.header(h, val);
            }
        }
        if let Some(id) = &request_id_header {
            req = req.header("x-request-id", id);
        }
        // P/D in sidecar mode (llm-d's disagg-profile-handler): the decode pod's sidecar
        // prefills there.
        if let Some((p, _)) = routed.prefill.as_ref().filter(|_| gw.pd_mode == Mode::Sidecar) {
            req = req.header("x-prefiller-host-port", &p.name);
        }
        let out = b.taken_out();
        let first_deadline = (now + gw.timeouts.first_byte).min(deadline);
        let timeout_kind = if first_deadline == deadline { "total" } else { "first_byte" };
        // Headers and the first body chunk, within the first-byte timeout.
        let attempt = tokio::time::timeout_at(first_deadline.into(), async {
            // Health took the pod out meanwhile (e.g. it stopped answering probes): no
            // point waiting for its first byte.
            let out = async {
                out.await;
                Err(Outcome::TakenOut)
            };
            let send = async {
                let resp = req.send().await?;
                let status = resp.status();
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() || status.is_redirection() {
                    return Ok(Err(status));
                }
                let ctype = resp.headers().get("content-type").cloned();
                let mut stream = resp.bytes_stream();
                let first = stream.next().await.transpose()?;
                Ok::<_, reqwest::Error>(Ok((status, ctype, first, stream)))
            };
            tokio::select! {
                r = send => r.map_err(Outcome::Client),
                r = out => r,
            }
        })
        .await;
        match attempt {
            Ok(Ok(Ok((status, ctype, first, rest)))) => {
                guard_.first_byte();
                sidecar_prefill.take();
                let ttft = gw.ttft.with_label_values(&[if routed.hit { "hit" } else { "miss" }]);
                ttft.observe(t0.elapsed().as_secs_f64());
                let sse =
                    ctype.as_ref().and_then(|c| c.to_str().ok()).is_some_and(|c| c.starts_with("text/event-stream"));
                let (backend, timeouts) = (b.clone(), m.timeouts.clone());
                let errors = m.errors.clone();
                let on_fail = move |kind: &'static str| {
                    tracing::warn!(pod = %backend.name, kind, "upstream failed mid-response");
                    match kind {
                        "body" => errors.with_label_values(&[&backend.name, "body"]).inc(),
                        _ => timeouts.with_label_values(&[&backend.name, kind]).inc(),
                    }
                    backend.failed();
                };
                let rest = guard(rest, gw.timeouts.idle, deadline, sse, on_fail);
                let mut body = futures_util::stream::iter(first.map(Ok)).chain(rest).boxed();
                if let Some(c) = cached.filter(|_| status.is_success()) {
                    body = if sse { pd::merge_sse(body, c) } else { pd::merge_whole(body, c) };
                }
                if attribute && status.is_success() {
                    let a =
                        attribution::Arrival { request_id: &request_id, model: &model, arrival, started: t0, stream };
                    let prediction = attribution::Prediction::of(&routed, i, prefilled_on.as_deref(), &a);
                    if let Some(p) = prediction {
                        let tap = attribution::Tap::new(gw.attribution.clone(), p, status.as_u16());
                        body = if sse {
                            attribution::tap_sse(body, tap, strip_usage)
                        } else {
                            attribution::tap_whole(body, tap)
                        };
                    }
                }
                // The in-flight count lasts as long as the body.
                let body = body.map(move |c| {
                    let _ = &guard_;
                    c
                });
                let mut out = Response::new(Body::from_stream(body));
                *out.status_mut() = status;
                if let Some(c) = ctype {
                    out.headers_mut().insert("content-type", c);
                }
                if let Ok(p) = HeaderValue::from_str(&b.name) {
                    out.headers_mut().insert("x-kvroute-pod", p);
                }
                if let Some(id) = request_id_header {
                    out.headers_mut().insert("x-request-id", id);
                }
                return out;
            }
            Ok(Err(Outcome::TakenOut)) => {
                all_busy = false;
                m.errors.with_label_values(&[&b.name, "taken_out"]).inc();
                tracing::warn!(pod = %b.name, "pod left the rotation before its first byte; trying the next");
                last_err = format!("{}: taken out of rotation (health) before answering", b.name);
            }
            Ok(Ok(Err(status))) => {
                let kind = if status == StatusCode::TOO_MANY_REQUESTS {
                    "status_429"
                } else if status.is_redirection() {
                    "redirect"
                } else {
                    "status_5xx"
                };
                m.errors.with_label_values(&[&b.name, kind]).inc();
                all_busy &= status == StatusCode::TOO_MANY_REQUESTS;
                if status.is_redirection() {
                    tracing::warn!(pod = %b.name, %status, "pod answered a redirect; not followed");
                    last_err = format!("{} answered a redirect ({status}), which the gateway does not follow", b.name);
                    worst = worst.max(Failure::Redirect);
                    b.failed();
                } else {
                    last_err = format!("{} answered {status}", b.name);
                    if status.is_server_error() {
                        b.failed();
                    }
                }
            }
            Ok(Err(Outcome::Client(e))) => {
                all_busy = false;
                m.errors.with_label_values(&[&b.name, error_kind(&e)]).inc();
                let e = describe(e);
                tracing::warn!(pod = %b.name, "request failed before the first byte: {e}");
                last_err = format!("{}: {e}", b.name);
                b.failed();
            }
            Err(_) => {
                all_busy = false;
                m.timeouts.with_label_values(&[&b.name, timeout_kind]).inc();
                tracing::warn!(pod = %b.name, kind = timeout_kind, "no first byte in time");
                last_err = format!("{}: no response within the {timeout_kind} timeout", b.name);
                worst = Failure::Timeout;
                b.failed();
            }
        }
    }
    let status = match worst {
        Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
        Failure::Redirect => StatusCode::BAD_GATEWAY,
        _ if all_busy && !last_err.is_empty() => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, &format!("no pod could serve the request ({last_err})"))
}

impl Gateway {
    /// The prefill request to the prefill pick (P/D, gateway mode), counted in its load
    /// while it runs ([`Gateway::commit_prefill`]); `None` when it failed (the request then
    /// goes to the decode pod alone).
    async fn prefill(
        &self,
        backend: Arc<crate::Backend>,
        routed: &crate::Routed,
        path: &str,
        v: &serde_json::Value,
        headers: &HeaderMap,
        deadline: Instant,
    ) -> Option<Prefilled> {
        let pd = &self.pd;
        let name = backend.name.clone();
        let t = Instant::now();
        let timeout = self.timeouts.first_byte.min(deadline.saturating_duration_since(t));
        let load = self.commit_prefill(routed);
        let url = format!("{}{path}", backend.url);
        let r = tokio::select! {
            r = pd::prefill(&self.client, &url, v, headers.get("authorization"), timeout) => r,
            _ = backend.taken_out() => {
                Err(pd::PrefillError { kind: "request", message: format!("prefill pod {name} left the pool") })
            }
        };
        drop(load);
        pd.prefill_seconds.observe(t.elapsed().as_secs_f64());
        match r {
            Ok(p) => {
                pd.requests.with_label_values(&["disaggregated"]).inc();
                Some(p)
            }
            Err(e) => {
                tracing::warn!(pod = %name, kind = e.kind, "prefill failed ({}); decoding without it", e.message);
                pd.prefill_failures.with_label_values(&[e.kind]).inc();
                pd.requests.with_label_values(&["fallback"]).inc();
                if let "connect" | "timeout" = e.kind {
                    backend.failed();
                }
                None
            }
        }
    }
}
