//! # kvroute-keys — tokens → block keys
//!
//! Owns everything about turning a prompt's token ids into the block keys the index is
//! queried with:
//!
//! * [`BlockHasher`]: vLLM's prefix-cache block hashes, byte-identical to the engine for
//!   every algorithm vLLM has had (`sha256_cbor`, `sha256` via pickle protocol 5,
//!   `sha256_cbor_64bit`, `xxhash`, `xxhash_cbor`, and CPython's `builtin` hash), every
//!   NONE_HASH rule (`PYTHONHASHSEED`, the ≥ 0.29 `"vllm-none-hash"` default) and every
//!   extra-key format (LoRA, multimodal, `cache_salt`) from vLLM 0.9 to 0.33, chosen by
//!   [`VllmVersion`]. Only full blocks are hashed. Events carry the low 64 bits
//!   ([`ChainValue::event_u64`]).
//! * [`RequestKeyer`]: kvroute's own engine-independent keys over token ids, for fleets
//!   whose hashes cannot be reproduced.
//!
//! Conformance against vLLM's own output lives in `tests/conformance.rs`, which reads
//! `../shared/vectors/vllm_block_hashes.json`.

mod algo;
mod extra;
mod hasher;
pub mod preimage;
pub mod pyhash;
mod request;
mod version;

pub use algo::HashAlgo;
pub use extra::{ExtraKeyGen, LoraRef, MmItem, RequestExtras};
pub use hasher::{BlockHash, BlockHasher, HashConfig, DEFAULT_SEED};
pub use preimage::{low64_be, ChainValue, PyValue};
pub use request::RequestKeyer;
pub use version::{ExtraKeyEra, VllmVersion};

/// Why block keys cannot be computed as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("unknown hash algorithm {0:?} (expected sha256_cbor, sha256, sha256_cbor_64bit, xxhash, xxhash_cbor or builtin)")]
    UnknownAlgo(String),
    #[error("invalid vLLM version {0:?} (expected a release number such as 0.33 or 0.10.1)")]
    BadVersion(String),
    #[error("vLLM {version} has no {algo} prefix-caching hash algorithm")]
    AlgoNotInVersion { algo: &'static str, version: String },
    #[error("block hashes are not reproducible: {0}")]
    NotReproducible(String),
    #[error("block size must be at least 1 token")]
    BadBlockSize,
}
