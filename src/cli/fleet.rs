//! `kvroute serve` with discovery: the flags, and the reconciler that turns each fleet
//! snapshot (`kvroute_discovery::Fleet`) into the gateway's backends and ingestion's pods.
//!
//! Per snapshot: endpoints that are new become backends (probed, routed to) and their KV
//! events are followed (dial mode: dialled and replayed from 0; bind mode: their topics
//! accepted, held messages released); endpoints that left stop getting requests at once
//! (requests in flight finish), their event sockets close and their index entries go;
//! endpoints that stay keep their state, with labels updated in place. Readiness waits for
//! the first full listing and for the replays of the pods it found.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kvroute_discovery::{DiscoverySection, Endpoint, Fleet, Mode};
use kvroute_gateway::{Backend, DiscoveryStatus, Gateway, Pool};
use kvroute_index::Pods;
use kvroute_ingest::{Control, DialTarget, IngestControl};

/// Discovery flags (override the `discovery:` section of `--config`).
#[derive(Args, Debug, Default, Clone)]
pub struct DiscoveryArgs {
    /// Where the backends come from: static (the --backend list) or kubernetes
    /// [default: static; kubernetes when --pool-name or --endpoint-selector is given].
    #[arg(long, value_name = "MODE")]
    discovery: Option<Mode>,
    /// Kubeconfig file [default: the in-cluster service account, else $KUBECONFIG].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// InferencePool to follow (its selector and target ports pick the pods).
    #[arg(long)]
    pool_name: Option<String>,
    /// Namespace of the pool and its pods [default: the service account's / kubeconfig's].
    #[arg(long)]
    pool_namespace: Option<String>,
    /// InferencePool API group: inference.networking.k8s.io (v1) or
    /// inference.networking.x-k8s.io (v1alpha2) [default: inference.networking.k8s.io].
    #[arg(long)]
    pool_group: Option<String>,
    /// Without a pool: the pods' label selector, e.g. app=vllm.
    #[arg(long)]
    endpoint_selector: Option<String>,
    /// Without a pool: the pods' serving ports, comma-separated [default: 8000].
    #[arg(long, value_delimiter = ',')]
    endpoint_target_ports: Vec<u16>,
    /// Dial each pod's KV-event publisher at tcp://<podIP>:<port> (annotation
    /// kvroute.io/kv-events-port overrides it) [default: off = bind mode].
    #[arg(long)]
    pod_kv_events_port: Option<u16>,
    /// Each pod's KV-event replay port (annotation kvroute.io/kv-replay-port).
    #[arg(long)]
    pod_kv_replay_port: Option<u16>,
}

impl DiscoveryArgs {
    pub fn apply(&self, d: &mut DiscoverySection) {
        let k = &mut d.kubernetes;
        macro_rules! set {
            ($flag:expr, $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = Some(v);
                }
            };
        }
        set!(self.kubeconfig, k.kubeconfig);
        set!(self.pool_name, k.pool_name);
        set!(self.pool_namespace, k.namespace);
        set!(self.endpoint_selector, k.endpoint_selector);
        set!(self.pod_kv_events_port, k.kv_events_port);
        set!(self.pod_kv_replay_port, k.kv_replay_port);
        if let Some(g) = &self.pool_group {
            k.pool_group = g.clone();
        }
        if !self.endpoint_target_ports.is_empty() {
            k.target_ports = self.endpoint_target_ports.clone();
        }
        match self.discovery {
            Some(m) => d.mode = m,
            None if self.pool_name.is_some() || self.endpoint_selector.is_some() => d.mode = Mode::Kubernetes,
            None => {}
        }
    }
}

/// Applies fleet snapshots to the gateway's pool and to ingestion.
pub struct Reconciler {
    pub pool: Arc<Pool>,
    pub gateway: Arc<Gateway>,
    pub pods: Arc<Pods>,
    pub control: IngestControl,
    /// Longest wait for the first listing's replays before readiness (replay timeout).
    pub replay_wait: Duration,
}

