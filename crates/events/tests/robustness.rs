//! Tolerance and robustness of the decoder beyond vLLM's recorded payloads.

use kvroute_events::{
    decode_batch, encode_batch, BlockRemoved, BlockStored, DecodeError, EventBatch, KvEvent, Value, WireFormat,
};
use proptest::prelude::*;
use rmp::encode as e;

fn s(out: &mut Vec<u8>, x: &str) {
    e::write_str(out, x).unwrap();
}

#[test]
fn map_events_in_any_key_order_with_unknown_keys_and_a_map_envelope() {
    let mut p = Vec::new();
    e::write_map_len(&mut p, 4).unwrap();
    s(&mut p, "future_field");
    e::write_array_len(&mut p, 2).unwrap();
    e::write_nil(&mut p).unwrap();
    e::write_map_len(&mut p, 0).unwrap();
    s(&mut p, "events");
    e::write_array_len(&mut p, 2).unwrap();
    e::write_map_len(&mut p, 5).unwrap();
    s(&mut p, "token_ids");
    e::write_array_len(&mut p, 2).unwrap();
    e::write_uint(&mut p, 7).unwrap();
    e::write_uint(&mut p, 70000).unwrap();
    s(&mut p, "block_size");
    e::write_uint(&mut p, 2).unwrap();
    s(&mut p, "brand_new");
    e::write_f64(&mut p, 1.5).unwrap();
    s(&mut p, "block_hashes");
    e::write_array_len(&mut p, 1).unwrap();
    e::write_bin(&mut p, &[1, 2, 3]).unwrap(); // short bytes hash: left-padded
    s(&mut p, "type");
    s(&mut p, "BlockStored");
    e::write_map_len(&mut p, 1).unwrap();
    s(&mut p, "type");
    s(&mut p, "BlockUpdated"); // unknown event type: skipped and counted
    s(&mut p, "data_parallel_rank");
    e::write_uint(&mut p, 3).unwrap();
    s(&mut p, "ts");
    e::write_uint(&mut p, 12).unwrap();
    let b = decode_batch(&p).unwrap();
    assert_eq!(b.ts, 12.0);
    assert_eq!(b.data_parallel_rank, Some(3));
    assert_eq!(b.unknown_events, 1);
    let KvEvent::BlockStored(st) = &b.events[0] else { panic!() };
    assert_eq!(st.block_hashes, vec![0x010203]);
    assert_eq!(st.token_ids, vec![7, 70000]);
    assert_eq!(st.parent_block_hash, None);
}

#[test]
fn positional_events_accept_missing_and_extra_trailing_fields() {
    let mut p = Vec::new();
    e::write_array_len(&mut p, 2).unwrap(); // vLLM 0.9.0: no dp rank
    e::write_f64(&mut p, 1.0).unwrap();
    e::write_array_len(&mut p, 2).unwrap();
    // BlockStored with 20 fields: everything known plus 5 unknown trailing ones.
    e::write_array_len(&mut p, 21).unwrap();
    s(&mut p, "BlockStored");
    e::write_array_len(&mut p, 1).unwrap();
    e::write_sint(&mut p, -5).unwrap(); // builtin hashes can be negative: bit-cast
    e::write_uint(&mut p, 9).unwrap();
    e::write_array_len(&mut p, 0).unwrap();
    e::write_uint(&mut p, 16).unwrap();
    for _ in 0..16 {
        e::write_nil(&mut p).unwrap();
    }
    // BlockRemoved with only its hashes (0.9 layout).
    e::write_array_len(&mut p, 2).unwrap();
    s(&mut p, "BlockRemoved");
    e::write_array_len(&mut p, 1).unwrap();
    e::write_uint(&mut p, u64::MAX).unwrap();
    let b = decode_batch(&p).unwrap();
    assert_eq!(b.data_parallel_rank, None);
    let KvEvent::BlockStored(st) = &b.events[0] else { panic!() };
    assert_eq!(st.block_hashes, vec![(-5i64) as u64]);
    assert_eq!(st.parent_block_hash, Some(9));
    assert_eq!(b.events[1], KvEvent::BlockRemoved(BlockRemoved { block_hashes: vec![u64::MAX], ..Default::default() }));
}

