//! Hit attribution's cost on a response body: a 200-token stream (one SSE event per token,
//! then the usage chunk the gateway asked for and `[DONE]`) passed through as is, against
//! the same stream re-cut into events, read for its usage and stripped of the usage chunk
//! (`tap_sse`); a 4 KiB non-streaming body passed through against `tap_whole`; and the
//! per-request counting alone (`Attribution::finish`).
use std::sync::Arc;

use axum::body::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::StreamExt;
use kvroute_gateway::attribution::{tap_sse, tap_whole, Attribution, Prediction, Tap, Usage};

fn prediction() -> Prediction {
    Prediction {
        request_id: "kvr-bench".into(),
        model: "m".into(),
        pod: "10.0.0.1:8000".into(),
        prompt_tokens: 2048,
        predicted_tokens: 1024,
        best_tokens: 1024,
        reason: "longest cached prefix".into(),
        keys: Arc::from(vec![1u64; 128]),
        stream: true,
        ..Default::default()
    }
}

fn sse_chunks() -> Vec<Bytes> {
    let mut v: Vec<Bytes> = (0..200)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"cmpl-bench\",\"object\":\"text_completion\",\"created\":1796083200,\"model\":\"m\",\"choices\":[{{\"index\":0,\"text\":\" word{i}\",\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            ))
        })
        .collect();
    v.push(Bytes::from("data: {\"id\":\"cmpl-bench\",\"object\":\"text_completion\",\"created\":1796083200,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":2048,\"total_tokens\":2248,\"completion_tokens\":200,\"prompt_tokens_details\":{\"cached_tokens\":1024}}}\n\n"));
    v.push(Bytes::from("data: [DONE]\n\n"));
    v
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let attribution = Arc::new(Attribution::new(&prometheus::Registry::new(), 256).unwrap());
    let chunks = sse_chunks();
    let whole = Bytes::from(format!(
        "{{\"id\":\"cmpl-bench\",\"choices\":[{{\"text\":\"{}\"}}],\"usage\":{{\"prompt_tokens\":2048,\"completion_tokens\":200,\"prompt_tokens_details\":{{\"cached_tokens\":1024}}}}}}",
        "x".repeat(4000)
    ));
    let mut g = c.benchmark_group("attribution");
    let stream = |chunks: &Vec<Bytes>| futures_util::stream::iter(chunks.clone().into_iter().map(Ok::<_, ()>));
    g.bench_function("sse_200_tokens/pass_through", |b| {
        b.iter(|| rt.block_on(stream(&chunks).map(|c| c.map(|b| b.len())).count()))
    });
    g.bench_function("sse_200_tokens/tap_and_strip", |b| {
        b.iter(|| {
            let tap = Tap::new(attribution.clone(), prediction(), 200);
            rt.block_on(tap_sse(stream(&chunks), tap, true).count())
        })
    });
    let one = vec![whole];
    g.bench_function("json_4k/pass_through", |b| b.iter(|| rt.block_on(stream(&one).count())));
    g.bench_function("json_4k/tap", |b| {
        b.iter(|| {
            let tap = Tap::new(attribution.clone(), prediction(), 200);
            rt.block_on(tap_whole(stream(&one), tap).count())
        })
    });
    // Counting one request (metrics, the recent-decisions entry), the body aside.
    let p = prediction();
    let usage = Usage { prompt_tokens: Some(2048), completion_tokens: Some(200), cached_tokens: Some(1024) };
    g.bench_function("finish_one_request", |b| b.iter(|| attribution.finish(&p, Some(usage), 200)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
