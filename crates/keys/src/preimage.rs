//! The bytes vLLM feeds to its hash function: Python pickle (protocol 5) or canonical
//! CBOR of the block tuple `(parent, tuple(tokens), extra_keys | None)`.
//!
//! Pickle is written by hand (no Rust crate reproduces CPython's opcode choices,
//! framing and memo numbering byte for byte); only the opcodes these values need are
//! implemented. CBOR goes through `minicbor`, whose encoder always picks the shortest
//! integer and length forms, which is exactly RFC 7049 canonical form for these types.

use minicbor::Encoder;

/// The Python values that appear in a block hash's extra keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PyValue {
    Int(i64),
    /// A string built at run time (LoRA name, salt, mm identifier).
    Str(String),
    /// A string literal in vLLM's source (`"lora"`, `"mm"`, `"cache_salt"`). CPython
    /// interns these, so a second occurrence in one pickle is a memo reference.
    Tag(&'static str),
    Bytes(Vec<u8>),
    Tuple(Vec<PyValue>),
}

/// Where a block chain stands: the parent value of the next block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainValue {
    /// A digest (bytes era, ≥ 0.10.2): 32 bytes for sha256*, 16 for xxhash*.
    Bytes { buf: [u8; 32], len: u8 },
    /// `sha256_cbor_64bit` (0.10.0–0.10.1): an int below 2^64.
    U64(u64),
    /// Int-era `sha256`: a 256-bit non-negative int, big-endian.
    BigUint([u8; 32]),
    /// `builtin`: a Python `hash()` value.
    I64(i64),
}

impl ChainValue {
    pub fn from_digest(d: &[u8]) -> Self {
        let mut buf = [0u8; 32];
        let len = d.len().min(32);
        buf[..len].copy_from_slice(&d[..len]);
        ChainValue::Bytes { buf, len: len as u8 }
    }

    /// The value vLLM puts in `BlockStored.block_hashes` by default: the last 8 bytes of
    /// a digest read big-endian (≥ 0.10.2), or the int itself (≤ 0.10.1; a 256-bit
    /// sha256 int cannot be published, its low 64 bits are returned).
    pub fn event_u64(&self) -> u64 {
        match *self {
            ChainValue::Bytes { buf, len } => low64_be(&buf[..len as usize]),
            ChainValue::U64(v) => v,
            ChainValue::BigUint(b) => low64_be(&b),
            ChainValue::I64(v) => v as u64,
        }
    }

    /// Whether vLLM can publish this value in an event (256-bit ints overflow msgpack).
    pub fn fits_event(&self) -> bool {
        match *self {
            ChainValue::BigUint(b) => b[..24].iter().all(|&x| x == 0),
            _ => true,
        }
    }

    /// Lower-case hex: the digest bytes, or the int as big-endian (64-bit two's
    /// complement for `builtin`, 256-bit for int-era sha256).
    pub fn to_hex(&self) -> String {
        match *self {
            ChainValue::Bytes { buf, len } => hex::encode(&buf[..len as usize]),
            ChainValue::U64(v) => format!("{v:016x}"),
            ChainValue::BigUint(b) => hex::encode(b),
            ChainValue::I64(v) => format!("{:016x}", v as u64),
        }
    }
}

/// Last 8 bytes big-endian; shorter inputs are left-padded with zeros.
pub fn low64_be(b: &[u8]) -> u64 {
    let tail = &b[b.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64)
}

// ---------------------------------------------------------------------------------
// Pickle protocol 5
// ---------------------------------------------------------------------------------

const FRAME_HEADER: usize = 11; // PROTO 5 + FRAME + u64 length

