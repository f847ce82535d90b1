//! Fuzzes the KV-event decoder: it must never panic, and whatever it accepts must
//! re-encode to a payload that decodes to the same thing (a fixpoint after one round).
#![no_main]

use kvroute_events::{decode_batch, encode_batch, WireFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode_batch(data) {
        for fmt in [WireFormat::Map, WireFormat::Array] {
            let once = encode_batch(&batch, fmt);
            let again = decode_batch(&once).expect("our own encoding decodes");
            assert_eq!(encode_batch(&again, fmt), once, "encode/decode fixpoint");
        }
    }
});
