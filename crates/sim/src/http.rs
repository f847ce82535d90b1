//! The OpenAI-compatible HTTP surface of the simulator.
// Handlers return `Result<_, Response>` to bail out with an HTTP error; the large Err is
// the point, and the happy path does not copy it.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use kvroute_keys::{LoraRef, RequestExtras};
use kvroute_tokenize::{normalize_messages, IncrementalDetokenizer, Tokenizer};
use parking_lot::Mutex;
use prometheus::{Encoder, TextEncoder};
use rand::Rng;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use crate::engine::{Engine, EngineError, Job};

pub struct Sim {
    pub engine: Engine,
    pub model: String,
    /// LoRA adapters: (name, path, int id).
    pub loras: Vec<(String, String, i64)>,
    pub pod: String,
    pub max_model_len: usize,
    pub default_max_tokens: usize,
    pub failure_rate: f64,
    /// Test knob (`--stall-after-tokens`): streams send this many tokens, then nothing more
    /// (the connection stays open until the client leaves).
    pub stall_after_tokens: Option<usize>,
    pub ready_at: Instant,
    pub tokenizer: Box<dyn Tokenizer>,
    /// Generated text and failure injection (seeded by `--seed`, else per process).
    pub rng: Mutex<rand::rngs::StdRng>,
    /// Response ids (never seeded: unique across pods and restarts).
    pub ids: Mutex<rand::rngs::StdRng>,
    /// `/version`.
    pub version: String,
    pub created: u64,
    /// P/D: the NixlConnector stand-in (`crate::nixl`).
    pub nixl: crate::nixl::Nixl,
}

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/tokenize", post(crate::admin::tokenize))
        .route("/detokenize", post(crate::admin::detokenize))
        .route("/version", get(crate::admin::version))
        .route("/reset_prefix_cache", post(crate::admin::reset_prefix_cache))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/nixl/read", post(crate::nixl::read))
        .route("/nixl/engine", get(crate::nixl::engine))
        .with_state(sim)
}

pub(crate) fn error(status: StatusCode, msg: impl Into<String>, kind: &str) -> Response {
    let body = json!({"error": {"message": msg.into(), "type": kind, "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

fn with_pod(sim: &Sim, mut r: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(&sim.pod) {
        r.headers_mut().insert("x-inference-pod", v);
    }
    r
}

fn not_ready(sim: &Sim) -> Option<Response> {
    (Instant::now() < sim.ready_at)
        .then(|| error(StatusCode::SERVICE_UNAVAILABLE, "server is starting", "ServiceUnavailable"))
}

async fn health(State(sim): State<Arc<Sim>>) -> Response {
    not_ready(&sim).unwrap_or_else(|| StatusCode::OK.into_response())
}

async fn metrics(State(sim): State<Arc<Sim>>) -> Response {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&sim.engine.metrics.registry.gather(), &mut buf);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response()
}

/// vLLM's `ModelCard`, with its one default `ModelPermission`.
fn model_card(sim: &Sim, id: &str, root: &str, parent: Option<&str>) -> Value {
    let created = now_secs();
    let perm = format!("modelperm-{}", uuid_hex(&mut sim.ids.lock()));
    json!({"id": id, "object": "model", "created": created, "owned_by": "vllm", "root": root, "parent": parent,
        "max_model_len": sim.max_model_len,
        "permission": [{"id": perm, "object": "model_permission", "created": created,
            "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
            "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
            "organization": "*", "group": null, "is_blocking": false}]})
}

/// 128 random bits as vLLM's `random_uuid()` writes them (`uuid4().hex`).
pub fn uuid_hex(rng: &mut rand::rngs::StdRng) -> String {
    let mut b: u128 = rng.random();
    b = (b & !(0xf << 76)) | (0x4 << 76); // version 4
    b = (b & !(0x3 << 62)) | (0x2 << 62); // RFC 4122 variant
    format!("{b:032x}")
}

async fn models(State(sim): State<Arc<Sim>>) -> Response {
    let mut data = vec![model_card(&sim, &sim.model, &sim.model, None)];
    for (name, path, _) in &sim.loras {
        data.push(model_card(&sim, name, path, Some(&sim.model)));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

pub(crate) fn parse(body: &Bytes) -> Result<Value, Response> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}"), "BadRequestError"))?;
    if !v.is_object() {
        return Err(error(StatusCode::BAD_REQUEST, "the body must be a JSON object", "BadRequestError"));
    }
    Ok(v)
}

/// Renders and encodes a chat request's `messages` (and `tools`) with the model's template.
pub(crate) fn chat_tokens(sim: &Sim, v: &Value, add_generation_prompt: bool) -> Result<Vec<u32>, Response> {
    let Some(messages) = v.get("messages").filter(|m| m.is_array()) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "`messages` must be an array of {role, content}",
            "BadRequestError",
        ));
    };
    sim.tokenizer
        .encode_chat(&normalize_messages(messages), v.get("tools").filter(|t| !t.is_null()), add_generation_prompt)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string(), "BadRequestError"))
}

