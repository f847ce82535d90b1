//! Conformance with vLLM's own KV-event payloads: `../shared/vectors/vllm_kv_events.json`
//! (made by vLLM 0.9.2 … 0.33.0's real BlockPool, msgspec structs and ZMQ publisher).

use std::path::PathBuf;

use kvroute_events::{decode_batch, encode_batch, DecodeError, EventBatch, WireFormat};
use serde_json::Value as J;

fn load() -> J {
    let dir = std::env::var("KVROUTE_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors"));
    let path = dir.join("vllm_kv_events.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {} ({e}); set KVROUTE_VECTORS", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A recorded hash (int, negative int or `{"bytes_hex"}`) as the u64 kvroute keys on.
fn hash_u64(v: &J) -> Option<u64> {
    if let Some(h) = v.get("bytes_hex").and_then(J::as_str) {
        let b = hex::decode(h).unwrap();
        return Some(kvroute_keys_low64(&b));
    }
    v.as_u64().or_else(|| v.as_i64().map(|x| x as u64))
}

fn kvroute_keys_low64(b: &[u8]) -> u64 {
    b[b.len().saturating_sub(8)..].iter().fold(0, |a, &x| (a << 8) | x as u64)
}

/// Asserts our decoded batch equals vLLM's typed field values.
fn check(ctx: &str, ours: &EventBatch, fields: &J, rank: Option<i64>, ts: f64) {
    let ours_json = serde_json::to_value(ours).unwrap();
    assert_eq!(ours.ts, ts, "{ctx}: ts");
    assert_eq!(ours.data_parallel_rank, rank, "{ctx}: data_parallel_rank");
    let want = fields["events"].as_array().unwrap();
    assert_eq!(ours.events.len(), want.len(), "{ctx}: event count");
    for (i, (o, w)) in ours_json["events"].as_array().unwrap().iter().zip(want).enumerate() {
        assert_eq!(o["type"], w["__type__"], "{ctx} event {i}: type");
        for (name, wv) in w.as_object().unwrap() {
            if name == "__type__" {
                continue;
            }
            let ov = &o[name];
            match name.as_str() {
                "block_hashes" => {
                    let wants: Vec<u64> = wv.as_array().unwrap().iter().map(|h| hash_u64(h).unwrap()).collect();
                    let got: Vec<u64> = ov.as_array().unwrap().iter().map(|h| h.as_u64().unwrap()).collect();
                    assert_eq!(got, wants, "{ctx} event {i}: block_hashes");
                }
                "parent_block_hash" => assert_eq!(ov.as_u64(), hash_u64(wv), "{ctx} event {i}: parent"),
                _ => assert_eq!(ov, wv, "{ctx} event {i}: field {name}"),
            }
        }
    }
}

#[test]
fn every_vllm_event_payload_decodes_to_the_recorded_fields() {
    let doc = load();
    let ts = doc["fixed_ts"].as_f64().unwrap();
    let (mut payloads, mut events, mut reencoded, mut not_encodable) = (0, 0, 0, 0);
    for (ver, v) in doc["versions"].as_object().unwrap() {
        for sc in v["scenarios"].as_array().unwrap() {
            let env = &sc["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"];
            for b in sc["batches"].as_array().unwrap() {
                let ctx = format!("vLLM {ver} {} env={env} {}", sc["algo"], b["name"]);
                let Some(hex_payload) = b.get("payload_hex").and_then(J::as_str) else {
                    // vLLM itself failed here (256-bit sha256 ints, the ≤0.11.0 LoRA bug):
                    // nothing was published, so there is nothing to decode.
                    assert!(b.get("encode_error").is_some() || b.get("error").is_some(), "{ctx}");
                    not_encodable += 1;
                    continue;
                };
                for (key, rank) in [("payload_hex", None), ("payload_hex_with_dp_rank_0", Some(0))] {
                    let bytes = hex::decode(b[key].as_str().unwrap()).unwrap();
                    let batch = decode_batch(&bytes).unwrap_or_else(|e| panic!("{ctx} {key}: {e}"));
                    check(&format!("{ctx} {key}"), &batch, &b["fields"], rank, ts);
                    payloads += 1;
                    events += batch.events.len();
                    // Byte-exact re-encoding for the two layouts we publish.
                    let fmt = match ver.as_str() {
                        "0.23.0" => Some(WireFormat::Array),
                        "0.33.0" => Some(WireFormat::Map),
                        _ => None,
                    };
                    if let (Some(fmt), false) = (fmt, env == 0) {
                        assert_eq!(
                            hex::encode(encode_batch(&batch, fmt)),
                            b[key].as_str().unwrap(),
                            "{ctx} {key}: re-encode"
                        );
                        reencoded += 1;
                    }
                }
                let _ = hex_payload;
            }
        }
    }
    println!(
        "event conformance: {payloads} payloads decoded ({events} events) to vLLM's field values, \
         {reencoded} re-encoded byte-exact; {not_encodable} scenarios where vLLM itself published nothing; 0 skipped"
    );
    assert!(payloads >= 300 && reencoded >= 30);
}

#[test]
fn recorded_zmq_frames_decode() {
    let doc = load();
    for (ver, f) in doc["frames"].as_object().unwrap() {
        let published = f["published_batches"].as_array().unwrap();
        let live = f["live_frames_hex"].as_array().unwrap();
        assert_eq!(live.len(), published.len());
        for (i, (frames, want)) in live.iter().zip(published).enumerate() {
            let frames: Vec<Vec<u8>> =
                frames.as_array().unwrap().iter().map(|x| hex::decode(x.as_str().unwrap()).unwrap()).collect();
            assert_eq!(frames[0], f["topic"].as_str().unwrap().as_bytes());
            assert_eq!(u64::from_be_bytes(frames[1].as_slice().try_into().unwrap()), i as u64);
            let batch = decode_batch(&frames[2]).unwrap();
            check(
                &format!("{ver} live {i}"),
                &batch,
                want,
                want["data_parallel_rank"].as_i64(),
                want["ts"].as_f64().unwrap(),
            );
        }
        // Replay replies: the payload is the last frame, the end marker has an empty one.
        for reply in f["replay_reply_frames_hex_received_by_DEALER"].as_array().unwrap() {
            let frames: Vec<Vec<u8>> =
                reply.as_array().unwrap().iter().map(|x| hex::decode(x.as_str().unwrap()).unwrap()).collect();
            let payload = frames.last().unwrap();
            let seq = &frames[frames.len() - 2];
            if seq.as_slice() == [0xff; 8] {
                assert!(payload.is_empty());
                assert!(decode_batch(payload).is_err());
            } else {
                decode_batch(payload).unwrap();
            }
        }
    }
}

#[test]
fn every_truncation_of_every_payload_is_an_error_not_a_panic() {
    let doc = load();
    let mut n = 0;
    for v in doc["versions"].as_object().unwrap().values() {
        for sc in v["scenarios"].as_array().unwrap() {
            for b in sc["batches"].as_array().unwrap() {
                let Some(h) = b.get("payload_hex_with_dp_rank_0").and_then(J::as_str) else { continue };
                let bytes = hex::decode(h).unwrap();
                for cut in 0..bytes.len() {
                    assert!(decode_batch(&bytes[..cut]).is_err(), "prefix of {cut} bytes decoded");
                    n += 1;
                }
                let mut longer = bytes.clone();
                longer.push(0xc0);
                assert_eq!(decode_batch(&longer), Err(DecodeError::Trailing(1)));
            }
        }
    }
    assert!(n > 10_000);
}
