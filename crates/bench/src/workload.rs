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
/// Requests are returned in arrival order (`timestamp`, stable), whatever the file's order.
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
    let (mut out, mut sorted) = (Vec::new(), true);
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
        // A sorted trace (Mooncake's) can stop early; a recorded one is read whole first.
        sorted &= out.len() < 2 || out[out.len() - 2].arrival_s <= out[out.len() - 1].arrival_s;
        if sorted && max.is_some_and(|n| out.len() >= n) {
            break;
        }
    }
    // `kvroute serve --record-trace` writes requests as they complete: replay them in
    // arrival order (stable, so equal timestamps keep the file's order).
    out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    if let Some(n) = max {
        out.truncate(n);
    }
    Ok(out)
}

/// Keys of the full blocks of a virtual token stream, prefix-chained: equal keys ⇔ equal
/// token prefix.
pub fn chain_keys(tokens: &[u64], block_size: usize, seed: u64) -> Vec<u64> {
    let mut parent = seed;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|b| {
            let mut buf = Vec::with_capacity(8 * (b.len() + 1));
            buf.extend_from_slice(&parent.to_le_bytes());
            b.iter().for_each(|t| buf.extend_from_slice(&t.to_le_bytes()));
            parent = xxh3_64_with_seed(&buf, 0x6b76);
            parent
        })
        .collect()
}

/// `n` virtual tokens owned by `owner` (distinct owners never share a token).
pub(crate) fn span(owner: u64, n: usize) -> impl Iterator<Item = u64> {
    (0..n as u64).map(move |i| xxh3_64_with_seed(&i.to_le_bytes(), owner))
}

pub(crate) fn poisson_gap(rng: &mut rand::rngs::StdRng, qps: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() / qps.max(1e-9)
}

/// Shared-prefix workload (llm-d-benchmark / SGLang style): `groups` system prompts of
/// `system` tokens, `per_group` questions of `question` tokens each. Without `stages`,
/// every prompt is sent once, groups interleaved at random, Poisson arrivals at `qps`.
/// With `stages` (llm-d's QPS ladder), a warm-up pass sends every prompt once at `qps`
/// ("seat residents"), then each stage `(qps, seconds)` sends Poisson arrivals of prompts
/// drawn uniformly from the same set, so the working set is re-requested.
#[derive(Clone, Debug)]
pub struct SharedPrefix {
    pub groups: usize,
    pub per_group: usize,
    pub system: usize,
    pub question: usize,
    pub output: usize,
    pub qps: f64,
    pub stages: Vec<(f64, f64)>,
}

/// llm-d-benchmark's `guide_precise-prefix-cache-routing_1` ladder after the warm-up.
pub const LLMD_PRECISE_LADDER: [(f64, f64); 16] = [
    (3.0, 20.0),
    (10.0, 20.0),
    (15.0, 20.0),
    (20.0, 38.0),
    (22.0, 34.0),
    (25.0, 30.0),
    (30.0, 25.0),
    (35.0, 21.0),
    (40.0, 38.0),
    (43.0, 36.0),
    (46.0, 33.0),
    (49.0, 30.0),
    (52.0, 29.0),
    (55.0, 27.0),
    (57.0, 26.0),
    (60.0, 25.0),
];

