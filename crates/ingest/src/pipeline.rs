//! The ingestion pipeline: one receiver thread polls every SUB socket and hands each
//! message to a worker chosen by a hash of its pod, over a bounded queue (full queue =
//! message dropped and counted; the gap it leaves is repaired by replay). A worker keeps
//! each pod's sequence state and applies its batches in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use kvroute_events::{decode_batch, EventBatch};
use kvroute_index::{BlockIndex, EventApplier, PodId, Pods};
use tracing::{debug, info, warn};

use crate::replay::replay;
use crate::seq::{SeqTracker, Verdict};
use crate::stats::{Metrics, PodCounters, PodTable};
use crate::topic::{offset_endpoint, parse_topic, pod_host};

/// One received message, routed to a worker.
pub(crate) struct Msg {
    pub pod: String,
    pub model: String,
    pub seq: u64,
    pub payload: Vec<u8>,
    /// The pod's replay endpoint for data-parallel rank 0 (ranks add their rank).
    pub replay: Option<String>,
}

/// Where a SUB socket's messages come from.
pub(crate) enum Source {
    /// Bound socket: the pod comes from each message's topic.
    Bind { replay_port: Option<u16> },
    /// Dialled publisher of a known pod.
    Dial { pod: String, replay: Option<String> },
}

pub(crate) fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

pub(crate) struct Receiver_ {
    pub sockets: Vec<(zmq::Socket, Source)>,
    pub senders: Vec<SyncSender<Msg>>,
    pub stop: Arc<AtomicBool>,
    pub table: Arc<PodTable>,
    pub metrics: Metrics,
}

impl Receiver_ {
    pub fn run(self) {
        while !self.stop.load(Relaxed) {
            let mut items: Vec<zmq::PollItem<'_>> =
                self.sockets.iter().map(|(s, _)| s.as_poll_item(zmq::POLLIN)).collect();
            if let Err(e) = zmq::poll(&mut items, 100) {
                warn!("zmq poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let ready: Vec<usize> = items.iter().enumerate().filter(|(_, i)| i.is_readable()).map(|(n, _)| n).collect();
            drop(items);
            for n in ready {
                let (sock, source) = &self.sockets[n];
                // Drain, but bounded, so one busy publisher cannot starve the others.
                for _ in 0..1024 {
                    match sock.recv_multipart(zmq::DONTWAIT) {
                        Ok(frames) => self.on_message(frames, source),
                        Err(zmq::Error::EAGAIN) => break,
                        Err(e) => {
                            warn!("zmq receive failed: {e}");
                            break;
                        }
                    }
                }
            }
        }
    }

    fn on_message(&self, mut frames: Vec<Vec<u8>>, source: &Source) {
        self.metrics.received.inc();
        if frames.len() != 3 || frames[1].len() != 8 {
            self.metrics.malformed.inc();
            debug!(frames = frames.len(), "skipping a message that is not [topic, seq(8 bytes), payload]");
            return;
        }
        let payload = frames.pop().unwrap_or_default();
        let seq = u64::from_be_bytes(frames[1].as_slice().try_into().unwrap_or([0; 8]));
        let topic = String::from_utf8_lossy(&frames[0]);
        let t = parse_topic(&topic);
        let (pod, replay) = match source {
            Source::Bind { replay_port } => {
                (t.pod.to_string(), replay_port.map(|p| format!("tcp://{}:{}", pod_host(t.pod), p)))
            }
            Source::Dial { pod, replay } => (pod.clone(), replay.clone()),
        };
        let shard = fnv1a(&pod) as usize % self.senders.len();
        let msg = Msg { model: t.model.to_string(), pod, seq, payload, replay };
        match self.senders[shard].try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(m)) => {
                self.metrics.dropped.inc();
                self.table.get(&m.pod).dropped.fetch_add(1, Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => self.stop.store(true, Relaxed),
        }
    }
}

/// Replay timing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReplayTimeouts {
    pub idle: Duration,
    pub total: Duration,
}

pub(crate) struct Worker<I: BlockIndex> {
    pub applier: Arc<EventApplier<I>>,
    pub pods: Arc<Pods>,
    pub table: Arc<PodTable>,
    pub metrics: Metrics,
    pub ctx: zmq::Context,
    pub timeouts: ReplayTimeouts,
    pub streams: HashMap<String, SeqTracker>,
    /// Bumped by [`crate::Ingestor::resync`]; when it moves, every stream is treated as
    /// newly joined (replayed from its start where the pod has a replay endpoint).
    pub resync: Arc<std::sync::atomic::AtomicU64>,
    pub resync_seen: u64,
}

fn stream_name(pod: &str, rank: i64) -> String {
    if rank <= 0 {
        pod.to_string()
    } else {
        format!("{pod}#dp{rank}")
    }
}

impl<I: BlockIndex> Worker<I> {
    pub fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(m) = rx.recv() {
            self.handle(m);
        }
    }

