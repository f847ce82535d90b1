//! `kvroute simulate --find-capacity` and `--suite`: capacity at an SLO per policy, on one
//! workload or on the whole workload suite (`kvroute_bench::capacity`, `::suite`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kvroute_bench::capacity::Slo;
use kvroute_bench::offline::FleetConfig;
use kvroute_bench::suite::{self, CaseResult, Options};
use kvroute_bench::workload::SimRequest;

#[derive(Args, Debug)]
pub struct CapacityArgs {
    /// For each policy, the highest arrival-rate scale at which --slo holds (bisection on
    /// the seeded workload; the bracket and the runs it took are reported), with the
    /// fleet's upper bound from its token budget.
    #[arg(long)]
    pub find_capacity: bool,
    /// Run the workload suite instead of one workload (llmd-precise and half its KV,
    /// Mooncake, multi-turn hot spot, Azure code and conversation, Zipf groups, bursty,
    /// mixed lengths): capacity per policy per workload, markdown + JSON + SVG
    /// (--report-dir, --output-json).
    #[arg(long)]
    pub suite: bool,
    /// The SLO: `METRIC<=LIMIT` items (ttft_p50, ttft_p90, ttft_p99, ttft_mean, itl_p90;
    /// units s, ms, us) and optionally `completed>=F` (default 0.99).
    #[arg(long, default_value = "ttft_p90<=2s,itl_p90<=100ms")]
    pub slo: String,
    /// Bisection stops when the bracket is within this ratio.
    #[arg(long, default_value_t = 0.05)]
    pub capacity_tolerance: f64,
    /// At most this many simulations per policy (and workload).
    #[arg(long, default_value_t = 14)]
    pub capacity_max_runs: usize,
    /// The traces directory of the suite (Mooncake, Azure).
    #[arg(long, default_value = "../shared/traces")]
    pub traces: PathBuf,
    /// Suite: only these workloads (comma-separated names). Without --suite, the first is
    /// the workload (and fleet) of a plain comparison or of --find-capacity: llmd-precise,
    /// llmd-precise-half-kv, mooncake, multi-turn, azure-code, azure-conv, zipf, bursty, mixed.
    #[arg(long)]
    pub suite_workloads: Option<String>,
    /// Parallel simulations (default: the machine's cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl CapacityArgs {
    fn options(&self, seed: u64, policies: &[String]) -> anyhow::Result<Options> {
        let slo: Slo = self.slo.parse().map_err(|e| anyhow::anyhow!("--slo: {e}"))?;
        for o in &slo.objectives {
            anyhow::ensure!(
                suite::METRICS.contains(&o.metric.as_str()),
                "--slo: unknown metric {:?} (known: {})",
                o.metric,
                suite::METRICS.join(", ")
            );
        }
        Ok(Options {
            traces: self.traces.clone(),
            seed,
            slo,
            policies: policies.to_vec(),
            tolerance: self.capacity_tolerance.max(0.001),
            max_runs: self.capacity_max_runs.max(1),
            threads: self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            only: self.suite_workloads.iter().flat_map(|s| s.split(',')).map(|s| s.trim().to_string()).collect(),
        })
    }
}

/// The first workload `--suite-workloads` names, with its fleet.
pub fn suite_case(a: &CapacityArgs, base: &FleetConfig, seed: u64) -> anyhow::Result<suite::Case> {
    let o = a.options(seed, &[])?;
    let cases = suite::cases(&o, base).with_context(|| format!("reading traces in {}", o.traces.display()))?;
    cases.into_iter().next().context("--suite-workloads names no workload of the suite")
}

/// `--find-capacity` on one workload.
#[allow(clippy::too_many_arguments)]
pub fn find(
    a: &CapacityArgs,
    reqs: Vec<SimRequest>,
    desc: &str,
    cfg: &FleetConfig,
    policies: &[String],
    seed: u64,
    output_json: Option<&Path>,
    report_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let o = a.options(seed, policies)?;
    let case = suite::Case { name: "workload".into(), what: desc.to_string(), reqs, fleet: cfg.clone() };
    let r = suite::run_case(&case, &o);
    let mut out = format!("{desc}: capacity at {}\n\n| policy | capacity (scale) | req/s | of the bound | bracket | runs |\n|---|---|---|---|---|---|\n", o.slo);
    for p in &r.policies {
        let c = &p.capacity;
        out += &format!(
            "| {} | {:.3} | {:.2} | {:.0} % | {:.3} – {} | {} |\n",
            p.policy,
            c.met,
            c.met * r.base_rate,
            100.0 * c.met / r.upper_bound,
            c.met,
            if c.failed.is_finite() { format!("{:.3}", c.failed) } else { "∞".into() },
            c.runs
        );
    }
    out += &format!(
        "\nupper bound (token budget at the global-cache hit rate {:.1} %): scale {:.3} = {:.2} req/s\n(searched in {:.1} s)",
        100.0 * r.global_hit_rate,
        r.upper_bound,
        r.upper_bound * r.base_rate,
        t0.elapsed().as_secs_f64()
    );
    println!("{out}");
    write(std::slice::from_ref(&r), &o, output_json, report_dir)
}

/// `--suite`.
pub fn run_suite(
    a: &CapacityArgs,
    base: &FleetConfig,
    policies: &[String],
    seed: u64,
    output_json: Option<&Path>,
    report_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let o = a.options(seed, policies)?;
    let cases = suite::cases(&o, base).with_context(|| format!("reading traces in {}", o.traces.display()))?;
    anyhow::ensure!(!cases.is_empty(), "--suite-workloads names no workload of the suite");
    let mut results = Vec::new();
    for c in &cases {
        let t = Instant::now();
        let r = suite::run_case(c, &o);
        eprintln!("{}: {} requests, {:.1} s", c.name, c.reqs.len(), t.elapsed().as_secs_f64());
        results.push(r);
    }
    let table = suite::markdown(&results, &o.slo, "default");
    println!("{table}\n(suite simulated in {:.1} s, {} threads)", t0.elapsed().as_secs_f64(), o.threads);
    write(&results, &o, output_json, report_dir)
}

fn write(results: &[CaseResult], o: &Options, json: Option<&Path>, dir: Option<&Path>) -> anyhow::Result<()> {
    if let Some(p) = json {
        let doc = serde_json::json!({"slo": o.slo.to_string(), "seed": o.seed, "workloads": results});
        std::fs::write(p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(d) = dir {
        // Plots stop at 4× the SLO's strictest TTFT limit (or 10 s).
        let clip = o
            .slo
            .objectives
            .iter()
            .filter(|x| x.metric.starts_with("ttft"))
            .map(|x| 4.0 * x.limit_s)
            .fold(10.0, f64::min);
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        let mut md =
            format!("# kvroute simulate: capacity at an SLO\n\n{}\n", suite::markdown(results, &o.slo, "default"));
        for r in results {
            let file = format!("capacity_{}.svg", r.workload);
            std::fs::write(d.join(&file), suite::svg(r, clip)).with_context(|| format!("cannot write {file}"))?;
            md += &format!(
                "\n## {}\n\n{} ({} requests)\n\n![TTFT p90 vs scale]({file})\n",
                r.workload, r.what, r.requests
            );
        }
        std::fs::write(d.join("report.md"), md)?;
        println!("report written to {}/report.md", d.display());
    }
    Ok(())
}
