//! vLLM-style continuous batching on virtual time: one engine step at a time, a token
//! budget per step (`max_num_batched_tokens`), running decodes first (one token each),
//! then chunked prefill of admitted requests first-come first-served, then admission of
//! waiting requests while sequences, budget and KV blocks last. The step's duration is
//! `inter_token × load(batch) + batched_prefill_per_token × prefill tokens in the step`, so prefill
//! work competes with decoding as it does on a GPU: a fleet that misses the cache slows
//! down for everyone, which the per-request model of [`crate::engine`] (llm-d's simulator
//! model: every request's prefill in parallel) cannot show.
//!
//! The engine is a pure state machine; the caller owns the clock
//! (`kvroute simulate` drives it on virtual time).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
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
}

/// A request admitted in a step: what the prefix cache gave it and did to other blocks.
#[derive(Debug)]
pub struct Admitted {
    pub id: usize,
    pub hit_blocks: usize,
    pub cached_tokens: usize,
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
    pub prefill_tokens: usize,
    pub decodes: usize,
}

/// What the step produced when it ended.
#[derive(Debug, Default)]
pub struct StepEnd {
    /// Requests whose first token came out of this step (TTFT).
    pub first_token: Vec<usize>,
    /// Requests that produced their last token and gave their blocks back.
    pub finished: Vec<usize>,
}

struct Active {
    keys: Vec<u64>,
    anon: usize,
    output_tokens: usize,
}

/// One server's scheduler and KV cache.
pub struct BatchEngine {
    pub pool: BlockPool,
    latency: Latency,
    block_size: usize,
    max_batched_tokens: usize,
    waiting: VecDeque<Job>,
    /// Admitted requests still prefilling: (id, prompt tokens left to compute).
    prefilling: VecDeque<(usize, usize)>,
    /// Decoding requests by the step in which they produce their last token.
    decoding: BinaryHeap<Reverse<(u64, usize)>>,
    active: HashMap<usize, Active>,
    /// Chunks scheduled in the current step: (id, tokens).
    in_step: Vec<(usize, usize)>,
    step_no: u64,
    /// The head of the queue did not fit and no blocks were freed since.
    blocked: bool,
}

impl BatchEngine {
    pub fn new(gpu_blocks: usize, block_size: usize, latency: Latency, max_batched_tokens: usize) -> Self {
        Self {
            pool: BlockPool::new(gpu_blocks),
            latency,
            block_size: block_size.max(1),
            max_batched_tokens: max_batched_tokens.max(1),
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            decoding: BinaryHeap::new(),
            active: HashMap::new(),
            in_step: Vec::new(),
            step_no: 0,
            blocked: false,
        }
    }

