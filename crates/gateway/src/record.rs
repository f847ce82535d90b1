//! `kvroute serve --record-trace FILE`: the routed traffic as a Mooncake-style JSONL trace
//! that `kvroute simulate --workload trace` replays.
//!
//! One line per completed request, in completion order:
//! `{"timestamp":<ms since the recorder opened>,"input_length":N,"output_length":M,"hash_ids":[…]}`.
//! `hash_ids` has one id per router block key (`--block-size` tokens; replay with
//! `--trace-block-size` equal to it), prefix-chained as the keys are: two requests share
//! their first `k` ids exactly when they share their first `k` blocks. An id is SipHash-2-4
//! of the key under a 128-bit secret (the salt), so ids from deployments with different
//! salts cannot be joined, and the prompt's text or tokens never reach the file.
//!
//! [`TraceRecorder::record`] never blocks: entries go through a bounded queue to a writer
//! thread, and an entry that finds the queue full is dropped and counted. The writer
//! drains the queue and flushes every 20 ms (never woken by a request), and rotates by size: `FILE` → `FILE.1` → … →
//! `FILE.<keep>` (the oldest is deleted). A file left by an earlier process is rotated away
//! at open, so each file holds one process's clock.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use prometheus::{IntCounter, Registry};
use sha2::{Digest, Sha256};
use siphasher::sip::SipHasher24;

/// Rotate once a file would grow past this many bytes.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// Rotated files kept besides the current one.
pub const DEFAULT_KEEP: usize = 4;
/// Entries queued for the writer before new ones are dropped.
pub const DEFAULT_QUEUE: usize = 65_536;
/// Shortest salt file accepted, bytes (after trailing whitespace).
pub const MIN_SALT_BYTES: usize = 16;

/// The 128-bit secret the hash ids are keyed with.
#[derive(Clone, PartialEq, Eq)]
pub struct Salt([u8; 16]);

impl std::fmt::Debug for Salt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Salt(…)")
    }
}

impl Salt {
    /// A fresh random salt (from the OS): this process's trace cannot be joined with any
    /// other's, including another replica's or its own after a restart.
    pub fn random() -> std::io::Result<Self> {
        let mut k = [0u8; 16];
        getrandom::fill(&mut k).map_err(|e| std::io::Error::other(format!("no OS randomness: {e}")))?;
        Ok(Self(k))
    }

    /// The salt derived from a secret's bytes (SHA-256, domain-separated, first 16 bytes).
    /// Trailing whitespace is ignored (`openssl rand -hex 32 > FILE` adds a newline); at
    /// least [`MIN_SALT_BYTES`] must remain.
    pub fn from_secret(secret: &[u8]) -> Result<Self, String> {
        let end = secret.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
        let s = &secret[..end];
        if s.len() < MIN_SALT_BYTES {
            return Err(format!("a salt needs at least {MIN_SALT_BYTES} bytes, got {}", s.len()));
        }
        let d = Sha256::new().chain_update(b"kvroute-record-salt-v1\0").chain_update(s).finalize();
        let mut k = [0u8; 16];
        k.copy_from_slice(&d[..16]);
        Ok(Self(k))
    }

    /// [`Salt::from_secret`] of a file's contents.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read salt file {}: {e}", path.display()))?;
        Self::from_secret(&bytes).map_err(|e| format!("salt file {}: {e}", path.display()))
    }

    /// The trace id of one block key.
    pub fn hash_id(&self, key: u64) -> u64 {
        let mut h = SipHasher24::new_with_key(&self.0);
        h.write(&key.to_le_bytes());
        h.finish()
    }
}

