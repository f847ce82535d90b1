//! The serving process's lifecycle: readiness holds and the shutdown drain.
//!
//! One [`Lifecycle`] per process, shared as `Arc`. `kvroute serve` creates it before
//! anything else and hands it to whatever answers readiness (the gateway's `GET /ready`,
//! the gRPC health service) and to every listener (they stop accepting when it closes).
//!
//! **Readiness** is false while
//! * a **hold** is outstanding: [`Lifecycle::hold`]`("discovery")` returns a [`Hold`]; the
//!   process is not ready until every hold is released ([`Hold::release`], or dropping it).
//!   The names of outstanding holds appear in `/ready`'s 503 body. A component that is not
//!   ready to route yet (discovery not synced, the index not rebuilt by replay) takes a hold
//!   before the listeners come up and releases it when it is; it may take one again later
//!   (e.g. when it loses its source). Holds of the same name count: the name stays listed
//!   until the last is released;
//! * the process is **draining** ([`Lifecycle::drain`], on SIGTERM/SIGINT);
//! * the extra **check** fails ([`Lifecycle::set_check`]: the gateway's rule, "some backend in
//!   rotation").
//!
//! **Shutdown**: [`Lifecycle::drain`] turns readiness false at once; [`Lifecycle::close`]
//! (after the optional shutdown delay) makes every listener's [`Lifecycle::closing`]
//! future resolve: it closes its listening socket and lets the requests in flight finish.
//!
//! Metrics ([`Lifecycle::register`]): `kvroute_ready` (1 while `/ready` would answer 200,
//! evaluated at each scrape) and `kvroute_draining` (1 once shutdown began).
//!
//! ```
//! use kvroute_api::lifecycle::Lifecycle;
//! let lc = Lifecycle::new();
//! let discovery = lc.hold("discovery");
//! assert_eq!(lc.holds(), vec!["discovery".to_string()]);
//! assert!(!lc.is_ready());
//! discovery.release();
//! assert!(lc.is_ready());
//! lc.drain();
//! assert!(!lc.is_ready());
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::RwLock;
use prometheus::core::{Collector, Desc};
use prometheus::{IntGauge, Registry};
use tokio::sync::watch;

/// An extra readiness rule: `Err(why)` while not ready.
pub type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone, Debug, Default)]
struct State {
    /// Outstanding holds by name (count of each).
    holds: BTreeMap<String, usize>,
    draining: bool,
    closing: bool,
}

/// Readiness holds and the drain of one process (see the module doc).
pub struct Lifecycle {
    state: watch::Sender<State>,
    check: RwLock<Option<Check>>,
}

/// Why the process is not ready (holds and draining; see [`Lifecycle::not_ready`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady {
    /// Names of the outstanding holds, sorted.
    pub holds: Vec<String>,
    /// Shutdown began.
    pub draining: bool,
}

impl NotReady {
    /// A one-line reason, e.g. `not ready: draining (shutting down)` or
    /// `not ready: waiting for discovery, replay`.
    pub fn message(&self) -> String {
        let mut parts = Vec::new();
        if self.draining {
            parts.push("draining (shutting down)".to_string());
        }
        if !self.holds.is_empty() {
            parts.push(format!("waiting for {}", self.holds.join(", ")));
        }
        format!("not ready: {}", parts.join("; "))
    }
}

impl IntoResponse for NotReady {
    /// 503, an OpenAI-style error body plus `holds` and `draining`, `Retry-After: 1`.
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"message": self.message(), "type": "ServiceUnavailableError", "code": 503},
            "holds": self.holds,
            "draining": self.draining,
        });
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }
}

/// An outstanding readiness hold: the process is not ready until it is released
/// ([`Hold::release`] or drop). `Send`: it may be released from any thread or task.
#[must_use = "dropping a Hold releases it at once"]
pub struct Hold {
    lc: Arc<Lifecycle>,
    name: String,
}

impl Hold {
    /// The hold's name (as listed in `/ready`'s body).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Releases the hold (the same as dropping it).
    pub fn release(self) {}
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.lc.state.send_modify(|s| {
            if let Some(n) = s.holds.get_mut(&self.name) {
                *n -= 1;
                if *n == 0 {
                    s.holds.remove(&self.name);
                }
            }
        });
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold").field("name", &self.name).finish()
    }
}

