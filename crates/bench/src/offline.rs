//! The offline fleet simulation: N simulated servers (the `kvroute sim` block pool and
//! latency model) and the real router pieces (index on a virtual clock, scorer, scheduling
//! profile, speculative entries), driven by a workload on virtual time. KV events reach
//! the index `event_delay` after the server produces them. Deterministic for a seed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_index::{BlockIndex, InMemoryIndex, IndexConfig, PodId, Tiers};
use kvroute_schedule::{PodView, Profile, RequestView};
use kvroute_score::{LongestPrefixScorer, Scratch};
use kvroute_sim::config::Latency;
use kvroute_sim::pool::BlockPool;
use serde::Serialize;

use crate::workload::SimRequest;

/// Fleet settings.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub servers: usize,
    pub gpu_blocks: usize,
    pub block_size: usize,
    pub latency: Latency,
    pub event_delay: Duration,
    /// Seeds the pickers' tie-breaking.
    pub seed: u64,
}

/// One policy's results (the JSON schema of `kvroute simulate`).
#[derive(Clone, Debug, Serialize)]
pub struct PolicyResult {
    pub name: String,
    pub requests: usize,
    /// Requests larger than a whole server's cache (never served).
    pub rejected: usize,
    pub hit_rate_tokens: f64,
    pub hit_rate_blocks: f64,
    pub busiest_over_mean_requests: f64,
    pub busiest_over_mean_prefill_tokens: f64,
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    pub ttft_p99_s: f64,
    pub ttft_mean_s: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival(usize),
    PrefillDone(usize),
    Finish(usize),
    Deliver(usize),
}

struct Server {
    pool: BlockPool,
    running: usize,
    waiting: VecDeque<usize>,
}

#[derive(Default, Clone)]
struct Rt {
    server: usize,
    anon: usize,
    ttft: f64,
}

/// Prompt tokens a request gets from cache given `hit` cached blocks (vLLM recomputes the
/// last prompt token).
fn cached_tokens(hit: usize, bs: usize, n: usize) -> usize {
    (hit * bs).min(n.saturating_sub(1) / bs * bs)
}

/// Hit rate (tokens) with one infinite cache and perfect routing.
pub fn infinite_cache_hit_rate(reqs: &[SimRequest], bs: usize) -> f64 {
    let mut seen = HashSet::new();
    let (mut hit, mut total) = (0usize, 0usize);
    for r in reqs {
        let h = r.keys.iter().take_while(|k| seen.contains(*k)).count();
        hit += cached_tokens(h, bs, r.prompt_tokens);
        total += r.prompt_tokens;
        seen.extend(r.keys.iter().copied());
    }
    hit as f64 / total.max(1) as f64
}

/// Hit rate (tokens) of one LRU cache as large as the whole fleet, with perfect routing
/// (every request sees every block any server could hold): the "global cache" bound.
pub fn global_cache_hit_rate(reqs: &[SimRequest], bs: usize, total_blocks: usize) -> f64 {
    let mut pool = BlockPool::new(total_blocks);
    let (mut hit, mut total) = (0usize, 0usize);
    for r in reqs {
        let h = pool.prefix_hits(&r.keys);
        hit += cached_tokens(h, bs, r.prompt_tokens);
        total += r.prompt_tokens;
        let keys = &r.keys[..r.keys.len().min(total_blocks)];
        if pool.allocate(keys, 0).is_ok() {
            pool.release(keys, 0);
        }
    }
    hit as f64 / total.max(1) as f64
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(0.0)
}

