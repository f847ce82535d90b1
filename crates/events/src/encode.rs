//! Encodes `KVEventBatch` payloads byte-for-byte as vLLM's msgspec encoder does, in the
//! two wire shapes vLLM has used (the simulator publishes with this; tests round-trip
//! vLLM's own payloads through it).

use rmp::encode as enc;

use crate::model::{BlockRemoved, BlockStored, EventBatch, KvEvent, Value};

/// Which vLLM event layout to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WireFormat {
    /// vLLM ≤ 0.23: events are tagged positional arrays with every field of 0.22/0.23
    /// (`BlockStored` has 11 fields, `BlockRemoved` 3).
    Array,
    /// vLLM ≥ 0.24 (as 0.33 writes it): events are maps with a `"type"` key; fields
    /// with a default are left out when nil; `BlockStored` uses a map16 header.
    #[default]
    Map,
}

// Writing into a Vec<u8> cannot fail; the results below are therefore ignored.
fn uint(out: &mut Vec<u8>, v: u64) {
    let _ = enc::write_uint(out, v);
}
fn int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        uint(out, v as u64)
    } else {
        let _ = enc::write_sint(out, v);
    }
}
fn str(out: &mut Vec<u8>, s: &str) {
    let _ = enc::write_str(out, s);
}
fn nil(out: &mut Vec<u8>) {
    enc::write_nil(out).ok();
}
fn array(out: &mut Vec<u8>, n: usize) {
    let _ = enc::write_array_len(out, n as u32);
}
fn opt_str(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        Some(s) => str(out, s),
        None => nil(out),
    }
}
fn opt_int(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => int(out, v),
        None => nil(out),
    }
}
fn u32s(out: &mut Vec<u8>, v: &[u32]) {
    array(out, v.len());
    for &t in v {
        uint(out, t as u64);
    }
}
fn hashes(out: &mut Vec<u8>, v: &[u64]) {
    array(out, v.len());
    for &h in v {
        uint(out, h);
    }
}

pub(crate) fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Nil => nil(out),
        Value::Bool(b) => {
            let _ = enc::write_bool(out, *b);
        }
        Value::Int(i) => int(out, *i),
        Value::UInt(u) => uint(out, *u),
        Value::Float(f) => {
            let _ = enc::write_f64(out, *f);
        }
        Value::Str(s) => str(out, s),
        Value::Bin(b) => {
            let _ = enc::write_bin(out, b);
        }
        Value::Array(items) => {
            array(out, items.len());
            items.iter().for_each(|i| value(out, i));
        }
        Value::Map(kv) => {
            let _ = enc::write_map_len(out, kv.len() as u32);
            for (k, x) in kv {
                value(out, k);
                value(out, x);
            }
        }
    }
}

fn extra_keys(out: &mut Vec<u8>, e: &Option<Vec<Option<Value>>>) {
    match e {
        None => nil(out),
        Some(items) => {
            array(out, items.len());
            for it in items {
                match it {
                    Some(v) => value(out, v),
                    None => nil(out),
                }
            }
        }
    }
}

fn stored_array(out: &mut Vec<u8>, s: &BlockStored) {
    array(out, 12);
    str(out, "BlockStored");
    hashes(out, &s.block_hashes);
    match s.parent_block_hash {
        Some(p) => uint(out, p),
        None => nil(out),
    }
    u32s(out, &s.token_ids);
    uint(out, s.block_size as u64);
    opt_int(out, s.lora_id);
    opt_str(out, &s.medium);
    opt_str(out, &s.lora_name);
    extra_keys(out, &s.extra_keys);
    opt_int(out, s.group_idx);
    opt_str(out, &s.kv_cache_spec_kind);
    opt_int(out, s.kv_cache_spec_sliding_window);
}

