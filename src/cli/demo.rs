//! `kvroute demo`: a local fleet of simulated vLLM servers (`kvroute sim` child
//! processes publishing real KV events over ZMQ) behind a `kvroute serve` router, driven by
//! (a) llm-d's seed test — one warm-up, then 30 identical ~160-token completions of one
//! session, one after another — and (b) a shared-prefix workload of many concurrent
//! sessions; once with round-robin routing and once with kvroute's default profile. Hit
//! rates come from the servers' own `vllm:prefix_cache_*` counters; TTFT is measured by the
//! client at the first streamed chunk.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Simulated vLLM servers.
    #[arg(long, default_value_t = 4)]
    pods: usize,
    /// Speed-up of the simulators' latency model (8b-h100 profile).
    #[arg(long, default_value_t = 20.0)]
    speedup: f64,
    /// Shared-prefix workload: prefix groups (e.g. system prompts / documents).
    #[arg(long, default_value_t = 16)]
    groups: usize,
    /// Shared-prefix workload: requests per group (each its own session).
    #[arg(long, default_value_t = 12)]
    prompts_per_group: usize,
    /// Shared-prefix workload: words in each group's shared prefix.
    #[arg(long, default_value_t = 1000)]
    prefix_words: usize,
    /// Shared-prefix workload: words unique to each request.
    #[arg(long, default_value_t = 40)]
    question_words: usize,
    /// Shared-prefix workload: requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Also print the results as JSON.
    #[arg(long)]
    json: bool,
}

fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    Ok(held.iter().filter_map(|l| l.local_addr().ok().map(|a| a.port())).collect())
}

/// Child processes, killed on drop.
struct Fleet {
    children: Vec<Child>,
    router: String,
    sims: Vec<String>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_healthy(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        if client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("{base} did not become healthy");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Fleet {
    async fn start(
        exe: &Path,
        a: &DemoArgs,
        scheduler: Option<&Path>,
        client: &reqwest::Client,
    ) -> anyhow::Result<Fleet> {
        let ports = free_ports(a.pods + 2)?;
        let (router_port, zmq_port) = (ports[0], ports[1]);
        let mut f = Fleet { children: Vec::new(), router: format!("http://127.0.0.1:{router_port}"), sims: Vec::new() };
        let mut serve = Command::new(exe);
        serve.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{router_port}"),
            "--zmq-bind",
            &format!("tcp://127.0.0.1:{zmq_port}"),
        ]);
        serve.args(["--health-interval-ms", "200", "--admin-listen", "off"]);
        if let Some(s) = scheduler {
            serve.arg("--scheduler-config").arg(s);
        }
        for &p in &ports[2..] {
            serve.args(["--backend", &format!("http://127.0.0.1:{p}")]);
        }
        f.children
            .push(serve.env("RUST_LOG", "warn").stdout(Stdio::null()).spawn().context("cannot start kvroute serve")?);
        wait_healthy(client, &f.router).await?;
        for &p in &ports[2..] {
            let kv = json!({"enable_kv_cache_events": true, "publisher": "zmq",
                "endpoint": format!("tcp://127.0.0.1:{zmq_port}"), "topic": format!("kv@127.0.0.1:{p}@demo-model")});
            let child = Command::new(exe)
                .args(["sim", "--port", &p.to_string(), "--model", "demo-model", "--speedup", &a.speedup.to_string()])
                .args(["--max-num-seqs", "32", "--kv-events-config", &kv.to_string()])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .context("cannot start kvroute sim")?;
            f.children.push(child);
            f.sims.push(format!("http://127.0.0.1:{p}"));
        }
        for s in &f.sims {
            wait_healthy(client, s).await?;
        }
        // Let the publishers' connections and the router's health probes settle.
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok(f)
    }

    /// Per pod: (prefix-cache queries, hits, finished requests), from its own /metrics.
    async fn counters(&self, client: &reqwest::Client) -> anyhow::Result<Vec<(f64, f64, f64)>> {
        let mut out = Vec::new();
        for s in &self.sims {
            let text = client.get(format!("{s}/metrics")).send().await?.text().await?;
            let sum = |name: &str| metric_sum(&text, name);
            out.push((
                sum("vllm:prefix_cache_queries_total"),
                sum("vllm:prefix_cache_hits_total"),
                sum("vllm:request_success_total"),
            ));
        }
        Ok(out)
    }
}

#[derive(Serialize, Clone, Debug)]
struct Outcome {
    policy: String,
    workload: String,
    requests: usize,
    errors: usize,
    /// Prompt tokens served from the prefix cache ÷ prompt tokens (servers' counters).
    hit_rate: f64,
    /// Busiest pod's share of the requests.
    stickiness: f64,
    /// Busiest pod's requests ÷ mean per pod.
    busiest_over_mean: f64,
    ttft_ms_p50: f64,
    ttft_ms_p90: f64,
    ttft_ms_p99: f64,
    requests_per_s: f64,
}

/// Sum of every series of metric `name` in Prometheus text (all label sets).
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub(crate) fn words(tag: &str, n: usize) -> String {
    (0..n).map(|i| format!("{tag}{i}")).collect::<Vec<_>>().join(" ")
}

