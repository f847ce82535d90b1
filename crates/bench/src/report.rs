//! Reports of a comparison: a markdown table and SVG line charts (TTFT CDF per policy,
//! hit rate over time, per-server load over time). The charts are plain SVG written here
//! (axes, polylines, a legend): a few dozen lines, which keeps the build free of a
//! plotting stack and its font dependencies.

use std::fmt::Write;

use crate::offline::PolicyResult;

/// The markdown table of results.
pub fn markdown(results: &[PolicyResult]) -> String {
    let mut s = String::from(
        "| policy | hit rate (tokens) | hit rate (blocks) | busiest/mean requests | busiest/mean prefill | TTFT p50 / p90 / p99 (s) | TTFT mean (s) | ITL p90 (ms) | output tok/s | split | preemptions |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {:.1} % | {:.1} % | {:.2} | {:.2} | {:.3} / {:.3} / {:.3} | {:.3} | {:.1} | {:.0} | {:.0} % | {} |",
            r.name,
            100.0 * r.hit_rate_tokens,
            100.0 * r.hit_rate_blocks,
            r.busiest_over_mean_requests,
            r.busiest_over_mean_prefill_tokens,
            r.ttft_p50_s,
            r.ttft_p90_s,
            r.ttft_p99_s,
            r.ttft_mean_s,
            1e3 * r.itl_p90_s,
            r.output_tokens_per_s,
            100.0 * r.split_requests as f64 / r.requests.max(1) as f64,
            r.preemptions
        );
    }
    s
}

const COLORS: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

/// One series of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart as SVG. `log_x` plots x on a log₁₀ scale (x ≤ 0 dropped).
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series], log_x: bool) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 170.0, 40.0, 50.0);
    let fx = |x: f64| if log_x { x.max(1e-12).log10() } else { x };
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| !log_x || p.0 > 0.0);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(fx(x));
        x1 = x1.max(fx(x));
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() || !x1.is_finite() || !y1.is_finite() {
        (x0, x1, y1) = (0.0, 1.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| left + (fx(x) - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"#,
        (w - right + left) / 2.0,
        esc(title)
    );
    // Axes and ticks.
    let _ = writeln!(s, r#"<path d="M{left} {top} V{} H{}" stroke="black" fill="none"/>"#, h - bottom, w - right);
    for i in 0..=4 {
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let gx = x0 + (x1 - x0) * i as f64 / 4.0;
        let xv = if log_x { 10f64.powf(gx) } else { gx };
        let xpos = left + (gx - x0) / (x1 - x0) * (w - left - right);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>
<text x="{xpos}" y="{}" text-anchor="middle">{}</text>"##,
            w - right,
            left - 6.0,
            py(fy) + 4.0,
            num(fy),
            h - bottom + 16.0,
            num(xv),
            y = py(fy),
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (w - right + left) / 2.0,
        h - 12.0,
        esc(x_label),
        (h - bottom + top) / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let d: Vec<String> = se
            .points
            .iter()
            .filter(|p| !log_x || p.0 > 0.0)
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{}"/>"#, d.join(" "));
        let ly = top + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            w - right + 10.0,
            w - right + 30.0,
            w - right + 36.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The TTFT CDF of each policy (log-scaled seconds).
pub fn ttft_cdf(results: &[PolicyResult]) -> String {
    let series: Vec<Series> = results
        .iter()
        .map(|r| {
            let n = r.ttfts.len().max(1) as f64;
            let step = (r.ttfts.len() / 400).max(1);
            let mut points: Vec<(f64, f64)> =
                r.ttfts.iter().enumerate().step_by(step).map(|(i, &t)| (t, (i + 1) as f64 / n)).collect();
            if let Some(&last) = r.ttfts.last() {
                points.push((last, 1.0));
            }
            Series { label: r.name.clone(), points }
        })
        .collect();
    line_chart("TTFT CDF", "time to first token (s, log scale)", "fraction of requests", &series, true)
}

/// Prefix-cache hit rate (tokens) over time, per policy.
pub fn hit_rate_over_time(results: &[PolicyResult]) -> String {
    let series: Vec<Series> =
        results.iter().map(|r| Series { label: r.name.clone(), points: r.hit_rate_over_time.clone() }).collect();
    line_chart("Prefix-cache hit rate over time", "time (s)", "hit rate (tokens)", &series, false)
}

/// Requests in flight on each server over time, for one policy.
pub fn load_over_time(r: &PolicyResult) -> String {
    let servers = r.load_over_time.first().map_or(0, |x| x.1.len());
    let series: Vec<Series> = (0..servers)
        .map(|s| Series {
            label: format!("server-{s}"),
            points: r.load_over_time.iter().map(|(t, v)| (*t, v[s] as f64)).collect(),
        })
        .collect();
    line_chart(&format!("Requests in flight per server — {}", r.name), "time (s)", "in flight", &series, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg_with_one_line_per_series() {
        let s = line_chart(
            "t <1>",
            "x",
            "y",
            &[
                Series { label: "a".into(), points: vec![(0.1, 0.0), (1.0, 0.5), (10.0, 1.0)] },
                Series { label: "b&c".into(), points: vec![(0.2, 0.1)] },
            ],
            true,
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("t &lt;1&gt;") && s.contains("b&amp;c"));
        // Empty input still gives a valid chart.
        assert!(line_chart("e", "x", "y", &[], false).contains("</svg>"));
    }
}
