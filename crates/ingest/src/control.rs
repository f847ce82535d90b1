//! Fleet changes while running (Kubernetes discovery): pods join and leave.
//!
//! * **dial mode**: a joining pod's publisher is dialled (each data-parallel rank at the
//!   endpoint + rank) and its buffer replayed from 0; a leaving pod's sockets are closed.
//! * **bind mode**: a joining pod becomes known, so its topics are accepted; messages that
//!   arrived before discovery saw the pod were *held* (bounded in time and count) and are
//!   released in order; held messages of pods that never join expire and are counted.
//! * either way, a leaving pod's streams are forgotten and its index entries — and its
//!   ranks' — removed (in the shared Redis index too: it is the same `clear_pod`).
//!
//! The receiver thread owns the sockets, so changes reach it over a channel and take
//! effect at its next poll (≤ 100 ms).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Sender, TrySendError};
use std::time::{Duration, Instant};

use crate::pipeline::{fnv1a, Msg, Receiver_, Source};
use crate::topic::offset_endpoint;
use crate::worker::Input;
use crate::{DialTarget, IngestError};

/// A change to the followed fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Follow this pod's publisher (dial mode) and replay it from 0.
    Dial(DialTarget),
    /// Accept this pod's topics on the bound sockets (bind mode), releasing held messages.
    Known(String),
    /// The pod left: stop following it and remove its index entries.
    Remove(String),
}

/// Sends fleet changes to a running [`crate::Ingestor`].
#[derive(Clone)]
pub struct IngestControl {
    pub(crate) tx: Sender<Control>,
    pub(crate) ranks: u16,
    pub(crate) joins_requested: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub(crate) joins_done: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl IngestControl {
    pub fn send(&self, c: Control) {
        if let Control::Dial(DialTarget { replay: Some(_), .. }) = &c {
            self.joins_requested.fetch_add(u64::from(self.ranks.max(1)), Relaxed);
        }
        let _ = self.tx.send(c);
    }

    /// Whether every pod that joined so far has been replayed (its buffered events are in
    /// the index): readiness waits for it after discovery's first listing.
    pub fn joins_replayed(&self) -> bool {
        self.joins_done.load(Relaxed) >= self.joins_requested.load(Relaxed)
    }
}

/// Socket settings of dialled publishers.
#[derive(Clone, Copy)]
pub(crate) struct DialOpts {
    pub max_msg: i64,
    pub ranks: u16,
}

/// SUB sockets connected to each data-parallel rank of a pod's publisher; with `monitor`,
/// rank 0's connection events (handshake succeeded) go to that inproc endpoint.
pub(crate) fn dial_sockets(
    ctx: &zmq::Context,
    t: &DialTarget,
    o: DialOpts,
    monitor: Option<&str>,
) -> Result<Vec<(zmq::Socket, Source)>, IngestError> {
    let mut out = Vec::new();
    for r in 0..o.ranks.max(1) {
        let ep = offset_endpoint(&t.endpoint, r);
        let err = |source| IngestError::Socket { endpoint: ep.clone(), source };
        let s = ctx.socket(zmq::SUB).map_err(err)?;
        s.set_rcvhwm(100_000).map_err(err)?;
        s.set_maxmsgsize(o.max_msg).map_err(err)?;
        s.set_reconnect_ivl(100).map_err(err)?;
        s.set_reconnect_ivl_max(5000).map_err(err)?;
        s.set_linger(0).map_err(err)?;
        s.set_subscribe(b"").map_err(err)?;
        if let (0, Some(m)) = (r, monitor) {
            s.monitor(m, zmq::SocketEvent::HANDSHAKE_SUCCEEDED as i32).map_err(err)?;
        }
        s.connect(&ep).map_err(err)?;
        out.push((s, Source::Dial { pod: t.pod.clone(), replay: t.replay.clone() }));
    }
    Ok(out)
}

/// A joined pod whose replay waits for its publisher connection: a PUB socket drops what
/// it publishes before the subscription arrives, so the replay from 0 runs once the
/// connection's handshake succeeded (the subscription follows it at once) and picks up
/// whatever was published before; what comes later arrives live (duplicates are skipped
/// by sequence number). A publisher that does not answer within [`JOIN_WAIT`] is replayed
/// anyway (its replay fails or finds nothing), so readiness never waits longer for it.
pub(crate) struct PendingJoin {
    pub monitor: zmq::Socket,
    pub pod: String,
    pub replay: String,
    pub since: Instant,
}

/// Longest wait for a joined pod's publisher connection before its replay runs anyway.
const JOIN_WAIT: Duration = Duration::from_secs(2);

/// Messages of pods not (yet) known, waiting for discovery.
pub(crate) struct Held {
    pub ttl: Duration,
    pub cap: usize,
    pub queue: VecDeque<(Instant, Msg)>,
}

impl Held {
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.cap > 0
    }
}

impl Receiver_ {
    /// Applies pending fleet changes.
    pub(crate) fn on_control(&mut self) {
        while let Ok(c) = self.control.try_recv() {
            match c {
                Control::Dial(t) => self.dial(t),
                Control::Known(pod) => {
                    self.guard.known.insert(pod.clone());
                    self.release(&pod);
                }
                Control::Remove(pod) => self.remove(&pod),
            }
        }
        self.start_joins();
        self.expire_held();
    }

