//! Hit attribution: what the router predicted against what the engine found.
//!
//! For every routed request the router knows the prefix it predicted cached on the pod it
//! picked (tokens) and the longest prefix any candidate pod had; the engine reports what
//! it actually found, `usage.prompt_tokens_details.cached_tokens` (vLLM: with
//! `--enable-prompt-tokens-details`). Non-streaming responses carry `usage`; for streaming
//! ones the gateway asks the engine for the final usage chunk
//! (`stream_options.include_usage`) and, when the client did not ask for it, removes that
//! chunk again, so the client's stream is byte for byte what the engine would have sent it.
//!
//! Each request's uncached tokens are split into three causes (tokens, one counter each):
//! *workload* (no pod had them), *routing* (another pod had them, the pick did not: load
//! won over cache) and *stale* (predicted on the pick, not found: a stale or wrong index).
//! Each request gets one outcome: `stale_index` if any predicted token was not found, else
//! `routed_elsewhere` if a longer prefix was cached elsewhere, else `no_prefix` if nothing
//! was cached anywhere and nothing found, else `hit`; `unreported` when the engine gave no
//! cached-token count. The last N requests, with both numbers, are kept for
//! `GET /v1/route/recent` (admin port).
//!
//! The engine can never report the last prompt token as cached (vLLM recomputes it, so a
//! full hit is `⌊(prompt − 1) / block⌋` blocks): predictions are capped the same way.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde_json::{json, Value};

/// What routing predicted for a request, on the pod it was sent to.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub request_id: String,
    pub model: String,
    /// The pod whose cache serves the prompt: the pick, or the prefill pod after a P/D split.
    pub pod: String,
    /// The decode pod when a prefill pod computed the prompt.
    pub decode_pod: Option<String>,
    /// The router's count of prompt tokens (estimated when tokenization was skipped).
    pub prompt_tokens: u64,
    /// Prefix tokens the router expected cached on `pod`.
    pub predicted_tokens: u64,
    /// The longest prefix any candidate pod had (tokens), and one pod that had it.
    pub best_tokens: u64,
    pub best_pod: Option<String>,
    pub block_size: u64,
    /// Why the pick: a short phrase (also in the decision's log line).
    pub reason: String,
    pub arrival: SystemTime,
    pub started: Instant,
    /// The prompt's chained block keys (the traffic record writes salted hashes of them).
    pub keys: Arc<[u64]>,
    pub stream: bool,
}

/// Empty names, nothing predicted, vLLM's default 16-token blocks, arrival now.
impl Default for Prediction {
    fn default() -> Self {
        Prediction {
            request_id: String::new(),
            model: String::new(),
            pod: String::new(),
            decode_pod: None,
            prompt_tokens: 0,
            predicted_tokens: 0,
            best_tokens: 0,
            best_pod: None,
            block_size: 16,
            reason: String::new(),
            arrival: SystemTime::now(),
            started: Instant::now(),
            keys: Arc::from(Vec::new()),
            stream: false,
        }
    }
}

/// The request a [`Prediction`] is made for (see [`Prediction::of`]).
pub struct Arrival<'a> {
    pub request_id: &'a str,
    pub model: &'a str,
    pub arrival: SystemTime,
    pub started: Instant,
    pub stream: bool,
}

impl Prediction {
    /// What `routed` predicted for `routed.order[i]`; when a prefill pod computed the
    /// prompt (`prefilled_on`, P/D), for that pod, `order[i]` being the decode pod. (The
    /// pick's own prediction is read only without a prefill leg: a gateway-mode split
    /// zeroes the decode pick's uncached tokens.)
    pub fn of(routed: &crate::Routed, i: usize, prefilled_on: Option<&str>, a: &Arrival) -> Option<Prediction> {
        let pick = routed.order.get(i)?;
        let (pod, predicted, decode_pod) = match prefilled_on {
            Some(p) => (p.to_string(), routed.prefill_predicted(), Some(pick.name.clone())),
            None => (pick.name.clone(), routed.predicted(i), None),
        };
        Some(Prediction {
            request_id: a.request_id.to_string(),
            model: a.model.to_string(),
            pod,
            decode_pod,
            prompt_tokens: routed.prompt_tokens,
            predicted_tokens: predicted,
            best_tokens: routed.best.0,
            best_pod: routed.best.1.clone(),
            block_size: routed.block_size,
            reason: if i == 0 { routed.reason.clone() } else { format!("retry {i}") },
            arrival: a.arrival,
            started: a.started,
            keys: routed.keys.clone(),
            stream: a.stream,
        })
    }
}