/// A pickler for the handful of types in a block tuple, matching CPython's
/// `pickle.dumps(obj, protocol=5)` byte for byte (frame, memo numbering, int opcodes).
pub struct Pickler<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    memo: u32,
    tags: [(&'static str, u32); 4],
    ntags: usize,
}

impl<'a> Pickler<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        let start = out.len();
        out.extend_from_slice(&[0x80, 0x05, 0x95, 0, 0, 0, 0, 0, 0, 0, 0]);
        Self { out, start, memo: 0, tags: [("", 0); 4], ntags: 0 }
    }

    fn memoize(&mut self) -> u32 {
        self.out.push(0x94);
        self.memo += 1;
        self.memo - 1
    }

    pub fn none(&mut self) {
        self.out.push(b'N');
    }

    /// `save_long`: BININT1 / BININT2 / BININT when it fits, else LONG1.
    pub fn int(&mut self, v: i128) {
        if (0..=0xff).contains(&v) {
            self.out.extend_from_slice(&[0x4b, v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(0x4d);
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if (-0x8000_0000..=0x7fff_ffff).contains(&v) {
            self.out.push(0x4a);
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // encode_long: two's complement little-endian, (bit_length >> 3) + 1 bytes,
            // dropping a redundant 0xff for negatives.
            let bytes = v.to_le_bytes();
            let bits = if v >= 0 { 128 - v.leading_zeros() } else { 128 - (!v).leading_zeros() };
            let mut n = (bits as usize >> 3) + 1;
            if v < 0 && n > 1 && bytes[n - 1] == 0xff && bytes[n - 2] & 0x80 != 0 {
                n -= 1;
            }
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    /// A non-negative int given as big-endian magnitude (≤ 255 bytes), via LONG1 unless small.
    pub fn big_uint(&mut self, be: &[u8]) {
        let first = be.iter().position(|&b| b != 0).unwrap_or(be.len());
        let mag = &be[first..];
        if mag.len() <= 15 {
            let mut v: i128 = 0;
            for &b in mag {
                v = (v << 8) | b as i128;
            }
            return self.int(v);
        }
        let bits = mag.len() * 8 - mag[0].leading_zeros() as usize;
        let n = (bits >> 3) + 1;
        self.out.extend_from_slice(&[0x8a, n as u8]);
        self.out.extend(mag.iter().rev());
        self.out.extend(std::iter::repeat_n(0, n - mag.len()));
    }

    pub fn bytes(&mut self, b: &[u8]) {
        if b.len() < 256 {
            self.out.extend_from_slice(&[0x43, b.len() as u8]);
        } else {
            self.out.push(0x42);
            self.out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        }
        self.out.extend_from_slice(b);
        self.memoize();
    }

    pub fn str(&mut self, s: &str) {
        if s.len() < 256 {
            self.out.extend_from_slice(&[0x8c, s.len() as u8]);
        } else {
            self.out.push(0x58);
            self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        self.out.extend_from_slice(s.as_bytes());
        self.memoize();
    }

    /// An interned string literal: written once, then referenced from the memo.
    pub fn tag(&mut self, s: &'static str) {
        if let Some(&(_, idx)) = self.tags[..self.ntags].iter().find(|(t, _)| *t == s) {
            if idx < 256 {
                self.out.extend_from_slice(&[0x68, idx as u8]);
            } else {
                self.out.push(0x6a);
                self.out.extend_from_slice(&idx.to_le_bytes());
            }
            return;
        }
        let idx = self.memo;
        self.str(s);
        if self.ntags < self.tags.len() {
            self.tags[self.ntags] = (s, idx);
            self.ntags += 1;
        }
    }

    /// Call before the items of a tuple of `n` items.
    pub fn tuple_begin(&mut self, n: usize) {
        if n > 3 {
            self.out.push(b'(');
        }
    }

    /// Call after the items of a tuple of `n` items.
    pub fn tuple_end(&mut self, n: usize) {
        match n {
            0 => {
                self.out.push(b')');
                return;
            }
            1 => self.out.push(0x85),
            2 => self.out.push(0x86),
            3 => self.out.push(0x87),
            _ => self.out.push(b't'),
        }
        self.memoize();
    }

    pub fn int_tuple(&mut self, items: &[u32]) {
        self.tuple_begin(items.len());
        for &t in items {
            self.int(t as i128);
        }
        self.tuple_end(items.len());
    }

    pub fn value(&mut self, v: &PyValue) {
        match v {
            PyValue::Int(i) => self.int(*i as i128),
            PyValue::Str(s) => self.str(s),
            PyValue::Tag(s) => self.tag(s),
            PyValue::Bytes(b) => self.bytes(b),
            PyValue::Tuple(items) => {
                self.tuple_begin(items.len());
                for it in items {
                    self.value(it);
                }
                self.tuple_end(items.len());
            }
        }
    }

    pub fn chain_value(&mut self, v: &ChainValue) {
        match v {
            ChainValue::Bytes { buf, len } => self.bytes(&buf[..*len as usize]),
            ChainValue::U64(x) => self.int(*x as i128),
            ChainValue::BigUint(b) => self.big_uint(b),
            ChainValue::I64(x) => self.int(*x as i128),
        }
    }

    /// STOP, then fill in the frame length (or drop the frame if it is under 4 bytes,
    /// as CPython's framer does).
    pub fn finish(self) {
        self.out.push(b'.');
        let body = self.out.len() - self.start - FRAME_HEADER;
        if body < 4 {
            self.out.drain(self.start + 2..self.start + FRAME_HEADER);
        } else {
            let at = self.start + 3;
            self.out[at..at + 8].copy_from_slice(&(body as u64).to_le_bytes());
        }
    }
}

/// `pickle.dumps((parent, tuple(tokens), extra), protocol=5)`.
pub fn pickle_block(out: &mut Vec<u8>, parent: &ChainValue, tokens: &[u32], extra: Option<&[PyValue]>) {
    let mut p = Pickler::new(out);
    p.chain_value(parent);
    p.int_tuple(tokens);
    match extra {
        None => p.none(),
        Some(items) => {
            p.tuple_begin(items.len());
            for it in items {
                p.value(it);
            }
            p.tuple_end(items.len());
        }
    }
    p.tuple_end(3);
    p.finish();
}

/// `pickle.dumps(s, protocol=5)` for the PYTHONHASHSEED string.
pub fn pickle_str(out: &mut Vec<u8>, s: &str) {
    let mut p = Pickler::new(out);
    p.str(s);
    p.finish();
}

// ---------------------------------------------------------------------------------
// Canonical CBOR
// ---------------------------------------------------------------------------------

fn cbor_value(e: &mut Encoder<&mut Vec<u8>>, v: &PyValue) {
    // Writing into a Vec cannot fail: the error type is Infallible.
    let _ = match v {
        PyValue::Int(i) => e.i64(*i).map(|_| ()),
        PyValue::Str(s) => e.str(s).map(|_| ()),
        PyValue::Tag(s) => e.str(s).map(|_| ()),
        PyValue::Bytes(b) => e.bytes(b).map(|_| ()),
        PyValue::Tuple(items) => {
            let _ = e.array(items.len() as u64);
            for it in items {
                cbor_value(e, it);
            }
            Ok(())
        }
    };
}

/// Why a value cannot be CBOR-encoded the way vLLM would.
#[derive(Debug)]
pub struct UnsupportedCbor;

/// `cbor2.dumps((parent, tuple(tokens), extra), canonical=True)`.
pub fn cbor_block(
    out: &mut Vec<u8>,
    parent: &ChainValue,
    tokens: &[u32],
    extra: Option<&[PyValue]>,
) -> Result<(), UnsupportedCbor> {
    let mut e = Encoder::new(out);
    let _ = e.array(3);
    let _ = match parent {
        ChainValue::Bytes { buf, len } => e.bytes(&buf[..*len as usize]).map(|_| ()),
        ChainValue::U64(x) => e.u64(*x).map(|_| ()),
        ChainValue::I64(x) => e.i64(*x).map(|_| ()),
        ChainValue::BigUint(_) => return Err(UnsupportedCbor),
    };
    let _ = e.array(tokens.len() as u64);
    for &t in tokens {
        let _ = e.u32(t);
    }
    match extra {
        None => {
            let _ = e.null();
        }
        Some(items) => {
            let _ = e.array(items.len() as u64);
            for it in items {
                cbor_value(&mut e, it);
            }
        }
    }
    Ok(())
}

/// `cbor2.dumps(s, canonical=True)` for the PYTHONHASHSEED string.
pub fn cbor_str(out: &mut Vec<u8>, s: &str) {
    let _ = Encoder::new(out).str(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickle_seed_matches_cpython() {
        let mut v = Vec::new();
        pickle_str(&mut v, "0");
        assert_eq!(hex::encode(&v), "80059505000000000000008c0130942e");
    }

    #[test]
    fn pickle_ints_pick_cpython_opcodes() {
        let enc = |x: i128| {
            let mut v = Vec::new();
            let mut p = Pickler::new(&mut v);
            p.int(x);
            hex::encode(&v[FRAME_HEADER..])
        };
        assert_eq!(enc(255), "4bff");
        assert_eq!(enc(256), "4d0001");
        assert_eq!(enc(65536), "4a00000100");
        assert_eq!(enc(-12), "4af4ffffff");
        assert_eq!(enc(2147483648), "8a050000008000");
        assert_eq!(enc(4294967295), "8a05ffffffff00");
        assert_eq!(enc(-2147483649), "8a05ffffff7fff");
        assert_eq!(enc(-(1i128 << 40)), "8a060000000000ff");
    }

    #[test]
    fn repeated_tag_is_a_memo_reference() {
        let mut v = Vec::new();
        let extra = [
            PyValue::Tuple(vec![PyValue::Tag("mm"), PyValue::Str("a".into()), PyValue::Int(0)]),
            PyValue::Tuple(vec![PyValue::Tag("mm"), PyValue::Str("b".into()), PyValue::Int(4)]),
        ];
        pickle_block(&mut v, &ChainValue::from_digest(&[7u8; 32]), &[1], Some(&extra));
        // memo: 0 parent, 1 tokens, 2 "mm", 3 "a", 4 tuple, then "mm" again = BINGET 2.
        let h = hex::encode(&v);
        assert!(h.contains("8c026d6d948c016194"), "{h}");
        assert!(h.contains("68028c016294"), "{h}");
    }
}
