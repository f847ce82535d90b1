//! OpenAI-style errors: the JSON body both doors answer with, the status → `type` names,
//! and the parsing of request bodies.

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::StatusCode;

/// An OpenAI-style error body (`{"error": {"message", "type", "code"}}`), with
/// `Retry-After` on 429 and 503.
pub(crate) fn error(status: StatusCode, msg: &str) -> Response {
    let body = json!({"error": {"message": msg, "type": error_type(status), "code": status.as_u16()}});
    let mut r = (status, Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
    }
    r
}

/// The `type` of an error body, in the style of vLLM's (and the OpenAI client's) names.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        413 => "RequestTooLargeError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        s if s >= 500 => "InternalServerError",
        _ => "BadRequestError",
    }
}

/// vLLM's answer for a model no pod serves.
pub fn model_not_found(model: &str) -> RouteError {
    RouteError::new(StatusCode::NOT_FOUND, format!("The model `{model}` does not exist."))
}

/// Why a request cannot be routed: the HTTP status and a message for the client (both
/// doors — this gateway and the ext_proc server — answer with them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteError {
    pub status: StatusCode,
    pub message: String,
}

impl RouteError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl IntoResponse for RouteError {
    fn into_response(self) -> Response {
        error(self.status, &self.message)
    }
}

pub(crate) fn bad(msg: &str) -> RouteError {
    RouteError::new(StatusCode::BAD_REQUEST, msg)
}

/// Rejections axum answers in plain text (413 body too large, 415, 400 from an
/// extractor) become OpenAI-style JSON errors (a pod's own answers pass as they are).
pub(crate) async fn json_rejections(r: Response) -> Response {
    let json = r.headers().get("content-type").is_some_and(|c| c.as_bytes().starts_with(b"application/json"));
    if json || !r.status().is_client_error() || r.headers().contains_key("x-kvroute-pod") {
        return r;
    }
    let status = r.status();
    let text = match axum::body::to_bytes(r.into_body(), 64 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let msg = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!("request body too large (limit {} bytes)", 32 << 20),
        _ if !text.is_empty() => text,
        _ => status.canonical_reason().unwrap_or("bad request").to_string(),
    };
    error(status, &msg)
}

/// Parses an OpenAI request body: the JSON and its `model` (400 on either missing).
pub fn parse_request(body: &[u8]) -> Result<(Value, String), RouteError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(&format!("invalid JSON body: {e}")))?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("missing `model`"))?
        .to_string();
    Ok((v, model))
}