/// Non-streaming bodies are read for `usage` up to this size (a larger one is counted
/// `unreported`).
pub const MAX_USAGE_BODY: usize = 16 << 20;

/// The engine's token counts for one response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
}

impl Usage {
    /// The counts in a response object's `usage` (`None` when it has none).
    pub fn of(v: &Value) -> Option<Usage> {
        let u = v.get("usage").filter(|u| u.is_object())?;
        Some(Usage {
            prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64),
            completion_tokens: u.get("completion_tokens").and_then(Value::as_u64),
            cached_tokens: u.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_u64),
        })
    }

    /// The counts in a whole (non-streaming) JSON response body.
    pub fn of_body(body: &[u8]) -> Option<Usage> {
        serde_json::from_slice::<Value>(body).ok().as_ref().and_then(Usage::of)
    }
}

/// Reads the engine's usage from a stream's SSE events, one whole event at a time; with
/// `strip`, removes the final usage chunk (`choices: []` with `usage`) that was asked for
/// on the client's behalf ([`ask_for_usage`]).
pub struct UsageReader {
    usage: Option<Usage>,
    strip: bool,
}

/// `"usage"`, searched for in every event (built once: a searcher costs microseconds).
static USAGE_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));

impl UsageReader {
    pub fn new(strip: bool) -> Self {
        Self { usage: None, strip }
    }

    /// The event to pass on, `None` for the usage chunk removed.
    pub fn event(&mut self, event: Bytes) -> Option<Bytes> {
        if USAGE_KEY.find(&event).is_some() {
            if let Some(v) = crate::sse::event_json(&event) {
                if let Some(u) = Usage::of(&v) {
                    self.usage = Some(u);
                    let usage_chunk = v.get("choices").and_then(Value::as_array).is_some_and(|c| c.is_empty());
                    if self.strip && usage_chunk {
                        return None;
                    }
                }
            }
        }
        Some(event)
    }

    /// The last usage seen.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

/// One request's outcome (`kvroute_cache_attribution_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    NoPrefix,
    RoutedElsewhere,
    StaleIndex,
    Unreported,
}

impl Outcome {
    pub const ALL: [Outcome; 5] =
        [Outcome::Hit, Outcome::NoPrefix, Outcome::RoutedElsewhere, Outcome::StaleIndex, Outcome::Unreported];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::NoPrefix => "no_prefix",
            Outcome::RoutedElsewhere => "routed_elsewhere",
            Outcome::StaleIndex => "stale_index",
            Outcome::Unreported => "unreported",
        }
    }
}

/// A request's prediction against the engine's report, in tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attributed {
    pub outcome: Outcome,
    /// Predicted (capped) but not found.
    pub over: u64,
    /// Found but not predicted.
    pub under: u64,
    /// Uncached tokens by cause: nowhere cached, cached elsewhere, predicted but gone.
    pub workload: u64,
    pub routing: u64,
    pub stale: u64,
}

