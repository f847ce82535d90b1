//! Interning of pod names and tier names, and per-tier score weights.

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::entry::{PodId, TierId, MAX_PODS, MAX_TIERS};
use crate::IndexError;

/// Pod names (e.g. `10.0.0.1:8000`, or `10.0.0.1:8000@dp1` per data-parallel rank) ↔ ids.
#[derive(Default)]
pub struct Pods {
    inner: RwLock<(HashMap<String, PodId>, Vec<String>)>,
}

impl Pods {
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of `name`, interning it on first sight.
    pub fn intern(&self, name: &str) -> Result<PodId, IndexError> {
        if let Some(&id) = self.inner.read().0.get(name) {
            return Ok(id);
        }
        let mut w = self.inner.write();
        if let Some(&id) = w.0.get(name) {
            return Ok(id);
        }
        if w.1.len() >= MAX_PODS {
            return Err(IndexError::TooManyPods);
        }
        let id = w.1.len() as PodId;
        w.0.insert(name.to_string(), id);
        w.1.push(name.to_string());
        Ok(id)
    }

    pub fn get(&self, name: &str) -> Option<PodId> {
        self.inner.read().0.get(name).copied()
    }

    pub fn name(&self, id: PodId) -> Option<String> {
        self.inner.read().1.get(id as usize).cloned()
    }

    pub fn len(&self) -> usize {
        self.inner.read().1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Cache tiers and their weights in scoring. `gpu` (id 0, weight 1.0) and `cpu` (id 1,
/// weight 0.8) always exist, as in llm-d; other media named by events are added with
/// weight 1.0. Names are lower-cased (`"GPU"` in events is `gpu`).
pub struct Tiers {
    inner: RwLock<Vec<(String, f64)>>,
}

impl Default for Tiers {
    fn default() -> Self {
        Self { inner: RwLock::new(vec![("gpu".into(), 1.0), ("cpu".into(), 0.8)]) }
    }
}

impl Tiers {
    pub const GPU: TierId = 0;
    pub const CPU: TierId = 1;

    /// The id of a medium as events name it (`None` = GPU). Beyond 16 tiers, unknown
    /// media share the last one.
    pub fn intern(&self, medium: Option<&str>) -> TierId {
        let Some(m) = medium else { return Self::GPU };
        let lower = m.to_ascii_lowercase();
        if let Some(i) = self.inner.read().iter().position(|(n, _)| *n == lower) {
            return i as TierId;
        }
        let mut w = self.inner.write();
        if let Some(i) = w.iter().position(|(n, _)| *n == lower) {
            return i as TierId;
        }
        if w.len() >= MAX_TIERS {
            return (MAX_TIERS - 1) as TierId;
        }
        w.push((lower, 1.0));
        (w.len() - 1) as TierId
    }

    /// Sets a tier's weight (creating the tier).
    pub fn set_weight(&self, name: &str, weight: f64) {
        let id = self.intern(Some(name));
        self.inner.write()[id as usize].1 = weight;
    }

    /// Weights indexed by tier id (for the scorer's inner loop).
    pub fn weights(&self) -> [f64; MAX_TIERS] {
        let mut w = [1.0; MAX_TIERS];
        for (i, (_, x)) in self.inner.read().iter().enumerate() {
            w[i] = *x;
        }
        w
    }

    pub fn name(&self, id: TierId) -> String {
        self.inner.read().get(id as usize).map(|t| t.0.clone()).unwrap_or_default()
    }
}