impl Lifecycle {
    /// A process that is ready (no hold, not draining, no check).
    pub fn new() -> Arc<Self> {
        Arc::new(Self { state: watch::channel(State::default()).0, check: RwLock::new(None) })
    }

    /// Takes a readiness hold named `name` (e.g. `"discovery"`, `"replay"`): not ready until
    /// it is released.
    pub fn hold(self: &Arc<Self>, name: impl Into<String>) -> Hold {
        let name = name.into();
        self.state.send_modify(|s| *s.holds.entry(name.clone()).or_default() += 1);
        Hold { lc: self.clone(), name }
    }

    /// Names of the outstanding holds, sorted.
    pub fn holds(&self) -> Vec<String> {
        self.state.borrow().holds.keys().cloned().collect()
    }

    /// Sets the extra readiness rule (replacing any earlier one): `/ready` and
    /// `kvroute_ready` also require it to pass.
    pub fn set_check(&self, check: Check) {
        *self.check.write() = Some(check);
    }

    /// Why the process is not ready as far as holds and draining go (the extra check is
    /// not consulted); `None`: neither.
    pub fn not_ready(&self) -> Option<NotReady> {
        let s = self.state.borrow();
        (s.draining || !s.holds.is_empty())
            .then(|| NotReady { holds: s.holds.keys().cloned().collect(), draining: s.draining })
    }

    /// The extra check's verdict (`Ok` when none is set).
    pub fn check(&self) -> Result<(), String> {
        self.check.read().as_ref().map_or(Ok(()), |c| c())
    }

    /// Ready: no hold, not draining, and the extra check passes.
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_none() && self.check().is_ok()
    }

    /// Begins the shutdown: readiness false from now on. Returns false if it had begun.
    pub fn drain(&self) -> bool {
        self.state.send_if_modified(|s| !std::mem::replace(&mut s.draining, true))
    }

    /// Shutdown began.
    pub fn is_draining(&self) -> bool {
        self.state.borrow().draining
    }

    /// Closes the listeners (and begins the drain if it had not): every [`Self::closing`]
    /// future resolves.
    pub fn close(&self) {
        self.state.send_modify(|s| {
            s.draining = true;
            s.closing = true;
        });
    }

    /// Resolves when the listeners are to close (at once if they are).
    pub fn closing(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.state.subscribe();
        async move {
            let _ = rx.wait_for(|s| s.closing).await;
        }
    }

    /// Resolves when the drain begins (at once if it has).
    pub fn draining(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.state.subscribe();
        async move {
            let _ = rx.wait_for(|s| s.draining).await;
        }
    }

    /// Notified on every change of holds or phase (e.g. to update a gRPC health status);
    /// read the state with [`Self::not_ready`].
    pub fn changes(&self) -> Changes {
        Changes(self.state.subscribe())
    }

    /// Registers `kvroute_ready` and `kvroute_draining` (computed at each scrape).
    pub fn register(self: &Arc<Self>, registry: &Registry) -> Result<(), prometheus::Error> {
        let ready = IntGauge::new(
            "kvroute_ready",
            "1 while GET /ready answers 200 (no readiness hold, not draining, a backend in rotation)",
        )?;
        let draining = IntGauge::new(
            "kvroute_draining",
            "1 once shutdown began (SIGTERM/SIGINT): readiness false, listeners closing",
        )?;
        registry.register(Box::new(Gauges { lc: Arc::downgrade(self), ready, draining }))
    }
}

/// See [`Lifecycle::changes`].
pub struct Changes(watch::Receiver<State>);

impl Changes {
    /// Waits for the next change of holds or phase.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            // The lifecycle is gone: nothing will change any more.
            std::future::pending::<()>().await;
        }
    }
}

/// The lifecycle gauges, set when collected.
struct Gauges {
    lc: std::sync::Weak<Lifecycle>,
    ready: IntGauge,
    draining: IntGauge,
}

