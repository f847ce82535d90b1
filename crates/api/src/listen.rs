//! Serving an axum app with client-side limits (and optional TLS).
//!
//! `axum::serve` holds every accepted connection for as long as the client likes. Here each
//! connection runs under hyper's HTTP/1.1 server — or its HTTP/2 server when the connection
//! opens with HTTP/2's preface (h2c with prior knowledge, as Envoy speaks to an upstream
//! configured for HTTP/2) — with a watchdog:
//!
//! * **header timeout** — a request head must be complete within `header_timeout` of the
//!   connection's accept (or, on a kept-alive connection, of the next request's first byte):
//!   idle and byte-by-byte (slowloris) clients are closed; on HTTP/2, the first request must
//!   start within `header_timeout` of the accept;
//! * **idle timeout** — a kept-alive connection with no request in flight and no byte
//!   received for `idle_timeout` is closed; on HTTP/2, with no stream in flight and none
//!   started or ended for `idle_timeout` (PINGs and window updates do not count), it gets a
//!   GOAWAY and closes;
//! * **max connections** — at most `max_connections` requests are served at once: each
//!   connection holds one slot, and each HTTP/2 stream beyond a connection's first takes
//!   another (none left: that stream gets 503 with `Retry-After`); beyond that
//!   `reserve_connections` more connections are accepted that answer only the reserve paths
//!   (`/health`) and 503 with `Retry-After` otherwise (then close); past both, accepted
//!   sockets are closed at once (so the kernel's backlog does not fill with them);
//! * **max concurrent streams** — HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS` per connection;
//! * **max header bytes** — a larger request head is answered 431 (HTTP/2: the header list
//!   size the connection announces).
//!
//! A request in flight (e.g. a long SSE stream) is never timed out here: the gateway's
//! upstream timeouts bound those. A TLS handshake must also finish within `header_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
pub use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Client-side limits of an HTTP listener (`http:` in the configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientLimits {
    /// A request head must be complete this long after the connection opened (or after
    /// the first byte of a kept-alive connection's next request), ms.
    pub header_timeout_ms: u64,
    /// A connection with no request in flight and nothing received this long is closed, ms.
    pub idle_timeout_ms: u64,
    /// Connections served on the serving port.
    pub max_connections: usize,
    /// Further connections that get only `/health` (503 for anything else).
    pub reserve_connections: usize,
    /// Largest request head (request line + headers), bytes (at least 1024).
    pub max_header_bytes: usize,
    /// HTTP/2 streams (requests) at once on one connection.
    pub max_concurrent_streams: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 8192,
            reserve_connections: 64,
            max_header_bytes: 64 << 10,
            max_concurrent_streams: 128,
        }
    }
}

/// `tls:` in the configuration: rustls on the HTTP listeners (and the gRPC ones).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain: serve HTTPS on the serving and admin listeners (with `key`).
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<std::path::PathBuf>,
    /// Serve the ext_proc and gRPC health listeners over TLS too.
    pub grpc: bool,
}

impl TlsSection {
    /// The PEM files (cert, key), if TLS is on.
    pub fn files(&self) -> anyhow::Result<Option<(&std::path::Path, &std::path::Path)>> {
        match (&self.cert, &self.key) {
            (None, None) => {
                anyhow::ensure!(!self.grpc, "tls.grpc (--tls-grpc) needs a certificate (--tls-cert, --tls-key)");
                Ok(None)
            }
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            _ => anyhow::bail!("TLS needs both a certificate (--tls-cert) and its key (--tls-key)"),
        }
    }

    /// The HTTP listeners' TLS acceptor, if TLS is on.
    pub fn acceptor(&self) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
        self.files()?.map(|(c, k)| tls_acceptor(c, k)).transpose()
    }
}

/// A rustls server config (HTTP/1.1 over TLS 1.2/1.3) from PEM files.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read a PEM certificate chain from {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a PEM private key from {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not fit")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Accept-queue length of [`bind`], capped by the kernel's somaxconn (std's and mio's 128 overflows under a burst of
/// connections: the kernel then drops SYNs, and clients retry after 1 s).
pub const BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with a [`BACKLOG`]-long accept queue (`SO_REUSEADDR` set).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(BACKLOG)
}

/// Raises the soft open-files limit to the hard one (as Go's runtime does) and returns it.
pub fn raise_nofile_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("cannot raise the open-files limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024)
        }
    }
}

/// Connection counters of every listener, labelled `listener`.
#[derive(Clone)]
pub struct ListenMetrics {
    open: IntGaugeVec,
    closed: IntCounterVec,
}

