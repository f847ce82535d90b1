//! The simulated engine: admission (`max_num_seqs` running, `max_waiting` queued, then
//! 429), the prefix cache, the latency model and the metrics, all in model time; real
//! delays are model time ÷ `speedup`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_events::{BlockRemoved, BlockStored, KvEvent};
use kvroute_keys::{BlockHasher, RequestExtras};
use parking_lot::Mutex;
use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::config::Latency;
use crate::pool::BlockPool;

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];

/// Metrics with vLLM's names, types and labels (`model_name`, `engine`).
pub struct SimMetrics {
    pub registry: Registry,
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_usage: Gauge,
    pub prefix_queries: IntCounter,
    pub prefix_hits: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub success: IntCounterVec,
    pub ttft: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    /// `vllm:lora_requests_info` (only registered when LoRA adapters are served).
    pub lora_info: Option<GaugeVec>,
    pub max_lora: usize,
}

impl SimMetrics {
    pub fn new(
        model: &str,
        block_size: usize,
        num_gpu_blocks: usize,
        max_lora: usize,
    ) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let labels = |o: Opts| o.const_label("model_name", model).const_label("engine", "0");
        let gauge = |n: &str, h: &str| -> Result<Gauge, prometheus::Error> {
            let g = Gauge::with_opts(labels(Opts::new(n, h)))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |n: &str, h: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(labels(Opts::new(n, h)))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let hist = |n: &str, h: &str, b: Vec<f64>| -> Result<Histogram, prometheus::Error> {
            let o = HistogramOpts::new(n, h).const_label("model_name", model).const_label("engine", "0").buckets(b);
            let x = Histogram::with_opts(o)?;
            registry.register(Box::new(x.clone()))?;
            Ok(x)
        };
        let info = Gauge::with_opts(
            Opts::new("vllm:cache_config_info", "Information of the LLMEngine CacheConfig")
                .const_label("block_size", block_size.to_string())
                .const_label("num_gpu_blocks", num_gpu_blocks.to_string())
                .const_label("enable_prefix_caching", "True")
                .const_label("engine", "0"),
        )?;
        info.set(1.0);
        registry.register(Box::new(info))?;
        let success = IntCounterVec::new(
            labels(Opts::new("vllm:request_success_total", "Count of successfully processed requests")),
            &["finish_reason"],
        )?;
        registry.register(Box::new(success.clone()))?;
        let lora_info = if max_lora > 0 {
            // Like vLLM: no model_name/engine labels; the value is a Unix timestamp.
            let g = GaugeVec::new(
                Opts::new("vllm:lora_requests_info", "Running stats on lora requests."),
                &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )?;
            registry.register(Box::new(g.clone()))?;
            g.with_label_values(&[&max_lora.to_string(), "", ""]).set(now_unix());
            Some(g)
        } else {
            None
        };
        let e2e_buckets = vec![0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0];
        Ok(Self {
            running: gauge("vllm:num_requests_running", "Number of requests in model execution batches")?,
            waiting: gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed")?,
            kv_usage: gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage")?,
            prefix_queries: counter("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of tokens")?,
            prefix_hits: counter("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of tokens")?,
            prompt_tokens: counter("vllm:prompt_tokens_total", "Number of prefill tokens processed")?,
            generation_tokens: counter("vllm:generation_tokens_total", "Number of generation tokens processed")?,
            success,
            ttft: hist(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds",
                TTFT_BUCKETS.to_vec(),
            )?,
            e2e: hist(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds",
                e2e_buckets.clone(),
            )?,
            queue_time: hist(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase",
                e2e_buckets,
            )?,
            lora_info,
            max_lora,
            registry,
        })
    }
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Adapters of running and waiting requests, for `vllm:lora_requests_info`.
#[derive(Default)]
pub struct LoraActivity {
    running: std::collections::BTreeMap<String, usize>,
    waiting: std::collections::BTreeMap<String, usize>,
}

/// Why a request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("the waiting queue is full ({0} requests)")]
    QueueFull(usize),
    #[error("the request needs {need} KV blocks but the cache has {capacity}")]
    TooLarge { need: usize, capacity: usize },
}

