//! Capacity at an SLO: the highest arrival-rate scale at which a policy still meets a
//! latency SLO with ≥ 99 % of requests completed, found by bisection on a seeded workload,
//! and the fleet's physical upper bound (its token budget), so every figure reads as a
//! fraction of what is possible.

use std::collections::BTreeMap;

/// One latency objective: `metric <= limit` (seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct Objective {
    /// `ttft_p50`, `ttft_p90`, `ttft_p99`, `itl_p90`, …: a key of [`Measured::values`].
    pub metric: String,
    pub limit_s: f64,
}

/// A service-level objective: every objective holds and at least `min_completed` of the
/// requests complete.
#[derive(Clone, Debug, PartialEq)]
pub struct Slo {
    pub objectives: Vec<Objective>,
    pub min_completed: f64,
}

impl std::fmt::Display for Slo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> =
            self.objectives.iter().map(|o| format!("{} ≤ {}", o.metric, fmt_duration(o.limit_s))).collect();
        write!(f, "{}, ≥ {:.0} % completed", parts.join(", "), 100.0 * self.min_completed)
    }
}

fn fmt_duration(s: f64) -> String {
    if s < 1.0 {
        format!("{} ms", (s * 1e3 * 1e3).round() / 1e3)
    } else {
        format!("{s} s")
    }
}

impl std::str::FromStr for Slo {
    type Err = String;
    /// `ttft_p90<=2s,itl_p90<=100ms` (units `s`, `ms`, `us`; `completed>=0.99` sets the
    /// completion floor, default 0.99).
    fn from_str(text: &str) -> Result<Self, String> {
        let mut slo = Slo { objectives: vec![], min_completed: 0.99 };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((k, v)) = part.split_once(">=") {
                if k.trim() != "completed" {
                    return Err(format!("{part:?}: only `completed>=F` uses >="));
                }
                slo.min_completed = v.trim().parse().map_err(|_| format!("{part:?}: not a fraction"))?;
                continue;
            }
            let (k, v) = part.split_once("<=").ok_or_else(|| format!("{part:?}: expected METRIC<=LIMIT"))?;
            let v = v.trim();
            let split = v
                .find(|c: char| c.is_ascii_alphabetic())
                .ok_or_else(|| format!("{part:?}: limit needs a unit (s, ms, us)"))?;
            let (n, unit) = v.split_at(split);
            let n: f64 = n.trim().parse().map_err(|_| format!("{part:?}: {n:?} is not a number"))?;
            let limit_s = match unit {
                "s" => n,
                "ms" => n / 1e3,
                "us" | "µs" => n / 1e6,
                u => return Err(format!("{part:?}: unknown unit {u:?}")),
            };
            slo.objectives.push(Objective { metric: k.trim().to_string(), limit_s });
        }
        if slo.objectives.is_empty() {
            return Err("no objective (e.g. ttft_p90<=2s)".into());
        }
        Ok(slo)
    }
}

/// What one run at a scale measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    /// Latency figures by name, seconds.
    pub values: BTreeMap<String, f64>,
    /// Share of requests that completed.
    pub completed: f64,
}

impl Slo {
    /// Whether `m` meets the SLO (a metric the run did not measure fails it).
    pub fn met(&self, m: &Measured) -> bool {
        m.completed >= self.min_completed
            && self.objectives.iter().all(|o| m.values.get(&o.metric).is_some_and(|v| *v <= o.limit_s))
    }
}

/// The result of a capacity search.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Capacity {
    /// The highest scale that met the SLO (0 when even the lowest tried failed).
    pub met: f64,
    /// The lowest scale that failed it (`f64::INFINITY` when none failed).
    pub failed: f64,
    pub runs: usize,
    /// (scale, met) in the order run.
    pub tried: Vec<(f64, bool)>,
}

/// Bisects the arrival-rate scale: from `start`, doubles (or halves) until the SLO flips,
/// then bisects until `failed / met ≤ 1 + tolerance` or `max_runs` runs. `run(scale)` runs
/// the workload with arrivals `scale` times as dense.
pub fn find(start: f64, tolerance: f64, max_runs: usize, slo: &Slo, mut run: impl FnMut(f64) -> Measured) -> Capacity {
    let mut c = Capacity { met: 0.0, failed: f64::INFINITY, runs: 0, tried: vec![] };
    let mut test = |s: f64, c: &mut Capacity| {
        let ok = slo.met(&run(s));
        c.runs += 1;
        c.tried.push((s, ok));
        if ok {
            c.met = c.met.max(s);
        } else {
            c.failed = c.failed.min(s);
        }
        ok
    };
    let mut s = start.max(1e-6);
    if test(s, &mut c) {
        while c.failed.is_infinite() && c.runs < max_runs {
            s *= 2.0;
            test(s, &mut c);
        }
    } else {
        while c.met == 0.0 && c.runs < max_runs && s > 1e-6 {
            s /= 2.0;
            test(s, &mut c);
        }
    }
    while c.met > 0.0 && c.failed.is_finite() && c.failed / c.met > 1.0 + tolerance && c.runs < max_runs {
        let mid = (c.met * c.failed).sqrt();
        test(mid, &mut c);
    }
    c
}

