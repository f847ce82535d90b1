//! `kvroute serve`'s observability flags: log format, hit attribution, recent decisions
//! (the `observability:` section of the config file; docs/observability.md).

use clap::Args;

use crate::config::{LogFormat, ObservabilitySection};

#[derive(Args, Debug, Default)]
pub struct ObserveArgs {
    /// Log lines on stderr as text or as JSON objects, one per line; each routing decision
    /// is a `debug` line (RUST_LOG=kvroute_gateway=debug) with its request id, pick,
    /// predicted tokens and reason [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Turn hit attribution off: no `stream_options.include_usage` added to streaming
    /// requests, no usage read from responses, no `kvroute_prefix_*` counts [default: on].
    #[arg(long)]
    no_hit_attribution: bool,
    /// Requests kept for the admin view `GET /v1/route/recent` (0 = none) [default: 256].
    #[arg(long, value_name = "N")]
    recent_decisions: Option<usize>,
}

impl ObserveArgs {
    pub fn apply(&self, c: &mut ObservabilitySection) {
        if let Some(f) = self.log_format {
            c.log_format = f;
        }
        if self.no_hit_attribution {
            c.hit_attribution = false;
        }
        if let Some(n) = self.recent_decisions {
            c.recent_decisions = n;
        }
    }
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`).
pub fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(false).init(),
    }
}