/// Streams one completion through the router; returns the time to its first chunk.
pub(crate) async fn one(
    client: &reqwest::Client,
    router: &str,
    model: &str,
    prompt: String,
    session: &str,
    max_tokens: usize,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let resp = client
        .post(format!("{router}/v1/completions"))
        .header("x-session-id", session)
        .json(&json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": true}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let mut stream = resp.bytes_stream();
    let mut ttft = None;
    while let Some(chunk) = stream.next().await {
        chunk?;
        ttft.get_or_insert(t.elapsed());
    }
    ttft.context("empty response")
}

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(0.0)
}

async fn measure(
    fleet: &Fleet,
    client: &reqwest::Client,
    policy: &str,
    workload: &str,
    jobs: Vec<(String, String)>,
    concurrency: usize,
    max_tokens: usize,
) -> anyhow::Result<Outcome> {
    let before = fleet.counters(client).await?;
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::new();
    for (prompt, session) in jobs.iter().cloned() {
        let permit = sem.clone().acquire_owned().await?;
        let (c, r) = (client.clone(), fleet.router.clone());
        tasks.push(tokio::spawn(async move {
            let out = one(&c, &r, "demo-model", prompt, &session, max_tokens).await;
            drop(permit);
            out
        }));
    }
    let mut ttft = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await? {
            Ok(d) => ttft.push(d.as_secs_f64() * 1e3),
            Err(_) => errors += 1,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = fleet.counters(client).await?;
    let (mut q, mut h) = (0.0, 0.0);
    let mut per_pod = Vec::new();
    for (b, a) in before.iter().zip(&after) {
        q += a.0 - b.0;
        h += a.1 - b.1;
        per_pod.push(a.2 - b.2);
    }
    let total: f64 = per_pod.iter().sum();
    let max = per_pod.iter().copied().fold(0.0, f64::max);
    Ok(Outcome {
        policy: policy.into(),
        workload: workload.into(),
        requests: jobs.len(),
        errors,
        hit_rate: if q > 0.0 { h / q } else { 0.0 },
        stickiness: if total > 0.0 { max / total } else { 0.0 },
        busiest_over_mean: if total > 0.0 { max / (total / per_pod.len() as f64) } else { 0.0 },
        ttft_ms_p50: pct(&mut ttft, 0.5),
        ttft_ms_p90: pct(&mut ttft, 0.9),
        ttft_ms_p99: pct(&mut ttft, 0.99),
        requests_per_s: jobs.len() as f64 / secs,
    })
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=32).contains(&a.pods), "--pods must be in 1..=32");
    let exe = std::env::current_exe().context("cannot find the kvroute binary")?;
    let dir = std::env::temp_dir().join(format!("kvroute-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rr: PathBuf = dir.join("round-robin.yaml");
    std::fs::write(&rr, "plugins:\n- type: round-robin-picker\nschedulingProfiles:\n- name: round-robin\n  plugins:\n  - pluginRef: round-robin-picker\n")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let started = Instant::now();
    let results = rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
        let mut results = Vec::new();
        for (policy, sched) in [("round-robin", Some(rr.as_path())), ("kvroute", None)] {
            let fleet = Fleet::start(&exe, &a, sched, &client).await?;
            // (a) Seed test: warm-up, then 30 identical requests of one session, in sequence.
            let seed_prompt = words("seed", 160);
            one(&client, &fleet.router, "demo-model", seed_prompt.clone(), "seed-session", a.max_tokens).await?;
            let jobs = vec![(seed_prompt, "seed-session".to_string()); 30];
            results.push(
                measure(&fleet, &client, policy, "seed test (30 × 160 tokens, 1 session)", jobs, 1, a.max_tokens)
                    .await?,
            );
            // (b) Shared prefixes across many concurrent sessions, groups interleaved.
            let mut jobs = Vec::new();
            for i in 0..a.prompts_per_group {
                for g in 0..a.groups {
                    let prompt = format!(
                        "{} {}",
                        words(&format!("doc{g}w"), a.prefix_words),
                        words(&format!("q{g}x{i}w"), a.question_words)
                    );
                    jobs.push((prompt, format!("session-{g}-{i}")));
                }
            }
            let name =
                format!("shared prefix ({} groups × {}, {} in flight)", a.groups, a.prompts_per_group, a.concurrency);
            results.push(measure(&fleet, &client, policy, &name, jobs, a.concurrency, a.max_tokens).await?);
        }
        anyhow::Ok(results)
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "kvroute demo: {} simulated vLLM servers (kvroute sim, 8b-h100 latency ÷ {}) behind kvroute serve; \
         hit rates from the servers' own vllm:prefix_cache_* counters\n",
        a.pods, a.speedup
    );
    println!("| workload | policy | requests | errors | prefix-cache hit rate | busiest pod share | busiest / mean | TTFT p50 / p90 / p99 (ms) | req/s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for o in &results {
        println!(
            "| {} | {} | {} | {} | {:.1} % | {:.1} % | {:.2} | {:.1} / {:.1} / {:.1} | {:.1} |",
            o.workload,
            o.policy,
            o.requests,
            o.errors,
            100.0 * o.hit_rate,
            100.0 * o.stickiness,
            o.busiest_over_mean,
            o.ttft_ms_p50,
            o.ttft_ms_p90,
            o.ttft_ms_p99,
            o.requests_per_s
        );
    }
    println!("\n(finished in {:.1} s)", started.elapsed().as_secs_f64());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json!({"results": results}))?);
    }
    Ok(())
}
