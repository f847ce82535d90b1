//! The decoded event model, with vLLM's own field names.

use serde::{Serialize, Serializer};

/// One `KVEventBatch`: the events of one engine step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventBatch {
    pub ts: f64,
    pub events: Vec<KvEvent>,
    /// Set by the publisher to its data-parallel rank (nil before 0.9.2 or when unset).
    pub data_parallel_rank: Option<i64>,
    /// Events of a type this decoder does not know (skipped, not an error).
    #[serde(skip_serializing_if = "is_zero")]
    pub unknown_events: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A KV-cache event. Serialises as `{"type": "<name>", …fields}` like vLLM's map form.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    AllBlocksCleared,
}

/// Blocks that became full and cached. Hashes are the u64 vLLM publishes by default
/// (int hashes as is, negative ones bit-cast, byte hashes → last 8 bytes big-endian).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BlockStored {
    pub block_hashes: Vec<u64>,
    pub parent_block_hash: Option<u64>,
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    pub extra_keys: Option<Vec<Option<Value>>>,
    pub group_idx: Option<i64>,
    pub kv_cache_spec_kind: Option<String>,
    pub kv_cache_spec_sliding_window: Option<i64>,
    pub locality: Option<String>,
    pub ownership: Option<String>,
    pub session_id: Option<String>,
    pub lookahead_token_ids: Option<Vec<Vec<u32>>>,
}

/// Blocks evicted from a cache tier.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BlockRemoved {
    pub block_hashes: Vec<u64>,
    pub medium: Option<String>,
    pub group_idx: Option<i64>,
    pub locality: Option<String>,
    pub ownership: Option<String>,
}

/// A generic msgpack value (used for `extra_keys`, whose shape varies by vLLM era).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Value::Nil => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Float(f) => s.serialize_f64(*f),
            Value::Str(x) => s.serialize_str(x),
            Value::Bin(b) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("bytes_hex", &hex::encode(b))?;
                m.end()
            }
            Value::Array(items) => {
                let mut q = s.serialize_seq(Some(items.len()))?;
                for it in items {
                    q.serialize_element(it)?;
                }
                q.end()
            }
            Value::Map(kv) => {
                let mut m = s.serialize_map(Some(kv.len()))?;
                for (k, v) in kv {
                    match k {
                        Value::Str(ks) => m.serialize_entry(ks, v)?,
                        other => m.serialize_entry(&format!("{other:?}"), v)?,
                    }
                }
                m.end()
            }
        }
    }
}
