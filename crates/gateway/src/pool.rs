//! The pod pool: static backends, health probes, and scraped vLLM metrics.

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
    pub healthy: AtomicBool,
    pub failures: AtomicU32,
    /// Requests the router has in flight to this pod.
    pub in_flight: AtomicU32,
    /// Models (and LoRA adapters) the pod serves, from `/v1/models`.
    pub models: RwLock<Vec<Value>>,
    /// Scraped `vllm:kv_cache_usage_perc` (f64 bits) and when.
    kv_usage: AtomicU64,
    scraped: RwLock<Option<Instant>>,
}

impl Backend {
    pub fn new(url: &str, pod: PodId) -> Self {
        let url = url.trim_end_matches('/').to_string();
        let name = url.split("://").nth(1).unwrap_or(&url).to_string();
        Self {
            name,
            url,
            pod,
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            models: RwLock::new(Vec::new()),
            kv_usage: AtomicU64::new(0),
            scraped: RwLock::new(None),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Acquire)
    }

    /// A failed probe or request; two in a row take the pod out.
    pub fn failed(&self) {
        if self.failures.fetch_add(1, AcqRel) + 1 >= 2 {
            self.healthy.store(false, Release);
        }
    }

    pub fn succeeded(&self) {
        self.failures.store(0, Release);
        self.healthy.store(true, Release);
    }

    /// KV-cache usage, if scraped within `max_age`.
    pub fn kv_usage(&self, max_age: Duration) -> Option<f64> {
        let fresh = self.scraped.read().is_some_and(|t| t.elapsed() <= max_age);
        fresh.then(|| f64::from_bits(self.kv_usage.load(Relaxed)))
    }

    pub fn serves(&self, model: &str) -> bool {
        let m = self.models.read();
        m.is_empty() || m.iter().any(|x| x.get("id").and_then(Value::as_str) == Some(model))
    }
}

/// Every backend, probed in the background.
pub struct Pool {
    pub backends: Vec<Arc<Backend>>,
    pub lora_names: RwLock<HashSet<String>>,
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

impl Pool {
    /// Probes `/health` (and `/v1/models`, `/metrics`) of every backend every `interval`.
    pub fn spawn_probes(self: &Arc<Self>, client: reqwest::Client, interval: Duration) {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                for b in &pool.backends {
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
                            if let Some(u) = metric(&text, "vllm:kv_cache_usage_perc") {
                                b.kv_usage.store(u.to_bits(), Relaxed);
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
