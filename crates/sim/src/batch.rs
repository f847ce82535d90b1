//! vLLM-style continuous batching on virtual time: one engine step at a time, a token
//! budget per step (`max_num_batched_tokens`), running requests first in admission order
//! (one token per decode, chunked prefill first-come first-served), then admission of
//! waiting requests while sequences, budget and KV blocks last. The step's duration is
//! `inter_token × load(batch) + batched_prefill_per_token × prefill tokens in the step`, so prefill
//! work competes with decoding as it does on a GPU: a fleet that misses the cache slows
//! down for everyone, which the per-request model of [`crate::engine`] (llm-d's simulator
//! model: every request's prefill in parallel) cannot show.
//!
//! KV blocks are allocated as vLLM v1 allocates them: a request is admitted with the
//! blocks of its prompt (shared with every other request holding the same prefix), and
//! takes one more block each time its decoding fills the last one. When a running request
//! needs a block and none is free, the most recently admitted running request is
//! preempted (its blocks freed, recomputed later from the front of the queue; vLLM's
//! recompute preemption), and no request is admitted in that step.
//!
//! The engine is a pure state machine; the caller owns the clock
//! (`kvroute simulate` drives it on virtual time).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::config::Latency;
use crate::pool::BlockPool;

/// vLLM's default `--max-num-batched-tokens` for online serving on large GPUs.
pub const DEFAULT_MAX_BATCHED_TOKENS: usize = 8192;

/// A request handed to the engine.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: usize,
    /// The prompt's full-block hashes.
    pub keys: Vec<u64>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// P/D: the prompt's KV was computed elsewhere and transferred here (vLLM's
    /// `do_remote_prefill`): admission allocates (and so caches) the prompt's blocks, and
    /// only the last prompt token is computed, as vLLM's scheduler does once a remote KV
    /// load finishes; its first token ends the step.
    pub remote_kv: bool,
}

/// A request admitted in a step: what the prefix cache gave it and did to other blocks.
#[derive(Debug)]
pub struct Admitted {
    pub id: usize,
    pub hit_blocks: usize,
    pub cached_tokens: usize,
    /// Admitted again after a preemption (its first admission was reported already).
    pub resumed: bool,
    /// Hashes evicted to make room (announce as BlockRemoved now).
    pub evicted: Vec<u64>,
    /// Hashes newly cached (announce as BlockStored once the prefill is done).
    pub created: Vec<u64>,
}

/// The plan of one step, decided at its start.
#[derive(Debug, Default)]
pub struct Step {
    pub duration: Duration,
    pub admitted: Vec<Admitted>,
    /// Requests larger than the whole cache, dropped.
    pub rejected: Vec<usize>,
    /// Running requests preempted to free blocks (they wait again, to be recomputed).
    pub preempted: Vec<usize>,
    /// Cached blocks evicted for decode blocks (announce as BlockRemoved now).
    pub evicted: Vec<u64>,
    pub prefill_tokens: usize,
    pub decodes: usize,
}

/// What the step produced when it ended.
#[derive(Debug, Default)]
pub struct StepEnd {
    /// Requests whose first token came out of this step (TTFT).
    pub first_token: Vec<usize>,
    /// Preempted requests whose recomputation finished in this step (their blocks are
    /// cached again).
    pub recomputed: Vec<usize>,
    /// Requests that produced their last token and gave their blocks back.
    pub finished: Vec<usize>,
    /// Requests that produced a token after their first (decodes, and the token of a
    /// finished recomputation): with `first_token`, every token of this step.
    pub decoded: Vec<usize>,
}

struct Active {
    job: Job,
    /// Private blocks held (the prompt's partial last block, decode blocks).
    anon: usize,
    /// Tokens generated so far.
    generated: usize,
    /// Prefill tokens left to compute (0: decoding).
    left: usize,
    first_sent: bool,
}

/// A waiting request and what it had generated before a preemption.
struct Waiting {
    job: Job,
    generated: usize,
    first_sent: bool,
}

/// One server's scheduler and KV cache.
pub struct BatchEngine {
    pub pool: BlockPool,
    latency: Latency,
    block_size: usize,
    max_batched_tokens: usize,
    waiting: VecDeque<Waiting>,
    /// Running requests in admission order (preemption takes the last).
    running: Vec<usize>,
    active: HashMap<usize, Active>,
    /// Work scheduled in the current step: (id, tokens).
    in_step: Vec<(usize, usize)>,
    /// The head of the queue did not fit and no blocks were freed since.
    blocked: bool,
    preemptions: u64,
}

