//! Pickers: choose one pod from the weighted totals.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

use crate::Picker;

pub(crate) struct MaxScorePicker {
    pub(crate) rng: Mutex<rand::rngs::StdRng>,
}
impl Picker for MaxScorePicker {
    fn name(&self) -> &str {
        "max-score-picker"
    }
    fn reseed(&self, seed: u64) {
        *self.rng.lock() = rand::rngs::StdRng::seed_from_u64(seed);
    }
    fn pick(&self, scores: &[f64]) -> Option<usize> {
        max_score(&mut self.rng.lock(), scores)
    }
    fn peek(&self, scores: &[f64]) -> Option<usize> {
        let mut rng = self.rng.lock().clone();
        max_score(&mut rng, scores)
    }
}

fn max_score(rng: &mut rand::rngs::StdRng, scores: &[f64]) -> Option<usize> {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let best: Vec<usize> = (0..scores.len()).filter(|&i| scores[i] >= max - 1e-9).collect();
    (!best.is_empty()).then(|| best[rng.random_range(0..best.len())])
}

pub(crate) struct RandomPicker {
    pub(crate) rng: Mutex<rand::rngs::StdRng>,
    pub(crate) weighted: bool,
}
impl Picker for RandomPicker {
    fn name(&self) -> &str {
        if self.weighted {
            "weighted-random-picker"
        } else {
            "random-picker"
        }
    }
    fn reseed(&self, seed: u64) {
        *self.rng.lock() = rand::rngs::StdRng::seed_from_u64(seed);
    }
    fn pick(&self, scores: &[f64]) -> Option<usize> {
        self.choose(&mut self.rng.lock(), scores)
    }
    fn peek(&self, scores: &[f64]) -> Option<usize> {
        let mut rng = self.rng.lock().clone();
        self.choose(&mut rng, scores)
    }
}
impl RandomPicker {
    fn choose(&self, rng: &mut rand::rngs::StdRng, scores: &[f64]) -> Option<usize> {
        if scores.is_empty() {
            return None;
        }
        let total: f64 = scores.iter().map(|s| s.max(0.0)).sum();
        if !self.weighted || total <= 0.0 {
            return Some(rng.random_range(0..scores.len()));
        }
        let mut x = rng.random_range(0.0..total);
        for (i, s) in scores.iter().enumerate() {
            x -= s.max(0.0);
            if x <= 0.0 {
                return Some(i);
            }
        }
        Some(scores.len() - 1)
    }
}

#[derive(Default)]
pub(crate) struct RoundRobinPicker {
    next: AtomicUsize,
}
impl Picker for RoundRobinPicker {
    fn name(&self) -> &str {
        "round-robin-picker"
    }
    fn pick(&self, scores: &[f64]) -> Option<usize> {
        (!scores.is_empty()).then(|| self.next.fetch_add(1, Relaxed) % scores.len())
    }
    fn peek(&self, scores: &[f64]) -> Option<usize> {
        (!scores.is_empty()).then(|| self.next.load(Relaxed) % scores.len())
    }
}

pub(crate) fn seeded() -> Mutex<rand::rngs::StdRng> {
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7);
    Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))
}