pub(crate) fn prompt_tokens(sim: &Sim, v: &Value) -> Result<Vec<u32>, Response> {
    let bad =
        || error(StatusCode::BAD_REQUEST, "`prompt` must be a string or an array of token ids", "BadRequestError");
    match v.get("prompt") {
        Some(Value::String(s)) => Ok(sim.tokenizer.encode(s, true)),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(sim.tokenizer.encode(a[0].as_str().unwrap_or(""), true))
        }
        Some(Value::Array(a)) => {
            a.iter().map(|t| t.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(bad)).collect()
        }
        _ => Err(bad()),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(sim, Kind::Completion, headers, body).await
}

async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(sim, Kind::Chat, headers, body).await
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn generate(sim: Arc<Sim>, kind: Kind, headers: HeaderMap, body: Bytes) -> Response {
    let r = generate_inner(sim.clone(), kind, headers, body).await;
    with_pod(&sim, r)
}

async fn generate_inner(sim: Arc<Sim>, kind: Kind, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = not_ready(&sim) {
        return r;
    }
    if let Some(code) =
        headers.get("x-return-error").and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<u16>().ok())
    {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, format!("error forced by X-Return-Error: {code}"), "InjectedError");
    }
    if sim.failure_rate > 0.0 && sim.rng.lock().random_range(0.0..100.0) < sim.failure_rate {
        return error(StatusCode::SERVICE_UNAVAILABLE, "injected failure (--failure-rate)", "InjectedError");
    }
    let v = match parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(model) = v.get("model").and_then(Value::as_str).map(str::to_string) else {
        return error(StatusCode::BAD_REQUEST, "missing `model`", "BadRequestError");
    };
    let lora = sim.loras.iter().find(|l| l.0 == model).cloned();
    if model != sim.model && lora.is_none() {
        return error(StatusCode::NOT_FOUND, format!("The model `{model}` does not exist."), "NotFoundError");
    }
    // A completion may carry a batch of prompts: each is a request of its own, and the
    // answer has one choice per prompt (`index` = its position), as vLLM answers.
    let prompts = match kind {
        Kind::Completion => batch_tokens(&sim, &v).unwrap_or_else(|| prompt_tokens(&sim, &v).map(|t| vec![t])),
        Kind::Chat => chat_tokens(&sim, &v, true).map(|t| vec![t]),
    };
    let prompts = match prompts {
        Ok(p) => p,
        Err(r) => return r,
    };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_tokens = match crate::validate::sampling(&v, longest, sim.max_model_len, sim.default_max_tokens) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // vLLM: usage in every chunk only together with the final usage chunk.
    let include_usage = v.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let continuous_usage =
        include_usage && v.pointer("/stream_options/continuous_usage_stats").and_then(Value::as_bool).unwrap_or(false);
    // A request's own seed fixes its text (on any pod); else the server's generator.
    let seed = match v.get("seed") {
        None | Some(Value::Null) => None,
        Some(s) => match s.as_i64().map(|x| x as u64).or_else(|| s.as_u64()) {
            Some(x) => Some(x),
            None => return error(StatusCode::BAD_REQUEST, "`seed` must be an integer", "BadRequestError"),
        },
    };
    let kvp = v.get("kv_transfer_params").cloned().unwrap_or(Value::Null);
    let remote_decode = kvp.get("do_remote_decode").and_then(Value::as_bool).unwrap_or(false);
    let remote_prefill = kvp.get("do_remote_prefill").and_then(Value::as_bool).unwrap_or(false);
    if remote_decode && stream {
        return error(
            StatusCode::BAD_REQUEST,
            "streaming is not supported with do_remote_decode (prefill side)",
            "BadRequestError",
        );
    }
    // The prefill side of P/D computes the prompt and one token.
    let max_tokens = if remote_decode { 1 } else { max_tokens };
    let extras = RequestExtras {
        lora: lora.as_ref().map(|l| LoraRef { name: l.0.clone(), path: l.1.clone(), int_id: l.2 }),
        cache_salt: v.get("cache_salt").and_then(Value::as_str).map(str::to_string),
        mm: Vec::new(),
    };
    // Refuse at once when the queue is full (before a stream starts). The request queues
    // for real inside `run`, which owns what it borrows.
    if let Err(e) = sim.engine.check_admission() {
        return error(StatusCode::TOO_MANY_REQUESTS, e.to_string(), "RateLimitError");
    }
    // vLLM's ids: `cmpl-`/`chatcmpl-` and the X-Request-Id header, else a random uuid.
    let base = match headers.get("x-request-id").and_then(|h| h.to_str().ok()).filter(|h| !h.is_empty()) {
        Some(h) => h.to_string(),
        None => uuid_hex(&mut sim.ids.lock()),
    };
    let id = format!("{}-{base}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
    let (member, created) = (prompts.len() > 1, now_secs());
    let ctxs: Vec<Ctx> = prompts
        .into_iter()
        .enumerate()
        .map(|(index, tokens)| Ctx {
            sim: sim.clone(),
            kind,
            id: id.clone(),
            model: model.clone(),
            include_usage,
            continuous_usage,
            seed,
            remote_decode,
            pull: remote_prefill.then(|| kvp.clone()),
            job: Job {
                tokens,
                max_tokens,
                extras: extras.clone(),
                lora_id: lora.as_ref().map(|l| l.2),
                remote_prefill: false,
            },
            created,
            index,
            member,
        })
        .collect();
    if stream {
        let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
        if member {
            tokio::spawn(batch_stream(ctxs, tx, include_usage, id, model, created));
        } else {
            tokio::spawn(async move {
                for ctx in ctxs {
                    let _ = ctx.run(Some(tx.clone())).await;
                }
            });
        }
        let events = ReceiverStream::new(rx).map(|s| Ok::<Event, Infallible>(Event::default().data(s)));
        return Sse::new(events).into_response();
    }
    let bodies = futures_util::future::join_all(ctxs.into_iter().map(|c| c.run(None))).await;
    let mut merged: Option<Value> = None;
    for b in bodies {
        let b = match b {
            Ok(b) => b,
            Err(r) => return r,
        };
        match &mut merged {
            None => merged = Some(b),
            Some(m) => {
                if let (Some(all), Some(more)) = (m["choices"].as_array_mut(), b["choices"].as_array()) {
                    all.extend(more.iter().cloned());
                }
                m["usage"] = add_usage(&m["usage"], &b["usage"]);
            }
        }
    }
    Json(merged.unwrap_or(Value::Null)).into_response()
}

