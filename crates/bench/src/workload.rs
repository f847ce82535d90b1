//! Workloads as the offline simulation consumes them: arrival time, block keys of the
//! prompt at the simulation's block size, prompt and output lengths, session.

use std::io::BufRead;

use rand::{Rng, SeedableRng};
use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// One request.
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub arrival_s: f64,
    /// Keys of the prompt's full blocks, prefix-chained (equal keys ⇔ equal prefix).
    pub keys: Vec<u64>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub session: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("line {line}: {msg}")]
    Parse { line: usize, msg: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: usize,
    output_length: usize,
    hash_ids: Vec<u64>,
}

/// A Mooncake-format JSONL trace (`timestamp` ms, lengths, `hash_ids` of
/// `trace_block`-token blocks, prefix-chained). Each trace block becomes
/// `trace_block / block_size` keys derived from its id, so sharing is reproduced exactly.
pub fn mooncake(
    path: &std::path::Path,
    trace_block: usize,
    block_size: usize,
    time_scale: f64,
    max: Option<usize>,
) -> Result<Vec<SimRequest>, WorkloadError> {
    if block_size == 0 || trace_block % block_size != 0 {
        return Err(WorkloadError::Invalid(format!("block size {block_size} must divide the trace's {trace_block}")));
    }
    let per = trace_block / block_size;
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut out = Vec::new();
    for (i, line) in f.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let m: MooncakeLine =
            serde_json::from_str(&line).map_err(|e| WorkloadError::Parse { line: i + 1, msg: e.to_string() })?;
        let full_blocks = m.input_length / block_size;
        let mut keys = Vec::with_capacity(full_blocks);
        'ids: for &id in &m.hash_ids {
            for j in 0..per {
                if keys.len() == full_blocks {
                    break 'ids;
                }
                keys.push(xxh3_64_with_seed(&id.to_le_bytes(), j as u64 + 1));
            }
        }
        out.push(SimRequest {
            arrival_s: m.timestamp / 1000.0 * time_scale,
            keys,
            prompt_tokens: m.input_length,
            output_tokens: m.output_length.max(1),
            session: i as u64,
        });
        if max.is_some_and(|n| out.len() >= n) {
            break;
        }
    }
    Ok(out)
}

/// Shared-prefix workload (llm-d-benchmark / SGLang style): `groups` system prompts of
/// `system` tokens, `per_group` questions of `question` tokens each, Poisson arrivals at
/// `qps`, groups interleaved at random.
pub struct SharedPrefix {
    pub groups: usize,
    pub per_group: usize,
    pub system: usize,
    pub question: usize,
    pub output: usize,
    pub qps: f64,
}

impl SharedPrefix {
    /// Presets from `../shared/research/workloads.md`.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "llmd-synthetic" => Self { groups: 32, per_group: 32, system: 2048, question: 256, output: 256, qps: 20.0 },
            "llmd-precise" => Self { groups: 150, per_group: 5, system: 6000, question: 1200, output: 1000, qps: 10.0 },
            "sglang-gsp" => Self { groups: 64, per_group: 16, system: 2048, question: 128, output: 256, qps: 20.0 },
            _ => return None,
        })
    }

    pub fn generate(&self, block_size: usize, seed: u64) -> Vec<SimRequest> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut order: Vec<(usize, usize)> =
            (0..self.groups).flat_map(|g| (0..self.per_group).map(move |q| (g, q))).collect();
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        let mut t = 0.0;
        order
            .into_iter()
            .map(|(g, q)| {
                t += -(1.0 - rng.random::<f64>()).ln() / self.qps;
                let n = self.system + self.question;
                let mut keys = Vec::with_capacity(n / block_size);
                let mut parent = xxh3_64_with_seed(&(g as u64).to_le_bytes(), seed);
                for b in 0..n / block_size {
                    // Blocks inside the system prompt are shared by the group; later ones are unique.
                    let tag = if (b + 1) * block_size <= self.system { 0 } else { 1 + q as u64 };
                    parent = xxh3_64_with_seed(&[parent.to_le_bytes(), tag.to_le_bytes()].concat(), b as u64);
                    keys.push(parent);
                }
                SimRequest {
                    arrival_s: t,
                    keys,
                    prompt_tokens: n,
                    output_tokens: self.output,
                    session: (g * self.per_group + q) as u64,
                }
            })
            .collect()
    }
}
