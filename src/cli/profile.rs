//! `kvroute serve`'s scheduling profile: an llm-d `EndpointPickerConfig` file
//! (`scheduler_config`), a built-in policy by name (`policy`: kvroute's default, baselines,
//! the peers' policies — `kvroute_schedule::NAMED`), or kvroute's default.

use anyhow::Context;
use kvroute_schedule::{Profile, SchedulerConfig};

use crate::config::{Explicit, ServeConfig};

/// The profile `cfg` names; an llm-d config's precise-prefix settings are applied to `cfg`
/// (checked against the explicit settings first).
pub fn load(cfg: &mut ServeConfig, explicit: impl FnOnce() -> anyhow::Result<Explicit>) -> anyhow::Result<Profile> {
    match (&cfg.scheduler_config, &cfg.policy) {
        (Some(_), Some(p)) => anyhow::bail!("scheduler_config and policy ({p}) both name a profile: give one"),
        (None, Some(p)) => {
            let profile = kvroute_schedule::named_profile(p)?;
            tracing::info!(policy = %p, "scheduling with a built-in policy");
            Ok(profile)
        }
        (Some(p), None) => {
            let p = p.clone();
            let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            let loaded = SchedulerConfig::load(&text).with_context(|| format!("in {}", p.display()))?;
            let file = p.display().to_string();
            for w in &loaded.warnings {
                tracing::warn!(config = %file, "{w}");
            }
            for n in &loaded.notes {
                tracing::info!(config = %file, "{n}");
            }
            for s in cfg.apply_epp(&loaded.settings, &explicit()?, &file)? {
                tracing::info!(config = %file, "applied {s}");
            }
            Ok(loaded.profile)
        }
        (None, None) => Ok(SchedulerConfig::default_profile()),
    }
}