/// Where and how to record.
#[derive(Clone, Debug)]
pub struct RecordConfig {
    pub path: PathBuf,
    /// A file is rotated before it would grow past this (a single larger line still goes
    /// into a file of its own).
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` … `FILE.<keep>`); 0 = none (the file starts over).
    pub keep: usize,
    pub salt: Salt,
    /// Tokens per block key (the router's `--block-size`): replay with
    /// `--trace-block-size` this.
    pub block_tokens: usize,
    /// Entries queued for the writer before new ones are dropped.
    pub queue: usize,
}

impl RecordConfig {
    pub fn new(path: PathBuf, salt: Salt, block_tokens: usize) -> Self {
        Self { path, max_bytes: DEFAULT_MAX_BYTES, keep: DEFAULT_KEEP, salt, block_tokens, queue: DEFAULT_QUEUE }
    }
}

/// One completed request.
#[derive(Clone, Debug)]
pub struct TraceEntry {
    /// When the gateway received it.
    pub arrival: Instant,
    /// Prompt tokens (the engine's count when it reported one).
    pub input_length: u64,
    /// Generated tokens.
    pub output_length: u64,
    /// The router's chained block keys of the prompt.
    pub keys: Arc<[u64]>,
}

impl TraceEntry {
    /// A completed request as hit attribution saw it: the engine's token counts (the
    /// router's own prompt count when the engine reported none; output 0 then).
    pub fn completed(p: &crate::attribution::Prediction, u: &crate::attribution::Usage) -> Self {
        Self {
            arrival: p.started,
            input_length: u.prompt_tokens.unwrap_or(p.prompt_tokens),
            output_length: u.completion_tokens.unwrap_or(0),
            keys: p.keys.clone(),
        }
    }
}

impl crate::Gateway {
    /// Records every completed request (2xx, its body ended) to `rec`, from hit
    /// attribution's completion point ([`crate::attribution::Attribution::finish`]), which
    /// has the engine's usage. Needs hit attribution on, and the gateway not yet shared.
    pub fn set_recorder(&mut self, rec: Arc<TraceRecorder>) -> Result<(), String> {
        let a = Arc::get_mut(&mut self.attribution).ok_or("the gateway is already serving")?;
        if !a.enabled {
            return Err("recording needs hit attribution (it reads the engine's usage)".into());
        }
        a.sink = Some(Box::new(move |p, u| rec.record(TraceEntry::completed(p, u))));
        Ok(())
    }
}

enum Msg {
    Entry(TraceEntry),
    Flush(SyncSender<()>),
}

#[derive(Clone)]
struct RecordMetrics {
    entries: IntCounter,
    dropped: IntCounter,
    rotations: IntCounter,
    errors: IntCounter,
}

impl RecordMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let c = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            entries: c("kvroute_record_entries_total", "Requests written to the --record-trace file")?,
            dropped: c("kvroute_record_dropped_total", "Requests not recorded because the writer's queue was full")?,
            rotations: c("kvroute_record_rotations_total", "Size rotations of the --record-trace file")?,
            errors: c("kvroute_record_errors_total", "Failed writes, rotations or opens of the --record-trace file")?,
        })
    }
}

/// The recorder: [`TraceRecorder::record`] queues, a writer thread writes.
pub struct TraceRecorder {
    tx: SyncSender<Msg>,
    start: Instant,
    metrics: RecordMetrics,
    block_tokens: usize,
}

impl std::fmt::Debug for TraceRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceRecorder").field("block_tokens", &self.block_tokens).finish_non_exhaustive()
    }
}

impl TraceRecorder {
    /// Opens `cfg.path` (rotating away a file an earlier process left), registers the
    /// `kvroute_record_*` counters and starts the writer thread.
    pub fn open(cfg: RecordConfig, registry: &Registry) -> std::io::Result<Self> {
        let metrics = RecordMetrics::new(registry).map_err(std::io::Error::other)?;
        if std::fs::metadata(&cfg.path).is_ok_and(|m| m.len() > 0) {
            rotate(&cfg.path, cfg.keep)?;
        }
        let (file, size) = open_file(&cfg.path)?;
        let (tx, rx) = mpsc::sync_channel(cfg.queue.max(1));
        let start = Instant::now();
        let block_tokens = cfg.block_tokens;
        let writer =
            Writer { cfg, out: Some(std::io::BufWriter::new(file)), size, start, metrics: metrics.clone(), failing: 0 };
        std::thread::Builder::new().name("kvroute-record".into()).spawn(move || writer.run(rx))?;
        Ok(Self { tx, start, metrics, block_tokens })
    }

    /// Queues one completed request; never waits (a full queue drops it, counted in
    /// `kvroute_record_dropped_total`).
    pub fn record(&self, e: TraceEntry) {
        match self.tx.try_send(Msg::Entry(e)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.dropped.inc(),
            Err(TrySendError::Disconnected(_)) => self.metrics.errors.inc(),
        }
    }

    /// Waits until everything queued so far is written and flushed (tests, shutdown).
    pub fn flush(&self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv();
        }
    }

    /// When the trace's clock started (timestamps are ms since then).
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Tokens per hash id (replay with `--trace-block-size` this).
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }
}

/// Opens `path` for appending (a file reopened after a failure keeps what it had).
fn open_file(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let len = f.metadata()?.len();
    Ok((f, len))
}

/// `FILE.<keep-1>` → `FILE.<keep>`, …, `FILE` → `FILE.1` (`keep` 0: `FILE` is removed).
fn rotate(path: &Path, keep: usize) -> std::io::Result<()> {
    let numbered = |i: usize| {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{i}"));
        PathBuf::from(s)
    };
    if keep == 0 {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    for i in (1..keep).rev() {
        match std::fs::rename(numbered(i), numbered(i + 1)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, numbered(1))
}

struct Writer {
    cfg: RecordConfig,
    /// `None` after a failure: reopened with the next entry.
    out: Option<std::io::BufWriter<std::fs::File>>,
    size: u64,
    start: Instant,
    metrics: RecordMetrics,
    /// Failures since the last successful write.
    failing: u64,
}

/// How often the writer drains the queue and flushes the file.
const TICK: std::time::Duration = std::time::Duration::from_millis(20);

impl Writer {
    /// Drains the queue every [`TICK`] rather than blocking on it: a request handing over
    /// its entry never has to wake this thread (a futex call per request), and the file
    /// gets one write per tick, not one per entry.
    fn run(mut self, rx: Receiver<Msg>) {
        let mut line = String::with_capacity(4096);
        loop {
            let mut wrote = false;
            loop {
                match rx.try_recv() {
                    Ok(Msg::Entry(e)) => {
                        self.format(&e, &mut line);
                        self.write(line.as_bytes());
                        wrote = true;
                    }
                    Ok(Msg::Flush(ack)) => {
                        self.flush();
                        let _ = ack.try_send(());
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.flush();
                        return;
                    }
                }
            }
            // What was written reaches the file within a tick (the router may exit at
            // any time without tearing anything down).
            if wrote {
                self.flush();
            }
            std::thread::sleep(TICK);
        }
    }

    fn format(&self, e: &TraceEntry, line: &mut String) {
        use std::fmt::Write as _;
        line.clear();
        let ms = e.arrival.saturating_duration_since(self.start).as_millis();
        let _ = write!(
            line,
            "{{\"timestamp\":{ms},\"input_length\":{},\"output_length\":{},\"hash_ids\":[",
            e.input_length, e.output_length
        );
        for (i, k) in e.keys.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(line, "{sep}{}", self.cfg.salt.hash_id(*k));
        }
        line.push_str("]}\n");
    }

    fn write(&mut self, line: &[u8]) {
        let n = line.len() as u64;
        if self.size > 0 && self.size + n > self.cfg.max_bytes {
            self.flush();
            self.out = None;
            match rotate(&self.cfg.path, self.cfg.keep) {
                Ok(()) => self.metrics.rotations.inc(),
                Err(e) => self.fail("rotate", &e),
            }
            self.size = 0;
        }
        if self.out.is_none() {
            match open_file(&self.cfg.path) {
                Ok((f, len)) => (self.out, self.size) = (Some(std::io::BufWriter::new(f)), len),
                Err(e) => return self.fail("open", &e),
            }
        }
        let Some(out) = self.out.as_mut() else { return };
        match out.write_all(line) {
            Ok(()) => {
                self.size += n;
                self.metrics.entries.inc();
                if self.failing > 0 {
                    tracing::info!(path = %self.cfg.path.display(), failures = self.failing, "trace record: writing again");
                    self.failing = 0;
                }
            }
            Err(e) => {
                self.out = None;
                self.fail("write", &e);
            }
        }
    }

    fn flush(&mut self) {
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.flush() {
                self.out = None;
                self.fail("flush", &e);
            }
        }
    }

    /// Counts a failure; logs the first of a run of them (and how many there were once it
    /// ends), not one line per entry while the disk is full.
    fn fail(&mut self, what: &str, e: &std::io::Error) {
        self.metrics.errors.inc();
        if self.failing == 0 {
            tracing::warn!(path = %self.cfg.path.display(), "trace record: {what} failed: {e}");
        }
        self.failing += 1;
    }
}

#[cfg(test)]
#[path = "record_tests.rs"]
mod tests;
