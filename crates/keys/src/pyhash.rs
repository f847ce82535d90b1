//! CPython's builtin `hash()` for the values in a block tuple, so that vLLM's old
//! `builtin` algorithm (default ≤ 0.10.1) can be reproduced.
//!
//! Valid for CPython ≥ 3.12 (where `hash(None)` is a constant) and for the
//! `PYTHONHASHSEED` the engine ran with (which keys SipHash-1-3 for strings).

use siphasher::sip::SipHasher13;
use std::hash::Hasher;

use crate::preimage::{ChainValue, PyValue};

const MODULUS: u64 = (1 << 61) - 1;
const XXPRIME_1: u64 = 11400714785074694791;
const XXPRIME_2: u64 = 14029467366897019727;
const XXPRIME_5: u64 = 2870177450012600261;
/// `hash(None)` since CPython 3.12.
const NONE_HASH: i64 = 0xFCA8_6420;

/// The string-hash key CPython derives from `PYTHONHASHSEED`.
#[derive(Clone, Copy, Debug)]
pub struct HashSecret {
    k0: u64,
    k1: u64,
}

impl HashSecret {
    /// `seed` as the environment variable holds it: a decimal in 0..=4294967295.
    /// 0 disables randomisation (all-zero key); "random" or junk gives `None`.
    pub fn from_pythonhashseed(seed: &str) -> Option<Self> {
        let n: u32 = seed.trim().parse().ok()?;
        let mut secret = [0u8; 24];
        if n != 0 {
            // lcg_urandom() in Python/bootstrap_hash.c
            let mut x = n;
            for b in secret.iter_mut() {
                x = x.wrapping_mul(214013).wrapping_add(2531011);
                *b = ((x >> 16) & 0xff) as u8;
            }
        }
        let k0 = u64::from_le_bytes(secret[0..8].try_into().ok()?);
        let k1 = u64::from_le_bytes(secret[8..16].try_into().ok()?);
        Some(Self { k0, k1 })
    }
}

fn fix_minus_one(h: i64) -> i64 {
    if h == -1 {
        -2
    } else {
        h
    }
}

/// `hash(int)` for a non-negative value given as big-endian magnitude.
fn hash_biguint(be: &[u8]) -> i64 {
    let mut acc: u128 = 0;
    for &b in be {
        acc = ((acc << 8) | b as u128) % MODULUS as u128;
    }
    acc as i64
}

/// `hash(int)`.
pub fn hash_int(v: i128) -> i64 {
    let m = (v.unsigned_abs() % MODULUS as u128) as i64;
    fix_minus_one(if v < 0 { -m } else { m })
}

/// `hash(str)`: SipHash-1-3 over the string's compact representation.
pub fn hash_str(s: &str, secret: &HashSecret) -> i64 {
    if s.is_empty() {
        return 0;
    }
    let max = s.chars().map(|c| c as u32).max().unwrap_or(0);
    let mut h = SipHasher13::new_with_keys(secret.k0, secret.k1);
    if max < 0x100 {
        let bytes: Vec<u8> = s.chars().map(|c| c as u32 as u8).collect();
        h.write(&bytes);
    } else if max < 0x10000 {
        let bytes: Vec<u8> = s.chars().flat_map(|c| (c as u32 as u16).to_le_bytes()).collect();
        h.write(&bytes);
    } else {
        let bytes: Vec<u8> = s.chars().flat_map(|c| (c as u32).to_le_bytes()).collect();
        h.write(&bytes);
    }
    fix_minus_one(h.finish() as i64)
}

/// `hash(bytes)`: SipHash-1-3 over the bytes.
fn hash_bytes(b: &[u8], secret: &HashSecret) -> i64 {
    if b.is_empty() {
        return 0;
    }
    let mut h = SipHasher13::new_with_keys(secret.k0, secret.k1);
    h.write(b);
    fix_minus_one(h.finish() as i64)
}

/// `hash(tuple)` (the xxHash-based algorithm of CPython ≥ 3.8) from item hashes.
pub fn hash_tuple(lanes: impl ExactSizeIterator<Item = i64>) -> i64 {
    let len = lanes.len() as u64;
    let mut acc = XXPRIME_5;
    for lane in lanes {
        acc = acc.wrapping_add((lane as u64).wrapping_mul(XXPRIME_2));
        acc = acc.rotate_left(31);
        acc = acc.wrapping_mul(XXPRIME_1);
    }
    acc = acc.wrapping_add(len ^ (XXPRIME_5 ^ 3527539));
    if acc == u64::MAX {
        return 1546275796;
    }
    acc as i64
}

pub fn hash_value(v: &PyValue, secret: &HashSecret) -> i64 {
    match v {
        PyValue::Int(i) => hash_int(*i as i128),
        PyValue::Str(s) => hash_str(s, secret),
        PyValue::Tag(s) => hash_str(s, secret),
        PyValue::Bytes(b) => hash_bytes(b, secret),
        PyValue::Tuple(items) => hash_tuple(items.iter().map(|x| hash_value(x, secret))),
    }
}

pub fn hash_chain_value(v: &ChainValue, secret: &HashSecret) -> i64 {
    match v {
        ChainValue::Bytes { buf, len } => hash_bytes(&buf[..*len as usize], secret),
        ChainValue::U64(x) => hash_int(*x as i128),
        ChainValue::BigUint(b) => hash_biguint(b),
        ChainValue::I64(x) => hash_int(*x as i128),
    }
}

/// `hash((parent, tuple(tokens), extra))`.
pub fn hash_block(parent: &ChainValue, tokens: &[u32], extra: Option<&[PyValue]>, secret: &HashSecret) -> i64 {
    let p = hash_chain_value(parent, secret);
    let t = hash_tuple(tokens.iter().map(|&x| hash_int(x as i128)));
    let e = match extra {
        None => NONE_HASH,
        Some(items) => hash_tuple(items.iter().map(|x| hash_value(x, secret))),
    };
    hash_tuple([p, t, e].into_iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values printed by CPython (any version ≥ 3.8 for ints and tuples of ints).
    #[test]
    fn ints_and_tuples_match_cpython() {
        assert_eq!(hash_int(-1), -2);
        assert_eq!(hash_int(1 << 61), 1);
        assert_eq!(hash_tuple([].into_iter()), 5740354900026072187); // hash(())
        assert_eq!(hash_tuple([hash_int(1), hash_int(2)].into_iter()), -3550055125485641917);
        // hash((1, 2))
    }

    #[test]
    fn str_hash_with_seed_zero_matches_cpython() {
        // PYTHONHASHSEED=0 python3 -c 'print(hash("a"))'
        let s = HashSecret::from_pythonhashseed("0").unwrap();
        assert_eq!(hash_str("a", &s), 4644417185603328019);
        let s42 = HashSecret::from_pythonhashseed("42").unwrap();
        assert_eq!(hash_str("a", &s42), -123207753977932514);
        assert_eq!(hash_str("0", &s42), 3228045297407115758);
        assert!(HashSecret::from_pythonhashseed("random").is_none());
    }
}
