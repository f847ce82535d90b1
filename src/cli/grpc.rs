//! `kvroute serve`'s gRPC listeners: Envoy ext_proc (`--ext-proc-listen`) and gRPC health
//! (`--grpc-health-listen`), each under the `ext_proc:` limits (`kvroute_extproc::listen`),
//! over TLS with `tls.grpc`, closing with the process's [`Lifecycle`].

use std::sync::Arc;

use anyhow::Context;
use kvroute_api::lifecycle::Lifecycle;
use kvroute_api::listen::ListenMetrics;
use kvroute_extproc::listen::{server, Incoming};
use tokio::task::JoinHandle;

use crate::config::ServeConfig;

/// The gRPC health service names: the server as a whole, and the ext_proc service.
const HEALTH_SERVICES: [&str; 2] = ["", "envoy.service.ext_proc.v3.ExternalProcessor"];

/// Binds and serves the configured gRPC listeners; each task ends once the lifecycle has
/// closed and its connections have finished (ext_proc streams in flight run to their end).
pub async fn spawn(
    cfg: &ServeConfig,
    ext_proc: Option<kvroute_extproc::ExtProc>,
    lc: &Arc<Lifecycle>,
    metrics: &ListenMetrics,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let limits = cfg.ext_proc.limits();
    let tls = tls(&cfg.tls)?;
    let mut tasks = Vec::new();
    if let (Some(addr), Some(svc)) = (cfg.ext_proc.listen, ext_proc) {
        let listener =
            kvroute_api::listen::bind(addr).with_context(|| format!("cannot listen on {addr} (ext_proc)"))?;
        tracing::info!(%addr, "ext_proc serving");
        let incoming = Incoming::new(listener, "ext_proc", &limits, metrics.clone());
        // Large HTTP/2 windows: a 200 KB body crosses without waiting for window updates
        // (h2's default is 64 KB).
        let router = server(&limits, tls.clone())
            .context("gRPC TLS (--tls-cert, --tls-key)")?
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .add_service(svc.into_server());
        let closing = lc.closing();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, closing).await {
                tracing::error!("ext_proc server failed: {e}");
            }
        }));
    }
    if let Some(addr) = cfg.ext_proc.health_listen {
        let (reporter, health) = tonic_health::server::health_reporter();
        set_health(&reporter, lc).await;
        let listener =
            kvroute_api::listen::bind(addr).with_context(|| format!("cannot listen on {addr} (gRPC health)"))?;
        let incoming = Incoming::new(listener, "grpc_health", &limits, metrics.clone());
        let router = server(&limits, tls).context("gRPC TLS (--tls-cert, --tls-key)")?.add_service(health);
        // NOT_SERVING while a readiness hold is out or the router drains.
        let (lc2, mut changes) = (lc.clone(), lc.changes());
        tokio::spawn(async move {
            loop {
                changes.changed().await;
                set_health(&reporter, &lc2).await;
            }
        });
        let closing = lc.closing();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, closing).await {
                tracing::error!("gRPC health server failed: {e}");
            }
        }));
    }
    Ok(tasks)
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, lc: &Lifecycle) {
    let status = match lc.not_ready() {
        None => tonic_health::ServingStatus::Serving,
        Some(_) => tonic_health::ServingStatus::NotServing,
    };
    for s in HEALTH_SERVICES {
        reporter.set_service_status(s, status).await;
    }
}

/// `tls.grpc`: the gRPC listeners' TLS identity (`tls.cert`, `tls.key`).
fn tls(t: &kvroute_api::listen::TlsSection) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let Some((cert, key)) = t.files()?.filter(|_| t.grpc) else { return Ok(None) };
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let id = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    Ok(Some(tonic::transport::ServerTlsConfig::new().identity(id)))
}