impl ListenMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let open = IntGaugeVec::new(
            Opts::new("kvroute_http_connections", "Open client connections (reserve: over max_connections)"),
            &["listener", "pool"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "kvroute_http_connections_closed_total",
                "Client connections closed by a limit: header_timeout, idle_timeout, tls_handshake, over_capacity \
                 (HTTP/2 streams: over_capacity_stream; gRPC: handshake_timeout)",
            ),
            &["listener", "reason"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        Ok(Self { open, closed })
    }

    /// Open connections of every listener sharing these metrics (the drain counts them).
    pub fn open_connections(&self) -> i64 {
        use prometheus::core::Collector;
        self.open.collect().iter().flat_map(|f| f.get_metric()).map(|m| m.get_gauge().get_value() as i64).sum()
    }

    /// The gauge of open connections of `listener` in `pool`.
    pub fn open_gauge(&self, listener: &str, pool: &str) -> prometheus::IntGauge {
        self.open.with_label_values(&[listener, pool])
    }

    /// Counts a connection of `listener` closed for `reason`.
    pub fn closed(&self, listener: &str, reason: &str) {
        self.closed.with_label_values(&[listener, reason]).inc();
    }
}

/// One listener: its name (metric label), limits, and the paths its reserve answers.
pub struct Listener {
    pub name: &'static str,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub reserve_connections: usize,
    pub max_header_bytes: usize,
    pub max_concurrent_streams: u32,
    pub reserve_paths: &'static [&'static str],
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub metrics: ListenMetrics,
}

