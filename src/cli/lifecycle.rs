//! `kvroute serve`'s shutdown: SIGTERM or SIGINT → drain → exit 0.
//!
//! On the first signal readiness turns false at once (`/ready` 503, `kvroute_draining` 1,
//! gRPC health NOT_SERVING); `shutdown_delay` later every listener (serving, admin,
//! ext_proc, gRPC health) closes its listening socket — new connections are refused — and
//! closes its idle connections, while requests and streams in flight run to completion.
//! The process exits 0 when the last connection ends, or when `shutdown_grace` (counted
//! from the signal, the delay included) expires: the connections still open are cut and
//! counted in a log line. A second signal exits at once.

use std::sync::Arc;
use std::time::Duration;

use kvroute_api::lifecycle::Lifecycle;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

/// The drain's two durations.
#[derive(Clone, Copy, Debug)]
pub struct Shutdown {
    pub grace: Duration,
    pub delay: Duration,
}

impl Shutdown {
    /// From `shutdown_grace_s` and `shutdown_delay_s`.
    pub fn from_secs(grace: f64, delay: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(grace.is_finite() && grace >= 0.0, "shutdown grace must be ≥ 0 seconds, got {grace}");
        anyhow::ensure!(delay.is_finite() && delay >= 0.0, "shutdown delay must be ≥ 0 seconds, got {delay}");
        if delay >= grace && grace > 0.0 {
            tracing::warn!(
                grace,
                delay,
                "the shutdown delay is not shorter than the grace: requests in flight are cut before the listeners close"
            );
        }
        Ok(Self { grace: Duration::from_secs_f64(grace), delay: Duration::from_secs_f64(delay) })
    }
}

/// Installs the SIGTERM and SIGINT handlers (before the listeners bind, so an early
/// signal drains instead of killing) and runs the drain's first steps on the first signal:
/// `lc.drain()`, then after `delay` `lc.close()`. `open` counts the open connections.
pub fn handle_signals(
    lc: Arc<Lifecycle>,
    s: Shutdown,
    open: impl Fn() -> i64 + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        lc.drain();
        tracing::info!(
            signal = name,
            delay_s = s.delay.as_secs_f64(),
            grace_s = s.grace.as_secs_f64(),
            "shutting down: readiness false; listeners close after the delay, requests in flight finish within the grace"
        );
        let close = async {
            tokio::time::sleep(s.delay).await;
            lc.close();
            tracing::info!(connections = open(), "listeners closed: new connections are refused");
        };
        let again = async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        };
        tokio::pin!(again);
        tokio::select! {
            _ = close => {}
            second = &mut again => exit_now(second, open()),
        }
        let second = again.await;
        exit_now(second, open())
    });
    Ok(())
}

fn exit_now(signal: &str, open: i64) -> ! {
    tracing::warn!(signal, cut = open, "second signal: exiting at once, cutting the connections still open");
    std::process::exit(0);
}

/// Waits for the listener tasks: until the drain begins, then until every one has ended
/// (their connections finished) or the grace (from the drain's start) has expired. Logs
/// which; the caller exits.
pub async fn until_drained(lc: Arc<Lifecycle>, grace: Duration, tasks: Vec<JoinHandle<()>>, open: impl Fn() -> i64) {
    let all = futures_util::future::join_all(tasks);
    tokio::pin!(all);
    tokio::select! {
        _ = &mut all => {
            tracing::warn!("every listener stopped without a shutdown signal");
            return;
        }
        _ = lc.draining() => {}
    }
    tokio::select! {
        _ = &mut all => tracing::info!("drained: every connection finished; exiting"),
        _ = tokio::time::sleep(grace) => tracing::warn!(
            cut = open(),
            grace_s = grace.as_secs_f64(),
            "shutdown grace expired: cutting the connections still open; exiting"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_durations_are_checked() {
        let s = Shutdown::from_secs(25.0, 5.0).unwrap();
        assert_eq!((s.grace, s.delay), (Duration::from_secs(25), Duration::from_secs(5)));
        assert_eq!(Shutdown::from_secs(0.5, 0.0).unwrap().grace, Duration::from_millis(500));
        assert!(Shutdown::from_secs(-1.0, 0.0).is_err());
        assert!(Shutdown::from_secs(25.0, f64::NAN).is_err());
        assert!(Shutdown::from_secs(f64::INFINITY, 0.0).is_err());
    }
}
