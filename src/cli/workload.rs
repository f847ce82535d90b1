//! `--workload …` flags shared by `kvroute simulate` (offline) and `kvroute bench` (live).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kvroute_bench::workload::{self, MultiTurn, SharedPrefix, SimRequest};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// llm-d's seed test: 1 warm-up + `--requests` identical prompts, one session.
    SeedTest,
    /// Shared-prefix groups (`--preset`, overridable).
    SharedPrefix,
    /// LMCache multi-round QA: users × rounds, shared system prompt, per-user history.
    MultiTurn,
    /// Trace replay: Mooncake JSONL (`hash_ids`) or Azure CSV (lengths; prefixes synthesized).
    Trace,
}

#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// The workload [default: trace when --trace is given, else shared-prefix].
    #[arg(long, value_enum)]
    pub workload: Option<WorkloadKind>,
    /// Trace file: `.jsonl` (Mooncake format) or `.csv` (Azure format).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Tokens per `hash_ids` block in a Mooncake trace.
    #[arg(long, default_value_t = 512)]
    pub trace_block_size: usize,
    /// Multiply arrival times by this (0.5 = twice the load).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Use at most this many requests.
    #[arg(long)]
    pub max_requests: Option<usize>,
    /// Shared-prefix preset: llmd-synthetic, llmd-precise (warm-up + QPS ladder), sglang-gsp.
    #[arg(long, default_value = "llmd-synthetic")]
    pub preset: String,
    /// Shared-prefix groups (overrides the preset).
    #[arg(long)]
    pub groups: Option<usize>,
    /// Prompts per group (overrides the preset).
    #[arg(long)]
    pub prompts_per_group: Option<usize>,
    /// System-prompt tokens (shared-prefix, multi-turn).
    #[arg(long)]
    pub system_tokens: Option<usize>,
    /// Question tokens (shared-prefix, multi-turn).
    #[arg(long)]
    pub question_tokens: Option<usize>,
    /// Output tokens per request (all synthetic workloads).
    #[arg(long)]
    pub output_tokens: Option<usize>,
    /// Arrival rate, requests/s (shared-prefix: every ladder stage; multi-turn: overall).
    #[arg(long)]
    pub qps: Option<f64>,
    /// Seed test: identical requests after the warm-up.
    #[arg(long, default_value_t = 30)]
    pub requests: usize,
    /// Seed test: prompt tokens (≈ the blog's 159-token paragraph).
    #[arg(long, default_value_t = 159)]
    pub prompt_tokens: usize,
    /// Multi-turn: users.
    #[arg(long, default_value_t = 10)]
    pub users: usize,
    /// Multi-turn: rounds per user.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Multi-turn: per-user history tokens.
    #[arg(long, default_value_t = 2000)]
    pub history_tokens: usize,
    /// Azure trace: prefix groups synthesized over the trace.
    #[arg(long, default_value_t = 64)]
    pub prefix_groups: usize,
    /// Azure trace: tokens each request shares with its group.
    #[arg(long, default_value_t = 512)]
    pub prefix_tokens: usize,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl WorkloadArgs {
    /// The requests and a one-line description.
    pub fn generate(&self, block_size: usize) -> anyhow::Result<(Vec<SimRequest>, String)> {
        let kind = self.workload.unwrap_or(if self.trace.is_some() {
            WorkloadKind::Trace
        } else {
            WorkloadKind::SharedPrefix
        });
        let (mut reqs, desc) = match kind {
            WorkloadKind::SeedTest => {
                let out = self.output_tokens.unwrap_or(16);
                (
                    workload::seed_test(self.requests, self.prompt_tokens, out, 0.8 * self.time_scale, block_size),
                    format!("seed-test (1 + {} × {} tokens)", self.requests, self.prompt_tokens),
                )
            }
            WorkloadKind::SharedPrefix => {
                let Some(mut p) = SharedPrefix::preset(&self.preset) else {
                    bail!("unknown preset {:?} (llmd-synthetic, llmd-precise, sglang-gsp)", self.preset)
                };
                p.groups = self.groups.unwrap_or(p.groups);
                p.per_group = self.prompts_per_group.unwrap_or(p.per_group);
                p.system = self.system_tokens.unwrap_or(p.system);
                p.question = self.question_tokens.unwrap_or(p.question);
                p.output = self.output_tokens.unwrap_or(p.output);
                if let Some(q) = self.qps {
                    p.qps = q;
                    p.stages.iter_mut().for_each(|s| s.0 = q);
                }
                let mut r = p.generate(block_size, self.seed);
                r.iter_mut().for_each(|x| x.arrival_s *= self.time_scale);
                let ladder =
                    if p.stages.is_empty() { String::new() } else { format!(", {} ladder stages", p.stages.len()) };
                let d = format!(
                    "shared-prefix {} ({}×{}, {}/{}/{} tokens, {} qps{ladder})",
                    self.preset, p.groups, p.per_group, p.system, p.question, p.output, p.qps
                );
                (r, d)
            }
            WorkloadKind::MultiTurn => {
                let d = MultiTurn::default();
                let m = MultiTurn {
                    users: self.users,
                    rounds: self.rounds,
                    system: self.system_tokens.unwrap_or(d.system),
                    history: self.history_tokens,
                    question: self.question_tokens.unwrap_or(d.question),
                    answer: self.output_tokens.unwrap_or(d.answer),
                    qps: self.qps.unwrap_or(d.qps),
                };
                let mut r = m.generate(block_size, self.seed);
                r.iter_mut().for_each(|x| x.arrival_s *= self.time_scale);
                (r, format!("multi-turn ({} users × {} rounds, {} qps)", m.users, m.rounds, m.qps))
            }
            WorkloadKind::Trace => {
                let path = self.trace.as_ref().context("--workload trace needs --trace FILE (.jsonl or .csv)")?;
                let r = if path.extension().is_some_and(|e| e == "csv") {
                    workload::azure(
                        path,
                        self.prefix_groups,
                        self.prefix_tokens,
                        block_size,
                        self.time_scale,
                        self.max_requests,
                        self.seed,
                    )
                } else {
                    workload::mooncake(path, self.trace_block_size, block_size, self.time_scale, self.max_requests)
                }
                .with_context(|| format!("cannot read {}", path.display()))?;
                (r, format!("trace {}", path.display()))
            }
        };
        if let Some(n) = self.max_requests {
            reqs.truncate(n);
        }
        anyhow::ensure!(!reqs.is_empty(), "the workload has no requests");
        Ok((reqs, desc))
    }
}