    /// Applies batch `seq` unless it was applied already (the applier — or a shared index —
    /// keeps the last applied sequence number per pod: copies are counted, so a replay that
    /// repeats a batch must not apply it twice).
    fn apply(&self, pod: PodId, model: &str, seq: u64, batch: &EventBatch, c: &PodCounters) {
        if !self.applier.apply_seq(pod, model, seq, batch) {
            c.duplicates.fetch_add(1, Relaxed);
            return;
        }
        c.applied_batches.fetch_add(1, Relaxed);
        self.metrics.applied_batches.inc();
        self.metrics.applied_events.inc_by(batch.events.len() as u64);
    }

    fn clear(&self, pod: PodId) {
        self.applier.clear_pod(pod);
    }

    fn handle(&mut self, m: Msg) {
        let generation = self.resync.load(Relaxed);
        if generation != self.resync_seen {
            self.resync_seen = generation;
            self.streams.clear();
        }
        let batch = decode_batch(&m.payload);
        let rank = batch.as_ref().ok().and_then(|b| b.data_parallel_rank).unwrap_or(0);
        let name = stream_name(&m.pod, rank);
        let c = self.table.get(&name);
        c.received.fetch_add(1, Relaxed);
        c.last_seq_plus_one.store(m.seq.wrapping_add(1), Relaxed);
        if !m.model.is_empty() && *c.model.lock() != m.model {
            *c.model.lock() = m.model.clone();
        }
        let mut tracker = self.streams.get(&name).copied().unwrap_or_default();
        let verdict = tracker.on_live(m.seq);
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                c.malformed.fetch_add(1, Relaxed);
                self.metrics.malformed.inc();
                debug!(pod = %name, seq = m.seq, "malformed KV-event payload: {e}");
                if verdict == Verdict::Apply {
                    tracker.applied(m.seq); // consumed: not a gap to repair
                }
                self.streams.insert(name, tracker);
                return;
            }
        };
        let Ok(pod) = self.pods.intern(&name) else {
            c.dropped.fetch_add(1, Relaxed);
            return;
        };
        let replay_ep = m.replay.as_deref().map(|b| offset_endpoint(b, rank.clamp(0, u16::MAX as i64) as u16));
        match verdict {
            Verdict::Apply => {}
            Verdict::Duplicate => {
                c.duplicates.fetch_add(1, Relaxed);
            }
            Verdict::Joined => {
                if let Some(ep) = &replay_ep {
                    self.replay(ep, 0, pod, &m.model, &mut tracker, &c);
                }
            }
            Verdict::Gap { from } => {
                c.gaps.fetch_add(1, Relaxed);
                self.metrics.gaps.inc();
                let repaired = match &replay_ep {
                    Some(ep) => self.replay(ep, from, pod, &m.model, &mut tracker, &c),
                    None => false,
                };
                if !repaired {
                    // Events were lost for good: what the index holds for this pod may be
                    // stale, so start it afresh from here on.
                    warn!(pod = %name, from, to = m.seq, "unrepaired sequence gap: clearing the pod");
                    self.clear(pod);
                    tracker.reset_applied();
                }
            }
            Verdict::Restart => {
                c.restarts.fetch_add(1, Relaxed);
                self.metrics.restarts.inc();
                info!(pod = %name, seq = m.seq, "engine restart detected: clearing the pod");
                self.clear(pod);
                tracker.reset_applied();
                if let Some(ep) = &replay_ep {
                    self.replay(ep, 0, pod, &m.model, &mut tracker, &c);
                }
            }
        }
        if verdict != Verdict::Duplicate && tracker.last_applied().is_none_or(|a| m.seq > a) {
            self.apply(pod, &m.model, m.seq, &batch, &c);
            tracker.applied(m.seq);
        }
        self.streams.insert(name, tracker);
    }

    /// Replays from `from`; true when every batch from `from` on was received in order.
    fn replay(&self, ep: &str, from: u64, pod: PodId, model: &str, t: &mut SeqTracker, c: &PodCounters) -> bool {
        c.replays.fetch_add(1, Relaxed);
        self.metrics.replays.inc();
        let mut expect = from;
        let mut contiguous = true;
        let res = replay(&self.ctx, ep, from, self.timeouts.idle, self.timeouts.total, |seq, payload| {
            contiguous &= seq == expect;
            expect = seq.wrapping_add(1);
            if t.last_applied().is_some_and(|a| seq <= a) {
                return;
            }
            match decode_batch(payload) {
                Ok(b) => self.apply(pod, model, seq, &b, c),
                Err(_) => {
                    c.malformed.fetch_add(1, Relaxed);
                    self.metrics.malformed.inc();
                }
            }
            t.applied(seq);
        });
        let ok = match res {
            Ok(o) => contiguous && o.batches > 0,
            Err(e) => {
                warn!(endpoint = ep, from, "replay failed: {e}");
                false
            }
        };
        if !ok {
            c.replay_failures.fetch_add(1, Relaxed);
            self.metrics.replay_failures.inc();
        }
        ok
    }
}