/// The fleet's token budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub servers: usize,
    /// GPU seconds per prompt token computed (batched prefill).
    pub prefill_s_per_token: f64,
    /// GPU seconds per output token at full batch (`inter_token × load_factor ÷ max_num_seqs`).
    pub decode_s_per_token: f64,
}

/// The highest arrival-rate scale the fleet could sustain at all: the work of the workload
/// (its prompt tokens not served from cache at hit rate `hit_rate`, and its output tokens)
/// equals the fleet's GPU time over the scaled trace (`span_s ÷ scale`). A finite trace can
/// be served a little above it when a percentile SLO ignores the backlog's last requests.
pub fn upper_bound(b: &Budget, prompt_tokens: f64, output_tokens: f64, hit_rate: f64, span_s: f64) -> f64 {
    let work =
        prompt_tokens * (1.0 - hit_rate.clamp(0.0, 1.0)) * b.prefill_s_per_token + output_tokens * b.decode_s_per_token;
    if work <= 0.0 {
        return f64::INFINITY;
    }
    b.servers as f64 * span_s / work
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slos_parse_with_units_and_a_completion_floor() {
        let s: Slo = "ttft_p90<=2s, itl_p90<=100ms".parse().unwrap();
        assert_eq!(
            s.objectives,
            vec![
                Objective { metric: "ttft_p90".into(), limit_s: 2.0 },
                Objective { metric: "itl_p90".into(), limit_s: 0.1 }
            ]
        );
        assert_eq!(s.min_completed, 0.99);
        assert_eq!("ttft_p99<=500us,completed>=0.95".parse::<Slo>().unwrap().min_completed, 0.95);
        for bad in ["", "ttft_p90<2s", "ttft_p90<=2", "ttft_p90<=2h", "x>=1"] {
            assert!(bad.parse::<Slo>().is_err(), "{bad}");
        }
        assert_eq!(s.to_string(), "ttft_p90 ≤ 2 s, itl_p90 ≤ 100 ms, ≥ 99 % completed");
    }

    fn fleet(capacity: f64) -> impl FnMut(f64) -> Measured {
        // TTFT grows without bound as the scale nears the capacity.
        move |s| {
            let rho = s / capacity;
            let ttft = if rho < 1.0 { 0.1 / (1.0 - rho) } else { 1e9 };
            Measured { values: BTreeMap::from([("ttft_p90".to_string(), ttft)]), completed: 1.0 }
        }
    }

    #[test]
    fn bisection_brackets_the_capacity_from_above_and_below() {
        let slo: Slo = "ttft_p90<=1s".parse().unwrap();
        // TTFT = 1 s at rho = 0.9: capacity 0.9 × 6 = 5.4.
        let c = find(1.0, 0.02, 30, &slo, fleet(6.0));
        assert!(c.met <= 5.4 && c.failed > 5.4 && c.failed / c.met <= 1.02, "{c:?}");
        assert!(c.runs < 15, "{c:?}");
        // Starting above the capacity halves first.
        let c = find(100.0, 0.02, 30, &slo, fleet(6.0));
        assert!(c.met <= 5.4 && c.failed > 5.4 && c.failed / c.met <= 1.02, "{c:?}");
        // Too few completions fail however fast.
        let c = find(1.0, 0.02, 6, &slo, |_| Measured { completed: 0.5, ..Default::default() });
        assert_eq!((c.met, c.runs), (0.0, 6));
    }

    #[test]
    fn the_upper_bound_is_the_fleet_time_over_the_work() {
        let b = Budget { servers: 4, prefill_s_per_token: 1e-4, decode_s_per_token: 1e-3 };
        // 10 s trace; 100 k prompt tokens at 50 % hits = 5 s; 5 k output tokens = 5 s → 10 s
        // of work; 4 servers × 10 s → scale 4.
        assert!((upper_bound(&b, 100_000.0, 5_000.0, 0.5, 10.0) - 4.0).abs() < 1e-9);
    }
}
