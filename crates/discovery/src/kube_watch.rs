//! The Kubernetes side: watchers (kube-runtime, list + watch, backoff, re-list on 410
//! Gone) on the InferencePool, the pool's pods and the InferenceObjectives, folded into one
//! [`Fleet`] snapshot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::spec::{endpoints_of_pod, parse_pool, PoolSpec};
use crate::{Discovery, Endpoint, Fleet, KubeSection, Objectives, POOL_GROUP_ALPHA, POOL_GROUP_V1};

/// Discovery's metrics.
#[derive(Clone)]
pub struct DiscoveryMetrics {
    errors: IntCounterVec,
    watch_up: IntGauge,
    endpoints: IntGauge,
    synced: IntGauge,
    changes: IntCounter,
    bad_annotations: IntCounter,
    objectives: IntGauge,
}

impl DiscoveryMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let errors = IntCounterVec::new(
            Opts::new(
                "kvroute_discovery_errors_total",
                "Failed Kubernetes list/watch calls and invalid objects, by resource (the last known fleet keeps serving)",
            ),
            &["resource"],
        )?;
        let watch_up =
            IntGauge::new("kvroute_discovery_watch_up", "1 while the pod watch is established, 0 while it retries")?;
        let endpoints = IntGauge::new("kvroute_discovery_endpoints", "Endpoints (ready pod × target port) discovered")?;
        let synced = IntGauge::new("kvroute_discovery_synced", "1 once the first full listing of the fleet arrived")?;
        let changes = IntCounter::new("kvroute_discovery_fleet_changes_total", "Fleet snapshots published")?;
        let bad_annotations = IntCounter::new(
            "kvroute_discovery_bad_annotations_total",
            "Pod annotations kvroute reads that did not parse (the configured default was used)",
        )?;
        let objectives = IntGauge::new("kvroute_discovery_objectives", "InferenceObjectives known (priority by name)")?;
        for m in [&watch_up, &endpoints, &synced, &objectives] {
            registry.register(Box::new(m.clone()))?;
        }
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(changes.clone()))?;
        registry.register(Box::new(bad_annotations.clone()))?;
        Ok(Self { errors, watch_up, endpoints, synced, changes, bad_annotations, objectives })
    }
}

/// Everything the fleet is computed from.
#[derive(Default)]
struct State {
    /// Pool mode: the pool's spec (`None`: not listed yet or absent; `Err`: invalid).
    pool: Option<Result<PoolSpec, String>>,
    pool_listed: bool,
    /// The spec the pod watch runs with (the last valid one).
    spec: Option<PoolSpec>,
    pods: BTreeMap<String, Pod>,
    pods_synced: bool,
    /// The selector `pods` were listed with (a new selector keeps the last fleet until
    /// its own listing arrives).
    pods_selector: Option<String>,
    reported: HashSet<(String, String)>,
    last: Vec<Endpoint>,
}

struct Ctx {
    cfg: KubeSection,
    namespace: String,
    state: Mutex<State>,
    tx: watch::Sender<Fleet>,
    metrics: DiscoveryMetrics,
}

impl Ctx {
    fn pool_label(&self) -> String {
        format!("InferencePool {}/{}", self.namespace, self.cfg.pool_name.as_deref().unwrap_or(""))
    }

