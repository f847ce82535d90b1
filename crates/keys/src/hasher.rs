//! vLLM's chained block hash: `h_i = H((h_{i-1} or NONE_HASH, tuple(tokens_i), extra_i))`
//! over full blocks only.

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_128;

use crate::extra::{ExtraKeyGen, RequestExtras};
use crate::preimage::{cbor_block, cbor_str, low64_be, pickle_block, pickle_str, ChainValue, PyValue};
use crate::pyhash::{self, HashSecret};
use crate::{HashAlgo, KeyError, VllmVersion};

/// The seed vLLM ≥ 0.29 uses for sha256 / sha256_cbor when PYTHONHASHSEED is unset.
pub const DEFAULT_SEED: &str = "vllm-none-hash";

/// How the engines being routed to hash their blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashConfig {
    pub algo: HashAlgo,
    pub vllm_version: VllmVersion,
    /// `PYTHONHASHSEED` exactly as the servers' environment holds it; `None` = unset.
    pub seed: Option<String>,
    pub block_size: usize,
}

impl Default for HashConfig {
    /// vLLM's own defaults: latest release, `sha256`, PYTHONHASHSEED unset, block size 16.
    fn default() -> Self {
        Self { algo: HashAlgo::Sha256, vllm_version: VllmVersion::LATEST, seed: None, block_size: 16 }
    }
}

/// One block's hash: the value vLLM chains on, and the u64 its events carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHash {
    pub value: ChainValue,
    pub event: u64,
}

/// Computes block hashes exactly as one vLLM configuration does.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    cfg: HashConfig,
    none_hash: ChainValue,
    secret: Option<HashSecret>,
}

impl BlockHasher {
    /// Checks that the configuration exists in that vLLM release and that its hashes are
    /// reproducible outside the engine, and derives NONE_HASH.
    pub fn new(cfg: HashConfig) -> Result<Self, KeyError> {
        let HashConfig { algo, vllm_version: version, .. } = cfg;
        if cfg.block_size == 0 {
            return Err(KeyError::BadBlockSize);
        }
        if !algo.available_in(version) {
            return Err(KeyError::AlgoNotInVersion { algo: algo.name(), version: version.to_string() });
        }
        let seed: String = match (&cfg.seed, algo) {
            (Some(s), _) => s.clone(),
            (None, HashAlgo::Sha256 | HashAlgo::Sha256Cbor) if version.fixed_default_seed() => DEFAULT_SEED.into(),
            (None, _) => {
                return Err(KeyError::NotReproducible(format!(
                    "with PYTHONHASHSEED unset, vLLM {version} seeds {algo} hashes from os.urandom; \
                     set PYTHONHASHSEED on the servers (and --seed here), or key blocks by token ids \
                     (request-key mode)"
                )))
            }
        };
        let secret = match algo {
            HashAlgo::Builtin => Some(HashSecret::from_pythonhashseed(&seed).ok_or_else(|| {
                KeyError::NotReproducible(format!(
                    "builtin hashes need PYTHONHASHSEED to be an integer in 0..=4294967295, got {seed:?}"
                ))
            })?),
            _ => None,
        };
        let mut me = Self { cfg, none_hash: ChainValue::U64(0), secret };
        me.none_hash = me.derive_none_hash(&seed);
        Ok(me)
    }

    pub fn config(&self) -> &HashConfig {
        &self.cfg
    }

    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    /// The parent of block 0.
    pub fn none_hash(&self) -> ChainValue {
        self.none_hash
    }

    fn derive_none_hash(&self, seed: &str) -> ChainValue {
        let mut buf = Vec::with_capacity(32);
        if self.cfg.vllm_version.import_time_none_hash() {
            // ≤ 0.9: sha256(pickle(seed)) as an int, whatever the algorithm.
            pickle_str(&mut buf, seed);
            return ChainValue::BigUint(Sha256::digest(&buf).into());
        }
        match self.cfg.algo {
            HashAlgo::Builtin => ChainValue::I64(match &self.secret {
                Some(s) => pyhash::hash_str(seed, s),
                None => 0,
            }),
            a if a.uses_cbor() => {
                cbor_str(&mut buf, seed);
                self.digest(&buf)
            }
            _ => {
                pickle_str(&mut buf, seed);
                self.digest(&buf)
            }
        }
    }

    fn digest(&self, preimage: &[u8]) -> ChainValue {
        match self.cfg.algo {
            HashAlgo::Sha256 | HashAlgo::Sha256Cbor => {
                let d: [u8; 32] = Sha256::digest(preimage).into();
                if self.cfg.vllm_version.bytes_era() {
                    ChainValue::Bytes { buf: d, len: 32 }
                } else {
                    ChainValue::BigUint(d)
                }
            }
            HashAlgo::Sha256Cbor64bit => ChainValue::U64(low64_be(&Sha256::digest(preimage))),
            HashAlgo::Xxhash | HashAlgo::XxhashCbor => ChainValue::from_digest(&xxh3_128(preimage).to_be_bytes()),
            // builtin hashes objects, not bytes; never reached through `digest`.
            HashAlgo::Builtin => ChainValue::I64(0),
        }
    }

