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
    #[command(flatten)]
    pool: PoolArgs,
    /// Dial each pod's KV-event publisher at tcp://<podIP>:<port> (annotation
    /// kvroute.io/kv-events-port overrides it) [default: off = bind mode].
    #[arg(long)]
    pod_kv_events_port: Option<u16>,
    /// Each pod's KV-event replay port (annotation kvroute.io/kv-replay-port).
    #[arg(long)]
    pod_kv_replay_port: Option<u16>,
}

/// Which pods form the pool: an InferencePool or a label selector in a namespace
/// (`kvroute serve --discovery`'s backends, `kvroute sidecar`'s allowed prefillers).
#[derive(Args, Debug, Default, Clone)]
pub struct PoolArgs {
    /// Kubeconfig file [default: the in-cluster service account, else $KUBECONFIG].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// InferencePool to follow: the Ready pods its selector picks, at its target ports.
    #[arg(long)]
    pub pool_name: Option<String>,
    /// Namespace of the pool and its pods [default: the service account's / kubeconfig's].
    #[arg(long)]
    pub pool_namespace: Option<String>,
    /// InferencePool API group: inference.networking.k8s.io (v1) or
    /// inference.networking.x-k8s.io (v1alpha2) [default: inference.networking.k8s.io].
    #[arg(long)]
    pub pool_group: Option<String>,
    /// Without a pool: the Ready pods with these labels, e.g. app=vllm.
    #[arg(long)]
    pub endpoint_selector: Option<String>,
    /// Without a pool: the selected pods' ports, comma-separated [default: 8000].
    #[arg(long, value_delimiter = ',')]
    pub endpoint_target_ports: Vec<u16>,
}

impl PoolArgs {
    /// A pool or a selector is named.
    pub fn named(&self) -> bool {
        self.pool_name.is_some() || self.endpoint_selector.is_some()
    }

    /// Some flag that only means something with a pool or selector is set.
    pub fn any_detail(&self) -> bool {
        self.pool_namespace.is_some()
            || self.pool_group.is_some()
            || !self.endpoint_target_ports.is_empty()
            || self.kubeconfig.is_some()
    }

    /// Writes the flags given over `k`.
    pub fn apply(&self, k: &mut kvroute_discovery::KubeSection) {
        for (flag, field) in [
            (&self.pool_name, &mut k.pool_name),
            (&self.pool_namespace, &mut k.namespace),
            (&self.endpoint_selector, &mut k.endpoint_selector),
        ] {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        if self.kubeconfig.is_some() {
            k.kubeconfig.clone_from(&self.kubeconfig);
        }
        if let Some(g) = &self.pool_group {
            k.pool_group = g.clone();
        }
        if !self.endpoint_target_ports.is_empty() {
            k.target_ports = self.endpoint_target_ports.clone();
        }
    }
}

impl DiscoveryArgs {
    pub fn apply(&self, d: &mut DiscoverySection) {
        self.pool.apply(&mut d.kubernetes);
        let k = &mut d.kubernetes;
        macro_rules! set {
            ($flag:expr, $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = Some(v);
                }
            };
        }
        set!(self.pod_kv_events_port, k.kv_events_port);
        set!(self.pod_kv_replay_port, k.kv_replay_port);
        match self.discovery {
            Some(m) => d.mode = m,
            None if self.pool.named() => d.mode = Mode::Kubernetes,
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