    /// Recomputes the fleet and publishes it if anything changed.
    fn publish(&self) {
        let mut st = self.state.lock();
        let pool_mode = self.cfg.pool_name.is_some();
        let mut problem = None;
        let mut synced = st.pods_synced;
        let endpoints = match (&st.pool, &st.spec) {
            (None, _) if pool_mode => {
                synced = false;
                if st.pool_listed {
                    synced = true;
                    problem = Some(format!("{} not found", self.pool_label()));
                }
                Vec::new()
            }
            (Some(Err(e)), _) => {
                // An invalid pool keeps the last good fleet.
                problem = Some(format!("{} is invalid: {e} (serving its last valid pods)", self.pool_label()));
                st.last.clone()
            }
            (_, Some(spec)) if st.pods_synced && st.pods_selector.as_deref() != Some(spec.selector.as_str()) => {
                // The pool's selector changed: the old pods serve until the new ones are listed.
                st.last.clone()
            }
            (_, Some(spec)) => {
                let spec = spec.clone();
                let mut eps = Vec::new();
                let mut bad = Vec::new();
                for pod in st.pods.values() {
                    let (e, errs) = endpoints_of_pod(pod, &spec, self.cfg.kv_events_port, self.cfg.kv_replay_port);
                    eps.extend(e);
                    bad.extend(errs);
                }
                for b in bad {
                    if st.reported.insert((b.pod.clone(), b.message.clone())) {
                        self.metrics.bad_annotations.inc();
                        warn!(pod = %b.pod, "{}", b.message);
                    }
                }
                eps.sort_by(|a, b| a.name.cmp(&b.name));
                eps.dedup_by(|a, b| a.name == b.name);
                if eps.is_empty() && st.pods_synced {
                    problem = Some(format!("the selector `{}` matches no ready pod with an IP", spec.selector));
                }
                eps
            }
            (_, None) => Vec::new(),
        };
        st.last = endpoints.clone();
        drop(st);
        self.metrics.endpoints.set(endpoints.len() as i64);
        self.metrics.synced.set(synced as i64);
        let fleet = Fleet { endpoints, synced, problem };
        self.tx.send_if_modified(|f| {
            if *f == fleet {
                return false;
            }
            if f.problem != fleet.problem {
                if let Some(p) = &fleet.problem {
                    warn!("discovery: {p}");
                }
            }
            info!(
                endpoints = fleet.endpoints.len(),
                synced = fleet.synced,
                names = ?fleet.endpoints.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
                "fleet changed"
            );
            self.metrics.changes.inc();
            *f = fleet;
            true
        });
    }

    fn error(&self, resource: &str, e: &watcher::Error) {
        self.metrics.errors.with_label_values(&[resource]).inc();
        let hint = match e {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                if s.code == 403 =>
            {
                " (RBAC: the service account needs get/list/watch on it; see deploy/kubernetes/base/rbac.yaml)"
            }
            watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404 => " (is the CRD installed?)",
            _ => "",
        };
        warn!(resource, namespace = %self.namespace, "Kubernetes watch failed, retrying with backoff; the last known fleet keeps serving: {e}{hint}");
    }
}

/// Builds the client (kubeconfig file, else in-cluster, else `$KUBECONFIG`), then starts
/// the watchers. An error here is a configuration error (no credentials); an unreachable
/// API server is not: the watchers retry, and the fleet stays unsynced until they list.
/// InferenceObjective priorities are written into `objectives` (shared with the gateway).
pub async fn start_kubernetes(
    cfg: &KubeSection,
    registry: &Registry,
    objectives: Objectives,
) -> Result<Discovery, String> {
    cfg.validate()?;
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes credentials (in-cluster service account or kubeconfig): {e}"))?,
    };
    let namespace = cfg.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))?;
    let metrics = DiscoveryMetrics::new(registry).map_err(|e| format!("discovery metrics: {e}"))?;
    let (tx, rx) = watch::channel(Fleet::default());
    let ctx = Arc::new(Ctx { cfg: cfg.clone(), namespace: namespace.clone(), state: Default::default(), tx, metrics });
    let mut tasks = Vec::new();
    let (spec_tx, spec_rx) = watch::channel::<Option<PoolSpec>>(None);
    match &cfg.pool_name {
        Some(name) => {
            info!(pool = %name, group = %cfg.pool_group, %namespace, "discovery: following an InferencePool");
            let api =
                Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &pool_resource(&cfg.pool_group));
            tasks.push(tokio::spawn(watch_pool(ctx.clone(), api, name.clone(), spec_tx)));
        }
        None => {
            let selector = cfg.endpoint_selector.clone().unwrap_or_default();
            let ports = if cfg.target_ports.is_empty() { vec![8000] } else { cfg.target_ports.clone() };
            info!(%selector, ?ports, %namespace, "discovery: following pods by label selector");
            let spec = PoolSpec { match_labels: BTreeMap::new(), selector, ports };
            ctx.state.lock().spec = Some(spec.clone());
            let _ = spec_tx.send(Some(spec));
            // (The sender must live as long as the pod task watches for changes.)
            tasks.push(tokio::spawn(async move {
                let _keep = spec_tx;
                std::future::pending::<()>().await
            }));
        }
    }
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    tasks.push(tokio::spawn(watch_pods(ctx.clone(), pods, spec_rx)));
    if cfg.objectives {
        let api = Api::<DynamicObject>::namespaced_with(client, &namespace, &objective_resource());
        tasks.push(tokio::spawn(watch_objectives(ctx.clone(), api, objectives.clone())));
    }
    Ok(Discovery { fleet: rx, objectives, tasks })
}