pub struct Engine {
    pub hasher: BlockHasher,
    pub latency: Latency,
    pub speedup: f64,
    pub max_waiting: usize,
    pub metrics: SimMetrics,
    pool: Mutex<BlockPool>,
    /// Physical block ids of the cached blocks (locked after `pool`, only with it held).
    block_ids: Mutex<BlockIds>,
    space: Notify,
    slots: Semaphore,
    running: AtomicUsize,
    waiting: AtomicUsize,
    events: Option<Mutex<Sender<Vec<KvEvent>>>>,
    lora: Mutex<LoraActivity>,
}

/// Ids of the cached blocks, as a KV connector names them (`remote_block_ids`): a block
/// takes an id when it is cached (the last one given back, else a new one) and gives it
/// back when it is evicted, so the ids of the cached blocks are distinct and < capacity.
#[derive(Default)]
struct BlockIds {
    by_hash: HashMap<u64, u32>,
    free: Vec<u32>,
    next: u32,
}

impl BlockIds {
    fn assign(&mut self, h: u64) {
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.by_hash.insert(h, id);
    }

    fn release(&mut self, h: u64) {
        if let Some(id) = self.by_hash.remove(&h) {
            self.free.push(id);
        }
    }
}

/// A request's work, as the HTTP layer hands it over.
pub struct Job {
    pub tokens: Vec<u32>,
    pub max_tokens: usize,
    pub extras: RequestExtras,
    pub lora_id: Option<i64>,
    /// `kv_transfer_params.do_remote_prefill` with a prefiller that confirmed the read:
    /// the prompt tokens this engine does not hold arrive over the KV transfer instead of
    /// being computed.
    pub remote_prefill: bool,
}

/// What happened to a request, in model time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    pub cached_tokens: usize,
    /// Prompt tokens pulled from a prefiller (`remote_prefill`), else 0.
    pub transferred_tokens: usize,
    pub queue: Duration,
    pub ttft: Duration,
}

/// A queued request; becomes running with [`Engine::start`].
pub struct Ticket<'a> {
    engine: &'a Engine,
    arrived: Instant,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.engine.waiting.fetch_sub(1, AcqRel);
        self.engine.metrics.waiting.set(self.engine.waiting.load(Acquire) as f64);
    }
}

/// A running request holding a slot and its KV blocks.
pub struct Running<'a> {
    engine: &'a Engine,
    _permit: SemaphorePermit<'a>,
    hashes: Vec<u64>,
    anon: usize,
    pub timing: Timing,
    started: Instant,
    generated: usize,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let e = self.engine;
        {
            let mut p = e.pool.lock();
            p.release(&self.hashes, self.anon);
            e.metrics.kv_usage.set(p.usage());
        }
        e.space.notify_waiters();
        e.running.fetch_sub(1, AcqRel);
        e.metrics.running.set(e.running.load(Acquire) as f64);
        e.metrics.generation_tokens.inc_by(self.generated as u64);
    }
}

impl Engine {
    pub fn new(
        hasher: BlockHasher,
        latency: Latency,
        speedup: f64,
        max_waiting: usize,
        num_gpu_blocks: usize,
        metrics: SimMetrics,
        events: Option<Sender<Vec<KvEvent>>>,
    ) -> Self {
        Self {
            slots: Semaphore::new(latency.max_num_seqs),
            hasher,
            latency,
            speedup: if speedup > 0.0 { speedup } else { 1.0 },
            max_waiting,
            metrics,
            pool: Mutex::new(BlockPool::new(num_gpu_blocks)),
            block_ids: Mutex::new(BlockIds::default()),
            space: Notify::new(),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            events: events.map(Mutex::new),
            lora: Mutex::new(LoraActivity::default()),
        }
    }

