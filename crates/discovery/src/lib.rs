//! # kvroute-discovery — which pods make up the fleet (… → pool → pick)
//!
//! Owns *who the backends are*. The rest of kvroute (the gateway's pool, the KV-event
//! ingestion, the index) follows the [`Fleet`] this crate publishes on a
//! [`tokio::sync::watch`] channel: a full snapshot of the endpoints each time anything
//! changes, never a diff, so a consumer that misses an update still converges.
//!
//! * **static** (the default): the configured `--backend` list, published once.
//! * **kubernetes** ([`kube`] watchers, [`KubeSection`]): either an **InferencePool**
//!   (`inference.networking.k8s.io/v1`: `spec.selector.matchLabels`, `spec.targetPorts`;
//!   or the legacy `inference.networking.x-k8s.io/v1alpha2`: `spec.selector`,
//!   `spec.targetPortNumber`) whose selector picks the pods, or a plain label selector and
//!   target ports (llm-d's standalone `--endpoint-selector` / `--endpoint-target-ports`).
//!   A pod is a backend while its labels match, it has a `podIP`, its `Ready` condition is
//!   true and it is not terminating; each target port of a pod is its own endpoint
//!   (`podIP:port`, as llm-d does for data-parallel ranks). A change to the pool itself
//!   (selector, ports) re-targets the pod watch without a restart. **InferenceObjective**s
//!   (`inference.networking.x-k8s.io/v1alpha2`) give request priorities by name.
//!
//! Failure rule: the last known good fleet keeps serving. A watch that breaks (API server
//! unreachable, 410 Gone, RBAC) is retried with backoff and re-listed; until the re-list
//! completes the previous pods stay. Errors are logged (rate-limited by the backoff) and
//! counted in `kvroute_discovery_errors_total{resource}`; [`Fleet::problem`] says what is
//! wrong where routing is affected (no pool, no selector, nothing matches).

mod kube_watch;
mod spec;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use kube_watch::{start_kubernetes, DiscoveryMetrics};
pub use spec::{endpoints_of_pod, parse_pool, PodEndpointsError, PoolSpec};

/// Pod annotation overriding the port of the pod's KV-event publisher (dial mode).
pub const ANNOTATION_EVENTS_PORT: &str = "kvroute.io/kv-events-port";
/// Pod annotation overriding the port of the pod's KV-event replay endpoint.
pub const ANNOTATION_REPLAY_PORT: &str = "kvroute.io/kv-replay-port";
/// The InferencePool API group of GIE v1 (the default).
pub const POOL_GROUP_V1: &str = "inference.networking.k8s.io";
/// The legacy (v1alpha2) InferencePool / InferenceObjective API group.
pub const POOL_GROUP_ALPHA: &str = "inference.networking.x-k8s.io";

/// One backend: a serving port of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `ip:port` — the backend's identity, as in KV-event topics `kv@<ip:port>@<model>`.
    pub name: String,
    /// The pod's name (Kubernetes) or the backend URL (static).
    pub pod: String,
    pub ip: String,
    pub port: u16,
    /// The pod's labels (drive the label and P/D role filters).
    pub labels: BTreeMap<String, String>,
    /// The KV-event publisher to dial (`tcp://ip:port`), when dial mode is configured.
    pub events: Option<String>,
    /// The replay endpoint to ask for missed batches (`tcp://ip:port`).
    pub replay: Option<String>,
}

impl Endpoint {
    pub fn url(&self) -> String {
        format!("http://{}", self.name)
    }
}

/// The fleet as discovery sees it now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fleet {
    /// Every endpoint, sorted by name.
    pub endpoints: Vec<Endpoint>,
    /// The first full listing has arrived (before that `endpoints` is empty and means
    /// "unknown", not "none").
    pub synced: bool,
    /// What keeps routing from working as configured, e.g. "InferencePool default/x not
    /// found" (readiness reports it).
    pub problem: Option<String>,
}

