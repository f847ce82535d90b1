//! # kvroute-tokenize — prompt → token ids
//!
//! One tokenization code path for the router and the simulator, so that both compute the
//! same token ids (and so the same block keys) for the same request.
//!
//! [`BuiltinTokenizer`] is a documented, deterministic tokenizer for when no model files
//! are given:
//! * a token is a maximal run of Unicode alphanumerics or `_`, or any other single
//!   non-whitespace character; whitespace separates tokens and is not a token;
//! * its id is `1000 + FNV-1a-32(token's UTF-8 bytes) mod 150000`;
//! * chat messages are rendered in ChatML — `<|im_start|>{role}\n{content}<|im_end|>\n`
//!   per message, then `<|im_start|>assistant\n` when a generation prompt is asked for —
//!   and `<|im_start|>` / `<|im_end|>` are the special ids 1 and 2.

use serde::{Deserialize, Serialize};

/// One chat message (OpenAI shape; `content` as plain text).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: String,
}

/// Turns prompts and chats into token ids.
pub trait Tokenizer: Send + Sync {
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Renders the chat with the model's template, then encodes it.
    fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Vec<u32>;
    /// Text for generated token ids (used to build responses).
    fn decode(&self, ids: &[u32]) -> String;
}

/// The built-in deterministic tokenizer (see the crate docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct BuiltinTokenizer;

pub const IM_START: u32 = 1;
pub const IM_END: u32 = 2;
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
    fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
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

    /// The word the simulator emits for generated id `id` (`decode` maps it back to text).
    pub fn output_token(n: u64) -> u32 {
        token_id(WORDS[(n % WORDS.len() as u64) as usize])
    }
}

impl Tokenizer for BuiltinTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.encode_into(text, &mut out);
        out
    }

    fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Vec<u32> {
        let mut out = Vec::new();
        for m in messages {
            out.push(IM_START);
            self.encode_into(&m.role, &mut out);
            self.encode_into(&m.content, &mut out);
            out.push(IM_END);
        }
        if add_generation_prompt {
            out.push(IM_START);
            self.encode_into("assistant", &mut out);
        }
        out
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_words_and_punctuation_deterministically() {
        let t = BuiltinTokenizer;
        let a = t.encode("Hello, world! hello_world 42");
        assert_eq!(a.len(), 6); // Hello , world ! hello_world 42
        assert_eq!(a, t.encode("Hello ,world!   hello_world\n42"), "whitespace only separates");
        assert_ne!(a[0], t.encode("hello")[0], "case-sensitive");
        assert_eq!(t.encode("héllo wörld").len(), 2);
        assert!(a.iter().all(|&x| (1000..151_000).contains(&x)));
    }

    #[test]
    fn chat_uses_chatml_and_generated_words_round_trip() {
        let t = BuiltinTokenizer;
        let m = vec![ChatMessage { role: "user".into(), content: "hi there".into() }];
        let ids = t.encode_chat(&m, true);
        assert_eq!(ids[0], IM_START);
        assert_eq!(ids[4], IM_END);
        assert_eq!(ids.len(), 7);
        assert_eq!(t.decode(&[BuiltinTokenizer::output_token(0), BuiltinTokenizer::output_token(1)]), "the cache");
    }
}
