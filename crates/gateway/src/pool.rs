//! The pod pool: the backends (a static list, or discovery's fleet swapped in whole as it
//! changes — requests in flight keep their `Arc<Backend>`), health probes, and scraped
//! vLLM metrics.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_index::PodId;
use parking_lot::RwLock;
use serde_json::Value;

/// One vLLM server.
pub struct Backend {
    /// `host:port`: the pod identity (the same as its KV-event topic's pod segment).
    pub name: String,
    pub url: String,
    pub pod: PodId,
    /// Labels from the pool configuration or the pod (e.g. `llm-d.ai/role: decode`);
    /// discovery updates them in place when a pod's labels change.
    pub labels: RwLock<std::collections::BTreeMap<String, String>>,
    pub healthy: AtomicBool,
    /// A probe has succeeded at least once (readiness counts only such pods).
    pub probed_ok: AtomicBool,
    pub failures: AtomicU32,
    /// Requests the router has in flight to this pod.
    pub in_flight: AtomicU32,
    /// Uncached prompt tokens of requests sent here that have no first byte back yet.
    pub pending_prefill: AtomicU64,
    /// Requests sent here that have no first byte back yet.
    pub queued: AtomicU32,
    /// Uncached blocks routed here (decayed, see `kvroute_schedule::decayed`) and when.
    new_blocks: parking_lot::Mutex<(f64, Instant)>,
    /// Prompt block keys of the requests in flight here, with how many requests hold each.
    active: parking_lot::Mutex<std::collections::HashMap<u64, u32>>,
    /// KV capacity in blocks, from `vllm:cache_config_info{num_gpu_blocks}` (0: unknown).
    gpu_blocks: AtomicU64,
    /// The pod's block size, from `vllm:cache_config_info{block_size}` (0: unknown).
    block_size: AtomicU64,
    /// Models (and LoRA adapters) the pod serves, from `/v1/models`.
    pub models: RwLock<Vec<Value>>,
    /// Scraped `vllm:kv_cache_usage_perc` and `vllm:num_requests_waiting` (f64 bits),
    /// running LoRA adapters, and when.
    kv_usage: AtomicU64,
    waiting: AtomicU64,
    pub running_loras: RwLock<Vec<String>>,
    scraped: RwLock<Option<Instant>>,
    /// Told when the pod leaves or rejoins the rotation (set once, by the gateway).
    pub hook: std::sync::OnceLock<Arc<dyn HealthHook>>,
    /// Wakes the requests waiting for this pod's first byte when it leaves the rotation.
    out: tokio::sync::Notify,
}

/// What happens when a pod leaves the rotation (two failures in a row) or rejoins it (a
/// probe succeeded after it was out).
pub trait HealthHook: Send + Sync {
    fn down(&self, b: &Backend);
    fn up(&self, b: &Backend);
}

impl Backend {
    pub fn new(url: &str, pod: PodId) -> Self {
        let url = url.trim_end_matches('/').to_string();
        let name = url.split("://").nth(1).unwrap_or(&url).to_string();
        Self {
            name,
            url,
            pod,
            labels: RwLock::new(Default::default()),
            healthy: AtomicBool::new(true),
            probed_ok: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            pending_prefill: AtomicU64::new(0),
            queued: AtomicU32::new(0),
            new_blocks: parking_lot::Mutex::new((0.0, Instant::now())),
            active: parking_lot::Mutex::new(Default::default()),
            gpu_blocks: AtomicU64::new(0),
            block_size: AtomicU64::new(0),
            models: RwLock::new(Vec::new()),
            kv_usage: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            running_loras: RwLock::new(Vec::new()),
            scraped: RwLock::new(None),
            hook: std::sync::OnceLock::new(),
            out: tokio::sync::Notify::new(),
        }
    }

    /// A request holding these prompt blocks is now in flight here.
    pub fn add_active(&self, keys: &[u64]) {
        let mut a = self.active.lock();
        for k in keys {
            *a.entry(*k).or_default() += 1;
        }
    }

