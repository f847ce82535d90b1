//! Synthetic workloads of the suite that the trace readers and presets of [`crate::workload`]
//! do not cover: prefix groups with Zipf-skewed popularity (a few very hot system prompts),
//! bursty arrivals (gamma-distributed gaps with a chosen coefficient of variation) and mixed
//! short/long prompts. Deterministic for a seed.

use rand::{Rng, SeedableRng};

use crate::workload::{chain_keys, poisson_gap, span, SimRequest};

/// `requests` prompts, each a system prompt of one of `groups` groups drawn with Zipf
/// popularity (`P(rank k) ∝ 1/k^s`) plus a question of its own; Poisson arrivals at `qps`.
#[derive(Clone, Debug)]
pub struct ZipfGroups {
    pub groups: usize,
    pub requests: usize,
    pub zipf_s: f64,
    pub system: usize,
    pub question: usize,
    pub output: usize,
    pub qps: f64,
}

impl ZipfGroups {
    pub fn generate(&self, seed: u64, block_size: usize) -> Vec<SimRequest> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let weights: Vec<f64> = (1..=self.groups.max(1)).map(|k| 1.0 / (k as f64).powf(self.zipf_s)).collect();
        let total: f64 = weights.iter().sum();
        let mut t = 0.0;
        (0..self.requests)
            .map(|i| {
                t += poisson_gap(&mut rng, self.qps);
                let mut u = rng.random::<f64>() * total;
                let g = weights.iter().position(|w| {
                    u -= w;
                    u <= 0.0
                });
                let g = g.unwrap_or(weights.len() - 1) as u64;
                let tokens: Vec<u64> = span(0x7a69_0000 + g, self.system)
                    .chain(span(0x7a69_1000_0000 + i as u64, self.question))
                    .collect();
                SimRequest {
                    arrival_s: t,
                    keys: chain_keys(&tokens, block_size, seed),
                    prompt_tokens: tokens.len(),
                    output_tokens: self.output.max(1),
                    session: i as u64,
                }
            })
            .collect()
    }
}

/// A routing text for a request that has only block keys (the offline workloads), for the
/// peers' text-based policies: 4 characters per token (about what English tokenizes to),
/// each full block's characters derived from its key — so two requests share a text prefix
/// exactly as far as they share blocks — and the partial last block's from the request
/// itself.
pub fn routing_text(r: &SimRequest, block_size: usize) -> String {
    let chars_per_block = 4 * block_size.max(1);
    let mut s = String::with_capacity(4 * r.prompt_tokens);
    let mut push = |seed: u64, n: usize| {
        let hex = format!("{seed:016x}");
        s.extend(hex.chars().cycle().take(n));
    };
    for k in r.keys.iter() {
        push(*k, chars_per_block);
    }
    let tail = r.prompt_tokens.saturating_sub(r.keys.len() * block_size.max(1));
    push(r.session.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ r.arrival_s.to_bits(), 4 * tail);
    s
}

/// A gamma variate of shape `k` and scale 1 (Marsaglia–Tsang; `k < 1` by boosting).
fn gamma(rng: &mut rand::rngs::StdRng, k: f64) -> f64 {
    if k < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, k + 1.0) * u.powf(1.0 / k);
    }
    let d = k - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // A standard normal by Box–Muller.
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
        let x = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Re-times `reqs` (in order) with gamma-distributed gaps of the same mean rate and
/// coefficient of variation `cv` (1 = Poisson; ≥ 3 = bursts separated by lulls).
pub fn bursty(reqs: &mut [SimRequest], cv: f64, seed: u64) {
    let n = reqs.len();
    if n < 2 {
        return;
    }
    let mean = reqs[n - 1].arrival_s / (n - 1) as f64;
    let k = 1.0 / (cv * cv).max(1e-6);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xb0b5);
    let mut t = 0.0;
    for r in reqs.iter_mut() {
        r.arrival_s = t;
        t += gamma(&mut rng, k) * mean / k;
    }
}

/// Mixed short and long prompts sharing one system prompt: a `long_share` of the requests
/// are long (`long` prompt, `long_output`), the rest short; Poisson arrivals at `qps`.
#[derive(Clone, Debug)]
pub struct Mixed {
    pub requests: usize,
    pub system: usize,
    pub short: usize,
    pub short_output: usize,
    pub long: usize,
    pub long_output: usize,
    pub long_share: f64,
    pub qps: f64,
}