fn pool_resource(group: &str) -> ApiResource {
    let version = if group == POOL_GROUP_V1 { "v1" } else { "v1alpha2" };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, "InferencePool"), "inferencepools")
}

fn objective_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(POOL_GROUP_ALPHA, "v1alpha2", "InferenceObjective"),
        "inferenceobjectives",
    )
}

fn watch_stream<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config).backoff(Retry::default())
}

/// Watch retries: 250 ms doubling to 5 s (±25 % jitter), reset by the first success.
/// kube-runtime's default (client-go's: up to 30 s, reset only after 120 s without an
/// error) left the fleet stale for up to half a minute after an API-server outage; a
/// router's view of which pods exist should be back within seconds.
struct Retry {
    next: std::time::Duration,
}

impl Retry {
    const MIN: std::time::Duration = std::time::Duration::from_millis(250);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);
}

impl Default for Retry {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

impl Iterator for Retry {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let d = self.next;
        self.next = (d * 2).min(Self::MAX);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.subsec_nanos());
        Some(d.mul_f64(0.75 + f64::from(nanos % 500) / 1000.0))
    }
}

impl kube::runtime::utils::Backoff for Retry {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

async fn watch_pool(ctx: Arc<Ctx>, api: Api<DynamicObject>, name: String, spec_tx: watch::Sender<Option<PoolSpec>>) {
    let mut stream =
        std::pin::pin!(watch_stream(api, watcher::Config::default().fields(&format!("metadata.name={name}"))));
    let mut listing: Option<Option<DynamicObject>> = None;
    while let Some(ev) = stream.next().await {
        let obj = match ev {
            Err(e) => {
                ctx.error("inferencepools", &e);
                continue;
            }
            Ok(Event::Init) => {
                listing = Some(None);
                continue;
            }
            Ok(Event::InitApply(o)) => {
                if let Some(l) = listing.as_mut() {
                    *l = Some(o);
                }
                continue;
            }
            Ok(Event::InitDone) => listing.take().flatten(),
            Ok(Event::Apply(o)) => Some(o),
            Ok(Event::Delete(_)) => None,
        };
        let parsed = obj.map(|o| parse_pool(&o.data));
        {
            let mut st = ctx.state.lock();
            st.pool_listed = true;
            match &parsed {
                Some(Ok(spec)) => st.spec = Some(spec.clone()),
                Some(Err(e)) => {
                    ctx.metrics.errors.with_label_values(&["inferencepools"]).inc();
                    warn!(pool = %name, "InferencePool is invalid, keeping the last valid one: {e}");
                }
                None => {
                    st.spec = None;
                    st.pods.clear();
                    st.pods_synced = false;
                }
            }
            st.pool = parsed.clone();
        }
        match parsed {
            Some(Ok(spec)) => {
                spec_tx.send_if_modified(|s| {
                    let changed = s.as_ref() != Some(&spec);
                    *s = Some(spec);
                    changed
                });
            }
            None => {
                let _ = spec_tx.send(None);
            }
            Some(Err(_)) => {}
        }
        ctx.publish();
    }
}

/// Watches the pods the current spec selects; a new selector starts a new watch, and the
/// old pods stay until the new watch has listed.
async fn watch_pods(ctx: Arc<Ctx>, api: Api<Pod>, mut spec_rx: watch::Receiver<Option<PoolSpec>>) {
    loop {
        let spec = spec_rx.borrow_and_update().clone();
        let Some(spec) = spec else {
            if spec_rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        let selector = spec.selector.clone();
        let mut stream = std::pin::pin!(watch_stream(api.clone(), watcher::Config::default().labels(&selector)));
        let mut listing: Option<BTreeMap<String, Pod>> = None;
        loop {
            tokio::select! {
                changed = spec_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let next = spec_rx.borrow().clone();
                    match next {
                        Some(s) if s.selector == selector => {
                            // Same pods, other ports: recompute only.
                            spec_rx.borrow_and_update();
                            ctx.publish();
                        }
                        _ => break, // re-watch with the new selector (or wait for a pool)
                    }
                }
                ev = stream.next() => {
                    let Some(ev) = ev else { break };
                    match ev {
                        Err(e) => {
                            ctx.metrics.watch_up.set(0);
                            ctx.error("pods", &e);
                            continue;
                        }
                        Ok(Event::Init) => listing = Some(BTreeMap::new()),
                        Ok(Event::InitApply(p)) => {
                            if let (Some(l), Some(n)) = (listing.as_mut(), p.metadata.name.clone()) {
                                l.insert(n, p);
                            }
                            continue;
                        }
                        Ok(Event::InitDone) => {
                            ctx.metrics.watch_up.set(1);
                            let mut st = ctx.state.lock();
                            st.pods = listing.take().unwrap_or_default();
                            st.pods_synced = true;
                            st.pods_selector = Some(selector.clone());
                        }
                        Ok(Event::Apply(p)) => {
                            ctx.metrics.watch_up.set(1);
                            if let Some(n) = p.metadata.name.clone() {
                                ctx.state.lock().pods.insert(n, p);
                            }
                        }
                        Ok(Event::Delete(p)) => {
                            if let Some(n) = &p.metadata.name {
                                ctx.state.lock().pods.remove(n);
                            }
                        }
                    }
                    ctx.publish();
                }
            }
        }
    }
}

/// InferenceObjective name → `spec.priority` (default 0), for the objectives of this pool
/// (`spec.poolRef.name`; all of the namespace in selector mode).
async fn watch_objectives(ctx: Arc<Ctx>, api: Api<DynamicObject>, out: Objectives) {
    let mut stream = std::pin::pin!(watch_stream(api, watcher::Config::default()));
    let mut all: HashMap<String, i64> = HashMap::new();
    let mut listing: Option<HashMap<String, i64>> = None;
    let pool = ctx.cfg.pool_name.clone();
    let entry = |o: &DynamicObject| -> Option<(String, i64)> {
        let name = o.metadata.name.clone()?;
        let spec = o.data.get("spec");
        let pool_ref = spec.and_then(|s| s.pointer("/poolRef/name")).and_then(Value::as_str);
        if let (Some(p), Some(r)) = (&pool, pool_ref) {
            if p != r {
                return None;
            }
        }
        Some((name, spec.and_then(|s| s.get("priority")).and_then(Value::as_i64).unwrap_or(0)))
    };
    while let Some(ev) = stream.next().await {
        match ev {
            Err(e) => {
                ctx.error("inferenceobjectives", &e);
                continue;
            }
            Ok(Event::Init) => listing = Some(HashMap::new()),
            Ok(Event::InitApply(o)) => {
                if let (Some(l), Some((n, p))) = (listing.as_mut(), entry(&o)) {
                    l.insert(n, p);
                }
                continue;
            }
            Ok(Event::InitDone) => all = listing.take().unwrap_or_default(),
            Ok(Event::Apply(o)) => match entry(&o) {
                Some((n, p)) => _ = all.insert(n, p),
                None => _ = o.metadata.name.as_ref().map(|n| all.remove(n)),
            },
            Ok(Event::Delete(o)) => _ = o.metadata.name.as_ref().map(|n| all.remove(n)),
        }
        ctx.metrics.objectives.set(all.len() as i64);
        *out.write() = all.clone();
    }
}