/// Runs one policy over the workload.
pub fn run(name: &str, profile: &Profile, reqs: &[SimRequest], cfg: &FleetConfig) -> PolicyResult {
    let bs = cfg.block_size;
    let l = cfg.latency;
    profile.reseed(cfg.seed);
    // The index reads time from the simulation's virtual clock.
    let now_ns = Arc::new(AtomicU64::new(0));
    let base = Instant::now();
    let clock = {
        let n = now_ns.clone();
        Arc::new(move || base + Duration::from_nanos(n.load(Relaxed)))
    };
    let index = InMemoryIndex::with_clock(
        IndexConfig { capacity: cfg.servers * cfg.gpu_blocks * 2, ..Default::default() },
        clock.clone(),
    );
    let approx = InMemoryIndex::with_clock(
        IndexConfig { capacity: cfg.servers * cfg.gpu_blocks * 2, ..Default::default() },
        clock,
    );
    let scorer = LongestPrefixScorer::default();
    let mut scratch = Scratch::default();
    let pods: Vec<PodId> = (0..cfg.servers as PodId).collect();
    let names: Vec<String> = (0..cfg.servers).map(|i| format!("server-{i}")).collect();
    let mut servers: Vec<Server> = (0..cfg.servers)
        .map(|_| Server { pool: BlockPool::new(cfg.gpu_blocks), running: 0, waiting: VecDeque::new() })
        .collect();
    let mut in_flight = vec![0u32; cfg.servers];
    let mut sessions: HashMap<u64, usize> = HashMap::new();
    let mut rt = vec![Rt::default(); reqs.len()];
    // Pending KV events: (server, stored?, keys).
    let mut deliveries: Vec<(usize, bool, Vec<u64>)> = Vec::new();
    let mut heap: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let ns = |s: f64| (s.max(0.0) * 1e9) as u64;
    let mut push = |heap: &mut BinaryHeap<Reverse<(u64, u64, Ev)>>, t: u64, e: Ev| {
        seq += 1;
        heap.push(Reverse((t, seq, e)));
    };
    for (i, r) in reqs.iter().enumerate() {
        push(&mut heap, ns(r.arrival_s), Ev::Arrival(i));
    }
    let (mut hit_tokens, mut prompt_tokens, mut hit_blocks, mut full_blocks, mut rejected) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut per_server_requests = vec![0f64; cfg.servers];
    let mut per_server_prefill = vec![0f64; cfg.servers];
    let mut ttfts = Vec::with_capacity(reqs.len());
    let load = |running: usize| -> f64 {
        if l.max_num_seqs <= 1 {
            1.0
        } else {
            1.0 + (l.load_factor - 1.0) * running.saturating_sub(1) as f64 / (l.max_num_seqs - 1) as f64
        }
    };

    while let Some(Reverse((t, _, ev))) = heap.pop() {
        now_ns.store(t, Relaxed);
        let mut to_start = None;
        match ev {
            Ev::Arrival(i) => {
                let r = &reqs[i];
                let scores = scorer.score(&index, &r.keys, Some(&pods), &mut scratch);
                let ascores = scorer.score(&approx, &r.keys, Some(&pods), &mut scratch);
                let views: Vec<PodView> = (0..cfg.servers)
                    .map(|s| {
                        let sc = scores.iter().find(|x| x.pod as usize == s);
                        PodView {
                            name: names[s].clone(),
                            in_flight: in_flight[s],
                            matched_blocks: sc.map_or(0, |x| x.matched_blocks),
                            prefix_score: sc.map_or(0.0, |x| x.score),
                            approx_prefix_score: ascores.iter().find(|x| x.pod as usize == s).map_or(0.0, |x| x.score),
                            kv_usage: Some(servers[s].pool.usage()),
                            session_pod: sessions.get(&r.session) == Some(&s),
                            waiting: Some(servers[s].waiting.len() as f64),
                            lora_active: None,
                            labels: Default::default(),
                        }
                    })
                    .collect();
                let req = RequestView { prompt_tokens: r.prompt_tokens, block_size: bs, total_blocks: r.keys.len() };
                let s = profile.schedule(&req, &views).pick.unwrap_or(0);
                sessions.insert(r.session, s);
                index.store_speculative(s as PodId, Tiers::GPU, &r.keys);
                approx.store(s as PodId, Tiers::GPU, &r.keys);
                in_flight[s] += 1;
                per_server_requests[s] += 1.0;
                rt[i].server = s;
                servers[s].waiting.push_back(i);
                to_start = Some(s);
            }
            Ev::PrefillDone(i) => {
                let s = rt[i].server;
                rt[i].ttft = (t as f64 / 1e9) - reqs[i].arrival_s;
                ttfts.push(rt[i].ttft);
                let decode = l.inter_token.mul_f64(load(servers[s].running)) * reqs[i].output_tokens as u32;
                push(&mut heap, t + decode.as_nanos() as u64, Ev::Finish(i));
            }
            Ev::Finish(i) => {
                let s = rt[i].server;
                servers[s].pool.release(&reqs[i].keys, rt[i].anon);
                servers[s].running -= 1;
                in_flight[s] -= 1;
                to_start = Some(s);
            }
            Ev::Deliver(d) => {
                let (s, stored, keys) = std::mem::take(&mut deliveries[d]);
                if stored {
                    index.store(s as PodId, Tiers::GPU, &keys);
                } else {
                    index.remove(s as PodId, Some(Tiers::GPU), &keys);
                }
            }
        }
        // Start what fits on that server.
        if let Some(s) = to_start {
            while servers[s].running < l.max_num_seqs {
                let Some(&i) = servers[s].waiting.front() else { break };
                let r = &reqs[i];
                let anon = (r.prompt_tokens + r.output_tokens).div_ceil(bs) - r.keys.len();
                if r.keys.len() + anon > cfg.gpu_blocks {
                    servers[s].waiting.pop_front();
                    rejected += 1;
                    in_flight[s] -= 1;
                    continue;
                }
                let hit = servers[s].pool.prefix_hits(&r.keys);
                let Ok(a) = servers[s].pool.allocate(&r.keys, anon) else { break };
                servers[s].waiting.pop_front();
                servers[s].running += 1;
                rt[i].anon = anon;
                let cached = cached_tokens(hit, bs, r.prompt_tokens);
                hit_tokens += cached;
                prompt_tokens += r.prompt_tokens;
                hit_blocks += hit.min(r.keys.len());
                full_blocks += r.keys.len();
                per_server_prefill[s] += (r.prompt_tokens - cached) as f64;
                let f = load(servers[s].running);
                let prefill = (l.prefill_overhead + l.prefill_per_token * (r.prompt_tokens - cached) as u32).mul_f64(f);
                let done = t + prefill.as_nanos() as u64;
                push(&mut heap, done, Ev::PrefillDone(i));
                let delay = cfg.event_delay.as_nanos() as u64;
                if !a.evicted.is_empty() {
                    deliveries.push((s, false, a.evicted.clone()));
                    push(&mut heap, t + delay, Ev::Deliver(deliveries.len() - 1));
                }
                if !a.created.is_empty() {
                    deliveries.push((s, true, a.created.iter().map(|&k| r.keys[k]).collect()));
                    push(&mut heap, done + delay, Ev::Deliver(deliveries.len() - 1));
                }
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let busiest = |v: &[f64]| v.iter().copied().fold(0.0, f64::max) / mean(v).max(f64::MIN_POSITIVE);
    let ttft_mean = mean(&ttfts);
    PolicyResult {
        name: name.to_string(),
        requests: reqs.len(),
        rejected,
        hit_rate_tokens: hit_tokens as f64 / prompt_tokens.max(1) as f64,
        hit_rate_blocks: hit_blocks as f64 / full_blocks.max(1) as f64,
        busiest_over_mean_requests: busiest(&per_server_requests),
        busiest_over_mean_prefill_tokens: busiest(&per_server_prefill),
        ttft_p50_s: pct(&mut ttfts, 0.5),
        ttft_p90_s: pct(&mut ttfts, 0.9),
        ttft_p99_s: pct(&mut ttfts, 0.99),
        ttft_mean_s: ttft_mean,
    }
}
