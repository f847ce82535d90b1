//! The workload suite (`kvroute simulate --suite`): every policy's capacity at an SLO on
//! each workload of the suite, with the fleet's upper bound, side by side — one command, a
//! markdown table, JSON and one SVG per workload (TTFT p90 against the arrival-rate scale,
//! every policy). Seeds are fixed, so each run is reproducible.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::capacity::{self, Budget, Capacity, Measured, Slo};
use crate::offline::{self, FleetConfig, PolicyResult};
use crate::report::{line_chart, Series};
use crate::synth::{self, Mixed, ZipfGroups};
use crate::workload::{self, MultiTurn, SharedPrefix, SimRequest, WorkloadError};

/// One workload of the suite and the fleet it runs on.
pub struct Case {
    pub name: String,
    pub what: String,
    pub reqs: Vec<SimRequest>,
    pub fleet: FleetConfig,
}

/// How the suite runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// `../shared/traces` (Mooncake, Azure).
    pub traces: PathBuf,
    pub seed: u64,
    pub slo: Slo,
    pub policies: Vec<String>,
    /// Bisection stops when the bracket is within this ratio.
    pub tolerance: f64,
    pub max_runs: usize,
    /// Parallel simulations.
    pub threads: usize,
    /// Keep only these workloads (all when empty).
    pub only: Vec<String>,
}

/// The suite's workloads on fleets derived from `base` (servers, latency, engine).
pub fn cases(o: &Options, base: &FleetConfig) -> Result<Vec<Case>, WorkloadError> {
    let bs = base.block_size;
    let fleet = |servers: usize, gpu_blocks: usize, seqs: usize| {
        let mut f = base.clone();
        f.servers = servers;
        f.gpu_blocks = gpu_blocks;
        f.latency.max_num_seqs = seqs;
        f.prefill_servers = 0;
        f
    };
    let mut out = Vec::new();
    let mut add = |name: &str, what: String, reqs: Vec<SimRequest>, fleet: FleetConfig| {
        if o.only.is_empty() || o.only.iter().any(|n| n == name) {
            out.push(Case { name: name.into(), what, reqs, fleet });
        }
    };
    // llm-d's "KV-cache wins" shape: the warm-up and the first half of its ladder (the rate
    // scale stretches or compresses it), 8 servers with llm-d's per-pod KV; and with half.
    if let Some(mut p) = SharedPrefix::preset("llmd-precise") {
        p.stages.truncate(8);
        let reqs = p.generate(bs, o.seed);
        let what = format!(
            "llmd-precise: {} groups × {}, {}+{} tokens, {} out, warm-up + 8 ladder stages",
            p.groups, p.per_group, p.system, p.question, p.output
        );
        add("llmd-precise", what.clone(), reqs.clone(), fleet(8, 19_208, 256));
        add("llmd-precise-half-kv", format!("{what}, half the KV"), reqs, fleet(8, 9_604, 256));
    }
    let mooncake = o.traces.join("mooncake_synthetic_trace.jsonl");
    add(
        "mooncake",
        "Mooncake synthetic trace (first 1,500 requests)".into(),
        workload::mooncake(&mooncake, 512, bs, 1.0, Some(1500))?,
        fleet(8, 65_536, base.latency.max_num_seqs),
    );
    let m = MultiTurn { users: 200, rounds: 8, qps: 10.0, ..Default::default() };
    add(
        "multi-turn",
        format!(
            "multi-turn hot spot: {} users × {} rounds, shared {}-token system prompt",
            m.users, m.rounds, m.system
        ),
        m.generate(bs, o.seed),
        fleet(8, 4096, base.latency.max_num_seqs),
    );
    for (name, file) in [("azure-code", "azure_llm_2023_code.csv"), ("azure-conv", "azure_llm_2023_conv.csv")] {
        add(
            name,
            format!("Azure 2023 {} trace (first 3,000 requests, 64 prefix groups of 512 tokens)", &name[6..]),
            workload::azure(&o.traces.join(file), 64, 512, bs, 1.0, Some(3000), o.seed)?,
            fleet(8, 65_536, base.latency.max_num_seqs),
        );
    }
    let z =
        ZipfGroups { groups: 200, requests: 3000, zipf_s: 1.1, system: 2048, question: 256, output: 128, qps: 20.0 };
    add(
        "zipf",
        format!("{} prefix groups, Zipf {} popularity, {}+{} tokens", z.groups, z.zipf_s, z.system, z.question),
        z.generate(o.seed, bs),
        fleet(8, 16_384, base.latency.max_num_seqs),
    );
    let mut b = ZipfGroups { zipf_s: 0.8, ..z }.generate(o.seed ^ 1, bs);
    synth::bursty(&mut b, 3.0, o.seed);
    add("bursty", "Zipf 0.8 groups, gamma arrivals with CV 3".into(), b, fleet(8, 16_384, base.latency.max_num_seqs));
    let mx = Mixed {
        requests: 3000,
        system: 512,
        short: 128,
        short_output: 64,
        long: 8192,
        long_output: 256,
        long_share: 0.15,
        qps: 10.0,
    };
    add(
        "mixed",
        format!(
            "mixed: {:.0} % long ({} tokens), the rest short ({} tokens)",
            100.0 * mx.long_share,
            mx.long,
            mx.short
        ),
        mx.generate(o.seed, bs),
        fleet(8, 65_536, base.latency.max_num_seqs),
    );
    Ok(out)
}

