//! Workers apply each pod's batches in sequence order; replays run on a bounded pool of
//! replay threads so that a slow or silent replay endpoint only delays its own pod: while
//! a stream (pod, data-parallel rank) replays, its later live messages wait in a bounded
//! per-stream queue and every other stream goes on.
//!
//! Sequence anomalies follow the *confirmation rule*: a gap that a replay could not cover,
//! or a sequence that went backwards, is held as a suspect and not applied; it is acted
//! upon (the pod cleared — and, for a restart, the new publisher's buffer replayed) only
//! when the next live message continues from it (`seq + 1`). When the stream instead goes
//! on from before it, the suspect is discarded and counted. A single forged or stray
//! message therefore cannot wipe a pod; a real restart or loss takes effect one message
//! later.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use kvroute_events::{decode_batch, EventBatch};
use kvroute_index::{BlockIndex, EventApplier, PodId, Pods};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use crate::pipeline::Msg;
use crate::ratelog::RateLog;
use crate::replay::replay;
use crate::seq::{SeqTracker, Verdict};
use crate::stats::{Metrics, PodCounters, PodTable};
use crate::topic::{is_pod_or_rank, offset_endpoint, rank_pod};

/// Live messages a stream holds while its replay runs; more are dropped (and counted).
const QUEUED_PER_STREAM: usize = 4096;

/// What a worker receives: live messages, its streams' finished replays, and fleet
/// changes (discovery) for its pods.
pub(crate) enum Input {
    Live(Msg),
    Replayed(ReplayDone),
    /// A pod joined: replay each data-parallel rank's buffer from 0 (rank r at the replay
    /// endpoint + r) before its live messages, as for a stream that joined mid-sequence.
    Join {
        pod: String,
        replay: String,
    },
    /// A pod left: forget its streams and clear its (and its ranks') index entries.
    Forget {
        pod: String,
    },
}

/// Replay timing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReplayTimeouts {
    pub idle: Duration,
    pub total: Duration,
}

/// What workers and replay threads share.
pub(crate) struct Shared<I: BlockIndex> {
    pub applier: Arc<EventApplier<I>>,
    pub pods: Arc<Pods>,
    pub table: Arc<PodTable>,
    pub metrics: Metrics,
    pub log: Arc<RateLog>,
    pub ctx: zmq::Context,
    pub timeouts: ReplayTimeouts,
    pub max_frame_bytes: usize,
    pub max_batch_events: usize,
    pub data_parallel_size: u16,
    pub stop: Arc<AtomicBool>,
    /// Join replays (one per data-parallel rank of each pod that joined) finished or
    /// skipped; compared with [`crate::IngestControl`]'s requested count.
    pub joins_done: Arc<AtomicU64>,
}

impl<I: BlockIndex> Shared<I> {
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
}

/// One live batch of a stream.
pub(crate) struct Live {
    seq: u64,
    model: String,
    batch: EventBatch,
}

/// What to do once a stream's replay is over.
enum After {
    /// Apply these (those the replay did not already cover).
    Apply(Vec<Live>),
    /// A gap's first message: apply it if the replay reached just before it, else hold it
    /// as a suspect.
    Gap(Live),
}

/// A replay to run on the pool.
pub(crate) struct ReplayJob {
    worker: usize,
    stream: String,
    pod: PodId,
    model: String,
    endpoint: String,
    from: u64,
    tracker: SeqTracker,
    counters: Arc<PodCounters>,
    /// A pod that just joined the fleet: an empty buffer is no failure.
    join: bool,
}

/// A replay's result, sent back to the stream's worker.
pub(crate) struct ReplayDone {
    join: bool,
    stream: String,
    tracker: SeqTracker,
}

/// One publisher stream's state in its worker.
pub(crate) struct Stream {
    pod: PodId,
    counters: Arc<PodCounters>,
    tracker: SeqTracker,
    replay: Option<String>,
    replaying: bool,
    /// A resync was asked while the replay ran: rejoin afterwards.
    stale: bool,
    after: Option<After>,
    queued: VecDeque<Live>,
    suspect: Option<(Live, Verdict)>,
}

pub(crate) struct Worker<I: BlockIndex> {
    pub id: usize,
    pub sh: Arc<Shared<I>>,
    pub jobs: Sender<ReplayJob>,
    pub streams: HashMap<String, Stream>,
    /// Bumped by [`crate::Ingestor::resync_handle`]; when it moves, every stream is treated
    /// as newly joined (replayed from its start where the pod has a replay endpoint).
    pub resync: Arc<AtomicU64>,
    pub resync_seen: u64,
    /// Streams forgotten while their replay ran: cleared again when the replay reports
    /// back (it may have applied a batch after the first clear).
    pub forgotten: HashMap<String, PodId>,
}

