//! Incremental detokenization, the way vLLM streams text: each new token's text is the
//! decode of a short window of recent tokens (`prefix..`) minus the decode of the same
//! window without the new ones (`prefix..read`). A token's own leading space (`Ġword`,
//! `▁word`) comes out exactly once, words merged across tokens stay merged, and text that
//! ends in an incomplete UTF-8 sequence (decoded as U+FFFD) is held back until the bytes
//! that complete it arrive. The window starts on the last prompt tokens, so the first
//! generated token is decoded in context (as vLLM primes its decoder with the prompt).
//!
//! Concatenating every delta gives the text of the whole output, so a streamed response
//! and a non-streamed one built from the same deltas are equal.

use crate::Tokenizer;

/// Prompt tokens the window starts on (vLLM primes with 4–24 of them).
const CONTEXT: usize = 5;

pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// Tokens before this one have been emitted.
    read: usize,
    text: String,
}

impl IncrementalDetokenizer {
    /// A detokenizer whose window starts on the end of `prompt` (may be empty). The
    /// shortest tail of at least `CONTEXT` tokens that decodes without U+FFFD is used.
    pub fn new(tok: &dyn Tokenizer, prompt: &[u32]) -> Self {
        let mut n = CONTEXT.min(prompt.len());
        while n < prompt.len() && n < 24 && tok.decode(&prompt[prompt.len() - n..]).contains('\u{FFFD}') {
            n += 1;
        }
        let ids = prompt[prompt.len() - n..].to_vec();
        Self { prefix: 0, read: ids.len(), ids, text: String::new() }
    }

    /// Adds one generated token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &dyn Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read]);
        let now = tok.decode(&self.ids[self.prefix..]);
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return String::new(); // nothing printable yet (or an incomplete character)
        }
        let delta = match now.strip_prefix(before.as_str()) {
            Some(d) => d.to_string(),
            // The earlier text changed (a cleanup rule); take what lies past its length.
            None => match now.get(before.len()..) {
                Some(d) => d.to_string(),
                None => return String::new(),
            },
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        self.text.push_str(&delta);
        delta
    }

    /// Everything emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BuiltinTokenizer;

    #[test]
    fn builtin_words_stream_with_one_space_each() {
        let t = BuiltinTokenizer;
        let ids: Vec<u32> = (0..6).map(|n| t.output_token(n)).collect();
        let mut d = IncrementalDetokenizer::new(&t, &[]);
        let deltas: Vec<String> = ids.iter().map(|&i| d.push(&t, i)).collect();
        assert_eq!(deltas.concat(), t.decode(&ids));
        assert!(deltas[1..].iter().all(|s| s.starts_with(' ') && !s.starts_with("  ")), "{deltas:?}");
        // In the context of a prompt, the first word is separated from it too.
        let prompt = t.encode("kv cache", true);
        let mut d = IncrementalDetokenizer::new(&t, &prompt);
        assert!(d.push(&t, ids[0]).starts_with(' '));
    }
}
