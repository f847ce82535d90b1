//! # kvroute-tokenize — prompt → token ids
//!
//! One tokenization code path for the router and the simulator, so that both compute the
//! same token ids (and so the same block keys) for the same request.
//!
//! [`HfTokenizer`] loads a model directory (`tokenizer.json`, `tokenizer_config.json`) and
//! renders chat templates byte-identical to transformers' jinja2 setup (checked against
//! `../shared/vectors/tokenizers/reference_renders.json`).
//!
//! [`BuiltinTokenizer`] is a documented, deterministic tokenizer for when no model files
//! are given:
//! * a token is a maximal run of Unicode alphanumerics or `_`, or any other single
//!   non-whitespace character; whitespace separates tokens and is not a token;
//! * its id is `1000 + FNV-1a-32(token's UTF-8 bytes) mod 150000`;
//! * chat messages are rendered in ChatML — `<|im_start|>{role}\n{content}<|im_end|>\n`
//!   per message, then `<|im_start|>assistant\n` when a generation prompt is asked for —
//!   and `<|im_start|>` / `<|im_end|>` are the special ids 1 and 2.

pub mod detok;
mod hf;
pub mod prefix;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use detok::IncrementalDetokenizer;
pub use hf::{py_json_dumps, HfTokenizer};

/// One chat message (OpenAI shape; `content` as plain text).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: String,
}

/// Why a tokenizer could not be loaded or a chat rendered.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("cannot load tokenizer: {0}")]
    Load(String),
    #[error("chat template: {0}")]
    Template(String),
}

/// Turns prompts and chats into token ids.
pub trait Tokenizer: Send + Sync {
    /// Token ids of `text` (`add_special_tokens`: BOS etc. as the tokenizer defines them;
    /// vLLM adds them to completion prompts, not to rendered chats).
    fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32>;
    /// Renders OpenAI-shaped `messages` (and optional `tools`) with the chat template.
    fn render_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError>;
    /// Renders, then encodes without adding special tokens (the template has them).
    fn encode_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        Ok(self.encode(&self.render_chat(messages, tools, add_generation_prompt)?, false))
    }
    /// Text of token ids (special tokens skipped).
    fn decode(&self, ids: &[u32]) -> String;
    /// The vocabulary entry of a token id (`Ġword` for byte-level BPE), as vLLM's
    /// `/tokenize` returns in `token_strs`.
    fn token_str(&self, id: u32) -> Option<String>;
    /// A token a simulated model generates, chosen by `n` (any u64: equal `n`, equal
    /// token). Generated tokens are whole words with their leading space, each of which
    /// the tokenizer encodes back to that one token, so any sequence of them decodes to
    /// text that re-tokenizes to the same ids.
    fn output_token(&self, n: u64) -> u32;
}

/// The tokenizer in `dir` (`tokenizer.json` + `tokenizer_config.json`), or the built-in one.
pub fn load(dir: Option<&Path>) -> Result<Box<dyn Tokenizer>, TokenizeError> {
    Ok(match dir {
        Some(d) => Box::new(HfTokenizer::from_dir(d)?),
        None => Box::new(BuiltinTokenizer),
    })
}

/// OpenAI `content` may be a list of parts; templates get the text parts joined.
pub fn normalize_messages(messages: &Value) -> Value {
    let Some(list) = messages.as_array() else { return messages.clone() };
    Value::Array(
        list.iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(Value::Array(parts)) = m.get("content") {
                    let text: String = parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
                    m["content"] = Value::String(text);
                }
                m
            })
            .collect(),
    )
}

/// The built-in deterministic tokenizer (see the crate docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct BuiltinTokenizer;

pub const IM_START: u32 = 1;
pub const IM_END: u32 = 2;
const SPECIAL: [(&str, u32); 2] = [("<|im_start|>", IM_START), ("<|im_end|>", IM_END)];
const WORDS: [&str; 16] = [
    "the", "cache", "router", "token", "block", "prefix", "engine", "model", "fast", "request", "server", "fleet",
    "latency", "hit", "key", "event",
];