/// Compares a prediction with what the engine reported (see the module doc).
pub fn classify(p: &Prediction, u: &Usage) -> Attributed {
    let Some(act) = u.cached_tokens else {
        return Attributed { outcome: Outcome::Unreported, over: 0, under: 0, workload: 0, routing: 0, stale: 0 };
    };
    let bs = p.block_size.max(1);
    let prompt = u.prompt_tokens.unwrap_or(p.prompt_tokens);
    let cap = prompt.saturating_sub(1) / bs * bs;
    let pred = p.predicted_tokens.min(cap);
    // The pick's own prediction counts among the prefixes cached somewhere.
    let best = p.best_tokens.min(cap).max(pred);
    let stale = pred.saturating_sub(act);
    let routing = best.saturating_sub(act.max(pred));
    let workload = cap.saturating_sub(best.max(act));
    let outcome = if stale > 0 {
        Outcome::StaleIndex
    } else if routing > 0 {
        Outcome::RoutedElsewhere
    } else if best == 0 && act == 0 {
        Outcome::NoPrefix
    } else {
        Outcome::Hit
    };
    Attributed { outcome, over: stale, under: act.saturating_sub(pred), workload, routing, stale }
}

/// The request's id: the client's `x-request-id` when it sent a usable one (visible ASCII,
/// at most 128 bytes), else a new one — 32 hex digits, as vLLM's own (`uuid4().hex`): 16
/// random per process, then a counter. It goes to the pod (vLLM takes it as its request
/// id with `--enable-request-id-headers`), back to the client, and into the logs.
pub fn request_id(given: Option<&str>) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    if let Some(id) = given {
        if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.to_string();
        }
    }
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| std::collections::hash_map::RandomState::new().build_hasher().finish());
    format!("{prefix:016x}{:016x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Asks the engine for the final usage chunk of a streaming request the client did not ask
/// it for (`stream_options.include_usage`; continuous usage is left off so no other chunk
/// changes): edits `v` and returns the body to send instead of `body`, or `None` when
/// nothing needed asking. The usage chunk must then be removed ([`tap_sse`]). When the
/// client's body had no `stream_options` (the usual case) the option is appended before
/// the object's closing brace, without re-serializing the prompt; else `v` is serialized.
pub fn ask_for_usage(v: &mut Value, body: &Bytes) -> Option<Bytes> {
    if v.get("stream").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    if v.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    let o = v.as_object_mut()?;
    let had_options = o.contains_key("stream_options");
    let opts = o.entry("stream_options").or_insert_with(|| json!({}));
    if !opts.is_object() {
        *opts = json!({});
    }
    if let Some(opts) = opts.as_object_mut() {
        opts.insert("include_usage".into(), json!(true));
        opts.remove("continuous_usage_stats");
    }
    if !had_options {
        // `v` has `stream` besides: the object is not empty, so a comma goes first.
        let end = body.iter().rposition(|b| !b.is_ascii_whitespace());
        if let Some(e) = end.filter(|&e| body[e] == b'}') {
            let mut out = Vec::with_capacity(e + 48);
            out.extend_from_slice(&body[..e]);
            out.extend_from_slice(br#","stream_options":{"include_usage":true}}"#);
            return Some(Bytes::from(out));
        }
    }
    Some(Bytes::from(v.to_string()))
}

/// Receives each attributed request with the engine's counts (the traffic record).
pub type Sink = Box<dyn Fn(&Prediction, &Usage) + Send + Sync>;

/// `kvroute_prefix_*` / `kvroute_cache_attribution_total`, and the recent decisions.
pub struct Attribution {
    /// Off: requests pass untouched and nothing is counted (`observability.hit_attribution`).
    pub enabled: bool,
    predicted: HistogramVec,
    cached: HistogramVec,
    over: IntCounterVec,
    under: IntCounterVec,
    prompt: IntCounterVec,
    outcomes: IntCounterVec,
    missed: IntCounterVec,
    recent: parking_lot::Mutex<VecDeque<Value>>,
    capacity: usize,
    /// Called with each attributed request (the traffic record).
    pub sink: Option<Sink>,
}

impl Attribution {
    pub fn new(registry: &Registry, capacity: usize) -> Result<Self, prometheus::Error> {
        let buckets = vec![0.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0];
        let predicted = HistogramVec::new(
            HistogramOpts::new(
                "kvroute_prefix_predicted_tokens",
                "Prefix tokens the router predicted cached on the pod that served the prompt",
            )
            .buckets(buckets.clone()),
            &["pod"],
        )?;
        let cached = HistogramVec::new(
            HistogramOpts::new(
                "kvroute_prefix_cached_tokens",
                "Prompt tokens the engine reported cached (usage.prompt_tokens_details.cached_tokens)",
            )
            .buckets(buckets),
            &["pod"],
        )?;
        let over = IntCounterVec::new(
            Opts::new("kvroute_prefix_overpredicted_tokens_total", "Predicted cached tokens the engine did not find"),
            &["pod"],
        )?;
        let under = IntCounterVec::new(
            Opts::new(
                "kvroute_prefix_underpredicted_tokens_total",
                "Cached tokens the engine found but the router did not predict",
            ),
            &["pod"],
        )?;
        let prompt = IntCounterVec::new(
            Opts::new(
                "kvroute_prefix_prompt_tokens_total",
                "Prompt tokens of attributed requests (engine-reported): the denominator of predicted and actual hit rates",
            ),
            &["pod"],
        )?;
        let outcomes = IntCounterVec::new(
            Opts::new(
                "kvroute_cache_attribution_total",
                "Requests by cache outcome: hit, no_prefix (workload), routed_elsewhere (load over cache), stale_index, unreported",
            ),
            &["outcome"],
        )?;
        let missed = IntCounterVec::new(
            Opts::new(
                "kvroute_prefix_missed_tokens_total",
                "Uncached prompt tokens by cause: workload (cached nowhere), routing (cached elsewhere), stale (predicted, not found)",
            ),
            &["cause"],
        )?;
        for c in [&over, &under, &prompt, &outcomes, &missed] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(predicted.clone()))?;
        registry.register(Box::new(cached.clone()))?;
        for o in Outcome::ALL {
            outcomes.with_label_values(&[o.name()]);
        }
        for c in ["workload", "routing", "stale"] {
            missed.with_label_values(&[c]);
        }
        Ok(Self {
            enabled: true,
            predicted,
            cached,
            over,
            under,
            prompt,
            outcomes,
            missed,
            recent: parking_lot::Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity,
            sink: None,
        })
    }

    /// How many requests [`Attribution::recent`] keeps.
    pub fn set_capacity(&mut self, n: usize) {
        self.capacity = n;
        self.recent.get_mut().truncate(n);
    }

    /// A request's response ended: count it (2xx only; `usage` from the engine, if seen).
    pub fn finish(&self, p: &Prediction, usage: Option<Usage>, status: u16) {
        if !(200..300).contains(&status) {
            return;
        }
        let u = usage.unwrap_or_default();
        let a = classify(p, &u);
        self.outcomes.with_label_values(&[a.outcome.name()]).inc();
        if a.outcome != Outcome::Unreported {
            let pod = [p.pod.as_str()];
            self.predicted.with_label_values(&pod).observe(p.predicted_tokens as f64);
            self.cached.with_label_values(&pod).observe(u.cached_tokens.unwrap_or(0) as f64);
            self.over.with_label_values(&pod).inc_by(a.over);
            self.under.with_label_values(&pod).inc_by(a.under);
            self.prompt.with_label_values(&pod).inc_by(u.prompt_tokens.unwrap_or(p.prompt_tokens));
            self.missed.with_label_values(&["workload"]).inc_by(a.workload);
            self.missed.with_label_values(&["routing"]).inc_by(a.routing);
            self.missed.with_label_values(&["stale"]).inc_by(a.stale);
        }
        tracing::debug!(
            request_id = %p.request_id, pod = %p.pod, predicted_tokens = p.predicted_tokens,
            cached_tokens = ?u.cached_tokens, outcome = a.outcome.name(), "attributed"
        );
        if let Some(sink) = &self.sink {
            sink(p, &u);
        }
        if self.capacity == 0 {
            return;
        }
        let time = p.arrival.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let entry = json!({
            "request_id": p.request_id, "time_unix_s": time, "model": p.model, "pod": p.pod,
            "decode_pod": p.decode_pod, "stream": p.stream, "reason": p.reason,
            "prompt_tokens": u.prompt_tokens.unwrap_or(p.prompt_tokens),
            "completion_tokens": u.completion_tokens,
            "predicted_tokens": p.predicted_tokens, "cached_tokens": u.cached_tokens,
            "best_tokens": p.best_tokens, "best_pod": p.best_pod,
            "outcome": a.outcome.name(),
            "missed_tokens": {"workload": a.workload, "routing": a.routing, "stale": a.stale},
            "duration_s": p.started.elapsed().as_secs_f64(),
        });
        let mut r = self.recent.lock();
        if r.len() >= self.capacity {
            r.pop_back();
        }
        r.push_front(entry);
    }

    /// The last `limit` attributed requests, newest first.
    pub fn recent(&self, limit: usize) -> Value {
        let r = self.recent.lock();
        json!({"capacity": self.capacity, "decisions": r.iter().take(limit).cloned().collect::<Vec<_>>()})
    }
}

/// Counts a request when its response body ends (or is dropped: a client that went away).
pub struct Tap {
    attribution: Arc<Attribution>,
    prediction: Prediction,
    usage: Option<Usage>,
    status: u16,
}

impl Tap {
    pub fn new(attribution: Arc<Attribution>, prediction: Prediction, status: u16) -> Self {
        Self { attribution, prediction, usage: None, status }
    }

    /// The engine's counts, once read (counted when the tap is dropped).
    pub fn set_usage(&mut self, usage: Option<Usage>) {
        self.usage = usage;
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.attribution.finish(&self.prediction, self.usage, self.status);
    }
}

/// An SSE body passed through event by event, its usage read from the event that carries
/// one; with `strip`, the final usage chunk (`choices: []` with `usage`) is removed.
pub fn tap_sse<S, E>(body: S, mut tap: Tap, strip: bool) -> BoxStream<'static, Result<Bytes, E>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    let mut reader = UsageReader::new(strip);
    crate::sse::map_events(body, move |event| {
        let tap = &mut tap; // the whole tap lives in the closure (its drop counts the request)
        let out = reader.event(event);
        tap.usage = reader.usage();
        out
    })
}

