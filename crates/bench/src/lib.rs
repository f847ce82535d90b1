//! # kvroute-bench — workloads and the offline fleet simulation
//!
//! Owns measuring routing policies: workload generators and trace readers
//! ([`workload`]), and [`offline::run`], a discrete-event simulation of a fleet on virtual
//! time that runs the real scheduler code (`kvroute-schedule` profiles, `kvroute-index`,
//! `kvroute-score`) against the simulator's block pool and latency model
//! (`kvroute-sim`), so an hour of trace takes seconds and policies compare side by side.

pub mod capacity;
pub mod offline;
pub mod offline_pd;
pub mod report;
pub mod suite;
pub mod synth;
pub mod workload;

use kvroute_schedule::{ConfigError, Profile};

/// Built-in policies by name: `kvroute_schedule::NAMED` (baselines, llm-d's guides and the
/// peers' policies; `kvroute serve --policy` takes the same names).
pub fn policy_names() -> String {
    kvroute_schedule::NAMED.iter().map(|n| n.0).collect::<Vec<_>>().join(", ")
}

/// The profile of a named policy.
pub fn policy(name: &str) -> Result<Profile, ConfigError> {
    kvroute_schedule::named_profile(name)
}