fn fnv1a32(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| (h ^ x as u32).wrapping_mul(0x0100_0193))
}

fn token_id(t: &str) -> u32 {
    1000 + fnv1a32(t.as_bytes()) % 150_000
}

impl BuiltinTokenizer {
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        let mut start: Option<usize> = None;
        for (i, c) in text.char_indices() {
            let word = c.is_alphanumeric() || c == '_';
            if word {
                start.get_or_insert(i);
                continue;
            }
            if let Some(s) = start.take() {
                out.push(token_id(&text[s..i]));
            }
            if !c.is_whitespace() {
                out.push(token_id(&text[i..i + c.len_utf8()]));
            }
        }
        if let Some(s) = start {
            out.push(token_id(&text[s..]));
        }
    }
}

impl Tokenizer for BuiltinTokenizer {
    fn encode(&self, text: &str, _add_special_tokens: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        let mut rest = text;
        while !rest.is_empty() {
            let next = SPECIAL.iter().filter_map(|(s, id)| rest.find(s).map(|at| (at, *s, *id))).min();
            match next {
                Some((at, s, id)) => {
                    self.encode_plain(&rest[..at], &mut out);
                    out.push(id);
                    rest = &rest[at + s.len()..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    fn render_chat(
        &self,
        messages: &Value,
        _tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError> {
        let list = messages.as_array().ok_or_else(|| TokenizeError::Template("messages must be an array".into()))?;
        let mut s = String::new();
        for m in list {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let content = m.get("content").and_then(Value::as_str).unwrap_or("");
            s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
        if add_generation_prompt {
            s.push_str("<|im_start|>assistant\n");
        }
        Ok(s)
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut s = String::new();
        for &id in ids {
            let w = WORDS.iter().find(|w| token_id(w) == id).copied().unwrap_or("x");
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(w);
        }
        s
    }

    fn token_str(&self, id: u32) -> Option<String> {
        match id {
            IM_START => Some(SPECIAL[0].0.to_string()),
            IM_END => Some(SPECIAL[1].0.to_string()),
            _ => Some(self.decode(&[id])),
        }
    }

    fn output_token(&self, n: u64) -> u32 {
        token_id(WORDS[(mix64(n) % WORDS.len() as u64) as usize])
    }
}

/// SplitMix64's finalizer: spreads consecutive `n` over the whole range.
pub fn mix64(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_words_and_punctuation_deterministically() {
        let t = BuiltinTokenizer;
        let a = t.encode("Hello, world! hello_world 42", true);
        assert_eq!(a.len(), 6); // Hello , world ! hello_world 42
        assert_eq!(a, t.encode("Hello ,world!   hello_world\n42", true), "whitespace only separates");
        assert_ne!(a[0], t.encode("hello", true)[0], "case-sensitive");
        assert_eq!(t.encode("héllo wörld", true).len(), 2);
        assert!(a.iter().all(|&x| (1000..151_000).contains(&x)));
    }

    #[test]
    fn chat_uses_chatml_and_generated_words_round_trip() {
        let t = BuiltinTokenizer;
        let m = serde_json::json!([{"role": "user", "content": "hi there"}]);
        let ids = t.encode_chat(&m, None, true).unwrap();
        assert_eq!(ids[0], IM_START);
        assert_eq!(ids[4], IM_END);
        assert_eq!(ids.len(), 7);
        let out: Vec<u32> = (0..8).map(|n| t.output_token(n)).collect();
        let text = t.decode(&out);
        assert_eq!(text.split(' ').count(), 8, "{text}");
        assert_eq!(t.encode(&text, true), out, "generated words re-tokenize to themselves");
        assert_eq!(t.output_token(3), out[3], "deterministic");
    }
}