/// A batch of completion prompts (several strings, or token-id arrays); `None` for a
/// single prompt.
fn batch_tokens(sim: &Sim, v: &Value) -> Option<Result<Vec<Vec<u32>>, Response>> {
    let a = v.get("prompt")?.as_array()?;
    let batch = (a.len() > 1 && a.iter().all(Value::is_string)) || (!a.is_empty() && a.iter().all(Value::is_array));
    if !batch {
        return None;
    }
    Some(a.iter().map(|p| prompt_tokens(sim, &json!({"prompt": p}))).collect())
}

/// Usage of two choices together.
fn add_usage(a: &Value, b: &Value) -> Value {
    let n = |v: &Value, k: &str| v.pointer(k).and_then(Value::as_u64).unwrap_or(0);
    let sum = |k: &str| n(a, k) + n(b, k);
    json!({"prompt_tokens": sum("/prompt_tokens"), "completion_tokens": sum("/completion_tokens"),
           "total_tokens": sum("/total_tokens"),
           "prompt_tokens_details": {"cached_tokens": sum("/prompt_tokens_details/cached_tokens")}})
}

/// A streamed batch: every prompt's chunks as they come (each with its choice `index`),
/// then one usage chunk (with `include_usage`) and `[DONE]`.
async fn batch_stream(
    ctxs: Vec<Ctx>,
    tx: tokio::sync::mpsc::Sender<String>,
    include_usage: bool,
    id: String,
    model: String,
    created: u64,
) {
    let runs = futures_util::future::join_all(ctxs.into_iter().map(|c| c.run(Some(tx.clone())))).await;
    let mut usage = json!({});
    for u in runs.into_iter().flatten() {
        usage = add_usage(&usage, &u);
    }
    if include_usage {
        let u = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": usage});
        let _ = tx.send(u.to_string()).await;
    }
    let _ = tx.send("[DONE]".into()).await;
}