impl SharedPrefix {
    /// Presets from `../shared/research/workloads.md`.
    pub fn preset(name: &str) -> Option<Self> {
        let p = |groups, per_group, system, question, output, qps| Self {
            groups,
            per_group,
            system,
            question,
            output,
            qps,
            stages: vec![],
        };
        Some(match name {
            "llmd-synthetic" => p(32, 32, 2048, 256, 256, 20.0),
            "llmd-precise" => Self { stages: LLMD_PRECISE_LADDER.to_vec(), ..p(150, 5, 6000, 1200, 1000, 15.0) },
            "sglang-gsp" => p(64, 16, 2048, 128, 256, 20.0),
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
        let mut arrivals: Vec<(f64, (usize, usize))> = order
            .into_iter()
            .map(|x| {
                t += poisson_gap(&mut rng, self.qps);
                (t, x)
            })
            .collect();
        for &(qps, secs) in &self.stages {
            let end = t + secs;
            loop {
                t += poisson_gap(&mut rng, qps);
                if t > end || self.groups * self.per_group == 0 {
                    break;
                }
                arrivals.push((t, (rng.random_range(0..self.groups), rng.random_range(0..self.per_group))));
            }
            t = end;
        }
        let mut cache: std::collections::HashMap<(usize, usize), Vec<u64>> = Default::default();
        arrivals
            .into_iter()
            .map(|(t, (g, q))| {
                let keys = cache
                    .entry((g, q))
                    .or_insert_with(|| {
                        let tokens: Vec<u64> = span(1 + g as u64, self.system)
                            .chain(span(((g as u64) << 32) | (q as u64 + 1) << 1 | 1, self.question))
                            .collect();
                        chain_keys(&tokens, block_size, seed)
                    })
                    .clone();
                SimRequest {
                    arrival_s: t,
                    keys,
                    prompt_tokens: self.system + self.question,
                    output_tokens: self.output,
                    session: (g * self.per_group + q) as u64,
                }
            })
            .collect()
    }
}

/// llm-d's "seed test": one warm-up and then `requests` identical prompts of
/// `prompt_tokens`, sent one after another `gap_s` apart, one session.
pub fn seed_test(
    requests: usize,
    prompt_tokens: usize,
    output: usize,
    gap_s: f64,
    block_size: usize,
) -> Vec<SimRequest> {
    let tokens: Vec<u64> = span(0x5eed, prompt_tokens).collect();
    let keys = chain_keys(&tokens, block_size, 0);
    (0..=requests)
        .map(|i| SimRequest {
            arrival_s: i as f64 * gap_s,
            keys: keys.clone(),
            prompt_tokens,
            output_tokens: output,
            session: 0,
        })
        .collect()
}

/// LMCache / production-stack multi-round QA: `users` each hold a conversation of
/// `rounds` turns. Every prompt starts with the same `system` tokens, then the user's own
/// `history` tokens, then every earlier question and answer; each round adds a `question`
/// and gets an `answer`. A user asks every `users / qps` seconds; users start staggered.
#[derive(Clone, Debug)]
pub struct MultiTurn {
    pub users: usize,
    pub rounds: usize,
    pub system: usize,
    pub history: usize,
    pub question: usize,
    pub answer: usize,
    pub qps: f64,
}

impl Default for MultiTurn {
    /// production-stack's README example (10 users, 5 rounds, 1000/2000/100).
    fn default() -> Self {
        Self { users: 10, rounds: 5, system: 1000, history: 2000, question: 20, answer: 100, qps: 0.5 }
    }
}

impl MultiTurn {
    pub fn generate(&self, block_size: usize, seed: u64) -> Vec<SimRequest> {
        let gap = self.users as f64 / self.qps.max(1e-9);
        let mut out = Vec::new();
        for u in 0..self.users {
            let owner = 0x1000 + u as u64;
            let mut tokens: Vec<u64> = span(1, self.system).chain(span(owner, self.history)).collect();
            let start = u as f64 * gap / self.users as f64;
            for k in 0..self.rounds {
                tokens.extend(span(owner ^ ((k as u64 + 1) << 40), self.question));
                out.push(SimRequest {
                    arrival_s: start + k as f64 * gap,
                    keys: chain_keys(&tokens, block_size, seed),
                    prompt_tokens: tokens.len(),
                    output_tokens: self.answer,
                    session: u as u64,
                });
                tokens.extend(span(owner ^ ((k as u64 + 1) << 48), self.answer));
            }
        }
        out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        out
    }
}

/// An Azure LLM inference trace (CSV `TIMESTAMP,ContextTokens,GeneratedTokens`): real
/// arrivals and lengths, no content. Prefix sharing is synthesized: each request belongs
/// to one of `groups` groups (uniform, seeded) whose first `prefix_tokens` tokens it shares
/// (capped at its length); the rest is its own.
pub fn azure(
    path: &std::path::Path,
    groups: usize,
    prefix_tokens: usize,
    block_size: usize,
    time_scale: f64,
    max: Option<usize>,
    seed: u64,
) -> Result<Vec<SimRequest>, WorkloadError> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut t0 = None;
    for (i, line) in f.lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with("TIMESTAMP")) {
            continue;
        }
        let bad = |msg: &str| WorkloadError::Parse { line: i + 1, msg: msg.to_string() };
        let mut cols = line.split(',');
        let (Some(ts), Some(input), Some(output)) = (cols.next(), cols.next(), cols.next()) else {
            return Err(bad("expected TIMESTAMP,ContextTokens,GeneratedTokens"));
        };
        let at = parse_timestamp(ts).ok_or_else(|| bad("bad TIMESTAMP (want YYYY-MM-DD HH:MM:SS.fff)"))?;
        let input: usize = input.trim().parse().map_err(|_| bad("bad ContextTokens"))?;
        let output: usize = output.trim().parse().map_err(|_| bad("bad GeneratedTokens"))?;
        let start = *t0.get_or_insert(at);
        let g = rng.random_range(0..groups.max(1)) as u64;
        let shared = prefix_tokens.min(input);
        let tokens: Vec<u64> = span(1 + g, shared).chain(span((1 << 40) | i as u64, input - shared)).collect();
        out.push(SimRequest {
            arrival_s: (at - start) * time_scale,
            keys: chain_keys(&tokens, block_size, seed),
            prompt_tokens: input,
            output_tokens: output.max(1),
            session: i as u64,
        });
        if max.is_some_and(|n| out.len() >= n) {
            break;
        }
    }
    Ok(out)
}

