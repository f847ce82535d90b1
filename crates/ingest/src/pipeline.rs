//! The ingestion pipeline: one receiver thread polls every SUB socket, admits each
//! message's pod (see [`PodGuard`]) and hands the message to a worker chosen by a hash of
//! its pod, over a bounded queue (full queue = message dropped and counted; the gap it
//! leaves is repaired by replay). A worker keeps each pod's sequence state and applies
//! its batches in order (`crate::worker`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::ratelog::RateLog;
use crate::stats::{Metrics, PodTable};
use crate::topic::{parse_topic, pod_host};
use crate::worker::Input;

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

/// A live message's parts, `[topic, seq (8 bytes, big-endian), payload]`; `None` for any
/// other framing (counted as malformed by the receiver).
pub fn message_parts(frames: &[Vec<u8>]) -> Option<(std::borrow::Cow<'_, str>, u64, &[u8])> {
    let [topic, seq, payload] = frames else { return None };
    let seq = u64::from_be_bytes(seq.as_slice().try_into().ok()?);
    Some((String::from_utf8_lossy(topic), seq, payload))
}

pub(crate) fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// Which pods a bound socket accepts messages for.
///
/// A topic's pod must be known (a backend, a dial target or a listed pod) unless unknown
/// pods are accepted; then at most `max_pods` distinct pods are. Unknown pods are counted,
/// and at most `max_unknown_tracked` distinct ones are remembered (memory stays bounded).
pub(crate) struct PodGuard {
    pub known: HashSet<String>,
    pub accept_unknown: bool,
    pub max_pods: usize,
    pub max_unknown_tracked: usize,
    pub accepted: HashSet<String>,
    pub unknown: HashSet<String>,
}

impl PodGuard {
    fn admit(&mut self, pod: &str, metrics: &Metrics, log: &RateLog) -> bool {
        if self.known.contains(pod) || self.accepted.contains(pod) {
            return true;
        }
        if self.accept_unknown && self.accepted.len() < self.max_pods {
            self.accepted.insert(pod.to_string());
            return true;
        }
        metrics.unknown_pod.inc();
        if self.unknown.len() < self.max_unknown_tracked && !self.unknown.contains(pod) {
            self.unknown.insert(pod.to_string());
            metrics.unknown_pods.set(self.unknown.len() as i64);
        }
        let why = if self.accept_unknown { "over the pod cap" } else { "not a known backend" };
        log.note("unknown_pod", format_args!("topic names pod {:?}, {why}", pod.chars().take(128).collect::<String>()));
        false
    }
}

pub(crate) struct Receiver_ {
    pub sockets: Vec<(zmq::Socket, Source)>,
    /// PAIR sockets receiving the bound sockets' monitor events (disconnections).
    pub monitors: Vec<zmq::Socket>,
    pub senders: Vec<SyncSender<Input>>,
    pub stop: Arc<AtomicBool>,
    pub table: Arc<PodTable>,
    pub metrics: Metrics,
    pub guard: PodGuard,
    pub log: Arc<RateLog>,
    // ---- fleet changes (crate::control) ----
    pub ctx: zmq::Context,
    pub dial_opts: crate::control::DialOpts,
    pub control: std::sync::mpsc::Receiver<crate::control::Control>,
    pub held: crate::control::Held,
    /// Bound sockets' replay port (`ingest.replay_port`).
    pub bind_replay_port: Option<u16>,
    pub joins_done: Arc<std::sync::atomic::AtomicU64>,
    /// Joined pods waiting for their publisher connection before their replay.
    pub joins: Vec<crate::control::PendingJoin>,
    pub monitor_seq: u64,
}

