//! `kvroute simulate`: the offline fleet simulation, policies side by side.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use kvroute_bench::offline::{self, EngineModel, FleetConfig};
use kvroute_bench::offline_pd;
use kvroute_bench::report;
use kvroute_sim::batch::DEFAULT_MAX_BATCHED_TOKENS;
use kvroute_sim::config::Profile as LatencyProfile;
use serde_json::json;

use super::workload::WorkloadArgs;

#[derive(Args, Debug)]
pub struct SimulateArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Servers in the fleet [default: 8, or N + M with --prefill-servers/--decode-servers,
    /// which it must then equal if given].
    #[arg(long)]
    servers: Option<usize>,
    /// P/D: prefill servers (`llm-d.ai/role: prefill`); with --decode-servers. The pd-*
    /// policies run on these N + M servers (continuous engine only); every other policy
    /// runs aggregated on N + M unlabelled servers, so one run compares them at equal
    /// server count.
    #[arg(long, requires = "decode_servers")]
    prefill_servers: Option<usize>,
    /// P/D: decode servers (`llm-d.ai/role: decode`); with --prefill-servers.
    #[arg(long, requires = "prefill_servers")]
    decode_servers: Option<usize>,
    /// P/D: KV transfer time per prompt token, µs (a decode server pulls the prompt blocks
    /// it lacks) [default: the latency profile's, 3 µs for 8b-h100].
    #[arg(long)]
    kv_transfer_per_token_us: Option<f64>,
    /// KV blocks per server (65,536 × 16 = 1 M tokens).
    #[arg(long, default_value_t = 65_536)]
    gpu_blocks_per_server: usize,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Latency profile of the servers (as `kvroute sim --profile`).
    #[arg(long, value_enum, default_value = "8b-h100")]
    latency_profile: LatencyProfile,
    /// How a server spends time: continuous (vLLM's batched steps, prefill and decode
    /// share the GPU) or per-request (llm-d inference-sim's model, as `kvroute sim` serves).
    #[arg(long, value_enum, default_value = "continuous")]
    engine: EngineModel,
    /// Concurrent sequences per server (default: the latency profile's).
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// Token budget of one engine step (continuous engine).
    #[arg(long, default_value_t = DEFAULT_MAX_BATCHED_TOKENS)]
    max_num_batched_tokens: usize,
    /// KV events reach the router this long after the server produces them (virtual ms).
    #[arg(long, default_value_t = 10.0)]
    event_delay_ms: f64,
    /// Scorers see server metrics (KV usage, waiting requests) as of the last scrape,
    /// taken this often (virtual ms; llm-d's EPP refreshes every 50 ms; 0 = always fresh).
    #[arg(long, default_value_t = 50.0)]
    scrape_interval_ms: f64,
    /// Comma-separated policies: default, round-robin, random, llm-d, llm-d-approx,
    /// approximate, load-only, session-affinity, the peers' dynamo, dynamo-approx, sglang,
    /// smg, aibrix, prodstack (kvroute serve --policy takes the same names); on a P/D fleet
    /// also pd-kvroute (kvroute's
    /// predicted-ttft decider, its costs from the latency profile: prefill = the batched
    /// prefill time per token, transfer = the KV transfer cost, hop = one inter-token step;
    /// pd-kvroute:W sets its interferenceWeight to W),
    /// pd-always (always-disagg), pd-llmd:N (llm-d's prefix-based decider, nonCachedTokens
    /// N); the pd-* policies score both stages with the default profile's plugins.
    #[arg(long, default_value = "round-robin,llm-d,default")]
    policies: String,
    /// Also run the first profile of this llm-d EndpointPickerConfig (as policy "config";
    /// on a P/D fleet, a config with a P/D profile handler runs on the prefill and decode
    /// servers, any other aggregated).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    output_json: Option<PathBuf>,
    /// Write a markdown report and SVG charts (TTFT CDF, hit rate over time, load per
    /// server) into this directory.
    #[arg(long)]
    report_dir: Option<PathBuf>,
    #[command(flatten)]
    capacity: super::capacity::CapacityArgs,
}

