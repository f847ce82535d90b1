//! The gRPC listeners (ext_proc, gRPC health) under client limits.
//!
//! tonic serves whatever stream of connections it is given; [`Incoming`] is that stream
//! with the limits of `ext_proc:` in the configuration ([`GrpcLimits`]):
//!
//! * **max connections** — at most `max_connections` connections are served; beyond that an
//!   accepted socket is closed at once (counted as `over_capacity` in
//!   `kvroute_http_connections_closed_total`, as on the HTTP listeners), so the kernel's
//!   backlog does not fill with them while the established connections go on;
//! * **handshake timeout** — a connection must start its first request (gRPC call) within
//!   `handshake_timeout` of its accept (TLS handshake and HTTP/2 preface included), else it
//!   is closed (`handshake_timeout`): silent and byte-by-byte clients do not hold a slot;
//! * **max concurrent streams** — the HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` each connection
//!   gets (tonic's default is no limit), see [`server`];
//! * **keepalive** — an HTTP/2 PING every `keepalive_interval` without traffic; a peer that
//!   does not answer within `keepalive_timeout` is dead and its connection (with its streams)
//!   is closed.
//!
//! The connections count in `kvroute_http_connections{listener}` with the HTTP listeners'
//! (the shutdown drain reads the sum).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use kvroute_api::listen::ListenMetrics;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// Limits of a gRPC listener (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct GrpcLimits {
    pub max_connections: usize,
    /// HTTP/2 streams (gRPC calls) at once per connection.
    pub max_concurrent_streams: u32,
    /// A connection's first request must start within this of its accept.
    pub handshake_timeout: Duration,
    /// PING after this long without traffic; `None`: no pings.
    pub keepalive_interval: Option<Duration>,
    /// A PING unanswered this long closes the connection.
    pub keepalive_timeout: Duration,
}

/// A tonic server builder with `limits` applied (streams per connection, keepalive) and
/// the layer that tells [`Incoming`]'s connections their first request has started; over
/// TLS when `tls` is set (its handshake bounded by `handshake_timeout` too).
pub fn server(
    limits: &GrpcLimits,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<
    tonic::transport::Server<tower::layer::util::Stack<MarkStarted, tower::layer::util::Identity>>,
    tonic::transport::Error,
> {
    let mut b = tonic::transport::Server::builder();
    if let Some(t) = tls {
        b = b.tls_config(t.timeout(limits.handshake_timeout))?;
    }
    Ok(b.max_concurrent_streams(limits.max_concurrent_streams.max(1))
        .http2_keepalive_interval(limits.keepalive_interval)
        .http2_keepalive_timeout(Some(limits.keepalive_timeout.max(Duration::from_millis(1))))
        .layer(MarkStarted))
}

/// The connections a gRPC listener accepts, within its limits (the stream to hand to
/// tonic's `serve_with_incoming_shutdown`; dropping it closes the listening socket).
pub struct Incoming {
    listener: TcpListener,
    name: &'static str,
    permits: Arc<Semaphore>,
    handshake_timeout: Duration,
    metrics: ListenMetrics,
    backoff: Option<Pin<Box<Sleep>>>,
    accept_errors: u64,
}

impl Incoming {
    /// `name` is the metric label (`ext_proc`, `grpc_health`).
    pub fn new(listener: TcpListener, name: &'static str, limits: &GrpcLimits, metrics: ListenMetrics) -> Self {
        Self {
            listener,
            name,
            permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            handshake_timeout: limits.handshake_timeout.max(Duration::from_millis(1)),
            metrics,
            backoff: None,
            accept_errors: 0,
        }
    }
}

impl futures_util::Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.backoff.as_mut() {
                ready!(b.as_mut().poll(cx));
                this.backoff = None;
            }
            let (tcp, peer) = match ready!(this.listener.poll_accept(cx)) {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE/ENFILE and the like: back off instead of spinning.
                    this.accept_errors += 1;
                    if this.accept_errors.is_power_of_two() {
                        tracing::warn!(listener = this.name, errors = this.accept_errors, "accept failed: {e}");
                    }
                    this.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
                    continue;
                }
            };
            let Ok(permit) = this.permits.clone().try_acquire_owned() else {
                this.metrics.closed(this.name, "over_capacity");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let gauge = this.metrics.open_gauge(this.name, "main");
            gauge.inc();
            return Poll::Ready(Some(Ok(Conn {
                tcp,
                info: ConnInfo { remote: Some(peer), started: Arc::new(AtomicBool::new(false)) },
                deadline: Some(Box::pin(tokio::time::sleep(this.handshake_timeout))),
                timed_out: false,
                name: this.name,
                metrics: this.metrics.clone(),
                gauge,
                _permit: permit,
            })));
        }
    }
}

/// What tonic puts in each request's extensions for a connection from [`Incoming`] (inside
/// `TlsConnectInfo` over TLS).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    started: Arc<AtomicBool>,
}

/// One accepted connection: its slot under `max_connections` and its handshake deadline.
pub struct Conn {
    tcp: TcpStream,
    info: ConnInfo,
    /// Until the first request starts.
    deadline: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
    name: &'static str,
    metrics: ListenMetrics,
    gauge: prometheus::IntGauge,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(d) = this.deadline.as_mut() {
            if this.info.started.load(Relaxed) {
                this.deadline = None;
            } else if d.as_mut().poll(cx).is_ready() {
                // The connection task polls reads whenever it waits for the peer, so the
                // timer's wake-up lands here: fail the read, and hyper closes the connection.
                this.deadline = None;
                this.timed_out = true;
                this.metrics.closed(this.name, "handshake_timeout");
            }
        }
        if this.timed_out {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no gRPC request within the handshake timeout",
            )));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Tower layer: marks the connection of each request (from [`ConnInfo`] in its extensions)
/// as started, which lifts its handshake deadline.
#[derive(Clone, Copy, Debug, Default)]
pub struct MarkStarted;

impl<S> tower::Layer<S> for MarkStarted {
    type Service = Started<S>;

    fn layer(&self, inner: S) -> Started<S> {
        Started(inner)
    }
}

/// The service of [`MarkStarted`].
#[derive(Clone, Debug)]
pub struct Started<S>(S);

impl<S, B> tower::Service<http::Request<B>> for Started<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ext = req.extensions();
        let info = ext
            .get::<ConnInfo>()
            .or_else(|| ext.get::<tonic::transport::server::TlsConnectInfo<ConnInfo>>().map(|t| t.get_ref()));
        if let Some(i) = info {
            i.started.store(true, Relaxed);
        }
        self.0.call(req)
    }
}