/// Request priorities by InferenceObjective name (negative = sheddable).
pub type Objectives = Arc<parking_lot::RwLock<HashMap<String, i64>>>;

/// Running discovery: the fleet (and objectives) as they change.
pub struct Discovery {
    pub fleet: tokio::sync::watch::Receiver<Fleet>,
    pub objectives: Objectives,
    /// Watch tasks; aborted on drop.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Discovery {
    /// A fixed fleet (no tasks).
    pub fn fixed(endpoints: Vec<Endpoint>) -> Self {
        let (_tx, rx) = tokio::sync::watch::channel(Fleet { endpoints, synced: true, problem: None });
        Self { fleet: rx, objectives: Default::default(), tasks: Vec::new() }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// `discovery:` — where the backends come from (defaults: static).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoverySection {
    /// `static` (default: the `backends:` list) or `kubernetes`.
    pub mode: Mode,
    pub kubernetes: KubeSection,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Static,
    Kubernetes,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "static" => Ok(Self::Static),
            "kubernetes" | "k8s" => Ok(Self::Kubernetes),
            _ => Err(format!("unknown discovery mode {s:?} (static, kubernetes)")),
        }
    }
}

/// `discovery.kubernetes` (defaults in [`KubeSection::default`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubeSection {
    /// Kubeconfig file (default none: the in-cluster service account, else `$KUBECONFIG` /
    /// `~/.kube/config`).
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Namespace of the pool and its pods (default: the service account's namespace
    /// in-cluster, else the kubeconfig context's, else `default`).
    pub namespace: Option<String>,
    /// The InferencePool to follow (pool mode).
    pub pool_name: Option<String>,
    /// The pool's API group (default `inference.networking.k8s.io`, version v1;
    /// `inference.networking.x-k8s.io` = the legacy v1alpha2 shape).
    pub pool_group: String,
    /// Pod label selector without a pool, e.g. `app=vllm` (selector mode).
    pub endpoint_selector: Option<String>,
    /// Serving ports of each selected pod (selector mode; default `[8000]`).
    pub target_ports: Vec<u16>,
    /// Port of each pod's KV-event publisher to dial (`tcp://<podIP>:<port>`, rank i of a
    /// pod's target ports at `port + i`); default none = bind mode (pods connect to
    /// `ingest.bind` and name themselves in topics). Annotation `kvroute.io/kv-events-port`
    /// overrides it per pod.
    pub kv_events_port: Option<u16>,
    /// Port of each pod's replay endpoint (default none; annotation
    /// `kvroute.io/kv-replay-port`).
    pub kv_replay_port: Option<u16>,
    /// Follow InferenceObjectives for `x-gateway-inference-objective` priorities
    /// (default true).
    pub objectives: bool,
}

impl Default for KubeSection {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            namespace: None,
            pool_name: None,
            pool_group: POOL_GROUP_V1.into(),
            endpoint_selector: None,
            target_ports: Vec::new(),
            kv_events_port: None,
            kv_replay_port: None,
            objectives: true,
        }
    }
}

impl KubeSection {
    /// Checks that exactly one of pool / selector is given, and the group is known.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.pool_name, &self.endpoint_selector) {
            (Some(_), Some(_)) => {
                return Err("discovery.kubernetes: give pool_name (--pool-name) or endpoint_selector \
                            (--endpoint-selector), not both"
                    .into())
            }
            (None, None) => {
                return Err("discovery.kubernetes needs pool_name (--pool-name) or endpoint_selector \
                            (--endpoint-selector)"
                    .into())
            }
            _ => {}
        }
        if self.pool_group != POOL_GROUP_V1 && self.pool_group != POOL_GROUP_ALPHA {
            return Err(format!(
                "discovery.kubernetes.pool_group {:?}: expected {POOL_GROUP_V1} (v1) or {POOL_GROUP_ALPHA} (v1alpha2)",
                self.pool_group
            ));
        }
        if self.endpoint_selector.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err("discovery.kubernetes.endpoint_selector is empty (it would select every pod)".into());
        }
        Ok(())
    }
}
