//! `kvroute simulate`: the offline fleet simulation, policies side by side.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kvroute_bench::offline::{self, FleetConfig};
use kvroute_bench::workload::{self, SharedPrefix};
use kvroute_sim::config::Profile as LatencyProfile;
use serde_json::json;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WorkloadKind {
    /// A Mooncake-format JSONL trace (`--trace`).
    Trace,
    /// Shared-prefix groups (`--preset`).
    SharedPrefix,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    #[arg(long, value_enum, default_value = "trace")]
    workload: WorkloadKind,
    /// Mooncake-format JSONL trace.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Tokens per `hash_ids` block in the trace (Mooncake: 512).
    #[arg(long, default_value_t = 512)]
    trace_block_size: usize,
    /// Multiply trace timestamps by this (0.5 = twice the load).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Replay at most this many requests.
    #[arg(long)]
    max_requests: Option<usize>,
    /// Shared-prefix preset: llmd-synthetic, llmd-precise, sglang-gsp.
    #[arg(long, default_value = "llmd-synthetic")]
    preset: String,
    /// Override the preset's arrival rate (requests/s).
    #[arg(long)]
    qps: Option<f64>,
    /// Servers in the fleet.
    #[arg(long, default_value_t = 8)]
    servers: usize,
    /// KV blocks per server.
    #[arg(long, default_value_t = 65_536)]
    gpu_blocks_per_server: usize,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Latency profile of the servers (as `kvroute sim --profile`).
    #[arg(long, value_enum, default_value = "8b-h100")]
    latency_profile: LatencyProfile,
    /// Concurrent sequences per server (default: the profile's).
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// KV events reach the router this long after the server produces them (virtual ms).
    #[arg(long, default_value_t = 10.0)]
    event_delay_ms: f64,
    /// Comma-separated policies: round-robin, random, default, llm-d, approximate,
    /// load-only, session-affinity.
    #[arg(long, default_value = "round-robin,llm-d,default")]
    policies: String,
    /// Also run the first profile of this llm-d EndpointPickerConfig (as policy "config").
    #[arg(long)]
    config: Option<PathBuf>,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

pub fn run(a: SimulateArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let (reqs, desc) = match a.workload {
        WorkloadKind::Trace => {
            let path = a.trace.as_ref().context("--workload trace needs --trace FILE.jsonl")?;
            let r = workload::mooncake(path, a.trace_block_size, a.block_size, a.time_scale, a.max_requests)
                .with_context(|| format!("cannot read {}", path.display()))?;
            (r, format!("trace {}", path.display()))
        }
        WorkloadKind::SharedPrefix => {
            let Some(mut p) = SharedPrefix::preset(&a.preset) else { bail!("unknown preset {:?}", a.preset) };
            if let Some(q) = a.qps {
                p.qps = q;
            }
            (
                p.generate(a.block_size, a.seed),
                format!("shared-prefix {} ({}×{}, {} qps)", a.preset, p.groups, p.per_group, p.qps),
            )
        }
    };
    anyhow::ensure!(!reqs.is_empty(), "the workload has no requests");
    let mut latency = a.latency_profile.latency();
    if let Some(n) = a.max_num_seqs {
        latency.max_num_seqs = n.max(1);
    }
    let cfg = FleetConfig {
        servers: a.servers.max(1),
        gpu_blocks: a.gpu_blocks_per_server,
        block_size: a.block_size,
        latency,
        event_delay: Duration::from_secs_f64(a.event_delay_ms.max(0.0) / 1e3),
        seed: a.seed,
    };
    let mut profiles = Vec::new();
    for name in a.policies.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        profiles.push((name.to_string(), kvroute_bench::policy(name)?));
    }
    if let Some(p) = &a.config {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        profiles.push(("config".into(), kvroute_schedule::SchedulerConfig::from_yaml(&text)?));
    }
    let bound = offline::infinite_cache_hit_rate(&reqs, a.block_size);
    let global = offline::global_cache_hit_rate(&reqs, a.block_size, cfg.servers * cfg.gpu_blocks);
    let results: Vec<_> = profiles.iter().map(|(n, p)| offline::run(n, p, &reqs, &cfg)).collect();
    println!(
        "{desc}: {} requests, {} servers × {} blocks of {} tokens; KV events {} ms late; bounds: infinite cache {:.1} %, global cache {:.1} % of prompt tokens\n",
        reqs.len(), cfg.servers, cfg.gpu_blocks, cfg.block_size, a.event_delay_ms, 100.0 * bound, 100.0 * global
    );
    println!("| policy | hit rate (tokens) | hit rate (blocks) | busiest/mean requests | busiest/mean prefill | TTFT p50 / p90 / p99 (s) |");
    println!("|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.1} % | {:.1} % | {:.2} | {:.2} | {:.3} / {:.3} / {:.3} |",
            r.name,
            100.0 * r.hit_rate_tokens,
            100.0 * r.hit_rate_blocks,
            r.busiest_over_mean_requests,
            r.busiest_over_mean_prefill_tokens,
            r.ttft_p50_s,
            r.ttft_p90_s,
            r.ttft_p99_s
        );
    }
    println!("\n(simulated in {:.1} s)", t0.elapsed().as_secs_f64());
    if let Some(out) = &a.output_json {
        let doc = json!({"workload": desc, "servers": cfg.servers, "gpu_blocks_per_server": cfg.gpu_blocks,
            "block_size": cfg.block_size, "seed": a.seed, "policies": results,
            "bounds": {"infinite_cache_hit_rate_tokens": bound, "global_cache_hit_rate_tokens": global}});
        std::fs::write(out, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}