    /// That request is done.
    pub fn remove_active(&self, keys: &[u64]) {
        let mut a = self.active.lock();
        for k in keys {
            if let Some(n) = a.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    a.remove(k);
                }
            }
        }
    }

    /// Distinct prompt blocks in flight here, and how many of `keys` from block 0 are
    /// among them.
    pub fn active_blocks(&self, keys: &[u64]) -> (usize, usize) {
        let a = self.active.lock();
        (a.len(), keys.iter().take_while(|k| a.contains_key(k)).count())
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Acquire)
    }

    /// A failed probe or request; two in a row take the pod out.
    pub fn failed(&self) {
        if self.failures.fetch_add(1, AcqRel) + 1 >= 2 && self.healthy.swap(false, AcqRel) {
            tracing::warn!(pod = %self.name, "pod out of rotation (two failures in a row)");
            self.out.notify_waiters();
            if let Some(h) = self.hook.get() {
                h.down(self);
            }
        }
    }

    /// Resolves when the pod next leaves the rotation (a request waiting for its first
    /// byte then moves to another pod). Waits registered from creation, even unpolled.
    pub fn taken_out(&self) -> tokio::sync::futures::Notified<'_> {
        self.out.notified()
    }

    pub fn succeeded(&self) {
        self.failures.store(0, Release);
        self.probed_ok.store(true, Release);
        if !self.healthy.swap(true, AcqRel) {
            tracing::info!(pod = %self.name, "pod back in rotation");
            if let Some(h) = self.hook.get() {
                h.up(self);
            }
        }
    }

    /// KV-cache usage, if scraped within `max_age`.
    pub fn kv_usage(&self, max_age: Duration) -> Option<f64> {
        let fresh = self.scraped.read().is_some_and(|t| t.elapsed() <= max_age);
        fresh.then(|| f64::from_bits(self.kv_usage.load(Relaxed)))
    }

    /// Waiting requests, if scraped within `max_age`.
    pub fn waiting(&self, max_age: Duration) -> Option<f64> {
        let fresh = self.scraped.read().is_some_and(|t| t.elapsed() <= max_age);
        fresh.then(|| f64::from_bits(self.waiting.load(Relaxed)))
    }

    /// Records `n` blocks the pod did not hold sent to it.
    pub fn add_new_blocks(&self, n: usize) {
        let mut g = self.new_blocks.lock();
        let now = Instant::now();
        *g = (kvroute_schedule::decayed(g.0, now.duration_since(g.1).as_secs_f64()) + n as f64, now);
    }

    /// Decayed new blocks ÷ KV capacity (`None` until the capacity is scraped).
    pub fn cache_turnover(&self) -> Option<f64> {
        let cap = self.gpu_blocks.load(Relaxed);
        if cap == 0 {
            return None;
        }
        let g = self.new_blocks.lock();
        Some(kvroute_schedule::decayed(g.0, g.1.elapsed().as_secs_f64()) / cap as f64)
    }

    /// KV capacity in blocks from `vllm:cache_config_info{num_gpu_blocks}`, once scraped.
    pub fn gpu_blocks(&self) -> Option<u64> {
        Some(self.gpu_blocks.load(Relaxed)).filter(|&n| n > 0)
    }

    /// The block size the pod reports in `vllm:cache_config_info{block_size}`, once scraped.
    pub fn block_size(&self) -> Option<u64> {
        Some(self.block_size.load(Relaxed)).filter(|&n| n > 0)
    }

    /// Whether Envoy's subset hint (`ip:port` or `ip` entries) admits this pod
    /// (`None`: no hint, every pod).
    pub fn in_subset(&self, subset: Option<&[String]>) -> bool {
        subset.is_none_or(|s| {
            let ip = self.name.rsplit_once(':').map_or(self.name.as_str(), |x| x.0);
            s.iter().any(|e| e == &self.name || e == ip)
        })
    }

    pub fn serves(&self, model: &str) -> bool {
        let m = self.models.read();
        m.is_empty() || m.iter().any(|x| x.get("id").and_then(Value::as_str) == Some(model))
    }
}

/// Every backend, probed in the background.
pub struct Pool {
    backends: RwLock<Arc<Vec<Arc<Backend>>>>,
    pub lora_names: RwLock<HashSet<String>>,
    /// Installed on every backend, present and future.
    hook: std::sync::OnceLock<Arc<dyn HealthHook>>,
    /// Discovery's view: `None` for a static pool.
    pub discovery: RwLock<Option<DiscoveryStatus>>,
}

/// How a discovered pool stands (readiness reports it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryStatus {
    /// The first full listing arrived.
    pub synced: bool,
    /// What keeps routing from working as configured.
    pub problem: Option<String>,
}

impl Pool {
    pub fn new(backends: Vec<Arc<Backend>>) -> Self {
        Self {
            backends: RwLock::new(Arc::new(backends)),
            lora_names: Default::default(),
            hook: Default::default(),
            discovery: RwLock::new(None),
        }
    }

