//! Fuzzes the KV-event plane from the wire in: the input is cut into multipart ZMQ messages
//! (a frame count byte, then per frame a 2-byte length and its bytes), and each goes
//! through what a worker does with it — framing (`message_parts`), topic parsing, sequence
//! tracking, batch decoding and applying to an in-memory index in both key modes, with the
//! pod names interned under a cap. Nothing may panic; the index stays consistent (a
//! lookup after each message terminates and only names interned pods).
#![no_main]

use kvroute_events::decode_batch;
use kvroute_index::{BlockIndex, EventApplier, InMemoryIndex, IndexConfig, KeyMode, Pods};
use kvroute_ingest::{message_parts, parse_topic, SeqTracker, Verdict};
use kvroute_keys::RequestKeyer;
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

fn messages(mut data: &[u8]) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while let Some((&n, rest)) = data.split_first() {
        data = rest;
        let mut frames = Vec::new();
        for _ in 0..(n % 5) {
            if data.len() < 2 {
                break;
            }
            let len = u16::from_le_bytes([data[0], data[1]]) as usize;
            data = &data[2..];
            let take = len.min(data.len());
            frames.push(data[..take].to_vec());
            data = &data[take..];
        }
        out.push(frames);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let cfg = IndexConfig { capacity: 4096, shards: 4, ..Default::default() };
    let appliers = [
        EventApplier::new(InMemoryIndex::new(cfg.clone()), KeyMode::Engine),
        EventApplier::new(InMemoryIndex::new(cfg), KeyMode::Request(RequestKeyer::new(16, "0"))),
    ];
    let pods = Pods::new();
    let mut trackers: HashMap<String, SeqTracker> = HashMap::new();
    for frames in messages(data) {
        let Some((topic, seq, payload)) = message_parts(&frames) else { continue };
        let t = parse_topic(&topic);
        if pods.len() >= 8 && pods.get(t.pod).is_none() {
            continue; // the pod cap, as the guard keeps it
        }
        let Ok(pod) = pods.intern(t.pod) else { continue };
        let tracker = trackers.entry(t.pod.to_string()).or_default();
        let verdict = tracker.on_live(seq);
        let Ok(batch) = decode_batch(payload) else { continue };
        if matches!(verdict, Verdict::Backwards) {
            for a in &appliers {
                a.clear_pod(pod);
            }
            tracker.reset();
        }
        for a in &appliers {
            a.apply_seq(pod, t.model, seq, &batch);
        }
        tracker.seen(seq);
        tracker.applied(seq);
        for a in &appliers {
            let keys: Vec<u64> = (0..8).collect();
            a.index().prefix_lookup(&keys, &mut |_, e| e.iter().all(|x| (x.pod() as usize) < pods.len()));
            let _ = a.index().pod_entries(pod);
        }
    }
});