impl Collector for Gauges {
    fn desc(&self) -> Vec<&Desc> {
        self.ready.desc().into_iter().chain(self.draining.desc()).collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        if let Some(lc) = self.lc.upgrade() {
            self.ready.set(lc.is_ready() as i64);
            self.draining.set(lc.is_draining() as i64);
        }
        self.ready.collect().into_iter().chain(self.draining.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(reg: &Registry, name: &str) -> i64 {
        let fams = reg.gather();
        let f = fams.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("no {name}"));
        f.get_metric()[0].get_gauge().get_value() as i64
    }

    #[test]
    fn holds_count_by_name_and_list_sorted() {
        let lc = Lifecycle::new();
        assert!(lc.is_ready());
        assert_eq!(lc.not_ready(), None);
        let replay = lc.hold("replay");
        let d1 = lc.hold("discovery");
        let d2 = lc.hold(String::from("discovery"));
        assert_eq!(d1.name(), "discovery");
        assert_eq!(lc.holds(), ["discovery", "replay"]);
        let nr = lc.not_ready().unwrap();
        assert_eq!(nr, NotReady { holds: vec!["discovery".into(), "replay".into()], draining: false });
        assert_eq!(nr.message(), "not ready: waiting for discovery, replay");
        d1.release();
        assert_eq!(lc.holds(), ["discovery", "replay"], "a second hold of the name is still out");
        drop(d2);
        assert_eq!(lc.holds(), ["replay"]);
        assert!(!lc.is_ready());
        // Released from another thread.
        std::thread::spawn(move || drop(replay)).join().unwrap();
        assert!(lc.is_ready());
        // Held again later.
        let again = lc.hold("discovery");
        assert!(!lc.is_ready());
        drop(again);
        assert!(lc.is_ready());
    }

    #[test]
    fn draining_and_the_check_make_it_unready() {
        let lc = Lifecycle::new();
        let ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok2 = ok.clone();
        lc.set_check(Box::new(move || {
            if ok2.load(std::sync::atomic::Ordering::Relaxed) {
                Ok(())
            } else {
                Err("no backend".into())
            }
        }));
        assert_eq!(lc.check(), Err("no backend".into()));
        assert!(!lc.is_ready());
        assert_eq!(lc.not_ready(), None, "the check is not a hold");
        ok.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(lc.is_ready());
        let h = lc.hold("discovery");
        assert!(lc.drain());
        assert!(!lc.drain(), "a second drain reports it had begun");
        let nr = lc.not_ready().unwrap();
        assert!(nr.draining);
        assert_eq!(nr.message(), "not ready: draining (shutting down); waiting for discovery");
        drop(h);
        assert!(!lc.is_ready(), "draining stays unready with no hold");
        assert!(lc.is_draining());
    }

    #[test]
    fn not_ready_answers_503_with_the_holds() {
        let lc = Lifecycle::new();
        let _h = lc.hold("discovery");
        let r = lc.not_ready().unwrap().into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let body = rt.block_on(axum::body::to_bytes(r.into_body(), 1 << 16)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["holds"], serde_json::json!(["discovery"]));
        assert_eq!(v["draining"], false);
        assert_eq!(v["error"]["message"], "not ready: waiting for discovery");
    }

    #[test]
    fn closing_and_draining_futures_resolve_in_order() {
        let lc = Lifecycle::new();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let short = std::time::Duration::from_millis(50);
            let (drain, close) = (lc.draining(), lc.closing());
            let (mut drain, mut close) = (Box::pin(drain), Box::pin(close));
            assert!(tokio::time::timeout(short, &mut drain).await.is_err(), "not draining yet");
            lc.drain();
            assert!(tokio::time::timeout(short, &mut drain).await.is_ok());
            assert!(tokio::time::timeout(short, &mut close).await.is_err(), "draining is not closing");
            lc.close();
            assert!(tokio::time::timeout(short, &mut close).await.is_ok());
            // Futures made afterwards resolve at once.
            assert!(tokio::time::timeout(short, lc.closing()).await.is_ok());
        });
    }

    #[test]
    fn gauges_follow_the_state_at_each_scrape() {
        let lc = Lifecycle::new();
        let reg = Registry::new();
        lc.register(&reg).unwrap();
        assert_eq!((gauge(&reg, "kvroute_ready"), gauge(&reg, "kvroute_draining")), (1, 0));
        let h = lc.hold("discovery");
        assert_eq!(gauge(&reg, "kvroute_ready"), 0);
        drop(h);
        lc.set_check(Box::new(|| Err("none in rotation".into())));
        assert_eq!(gauge(&reg, "kvroute_ready"), 0);
        lc.set_check(Box::new(|| Ok(())));
        assert_eq!(gauge(&reg, "kvroute_ready"), 1);
        lc.drain();
        assert_eq!((gauge(&reg, "kvroute_ready"), gauge(&reg, "kvroute_draining")), (0, 1));
    }
}
