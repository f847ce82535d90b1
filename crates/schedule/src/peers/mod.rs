//! The peers' routing policies, reproduced from their specifications in
//! `../shared/research/peers-policies.md` and `dynamo-kv-router.md` (each module cites its
//! section), so kvroute's default can be measured against them on the same simulator, the
//! same trace and the same live fleet. Each is a scorer plugin registered by name; the named
//! profiles (a policy alone with `max-score-picker`) are in `kvroute-bench`'s policy list
//! and `kvroute serve --policy`.

pub mod aibrix;
pub mod dynamo;
pub mod llmd;
pub mod prodstack;
pub mod sglang;
mod tree;

pub use aibrix::{AibrixConfig, AibrixPrefixCache};
pub use dynamo::{Dynamo, DynamoConfig};
pub use llmd::{LlmdApproxConfig, LlmdApproxPrefix};
pub use prodstack::ProdstackPrefixAware;
pub use sglang::{CacheAwareConfig, Sglang, Smg};

/// Scores for a policy's choice: 1 for each pod in `picks` (the picker breaks ties), 0
/// elsewhere.
pub(crate) fn one_hot(n: usize, picks: &[usize]) -> Vec<f64> {
    (0..n).map(|i| if picks.contains(&i) { 1.0 } else { 0.0 }).collect()
}

/// Test pods `w0, w1, …` with these in-flight counts.
#[cfg(test)]
pub(crate) fn loaded(loads: &[u32]) -> Vec<crate::PodView> {
    loads
        .iter()
        .enumerate()
        .map(|(i, &l)| crate::PodView { name: format!("w{i}"), in_flight: l, ..Default::default() })
        .collect()
}