    /// The backends now (a snapshot: later fleet changes do not alter it).
    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.read().clone()
    }

    /// Replaces the backends (discovery); new ones get the health hook.
    pub fn set_backends(&self, list: Vec<Arc<Backend>>) {
        if let Some(h) = self.hook.get() {
            for b in &list {
                let _ = b.hook.set(h.clone());
            }
        }
        *self.backends.write() = Arc::new(list);
    }

    /// Sets the health hook of every backend, present and future (once).
    pub fn set_hook(&self, h: Arc<dyn HealthHook>) {
        for b in self.backends().iter() {
            let _ = b.hook.set(h.clone());
        }
        let _ = self.hook.set(h);
    }

    /// Pods in rotation that a probe has found up (readiness).
    pub fn ready_backends(&self) -> usize {
        self.backends().iter().filter(|b| b.is_healthy() && b.probed_ok.load(Acquire)).count()
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `running_lora_adapters` of the freshest `vllm:lora_requests_info` series.
/// A numeric label of the first sample of `name`, e.g. `num_gpu_blocks` of
/// `vllm:cache_config_info{…,num_gpu_blocks="4096",…} 1`.
fn label_value(text: &str, name: &str, label: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))?;
    let pat = format!("{label}=\"");
    let start = line.find(&pat)? + pat.len();
    line[start..].split('"').next()?.parse().ok()
}

fn running_loras(text: &str) -> Vec<String> {
    let best = text.lines().filter(|l| l.starts_with("vllm:lora_requests_info{")).max_by(|a, b| {
        let v = |l: &str| l.rsplit(' ').next().and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        v(a).total_cmp(&v(b))
    });
    let Some(line) = best else { return Vec::new() };
    let Some(start) = line.find("running_lora_adapters=\"") else { return Vec::new() };
    let rest = &line[start + "running_lora_adapters=\"".len()..];
    rest.split('"').next().unwrap_or("").split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

impl Pool {
    /// Probes `/health` (and `/v1/models`, `/metrics`) of every backend every `interval`.
    pub fn spawn_probes(self: &Arc<Self>, client: reqwest::Client, interval: Duration) {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                for b in pool.backends().iter() {
                    let ok = client
                        .get(format!("{}/health", b.url))
                        .timeout(Duration::from_secs(1))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if !ok {
                        b.failed();
                        continue;
                    }
                    b.succeeded();
                    if let Ok(r) =
                        client.get(format!("{}/v1/models", b.url)).timeout(Duration::from_secs(1)).send().await
                    {
                        if let Ok(v) = r.json::<Value>().await {
                            let data = v["data"].as_array().cloned().unwrap_or_default();
                            let mut loras = pool.lora_names.write();
                            for m in &data {
                                if m.get("parent").is_some_and(|p| !p.is_null()) {
                                    if let Some(id) = m.get("id").and_then(Value::as_str) {
                                        loras.insert(id.to_string());
                                    }
                                }
                            }
                            *b.models.write() = data;
                        }
                    }
                    if let Ok(r) = client.get(format!("{}/metrics", b.url)).timeout(Duration::from_secs(1)).send().await
                    {
                        if let Ok(text) = r.text().await {
                            if let Some(n) = label_value(&text, "vllm:cache_config_info", "block_size") {
                                b.block_size.store(n, Relaxed);
                            }
                            if let Some(u) = metric(&text, "vllm:kv_cache_usage_perc") {
                                b.kv_usage.store(u.to_bits(), Relaxed);
                                b.waiting.store(
                                    metric(&text, "vllm:num_requests_waiting").unwrap_or(0.0).to_bits(),
                                    Relaxed,
                                );
                                *b.running_loras.write() = running_loras(&text);
                                if let Some(n) = label_value(&text, "vllm:cache_config_info", "num_gpu_blocks") {
                                    b.gpu_blocks.store(n, Relaxed);
                                }
                                *b.scraped.write() = Some(Instant::now());
                            }
                        }
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scrape_parsing() {
        let t = "vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3\n\
                 vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1700000000.5\n\
                 vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"} 1600000000\n";
        assert_eq!(super::metric(t, "vllm:num_requests_waiting"), Some(3.0));
        let c = "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"4096\",engine=\"0\"} 1\n";
        assert_eq!(super::label_value(c, "vllm:cache_config_info", "num_gpu_blocks"), Some(4096));
        assert_eq!(super::label_value(c, "vllm:cache_config_info", "missing"), None);
        assert_eq!(super::running_loras(t), vec!["a".to_string(), "b".to_string()]);
    }
}
