//! The upstream side of the gateway: the HTTP client to the pods (its timeouts, no
//! redirects), the metrics of what went wrong up there, and the guard that ends a
//! response body whose pod stalls.
//!
//! Timeouts (defaults in brackets; Envoy's in parentheses for comparison):
//!
//! - **connect** [5 s] (Envoy's `connect_timeout`, 5 s): TCP connect to a pod. A refused
//!   or timed-out connect is retried on the next pod.
//! - **first byte** [120 s] (Envoy's per-try timeout; off by default there): from sending the
//!   request to the first byte of the response *body* (the gateway holds the response
//!   headers until then, so nothing has reached the client yet). Past it the pod counts a
//!   failure and the request is retried on the next pod. For a non-streaming request this
//!   covers the whole generation, hence the generous default.
//! - **idle** [60 s] (Envoy's `stream_idle_timeout`, 5 min): longest gap between two body
//!   chunks once the response has started. Past it an SSE stream ends with an error event
//!   (`data: {"error":{…,"code":504}}`, no `[DONE]`); any other body is cut (the client sees
//!   a truncated response). The pod counts a failure.
//! - **total** [600 s] (Envoy's route `timeout`, 15 s — too short for LLM streams): the whole
//!   request, retries included. Before the response starts: 504; after: as idle.
//!
//! A pod counts a failure for every timeout, as for a failed health probe: two in a row
//! take it out of rotation until a probe succeeds; requests still waiting for its first
//! byte then move to the next pod at once. Redirects are never followed (a 3xx
//! from a pod is an error: the prompt must not be sent where a backend says).

use std::time::{Duration, Instant};

use axum::body::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use serde_json::json;

/// Upstream timeouts (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(120),
            idle: Duration::from_secs(60),
            total: Duration::from_secs(600),
        }
    }
}

/// The client to the pods: connect timeout, pooled connections, never a redirect.
pub fn client(t: &Timeouts) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .connect_timeout(t.connect)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

/// `kvroute_upstream_*`: what went wrong between the gateway and the pods.
#[derive(Clone)]
pub struct UpstreamMetrics {
    /// By pod and kind: `connect`, `status_5xx`, `status_429`, `redirect`, `body`, `request`,
    /// `timeout`, `taken_out` (health took the pod out while the request waited).
    pub errors: IntCounterVec,
    /// Attempts after the first of a request (on another pod).
    pub retries: IntCounter,
    /// By pod and kind: `first_byte`, `idle`, `total`.
    pub timeouts: IntCounterVec,
}

impl UpstreamMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let errors = IntCounterVec::new(
            Opts::new("kvroute_upstream_errors_total", "Failed attempts to a pod, by kind"),
            &["pod", "kind"],
        )?;
        let retries =
            IntCounter::new("kvroute_upstream_retries_total", "Requests sent again to another pod after a failure")?;
        let timeouts = IntCounterVec::new(
            Opts::new(
                "kvroute_upstream_timeouts_total",
                "Upstream timeouts, by pod and kind (first_byte, idle, total)",
            ),
            &["pod", "kind"],
        )?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(timeouts.clone()))?;
        Ok(Self { errors, retries, timeouts })
    }
}

/// The kind of a client error, as `kvroute_upstream_errors_total{kind}` counts it.
pub fn error_kind(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "connect"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    }
}

/// A client error for a message to the client: what happened, never the pod's URL.
pub fn describe(e: reqwest::Error) -> String {
    let kind = error_kind(&e);
    let e = e.without_url();
    // The innermost cause says what happened (e.g. "Connection refused").
    let mut root: &dyn std::error::Error = &e;
    while let Some(s) = root.source() {
        root = s;
    }
    format!("{kind} error: {root}")
}

/// A body stream that ends when the pod stalls (`idle` without a chunk, or `deadline`) or
/// its body breaks: SSE bodies end with an error event, others with an error (the
/// connection is cut). `on_fail(kind)` is called once when it happens, `kind` being
/// `idle`, `total` or `body`.
pub fn guard<S>(
    body: S,
    idle: Duration,
    deadline: Instant,
    sse: bool,
    on_fail: impl FnOnce(&'static str) + Send + 'static,
) -> BoxStream<'static, Result<Bytes, std::io::Error>>
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static,
{
    struct St<S, F> {
        body: S,
        on_timeout: Option<F>,
        done: bool,
    }
    let st = St { body: Box::pin(body), on_timeout: Some(on_fail), done: false };
    futures_util::stream::unfold(st, move |mut st| async move {
        if st.done {
            return None;
        }
        let now = Instant::now();
        let (wait, kind) =
            if deadline <= now + idle { (deadline.saturating_duration_since(now), "total") } else { (idle, "idle") };
        match tokio::time::timeout(wait, st.body.next()).await {
            Ok(Some(Ok(b))) => Some((Ok(b), st)),
            Ok(Some(Err(e))) => {
                st.done = true;
                if let Some(f) = st.on_timeout.take() {
                    f("body");
                }
                let msg = format!("upstream error mid-response: {}", describe(e));
                if sse {
                    Some((Ok(sse_error(&msg, 502)), st))
                } else {
                    Some((Err(std::io::Error::other(msg)), st))
                }
            }
            Ok(None) => None,
            Err(_) => {
                st.done = true;
                if let Some(f) = st.on_timeout.take() {
                    f(kind);
                }
                let msg = match kind {
                    "idle" => format!("upstream timeout: the pod sent nothing for {} ms", idle.as_millis()),
                    _ => "upstream timeout: the request exceeded its total time".to_string(),
                };
                if sse {
                    Some((Ok(sse_error(&msg, 504)), st))
                } else {
                    Some((Err(std::io::Error::new(std::io::ErrorKind::TimedOut, msg)), st))
                }
            }
        }
    })
    .boxed()
}

/// An SSE event carrying an OpenAI-style error (`code` 502 or 504).
pub fn sse_error(msg: &str, code: u16) -> Bytes {
    let kind = crate::error_type(axum::http::StatusCode::from_u16(code).unwrap_or_default());
    let e = json!({"error": {"message": msg, "type": kind, "code": code}});
    Bytes::from(format!("data: {e}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stalled_sse_body_ends_with_an_error_event() {
        let body = futures_util::stream::iter(vec![Ok::<_, reqwest::Error>(Bytes::from_static(b"data: 1\n\n"))])
            .chain(futures_util::stream::pending());
        let hit = std::sync::Arc::new(std::sync::Mutex::new(None));
        let h = hit.clone();
        let far = Instant::now() + Duration::from_secs(60);
        let out: Vec<_> = guard(body, Duration::from_millis(50), far, true, move |k| {
            *h.lock().unwrap() = Some(k);
        })
        .collect()
        .await;
        assert_eq!(out.len(), 2);
        let last = String::from_utf8(out[1].as_ref().unwrap().to_vec()).unwrap();
        assert!(last.starts_with("data: {\"error\":") && last.ends_with("\n\n"), "{last}");
        assert_eq!(*hit.lock().unwrap(), Some("idle"));
    }

    #[tokio::test]
    async fn the_deadline_ends_a_body_that_keeps_trickling() {
        let body = futures_util::stream::unfold(0u32, |n| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok::<_, reqwest::Error>(Bytes::from(n.to_string())), n + 1))
        });
        let t = Instant::now();
        let out: Vec<_> =
            guard(body, Duration::from_secs(5), t + Duration::from_millis(100), false, |k| assert_eq!(k, "total"))
                .collect()
                .await;
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(out.last().unwrap().is_err());
    }
}
