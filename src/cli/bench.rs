//! `kvroute bench`: drives a live OpenAI endpoint (the kvroute gateway, or one server)
//! with a seeded shared-prefix workload and reports hit rate (from the servers' own
//! `vllm:prefix_cache_*` counters), TTFT, end-to-end latency, errors and throughput.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::demo::{metric_sum, one, pct, words};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The OpenAI endpoint to drive (e.g. the kvroute gateway), `http://HOST:PORT`.
    #[arg(long)]
    url: String,
    /// Model name to request.
    #[arg(long, default_value = "sim-model")]
    model: String,
    /// vLLM servers whose `/metrics` give the hit rate (repeatable; default: `--url`).
    #[arg(long = "server")]
    servers: Vec<String>,
    /// Shared-prefix workload: groups (e.g. system prompts).
    #[arg(long, default_value_t = 8)]
    groups: usize,
    /// Requests per group (each its own session).
    #[arg(long, default_value_t = 8)]
    per_group: usize,
    /// Words in each group's shared prefix (the built-in tokenizer makes one token a word).
    #[arg(long, default_value_t = 1000)]
    prefix_words: usize,
    /// Words unique to each request.
    #[arg(long, default_value_t = 50)]
    question_words: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Open-loop Poisson arrivals at this rate (requests/s); without it, closed loop at
    /// `--concurrency`.
    #[arg(long)]
    qps: Option<f64>,
    /// Requests in flight at once (closed loop).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

async fn counters(client: &reqwest::Client, servers: &[String]) -> (f64, f64) {
    let (mut q, mut h) = (0.0, 0.0);
    for s in servers {
        let Ok(r) = client.get(format!("{s}/metrics")).send().await else { continue };
        let Ok(text) = r.text().await else { continue };
        q += metric_sum(&text, "vllm:prefix_cache_queries_total");
        h += metric_sum(&text, "vllm:prefix_cache_hits_total");
    }
    (q, h)
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.url.starts_with("http://"), "--url must be http://HOST:PORT");
    let servers = if a.servers.is_empty() { vec![a.url.clone()] } else { a.servers.clone() };
    // Groups interleaved at random (seeded).
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut jobs: Vec<(usize, usize)> = (0..a.groups).flat_map(|g| (0..a.per_group).map(move |i| (g, i))).collect();
    for i in (1..jobs.len()).rev() {
        let j = rng.random_range(0..=i);
        jobs.swap(i, j);
    }
    let gaps: Vec<f64> = jobs.iter().map(|_| a.qps.map_or(0.0, |q| -(1.0f64 - rng.random::<f64>()).ln() / q)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let out = rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
        let before = counters(&client, &servers).await;
        let t0 = Instant::now();
        let limit = Arc::new(tokio::sync::Semaphore::new(if a.qps.is_some() { 100_000 } else { a.concurrency.max(1) }));
        let mut tasks = Vec::new();
        for (n, &(g, i)) in jobs.iter().enumerate() {
            if a.qps.is_some() {
                tokio::time::sleep(Duration::from_secs_f64(gaps[n])).await;
            }
            let permit = limit.clone().acquire_owned().await?;
            let prompt = format!(
                "{} {}",
                words(&format!("g{g}p"), a.prefix_words),
                words(&format!("g{g}q{i}x"), a.question_words)
            );
            let (c, url, model, max) = (client.clone(), a.url.clone(), a.model.clone(), a.max_tokens);
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let r = one(&c, &url, &model, prompt, &format!("session-{g}-{i}"), max).await;
                drop(permit);
                r.map(|ttft| (ttft, start.elapsed()))
            }));
        }
        let (mut ttft, mut e2e, mut errors) = (Vec::new(), Vec::new(), 0);
        for t in tasks {
            match t.await? {
                Ok((a, b)) => {
                    ttft.push(a.as_secs_f64() * 1e3);
                    e2e.push(b.as_secs_f64() * 1e3);
                }
                Err(_) => errors += 1,
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = counters(&client, &servers).await;
        let (q, h) = (after.0 - before.0, after.1 - before.1);
        anyhow::Ok(json!({
            "url": a.url, "requests": jobs.len(), "errors": errors,
            "hit_rate_tokens": if q > 0.0 { h / q } else { 0.0 },
            "ttft_ms": {"p50": pct(&mut ttft, 0.5), "p90": pct(&mut ttft, 0.9), "p99": pct(&mut ttft, 0.99)},
            "e2e_ms": {"p50": pct(&mut e2e, 0.5), "p90": pct(&mut e2e, 0.9), "p99": pct(&mut e2e, 0.99)},
            "requests_per_s": jobs.len() as f64 / secs,
            "workload": {"groups": a.groups, "per_group": a.per_group, "prefix_words": a.prefix_words,
                         "question_words": a.question_words, "max_tokens": a.max_tokens, "qps": a.qps,
                         "concurrency": a.concurrency, "seed": a.seed},
        }))
    })?;
    println!(
        "{} requests to {}: {} errors, prefix-cache hit rate {:.1} %, TTFT p50/p90/p99 {:.1}/{:.1}/{:.1} ms, {:.1} req/s",
        out["requests"], a.url, out["errors"], 100.0 * out["hit_rate_tokens"].as_f64().unwrap_or(0.0),
        out["ttft_ms"]["p50"].as_f64().unwrap_or(0.0), out["ttft_ms"]["p90"].as_f64().unwrap_or(0.0),
        out["ttft_ms"]["p99"].as_f64().unwrap_or(0.0), out["requests_per_s"].as_f64().unwrap_or(0.0)
    );
    if let Some(p) = &a.output_json {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
