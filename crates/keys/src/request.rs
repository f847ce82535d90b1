//! kvroute's own *request keys*: a fast chained hash of token ids that does not depend
//! on how the engine hashes. Used when the engines' hashes cannot be reproduced
//! (xxhash with a random seed, `builtin`, PYTHONHASHSEED unknown): events are keyed by
//! hashing their `token_ids` with this function, chained through the parent, and the
//! engine's own hashes are only mapped to these keys (see `kvroute-index`).
//!
//! Key of block i: `xxh3_64(parent_i as u64 LE ‖ tokens as u32 LE ‖ for each extra:
//! len as u32 LE ‖ bytes)`, with `parent_0 = xxh3_64("kvroute/rk1\0" ‖ seed ‖ "\0" ‖
//! model)`. The model is the LoRA adapter's name when one is used, so adapters never
//! share keys with their base model; the remaining extras are the multimodal
//! identifiers overlapping the block and, on block 0, the cache salt.

use xxhash_rust::xxh3::xxh3_64;

use crate::extra::{ExtraKeyGen, RequestExtras};
use crate::preimage::PyValue;
use crate::version::ExtraKeyEra;

/// Computes request keys for one block size and seed.
#[derive(Clone, Debug)]
pub struct RequestKeyer {
    block_size: usize,
    seed: String,
}

impl RequestKeyer {
    pub fn new(block_size: usize, seed: impl Into<String>) -> Self {
        Self { block_size: block_size.max(1), seed: seed.into() }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The parent of block 0 for a model (or LoRA adapter) name.
    pub fn root(&self, model: &str) -> u64 {
        let mut buf = Vec::with_capacity(16 + self.seed.len() + model.len());
        buf.extend_from_slice(b"kvroute/rk1\0");
        buf.extend_from_slice(self.seed.as_bytes());
        buf.push(0);
        buf.extend_from_slice(model.as_bytes());
        xxh3_64(&buf)
    }

    /// The key of one block; `extras` are canonical extra-key byte strings.
    pub fn chain(&self, buf: &mut Vec<u8>, parent: u64, tokens: &[u32], extras: &[&[u8]]) -> u64 {
        buf.clear();
        buf.extend_from_slice(&parent.to_le_bytes());
        for &t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        for e in extras {
            buf.extend_from_slice(&(e.len() as u32).to_le_bytes());
            buf.extend_from_slice(e);
        }
        xxh3_64(buf)
    }

    /// Keys of every full block of a prompt sent to `model`.
    pub fn keys(&self, model: &str, tokens: &[u32], extras: &RequestExtras, out: &mut Vec<u64>) {
        out.clear();
        let bs = self.block_size;
        let root_name = extras.lora.as_ref().map(|l| l.name.as_str()).unwrap_or(model);
        let mut parent = self.root(root_name);
        let mut buf = Vec::with_capacity(8 + bs * 4);
        let rest = RequestExtras { lora: None, cache_salt: extras.cache_salt.clone(), mm: extras.mm.clone() };
        let mut gen = ExtraKeyGen::new(ExtraKeyEra::Name, &rest);
        for (i, block) in tokens.chunks_exact(bs).enumerate() {
            let extra = gen.block(i * bs, (i + 1) * bs).unwrap_or_default();
            let parts: Vec<&[u8]> = extra
                .iter()
                .filter_map(|v| match v {
                    PyValue::Str(s) => Some(s.as_bytes()),
                    PyValue::Bytes(b) => Some(b.as_slice()),
                    _ => None,
                })
                .collect();
            parent = self.chain(&mut buf, parent, block, &parts);
            out.push(parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extra::LoraRef;

    #[test]
    fn keys_depend_on_model_lora_salt_and_tokens() {
        let k = RequestKeyer::new(4, "");
        let toks: Vec<u32> = (0..8).collect();
        let mut a = Vec::new();
        let mut b = Vec::new();
        k.keys("m", &toks, &RequestExtras::default(), &mut a);
        assert_eq!(a.len(), 2);
        k.keys("other", &toks, &RequestExtras::default(), &mut b);
        assert_ne!(a, b);
        let lora =
            RequestExtras { lora: Some(LoraRef { name: "ad".into(), ..Default::default() }), ..Default::default() };
        k.keys("m", &toks, &lora, &mut b);
        assert_ne!(a, b);
        let mut c = Vec::new();
        k.keys("ad", &toks, &RequestExtras::default(), &mut c);
        assert_eq!(b, c, "a LoRA adapter is keyed like a model of that name");
        let salt = RequestExtras { cache_salt: Some("s".into()), ..Default::default() };
        k.keys("m", &toks, &salt, &mut b);
        assert_ne!(a[0], b[0]);
        k.keys("m", &toks[..7], &RequestExtras::default(), &mut b);
        assert_eq!(b, a[..1].to_vec(), "only full blocks, and a prefix keeps its keys");
    }
}
