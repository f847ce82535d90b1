//! vLLM's non-generating endpoints: `/tokenize`, `/detokenize`, `/version` and
//! `/reset_prefix_cache` (which vLLM serves with `VLLM_SERVER_DEV_MODE=1`; benchmark
//! tools such as aiperf call it between runs).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::http::{chat_tokens, error, parse, prompt_tokens, Sim};

/// The request's `model`, when it names one this server does not serve: 404 as vLLM.
fn unknown_model(sim: &Sim, v: &Value) -> Option<Response> {
    let m = v.get("model").and_then(Value::as_str)?;
    (m != sim.model && !sim.loras.iter().any(|l| l.0 == m))
        .then(|| error(StatusCode::NOT_FOUND, format!("The model `{m}` does not exist."), "NotFoundError"))
}

/// `POST /tokenize`: `{prompt}` or `{messages}` → `{count, max_model_len, tokens,
/// token_strs}` (`token_strs` only with `return_token_strs`, else null, as vLLM).
/// `add_special_tokens` defaults to true for prompts and false for chats (the template
/// has them); `add_generation_prompt` to true.
pub async fn tokenize(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(r) = unknown_model(&sim, &v) {
        return r;
    }
    let flag = |k: &str| v.get(k).and_then(Value::as_bool);
    let tokens = if v.get("messages").is_some() {
        let generation = flag("add_generation_prompt").unwrap_or(true);
        match chat_tokens(&sim, &v, generation) {
            // The template already has the special tokens; more only when asked.
            Ok(t) if flag("add_special_tokens") == Some(true) => {
                let ids = sim.tokenizer.encode("", true);
                let mut out = ids;
                out.extend(t);
                out
            }
            Ok(t) => t,
            Err(r) => return r,
        }
    } else if flag("add_special_tokens") == Some(false) {
        match v.get("prompt") {
            Some(Value::String(s)) => sim.tokenizer.encode(s, false),
            _ => match prompt_tokens(&sim, &v) {
                Ok(t) => t,
                Err(r) => return r,
            },
        }
    } else {
        match prompt_tokens(&sim, &v) {
            Ok(t) => t,
            Err(r) => return r,
        }
    };
    let strs = flag("return_token_strs")
        .unwrap_or(false)
        .then(|| tokens.iter().map(|&t| sim.tokenizer.token_str(t).unwrap_or_default()).collect::<Vec<_>>());
    Json(json!({"count": tokens.len(), "max_model_len": sim.max_model_len, "tokens": tokens, "token_strs": strs}))
        .into_response()
}

/// `POST /detokenize`: `{tokens: [ids]}` → `{prompt: text}`; 400 for an id outside the
/// vocabulary.
pub async fn detokenize(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(r) = unknown_model(&sim, &v) {
        return r;
    }
    let bad = || error(StatusCode::BAD_REQUEST, "`tokens` must be an array of token ids", "BadRequestError");
    let Some(list) = v.get("tokens").and_then(Value::as_array) else { return bad() };
    let mut ids = Vec::with_capacity(list.len());
    for t in list {
        let Some(id) = t.as_u64().and_then(|x| u32::try_from(x).ok()) else { return bad() };
        if sim.tokenizer.token_str(id).is_none() {
            return error(StatusCode::BAD_REQUEST, format!("token id {id} is out of vocabulary"), "BadRequestError");
        }
        ids.push(id);
    }
    Json(json!({"prompt": sim.tokenizer.decode(&ids)})).into_response()
}

/// `GET /version`: `{"version": …}`, the vLLM release imitated (`--vllm-version`).
pub async fn version(State(sim): State<Arc<Sim>>) -> Response {
    Json(json!({"version": sim.version})).into_response()
}

#[derive(serde::Deserialize)]
pub struct ResetQuery {
    #[serde(default)]
    reset_running_requests: bool,
}

/// `POST /reset_prefix_cache`: forgets every cached block and publishes
/// `AllBlocksCleared`, answering 200 with an empty body as vLLM does. vLLM refuses (and
/// only logs) while running requests hold blocks; the simulator says so with a 409, and
/// with `?reset_running_requests=true` waits for them to finish (up to 30 s) instead.
pub async fn reset_prefix_cache(State(sim): State<Arc<Sim>>, Query(q): Query<ResetQuery>) -> Response {
    let wait = q.reset_running_requests;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match sim.engine.reset_prefix_cache() {
            Ok(()) => {
                tracing::info!("prefix cache reset");
                return StatusCode::OK.into_response();
            }
            Err(used) if wait && std::time::Instant::now() < deadline => {
                tracing::debug!(used, "reset_prefix_cache waits for running requests");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(used) => {
                return error(
                    StatusCode::CONFLICT,
                    format!(
                        "Failed to reset prefix cache because some blocks ({used}) are not freed yet \
                         (requests are running; ?reset_running_requests=true waits for them)"
                    ),
                    "ConflictError",
                )
            }
        }
    }
}
