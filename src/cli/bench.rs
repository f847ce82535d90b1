//! `kvroute bench`: drives a live OpenAI endpoint (the kvroute gateway, or one server)
//! with the same workloads as `kvroute simulate` — requests rendered as text whose block
//! structure reproduces the workload's sharing exactly (one word per token with the
//! built-in tokenizer `kvroute sim` uses) — open loop at the workload's arrival times or
//! closed loop at a fixed concurrency, streaming; reports the prefix-cache hit rate from
//! the servers' own `vllm:prefix_cache_*` counters, TTFT, inter-token latency, end-to-end
//! latency, errors and throughput.

use std::fmt::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use kvroute_bench::workload::SimRequest;
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::demo::{metric_sum, pct};
use super::workload::WorkloadArgs;

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
    #[command(flatten)]
    workload: WorkloadArgs,
    /// The servers' KV block size (prompts are laid out in blocks of this many tokens).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Closed loop: keep this many requests in flight and ignore arrival times.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout_s: f64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
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

/// The prompt text of a request: `block_size` words per block key (equal keys, equal
/// words), then words unique to the request for the partial last block.
pub fn render(r: &SimRequest, id: usize, block_size: usize) -> String {
    let mut s = String::with_capacity(r.prompt_tokens * 10);
    for &k in &r.keys {
        for j in 0..block_size as u64 {
            let _ = write!(s, "w{:08x} ", xxh3_64_with_seed(&k.to_le_bytes(), j) as u32);
        }
    }
    for j in r.keys.len() * block_size..r.prompt_tokens {
        let _ = write!(s, "r{id}x{j} ");
    }
    s.pop();
    s
}

/// What one streamed request measured.
struct Sample {
    ttft: Duration,
    e2e: Duration,
    /// Mean gap between streamed chunks after the first.
    itl: Option<Duration>,
    chunks: usize,
}

async fn one(client: &reqwest::Client, url: &str, body: serde_json::Value, session: String) -> anyhow::Result<Sample> {
    let t = Instant::now();
    let resp = client.post(format!("{url}/v1/completions")).header("x-session-id", session).json(&body).send().await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let mut stream = resp.bytes_stream();
    let (mut first, mut last, mut chunks) = (None, t, 0usize);
    while let Some(chunk) = stream.next().await {
        let c = chunk?;
        // SSE events, one per output token (the final `[DONE]` excluded).
        let events = c.windows(6).filter(|w| w == b"data: ").count();
        let done = c.windows(6).any(|w| w == b"[DONE]");
        let now = Instant::now();
        if first.is_none() {
            first = Some(now - t);
        }
        last = now;
        chunks += events - usize::from(done && events > 0);
    }
    let ttft = first.context("empty response")?;
    let decode = last.duration_since(t).saturating_sub(ttft);
    let itl = (chunks > 1).then(|| decode / (chunks as u32 - 1));
    Ok(Sample { ttft, e2e: t.elapsed(), itl, chunks })
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.url.starts_with("http://"), "--url must be http://HOST:PORT");
    let servers = if a.servers.is_empty() { vec![a.url.clone()] } else { a.servers.clone() };
    let (reqs, desc) = a.workload.generate(a.block_size.max(1))?;
    let n = reqs.len();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let out = rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs_f64(a.timeout_s.max(0.001)))
            .build()?;
        let before = counters(&client, &servers).await;
        let bar = if a.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(n as u64) };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} requests {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let limit = Arc::new(tokio::sync::Semaphore::new(a.concurrency.unwrap_or(usize::MAX >> 4).max(1)));
        let t0 = Instant::now();
        let start_s = reqs.first().map_or(0.0, |r| r.arrival_s);
        let mut tasks = Vec::with_capacity(n);
        for (i, r) in reqs.iter().enumerate() {
            if a.concurrency.is_none() {
                let due = Duration::from_secs_f64((r.arrival_s - start_s).max(0.0));
                tokio::time::sleep(due.saturating_sub(t0.elapsed())).await;
            }
            let permit = limit.clone().acquire_owned().await?;
            let body = json!({"model": a.model, "prompt": render(r, i, a.block_size), "max_tokens": r.output_tokens,
                              "stream": true, "ignore_eos": true});
            let (c, url, bar) = (client.clone(), a.url.clone(), bar.clone());
            let session = format!("session-{}", r.session);
            tasks.push(tokio::spawn(async move {
                let s = one(&c, &url, body, session).await;
                drop(permit);
                bar.inc(1);
                s
            }));
        }
        let (mut ttft, mut e2e, mut itl, mut errors, mut tokens) = (vec![], vec![], vec![], 0usize, 0usize);
        for t in tasks {
            match t.await? {
                Ok(s) => {
                    ttft.push(s.ttft.as_secs_f64() * 1e3);
                    e2e.push(s.e2e.as_secs_f64() * 1e3);
                    itl.extend(s.itl.map(|d| d.as_secs_f64() * 1e3));
                    tokens += s.chunks;
                }
                Err(e) => {
                    errors += 1;
                    bar.set_message(format!("{errors} errors (last: {e})"));
                }
            }
        }
        bar.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = counters(&client, &servers).await;
        let (q, h) = (after.0 - before.0, after.1 - before.1);
        let q3 = |v: &mut Vec<f64>| json!({"p50": pct(v, 0.5), "p90": pct(v, 0.9), "p99": pct(v, 0.99)});
        anyhow::Ok(json!({
            "url": a.url, "workload": desc, "requests": n, "errors": errors,
            "hit_rate_tokens": if q > 0.0 { h / q } else { 0.0 },
            "ttft_ms": q3(&mut ttft), "itl_ms": q3(&mut itl), "e2e_ms": q3(&mut e2e),
            "requests_per_s": n as f64 / secs, "output_tokens_per_s": tokens as f64 / secs,
            "closed_loop_concurrency": a.concurrency, "seed": a.workload.seed,
        }))
    })?;
    let f = |p: &[&str]| p.iter().fold(&out, |v, k| &v[*k]).as_f64().unwrap_or(0.0);
    println!(
        "{} ({} requests) to {}: {} errors, prefix-cache hit rate {:.1} %, TTFT p50/p90/p99 {:.1}/{:.1}/{:.1} ms, ITL p50 {:.2} ms, {:.1} req/s",
        desc, n, a.url, out["errors"], 100.0 * f(&["hit_rate_tokens"]),
        f(&["ttft_ms", "p50"]), f(&["ttft_ms", "p90"]), f(&["ttft_ms", "p99"]), f(&["itl_ms", "p50"]),
        f(&["requests_per_s"])
    );
    if let Some(p) = &a.output_json {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