    /// Writes the exact bytes vLLM hashes for one block (empty for `builtin`).
    pub fn preimage(&self, buf: &mut Vec<u8>, parent: &ChainValue, tokens: &[u32], extra: Option<&[PyValue]>) {
        buf.clear();
        match self.cfg.algo {
            HashAlgo::Builtin => {}
            a if a.uses_cbor() => {
                // A 256-bit int parent only exists with pickle sha256, so this cannot fail
                // for a hasher built by `new`.
                let _ = cbor_block(buf, parent, tokens, extra);
            }
            _ => pickle_block(buf, parent, tokens, extra),
        }
    }

    /// Hash of one block given its parent; `buf` is scratch space.
    pub fn hash_block(
        &self,
        buf: &mut Vec<u8>,
        parent: &ChainValue,
        tokens: &[u32],
        extra: Option<&[PyValue]>,
    ) -> ChainValue {
        if let (HashAlgo::Builtin, Some(secret)) = (self.cfg.algo, &self.secret) {
            return ChainValue::I64(pyhash::hash_block(parent, tokens, extra, secret));
        }
        self.preimage(buf, parent, tokens, extra);
        self.digest(buf)
    }

    /// Hashes of every full block of a prompt.
    pub fn hash_prompt(&self, tokens: &[u32], extras: &RequestExtras) -> Vec<BlockHash> {
        let mut out = Vec::with_capacity(tokens.len() / self.cfg.block_size);
        self.for_each_block(tokens, extras, |h| out.push(BlockHash { value: *h, event: h.event_u64() }));
        out
    }

    /// The u64 keys vLLM's `BlockStored` events would carry for this prompt.
    pub fn event_keys(&self, tokens: &[u32], extras: &RequestExtras, out: &mut Vec<u64>) {
        out.clear();
        out.reserve(tokens.len() / self.cfg.block_size);
        self.for_each_block(tokens, extras, |h| out.push(h.event_u64()));
    }

    fn for_each_block(&self, tokens: &[u32], extras: &RequestExtras, mut f: impl FnMut(&ChainValue)) {
        let bs = self.cfg.block_size;
        let mut buf = Vec::with_capacity(16 + bs * 5);
        let mut gen = ExtraKeyGen::new(self.cfg.vllm_version.extra_key_era(), extras);
        let mut parent = self.none_hash;
        for (i, block) in tokens.chunks_exact(bs).enumerate() {
            let extra = gen.block(i * bs, (i + 1) * bs);
            parent = self.hash_block(&mut buf, &parent, block, extra.as_deref());
            f(&parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher(algo: HashAlgo, ver: &str, seed: Option<&str>) -> Result<BlockHasher, KeyError> {
        BlockHasher::new(HashConfig {
            algo,
            vllm_version: ver.parse()?,
            seed: seed.map(str::to_string),
            block_size: 16,
        })
    }

    #[test]
    fn readme_handy_values() {
        // ../shared/vectors/README.md, vLLM 0.33.0, seq64 blocks 0 and 1.
        let toks: Vec<u32> = (0..64).collect();
        let h = hasher(HashAlgo::Sha256Cbor, "0.33", Some("0")).unwrap();
        let keys = h.hash_prompt(&toks, &RequestExtras::default());
        assert_eq!(keys.len(), 4);
        assert_eq!(keys[0].event, 12687895063098490012);
        assert_eq!(keys[1].event, 1814341696565857452);
        let h = hasher(HashAlgo::Sha256, "0.33", None).unwrap();
        let keys = h.hash_prompt(&toks, &RequestExtras::default());
        assert_eq!(keys[0].event, 3262291359910021016);
        assert_eq!(keys[1].event, 7142137847444424233);
    }

    #[test]
    fn refuses_what_vllm_cannot_reproduce() {
        assert!(matches!(hasher(HashAlgo::Sha256Cbor, "0.28", None), Err(KeyError::NotReproducible(_))));
        assert!(matches!(hasher(HashAlgo::Xxhash, "0.33", None), Err(KeyError::NotReproducible(_))));
        assert!(matches!(hasher(HashAlgo::Sha256Cbor, "0.9.2", Some("0")), Err(KeyError::AlgoNotInVersion { .. })));
        assert!(matches!(hasher(HashAlgo::Builtin, "0.10.0", Some("random")), Err(KeyError::NotReproducible(_))));
        assert!(BlockHasher::new(HashConfig { block_size: 0, ..Default::default() }).is_err());
    }

    #[test]
    fn partial_block_is_not_hashed() {
        let h = hasher(HashAlgo::Sha256Cbor, "0.33", Some("0")).unwrap();
        assert_eq!(h.hash_prompt(&[1; 15], &RequestExtras::default()).len(), 0);
        assert_eq!(h.hash_prompt(&[1; 47], &RequestExtras::default()).len(), 2);
    }
}