impl BatchEngine {
    pub fn new(gpu_blocks: usize, block_size: usize, latency: Latency, max_batched_tokens: usize) -> Self {
        Self {
            pool: BlockPool::new(gpu_blocks),
            latency,
            block_size: block_size.max(1),
            max_batched_tokens: max_batched_tokens.max(1),
            waiting: VecDeque::new(),
            running: Vec::new(),
            active: HashMap::new(),
            in_step: Vec::new(),
            blocked: false,
            preemptions: 0,
        }
    }

    pub fn submit(&mut self, job: Job) {
        self.waiting.push_back(Waiting { job, generated: 0, first_sent: false });
    }

    /// Nothing to do: the engine sleeps until the next submission.
    pub fn idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    /// `vllm:num_requests_waiting`.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// `vllm:num_requests_running`.
    pub fn running(&self) -> usize {
        self.active.len()
    }

    /// `vllm:num_preemptions` so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    fn load(&self, seqs: usize) -> f64 {
        let max = self.latency.max_num_seqs;
        if max <= 1 {
            return 1.0;
        }
        1.0 + (self.latency.load_factor - 1.0) * seqs.saturating_sub(1).min(max - 1) as f64 / (max - 1) as f64
    }

    /// Frees the last admitted running request's blocks and queues it first again.
    fn preempt_last(&mut self, step: &mut Step) -> Option<usize> {
        let id = self.running.pop()?;
        let a = self.active.remove(&id)?;
        self.pool.release(&a.job.keys, a.anon);
        self.blocked = false;
        self.preemptions += 1;
        step.preempted.push(id);
        self.waiting.push_front(Waiting { job: a.job, generated: a.generated, first_sent: a.first_sent });
        Some(id)
    }

    /// Starts a step: schedules decodes, prefill chunks and admissions.
    pub fn begin_step(&mut self) -> Step {
        let mut step = Step::default();
        let mut budget = self.max_batched_tokens;
        let bs = self.block_size;
        self.in_step.clear();
        let mut k = 0;
        while k < self.running.len() && budget > 0 {
            let id = self.running[k];
            let Some(a) = self.active.get(&id) else { break };
            if a.left > 0 {
                let chunk = a.left.min(budget);
                budget -= chunk;
                self.in_step.push((id, chunk));
                k += 1;
                continue;
            }
            // A decode: its KV grows by the token fed back; a new block when the last is full.
            let need = (a.job.prompt_tokens + a.generated).div_ceil(bs).saturating_sub(a.job.keys.len());
            let extra = need.saturating_sub(a.anon);
            // Preempt from the newest until the block fits (or this request was the newest).
            let scheduled = extra == 0
                || loop {
                    if let Ok(got) = self.pool.allocate(&[], extra) {
                        step.evicted.extend(got.evicted);
                        if let Some(a) = self.active.get_mut(&id) {
                            a.anon += extra;
                        }
                        break true;
                    }
                    if self.preempt_last(&mut step) == Some(id) || self.running.is_empty() {
                        break false;
                    }
                };
            if scheduled {
                budget -= 1;
                self.in_step.push((id, 1));
                step.decodes += 1;
                k += 1;
            }
        }
        // Admissions, unless this step had to preempt (vLLM's rule).
        while step.preempted.is_empty() && !self.blocked && budget > 0 && self.active.len() < self.latency.max_num_seqs
        {
            let Some(w) = self.waiting.front() else { break };
            let job = &w.job;
            if (job.prompt_tokens + job.output_tokens).div_ceil(bs) > self.pool.capacity() {
                if let Some(w) = self.waiting.pop_front() {
                    step.rejected.push(w.job.id);
                }
                continue;
            }
            // A resumed request recomputes what it had generated too.
            let tokens = job.prompt_tokens + w.generated;
            let anon = tokens.div_ceil(bs).saturating_sub(job.keys.len());
            let hit = self.pool.prefix_hits(&job.keys);
            let Ok(a) = self.pool.allocate(&job.keys, anon) else {
                self.blocked = true;
                break;
            };
            let Some(w) = self.waiting.pop_front() else { break };
            // vLLM always recomputes the last prompt token.
            let cached = (hit * bs).min(tokens.saturating_sub(1) / bs * bs);
            // Transferred KV: everything but the last prompt token is present (vLLM sets
            // `num_computed_tokens` to the prompt's length − 1 after a remote load).
            let left = if w.job.remote_kv && w.generated == 0 { 1 } else { (tokens - cached).max(1) };
            let chunk = left.min(budget);
            budget -= chunk;
            self.in_step.push((w.job.id, chunk));
            self.running.push(w.job.id);
            step.admitted.push(Admitted {
                id: w.job.id,
                hit_blocks: hit,
                cached_tokens: cached,
                resumed: w.generated > 0 || w.first_sent,
                evicted: a.evicted,
                created: a.created.iter().map(|&i| w.job.keys[i]).collect(),
            });
            let id = w.job.id;
            self.active.insert(id, Active { job: w.job, anon, generated: w.generated, left, first_sent: w.first_sent });
        }
        step.prefill_tokens =
            self.in_step.iter().filter(|x| self.active.get(&x.0).is_some_and(|a| a.left > 0)).map(|x| x.1).sum();
        step.duration = self.latency.inter_token.mul_f64(self.load(self.in_step.len()))
            + self.latency.batched_prefill_per_token * step.prefill_tokens as u32;
        step
    }

    /// Ends the step begun last: prefill progress, tokens, finished requests.
    pub fn end_step(&mut self) -> StepEnd {
        let mut out = StepEnd::default();
        for &(id, tokens) in &self.in_step {
            let Some(a) = self.active.get_mut(&id) else { continue };
            if a.left > 0 {
                a.left -= tokens.min(a.left);
                if a.left > 0 {
                    continue;
                }
                // The prefill's last chunk yields a token.
                if a.first_sent {
                    out.recomputed.push(id);
                    out.decoded.push(id);
                } else {
                    a.first_sent = true;
                    out.first_token.push(id);
                }
            } else {
                out.decoded.push(id);
            }
            a.generated += 1;
            if a.generated >= a.job.output_tokens.max(1) {
                out.finished.push(id);
            }
        }
        self.in_step.clear();
        for id in &out.finished {
            if let Some(a) = self.active.remove(id) {
                self.pool.release(&a.job.keys, a.anon);
                self.blocked = false;
            }
        }
        if !out.finished.is_empty() {
            self.running.retain(|id| self.active.contains_key(id));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(seqs: usize) -> Latency {
        Latency {
            prefill_overhead: Duration::ZERO,
            prefill_per_token: Duration::from_micros(800),
            inter_token: Duration::from_millis(10),
            kv_transfer_per_token: Duration::ZERO,
            load_factor: 2.0,
            max_num_seqs: seqs,
            batched_prefill_per_token: Duration::from_micros(100),
        }
    }

    /// (request, first token at), (request, done at), end time.
    type Run = (Vec<(usize, Duration)>, Vec<(usize, Duration)>, Duration);

    fn run_to_end(e: &mut BatchEngine) -> Run {
        let (mut t, mut firsts, mut done) = (Duration::ZERO, vec![], vec![]);
        while !e.idle() {
            let s = e.begin_step();
            t += s.duration;
            let end = e.end_step();
            firsts.extend(end.first_token.into_iter().map(|i| (i, t)));
            done.extend(end.finished.into_iter().map(|i| (i, t)));
        }
        (firsts, done, t)
    }

    #[test]
    fn prefill_is_chunked_by_the_token_budget_and_delays_the_next_request() {
        let mut e = BatchEngine::new(1000, 16, latency(8), 1000);
        e.submit(Job { id: 0, keys: (0..150).collect(), prompt_tokens: 2400, output_tokens: 3, remote_kv: false });
        e.submit(Job { id: 1, keys: (1000..1001).collect(), prompt_tokens: 16, output_tokens: 1, remote_kv: false });
        let (firsts, done, _) = run_to_end(&mut e);
        // 2400 tokens at 1000 a step: 3 steps; request 1 is admitted when budget is left
        // (step 3, 400 tokens used) and finishes prefill in that step too.
        assert_eq!(firsts[0].0, 0);
        assert_eq!(firsts.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(firsts[0].1, firsts[1].1, "both first tokens come out of the third step");
        let one_step = Duration::from_millis(10) + Duration::from_micros(100) * 1000;
        assert!(firsts[0].1 > one_step * 2, "three steps of prefill: {:?}", firsts[0].1);
        assert_eq!(done.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 0]);
        assert_eq!(e.pool.used(), 0, "finished requests give their blocks back");
    }

    #[test]
    fn cached_prefix_skips_prefill_and_kv_space_limits_admission() {
        let mut e = BatchEngine::new(20, 16, latency(8), 8192);
        e.submit(Job { id: 0, keys: (0..10).collect(), prompt_tokens: 160, output_tokens: 16, remote_kv: false });
        run_to_end(&mut e);
        e.submit(Job { id: 1, keys: (0..10).collect(), prompt_tokens: 160, output_tokens: 16, remote_kv: false });
        let s = e.begin_step();
        assert_eq!(s.admitted[0].hit_blocks, 10);
        assert_eq!(s.admitted[0].cached_tokens, 144, "the last prompt token is recomputed");
        assert_eq!(s.prefill_tokens, 16);
        e.end_step();
        // Request 1 holds 11 blocks; one needing 10 more (fresh) does not fit until it ends.
        e.submit(Job { id: 2, keys: (100..110).collect(), prompt_tokens: 160, output_tokens: 1, remote_kv: false });
        let s = e.begin_step();
        assert!(s.admitted.is_empty(), "no KV room yet");
        e.end_step();
        let (firsts, _, _) = run_to_end(&mut e);
        assert_eq!(firsts.last().map(|x| x.0), Some(2));
    }

    #[test]
    fn decode_blocks_are_taken_as_tokens_come_and_the_newest_request_is_preempted() {
        // 12 blocks: two 4-block prompts fit at once; their decodes (40 tokens each, a
        // block per 16) then need 3 more blocks each, which the cache cannot give both.
        let mut e = BatchEngine::new(12, 16, latency(8), 8192);
        e.submit(Job { id: 0, keys: (0..4).collect(), prompt_tokens: 64, output_tokens: 40, remote_kv: false });
        e.submit(Job { id: 1, keys: (10..14).collect(), prompt_tokens: 64, output_tokens: 40, remote_kv: false });
        let s = e.begin_step();
        assert_eq!(s.admitted.len(), 2, "only the prompts' blocks are needed to start");
        assert_eq!(e.pool.used(), 8);
        assert_eq!(e.end_step().first_token, vec![0, 1]);
        let (mut firsts, mut done, mut preempted, mut resumed) = (vec![], vec![], vec![], vec![]);
        let mut steps = 0;
        while !e.idle() {
            let s = e.begin_step();
            preempted.extend(s.preempted);
            resumed.extend(s.admitted.iter().filter(|a| a.resumed).map(|a| a.id));
            assert!(e.pool.used() <= 12);
            let end = e.end_step();
            firsts.extend(end.first_token);
            done.extend(end.finished);
            steps += 1;
            assert!(steps < 1000, "the engine makes progress");
        }
        assert_eq!(preempted, vec![1], "the newest running request gives its blocks up");
        assert_eq!(resumed, vec![1], "and is recomputed later");
        assert!(firsts.is_empty(), "first tokens came out of the first step only, once each");
        assert_eq!(done, vec![0, 1]);
        assert_eq!(e.preemptions(), 1);
        assert_eq!(e.pool.used(), 0, "every block given back");
    }

    #[test]
    fn transferred_kv_computes_one_prompt_token_caches_the_prompt_and_reports_every_token() {
        let mut e = BatchEngine::new(1000, 16, latency(8), 8192);
        let job =
            |id, remote_kv| Job { id, keys: (0..100).collect(), prompt_tokens: 1610, output_tokens: 3, remote_kv };
        e.submit(job(0, true));
        let s = e.begin_step();
        assert_eq!(s.prefill_tokens, 1, "only the last prompt token is computed");
        assert_eq!(s.admitted[0].created.len(), 100, "the transferred blocks are cached here");
        assert_eq!(s.duration, Duration::from_millis(10) + Duration::from_micros(100));
        let end = e.end_step();
        assert_eq!((end.first_token, end.decoded), (vec![0], vec![]));
        let end = (e.begin_step(), e.end_step()).1;
        assert_eq!(end.decoded, vec![0], "a decode token");
        let end = (e.begin_step(), e.end_step()).1;
        assert_eq!((end.decoded, end.finished), (vec![0], vec![0]));
        // The same prompt computed here: its blocks are now a hit, the rest is prefill.
        e.submit(job(1, false));
        let s = e.begin_step();
        assert_eq!((s.admitted[0].hit_blocks, s.prefill_tokens), (100, 10));
    }

    #[test]
    fn too_large_requests_are_rejected_not_stuck() {
        let mut e = BatchEngine::new(4, 16, latency(8), 8192);
        e.submit(Job { id: 7, keys: (0..10).collect(), prompt_tokens: 160, output_tokens: 1, remote_kv: false });
        let s = e.begin_step();
        assert_eq!(s.rejected, vec![7]);
        e.end_step();
        assert!(e.idle());
    }
}