impl Listener {
    pub fn new(
        name: &'static str,
        l: &ClientLimits,
        tls: Option<tokio_rustls::TlsAcceptor>,
        metrics: ListenMetrics,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(l.max_connections > 0, "max_connections must be at least 1");
        Ok(Self {
            name,
            header_timeout: Duration::from_millis(l.header_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(l.idle_timeout_ms.max(1)),
            max_connections: l.max_connections,
            reserve_connections: l.reserve_connections,
            max_header_bytes: l.max_header_bytes.max(1024),
            max_concurrent_streams: l.max_concurrent_streams.max(1),
            reserve_paths: &["/health"],
            tls,
            metrics,
        })
    }

    /// Accepts and serves connections until `shutdown` resolves, then lets the requests in
    /// flight finish (idle connections close at once).
    pub async fn serve(self, listener: TcpListener, app: Router, shutdown: impl std::future::Future<Output = ()>) {
        let this = Arc::new(self);
        let main = Arc::new(Semaphore::new(this.max_connections));
        let reserve = Arc::new(Semaphore::new(this.reserve_connections));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut accept_errors = 0u64;
        loop {
            let (tcp, _peer) = tokio::select! {
                _ = &mut shutdown => {
                    drop(listener);
                    let _ = stop_tx.send(true);
                    let _ = main.acquire_many(this.max_connections as u32).await;
                    let _ = reserve.acquire_many(this.reserve_connections as u32).await;
                    return;
                }
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE/ENFILE and the like: back off instead of spinning.
                        accept_errors += 1;
                        if accept_errors.is_power_of_two() {
                            tracing::warn!(listener = this.name, errors = accept_errors, "accept failed: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (permit, pool) = match main.clone().try_acquire_owned() {
                Ok(p) => (p, "main"),
                Err(_) => match reserve.clone().try_acquire_owned() {
                    Ok(p) => (p, "reserve"),
                    Err(_) => {
                        this.metrics.closed.with_label_values(&[this.name, "over_capacity"]).inc();
                        drop(tcp);
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (this, app, stop) = (this.clone(), app.clone(), stop_rx.clone());
            let slots = (pool == "main").then(|| main.clone());
            tokio::spawn(async move {
                let gauge = this.metrics.open.with_label_values(&[this.name, pool]);
                gauge.inc();
                match this.tls.clone() {
                    None => this.serve_conn(tcp, app, slots, stop).await,
                    Some(acceptor) => match tokio::time::timeout(this.header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => this.serve_conn(tls, app, slots, stop).await,
                        Ok(Err(e)) => {
                            tracing::debug!(listener = this.name, "TLS handshake failed: {e}");
                            this.metrics.closed.with_label_values(&[this.name, "tls_handshake"]).inc();
                        }
                        Err(_) => {
                            this.metrics.closed.with_label_values(&[this.name, "tls_handshake"]).inc();
                        }
                    },
                }
                gauge.dec();
                drop(permit);
            });
        }
    }

    /// Serves one connection; `slots` is the main pool (none: a reserve connection, which
    /// answers only the reserve paths).
    async fn serve_conn<IO>(
        &self,
        io: IO,
        app: Router,
        slots: Option<Arc<Semaphore>>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let reserve_only = slots.is_none();
        let act = Arc::new(Activity::new());
        let mut io = Tracked { inner: io, act: act.clone() };
        // HTTP/2 (prior knowledge) or HTTP/1.1: the first bytes tell.
        let sniffed = tokio::select! {
            r = tokio::time::timeout(self.header_timeout, sniff(&mut io)) => r,
            _ = async { drop(stop.wait_for(|s| *s).await) } => return,
        };
        let (h2, prefix) = match sniffed {
            Ok(Ok(x)) => x,
            Ok(Err(_)) => return,
            Err(_) => {
                self.metrics.closed.with_label_values(&[self.name, "header_timeout"]).inc();
                return;
            }
        };
        act.h2.store(h2, Relaxed);
        let io = TokioIo::new(Rewind { prefix, pos: 0, inner: io });
        let reserve_paths = self.reserve_paths;
        let (act2, name, metrics) = (act.clone(), self.name, self.metrics.clone());
        let svc = tower::service_fn(move |req: Request<Incoming>| {
            let (app, act, slots, metrics) = (app.clone(), act2.clone(), slots.clone(), metrics.clone());
            async move {
                let (guard, others) = act.request_started();
                let reserved = reserve_paths.contains(&req.uri().path());
                // An HTTP/2 stream beyond the connection's first takes a slot of its own.
                let slot = match slots.filter(|_| others > 0 && !reserved) {
                    Some(s) => match s.try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => {
                            metrics.closed.with_label_values(&[name, "over_capacity_stream"]).inc();
                            return Ok(over_capacity());
                        }
                    },
                    None => None,
                };
                let mut resp = if reserve_only && !reserved {
                    over_capacity()
                } else {
                    app.oneshot(req.map(Body::new)).await.unwrap_or_else(|e| match e {})
                };
                if reserve_only && !h2 {
                    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                // The request counts as in flight until its response body is done.
                Ok::<_, std::convert::Infallible>(resp.map(move |b| {
                    Body::new(b.map_frame(move |f| {
                        let _ = (&guard, &slot);
                        f
                    }))
                }))
            }
        });
        let svc = hyper_util::service::TowerToHyperService::new(svc);
        if h2 {
            let mut builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(self.max_concurrent_streams)
                .max_header_list_size(self.max_header_bytes.min(u32::MAX as usize) as u32);
            self.watch(builder.serve_connection(io, svc), &act, stop, true).await
        } else {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.max_header_size(self.max_header_bytes).keep_alive(!reserve_only);
            self.watch(builder.serve_connection(io, svc), &act, stop, false).await
        }
    }

    /// Drives a connection under the watchdog: the timeouts, and the graceful close when
    /// the listener stops.
    async fn watch<C: Graceful>(
        &self,
        conn: C,
        act: &Activity,
        mut stop: tokio::sync::watch::Receiver<bool>,
        h2: bool,
    ) {
        let mut conn = std::pin::pin!(conn);
        let tick =
            (self.header_timeout.min(self.idle_timeout) / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(listener = self.name, "connection ended: {e}");
                    }
                    return;
                }
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    // Shutting down: finish what is in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                    return;
                }
                _ = ticks.tick() => {
                    if let Some(reason) = act.expired(self.header_timeout, self.idle_timeout) {
                        self.metrics.closed.with_label_values(&[self.name, reason]).inc();
                        if h2 {
                            // GOAWAY: a stream the client opened meanwhile is still served.
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(self.header_timeout, conn.as_mut()).await;
                        }
                        // Dropping the connection closes the socket (nothing is in flight).
                        return;
                    }
                }
            }
        }
    }
}

/// A hyper server connection (HTTP/1.1 or HTTP/2).
trait Graceful: std::future::Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::Connection::graceful_shutdown(self)
    }
}

impl<I, S, B, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self)
    }
}

/// HTTP/2's connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes until they differ from HTTP/2's preface or are as long
/// as it (never more than its 24 bytes): (HTTP/2, the bytes read).
async fn sniff<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<(bool, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; 24];
    loop {
        let want = H2_PREFACE.len() - buf.len();
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok((false, buf));
        }
        buf.extend_from_slice(&chunk[..n]);
        if !H2_PREFACE.starts_with(&buf) {
            return Ok((false, buf));
        }
        if buf.len() == H2_PREFACE.len() {
            return Ok((true, buf));
        }
    }
}