impl Receiver_ {
    pub fn run(mut self) {
        while !self.stop.load(Relaxed) {
            self.log.flush();
            self.on_control();
            let mut items: Vec<zmq::PollItem<'_>> = self
                .sockets
                .iter()
                .map(|(s, _)| s)
                .chain(&self.monitors)
                .map(|s| s.as_poll_item(zmq::POLLIN))
                .collect();
            if let Err(e) = zmq::poll(&mut items, 100) {
                warn!("zmq poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let ready: Vec<usize> = items.iter().enumerate().filter(|(_, i)| i.is_readable()).map(|(n, _)| n).collect();
            drop(items);
            let (ready, monitors): (Vec<usize>, Vec<usize>) = ready.into_iter().partition(|n| *n < self.sockets.len());
            for n in monitors {
                self.on_monitor(n - self.sockets.len());
            }
            for n in ready {
                // Drain, but bounded, so one busy publisher cannot starve the others.
                for _ in 0..1024 {
                    match self.sockets[n].0.recv_multipart(zmq::DONTWAIT) {
                        Ok(frames) => self.on_message(frames, n),
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

    fn on_monitor(&self, n: usize) {
        while let Ok(frames) = self.monitors[n].recv_multipart(zmq::DONTWAIT) {
            let event = frames.first().and_then(|f| f.get(..2)).map(|b| u16::from_le_bytes([b[0], b[1]]));
            if event == Some(zmq::SocketEvent::DISCONNECTED as u16) {
                self.metrics.disconnects.inc();
                let ep = frames.get(1).map(|e| String::from_utf8_lossy(e).into_owned()).unwrap_or_default();
                self.log.note(
                    "publisher_disconnected",
                    format_args!(
                        "a publisher's connection to {ep} closed (it went away, or sent a frame over max_frame_bytes)"
                    ),
                );
            }
        }
    }

    fn on_message(&mut self, mut frames: Vec<Vec<u8>>, socket: usize) {
        self.metrics.received.inc();
        if frames.len() != 3 || frames[1].len() != 8 {
            self.metrics.malformed.inc();
            self.log.note(
                "malformed",
                format_args!(
                    "{} frames (seq frame {} bytes), not [topic, seq(8 bytes), payload]",
                    frames.len(),
                    frames.get(1).map_or(0, Vec::len)
                ),
            );
            return;
        }
        let Some((topic, seq, _)) = message_parts(&frames) else { return };
        let topic = topic.into_owned();
        let payload = frames.pop().unwrap_or_default();
        let t = parse_topic(&topic);
        let source = match &self.sockets[socket].1 {
            Source::Bind { replay_port } => Err(*replay_port),
            Source::Dial { pod, replay } => Ok((pod.clone(), replay.clone())),
        };
        let (pod, replay) = match source {
            Err(replay_port) => {
                let unknown = !self.guard.known.contains(t.pod) && !self.guard.accepted.contains(t.pod);
                if unknown && !self.guard.accept_unknown && self.held.enabled() {
                    // Discovery may not have seen this pod yet: hold, don't drop.
                    let m = Msg { model: t.model.to_string(), pod: t.pod.to_string(), seq, payload, replay: None };
                    self.hold(m);
                    return;
                }
                if !self.guard.admit(t.pod, &self.metrics, &self.log) {
                    return;
                }
                // Replays go to a known pod's own host only, never to a host that only a
                // topic names (an accepted unknown pod has no replay).
                let known = self.guard.known.contains(t.pod);
                (t.pod.to_string(), replay_port.filter(|_| known).map(|p| format!("tcp://{}:{}", pod_host(t.pod), p)))
            }
            Ok(dialled) => dialled,
        };
        let msg = Msg { model: t.model.to_string(), pod: pod.clone(), seq, payload, replay };
        self.send_to_worker(&pod, Input::Live(msg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(known: &[&str], accept_unknown: bool) -> PodGuard {
        PodGuard {
            known: known.iter().map(|s| s.to_string()).collect(),
            accept_unknown,
            max_pods: 2,
            max_unknown_tracked: 3,
            accepted: HashSet::new(),
            unknown: HashSet::new(),
        }
    }

    #[test]
    fn known_pods_only_and_bounded_tracking() {
        let m = Metrics::new(&prometheus::Registry::new()).unwrap();
        let log = RateLog::new(Duration::from_secs(60));
        let mut g = guard(&["10.0.0.1:8000"], false);
        assert!(g.admit("10.0.0.1:8000", &m, &log));
        for n in 0..10 {
            assert!(!g.admit(&format!("forged-{n}"), &m, &log));
        }
        assert_eq!((m.unknown_pod.get(), m.unknown_pods.get(), g.unknown.len()), (10, 3, 3));
    }

    #[test]
    fn accepting_unknown_pods_is_capped() {
        let m = Metrics::new(&prometheus::Registry::new()).unwrap();
        let log = RateLog::new(Duration::from_secs(60));
        let mut g = guard(&[], true);
        assert!(g.admit("a", &m, &log) && g.admit("b", &m, &log) && g.admit("a", &m, &log));
        assert!(!g.admit("c", &m, &log), "over max_pods");
        assert_eq!(m.unknown_pod.get(), 1);
    }
}
