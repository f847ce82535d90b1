//! `kvroute serve --record-trace FILE …` (config file: `record:`): the routed traffic as a
//! Mooncake-style trace for `kvroute simulate --workload trace` (`kvroute_gateway::record`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use kvroute_gateway::record::{RecordConfig, Salt, TraceRecorder, DEFAULT_KEEP, DEFAULT_MAX_BYTES, DEFAULT_QUEUE};
use serde::{Deserialize, Serialize};

/// The `record:` section of serve's YAML configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordSection {
    /// Write the trace here; null = no recording.
    pub path: Option<PathBuf>,
    /// Rotate before the file would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` … `FILE.<keep>`).
    pub keep: usize,
    /// File with the secret the hash ids are keyed with (≥ 16 bytes); null = a random salt
    /// per process (its trace cannot be joined with any other, its own restarts included).
    pub salt_file: Option<PathBuf>,
    /// Entries queued for the writer before new ones are dropped.
    pub queue: usize,
}

impl Default for RecordSection {
    fn default() -> Self {
        Self { path: None, max_bytes: DEFAULT_MAX_BYTES, keep: DEFAULT_KEEP, salt_file: None, queue: DEFAULT_QUEUE }
    }
}

/// Traffic recording flags of `kvroute serve`.
#[derive(Args, Debug, Default)]
pub struct RecordArgs {
    /// Record every completed request to this file as a Mooncake-style JSONL trace for
    /// `kvroute simulate --workload trace --trace FILE --trace-block-size <--block-size>`:
    /// arrival time, prompt and output lengths, salted hash ids of the prompt's blocks —
    /// never its text (docs/observability.md); needs hit attribution [default: off].
    #[arg(long, value_name = "FILE")]
    record_trace: Option<PathBuf>,
    /// Rotate the trace file (FILE → FILE.1 → …) before it would grow past this many bytes
    /// [default: 268435456].
    #[arg(long, value_name = "BYTES")]
    record_trace_max_bytes: Option<u64>,
    /// Rotated trace files kept besides FILE; 0 = none [default: 4].
    #[arg(long, value_name = "N")]
    record_trace_keep: Option<usize>,
    /// File holding the secret (≥ 16 bytes) the trace's hash ids are keyed with: router
    /// replicas and restarts sharing it write joinable traces [default: a random salt per
    /// process, so two traces never share an id].
    #[arg(long, value_name = "FILE")]
    record_trace_salt_file: Option<PathBuf>,
}

impl RecordArgs {
    /// Flags over the file's `record:` section.
    pub fn apply(&self, c: &mut RecordSection) {
        if self.record_trace.is_some() {
            c.path = self.record_trace.clone();
        }
        if let Some(n) = self.record_trace_max_bytes {
            c.max_bytes = n;
        }
        if let Some(n) = self.record_trace_keep {
            c.keep = n;
        }
        if self.record_trace_salt_file.is_some() {
            c.salt_file = self.record_trace_salt_file.clone();
        }
    }
}

/// Starts the recorder `record:` asks for (nothing without a path) on `gateway`, its
/// counters on `registry`.
pub fn start(
    cfg: &crate::config::ServeConfig,
    registry: &prometheus::Registry,
    gateway: &mut kvroute_gateway::Gateway,
) -> anyhow::Result<()> {
    let c = &cfg.record;
    let Some(path) = &c.path else { return Ok(()) };
    anyhow::ensure!(c.max_bytes > 0, "record.max_bytes (--record-trace-max-bytes) must be at least 1");
    anyhow::ensure!(
        cfg.observability.hit_attribution,
        "--record-trace needs hit attribution (it records the engine's token counts): drop --no-hit-attribution / observability.hit_attribution: false"
    );
    let salt = match &c.salt_file {
        Some(f) => Salt::from_file(f).map_err(anyhow::Error::msg)?,
        None => {
            tracing::warn!(
                "--record-trace without --record-trace-salt-file: a random salt, so this trace cannot be joined with another replica's or a restart's"
            );
            Salt::random().context("cannot draw a random salt for --record-trace")?
        }
    };
    let block_size = cfg.hash.block_size;
    let rc = RecordConfig {
        max_bytes: c.max_bytes,
        keep: c.keep,
        queue: c.queue.max(1),
        ..RecordConfig::new(path.clone(), salt, block_size)
    };
    let rec = TraceRecorder::open(rc, registry).with_context(|| format!("cannot record to {}", path.display()))?;
    gateway.set_recorder(Arc::new(rec)).map_err(anyhow::Error::msg)?;
    tracing::info!(path = %path.display(), trace_block_size = block_size, "recording traffic");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_record_section() {
        let mut c: crate::config::ServeConfig =
            serde_yaml::from_str("record: {path: /tmp/a.jsonl, keep: 9, salt_file: /etc/salt}").unwrap();
        assert_eq!((c.record.keep, c.record.max_bytes), (9, DEFAULT_MAX_BYTES));
        let a = RecordArgs {
            record_trace: Some("/tmp/b.jsonl".into()),
            record_trace_max_bytes: Some(100),
            ..Default::default()
        };
        a.apply(&mut c.record);
        assert_eq!(c.record.path, Some(PathBuf::from("/tmp/b.jsonl")));
        assert_eq!((c.record.max_bytes, c.record.keep), (100, 9));
        assert_eq!(c.record.salt_file, Some(PathBuf::from("/etc/salt")));
        assert!(serde_yaml::from_str::<crate::config::ServeConfig>("record: {salt: x}").is_err());
        assert_eq!(crate::config::ServeConfig::default().record.path, None, "off by default");
    }
}
