//! # kvroute-events — vLLM KV-cache events (event → …)
//!
//! Owns the wire format of vLLM's KV-cache events: the msgpack `KVEventBatch` that is the
//! third frame of every ZMQ message a vLLM server publishes. [`decode_batch`] accepts every
//! shape vLLM 0.9 → 0.33 has produced (positional-array and map events, array or map
//! envelope, with or without `data_parallel_rank`, int/int64/bytes hashes) and reports
//! malformed input as a [`DecodeError`], never a panic. [`encode_batch`] writes the same
//! bytes vLLM does, in either [`WireFormat`].
//!
//! Conformance against vLLM's own payloads: `tests/conformance.rs` reads
//! `../shared/vectors/vllm_kv_events.json`.

mod decode;
mod encode;
mod model;

pub use decode::{decode_batch, DecodeError};
pub use encode::{encode_batch, encode_batch_into, WireFormat};
pub use model::{BlockRemoved, BlockStored, EventBatch, KvEvent, Value};