impl<I: BlockIndex> Worker<I> {
    pub fn run(mut self, rx: Receiver<Input>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Input::Live(m)) => self.on_live(m),
                Ok(Input::Replayed(d)) => self.on_replayed(d),
                Ok(Input::Join { pod, replay }) => self.on_join(&pod, &replay),
                Ok(Input::Forget { pod }) => self.on_forget(&pod),
                Err(RecvTimeoutError::Timeout) if !self.sh.stop.load(Relaxed) => {}
                Err(_) => return,
            }
        }
    }

    fn on_live(&mut self, m: Msg) {
        let generation = self.resync.load(Relaxed);
        if generation != self.resync_seen {
            self.resync_seen = generation;
            self.streams.retain(|_, s| s.replaying);
            self.streams.values_mut().for_each(|s| s.stale = true);
        }
        let sh = self.sh.clone();
        let batch = match decode_batch(&m.payload) {
            Ok(b) => b,
            Err(e) => {
                let c = sh.table.get(&m.pod);
                c.received.fetch_add(1, Relaxed);
                c.malformed.fetch_add(1, Relaxed);
                sh.metrics.malformed.inc();
                sh.log.note("malformed", format_args!("undecodable payload from pod {} seq {}: {e}", m.pod, m.seq));
                // A malformed batch consumes its sequence number: not a gap to repair.
                if let Some(s) = self.streams.get_mut(&m.pod) {
                    if !s.replaying && s.tracker.on_live(m.seq) == Verdict::Apply {
                        s.tracker.seen(m.seq);
                        s.tracker.applied(m.seq);
                    }
                }
                return;
            }
        };
        let rank = batch.data_parallel_rank.unwrap_or(0);
        if rank < 0 || rank >= i64::from(sh.data_parallel_size.max(1)) {
            sh.metrics.bad_rank.inc();
            sh.log.note(
                "bad_dp_rank",
                format_args!("pod {} sent data-parallel rank {rank}, configured size {}", m.pod, sh.data_parallel_size),
            );
            return;
        }
        if batch.events.len() > sh.max_batch_events {
            sh.metrics.oversized.inc();
            sh.log.note(
                "oversized_batch",
                format_args!(
                    "pod {} sent {} events in one batch (max {})",
                    m.pod,
                    batch.events.len(),
                    sh.max_batch_events
                ),
            );
            return;
        }
        let name = rank_pod(&m.pod, rank);
        let mut st = match self.streams.remove(&name) {
            Some(s) => s,
            None => match self.new_stream(&name) {
                Some(s) => s,
                None => {
                    sh.table.get(&name).dropped.fetch_add(1, Relaxed);
                    return;
                }
            },
        };
        let c = st.counters.clone();
        c.received.fetch_add(1, Relaxed);
        c.last_seq_plus_one.store(m.seq.wrapping_add(1), Relaxed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        c.last_event_unix.store(now.to_bits(), Relaxed);
        c.last_event_lag.store((now - batch.ts).to_bits(), Relaxed);
        if !m.model.is_empty() && *c.model.lock() != m.model {
            *c.model.lock() = m.model.clone();
        }
        st.replay = m.replay.as_deref().map(|b| offset_endpoint(b, rank as u16));
        let live = Live { seq: m.seq, model: m.model, batch };
        if st.replaying {
            if st.queued.len() >= QUEUED_PER_STREAM {
                c.dropped.fetch_add(1, Relaxed);
                sh.metrics.dropped.inc();
                sh.log.note(
                    "queue_full",
                    format_args!("stream {name} is replaying and {QUEUED_PER_STREAM} messages wait"),
                );
            } else {
                st.queued.push_back(live);
            }
        } else {
            self.process(&name, &mut st, live);
        }
        self.streams.insert(name, st);
    }

    fn new_stream(&self, name: &str) -> Option<Stream> {
        let counters = self.sh.table.get(name);
        let pod = self.sh.pods.intern(name).ok()?;
        Some(Stream {
            pod,
            counters,
            tracker: SeqTracker::default(),
            replay: None,
            replaying: false,
            stale: false,
            after: None,
            queued: VecDeque::new(),
            suspect: None,
        })
    }

    fn on_join(&mut self, pod: &str, replay: &str) {
        for rank in 0..i64::from(self.sh.data_parallel_size.max(1)) {
            let name = rank_pod(pod, rank);
            self.forgotten.remove(&name);
            let started = !self.streams.contains_key(&name) // else its own join replayed it
                && match self.new_stream(&name) {
                    Some(mut st) => {
                        st.replay = Some(offset_endpoint(replay, rank as u16));
                        self.start_replay(&name, &mut st, 0, After::Apply(Vec::new()));
                        let started = st.replaying;
                        self.streams.insert(name, st);
                        started
                    }
                    None => false,
                };
            if !started {
                self.sh.joins_done.fetch_add(1, Relaxed);
            }
        }
    }

    fn on_forget(&mut self, pod: &str) {
        let names: Vec<String> = self.streams.keys().filter(|k| is_pod_or_rank(k, pod)).cloned().collect();
        for name in names {
            if let Some(st) = self.streams.remove(&name) {
                if st.replaying {
                    self.forgotten.insert(name, st.pod);
                }
            }
        }
        // Every rank the index knows, followed here or not.
        let mut ids: Vec<PodId> = self.sh.pods.get(pod).into_iter().collect();
        ids.extend((1..self.sh.data_parallel_size).filter_map(|r| self.sh.pods.get(&rank_pod(pod, r.into()))));
        for id in ids {
            self.sh.applier.clear_pod(id);
        }
        self.sh.table.remove(pod);
        self.sh.metrics.pods_removed.inc();
        info!(pod, "pod left the fleet: its KV-event streams forgotten and index entries removed");
    }

    fn apply_live(&self, st: &mut Stream, live: &Live) {
        if st.tracker.last_applied().is_none_or(|a| live.seq > a) {
            self.sh.apply(st.pod, &live.model, live.seq, &live.batch, &st.counters);
            st.tracker.applied(live.seq);
        }
    }

    fn discard_suspect(&self, name: &str, st: &mut Stream) {
        if let Some((s, v)) = st.suspect.take() {
            st.counters.anomalies_ignored.fetch_add(1, Relaxed);
            self.sh.metrics.anomalies_ignored.inc();
            self.sh.log.note(
                "seq_anomaly",
                format_args!(
                    "stream {name}: discarded out-of-sequence seq {} ({v:?}): the stream went on without it",
                    s.seq
                ),
            );
        }
    }

    fn start_replay(&self, name: &str, st: &mut Stream, from: u64, after: After) {
        let Some(endpoint) = st.replay.clone() else { return };
        st.replaying = true;
        let join = matches!(&after, After::Apply(v) if v.is_empty());
        st.after = Some(after);
        let job = ReplayJob {
            worker: self.id,
            stream: name.to_string(),
            pod: st.pod,
            model: match &st.after {
                Some(After::Apply(v)) => v.first().map(|l| l.model.clone()).unwrap_or_default(),
                Some(After::Gap(l)) => l.model.clone(),
                None => String::new(),
            },
            endpoint,
            from,
            tracker: st.tracker,
            counters: st.counters.clone(),
            join,
        };
        if self.jobs.send(job).is_err() {
            st.replaying = false;
        }
    }

    fn process(&self, name: &str, st: &mut Stream, live: Live) {
        let verdict = st.tracker.on_live(live.seq);
        match verdict {
            Verdict::Apply => {
                st.tracker.seen(live.seq);
                self.discard_suspect(name, st);
                self.apply_live(st, &live);
            }
            Verdict::Duplicate => {
                st.tracker.seen(live.seq);
                st.counters.duplicates.fetch_add(1, Relaxed);
            }
            Verdict::Joined => {
                st.tracker.seen(live.seq);
                if st.replay.is_some() {
                    self.start_replay(name, st, 0, After::Apply(vec![live]));
                } else {
                    self.apply_live(st, &live);
                }
            }
            Verdict::Gap { .. } | Verdict::Backwards
                if st.suspect.as_ref().is_some_and(|(s, _)| live.seq == s.seq.wrapping_add(1)) =>
            {
                let Some((suspect, kind)) = st.suspect.take() else { return };
                self.confirmed(name, st, suspect, kind, live);
            }
            Verdict::Gap { from } => {
                st.counters.gaps.fetch_add(1, Relaxed);
                self.sh.metrics.gaps.inc();
                if st.replay.is_some() {
                    self.start_replay(name, st, from, After::Gap(live));
                } else {
                    debug!(
                        stream = name,
                        from,
                        seq = live.seq,
                        "sequence gap: held until the stream continues from it"
                    );
                    self.hold(name, st, live, verdict);
                }
            }
            Verdict::Backwards => {
                debug!(
                    stream = name,
                    seq = live.seq,
                    "sequence went backwards: held until the stream continues from it"
                );
                self.hold(name, st, live, verdict);
            }
        }
    }

    fn hold(&self, name: &str, st: &mut Stream, live: Live, verdict: Verdict) {
        self.discard_suspect(name, st);
        st.suspect = Some((live, verdict));
    }

    /// A held suspect was followed by its successor: the anomaly is real.
    fn confirmed(&self, name: &str, st: &mut Stream, suspect: Live, kind: Verdict, live: Live) {
        if kind == Verdict::Backwards {
            st.counters.restarts.fetch_add(1, Relaxed);
            self.sh.metrics.restarts.inc();
            info!(stream = name, seq = suspect.seq, "engine restart: clearing the pod");
        } else {
            warn!(stream = name, seq = suspect.seq, "unrepaired sequence gap: clearing the pod");
        }
        self.sh.applier.clear_pod(st.pod);
        st.tracker.reset();
        st.tracker.seen(live.seq);
        if kind == Verdict::Backwards && st.replay.is_some() {
            self.start_replay(name, st, 0, After::Apply(vec![suspect, live]));
        } else {
            self.apply_live(st, &suspect);
            self.apply_live(st, &live);
        }
    }

    fn on_replayed(&mut self, done: ReplayDone) {
        if done.join {
            self.sh.joins_done.fetch_add(1, Relaxed);
        }
        if let Some(pod) = self.forgotten.remove(&done.stream) {
            self.sh.applier.clear_pod(pod);
            return;
        }
        let Some(mut st) = self.streams.remove(&done.stream) else { return };
        let name = done.stream;
        st.replaying = false;
        st.tracker = done.tracker;
        let after = st.after.take();
        if st.stale {
            // A resync came during the replay: rejoin from the start with the next message.
            st.stale = false;
            st.tracker.reset();
            st.suspect = None;
            let lives = match after {
                Some(After::Apply(v)) => v,
                Some(After::Gap(l)) => vec![l],
                None => Vec::new(),
            };
            for l in lives.into_iter().rev() {
                st.queued.push_front(l);
            }
        } else {
            match after {
                Some(After::Apply(v)) => v.iter().for_each(|l| self.apply_live(&mut st, l)),
                Some(After::Gap(l)) => match st.tracker.last_applied() {
                    Some(a) if l.seq <= a => st.tracker.seen(l.seq),
                    Some(a) if l.seq == a + 1 => {
                        st.tracker.seen(l.seq);
                        self.apply_live(&mut st, &l);
                    }
                    _ => {
                        let from = st.tracker.last_applied().map_or(0, |a| a + 1);
                        self.hold(&name, &mut st, l, Verdict::Gap { from });
                    }
                },
                None => {}
            }
        }
        while !st.replaying {
            let Some(l) = st.queued.pop_front() else { break };
            self.process(&name, &mut st, l);
        }
        self.streams.insert(name, st);
    }
}