/// One policy on one workload.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyCapacity {
    pub policy: String,
    pub capacity: Capacity,
    /// (scale, TTFT p90 s) of every run, by scale.
    pub curve: Vec<(f64, f64)>,
}

/// One workload's results.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub workload: String,
    pub what: String,
    pub requests: usize,
    /// Requests per second at scale 1.
    pub base_rate: f64,
    /// The fleet's token-budget bound, as a scale.
    pub upper_bound: f64,
    pub global_hit_rate: f64,
    pub policies: Vec<PolicyCapacity>,
}

/// `reqs` with arrivals `scale` times as dense.
pub fn scaled(reqs: &[SimRequest], scale: f64) -> Vec<SimRequest> {
    reqs.iter().map(|r| SimRequest { arrival_s: r.arrival_s / scale, ..r.clone() }).collect()
}

/// The metrics an SLO can name (see [`measured`]).
pub const METRICS: &[&str] = &["ttft_p50", "ttft_p90", "ttft_p99", "ttft_mean", "itl_p90"];

/// What the SLO reads from a run.
pub fn measured(r: &PolicyResult) -> Measured {
    let values = [
        ("ttft_p50", r.ttft_p50_s),
        ("ttft_p90", r.ttft_p90_s),
        ("ttft_p99", r.ttft_p99_s),
        ("ttft_mean", r.ttft_mean_s),
        ("itl_p90", r.itl_p90_s),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Measured { values, completed: 1.0 - r.rejected as f64 / r.requests.max(1) as f64 }
}

/// Runs every policy's capacity search on `case`, `o.threads` simulations at a time.
pub fn run_case(case: &Case, o: &Options) -> CaseResult {
    let reqs = &case.reqs;
    let span = reqs.last().map_or(0.0, |r| r.arrival_s) - reqs.first().map_or(0.0, |r| r.arrival_s);
    let f = &case.fleet;
    let global = offline::global_cache_hit_rate(reqs, f.block_size, f.servers * f.gpu_blocks);
    let budget = Budget {
        servers: f.servers,
        prefill_s_per_token: f.latency.batched_prefill_per_token.as_secs_f64(),
        decode_s_per_token: f.latency.inter_token.as_secs_f64() * f.latency.load_factor
            / f.latency.max_num_seqs.max(1) as f64,
    };
    let prompt: f64 = reqs.iter().map(|r| r.prompt_tokens as f64).sum();
    let output: f64 = reqs.iter().map(|r| r.output_tokens as f64).sum();
    let bound = capacity::upper_bound(&budget, prompt, output, global, span);
    let queue = Mutex::new(o.policies.clone().into_iter().enumerate().collect::<Vec<_>>());
    let done = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..o.threads.max(1) {
            s.spawn(|| loop {
                let Some((i, policy)) = queue.lock().ok().and_then(|mut q| q.pop()) else { return };
                let mut curve = Vec::new();
                let capacity = capacity::find(1.0, o.tolerance, o.max_runs, &o.slo, |scale| {
                    let r = match kvroute_schedule::named_profile(&policy) {
                        Ok(p) => offline::run(&policy, &p, &scaled(reqs, scale), f),
                        Err(_) => return Measured::default(),
                    };
                    curve.push((scale, r.ttft_p90_s));
                    measured(&r)
                });
                curve.sort_by(|a, b| a.0.total_cmp(&b.0));
                if let Ok(mut d) = done.lock() {
                    d.push((i, PolicyCapacity { policy, capacity, curve }));
                }
            });
        }
    });
    let mut policies = done.into_inner().unwrap_or_default();
    policies.sort_by_key(|p| p.0);
    CaseResult {
        workload: case.name.clone(),
        what: case.what.clone(),
        requests: reqs.len(),
        base_rate: reqs.len() as f64 / span.max(1e-9),
        upper_bound: bound,
        global_hit_rate: global,
        policies: policies.into_iter().map(|p| p.1).collect(),
    }
}

