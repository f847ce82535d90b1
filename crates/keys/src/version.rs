//! vLLM release numbers and the hashing behaviour that changed between them.

use std::fmt;
use std::str::FromStr;

use crate::KeyError;

/// A vLLM release, compared numerically (`0.9.2 < 0.10.0 < 0.33.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VllmVersion {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl VllmVersion {
    /// The newest release whose behaviour kvroute reproduces (the default).
    pub const LATEST: VllmVersion = VllmVersion::new(0, 33, 0);

    pub const fn new(major: u16, minor: u16, patch: u16) -> Self {
        Self { major, minor, patch }
    }

    /// Block hashes are `bytes` (not Python ints) from 0.10.2 on.
    pub fn bytes_era(self) -> bool {
        self >= Self::new(0, 10, 2)
    }

    /// NONE_HASH is computed once at import time with pickle-sha256 (≤ 0.9.x).
    pub fn import_time_none_hash(self) -> bool {
        self < Self::new(0, 10, 0)
    }

    /// With PYTHONHASHSEED unset, sha256/sha256_cbor seed from "vllm-none-hash" (≥ 0.29).
    pub fn fixed_default_seed(self) -> bool {
        self >= Self::new(0, 29, 0)
    }

    /// How extra keys (LoRA, multimodal, cache_salt) enter a block's hash.
    pub fn extra_key_era(self) -> ExtraKeyEra {
        if self >= Self::new(0, 31, 0) {
            ExtraKeyEra::Tagged
        } else if self >= Self::new(0, 19, 0) {
            ExtraKeyEra::NameAndOffset
        } else if self >= Self::new(0, 11, 1) {
            ExtraKeyEra::Name
        } else {
            ExtraKeyEra::IntId
        }
    }
}

/// The four formats vLLM has used for a block's extra keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraKeyEra {
    /// ≤ 0.11.0: LoRA by `lora_int_id`, multimodal by bare identifier, bare salt.
    IntId,
    /// 0.11.1 – 0.18: LoRA by name, multimodal by bare identifier, bare salt.
    Name,
    /// 0.19 – 0.30: LoRA by name, multimodal as `(identifier, offset - block_start)`, bare salt.
    NameAndOffset,
    /// ≥ 0.31: `("lora", name, path)`, `("mm", identifier, offset)`, `("cache_salt", salt)`.
    Tagged,
}

impl Default for VllmVersion {
    fn default() -> Self {
        Self::LATEST
    }
}

impl fmt::Display for VllmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for VllmVersion {
    type Err = KeyError;

    /// Accepts `0.33`, `0.33.0`, `v0.10.1.1` and `0.9.0.post1` (anything after the
    /// third number is ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || KeyError::BadVersion(s.to_string());
        let t = s.trim().trim_start_matches('v');
        let mut nums = [0u16; 3];
        let mut parts = t.split('.');
        for (i, slot) in nums.iter_mut().enumerate() {
            match parts.next() {
                Some(p) => {
                    let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
                    if digits.is_empty() {
                        return Err(bad());
                    }
                    *slot = digits.parse().map_err(|_| bad())?;
                }
                None if i >= 2 => break,
                None => return Err(bad()),
            }
        }
        Ok(Self::new(nums[0], nums[1], nums[2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        let v: VllmVersion = "0.10.1.1".parse().unwrap();
        assert_eq!(v, VllmVersion::new(0, 10, 1));
        assert!("0.9.2".parse::<VllmVersion>().unwrap() < "0.10".parse().unwrap());
        assert_eq!("v0.33".parse::<VllmVersion>().unwrap(), VllmVersion::LATEST);
        assert!("x".parse::<VllmVersion>().is_err());
        assert!("0".parse::<VllmVersion>().is_err());
    }

    #[test]
    fn eras() {
        let v = |s: &str| s.parse::<VllmVersion>().unwrap();
        assert_eq!(v("0.11.0").extra_key_era(), ExtraKeyEra::IntId);
        assert_eq!(v("0.11.2").extra_key_era(), ExtraKeyEra::Name);
        assert_eq!(v("0.18").extra_key_era(), ExtraKeyEra::Name);
        assert_eq!(v("0.19").extra_key_era(), ExtraKeyEra::NameAndOffset);
        assert_eq!(v("0.30.0").extra_key_era(), ExtraKeyEra::NameAndOffset);
        assert_eq!(v("0.31").extra_key_era(), ExtraKeyEra::Tagged);
        assert!(!v("0.10.1").bytes_era());
        assert!(v("0.10.2").bytes_era());
    }
}