#[test]
fn clear_errors_for_bad_input() {
    assert!(matches!(decode_batch(&[]), Err(DecodeError::Truncated { .. })));
    // A string where the events array should be.
    assert!(matches!(
        decode_batch(&[0x92, 0x00, 0xa1, b'x']),
        Err(DecodeError::Unexpected { expected: "an array", .. })
    ));
    // BlockStored without block_size.
    let mut p = vec![0x92, 0x00, 0x91, 0x83];
    s(&mut p, "type");
    s(&mut p, "BlockStored");
    s(&mut p, "block_hashes");
    p.push(0x90);
    s(&mut p, "token_ids");
    p.push(0x90);
    // (map declared 3 entries; only type + 2 fields given)
    assert_eq!(decode_batch(&p), Err(DecodeError::MissingField { event: "BlockStored", field: "block_size" }));
    // Token id beyond u32, array32 claiming 4 billion elements, deep nesting.
    assert!(matches!(decode_batch(&[0x92, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff]), Err(DecodeError::Truncated { .. })));
    let mut deep = vec![0x94, 0x00, 0x90, 0xc0]; // 4th envelope element: skipped, but bounded
    deep.extend(std::iter::repeat_n(0x91, 100));
    deep.push(0xc0);
    assert_eq!(decode_batch(&deep), Err(DecodeError::TooDeep));
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<i64>().prop_map(|i| if i < 0 { Value::Int(i) } else { Value::UInt(i as u64) }),
        "[a-z\\-]{0,12}".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 1..8).prop_map(Value::Bin),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| proptest::collection::vec(inner, 0..3).prop_map(Value::Array))
}

fn arb_event() -> impl Strategy<Value = KvEvent> {
    let stored = (
        proptest::collection::vec(any::<u64>(), 0..5),
        proptest::option::of(any::<u64>()),
        proptest::collection::vec(any::<u32>(), 0..40),
        1u32..300,
        proptest::option::of(any::<i64>()),
        proptest::option::of("[A-Z]{1,4}"),
        proptest::option::of(proptest::collection::vec(proptest::option::of(arb_value()), 0..3)),
        proptest::option::of(0i64..4),
    )
        .prop_map(|(h, p, t, bs, lid, med, ek, g)| {
            KvEvent::BlockStored(BlockStored {
                block_hashes: h,
                parent_block_hash: p,
                token_ids: t,
                block_size: bs,
                lora_id: lid,
                medium: med,
                lora_name: None,
                // On the wire a nil entry is None; Some(Nil) cannot exist.
                extra_keys: ek.map(|v| v.into_iter().map(|x| x.filter(|y| *y != Value::Nil)).collect()),
                group_idx: g,
                ..Default::default()
            })
        });
    let removed = (proptest::collection::vec(any::<u64>(), 0..5), proptest::option::of("[A-Z]{1,4}"))
        .prop_map(|(h, m)| KvEvent::BlockRemoved(BlockRemoved { block_hashes: h, medium: m, ..Default::default() }));
    prop_oneof![stored, removed, Just(KvEvent::AllBlocksCleared)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encode_then_decode_is_identity(events in proptest::collection::vec(arb_event(), 0..6),
                                      rank in proptest::option::of(0i64..8), map in any::<bool>()) {
        let batch = EventBatch { ts: 1.25, events, data_parallel_rank: rank, unknown_events: 0 };
        let fmt = if map { WireFormat::Map } else { WireFormat::Array };
        prop_assert_eq!(decode_batch(&encode_batch(&batch, fmt)).unwrap(), batch);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_batch(&bytes);
    }

    #[test]
    fn corrupted_valid_payloads_never_panic(events in proptest::collection::vec(arb_event(), 1..4),
                                            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let batch = EventBatch { ts: 0.0, events, data_parallel_rank: Some(0), unknown_events: 0 };
        let mut bytes = encode_batch(&batch, WireFormat::Map);
        let len = bytes.len();
        for (i, b) in flips { bytes[i % len] = b; }
        let _ = decode_batch(&bytes);
    }
}