/// Seconds since the Unix epoch of `YYYY-MM-DD HH:MM:SS[.fraction]` (UTC).
fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, sec) =
        (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days from the civil date (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_to_epoch_seconds() {
        assert_eq!(parse_timestamp("1970-01-02 00:00:01.5"), Some(86_401.5));
        assert_eq!(parse_timestamp("2023-11-16 18:15:46.0"), Some(1_700_158_546.0));
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn shared_prefix_shares_exactly_the_system_prompt_blocks() {
        let p = SharedPrefix { groups: 2, per_group: 2, system: 64, question: 40, output: 1, qps: 1.0, stages: vec![] };
        let r = p.generate(16, 1);
        assert_eq!(r.len(), 4);
        for a in &r {
            assert_eq!(a.keys.len(), 104 / 16);
            for b in &r {
                let common = a.keys.iter().zip(&b.keys).take_while(|(x, y)| x == y).count();
                let expect = if a.session == b.session {
                    a.keys.len()
                } else if a.session / 2 == b.session / 2 {
                    4
                } else {
                    0
                };
                assert_eq!(common, expect);
            }
        }
        // The ladder re-requests the same prompts.
        let l = SharedPrefix { stages: vec![(10.0, 5.0)], ..p }.generate(16, 1);
        assert!(l.len() > 4 + 20, "{}", l.len());
        assert!(l[4..].iter().all(|x| r.iter().any(|y| y.keys == x.keys)));
        assert!(l.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
    }

    #[test]
    fn mooncake_traces_replay_in_arrival_order_whatever_the_file_order() {
        // As `kvroute serve --record-trace` writes them: by completion, not arrival.
        let p = std::env::temp_dir().join(format!("kvroute-mooncake-order-{}.jsonl", std::process::id()));
        let line = |t: u64, ids: &str| {
            format!("{{\"timestamp\":{t},\"input_length\":40,\"output_length\":3,\"hash_ids\":[{ids}]}}\n")
        };
        std::fs::write(&p, [line(30, "1,2"), line(10, "1,3"), line(20, "7"), line(10, "9")].concat()).unwrap();
        let r = mooncake(&p, 16, 16, 1.0, None).unwrap();
        let at: Vec<(f64, u64)> = r.iter().map(|x| (x.arrival_s * 1000.0, x.session)).collect();
        assert_eq!(at, [(10.0, 1), (10.0, 3), (20.0, 2), (30.0, 0)], "sorted, ties in file order");
        assert_eq!(r[0].keys.len(), 2);
        assert_eq!(r[0].keys[0], r[3].keys[0], "shared first id, shared first key");
        assert_ne!(r[0].keys[1], r[3].keys[1]);
        // --max-requests takes the first arrivals, not the first lines.
        let two = mooncake(&p, 16, 16, 1.0, Some(2)).unwrap();
        assert_eq!(two.iter().map(|x| x.session).collect::<Vec<_>>(), [1, 3]);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn multi_turn_rounds_extend_the_previous_prompt() {
        let m = MultiTurn { users: 2, rounds: 3, system: 32, history: 32, question: 8, answer: 24, qps: 1.0 };
        let r = m.generate(16, 1);
        assert_eq!(r.len(), 6);
        let user0: Vec<_> = r.iter().filter(|x| x.session == 0).collect();
        for w in user0.windows(2) {
            assert_eq!(w[1].prompt_tokens, w[0].prompt_tokens + 8 + 24);
            assert_eq!(&w[1].keys[..w[0].keys.len()], &w[0].keys[..], "a round extends the last prompt");
        }
        let user1 = r.iter().find(|x| x.session == 1).map(|x| &x.keys);
        let common = user0[0].keys.iter().zip(user1.into_iter().flatten()).take_while(|(a, b)| a == b).count();
        assert_eq!(common, 2, "users share only the system prompt");
    }
}