    pub fn submit(&mut self, job: Job) {
        self.waiting.push_back(job);
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

    fn load(&self, seqs: usize) -> f64 {
        let max = self.latency.max_num_seqs;
        if max <= 1 {
            return 1.0;
        }
        1.0 + (self.latency.load_factor - 1.0) * seqs.saturating_sub(1).min(max - 1) as f64 / (max - 1) as f64
    }

    /// Starts a step: schedules decodes, prefill chunks and admissions.
    pub fn begin_step(&mut self) -> Step {
        let mut step = Step { decodes: self.decoding.len(), ..Default::default() };
        let mut budget = self.max_batched_tokens.saturating_sub(step.decodes);
        self.in_step.clear();
        for (id, left) in &self.prefilling {
            if budget == 0 {
                break;
            }
            let chunk = (*left).min(budget);
            budget -= chunk;
            self.in_step.push((*id, chunk));
        }
        let bs = self.block_size;
        while !self.blocked && budget > 0 && self.active.len() < self.latency.max_num_seqs {
            let Some(job) = self.waiting.front() else { break };
            let anon = (job.prompt_tokens + job.output_tokens).div_ceil(bs).saturating_sub(job.keys.len());
            if job.keys.len() + anon > self.pool.capacity() {
                if let Some(j) = self.waiting.pop_front() {
                    step.rejected.push(j.id);
                }
                continue;
            }
            let hit = self.pool.prefix_hits(&job.keys);
            let Ok(a) = self.pool.allocate(&job.keys, anon) else {
                self.blocked = true;
                break;
            };
            let Some(job) = self.waiting.pop_front() else { break };
            // vLLM always recomputes the last prompt token.
            let cached = (hit * bs).min(job.prompt_tokens.saturating_sub(1) / bs * bs);
            let left = (job.prompt_tokens - cached).max(1);
            let chunk = left.min(budget);
            budget -= chunk;
            self.in_step.push((job.id, chunk));
            self.prefilling.push_back((job.id, left));
            step.admitted.push(Admitted {
                id: job.id,
                hit_blocks: hit,
                cached_tokens: cached,
                evicted: a.evicted,
                created: a.created.iter().map(|&i| job.keys[i]).collect(),
            });
            self.active.insert(job.id, Active { keys: job.keys, anon, output_tokens: job.output_tokens.max(1) });
        }
        step.prefill_tokens = self.in_step.iter().map(|x| x.1).sum();
        let seqs = step.decodes + self.in_step.len();
        step.duration = self.latency.inter_token.mul_f64(self.load(seqs))
            + self.latency.batched_prefill_per_token * step.prefill_tokens as u32;
        step
    }

    /// Ends the step begun last: prefill progress, first tokens, finished requests.
    pub fn end_step(&mut self) -> StepEnd {
        let mut out = StepEnd::default();
        let now = self.step_no;
        // The step's chunks went to the first `in_step.len()` prefilling requests, in order.
        for (k, &(id, chunk)) in self.in_step.iter().enumerate() {
            let left = &mut self.prefilling[k];
            debug_assert_eq!(left.0, id);
            left.1 -= chunk.min(left.1);
            if left.1 == 0 {
                out.first_token.push(id);
                let outputs = self.active.get(&id).map_or(1, |a| a.output_tokens) as u64;
                // The first token came out of this step; the rest take one step each.
                self.decoding.push(Reverse((now + outputs - 1, id)));
            }
        }
        self.prefilling.retain(|x| x.1 > 0);
        self.in_step.clear();
        while let Some(&Reverse((last, id))) = self.decoding.peek() {
            if last > now {
                break;
            }
            self.decoding.pop();
            if let Some(a) = self.active.remove(&id) {
                self.pool.release(&a.keys, a.anon);
                self.blocked = false;
            }
            out.finished.push(id);
        }
        self.step_no += 1;
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

    fn run_to_end(e: &mut BatchEngine) -> (Vec<(usize, Duration)>, Vec<(usize, Duration)>, Duration) {
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
        e.submit(Job { id: 0, keys: (0..150).collect(), prompt_tokens: 2400, output_tokens: 3 });
        e.submit(Job { id: 1, keys: (1000..1001).collect(), prompt_tokens: 16, output_tokens: 1 });
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
        e.submit(Job { id: 0, keys: (0..10).collect(), prompt_tokens: 160, output_tokens: 16 });
        run_to_end(&mut e);
        e.submit(Job { id: 1, keys: (0..10).collect(), prompt_tokens: 160, output_tokens: 16 });
        let s = e.begin_step();
        assert_eq!(s.admitted[0].hit_blocks, 10);
        assert_eq!(s.admitted[0].cached_tokens, 144, "the last prompt token is recomputed");
        assert_eq!(s.prefill_tokens, 16);
        e.end_step();
        // Request 1 holds 11 blocks; one needing 10 more (fresh) does not fit until it ends.
        e.submit(Job { id: 2, keys: (100..110).collect(), prompt_tokens: 160, output_tokens: 1 });
        let s = e.begin_step();
        assert!(s.admitted.is_empty(), "no KV room yet");
        e.end_step();
        let (firsts, _, _) = run_to_end(&mut e);
        assert_eq!(firsts.last().map(|x| x.0), Some(2));
    }

    #[test]
    fn too_large_requests_are_rejected_not_stuck() {
        let mut e = BatchEngine::new(4, 16, latency(8), 8192);
        e.submit(Job { id: 7, keys: (0..10).collect(), prompt_tokens: 160, output_tokens: 1 });
        let s = e.begin_step();
        assert_eq!(s.rejected, vec![7]);
        e.end_step();
        assert!(e.idle());
    }
}
