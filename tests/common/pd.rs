//! Helpers of the P/D black-box tests (`tests/pd.rs`, `tests/pd_envoy.rs`): the router's
//! `backends:` with llm-d role labels, OpenAI request bodies and SSE parsing.

use serde_json::{json, Value};

/// A `backends:` YAML block: these ports labelled `llm-d.ai/role: prefill`, then these
/// labelled `decode`.
pub fn role_backends(prefill: &[u16], decode: &[u16]) -> String {
    let role = |p: &u16, r: &str| format!("  - {{url: 'http://127.0.0.1:{p}', labels: {{llm-d.ai/role: {r}}}}}\n");
    let mut s = String::from("backends:\n");
    s.extend(prefill.iter().map(|p| role(p, "prefill")));
    s.extend(decode.iter().map(|p| role(p, "decode")));
    s
}

/// A chat or completions body for model `m`, 5 tokens, streamed with usage if `stream`.
pub fn body(chat: bool, prompt: &str, stream: bool) -> Value {
    let mut b = if chat {
        json!({"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 5})
    } else {
        json!({"model": "m", "prompt": prompt, "max_tokens": 5})
    };
    if stream {
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// The events of an SSE body (`data: ` removed); the last must be `[DONE]`.
pub fn sse_events(text: &str) -> Vec<Value> {
    let data: Vec<&str> = text.split("\n\n").filter_map(|e| e.trim().strip_prefix("data:")).map(str::trim).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "stream did not end with [DONE]: {text}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

/// The generated text of streamed chat or completions events.
pub fn sse_content(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| {
            let c = &e["choices"][0];
            c["delta"]["content"].as_str().or(c["text"].as_str()).map(str::to_string)
        })
        .collect()
}