/// Counts a LoRA request as waiting while it queues and as running until it ends.
struct LoraGuard<'a> {
    engine: &'a Engine,
    adapter: String,
    running: bool,
}

impl<'a> LoraGuard<'a> {
    fn new(engine: &'a Engine, adapter: &str) -> Self {
        engine.lora_activity(adapter, 1, 0);
        Self { engine, adapter: adapter.to_string(), running: false }
    }

    fn running(&mut self) {
        self.engine.lora_activity(&self.adapter, -1, 1);
        self.running = true;
    }
}

impl Drop for LoraGuard<'_> {
    fn drop(&mut self) {
        if self.running {
            self.engine.lora_activity(&self.adapter, 0, -1);
        } else {
            self.engine.lora_activity(&self.adapter, -1, 0);
        }
    }
}

struct Ctx {
    sim: Arc<Sim>,
    kind: Kind,
    id: String,
    model: String,
    include_usage: bool,
    continuous_usage: bool,
    seed: Option<u64>,
    remote_decode: bool,
    /// `do_remote_prefill`: the `kv_transfer_params` to read the prompt's KV with.
    pull: Option<Value>,
    job: Job,
    created: u64,
    /// The choice's `index` (its prompt's position in a batch).
    index: usize,
    /// Part of a batch: the stream's usage chunk and `[DONE]` come once, after every prompt.
    member: bool,
}

impl Ctx {
    fn usage(&self, generated: usize, cached: usize) -> Value {
        let p = self.job.tokens.len();
        json!({"prompt_tokens": p, "completion_tokens": generated, "total_tokens": p + generated,
               "prompt_tokens_details": {"cached_tokens": cached}})
    }

    /// One SSE chunk: `text` (the delta; for chat with `role` on the first chunk), the
    /// finish reason on the last one, usage so far with `continuous_usage_stats`.
    fn chunk(&self, text: &str, role: bool, finish: Option<&str>, usage: Option<Value>) -> Value {
        let mut c = match self.kind {
            Kind::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": self.index, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null}]})
            }
            Kind::Chat => {
                let mut delta = json!({"content": text});
                if role {
                    delta["role"] = json!("assistant");
                }
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": self.index, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            }
        };
        if let Some(u) = usage {
            c["usage"] = u;
        }
        c
    }