pub fn run(a: SimulateArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let (mut reqs, mut desc) = if a.capacity.suite || a.capacity.suite_workloads.is_some() {
        (vec![], String::new())
    } else {
        a.workload.generate(a.block_size)?
    };
    let mut latency = a.latency_profile.latency();
    if let Some(n) = a.max_num_seqs {
        latency.max_num_seqs = n.max(1);
    }
    if let Some(us) = a.kv_transfer_per_token_us {
        anyhow::ensure!(us.is_finite() && us >= 0.0, "--kv-transfer-per-token-us must be ≥ 0");
        latency.kv_transfer_per_token = Duration::from_secs_f64(us / 1e6);
    }
    let (prefill, servers) = match (a.prefill_servers, a.decode_servers) {
        (Some(p), Some(d)) => {
            anyhow::ensure!(p >= 1 && d >= 1, "--prefill-servers and --decode-servers must be ≥ 1");
            anyhow::ensure!(
                a.servers.is_none_or(|n| n == p + d),
                "--servers must equal --prefill-servers + --decode-servers ({})",
                p + d
            );
            anyhow::ensure!(a.engine == EngineModel::Continuous, "P/D fleets need --engine continuous");
            (p, p + d)
        }
        _ => (0, a.servers.unwrap_or(8).max(1)),
    };
    let mut cfg = FleetConfig {
        servers,
        prefill_servers: 0,
        gpu_blocks: a.gpu_blocks_per_server,
        block_size: a.block_size.max(1),
        latency,
        event_delay: Duration::from_secs_f64(a.event_delay_ms.max(0.0) / 1e3),
        scrape_interval: Duration::from_secs_f64(a.scrape_interval_ms.max(0.0) / 1e3),
        seed: a.workload.seed,
        engine: a.engine,
        max_batched_tokens: a.max_num_batched_tokens,
    };
    // One workload of the suite, on its fleet (arrival times × --time-scale).
    if let (Some(_), false) = (&a.capacity.suite_workloads, a.capacity.suite) {
        let case = super::capacity::suite_case(&a.capacity, &cfg, a.workload.seed)?;
        reqs = kvroute_bench::suite::scaled(&case.reqs, 1.0 / a.workload.time_scale.max(1e-9));
        desc = case.what;
        cfg = FleetConfig { prefill_servers: cfg.prefill_servers, ..case.fleet };
    }
    if a.capacity.suite || a.capacity.find_capacity {
        anyhow::ensure!(
            prefill == 0 && a.config.is_none(),
            "--find-capacity and --suite compare named policies on aggregated fleets"
        );
        let policies: Vec<String> =
            a.policies.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect();
        for p in &policies {
            kvroute_bench::policy(p)?;
        }
        let (json, dir) = (a.output_json.as_deref(), a.report_dir.as_deref());
        return if a.capacity.suite {
            super::capacity::run_suite(&a.capacity, &cfg, &policies, a.workload.seed, json, dir)
        } else {
            super::capacity::find(&a.capacity, reqs, &desc, &cfg, &policies, a.workload.seed, json, dir)
        };
    }
    let mut profiles = Vec::new();
    for name in a.policies.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let profile = match offline_pd::policy(name, &cfg.latency) {
            Some(p) => {
                anyhow::ensure!(prefill > 0, "policy {name} needs --prefill-servers and --decode-servers");
                p?
            }
            None => kvroute_bench::policy(name)?,
        };
        profiles.push((name.to_string(), profile));
    }
    if let Some(p) = &a.config {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        profiles.push(("config".into(), kvroute_schedule::SchedulerConfig::from_yaml(&text)?));
    }
    anyhow::ensure!(!profiles.is_empty(), "--policies names no policy");
    let bound = offline::infinite_cache_hit_rate(&reqs, cfg.block_size);
    let global = offline::global_cache_hit_rate(&reqs, cfg.block_size, cfg.servers * cfg.gpu_blocks);
    let pd_cfg = FleetConfig { prefill_servers: prefill, ..cfg.clone() };
    let on_pd = |n: &str, p: &kvroute_schedule::Profile| offline_pd::is_pd(n) || (n == "config" && p.prefill.is_some());
    let results: Vec<_> =
        profiles.iter().map(|(n, p)| offline::run(n, p, &reqs, if on_pd(n, p) { &pd_cfg } else { &cfg })).collect();
    let fleet = match prefill {
        0 => format!("{} servers", cfg.servers),
        p => format!(
            "{} servers (pd-* policies: {p} prefill + {} decode, KV transfer {:.1} µs/token)",
            cfg.servers,
            cfg.servers - p,
            cfg.latency.kv_transfer_per_token.as_secs_f64() * 1e6
        ),
    };
    let header = format!(
        "{desc}: {} requests over {:.0} s, {fleet} × {} blocks of {} tokens, {:?} engine ({} seqs); KV events {} ms late; bounds: infinite cache {:.1} %, global cache {:.1} % of prompt tokens",
        reqs.len(),
        reqs.last().map_or(0.0, |r| r.arrival_s),
        cfg.gpu_blocks,
        cfg.block_size,
        cfg.engine,
        cfg.latency.max_num_seqs,
        a.event_delay_ms,
        100.0 * bound,
        100.0 * global
    );
    let table = report::markdown(&results);
    println!("{header}\n\n{table}\n(simulated in {:.1} s)", t0.elapsed().as_secs_f64());
    if let Some(out) = &a.output_json {
        let doc = json!({"workload": desc, "servers": cfg.servers, "prefill_servers": prefill, "gpu_blocks_per_server": cfg.gpu_blocks,
            "block_size": cfg.block_size, "engine": format!("{:?}", cfg.engine), "seed": a.workload.seed,
            "requests": reqs.len(), "policies": results,
            "bounds": {"infinite_cache_hit_rate_tokens": bound, "global_cache_hit_rate_tokens": global}});
        std::fs::write(out, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(dir) = &a.report_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).with_context(|| format!("cannot write {}/{name}", dir.display()))
        };
        write("ttft_cdf.svg", report::ttft_cdf(&results))?;
        write("hit_rate.svg", report::hit_rate_over_time(&results))?;
        let mut md = format!("# kvroute simulate\n\n{header}\n\n{table}\n![TTFT CDF](ttft_cdf.svg)\n\n![Hit rate over time](hit_rate.svg)\n");
        for r in &results {
            let file = format!("load_{}.svg", r.name);
            write(&file, report::load_over_time(r))?;
            md += &format!("\n![Load per server, {}]({file})\n", r.name);
        }
        write("report.md", md)?;
        println!("report written to {}/report.md", dir.display());
    }
    Ok(())
}
