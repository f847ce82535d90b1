//! `kvroute demo`: an in-process simulated fleet, to see the pipeline work end to end
//! without GPUs or network: each pod is a vLLM-like prefix cache (LRU over full blocks)
//! that publishes real msgpack KV-event payloads (half the fleet in vLLM 0.23's array
//! layout, half in 0.33's map layout); kvroute decodes them, indexes them, and routes a
//! shared-prefix workload by longest cached prefix. Events reach the router a few requests
//! late (`--event-lag`), as over a real network; kvroute covers the gap with speculative
//! entries for the pod it picked. Round-robin and random routing run on the same
//! workload for comparison.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use clap::Args;
use kvroute_events::{decode_batch, encode_batch, BlockRemoved, BlockStored, EventBatch, KvEvent, WireFormat};
use kvroute_index::{BlockIndex, EventApplier, InMemoryIndex, IndexConfig, KeyMode, PodId, Tiers};
use kvroute_keys::{BlockHasher, HashAlgo, HashConfig, RequestExtras};
use kvroute_score::{LongestPrefixScorer, Scratch};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of simulated vLLM pods.
    #[arg(long, default_value_t = 8)]
    pods: usize,
    /// Shared-prefix groups (e.g. distinct system prompts).
    #[arg(long, default_value_t = 32)]
    groups: usize,
    /// Requests per group.
    #[arg(long, default_value_t = 16)]
    prompts_per_group: usize,
    /// Tokens of each group's shared prefix.
    #[arg(long, default_value_t = 2048)]
    system_tokens: usize,
    /// Tokens unique to each request.
    #[arg(long, default_value_t = 256)]
    question_tokens: usize,
    /// KV blocks per pod (vLLM's num_gpu_blocks).
    #[arg(long, default_value_t = 2048)]
    gpu_blocks: usize,
    /// Requests routed before a pod's events reach the router.
    #[arg(long, default_value_t = 4)]
    event_lag: usize,
    /// Seed of the workload generator.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const BLOCK: usize = 16;
/// Prefill speed used to turn uncached tokens into an estimated time to first token.
const PREFILL_TOKENS_PER_S: f64 = 20_000.0;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One simulated vLLM engine's prefix cache.
struct SimPod {
    capacity: usize,
    lru: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
    tick: u64,
    format: WireFormat,
}

impl SimPod {
    /// Serves a prompt: returns cached prompt tokens and the event payload it publishes.
    fn serve(&mut self, tokens: &[u32], keys: &[u64]) -> (usize, Option<Vec<u8>>) {
        let hit = keys.iter().take_while(|k| self.lru.contains_key(k)).count();
        // vLLM always recomputes the last prompt token.
        let cached = (hit * BLOCK).min(tokens.len().saturating_sub(1));
        let mut events = Vec::new();
        let first_new = keys.iter().position(|k| !self.lru.contains_key(k));
        for k in keys {
            self.tick += 1;
            self.lru.insert(*k, self.tick);
            self.order.push_back((*k, self.tick));
        }
        if let Some(f) = first_new {
            let new: Vec<u64> = keys[f..].to_vec();
            events.push(KvEvent::BlockStored(BlockStored {
                block_hashes: new,
                parent_block_hash: f.checked_sub(1).map(|p| keys[p]),
                token_ids: tokens[f * BLOCK..keys.len() * BLOCK].to_vec(),
                block_size: BLOCK as u32,
                medium: Some("GPU".into()),
                ..Default::default()
            }));
        }
        while self.lru.len() > self.capacity {
            let Some((k, t)) = self.order.pop_front() else { break };
            if self.lru.get(&k) == Some(&t) {
                self.lru.remove(&k);
                events.push(KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![k],
                    medium: Some("GPU".into()),
                    ..Default::default()
                }));
            }
        }
        let payload = (!events.is_empty()).then(|| {
            encode_batch(
                &EventBatch { ts: self.tick as f64, events, data_parallel_rank: Some(0), unknown_events: 0 },
                self.format,
            )
        });
        (cached, payload)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Kvroute,
    RoundRobin,
    Random,
}