/// A byte stream whose first bytes (read ahead by [`sniff`]) are read again.
struct Rewind<IO> {
    prefix: Vec<u8>,
    pos: usize,
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn over_capacity() -> Response<Body> {
    let body = serde_json::json!({"error": {
        "message": "the server has too many open connections; retry shortly",
        "type": "ServiceUnavailableError", "code": 503}});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // +1: 0 means "not waiting for a head".
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// What a connection's watchdog needs: requests in flight, when the current request head
/// started (0: none expected yet), when it last saw activity; on HTTP/2 only streams count
/// as activity (the first request's deadline runs from the accept).
struct Activity {
    in_flight: AtomicUsize,
    head_since: AtomicU64,
    last_active: AtomicU64,
    h2: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        let now = now_ms();
        // A new connection waits for its first request head from the start.
        Self {
            in_flight: AtomicUsize::new(0),
            head_since: AtomicU64::new(now),
            last_active: AtomicU64::new(now),
            h2: AtomicBool::new(false),
        }
    }

    fn on_read(&self) {
        if self.h2.load(Relaxed) {
            return;
        }
        let now = now_ms();
        self.last_active.store(now, Relaxed);
        if self.in_flight.load(Relaxed) == 0 {
            // The first byte of the next request head.
            let _ = self.head_since.compare_exchange(0, now, Relaxed, Relaxed);
        }
    }

    /// Counts a request in flight until the guard drops; also returns how many others were.
    fn request_started(self: &Arc<Self>) -> (InFlightGuard, usize) {
        let others = self.in_flight.fetch_add(1, Relaxed);
        self.head_since.store(0, Relaxed);
        (InFlightGuard(self.clone()), others)
    }

    fn expired(&self, header: Duration, idle: Duration) -> Option<&'static str> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        let now = now_ms();
        let head = self.head_since.load(Relaxed);
        if head != 0 {
            return (now.saturating_sub(head) > header.as_millis() as u64).then_some("header_timeout");
        }
        (now.saturating_sub(self.last_active.load(Relaxed)) > idle.as_millis() as u64).then_some("idle_timeout")
    }
}

struct InFlightGuard(Arc<Activity>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.last_active.store(now_ms(), Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The connection's byte stream, reporting reads to its [`Activity`].
struct Tracked<IO> {
    inner: IO,
    act: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.on_read();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniffed(bytes: &[u8]) -> (bool, Vec<u8>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut src = bytes;
            let (h2, prefix) = sniff(&mut src).await.unwrap();
            // What the server then reads: the sniffed bytes again, then the rest.
            let mut again = Vec::new();
            let mut r = Rewind { prefix: prefix.clone(), pos: 0, inner: src };
            tokio::io::AsyncReadExt::read_to_end(&mut r, &mut again).await.unwrap();
            (h2, prefix, again)
        })
    }

    #[test]
    fn sniff_reads_no_further_than_it_must_and_rewind_replays_it() {
        let h1 = b"GET /health HTTP/1.1\r\n\r\n";
        assert_eq!(sniffed(h1), (false, h1[..24].to_vec(), h1.to_vec()));
        let pri = b"PRI * HTTP/1.1\r\n\r\n";
        assert_eq!(sniffed(pri), (false, pri.to_vec(), pri.to_vec()));
        let mut h2c = H2_PREFACE.to_vec();
        h2c.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(sniffed(&h2c), (true, H2_PREFACE.to_vec(), h2c.clone()));
        assert_eq!(sniffed(b""), (false, vec![], vec![]));
    }

    /// Yields one byte per read, as a slow client sends.
    struct OneByte<'a>(&'a [u8]);

    impl AsyncRead for OneByte<'_> {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if let Some((b, rest)) = self.0.split_first() {
                buf.put_slice(&[*b]);
                self.0 = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn sniff_stops_at_the_first_byte_that_differs() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = OneByte(b"PUT /x HTTP/1.1\r\n\r\n");
            assert_eq!(sniff(&mut r).await.unwrap(), (false, b"PU".to_vec()));
            let mut r = OneByte(b"PRI * HTTP/2.0\r\n\r\nXX");
            assert_eq!(sniff(&mut r).await.unwrap(), (false, b"PRI * HTTP/2.0\r\n\r\nX".to_vec()));
            let mut r = OneByte(H2_PREFACE);
            assert_eq!(sniff(&mut r).await.unwrap(), (true, H2_PREFACE.to_vec()));
        });
    }
}