    fn real(&self, model: Duration) -> Duration {
        model.div_f64(self.speedup)
    }

    fn publish(&self, ev: Vec<KvEvent>) {
        tracing::debug!(events = ev.len(), enabled = self.events.is_some(), "publish");
        if let (Some(tx), false) = (&self.events, ev.is_empty()) {
            let _ = tx.lock().send(ev);
        }
    }

    /// Queues a request, or refuses it at once when the waiting queue is full.
    /// The admission rule: no free slot and `max_waiting` already queued.
    fn full(&self, waiting: usize) -> bool {
        self.slots.available_permits() == 0 && waiting >= self.max_waiting
    }

    /// Refuses now if a new request would be refused (no side effects; `enqueue` queues).
    pub fn check_admission(&self) -> Result<(), EngineError> {
        if self.full(self.waiting.load(Acquire)) {
            return Err(EngineError::QueueFull(self.max_waiting));
        }
        Ok(())
    }

    pub fn enqueue(&self) -> Result<Ticket<'_>, EngineError> {
        let w = self.waiting.fetch_add(1, AcqRel);
        if self.full(w) {
            self.waiting.fetch_sub(1, AcqRel);
            return Err(EngineError::QueueFull(self.max_waiting));
        }
        self.metrics.waiting.set((w + 1) as f64);
        Ok(Ticket { engine: self, arrived: Instant::now() })
    }

    /// Blocks of a request: its full prompt blocks (cached) and the rest (private).
    fn blocks_needed(&self, job: &Job) -> (Vec<u64>, usize) {
        let mut hashes = Vec::new();
        self.hasher.event_keys(&job.tokens, &job.extras, &mut hashes);
        let bs = self.hasher.block_size();
        let total = (job.tokens.len() + job.max_tokens).div_ceil(bs);
        (hashes.clone(), total - hashes.len())
    }

    /// Waits for a slot and KV space, then prefills (TTFT). Returns the running request.
    pub async fn start<'a>(&'a self, ticket: Ticket<'a>, job: &Job) -> Result<Running<'a>, EngineError> {
        let (hashes, anon) = self.blocks_needed(job);
        let capacity = self.pool.lock().capacity();
        if hashes.len() + anon > capacity {
            return Err(EngineError::TooLarge { need: hashes.len() + anon, capacity });
        }
        let permit = self.slots.acquire().await.map_err(|_| EngineError::QueueFull(0))?;
        let (alloc, hit) = loop {
            let notified = self.space.notified();
            {
                let mut p = self.pool.lock();
                let hit = p.prefix_hits(&hashes);
                if let Ok(a) = p.allocate(&hashes, anon) {
                    self.metrics.kv_usage.set(p.usage());
                    let mut ids = self.block_ids.lock();
                    for h in &a.evicted {
                        ids.release(*h);
                    }
                    for &i in &a.created {
                        ids.assign(hashes[i]);
                    }
                    break (a, hit);
                }
            }
            notified.await;
        };
        let arrived = ticket.arrived;
        drop(ticket);
        let running = self.running.fetch_add(1, AcqRel) + 1;
        self.metrics.running.set(running as f64);
        let queue_real = arrived.elapsed();
        let bs = self.hasher.block_size();
        let n = job.tokens.len();
        // vLLM always recomputes the last prompt token.
        let cached_tokens = (hit * bs).min(n.saturating_sub(1) / bs * bs);
        self.metrics.prefix_queries.inc_by(n as u64);
        self.metrics.prefix_hits.inc_by(cached_tokens as u64);
        self.metrics.prompt_tokens.inc_by(n as u64);
        // Evictions happen now; the new blocks are announced once computed.
        let removed: Vec<KvEvent> = alloc
            .evicted
            .iter()
            .map(|&h| {
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![h],
                    medium: Some("GPU".into()),
                    ..Default::default()
                })
            })
            .collect();
        self.publish(removed);
        let f = self.load_factor(running);
        // vLLM's NixlConnector reads only the blocks the decoder lacks (after its own hits).
        let transferred_tokens = if job.remote_prefill { n - cached_tokens } else { 0 };
        let prefill = if job.remote_prefill {
            self.latency.kv_transfer_per_token * transferred_tokens as u32
        } else {
            (self.latency.prefill_overhead + self.latency.prefill_per_token * (n - cached_tokens) as u32).mul_f64(f)
        };
        tokio::time::sleep(self.real(prefill)).await;
        self.publish(stored_events(&hashes, &alloc.created, &job.tokens, bs, job));
        let queue = queue_real.mul_f64(self.speedup);
        let timing = Timing { cached_tokens, transferred_tokens, queue, ttft: queue + prefill };
        self.metrics.queue_time.observe(queue.as_secs_f64());
        self.metrics.ttft.observe(timing.ttft.as_secs_f64());
        Ok(Running { engine: self, _permit: permit, hashes, anon, timing, started: Instant::now(), generated: 0 })
    }

    /// Keeps a running request's full prompt blocks allocated after it finishes (a
    /// prefiller holding them for a decoder's read): one more reference each, so they are
    /// neither freed nor evictable until [`Engine::unpin`]. Returns their hashes and ids.
    pub fn pin(&self, r: &Running<'_>) -> (Vec<u64>, Vec<u32>) {
        let mut p = self.pool.lock();
        // Every block is in use by `r`: this only takes references (nothing created or evicted).
        if p.allocate(&r.hashes, 0).is_err() {
            return (Vec::new(), Vec::new());
        }
        let ids = self.block_ids.lock();
        let block_ids = r.hashes.iter().map(|h| ids.by_hash.get(h).copied().unwrap_or(u32::MAX)).collect();
        (r.hashes.clone(), block_ids)
    }

    /// Gives back what [`Engine::pin`] took: the blocks go to the free LRU (still cached).
    pub fn unpin(&self, hashes: &[u64]) {
        {
            let mut p = self.pool.lock();
            p.release(hashes, 0);
            self.metrics.kv_usage.set(p.usage());
        }
        self.space.notify_waiters();
    }

    /// vLLM's `reset_prefix_cache()`: forgets every cached block and publishes
    /// `AllBlocksCleared` — only when no running request holds blocks (else, as vLLM
    /// logs, "some blocks are not freed yet": `Err(blocks in use)`, nothing changes).
    pub fn reset_prefix_cache(&self) -> Result<(), usize> {
        {
            let mut p = self.pool.lock();
            if !p.reset() {
                return Err(p.used());
            }
            *self.block_ids.lock() = BlockIds::default();
            self.metrics.kv_usage.set(p.usage());
            // Published under the pool's lock: a request allocating right after the reset
            // announces its blocks after the clear, never before it.
            self.publish(vec![KvEvent::AllBlocksCleared]);
        }
        self.space.notify_waiters();
        Ok(())
    }

    /// Moves a LoRA request between waiting (`+1`/`-1`) and running (`+1`/`-1`) and
    /// republishes `vllm:lora_requests_info`.
    pub fn lora_activity(&self, adapter: &str, waiting: i32, running: i32) {
        let Some(g) = &self.metrics.lora_info else { return };
        let mut a = self.lora.lock();
        let bump = |m: &mut std::collections::BTreeMap<String, usize>, d: i32| {
            let e = m.entry(adapter.to_string()).or_insert(0);
            *e = (*e as i64 + d as i64).max(0) as usize;
            if *e == 0 {
                m.remove(adapter);
            }
        };
        bump(&mut a.waiting, waiting);
        bump(&mut a.running, running);
        let join = |m: &std::collections::BTreeMap<String, usize>| m.keys().cloned().collect::<Vec<_>>().join(",");
        g.reset();
        g.with_label_values(&[&self.metrics.max_lora.to_string(), &join(&a.running), &join(&a.waiting)])
            .set(now_unix());
    }

    fn load_factor(&self, running: usize) -> f64 {
        let max = self.latency.max_num_seqs;
        if max <= 1 {
            return 1.0;
        }
        1.0 + (self.latency.load_factor - 1.0) * (running.saturating_sub(1)) as f64 / (max - 1) as f64
    }

    /// Real-time instant at which output token `k` (0 = the first) is due.
    pub fn token_due(&self, r: &Running<'_>, k: usize) -> Instant {
        if k == 0 {
            return r.started;
        }
        let f = self.load_factor(self.running.load(Acquire));
        r.started + self.real(self.latency.inter_token.mul_f64(f) * k as u32)
    }

    /// Marks a request done (success metrics); dropping `r` frees its slot and blocks.
    pub fn finish(&self, mut r: Running<'_>, generated: usize, finish_reason: &str) {
        r.generated = generated;
        let e2e = r.timing.ttft + r.started.elapsed().mul_f64(self.speedup);
        self.metrics.e2e.observe(e2e.as_secs_f64());
        self.metrics.success.with_label_values(&[finish_reason]).inc();
    }
}