/// The suite table: capacity (scale and req/s) per policy per workload, each policy's ratio
/// to `reference` (kvroute's default), and the upper bound.
pub fn markdown(results: &[CaseResult], slo: &Slo, reference: &str) -> String {
    let Some(first) = results.first() else { return String::new() };
    let names: Vec<&str> = first.policies.iter().map(|p| p.policy.as_str()).collect();
    let mut s = format!("SLO: {slo}. Capacity = the highest arrival-rate scale meeting it (req/s at that scale); ×: ratio to `{reference}`; bound: the fleet's token budget at the global-cache hit rate.\n\n| workload | bound |");
    for n in &names {
        s += &format!(" {n} |");
    }
    s += "\n|---|---|";
    s += &"---|".repeat(names.len());
    s += "\n";
    for r in results {
        let reference = r.policies.iter().find(|p| p.policy == reference).map(|p| p.capacity.met);
        s += &format!("| {} | {:.2} ({:.1}/s) |", r.workload, r.upper_bound, r.upper_bound * r.base_rate);
        for p in &r.policies {
            let c = p.capacity.met;
            let ratio = match reference {
                Some(d) if d > 0.0 => format!(" ×{:.2}", c / d),
                _ => String::new(),
            };
            s += &format!(" {c:.2} ({:.1}/s){ratio} |", c * r.base_rate);
        }
        s += "\n";
    }
    s
}

/// TTFT p90 against the arrival-rate scale, every policy (log x; y clipped at
/// `clip_s`, so the region around the SLO stays readable when overloaded runs take
/// minutes).
pub fn svg(r: &CaseResult, clip_s: f64) -> String {
    let series: Vec<Series> = r
        .policies
        .iter()
        .map(|p| Series { label: p.policy.clone(), points: p.curve.iter().map(|&(x, y)| (x, y.min(clip_s))).collect() })
        .collect();
    let title = format!("{}: TTFT p90 vs arrival-rate scale (clipped at {clip_s} s)", r.workload);
    line_chart(&title, "arrival-rate scale", "TTFT p90 (s)", &series, true)
}

/// The default traces directory: `../shared/traces` from the working directory.
pub fn default_traces() -> PathBuf {
    Path::new("../shared/traces").to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_sim::config::Profile as LatencyProfile;

    #[test]
    fn a_small_case_brackets_each_policy_below_the_physical_bound() {
        let fleet = FleetConfig {
            servers: 2,
            gpu_blocks: 2048,
            block_size: 16,
            latency: LatencyProfile::B8H100.latency(),
            event_delay: std::time::Duration::from_millis(10),
            scrape_interval: std::time::Duration::from_millis(50),
            seed: 1,
            engine: offline::EngineModel::Continuous,
            max_batched_tokens: 8192,
            prefill_servers: 0,
        };
        let z =
            ZipfGroups { groups: 8, requests: 300, zipf_s: 1.1, system: 1024, question: 128, output: 32, qps: 10.0 };
        let case = Case { name: "zipf".into(), what: String::new(), reqs: z.generate(1, 16), fleet };
        let o = Options {
            traces: default_traces(),
            seed: 1,
            slo: "ttft_p90<=500ms".parse().unwrap(),
            policies: vec!["round-robin".into(), "default".into()],
            tolerance: 0.1,
            max_runs: 12,
            threads: 2,
            only: vec![],
        };
        let r = run_case(&case, &o);
        assert_eq!(r.policies.iter().map(|p| p.policy.as_str()).collect::<Vec<_>>(), ["round-robin", "default"]);
        for p in &r.policies {
            let c = &p.capacity;
            assert!(c.met > 0.0 && c.failed.is_finite() && c.failed / c.met <= 1.1, "{}: {c:?}", p.policy);
            // The bound is a sustained rate; a finite trace can run slightly above it while the
            // backlog it builds only reaches the last tenth of requests (beyond p90).
            assert!(c.met <= 1.1 * r.upper_bound, "{}: {} above the physical bound {}", p.policy, c.met, r.upper_bound);
            assert_eq!(p.curve.len(), c.runs);
        }
        let md = markdown(std::slice::from_ref(&r), &o.slo, "default");
        assert!(md.contains("| zipf |") && md.contains("×1.00"), "{md}");
        assert!(svg(&r, 2.0).starts_with("<svg"));
    }
}
