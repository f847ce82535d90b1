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

use kvroute_schedule::{ConfigError, Profile, SchedulerConfig};

/// Built-in policies by name.
pub const POLICIES: &str = "round-robin, random, default, llm-d, approximate, load-only, session-affinity";

/// The profile of a named policy.
pub fn policy(name: &str) -> Result<Profile, ConfigError> {
    let yaml = |plugins: &[(&str, f64)], picker: &str| {
        let mut s = String::from("plugins:\n");
        for (p, _) in plugins {
            s += &format!("- type: {p}\n");
        }
        s += &format!("- type: {picker}\nschedulingProfiles:\n- name: p\n  plugins:\n");
        for (p, w) in plugins {
            s += &format!("  - pluginRef: {p}\n    weight: {w}\n");
        }
        s += &format!("  - pluginRef: {picker}\n");
        SchedulerConfig::from_yaml(&s)
    };
    match name {
        "round-robin" => Ok(SchedulerConfig::round_robin()),
        "default" => Ok(SchedulerConfig::default_profile()),
        "random" => yaml(&[], "random-picker"),
        // llm-d's precise-prefix guide: prefix 3, kv-util 2, queue 2, no-hit-lru 2.
        "llm-d" => yaml(
            &[
                ("precise-prefix-cache-scorer", 3.0),
                ("kv-cache-utilization-scorer", 2.0),
                ("queue-scorer", 2.0),
                ("no-hit-lru-scorer", 2.0),
            ],
            "max-score-picker",
        ),
        // llm-d's approximate (router-side) prefix scorer, no KV events.
        "approximate" => yaml(
            &[("prefix-cache-scorer", 3.0), ("kv-cache-utilization-scorer", 2.0), ("queue-scorer", 2.0)],
            "max-score-picker",
        ),
        "load-only" => yaml(&[("queue-scorer", 1.0), ("kv-cache-utilization-scorer", 1.0)], "max-score-picker"),
        "session-affinity" => yaml(&[("session-affinity-scorer", 3.0), ("queue-scorer", 1.0)], "max-score-picker"),
        other => Err(ConfigError::UnknownPlugin(format!("policy {other} (policies: {POLICIES})"))),
    }
}