impl Mixed {
    pub fn generate(&self, seed: u64, block_size: usize) -> Vec<SimRequest> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6d69);
        let mut t = 0.0;
        (0..self.requests)
            .map(|i| {
                t += poisson_gap(&mut rng, self.qps);
                let long = rng.random::<f64>() < self.long_share;
                let (n, out) = if long { (self.long, self.long_output) } else { (self.short, self.short_output) };
                let tokens: Vec<u64> =
                    span(0x6d69_0000, self.system).chain(span(0x6d69_1000_0000 + i as u64, n)).collect();
                SimRequest {
                    arrival_s: t,
                    keys: chain_keys(&tokens, block_size, seed),
                    prompt_tokens: tokens.len(),
                    output_tokens: out.max(1),
                    session: i as u64,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cv(reqs: &[SimRequest]) -> f64 {
        let gaps: Vec<f64> = reqs.windows(2).map(|w| w[1].arrival_s - w[0].arrival_s).collect();
        let m = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - m).powi(2)).sum::<f64>() / gaps.len() as f64;
        var.sqrt() / m
    }

    #[test]
    fn zipf_popularity_makes_a_few_groups_hot_and_is_reproducible() {
        let z = ZipfGroups { groups: 50, requests: 4000, zipf_s: 1.2, system: 64, question: 32, output: 8, qps: 10.0 };
        let a = z.generate(7, 16);
        assert_eq!(a.len(), 4000);
        let mut count = std::collections::HashMap::new();
        for r in &a {
            *count.entry(r.keys[0]).or_insert(0) += 1;
        }
        let mut c: Vec<i32> = count.values().copied().collect();
        c.sort_unstable_by(|x, y| y.cmp(x));
        // Zipf 1.2 over 50 groups: the top group draws 1/H ≈ 29.5 %, the top 3 ≈ 50 %.
        assert!((1050..1300).contains(&c[0]) && c[0..3].iter().sum::<i32>() > 1850, "{:?}", &c[..5]);
        assert_eq!(a[17].keys, z.generate(7, 16)[17].keys);
        assert_eq!(a[0].keys.len(), 6, "96 tokens = 6 blocks");
    }

    #[test]
    fn bursty_arrivals_keep_the_rate_and_reach_the_coefficient_of_variation() {
        let z = ZipfGroups { groups: 4, requests: 20_000, zipf_s: 1.0, system: 16, question: 16, output: 1, qps: 5.0 };
        let mut r = z.generate(1, 16);
        let span_before = r.last().unwrap().arrival_s;
        assert!((cv(&r) - 1.0).abs() < 0.05, "Poisson: cv {}", cv(&r));
        bursty(&mut r, 3.0, 1);
        let c = cv(&r);
        assert!((2.7..3.3).contains(&c), "cv {c}");
        let span_after = r.last().unwrap().arrival_s;
        assert!((span_after / span_before - 1.0).abs() < 0.15, "{span_before} vs {span_after}");
    }

    #[test]
    fn routing_texts_share_a_prefix_exactly_as_far_as_the_blocks() {
        let z = ZipfGroups { groups: 1, requests: 2, zipf_s: 1.0, system: 64, question: 40, output: 1, qps: 1.0 };
        let r = z.generate(1, 16);
        let (a, b) = (routing_text(&r[0], 16), routing_text(&r[1], 16));
        assert_eq!((a.len(), b.len()), (4 * 104, 4 * 104));
        let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
        // 4 shared blocks (64 tokens) = 256 characters; the next characters differ.
        assert!((256..260).contains(&common), "{common}");
    }

    #[test]
    fn mixed_lengths_share_the_system_prompt() {
        let m = Mixed {
            requests: 1000,
            system: 32,
            short: 16,
            short_output: 4,
            long: 4096,
            long_output: 200,
            long_share: 0.2,
            qps: 5.0,
        };
        let r = m.generate(3, 16);
        let long = r.iter().filter(|x| x.prompt_tokens > 1000).count();
        assert!((150..250).contains(&long), "{long}");
        assert!(r.iter().all(|x| x.keys[..2] == r[0].keys[..2]));
    }
}