/// Runs replays: `threads` threads take jobs and send each result to its worker.
pub(crate) fn spawn_replayers<I: BlockIndex + 'static>(
    sh: Arc<Shared<I>>,
    jobs: Receiver<ReplayJob>,
    workers: Vec<SyncSender<Input>>,
    threads: usize,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let jobs = Arc::new(Mutex::new(jobs));
    (0..threads.max(1))
        .map(|n| {
            let (sh, jobs, workers) = (sh.clone(), jobs.clone(), workers.clone());
            std::thread::Builder::new().name(format!("kv-replay-{n}")).spawn(move || loop {
                let job = jobs.lock().recv_timeout(Duration::from_millis(100));
                match job {
                    Ok(job) => {
                        let w = job.worker;
                        let done = run_replay(&sh, job);
                        if workers[w].send(Input::Replayed(done)).is_err() {
                            return;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) if !sh.stop.load(Relaxed) => {}
                    Err(_) => return,
                }
            })
        })
        .collect()
}

/// Replays `job.from..`; batches the tracker already applied are skipped.
fn run_replay<I: BlockIndex>(sh: &Shared<I>, job: ReplayJob) -> ReplayDone {
    let ReplayJob { stream, pod, model, endpoint, from, mut tracker, counters: c, join, .. } = job;
    c.replays.fetch_add(1, Relaxed);
    sh.metrics.replays.inc();
    let mut expect = from;
    let mut contiguous = true;
    let res =
        replay(&sh.ctx, &endpoint, from, sh.timeouts.idle, sh.timeouts.total, sh.max_frame_bytes, |seq, payload| {
            contiguous &= seq == expect;
            expect = seq.wrapping_add(1);
            if tracker.last_applied().is_some_and(|a| seq <= a) {
                return;
            }
            match decode_batch(payload) {
                Ok(b) if b.events.len() <= sh.max_batch_events => sh.apply(pod, &model, seq, &b, &c),
                Ok(_) => sh.metrics.oversized.inc(),
                Err(_) => {
                    c.malformed.fetch_add(1, Relaxed);
                    sh.metrics.malformed.inc();
                }
            }
            tracker.applied(seq);
        });
    let ok = match res {
        Ok(o) => contiguous && (o.batches > 0 || join),
        Err(e) => {
            sh.log.note("replay_failed", format_args!("replay of {stream} from {endpoint} (seq {from}..) failed: {e}"));
            false
        }
    };
    if !ok {
        c.replay_failures.fetch_add(1, Relaxed);
        sh.metrics.replay_failures.inc();
    }
    ReplayDone { join, stream, tracker }
}