struct Outcome {
    name: &'static str,
    prompt_tokens: usize,
    cached_tokens: usize,
    per_pod: Vec<usize>,
    ttft_ms: Vec<f64>,
    route_us: Vec<f64>,
    decode_errors: u64,
    batches: u64,
    index_blocks: u64,
}

fn workload(a: &DemoArgs) -> Vec<Vec<u32>> {
    let mut rng = Rng(a.seed);
    let systems: Vec<Vec<u32>> =
        (0..a.groups).map(|_| (0..a.system_tokens).map(|_| rng.below(150_000) as u32).collect()).collect();
    let mut reqs = Vec::new();
    for system in &systems {
        for _ in 0..a.prompts_per_group {
            let mut t = system.clone();
            t.extend((0..a.question_tokens).map(|_| rng.below(150_000) as u32));
            reqs.push(t);
        }
    }
    // Interleave groups randomly (Fisher–Yates).
    for i in (1..reqs.len()).rev() {
        let j = rng.below(i + 1);
        reqs.swap(i, j);
    }
    reqs
}

fn simulate(a: &DemoArgs, policy: Policy, reqs: &[Vec<u32>], hasher: &BlockHasher) -> Outcome {
    let n = a.pods;
    let mut pods: Vec<SimPod> = (0..n)
        .map(|i| SimPod {
            capacity: a.gpu_blocks,
            lru: HashMap::new(),
            order: VecDeque::new(),
            tick: 0,
            format: if i % 2 == 0 { WireFormat::Map } else { WireFormat::Array },
        })
        .collect();
    let applier = EventApplier::new(InMemoryIndex::new(IndexConfig::default()), KeyMode::Engine);
    let scorer = LongestPrefixScorer::default();
    let mut scratch = Scratch::default();
    let candidates: Vec<PodId> = (0..n as PodId).collect();
    let mut in_flight: VecDeque<PodId> = VecDeque::new();
    let mut bus: VecDeque<(usize, PodId, Vec<u8>)> = VecDeque::new();
    let mut rng = Rng(a.seed ^ 0xABCD);
    let mut out = Outcome {
        name: match policy {
            Policy::Kvroute => "kvroute (precise prefix + load)",
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
        },
        prompt_tokens: 0,
        cached_tokens: 0,
        per_pod: vec![0; n],
        ttft_ms: Vec::new(),
        route_us: Vec::new(),
        decode_errors: 0,
        batches: 0,
        index_blocks: 0,
    };
    let window = n * 4;
    let mut keys = Vec::new();
    for (i, toks) in reqs.iter().enumerate() {
        // Deliver events that have had time to arrive.
        while bus.front().is_some_and(|(at, ..)| *at <= i) {
            let Some((_, pod, payload)) = bus.pop_front() else { break };
            match decode_batch(&payload) {
                Ok(b) => applier.apply(pod, "demo-model", &b),
                Err(_) => out.decode_errors += 1,
            }
        }
        let t0 = Instant::now();
        hasher.event_keys(toks, &RequestExtras::default(), &mut keys);
        let pick = match policy {
            Policy::RoundRobin => (i % n) as PodId,
            Policy::Random => rng.below(n) as PodId,
            Policy::Kvroute => {
                let scores = scorer.score(applier.index(), &keys, Some(&candidates), &mut scratch);
                let mut load = vec![0usize; n];
                in_flight.iter().for_each(|&p| load[p as usize] += 1);
                let max_load = *load.iter().max().unwrap_or(&0) as f64 + 1.0;
                let best = scores
                    .iter()
                    .map(|s| (s.pod, 2.0 * s.score + (1.0 - load[s.pod as usize] as f64 / max_load)))
                    .max_by(|x, y| x.1.total_cmp(&y.1).then(y.0.cmp(&x.0)));
                let pod = best.map_or(0, |b| b.0);
                applier.index().store_speculative(pod, Tiers::GPU, &keys);
                pod
            }
        };
        out.route_us.push(t0.elapsed().as_secs_f64() * 1e6);
        in_flight.push_back(pick);
        if in_flight.len() > window {
            in_flight.pop_front();
        }
        let (cached, payload) = pods[pick as usize].serve(toks, &keys);
        if let Some(p) = payload {
            bus.push_back((i + a.event_lag, pick, p));
        }
        out.prompt_tokens += toks.len();
        out.cached_tokens += cached;
        out.per_pod[pick as usize] += 1;
        out.ttft_ms.push((toks.len() - cached) as f64 / PREFILL_TOKENS_PER_S * 1e3);
    }
    out.batches = applier.counters().batches;
    out.index_blocks = applier.index().stats().blocks;
    out
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0)
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.pods >= 1 && a.pods <= 1024, "--pods must be in 1..=1024");
    anyhow::ensure!(a.groups >= 1 && a.prompts_per_group >= 1, "--groups and --prompts-per-group must be ≥ 1");
    let hasher = BlockHasher::new(HashConfig {
        algo: HashAlgo::Sha256Cbor,
        seed: Some("0".into()),
        block_size: BLOCK,
        ..Default::default()
    })?;
    let reqs = workload(&a);
    println!(
        "kvroute demo: {} simulated vLLM pods ({} GPU blocks of {BLOCK} tokens each), {} requests = {} groups × {} \
         (shared prefix {} + unique {} tokens), events delivered {} requests late",
        a.pods,
        a.gpu_blocks,
        reqs.len(),
        a.groups,
        a.prompts_per_group,
        a.system_tokens,
        a.question_tokens,
        a.event_lag
    );
    println!("hashing: sha256_cbor, PYTHONHASHSEED=0, vLLM {}; even pods publish 0.33 map events, odd pods 0.23 array events\n", kvroute_keys::VllmVersion::LATEST);
    // Bound: every distinct block computed once, no eviction ("global cache").
    let total: usize = reqs.iter().map(Vec::len).sum();
    let distinct = a.groups * a.system_tokens + reqs.len() * a.question_tokens;
    println!(
        "upper bound (global cache, infinite capacity): {:.1} % of prompt tokens cached\n",
        100.0 * (total - distinct) as f64 / total as f64
    );
    println!("| policy | prompt tokens cached | est. TTFT p50 / p90 (ms) | requests per pod max / mean | route time p50 / p99 (µs) |");
    println!("|---|---|---|---|---|");
    let mut note = String::new();
    for policy in [Policy::Kvroute, Policy::RoundRobin, Policy::Random] {
        let mut o = simulate(&a, policy, &reqs, &hasher);
        let mean = reqs.len() as f64 / a.pods as f64;
        println!(
            "| {} | {:.1} % | {:.1} / {:.1} | {} / {:.1} | {:.1} / {:.1} |",
            o.name,
            100.0 * o.cached_tokens as f64 / o.prompt_tokens as f64,
            pct(&mut o.ttft_ms, 0.5),
            pct(&mut o.ttft_ms, 0.9),
            o.per_pod.iter().max().unwrap_or(&0),
            mean,
            pct(&mut o.route_us, 0.5),
            pct(&mut o.route_us, 0.99),
        );
        if policy == Policy::Kvroute {
            note = format!(
                "kvroute decoded and indexed {} event batches ({} decode errors); {} blocks in its index at the end.",
                o.batches, o.decode_errors, o.index_blocks
            );
        }
    }
    println!("\n{note}");
    println!("est. TTFT = uncached prompt tokens / {PREFILL_TOKENS_PER_S} tokens/s (prefill only, no queueing).");
    Ok(())
}