impl Reconciler {
    /// Starts Kubernetes discovery (objectives shared with the gateway) and this
    /// reconciler on its fleet; the returned handle keeps the watches running.
    pub async fn start(
        self,
        cfg: &kvroute_discovery::KubeSection,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<kvroute_discovery::Discovery> {
        let objectives = self.gateway.objectives.clone();
        let d = kvroute_discovery::start_kubernetes(cfg, registry, objectives)
            .await
            .map_err(anyhow::Error::msg)
            .map_err(|e| e.context("Kubernetes discovery"))?;
        tokio::spawn(self.run(d.fleet.clone()));
        Ok(d)
    }

    /// Follows `rx` until it closes.
    pub async fn run(self, mut rx: tokio::sync::watch::Receiver<Fleet>) {
        *self.pool.discovery.write() = Some(DiscoveryStatus::default());
        let mut followed: HashMap<String, Endpoint> = HashMap::new();
        let mut rebuilt = false;
        loop {
            let fleet = rx.borrow_and_update().clone();
            if fleet.synced {
                self.apply(&fleet, &mut followed);
                if !rebuilt {
                    // Readiness waits for the pods found at start to be replayed.
                    let t0 = Instant::now();
                    while !self.control.joins_replayed() && t0.elapsed() < self.replay_wait {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    tracing::info!(
                        endpoints = fleet.endpoints.len(),
                        ms = t0.elapsed().as_millis() as u64,
                        "discovery synced; the index is rebuilt from the pods' replays"
                    );
                    rebuilt = true;
                }
            }
            *self.pool.discovery.write() =
                Some(DiscoveryStatus { synced: fleet.synced && rebuilt, problem: fleet.problem });
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn apply(&self, fleet: &Fleet, followed: &mut HashMap<String, Endpoint>) {
        let current: HashMap<String, Arc<Backend>> =
            self.pool.backends().iter().map(|b| (b.name.clone(), b.clone())).collect();
        let mut next = Vec::with_capacity(fleet.endpoints.len());
        for e in &fleet.endpoints {
            let b = match current.get(&e.name) {
                Some(b) => {
                    if *b.labels.read() != e.labels {
                        tracing::info!(endpoint = %e.name, labels = ?e.labels, "pod labels changed");
                        *b.labels.write() = e.labels.clone();
                    }
                    b.clone()
                }
                None => {
                    let Ok(id) = self.pods.intern(&e.name) else {
                        tracing::warn!(endpoint = %e.name, "too many pods for the index: endpoint skipped");
                        continue;
                    };
                    let b = Backend::new(&e.url(), id);
                    *b.labels.write() = e.labels.clone();
                    tracing::info!(endpoint = %e.name, pod = %e.pod, "endpoint joined the fleet");
                    Arc::new(b)
                }
            };
            next.push(b);
        }
        // Requests stop going to departed endpoints first, then their state goes.
        self.pool.set_backends(next);
        let wanted: HashMap<&str, &Endpoint> = fleet.endpoints.iter().map(|e| (e.name.as_str(), e)).collect();
        let gone: Vec<String> = followed
            .iter()
            .filter(|(name, old)| {
                wanted.get(name.as_str()).is_none_or(|e| (&e.events, &e.replay) != (&old.events, &old.replay))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            followed.remove(&name);
            if !wanted.contains_key(name.as_str()) {
                tracing::info!(endpoint = %name, "endpoint left the fleet: no new requests, index entries removed");
                if let Some(id) = self.pods.get(&name) {
                    self.gateway.forget_pod(id);
                }
            }
            self.control.send(Control::Remove(name));
        }
        for e in &fleet.endpoints {
            if followed.contains_key(&e.name) {
                continue;
            }
            match &e.events {
                Some(endpoint) => self.control.send(Control::Dial(DialTarget {
                    pod: e.name.clone(),
                    endpoint: endpoint.clone(),
                    replay: e.replay.clone(),
                })),
                None => self.control.send(Control::Known(e.name.clone())),
            }
            followed.insert(e.name.clone(), e.clone());
        }
    }
}