fn stored_map(out: &mut Vec<u8>, s: &BlockStored) {
    let optional = [
        s.extra_keys.is_some(),
        s.group_idx.is_some(),
        s.kv_cache_spec_kind.is_some(),
        s.kv_cache_spec_sliding_window.is_some(),
        s.locality.is_some(),
        s.ownership.is_some(),
        s.session_id.is_some(),
        s.lookahead_token_ids.is_some(),
    ];
    let n = 8 + optional.iter().filter(|&&x| x).count();
    // msgspec sizes the header for the most entries the struct can have (16): map16.
    out.push(0xde);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    str(out, "type");
    str(out, "BlockStored");
    str(out, "block_hashes");
    hashes(out, &s.block_hashes);
    str(out, "parent_block_hash");
    match s.parent_block_hash {
        Some(p) => uint(out, p),
        None => nil(out),
    }
    str(out, "token_ids");
    u32s(out, &s.token_ids);
    str(out, "block_size");
    uint(out, s.block_size as u64);
    str(out, "lora_id");
    opt_int(out, s.lora_id);
    str(out, "medium");
    opt_str(out, &s.medium);
    str(out, "lora_name");
    opt_str(out, &s.lora_name);
    if s.extra_keys.is_some() {
        str(out, "extra_keys");
        extra_keys(out, &s.extra_keys);
    }
    let opt_ints = [("group_idx", s.group_idx)];
    for (k, v) in opt_ints {
        if let Some(v) = v {
            str(out, k);
            int(out, v);
        }
    }
    if let Some(k) = &s.kv_cache_spec_kind {
        str(out, "kv_cache_spec_kind");
        str(out, k);
    }
    if let Some(w) = s.kv_cache_spec_sliding_window {
        str(out, "kv_cache_spec_sliding_window");
        int(out, w);
    }
    for (k, v) in [("locality", &s.locality), ("ownership", &s.ownership), ("session_id", &s.session_id)] {
        if let Some(v) = v {
            str(out, k);
            str(out, v);
        }
    }
    if let Some(l) = &s.lookahead_token_ids {
        str(out, "lookahead_token_ids");
        array(out, l.len());
        l.iter().for_each(|x| u32s(out, x));
    }
}

fn removed(out: &mut Vec<u8>, r: &BlockRemoved, fmt: WireFormat) {
    match fmt {
        WireFormat::Array => {
            array(out, 4);
            str(out, "BlockRemoved");
            hashes(out, &r.block_hashes);
            opt_str(out, &r.medium);
            opt_int(out, r.group_idx);
        }
        WireFormat::Map => {
            let n =
                3 + [r.group_idx.is_some(), r.locality.is_some(), r.ownership.is_some()].iter().filter(|&&x| x).count();
            let _ = enc::write_map_len(out, n as u32);
            str(out, "type");
            str(out, "BlockRemoved");
            str(out, "block_hashes");
            hashes(out, &r.block_hashes);
            str(out, "medium");
            opt_str(out, &r.medium);
            if let Some(g) = r.group_idx {
                str(out, "group_idx");
                int(out, g);
            }
            for (k, v) in [("locality", &r.locality), ("ownership", &r.ownership)] {
                if let Some(v) = v {
                    str(out, k);
                    str(out, v);
                }
            }
        }
    }
}

/// Appends one encoded `KVEventBatch` to `out`.
pub fn encode_batch_into(out: &mut Vec<u8>, batch: &EventBatch, fmt: WireFormat) {
    array(out, 3);
    let _ = enc::write_f64(out, batch.ts);
    array(out, batch.events.len());
    for e in &batch.events {
        match (e, fmt) {
            (KvEvent::BlockStored(s), WireFormat::Array) => stored_array(out, s),
            (KvEvent::BlockStored(s), WireFormat::Map) => stored_map(out, s),
            (KvEvent::BlockRemoved(r), f) => removed(out, r, f),
            (KvEvent::AllBlocksCleared, WireFormat::Array) => {
                array(out, 1);
                str(out, "AllBlocksCleared");
            }
            (KvEvent::AllBlocksCleared, WireFormat::Map) => {
                let _ = enc::write_map_len(out, 1);
                str(out, "type");
                str(out, "AllBlocksCleared");
            }
        }
    }
    opt_int(out, batch.data_parallel_rank);
}

/// Encodes one `KVEventBatch`.
pub fn encode_batch(batch: &EventBatch, fmt: WireFormat) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    encode_batch_into(&mut out, batch, fmt);
    out
}
