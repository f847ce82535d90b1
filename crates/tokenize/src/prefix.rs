//! The prefix store: token ids of recently seen prompts, found again by any long enough
//! common *text* prefix, so a new prompt that shares its first kilobytes with an earlier
//! one (a system prompt, a document, a conversation so far) is only tokenized from near
//! where it differs.
//!
//! Every 512 bytes of a tokenized text, a chained hash of the text so far is recorded with
//! the first token starting at least 64 bytes before that boundary (its index and byte
//! offset: a *split point*). For a new text, the longest recorded prefix gives a split
//! point `p`; the text is re-tokenized from a token boundary `q` about 64 bytes before
//! `p`, and the stored tokens up to `p` are reused only if that re-tokenization reproduces
//! the stored tokens between `q` and `p` exactly and has a token starting at `p` — i.e.
//! the tokenizer has re-synchronised, so `p` is a natural boundary. Otherwise the whole
//! text is tokenized. (The tokens steer routing only; request bodies are forwarded as
//! they are.)

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub const CHUNK: usize = 512;
const MARGIN: usize = 64;
const MAX_TEXTS: usize = 1024;

/// Tokens of one text and the byte offset each starts at.
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub starts: Vec<usize>,
}

#[derive(Clone)]
struct Split {
    text: Arc<Tokenized>,
    /// Tokens `[0, n)` cover the text up to byte `p` (token `n` starts at `p`).
    n: usize,
    p: usize,
}

/// Split points by prefix hash, and each stored text's keys in insertion order.
type Splits = (HashMap<u64, Split>, VecDeque<Vec<u64>>);

#[derive(Default)]
pub struct PrefixStore {
    inner: Mutex<Splits>,
    reused: std::sync::atomic::AtomicU64,
}

/// Chained hashes of the text's prefixes at every 512-byte boundary (char-aligned),
/// with the boundary positions.
fn boundaries(text: &str, seed: u64) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    let (mut h, mut start) = (seed, 0);
    while start + CHUNK <= text.len() {
        let mut end = start + CHUNK;
        while !text.is_char_boundary(end) {
            end += 1;
        }
        h = xxh3_64_with_seed(&text.as_bytes()[start..end], h);
        out.push((h, end));
        start = end;
    }
    out
}

impl PrefixStore {
    /// Tokenizes `text` with `encode` (ids + start offsets of a substring, no special
    /// tokens added) reusing a stored prefix when it is verifiably safe. `full` tokenizes
    /// a whole text (with whatever special tokens the caller wants).
    pub fn encode(
        &self,
        seed: u64,
        text: &str,
        full: impl Fn(&str) -> Tokenized,
        part: impl Fn(&str) -> Tokenized,
    ) -> Arc<Tokenized> {
        let bounds = boundaries(text, seed);
        let found = {
            let g = self.inner.lock();
            bounds.iter().map_while(|(h, _)| g.0.get(h)).last().cloned()
        };
        let result = match found.and_then(|s| Self::reuse(&s, text, &part)) {
            Some(r) => {
                self.reused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                r
            }
            None => full(text),
        };
        let result = Arc::new(result);
        self.insert(&bounds, &result);
        result
    }

    /// Texts tokenized by reusing a stored prefix.
    pub fn reused(&self) -> u64 {
        self.reused.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reuse(s: &Split, text: &str, part: &impl Fn(&str) -> Tokenized) -> Option<Tokenized> {
        let stored = &s.text;
        // Re-synchronisation point q: a stored token start ~MARGIN bytes before p.
        let i = stored.starts[..s.n].iter().rposition(|&st| st + MARGIN <= s.p)?;
        let q = stored.starts[i];
        if !text.is_char_boundary(q) {
            return None;
        }
        let tail = part(&text[q..]);
        let k = tail.starts.iter().position(|&st| q + st >= s.p)?;
        let agrees = q + tail.starts[k] == s.p
            && tail.ids[..k] == stored.ids[i..s.n]
            && tail.starts[..k].iter().zip(&stored.starts[i..s.n]).all(|(a, b)| q + a == *b);
        if !agrees {
            return None;
        }
        let mut ids = stored.ids[..i].to_vec();
        let mut starts = stored.starts[..i].to_vec();
        ids.extend_from_slice(&tail.ids);
        starts.extend(tail.starts.iter().map(|st| q + st));
        Some(Tokenized { ids, starts })
    }

    fn insert(&self, bounds: &[(u64, usize)], t: &Arc<Tokenized>) {
        let mut keys = Vec::new();
        let mut g = self.inner.lock();
        for &(h, b) in bounds {
            // The first token starting at or after b − MARGIN (and not after b).
            let n = t.starts.partition_point(|&st| st + MARGIN < b);
            match t.starts.get(n) {
                Some(&p) if p <= b && n > 0 => {
                    g.0.insert(h, Split { text: t.clone(), n, p });
                    keys.push(h);
                }
                _ => {}
            }
        }
        if !keys.is_empty() {
            g.1.push_back(keys);
        }
        while g.1.len() > MAX_TEXTS {
            if let Some(old) = g.1.pop_front() {
                for k in old {
                    g.0.remove(&k);
                }
            }
        }
    }
}
