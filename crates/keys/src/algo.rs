//! `--prefix-caching-hash-algo` values and which vLLM releases have them.

use std::fmt;
use std::str::FromStr;

use crate::{KeyError, VllmVersion};

/// A vLLM prefix-caching hash algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlgo {
    /// SHA-256 over canonical CBOR (0.10.2+). The one to choose for routing.
    Sha256Cbor,
    /// SHA-256 over pickle protocol 5 (default from 0.10.2; also in ≤ 0.10.1 as a 256-bit int).
    Sha256,
    /// Low 64 bits of SHA-256 over CBOR, chained as ints (0.10.0 – 0.10.1 only).
    Sha256Cbor64bit,
    /// XXH3-128 over pickle (0.13+).
    Xxhash,
    /// XXH3-128 over canonical CBOR (0.13+).
    XxhashCbor,
    /// Python's `hash()` (≤ 0.10.1 default); reproducible only for CPython ≥ 3.12.
    Builtin,
}

impl HashAlgo {
    pub const ALL: [HashAlgo; 6] = [
        HashAlgo::Sha256Cbor,
        HashAlgo::Sha256,
        HashAlgo::Sha256Cbor64bit,
        HashAlgo::Xxhash,
        HashAlgo::XxhashCbor,
        HashAlgo::Builtin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Sha256Cbor => "sha256_cbor",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha256Cbor64bit => "sha256_cbor_64bit",
            HashAlgo::Xxhash => "xxhash",
            HashAlgo::XxhashCbor => "xxhash_cbor",
            HashAlgo::Builtin => "builtin",
        }
    }

    /// Whether the preimage is canonical CBOR (else pickle, or nothing for builtin).
    pub fn uses_cbor(self) -> bool {
        matches!(self, HashAlgo::Sha256Cbor | HashAlgo::Sha256Cbor64bit | HashAlgo::XxhashCbor)
    }

    /// Whether `version` of vLLM offers this algorithm.
    pub fn available_in(self, version: VllmVersion) -> bool {
        let v = |a, b, c| VllmVersion::new(a, b, c);
        match self {
            HashAlgo::Sha256 => true,
            HashAlgo::Builtin => version < v(0, 10, 2),
            HashAlgo::Sha256Cbor64bit => version >= v(0, 10, 0) && version < v(0, 10, 2),
            HashAlgo::Sha256Cbor => version >= v(0, 10, 2),
            HashAlgo::Xxhash | HashAlgo::XxhashCbor => version >= v(0, 13, 0),
        }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HashAlgo::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| KeyError::UnknownAlgo(s.to_string()))
    }
}