/// One BlockStored per contiguous run of newly cached blocks.
fn stored_events(hashes: &[u64], created: &[usize], tokens: &[u32], bs: usize, job: &Job) -> Vec<KvEvent> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < created.len() {
        let mut j = i;
        while j + 1 < created.len() && created[j + 1] == created[j] + 1 {
            j += 1;
        }
        let (a, b) = (created[i], created[j] + 1);
        out.push(KvEvent::BlockStored(BlockStored {
            block_hashes: hashes[a..b].to_vec(),
            parent_block_hash: a.checked_sub(1).map(|p| hashes[p]),
            token_ids: tokens[a * bs..b * bs].to_vec(),
            block_size: bs as u32,
            lora_id: job.lora_id,
            medium: Some("GPU".into()),
            lora_name: job.extras.lora.as_ref().map(|l| l.name.clone()),
            extra_keys: Some(published_extra_keys(job, a, b, bs)),
            ..Default::default()
        }));
        i = j + 1;
    }
    out
}

/// `extra_keys` as vLLM ≥ 0.31 publishes them: per block, tags stripped (bare LoRA name,
/// bare salt on block 0), `None` for a block without extras.
fn published_extra_keys(job: &Job, a: usize, b: usize, bs: usize) -> Vec<Option<kvroute_events::Value>> {
    let mut gen = kvroute_keys::ExtraKeyGen::new(kvroute_keys::ExtraKeyEra::Name, &job.extras);
    (0..b)
        .map(|i| gen.block(i * bs, (i + 1) * bs))
        .skip(a)
        .map(|keys| {
            keys.map(|k| {
                kvroute_events::Value::Array(
                    k.into_iter()
                        .map(|v| match v {
                            kvroute_keys::PyValue::Str(s) => kvroute_events::Value::Str(s),
                            kvroute_keys::PyValue::Int(i) => kvroute_events::Value::Int(i),
                            other => kvroute_events::Value::Str(format!("{other:?}")),
                        })
                        .collect(),
                )
            })
        })
        .collect()
}

pub type SharedEngine = Arc<Engine>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ids_are_distinct_and_reused_after_eviction() {
        let mut ids = BlockIds::default();
        for h in [10, 11, 12] {
            ids.assign(h);
        }
        assert_eq!((ids.by_hash[&10], ids.by_hash[&11], ids.by_hash[&12]), (0, 1, 2));
        ids.release(11);
        ids.release(99); // not cached: nothing to give back
        ids.assign(13);
        ids.assign(14);
        assert_eq!((ids.by_hash[&13], ids.by_hash[&14]), (1, 3));
        assert!(!ids.by_hash.contains_key(&11));
    }
}