/// A non-streaming body passed through unchanged; a copy (up to 16 MiB) is read for its
/// `usage` when it ends.
pub fn tap_whole<S, E>(body: S, tap: Tap) -> BoxStream<'static, Result<Bytes, E>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    struct St<S> {
        body: S,
        copy: Vec<u8>,
        tap: Tap,
    }
    let st = St { body: Box::pin(body), copy: Vec::new(), tap };
    futures_util::stream::unfold(st, |mut st| async move {
        match st.body.next().await {
            Some(Ok(b)) => {
                if st.copy.len() + b.len() <= MAX_USAGE_BODY {
                    st.copy.extend_from_slice(&b);
                }
                Some((Ok(b), st))
            }
            Some(Err(e)) => Some((Err(e), st)),
            None => {
                let St { copy, mut tap, .. } = st;
                tap.usage = Usage::of_body(&copy);
                drop(tap);
                None
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(prompt: u64, predicted: u64, best: u64) -> Prediction {
        let p = Prediction { request_id: "r".into(), model: "m".into(), pod: "p".into(), ..Default::default() };
        Prediction { prompt_tokens: prompt, predicted_tokens: predicted, best_tokens: best, ..p }
    }

    fn usage(prompt: u64, cached: u64) -> Usage {
        Usage { prompt_tokens: Some(prompt), completion_tokens: Some(1), cached_tokens: Some(cached) }
    }

    #[test]
    fn each_miss_has_its_cause() {
        // 160-token prompt: at most 144 reportable (the last token is recomputed).
        let a = classify(&pred(160, 0, 0), &usage(160, 0));
        assert_eq!((a.outcome, a.workload, a.routing, a.stale), (Outcome::NoPrefix, 144, 0, 0));
        // Cached elsewhere (128 tokens), not on the pick.
        let a = classify(&pred(160, 0, 128), &usage(160, 0));
        assert_eq!((a.outcome, a.workload, a.routing, a.stale), (Outcome::RoutedElsewhere, 16, 128, 0));
        // Predicted 160 (all 10 blocks) on the pick: capped at 144; the engine found 0.
        let a = classify(&pred(160, 160, 160), &usage(160, 0));
        assert_eq!((a.outcome, a.over, a.stale, a.workload), (Outcome::StaleIndex, 144, 144, 0));
        // A full hit, as vLLM reports it.
        let a = classify(&pred(160, 160, 160), &usage(160, 144));
        assert_eq!((a.outcome, a.over, a.under, a.workload + a.routing + a.stale), (Outcome::Hit, 0, 0, 0));
        // Found more than predicted: a hit, under-predicted.
        let a = classify(&pred(160, 32, 32), &usage(160, 96));
        assert_eq!((a.outcome, a.under, a.workload), (Outcome::Hit, 64, 48));
        // No cached-token count from the engine.
        let u = Usage { cached_tokens: None, ..usage(160, 0) };
        assert_eq!(classify(&pred(160, 32, 32), &u).outcome, Outcome::Unreported);
    }

    #[test]
    fn usage_is_asked_for_only_when_the_client_did_not() {
        let ask = |v: &mut Value| ask_for_usage(v, &Bytes::from(v.to_string())).is_some();
        let mut v = json!({"stream": true, "stream_options": {"continuous_usage_stats": true}});
        assert!(ask(&mut v));
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        let mut v = json!({"stream": true, "stream_options": {"include_usage": true}});
        assert!(!ask(&mut v));
        let mut v = json!({"stream": false});
        assert!(!ask(&mut v));
        assert_eq!(v, json!({"stream": false}));
    }

    #[test]
    fn the_usage_option_is_appended_without_reserializing() {
        let body = Bytes::from_static(b"{\"model\":\"m\",\"prompt\":\"a\\u00e9\",\"stream\":true} \n");
        let mut v: Value = serde_json::from_slice(&body).unwrap();
        let out = ask_for_usage(&mut v, &body).unwrap();
        assert!(out.starts_with(b"{\"model\":\"m\",\"prompt\":\"a\\u00e9\",\"stream\":true,"), "{out:?}");
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), v);
        // A client's own stream_options: serialized from the edited value.
        let body =
            Bytes::from_static(b"{\"model\":\"m\",\"stream\":true,\"stream_options\":{\"include_usage\":false}}");
        let mut v: Value = serde_json::from_slice(&body).unwrap();
        let out = ask_for_usage(&mut v, &body).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), v);
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
    }

    #[tokio::test]
    async fn the_injected_usage_chunk_is_removed_and_read() {
        let registry = Registry::new();
        let attr = Arc::new(Attribution::new(&registry, 4).unwrap());
        let chunks = [
            "data: {\"choices\":[{\"text\":\"a\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":160,\"completion_tokens\":1,",
            "\"prompt_tokens_details\":{\"cached_tokens\":144}}}\n\ndata: [DONE]\n\n",
        ];
        let body = futures_util::stream::iter(chunks.map(|c| Ok::<_, ()>(Bytes::from(c))));
        let tap = Tap::new(attr.clone(), pred(160, 144, 144), 200);
        let out: Vec<_> = tap_sse(body, tap, true).map(|r| r.unwrap()).collect().await;
        assert_eq!(out.concat(), b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: [DONE]\n\n".to_vec());
        let recent = attr.recent(10);
        assert_eq!(recent["decisions"][0]["cached_tokens"], 144);
        assert_eq!(recent["decisions"][0]["outcome"], "hit");
    }
}