    /// Starts the replays of joined pods whose publisher connection is up.
    fn start_joins(&mut self) {
        let mut i = 0;
        while i < self.joins.len() {
            let up = self.joins[i].monitor.recv_multipart(zmq::DONTWAIT).is_ok_and(|f| {
                let ev = f.first().and_then(|b| b.get(..2)).map(|b| u16::from_le_bytes([b[0], b[1]]));
                ev == Some(zmq::SocketEvent::HANDSHAKE_SUCCEEDED as u16)
            });
            if up || self.joins[i].since.elapsed() > JOIN_WAIT {
                let j = self.joins.swap_remove(i);
                self.send_to_worker(&j.pod.clone(), Input::Join { pod: j.pod, replay: j.replay });
            } else {
                i += 1;
            }
        }
    }

    fn dial(&mut self, t: DialTarget) {
        let same = |s: &Source| matches!(s, Source::Dial { pod, .. } if *pod == t.pod);
        let joins = if t.replay.is_some() { u64::from(self.dial_opts.ranks.max(1)) } else { 0 };
        if self.sockets.iter().any(|(_, s)| same(s)) {
            self.joins_done.fetch_add(joins, Relaxed);
            return; // already followed
        }
        self.monitor_seq += 1;
        let mon = format!("inproc://kvroute-join-{}", self.monitor_seq);
        // The monitor's peer connects first (inproc allows it): events sent before a peer
        // is connected are lost, and a loopback handshake takes microseconds.
        let pair = match &t.replay {
            Some(_) => self.ctx.socket(zmq::PAIR).and_then(|m| m.connect(&mon).map(|_| m)).ok(),
            None => None,
        };
        let watch = pair.as_ref().map(|_| mon.as_str());
        match dial_sockets(&self.ctx, &t, self.dial_opts, watch) {
            Ok(socks) => {
                tracing::info!(pod = %t.pod, endpoint = %t.endpoint, "following a new pod's KV events");
                self.sockets.extend(socks);
                self.guard.known.insert(t.pod.clone());
                if let Some(replay) = t.replay.clone() {
                    match pair {
                        Some(monitor) => {
                            self.joins.push(PendingJoin { monitor, pod: t.pod.clone(), replay, since: Instant::now() })
                        }
                        // No monitor: replay at once (events before the subscription may be missed
                        // until the pod's next event shows the gap).
                        None => self.send_to_worker(&t.pod, Input::Join { pod: t.pod.clone(), replay }),
                    }
                }
                self.release(&t.pod);
            }
            Err(e) => {
                self.joins_done.fetch_add(joins, Relaxed);
                tracing::warn!(pod = %t.pod, "cannot dial the pod's KV-event publisher: {e}");
            }
        }
    }

    fn remove(&mut self, pod: &str) {
        self.sockets.retain(|(_, s)| !matches!(s, Source::Dial { pod: p, .. } if p == pod));
        let waiting = self.joins.len();
        self.joins.retain(|j| j.pod != pod);
        if waiting > self.joins.len() {
            // Its join replay will not run: readiness stops waiting for it.
            self.joins_done.fetch_add(u64::from(self.dial_opts.ranks.max(1)), Relaxed);
        }
        self.guard.known.remove(pod);
        self.guard.accepted.remove(pod);
        let before = self.held.queue.len();
        self.held.queue.retain(|(_, m)| m.pod != pod);
        self.metrics.held_expired.inc_by((before - self.held.queue.len()) as u64);
        self.send_to_worker(pod, Input::Forget { pod: pod.to_string() });
    }

    /// Holds a message of an unknown pod (bind mode, discovery on); `false` when holding
    /// is off (the caller drops it).
    pub(crate) fn hold(&mut self, msg: Msg) -> bool {
        if !self.held.enabled() {
            return false;
        }
        if self.held.queue.len() >= self.held.cap {
            self.held.queue.pop_front();
            self.metrics.held_expired.inc();
        }
        self.metrics.held.inc();
        self.held.queue.push_back((Instant::now(), msg));
        true
    }

    fn release(&mut self, pod: &str) {
        let (mine, rest): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(&mut self.held.queue).into_iter().partition(|(_, m)| m.pod == pod);
        self.held.queue = rest;
        for (_, mut m) in mine {
            self.metrics.held_released.inc();
            // Replays go to the known pod's own host (now that it is known).
            if let Some(port) = self.bind_replay_port {
                m.replay = Some(format!("tcp://{}:{port}", crate::topic::pod_host(&m.pod)));
            }
            let pod = m.pod.clone();
            self.send_to_worker(&pod, Input::Live(m));
        }
    }

    fn expire_held(&mut self) {
        let ttl = self.held.ttl;
        while self.held.queue.front().is_some_and(|(t, _)| t.elapsed() > ttl) {
            if let Some((_, m)) = self.held.queue.pop_front() {
                self.metrics.held_expired.inc();
                self.metrics.unknown_pod.inc();
                self.log.note(
                    "unknown_pod",
                    format_args!("held messages of pod {:?} expired: it did not join the fleet", m.pod),
                );
            }
        }
    }

    /// Hands an input to the worker that owns `pod`'s streams.
    pub(crate) fn send_to_worker(&mut self, pod: &str, input: Input) {
        let shard = fnv1a(pod) as usize % self.senders.len();
        match self.senders[shard].try_send(input) {
            Ok(()) => {}
            Err(TrySendError::Full(i)) => {
                match i {
                    Input::Live(m) => {
                        self.metrics.dropped.inc();
                        self.table.get(&m.pod).dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.log
                            .note("queue_full", format_args!("worker queue full, dropped a message of pod {}", m.pod));
                    }
                    // Fleet changes must not be lost: wait for room.
                    other => {
                        if self.senders[shard].send(other).is_err() {
                            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            }
            Err(TrySendError::Disconnected(_)) => self.stop.store(true, std::sync::atomic::Ordering::Relaxed),
        }
    }
}
