//! A tolerant msgpack decoder for `KVEventBatch`.
//!
//! Accepts every shape vLLM has published: the batch as `[ts, events]` (0.9.0),
//! `[ts, events, dp_rank]` (≥ 0.9.2) or a map; each event as a tagged positional array
//! (≤ 0.23, any number of trailing fields) or as a map with a `"type"` key (≥ 0.24, any
//! header width, any key order, unknown keys skipped). Block hashes may be uint, int64
//! (bit-cast) or bin (last 8 bytes, big-endian). Any malformed input is an error value;
//! nothing panics and nothing allocates more than the input could justify.

use rmp::Marker;

use crate::model::{BlockRemoved, BlockStored, EventBatch, KvEvent, Value};

/// Elements reserved up front for a collection, whatever length it announces: a length is
/// only bounded by the bytes left (one per element), and an element in memory is far
/// bigger than one byte (a 16 MiB frame announcing 16 M events would reserve gigabytes).
const PREALLOC: usize = 1024;

/// Deepest nesting accepted inside generic values (extra keys, skipped fields).
const MAX_DEPTH: usize = 32;

/// Why a payload could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload ends early (needed {needed} more bytes at offset {at})")]
    Truncated { at: usize, needed: usize },
    #[error("at offset {at}: expected {expected}, found msgpack marker 0x{marker:02x}")]
    Unexpected { at: usize, expected: &'static str, marker: u8 },
    #[error("{event}: missing required field `{field}`")]
    MissingField { event: &'static str, field: &'static str },
    #[error("batch has no `{0}`")]
    MissingBatchField(&'static str),
    #[error("at offset {at}: {what} out of range")]
    OutOfRange { at: usize, what: &'static str },
    #[error("at offset {0}: invalid UTF-8 in a string")]
    Utf8(usize),
    #[error("at offset {0}: empty byte-string block hash")]
    EmptyHash(usize),
    #[error("values nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("{0} unexpected bytes after the batch")]
    Trailing(usize),
}

type Result<T> = std::result::Result<T, DecodeError>;

/// Decodes one msgpack `KVEventBatch` payload (the third ZMQ frame).
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch> {
    let mut r = Reader { buf: payload, pos: 0 };
    let batch = r.batch()?;
    if r.pos != payload.len() {
        return Err(DecodeError::Trailing(payload.len() - r.pos));
    }
    Ok(batch)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Integers as msgpack carries them.
enum Int {
    U(u64),
    I(i64),
}

#[derive(Clone, Copy)]
enum Field {
    BlockHashes,
    Parent,
    TokenIds,
    BlockSize,
    LoraId,
    Medium,
    LoraName,
    ExtraKeys,
    GroupIdx,
    SpecKind,
    SpecWindow,
    Locality,
    Ownership,
    SessionId,
    Lookahead,
}

const STORED_ORDER: [Field; 15] = [
    Field::BlockHashes,
    Field::Parent,
    Field::TokenIds,
    Field::BlockSize,
    Field::LoraId,
    Field::Medium,
    Field::LoraName,
    Field::ExtraKeys,
    Field::GroupIdx,
    Field::SpecKind,
    Field::SpecWindow,
    Field::Locality,
    Field::Ownership,
    Field::SessionId,
    Field::Lookahead,
];
const REMOVED_ORDER: [Field; 5] =
    [Field::BlockHashes, Field::Medium, Field::GroupIdx, Field::Locality, Field::Ownership];

fn field_by_name(name: &str) -> Option<Field> {
    Some(match name {
        "block_hashes" => Field::BlockHashes,
        "parent_block_hash" => Field::Parent,
        "token_ids" => Field::TokenIds,
        "block_size" => Field::BlockSize,
        "lora_id" => Field::LoraId,
        "medium" => Field::Medium,
        "lora_name" => Field::LoraName,
        "extra_keys" => Field::ExtraKeys,
        "group_idx" => Field::GroupIdx,
        "kv_cache_spec_kind" => Field::SpecKind,
        "kv_cache_spec_sliding_window" => Field::SpecWindow,
        "locality" => Field::Locality,
        "ownership" => Field::Ownership,
        "session_id" => Field::SessionId,
        "lookahead_token_ids" => Field::Lookahead,
        _ => return None,
    })
}

/// Every field any event type has, filled as they are found.
#[derive(Default)]
struct Fields {
    s: BlockStored,
    has_hashes: bool,
    has_tokens: bool,
    has_block_size: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Stored,
    Removed,
    Cleared,
    Unknown,
}

fn kind_of(tag: &str) -> Kind {
    match tag {
        "BlockStored" => Kind::Stored,
        "BlockRemoved" => Kind::Removed,
        "AllBlocksCleared" => Kind::Cleared,
        _ => Kind::Unknown,
    }
}

impl<'a> Reader<'a> {
    fn need(&self, n: usize) -> Result<()> {
        if self.buf.len() - self.pos < n {
            Err(DecodeError::Truncated { at: self.pos, needed: n - (self.buf.len() - self.pos) })
        } else {
            Ok(())
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        self.need(n)?;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64> {
        Ok(self.take(n)?.iter().fold(0u64, |a, &b| (a << 8) | b as u64))
    }

    fn peek(&self) -> Result<u8> {
        self.need(1)?;
        Ok(self.buf[self.pos])
    }

    fn marker(&mut self) -> Result<(usize, Marker)> {
        let at = self.pos;
        let b = self.take(1)?[0];
        Ok((at, Marker::from_u8(b)))
    }

    fn unexpected(at: usize, expected: &'static str, m: Marker) -> DecodeError {
        DecodeError::Unexpected { at, expected, marker: m.to_u8() }
    }

    /// Consumes a nil if one is next.
    fn nil(&mut self) -> Result<bool> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Element count, bounded by the bytes left (each element takes at least one).
    /// A length, checked against the bytes left (each element takes at least one).
    fn bounded(&self, n: u64) -> Result<usize> {
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(DecodeError::Truncated { at: self.pos, needed: n as usize });
        }
        Ok(n as usize)
    }

    fn array_len(&mut self) -> Result<usize> {
        let (at, m) = self.marker()?;
        let n = match m {
            Marker::FixArray(n) => n as u64,
            Marker::Array16 => self.be(2)?,
            Marker::Array32 => self.be(4)?,
            m => return Err(Self::unexpected(at, "an array", m)),
        };
        self.bounded(n)
    }

    /// `Some(len)` for a map, `None` (nothing consumed) for anything else.
    fn map_len_opt(&mut self) -> Result<Option<usize>> {
        let n = match Marker::from_u8(self.peek()?) {
            Marker::FixMap(n) => {
                self.pos += 1;
                n as u64
            }
            Marker::Map16 => {
                self.pos += 1;
                self.be(2)?
            }
            Marker::Map32 => {
                self.pos += 1;
                self.be(4)?
            }
            _ => return Ok(None),
        };
        // Each entry is at least two bytes.
        self.bounded(n.saturating_mul(2)).map(|_| Some(n as usize))
    }

    fn str_body(&mut self, at: usize, m: Marker) -> Result<&'a str> {
        let n = match m {
            Marker::FixStr(n) => n as usize,
            Marker::Str8 => self.be(1)? as usize,
            Marker::Str16 => self.be(2)? as usize,
            Marker::Str32 => self.be(4)? as usize,
            m => return Err(Self::unexpected(at, "a string", m)),
        };
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::Utf8(at))
    }

    fn str(&mut self) -> Result<&'a str> {
        let (at, m) = self.marker()?;
        self.str_body(at, m)
    }

    fn opt_string(&mut self) -> Result<Option<String>> {
        if self.nil()? {
            return Ok(None);
        }
        Ok(Some(self.str()?.to_owned()))
    }

    fn int_body(&mut self, at: usize, m: Marker, expected: &'static str) -> Result<Int> {
        Ok(match m {
            Marker::FixPos(v) => Int::U(v as u64),
            Marker::U8 => Int::U(self.be(1)?),
            Marker::U16 => Int::U(self.be(2)?),
            Marker::U32 => Int::U(self.be(4)?),
            Marker::U64 => Int::U(self.be(8)?),
            Marker::FixNeg(v) => Int::I(v as i64),
            Marker::I8 => Int::I(self.be(1)? as u8 as i8 as i64),
            Marker::I16 => Int::I(self.be(2)? as u16 as i16 as i64),
            Marker::I32 => Int::I(self.be(4)? as u32 as i32 as i64),
            Marker::I64 => Int::I(self.be(8)? as i64),
            m => return Err(Self::unexpected(at, expected, m)),
        })
    }

    fn i64(&mut self) -> Result<i64> {
        let (at, m) = self.marker()?;
        match self.int_body(at, m, "an integer")? {
            Int::I(v) => Ok(v),
            Int::U(v) => i64::try_from(v).map_err(|_| DecodeError::OutOfRange { at, what: "integer" }),
        }
    }

    fn opt_i64(&mut self) -> Result<Option<i64>> {
        if self.nil()? {
            return Ok(None);
        }
        self.i64().map(Some)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let (at, m) = self.marker()?;
        // Fast path: token ids are almost always positive fixints or uint16.
        if let Marker::FixPos(v) = m {
            return Ok(v as u32);
        }
        match self.int_body(at, m, "an unsigned integer")? {
            Int::U(v) => u32::try_from(v).map_err(|_| DecodeError::OutOfRange { at, what }),
            Int::I(v) => u32::try_from(v).map_err(|_| DecodeError::OutOfRange { at, what }),
        }
    }

    fn u32_list(&mut self, what: &'static str) -> Result<Vec<u32>> {
        let n = self.array_len()?;
        let mut v = Vec::with_capacity(n.min(PREALLOC));
        for _ in 0..n {
            v.push(self.u32(what)?);
        }
        Ok(v)
    }

    /// A block hash: uint, int64 (bit-cast) or bin (last 8 bytes, big-endian).
    fn hash(&mut self) -> Result<u64> {
        let (at, m) = self.marker()?;
        let n = match m {
            Marker::Bin8 => self.be(1)? as usize,
            Marker::Bin16 => self.be(2)? as usize,
            Marker::Bin32 => self.be(4)? as usize,
            m => {
                return Ok(match self.int_body(at, m, "a block hash (int or bytes)")? {
                    Int::U(v) => v,
                    Int::I(v) => v as u64,
                })
            }
        };
        if n == 0 {
            return Err(DecodeError::EmptyHash(at));
        }
        let b = self.take(n)?;
        Ok(b[n.saturating_sub(8)..].iter().fold(0u64, |a, &x| (a << 8) | x as u64))
    }

    fn opt_hash(&mut self) -> Result<Option<u64>> {
        if self.nil()? {
            return Ok(None);
        }
        self.hash().map(Some)
    }

    fn hash_list(&mut self) -> Result<Vec<u64>> {
        let n = self.array_len()?;
        let mut v = Vec::with_capacity(n.min(PREALLOC));
        for _ in 0..n {
            v.push(self.hash()?);
        }
        Ok(v)
    }

    fn f64(&mut self) -> Result<f64> {
        let (at, m) = self.marker()?;
        match m {
            Marker::F64 => Ok(f64::from_bits(self.be(8)?)),
            Marker::F32 => Ok(f32::from_bits(self.be(4)? as u32) as f64),
            m => match self.int_body(at, m, "a timestamp")? {
                Int::U(v) => Ok(v as f64),
                Int::I(v) => Ok(v as f64),
            },
        }
    }

    /// Any value, kept (for `extra_keys`).
    fn value(&mut self, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let (at, m) = self.marker()?;
        Ok(match m {
            Marker::Null => Value::Nil,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::F32 => Value::Float(f32::from_bits(self.be(4)? as u32) as f64),
            Marker::F64 => Value::Float(f64::from_bits(self.be(8)?)),
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                Value::Str(self.str_body(at, m)?.to_owned())
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = match m {
                    Marker::Bin8 => self.be(1)?,
                    Marker::Bin16 => self.be(2)?,
                    _ => self.be(4)?,
                } as usize;
                Value::Bin(self.take(n)?.to_vec())
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                self.pos = at;
                let n = self.array_len()?;
                let mut items = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                self.pos = at;
                let n = self.map_len_opt()?.unwrap_or(0);
                let mut kv = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    let k = self.value(depth + 1)?;
                    kv.push((k, self.value(depth + 1)?));
                }
                Value::Map(kv)
            }
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32 => {
                let n = match m {
                    Marker::FixExt1 => 1,
                    Marker::FixExt2 => 2,
                    Marker::FixExt4 => 4,
                    Marker::FixExt8 => 8,
                    Marker::FixExt16 => 16,
                    Marker::Ext8 => self.be(1)? as usize,
                    Marker::Ext16 => self.be(2)? as usize,
                    _ => self.be(4)? as usize,
                };
                Value::Bin(self.take(n + 1)?.to_vec()) // type byte + data
            }
            Marker::Reserved => return Err(Self::unexpected(at, "a msgpack value", m)),
            m => match self.int_body(at, m, "a value")? {
                Int::U(v) => Value::UInt(v),
                Int::I(v) => Value::Int(v),
            },
        })
    }

    fn skip(&mut self) -> Result<()> {
        self.value(0).map(|_| ())
    }

    fn extra_keys(&mut self) -> Result<Option<Vec<Option<Value>>>> {
        if self.nil()? {
            return Ok(None);
        }
        let n = self.array_len()?;
        let mut v = Vec::with_capacity(n.min(PREALLOC));
        for _ in 0..n {
            v.push(if self.nil()? { None } else { Some(self.value(1)?) });
        }
        Ok(Some(v))
    }

    fn lookahead(&mut self) -> Result<Option<Vec<Vec<u32>>>> {
        if self.nil()? {
            return Ok(None);
        }
        let n = self.array_len()?;
        let mut v = Vec::with_capacity(n.min(PREALLOC));
        for _ in 0..n {
            v.push(self.u32_list("lookahead token id")?);
        }
        Ok(Some(v))
    }

    fn field(&mut self, f: Field, out: &mut Fields) -> Result<()> {
        let s = &mut out.s;
        match f {
            Field::BlockHashes => {
                s.block_hashes = self.hash_list()?;
                out.has_hashes = true;
            }
            Field::Parent => s.parent_block_hash = self.opt_hash()?,
            Field::TokenIds => {
                s.token_ids = if self.nil()? { Vec::new() } else { self.u32_list("token id")? };
                out.has_tokens = true;
            }
            Field::BlockSize => {
                s.block_size = self.u32("block_size")?;
                out.has_block_size = true;
            }
            Field::LoraId => s.lora_id = self.opt_i64()?,
            Field::Medium => s.medium = self.opt_string()?,
            Field::LoraName => s.lora_name = self.opt_string()?,
            Field::ExtraKeys => s.extra_keys = self.extra_keys()?,
            Field::GroupIdx => s.group_idx = self.opt_i64()?,
            Field::SpecKind => s.kv_cache_spec_kind = self.opt_string()?,
            Field::SpecWindow => s.kv_cache_spec_sliding_window = self.opt_i64()?,
            Field::Locality => s.locality = self.opt_string()?,
            Field::Ownership => s.ownership = self.opt_string()?,
            Field::SessionId => s.session_id = self.opt_string()?,
            Field::Lookahead => s.lookahead_token_ids = self.lookahead()?,
        }
        Ok(())
    }

    fn finish(kind: Kind, f: Fields) -> Result<Option<KvEvent>> {
        Ok(Some(match kind {
            Kind::Stored => {
                let req = |ok: bool, field| {
                    if ok {
                        Ok(())
                    } else {
                        Err(DecodeError::MissingField { event: "BlockStored", field })
                    }
                };
                req(f.has_hashes, "block_hashes")?;
                req(f.has_tokens, "token_ids")?;
                req(f.has_block_size, "block_size")?;
                KvEvent::BlockStored(f.s)
            }
            Kind::Removed => {
                if !f.has_hashes {
                    return Err(DecodeError::MissingField { event: "BlockRemoved", field: "block_hashes" });
                }
                let s = f.s;
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: s.block_hashes,
                    medium: s.medium,
                    group_idx: s.group_idx,
                    locality: s.locality,
                    ownership: s.ownership,
                })
            }
            Kind::Cleared => KvEvent::AllBlocksCleared,
            Kind::Unknown => return Ok(None),
        }))
    }

    /// One event; `None` for an unknown event type (its body is skipped).
    fn event(&mut self) -> Result<Option<KvEvent>> {
        let mut f = Fields::default();
        if let Some(n) = self.map_len_opt()? {
            // Map form: {"type": tag, name: value, …} in any order.
            let mut kind = None;
            for _ in 0..n {
                let key = self.str()?;
                if key == "type" {
                    kind = Some(kind_of(self.str()?));
                } else if let Some(field) = field_by_name(key) {
                    self.field(field, &mut f)?;
                } else {
                    self.skip()?;
                }
            }
            let kind = kind.ok_or(DecodeError::MissingField { event: "event", field: "type" })?;
            return Self::finish(kind, f);
        }
        // Array form: [tag, f1, f2, …]; missing trailing fields are nil, extra ones skipped.
        let n = self.array_len()?;
        if n == 0 {
            return Err(DecodeError::MissingField { event: "event", field: "type" });
        }
        let kind = kind_of(self.str()?);
        let order: &[Field] = match kind {
            Kind::Stored => &STORED_ORDER,
            Kind::Removed => &REMOVED_ORDER,
            _ => &[],
        };
        for i in 0..n - 1 {
            match order.get(i) {
                Some(&field) => self.field(field, &mut f)?,
                None => self.skip()?,
            }
        }
        Self::finish(kind, f)
    }

    fn events(&mut self) -> Result<(Vec<KvEvent>, u32)> {
        let n = self.array_len()?;
        let mut v = Vec::with_capacity(n.min(PREALLOC));
        let mut unknown = 0;
        for _ in 0..n {
            match self.event()? {
                Some(e) => v.push(e),
                None => unknown += 1,
            }
        }
        Ok((v, unknown))
    }

    fn batch(&mut self) -> Result<EventBatch> {
        let (mut ts, mut events, mut rank, mut unknown) = (None, None, None, 0);
        if let Some(n) = self.map_len_opt()? {
            for _ in 0..n {
                match self.str()? {
                    "ts" => ts = Some(self.f64()?),
                    "events" => {
                        let (e, u) = self.events()?;
                        events = Some(e);
                        unknown = u;
                    }
                    "data_parallel_rank" => rank = self.opt_i64()?,
                    _ => self.skip()?,
                }
            }
        } else {
            let n = self.array_len()?;
            for i in 0..n {
                match i {
                    0 => ts = Some(self.f64()?),
                    1 => {
                        let (e, u) = self.events()?;
                        events = Some(e);
                        unknown = u;
                    }
                    2 => rank = self.opt_i64()?,
                    _ => self.skip()?,
                }
            }
        }
        Ok(EventBatch {
            ts: ts.ok_or(DecodeError::MissingBatchField("ts"))?,
            events: events.ok_or(DecodeError::MissingBatchField("events"))?,
            data_parallel_rank: rank,
            unknown_events: unknown,
        })
    }
}
