//! Sampling parameters checked as vLLM checks them: 400 with vLLM's body
//! (`{"error": {"message", "type": "BadRequestError", "param", "code": 400}}`) and its
//! messages — `SamplingParams._verify_args` for values out of range (`max_tokens must be at
//! least 1, got 0.`), the context-length check for a `max_tokens` that does not fit, and
//! pydantic's wording for a value of the wrong type (a string that is not a number, a
//! fractional `max_tokens`). Like pydantic in lax mode, a numeric string (`"16"`) and a
//! whole float (`16.0`) are accepted as integers.

// Validators return the 400 response itself as their error.
#![allow(clippy::result_large_err)]

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// A 400 naming the parameter, vLLM's `VLLMValidationError` shape: the message ends with
/// `(parameter=NAME, value=VALUE)`.
fn invalid(param: &str, msg: String, value: &str) -> Response {
    let message = format!("{msg} (parameter={param}, value={value})");
    let body = json!({"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// Pydantic's error for a field of the wrong type.
fn wrong_type(param: &str, kind: &str, msg: &str, input: &Value) -> Response {
    let message = format!("[{{'type': '{kind}', 'loc': ('body', '{param}'), 'msg': '{msg}', 'input': {input}}}]");
    let body = json!({"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// Python's `repr` of a float (`-1.0`, `0.5`).
fn py_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// An integer field as pydantic (lax) reads it; `None` when absent or null.
fn int_field(v: &Value, name: &str) -> Result<Option<i64>, Response> {
    let x = match v.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(x) => x,
    };
    match x {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                return Ok(Some(i));
            }
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 9.2e18 {
                Ok(Some(f as i64))
            } else if f.is_finite() && f.abs() < 9.2e18 {
                Err(wrong_type(
                    name,
                    "int_from_float",
                    "Input should be a valid integer, got a number with a fractional part",
                    x,
                ))
            } else {
                Err(wrong_type(name, "int_parsing", "Input should be a valid integer", x))
            }
        }
        Value::String(s) => s.trim().parse::<i64>().map(Some).map_err(|_| {
            wrong_type(name, "int_parsing", "Input should be a valid integer, unable to parse string as an integer", x)
        }),
        Value::Bool(b) => Ok(Some(*b as i64)),
        _ => Err(wrong_type(name, "int_type", "Input should be a valid integer", x)),
    }
}

/// A float field as pydantic (lax) reads it; `None` when absent or null.
fn float_field(v: &Value, name: &str) -> Result<Option<f64>, Response> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(x @ Value::String(s)) => s.trim().parse::<f64>().map(Some).map_err(|_| {
            wrong_type(name, "float_parsing", "Input should be a valid number, unable to parse string as a number", x)
        }),
        Some(x) => Err(wrong_type(name, "float_type", "Input should be a valid number", x)),
    }
}

/// Checks the sampling parameters of a request whose prompt has `prompt_len` tokens;
/// returns the output tokens to generate (`default` when the request sets none).
pub fn sampling(v: &Value, prompt_len: usize, max_model_len: usize, default: usize) -> Result<usize, Response> {
    let name = if v.get("max_completion_tokens").is_some_and(|x| !x.is_null()) {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = int_field(v, name)?;
    if let Some(n) = max_tokens.filter(|&n| n < 1) {
        return Err(invalid("max_tokens", format!("max_tokens must be at least 1, got {n}."), &n.to_string()));
    }
    if let Some(t) = float_field(v, "temperature")?.filter(|&t| t < 0.0) {
        let t = py_float(t);
        return Err(invalid("temperature", format!("temperature must be non-negative, got {t}."), &t));
    }
    if let Some(p) = float_field(v, "top_p")?.filter(|&p| !(p > 0.0 && p <= 1.0)) {
        let p = py_float(p);
        return Err(invalid("top_p", format!("top_p must be in (0, 1], got {p}."), &p));
    }
    if let Some(n) = int_field(v, "n")?.filter(|&n| n < 1) {
        return Err(invalid("n", format!("n must be at least 1, got {n}."), &n.to_string()));
    }
    if prompt_len >= max_model_len {
        return Err(invalid(
            "input_tokens",
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your request has \
                 {prompt_len} input tokens. Please reduce the length of the input messages."
            ),
            &prompt_len.to_string(),
        ));
    }
    // Unset: the default, within what the context leaves.
    let n = max_tokens.map_or(default.min(max_model_len - prompt_len) as u64, |n| n as u64);
    if prompt_len as u64 + n > max_model_len as u64 {
        return Err(invalid(
            "max_tokens",
            format!(
                "'max_tokens' or 'max_completion_tokens' is too large: {n}. This model's maximum context length \
                 is {max_model_len} tokens and your request has {prompt_len} input tokens ({n} > {max_model_len} \
                 - {prompt_len})."
            ),
            &n.to_string(),
        ));
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(r: Result<usize, Response>) -> (u16, Value) {
        let r = r.expect_err("expected a 400");
        let status = r.status().as_u16();
        let body = futures_util::FutureExt::now_or_never(axum::body::to_bytes(r.into_body(), 1 << 20))
            .and_then(Result::ok)
            .map(|b| serde_json::from_slice(&b).unwrap_or_default())
            .unwrap_or_default();
        (status, body)
    }

    #[test]
    fn vllms_messages() {
        let (s, b) = msg(sampling(&json!({"max_tokens": -3}), 5, 100, 16));
        assert_eq!(s, 400);
        assert_eq!(b["error"]["message"], "max_tokens must be at least 1, got -3. (parameter=max_tokens, value=-3)");
        assert_eq!(b["error"]["param"], "max_tokens");
        assert_eq!(b["error"]["type"], "BadRequestError");
        let (_, b) = msg(sampling(&json!({"temperature": -1}), 5, 100, 16));
        assert_eq!(
            b["error"]["message"],
            "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"
        );
        let (_, b) = msg(sampling(&json!({"top_p": 1.5}), 5, 100, 16));
        assert_eq!(b["error"]["message"], "top_p must be in (0, 1], got 1.5. (parameter=top_p, value=1.5)");
        let (_, b) = msg(sampling(&json!({"max_tokens": 96}), 5, 100, 16));
        assert!(b["error"]["message"].as_str().unwrap().contains("(96 > 100 - 5)"), "{b}");
        assert_eq!(sampling(&json!({"max_tokens": "7"}), 5, 100, 16).ok(), Some(7));
        assert_eq!(sampling(&json!({"max_tokens": 7.0}), 5, 100, 16).ok(), Some(7));
        assert_eq!(sampling(&json!({}), 5, 100, 16).ok(), Some(16));
        assert_eq!(sampling(&json!({"max_completion_tokens": 3, "max_tokens": 9}), 5, 100, 16).ok(), Some(3));
    }
}