    /// Runs the request; streams chunks to `tx` if given and returns the usage, else
    /// returns the response body.
    async fn run(mut self, tx: Option<tokio::sync::mpsc::Sender<String>>) -> Result<Value, Response> {
        let sim = self.sim.clone();
        let engine = &sim.engine;
        // The decoder confirms the read with the prefiller (real time, not counted as
        // queueing), or recomputes the prompt.
        if let Some(kvp) = self.pull.take() {
            self.job.remote_prefill = sim.nixl.pull(&kvp).await;
        }
        let ticket =
            engine.enqueue().map_err(|e| error(StatusCode::TOO_MANY_REQUESTS, e.to_string(), "RateLimitError"))?;
        let adapter = self.job.extras.lora.as_ref().map(|l| l.name.clone());
        let mut lora = adapter.as_deref().map(|a| LoraGuard::new(engine, a));
        let started = engine.start(ticket, &self.job).await;
        if let (Some(g), Ok(_)) = (lora.as_mut(), &started) {
            g.running();
        }
        let running = match started {
            Ok(r) => r,
            Err(e @ EngineError::TooLarge { .. }) => {
                return Err(error(StatusCode::BAD_REQUEST, e.to_string(), "BadRequestError"))
            }
            Err(e) => return Err(error(StatusCode::TOO_MANY_REQUESTS, e.to_string(), "RateLimitError")),
        };
        let cached = running.timing.cached_tokens;
        if running.timing.transferred_tokens > 0 {
            sim.nixl.transferred(&sim, running.timing.transferred_tokens);
        }
        // vLLM's request id for a completion's prompt `i` is `cmpl-…-i`.
        let transfer_id =
            if self.kind == Kind::Completion { format!("{}-{}", self.id, self.index) } else { self.id.clone() };
        let mut kv_params = None;
        let seed = match self.seed {
            Some(s) => kvroute_tokenize::mix64(s),
            None => self.sim.rng.lock().random(),
        };
        let tok = self.sim.tokenizer.as_ref();
        // Text comes out as vLLM streams it: each token's delta decoded in context.
        let mut detok = IncrementalDetokenizer::new(tok, &self.job.tokens);
        let finish = "length";
        let n = self.job.max_tokens;
        let mut running = Some(running);
        if n == 0 {
            if let Some(r) = running.take() {
                engine.finish(r, 0, finish);
            }
        }
        let mut role = self.kind == Kind::Chat;
        for k in 0..n {
            if let (Some(tx), Some(stall)) = (&tx, self.sim.stall_after_tokens) {
                if k == stall {
                    tx.closed().await;
                    if let Some(r) = running.take() {
                        engine.finish(r, k, "abort");
                    }
                    return Ok(Value::Null);
                }
            }
            if let Some(r) = &running {
                tokio::time::sleep_until(engine.token_due(r, k).into()).await;
            }
            let delta = detok.push(tok, tok.output_token(seed.wrapping_add(k as u64)));
            let generated = k + 1;
            let last = generated == n;
            if last {
                // Done: the blocks are free before the client sees the end — except a
                // prefill's prompt blocks, pinned for the decoder's read.
                if let Some(r) = running.take() {
                    if self.remote_decode {
                        kv_params = Some(crate::nixl::Nixl::pin(&sim, &r, &transfer_id, self.job.tokens.len()));
                    }
                    engine.finish(r, generated, finish);
                }
            }
            let Some(tx) = &tx else { continue };
            let usage = |g| self.continuous_usage.then(|| self.usage(g, cached));
            let mut sent = true;
            if std::mem::take(&mut role) {
                // vLLM's first chat chunk: the role and empty content.
                sent &= tx.send(self.chunk("", true, None, usage(0)).to_string()).await.is_ok();
            }
            if !delta.is_empty() || last {
                let c = self.chunk(&delta, false, last.then_some(finish), usage(generated));
                sent &= tx.send(c.to_string()).await.is_ok();
            }
            if !sent {
                if let Some(r) = running.take() {
                    engine.finish(r, generated, "abort");
                }
                return Ok(Value::Null);
            }
        }
        let generated = n;
        if let Some(tx) = &tx {
            if n == 0 {
                let _ = tx.send(self.chunk("", role, Some(finish), None).to_string()).await;
            }
            if self.member {
                return Ok(self.usage(generated, cached));
            }
            if self.include_usage {
                let mut u = self.chunk("", false, None, None);
                u["choices"] = json!([]);
                u["usage"] = self.usage(generated, cached);
                let _ = tx.send(u.to_string()).await;
            }
            let _ = tx.send("[DONE]".into()).await;
            return Ok(self.usage(generated, cached));
        }
        let text = detok.text().to_string();
        let mut body = match self.kind {
            Kind::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": self.index, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null}]})
            }
            Kind::Chat => {
                json!({"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": self.index, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish, "stop_reason": null}]})
            }
        };
        body["usage"] = self.usage(generated, cached);
        if let Some(p) = kv_params {
            body["kv_transfer_params"] = p;
        }
        Ok(body)
    }
}

pub fn created_now() -> u64 {
    now_secs()
}
