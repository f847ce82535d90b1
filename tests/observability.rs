//! Dashboards and alerts as code (issue #18), checked against real parts:
//! `deploy/grafana/kvroute.json` and `deploy/prometheus/kvroute-rules.yaml`.
//!
//! * `promtool check rules` (Debian's `prometheus` package) passes on the rules;
//! * every metric name a panel, a template variable or a rule reads is one a running
//!   `kvroute serve` exports in `/metrics` (histograms' `_bucket/_sum/_count` count), or
//!   a recording rule's;
//! * a real Prometheus scrapes two running routers every second — one on the in-memory
//!   index in front of a P/D fleet of `kvroute sim`s (one prefill pod failing, so P/D
//!   fallbacks exist; a model `x` on a failing pod and a stalling one, so upstream errors,
//!   retries and timeouts exist), one on a real `redis-server` — and, after traffic, every
//!   panel query returns data (at least one finite sample), every rule evaluates without
//!   error, and killing Redis turns `KvrouteRedisDown` pending.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_ports, metric_sum, wait_healthy, words, Children};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rules_path() -> PathBuf {
    repo().join("deploy/prometheus/kvroute-rules.yaml")
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/kvroute.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A query of the dashboard: where it is (panel title or variable name) and its PromQL.
struct Query {
    from: String,
    expr: String,
}

/// Every panel target's expression, and every query variable's (`label_values(EXPR, L)`
/// is asked as `count by (L) (EXPR)`).
fn dashboard_queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {} has a target without expr", p["title"]));
            out.push(Query {
                from: format!("panel {:?} {}", p["title"].as_str().unwrap_or(""), t["refId"]),
                expr: expr.into(),
            });
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap();
        let inner = q.strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')).unwrap();
        let (expr, label) = inner.rsplit_once(',').unwrap();
        out.push(Query {
            from: format!("variable {}", v["name"]),
            expr: format!("count by ({}) ({expr})", label.trim()),
        });
    }
    out
}

/// Grafana's template variables as a test substitutes them: every pod and instance, a
/// one-minute rate window (the scrape interval here is 1 s).
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "5s")
        .replace("$__range", "5m")
        .replace("$instance", ".*")
        .replace("$pod", ".*")
}

/// (name, expression, is it an alert) of every rule.
fn rules() -> Vec<(String, String, bool)> {
    let y: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(rules_path()).unwrap()).unwrap();
    let mut out = Vec::new();
    for g in y["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let expr = r["expr"].as_str().unwrap().to_string();
            match (r["alert"].as_str(), r["record"].as_str()) {
                (Some(a), None) => out.push((a.to_string(), expr, true)),
                (None, Some(n)) => out.push((n.to_string(), expr, false)),
                _ => panic!("a rule needs exactly one of alert/record: {r:?}"),
            }
        }
    }
    out
}

const AGGREGATIONS: &[&str] =
    &["sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group"];

/// The metric names a PromQL expression reads: identifiers that are not functions,
/// aggregations, keywords, label names (in `{…}` and `by/without/on/ignoring/group_*
/// (…)`), durations or strings.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b: Vec<char> = expr.chars().collect();
    let (mut i, mut out) = (0, BTreeSet::new());
    let (mut label_list_next, mut in_label_list, mut skip_duration) = (false, false, false);
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < b.len() {
        let c = b[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' || c == '[' {
            let close = if c == '{' { '}' } else { ']' };
            while i < b.len() && b[i] != close {
                if b[i] == '"' {
                    i += 1;
                    while i < b.len() && b[i] != '"' {
                        i += if b[i] == '\\' { 2 } else { 1 };
                    }
                }
                i += 1;
            }
            i += 1;
        } else if c == '#' {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == '.' && b.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number (1, 0.95, 1e9) or a duration after `offset` (5m).
            while i < b.len() && (ident(b[i]) || b[i] == '.' || ((b[i] == '+' || b[i] == '-') && b[i - 1] == 'e')) {
                i += 1;
            }
            skip_duration = false;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word: String = b[start..i].iter().collect();
            let next = b[i..].iter().find(|c| !c.is_whitespace()).copied();
            let lower = word.to_ascii_lowercase();
            if in_label_list || std::mem::take(&mut skip_duration) {
                continue;
            }
            match lower.as_str() {
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right" => label_list_next = true,
                "offset" => skip_duration = true,
                "and" | "or" | "unless" | "bool" | "inf" | "nan" => {}
                _ if next == Some('(') || AGGREGATIONS.contains(&lower.as_str()) => {}
                _ => {
                    label_list_next = false;
                    out.insert(word);
                }
            }
        } else {
            if c == '(' && std::mem::take(&mut label_list_next) {
                in_label_list = true;
            } else if c == ')' {
                in_label_list = false;
            }
            i += 1;
        }
    }
    out
}

/// Names of the samples in a Prometheus text exposition.
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect()
}

/// (where, name) of every metric the dashboard or the rules read that is neither in
/// `exported` nor recorded by a rule.
fn unknown_metrics(queries: &[Query], rules: &[(String, String, bool)], exported: &BTreeSet<String>) -> Vec<String> {
    let recorded: BTreeSet<&str> = rules.iter().filter(|r| !r.2).map(|r| r.0.as_str()).collect();
    let uses = queries
        .iter()
        .map(|q| (q.from.clone(), q.expr.clone()))
        .chain(rules.iter().map(|(n, e, _)| (format!("rule {n}"), e.clone())));
    let mut missing = Vec::new();
    for (from, expr) in uses {
        for name in metric_names(&expr) {
            if !exported.contains(&name) && !recorded.contains(name.as_str()) {
                missing.push(format!("{from}: {name}"));
            }
        }
    }
    missing
}

#[test]
fn the_metric_name_parser_finds_names_and_the_check_reports_an_unknown_one() {
    let e = r#"sum by (pod, le) (rate(a_total{x="y",pod=~"$pod"}[5m])) / on(pod) group_left(role) b
        > 0.95 and c offset 5m unless histogram_quantile(0.9, d_bucket) * 1e9 or time() - max(e:rec)"#;
    let want: BTreeSet<String> = ["a_total", "b", "c", "d_bucket", "e:rec"].iter().map(|s| s.to_string()).collect();
    assert_eq!(metric_names(e), want);
    // The check itself: a panel naming a metric /metrics lacks is reported.
    let exported = exported_names("# TYPE a_total counter\na_total{x=\"1\"} 3\nd_bucket{le=\"+Inf\"} 1\n");
    let q = [Query { from: "panel p".into(), expr: "rate(a_total[1m]) + rate(a_totl[1m]) + d_bucket".into() }];
    let rules = [("e:rec".into(), "sum(a_total)".into(), false)];
    assert_eq!(unknown_metrics(&q, &rules, &exported), vec!["panel p: a_totl".to_string()]);
}

#[test]
fn promtool_accepts_the_rules() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(rules_path())
        .output()
        .unwrap_or_else(|e| panic!("\n\n*** promtool not found ({e}): apt-get install prometheus ***\n\n"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    let n = rules().len();
    assert!(text.contains(&format!("SUCCESS: {n} rules found")), "{text}");
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_on_a_datasource_variable_and_every_alert_is_documented() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "Grafana 10/11 schema");
    assert_eq!(d["uid"], "kvroute");
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"));
    assert!(vars.iter().any(|v| v["name"] == "pod" && v["type"] == "query"));
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id {}", p["id"]);
        // Panels must not overlap on the 24-column grid.
        let g = &p["gridPos"];
        let (x, y, w, h) = [&g["x"], &g["y"], &g["w"], &g["h"]].map(|v| v.as_u64().unwrap()).into();
        assert!(x + w <= 24, "panel {} is wider than the grid", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "panel {} overlaps another at ({cx},{cy})", p["title"]);
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {}", p["title"]);
        assert!(!p["description"].as_str().unwrap_or("").is_empty(), "panel {} has no description", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {}", p["title"]);
        }
    }
    // Every alert has a summary, a description and a `for:`; docs/observability.md explains each.
    let docs = std::fs::read_to_string(repo().join("docs/observability.md")).unwrap();
    let y: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(rules_path()).unwrap()).unwrap();
    for g in y["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let Some(name) = r["alert"].as_str() else { continue };
            assert!(r["for"].as_str().is_some(), "{name}: no `for:`");
            for a in ["summary", "description"] {
                assert!(r["annotations"][a].as_str().is_some_and(|s| !s.is_empty()), "{name}: no {a}");
            }
            assert!(docs.contains(&format!("`{name}`")), "docs/observability.md does not explain {name}");
        }
    }
}

/// The fleet the routers front, and the routers.
struct Fleet {
    kids: Children,
    /// Router A (in-memory index, P/D, models `m` and `x`) and router B (Redis index).
    a: u16,
    b: u16,
    redis: usize,
    /// A's decode pods, and the pods that never publish a KV event (the failing prefill
    /// pod, model x's).
    decode: [u16; 2],
    silent: [u16; 3],
}

/// A `kvroute sim` of model `model` without KV events, plus `extra`.
fn sim_without_events(port: u16, model: &str, extra: &[&str]) -> Child {
    let c = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["sim", "--port", &port.to_string(), "--model", model, "--speedup", "100"])
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&format!("http://127.0.0.1:{port}"));
    c
}

/// Waits for the router on `port` to answer `/ready` 200 (a pod probed up).
fn wait_ready(port: u16) {
    wait_healthy(&format!("http://127.0.0.1:{port}"));
    let t = Instant::now();
    while !ureq::get(&format!("http://127.0.0.1:{port}/ready")).call().is_ok_and(|r| r.status() == 200) {
        assert!(t.elapsed() < Duration::from_secs(15), "router on {port} not ready");
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn fleet(tag: &str) -> Fleet {
    let [p1, p2, d1, d2, x1, x2, zmq, a, b, rp] = free_ports(10).try_into().unwrap();
    let mut kids = Children(vec![kvroute_index_conformance::redis_server(rp)]);
    let redis = 0;
    // Model m: prefill pods (the second fails every request: P/D fallbacks) and decode pods.
    kids.0.push(common::sim(p1, zmq, &[]));
    kids.0.push(common::sim(p2, zmq, &["--failure-rate", "100"]));
    kids.0.push(common::sim(d1, zmq, &[]));
    kids.0.push(common::sim(d2, zmq, &["--num-gpu-blocks", "1234"]));
    // Model x: one pod failing every request, one whose streams stall before the first
    // token (first-byte timeouts).
    kids.0.push(sim_without_events(x1, "x", &["--failure-rate", "100"]));
    kids.0.push(sim_without_events(x2, "x", &["--stall-after-tokens", "0"]));
    let dir = std::env::temp_dir().join(format!("kvroute-obs-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let epp = repo().join("tests/fixtures/llmd/llmd-pd-prefix.yaml");
    let mut yaml = common::pd::role_backends(&[p1, p2], &[d1, d2]);
    for x in [x1, x2] {
        yaml.push_str(&format!("  - {{url: 'http://127.0.0.1:{x}'}}\n"));
    }
    yaml.push_str(&format!("scheduler_config: {}\n", epp.display()));
    let cfg = dir.join("serve.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let router = |port: u16, args: &[&str]| -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvroute"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--health-interval-ms", "200"]);
        cmd.args(["--block-size", "16", "--hash-algo", "sha256_cbor", "--hash-seed", "42"]);
        cmd.args(common::admin_args(port)).args(args);
        let c = cmd.env("RUST_LOG", "error").stdout(Stdio::null()).spawn().unwrap();
        wait_ready(port);
        c
    };
    let zmq_bind = format!("tcp://127.0.0.1:{zmq}");
    kids.0.push(router(
        a,
        &["--zmq-bind", &zmq_bind, "--config", cfg.to_str().unwrap(), "--upstream-first-byte-timeout-ms", "1500"],
    ));
    let redis_url = format!("redis://127.0.0.1:{rp}");
    let d1_url = format!("http://127.0.0.1:{d1}");
    kids.0.push(router(
        b,
        &["--no-zmq-bind", "--index-backend", "redis", "--redis-url", &redis_url, "--backend", &d1_url],
    ));
    Fleet { kids, a, b, redis, decode: [d1, d2], silent: [p2, x1, x2] }
}

/// POSTs a completion to router `port`: (status, pod).
fn complete(port: u16, body: Value) -> (u16, String) {
    match ureq::post(&format!("http://127.0.0.1:{port}/v1/completions"))
        .timeout(Duration::from_secs(30))
        .send_json(body)
    {
        Ok(r) => {
            let pod = r.header("x-kvroute-pod").unwrap_or_default().to_string();
            let _ = r.into_string();
            (200, pod)
        }
        Err(ureq::Error::Status(c, r)) => (c, r.header("x-kvroute-pod").unwrap_or_default().to_string()),
        Err(e) => panic!("{e}"),
    }
}

fn metrics_text(port: u16) -> String {
    ureq::get(&format!("{}/metrics", common::admin(&format!("http://127.0.0.1:{port}"))))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

/// Sends requests until `done` holds (at most `max` rounds of `send`).
fn until(what: &str, max: usize, mut send: impl FnMut(usize), done: impl Fn() -> bool) {
    for n in 0..max {
        if done() {
            return;
        }
        send(n);
    }
    assert!(done(), "{what}: not reached after {max} rounds");
}

impl Fleet {
    /// Traffic that makes every series the dashboard and rules read move: new and
    /// repeated prompts (misses, hits, P/D splits, one of whose prefill pods fails),
    /// streams with and without usage, and model `x` (errors, retries, timeouts). Each
    /// call moves every counter it watches again (rates need two samples apart).
    fn drive(&self, tag: &str) {
        let a = self.a;
        const WATCHED: [&str; 7] = [
            "kvroute_pd_requests_total{outcome=\"disaggregated\"}",
            "kvroute_pd_prefill_failures_total",
            "kvroute_upstream_errors_total",
            "kvroute_upstream_retries_total",
            "kvroute_upstream_timeouts_total",
            "kvroute_prefix_predicted_tokens_sum",
            "kvroute_prefix_cached_tokens_sum",
        ];
        let before = WATCHED.map(|n| metric_sum(&[a], n));
        let grew = |i: usize| metric_sum(&[a], WATCHED[i]) > before[i];
        let prompt = |n: usize| format!("{tag} {n} {}", words("obs", 120));
        until(
            "a P/D split and a prefill failure",
            40,
            |n| {
                let (s, pod) = complete(a, json!({"model": "m", "prompt": prompt(n), "max_tokens": 3}));
                assert_eq!(s, 200, "a prefill failure falls back to the decode pod");
                assert!(self.decode.iter().any(|d| pod == format!("127.0.0.1:{d}")), "served by {pod}");
            },
            || grew(0) && grew(1),
        );
        for n in 0..3 {
            // Repeats hit the decode pod's cache; streams, with and without usage.
            assert_eq!(complete(a, json!({"model": "m", "prompt": prompt(n), "max_tokens": 3})).0, 200);
            let mut body = json!({"model": "m", "prompt": prompt(n), "max_tokens": 3, "stream": true});
            if n % 2 == 0 {
                body["stream_options"] = json!({"include_usage": true});
            }
            assert_eq!(complete(a, body).0, 200);
        }
        // Repeats until the router predicted a cached prefix and an engine reported one
        // (the index learns of the first requests' blocks from their KV events).
        until(
            "a predicted and a reported cached prefix",
            40,
            |n| {
                std::thread::sleep(Duration::from_millis(50));
                assert_eq!(complete(a, json!({"model": "m", "prompt": prompt(n % 3), "max_tokens": 3})).0, 200);
            },
            || grew(5) && grew(6),
        );
        until(
            "an upstream error and a retry",
            20,
            |n| {
                complete(a, json!({"model": "x", "prompt": format!("x {tag} {n}"), "max_tokens": 2}));
            },
            || grew(2) && grew(3),
        );
        until(
            "a first-byte timeout",
            6,
            |n| {
                complete(a, json!({"model": "x", "prompt": format!("xs {tag} {n}"), "max_tokens": 2, "stream": true}));
            },
            || grew(4),
        );
        assert_eq!(complete(self.b, json!({"model": "m", "prompt": prompt(0), "max_tokens": 2})).0, 200);
    }

    /// Every sample name the two routers export.
    fn exported(&self) -> BTreeSet<String> {
        [self.a, self.b].iter().flat_map(|p| exported_names(&metrics_text(*p))).collect()
    }
}

#[test]
fn every_metric_the_dashboard_and_the_rules_read_is_exported() {
    let f = fleet("names");
    f.drive("names");
    let exported = f.exported();
    let missing = unknown_metrics(&dashboard_queries(&dashboard()), &rules(), &exported);
    assert!(missing.is_empty(), "metrics kvroute does not export:\n  {}", missing.join("\n  "));
}

/// The value of `name{pod="127.0.0.1:<port>"}` in a `/metrics` text.
fn pod_value(text: &str, name: &str, port: u16) -> Option<f64> {
    let head = format!("{name}{{pod=\"127.0.0.1:{port}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&head)?.parse().ok())
}

#[test]
fn per_pod_series_follow_the_pool_the_index_and_the_event_streams() {
    let f = fleet("pods");
    let (a, [d1, d2]) = (f.a, f.decode);
    // A new prompt, until its pod's events reach the router (a publisher that has just
    // connected can lose its first batch: ZMQ's slow joiner).
    let (mut pod, mut served) = (String::new(), 0);
    for n in 0..5 {
        let (s, p) = complete(a, json!({"model": "m", "prompt": words(&format!("pods{n}-"), 100), "max_tokens": 3}));
        assert_eq!(s, 200, "served by {p:?}");
        (pod, served) = (p.clone(), p.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0));
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3)
            && pod_value(&metrics_text(a), "kvroute_ingest_pod_last_event_timestamp_seconds", served).is_none()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pod_value(&metrics_text(a), "kvroute_ingest_pod_last_event_timestamp_seconds", served).is_some() {
            break;
        }
    }
    // The serving pod's KV events arrive: its last-event time is now, its index entries
    // are /v1/kv/pods' count; every pod's scraped capacity is the sim's num_gpu_blocks.
    let admin = common::admin(&format!("http://127.0.0.1:{a}"));
    eventually("the per-pod series", 20, || {
        let text = metrics_text(a);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let Some(last) = pod_value(&text, "kvroute_ingest_pod_last_event_timestamp_seconds", served) else {
            let ingest: Vec<&str> = text.lines().filter(|l| l.starts_with("kvroute_ingest_pod_messages")).collect();
            return Err(format!("no last event from {pod}; messages: {ingest:?}"));
        };
        if !(now - 30.0..=now + 1.0).contains(&last) {
            return Err(format!("last event at {last}, now {now}"));
        }
        let lag = pod_value(&text, "kvroute_ingest_pod_event_lag_seconds", served).ok_or("no lag")?;
        assert!(lag.abs() < 30.0, "lag {lag}");
        assert!(pod_value(&text, "kvroute_ingest_pod_messages_total", served).is_some_and(|n| n >= 1.0), "{text}");
        assert_eq!(pod_value(&text, "kvroute_ingest_pod_seq_gaps_total", served), Some(0.0));
        let pods: Value = ureq::get(&format!("{admin}/v1/kv/pods")).call().unwrap().into_json().unwrap();
        let blocks =
            pods["pods"].as_array().unwrap().iter().find(|p| p["pod"] == pod.as_str()).map(|p| p["blocks"].clone());
        let index = pod_value(&text, "kvroute_pod_index_blocks", served);
        if index.is_none_or(|n| n < 1.0) || blocks.as_ref().and_then(Value::as_f64) != index {
            return Err(format!("index blocks {index:?}, /v1/kv/pods {blocks:?}"));
        }
        if pod_value(&text, "kvroute_pod_kv_capacity_blocks", d2) != Some(1234.0) {
            return Err(format!("capacity of d2: {:?}", pod_value(&text, "kvroute_pod_kv_capacity_blocks", d2)));
        }
        for d in [d1, d2] {
            assert_eq!(pod_value(&text, "kvroute_pod_up", d), Some(1.0));
            assert_eq!(pod_value(&text, "kvroute_pod_saturated", d), Some(0.0));
            let usage = pod_value(&text, "kvroute_pod_kv_cache_usage_ratio", d).ok_or("no kv usage")?;
            assert!((0.0..=1.0).contains(&usage), "{usage}");
        }
        Ok(())
    });
    // A stream to model x's stalling pod waits for its first byte: queued and in flight
    // there (with its prompt as pending prefill) until the first-byte timeout, then nothing.
    let [_, x1, x2] = f.silent;
    let sum = |text: &str, name: &str| [x1, x2].iter().filter_map(|p| pod_value(text, name, *p)).sum::<f64>();
    let waiting = std::thread::spawn(move || {
        complete(a, json!({"model": "x", "prompt": words("wait", 50), "max_tokens": 2, "stream": true}));
    });
    eventually("a request queued on model x's stalling pod", 10, || {
        let text = metrics_text(a);
        let got = [sum(&text, "kvroute_pod_queued"), sum(&text, "kvroute_pod_in_flight")];
        let prefill = sum(&text, "kvroute_pod_pending_prefill_tokens");
        (got == [1.0, 1.0] && prefill >= 50.0)
            .then_some(())
            .ok_or(format!("queued, in flight {got:?}, prefill {prefill}"))
    });
    waiting.join().unwrap();
    let text = metrics_text(a);
    let after =
        ["kvroute_pod_queued", "kvroute_pod_in_flight", "kvroute_pod_pending_prefill_tokens"].map(|n| sum(&text, n));
    assert_eq!(after, [0.0; 3], "nothing left once the request ended");
}

/// A real Prometheus scraping `targets` every second and evaluating the rules every second.
fn prometheus(dir: &Path, port: u16, targets: &[String]) -> Child {
    let cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: kvroute\n    static_configs:\n      - targets: {}\n",
        rules_path().display(),
        serde_json::to_string(targets).unwrap()
    );
    std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("\n\n*** prometheus not found ({e}): apt-get install prometheus ***\n\n"));
    let t = Instant::now();
    while ureq::get(&format!("http://127.0.0.1:{port}/-/ready")).call().is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "prometheus not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// `/api/v1/query` → the result vector (panics on an error status).
fn query(prom: u16, expr: &str) -> Vec<Value> {
    let r: Value = match ureq::get(&format!("http://127.0.0.1:{prom}/api/v1/query")).query("query", expr).call() {
        Ok(r) => r.into_json().unwrap(),
        Err(ureq::Error::Status(_, r)) => r.into_json().unwrap(),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(r["status"], "success", "query {expr} failed: {r}");
    match &r["data"]["result"] {
        Value::Array(v) => v.clone(),
        scalar => vec![json!({"value": scalar.clone()})],
    }
}

fn finite(sample: &Value) -> bool {
    sample["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite)
}

fn eventually<T>(what: &str, secs: u64, mut f: impl FnMut() -> Result<T, String>) -> T {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if t.elapsed() > Duration::from_secs(secs) => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

#[test]
fn a_real_prometheus_answers_every_panel_and_evaluates_every_rule() {
    let mut f = fleet("prom");
    let prom_port = free_ports(1)[0];
    let dir = std::env::temp_dir().join(format!("kvroute-obs-{}-prom", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let targets: Vec<String> = [f.a, f.b].iter().map(|p| format!("127.0.0.1:{}", common::admin_port(*p))).collect();
    f.kids.0.push(prometheus(&dir, prom_port, &targets));
    eventually("both routers scraped", 20, || {
        let up = query(prom_port, "up == 1");
        (up.len() == 2).then_some(()).ok_or(format!("{up:?}"))
    });
    // Twice, a few scrapes apart: every series exists in Prometheus before it moves again.
    f.drive("prom-1");
    std::thread::sleep(Duration::from_millis(2500));
    f.drive("prom-2");
    // Every panel and variable query returns at least one finite sample once Prometheus
    // has scraped the traffic's effects a few times.
    let queries = dashboard_queries(&dashboard());
    eventually("every dashboard query returns data", 20, || {
        let empty: Vec<String> = queries
            .iter()
            .filter(|q| !query(prom_port, &substitute(&q.expr)).iter().any(finite))
            .map(|q| format!("{}: {}", q.from, q.expr))
            .collect();
        empty.is_empty().then_some(()).ok_or(format!("no data for:\n  {}", empty.join("\n  ")))
    });
    // Every rule evaluated, without error; every recording rule recorded something.
    let all = rules();
    eventually("every rule evaluates", 15, || {
        let r: Value =
            ureq::get(&format!("http://127.0.0.1:{prom_port}/api/v1/rules")).call().unwrap().into_json().unwrap();
        let loaded: Vec<&Value> =
            r["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
        if loaded.len() != all.len() {
            return Err(format!("{} rules loaded, {} in the file", loaded.len(), all.len()));
        }
        let bad: Vec<String> = loaded
            .iter()
            .filter(|l| l["health"] != "ok" || l["lastEvaluation"].as_str().is_none_or(|t| t.starts_with("0001")))
            .map(|l| format!("{} health {} {}", l["name"], l["health"], l["lastError"]))
            .collect();
        bad.is_empty().then_some(()).ok_or(bad.join("\n"))
    });
    for (name, expr, alert) in &all {
        let got = query(prom_port, expr);
        if !alert {
            assert!(got.iter().any(finite), "recording rule {name} has no finite value: {got:?}");
            let recorded = query(prom_port, name);
            assert!(!recorded.is_empty(), "{name} was not recorded");
        }
    }
    // No alert fires on a healthy fleet; Redis down makes KvrouteRedisDown pending.
    let alerts = |prom: u16| -> Vec<Value> {
        let r: Value =
            ureq::get(&format!("http://127.0.0.1:{prom}/api/v1/alerts")).call().unwrap().into_json().unwrap();
        r["data"]["alerts"].as_array().cloned().unwrap_or_default()
    };
    // The only one that may be pending is KvrouteNoEventsFromPod, and only for the pods
    // that really never publish (the failing prefill pod, model x's pods).
    let silent = f.silent.map(|p| format!("127.0.0.1:{p}"));
    for a in alerts(prom_port) {
        let (name, pod) = (a["labels"]["alertname"].as_str().unwrap_or(""), a["labels"]["pod"].as_str().unwrap_or(""));
        assert!(
            name == "KvrouteNoEventsFromPod" && a["state"] == "pending" && silent.iter().any(|s| s == pod),
            "alert on a healthy fleet: {a}"
        );
    }
    let redis = &mut f.kids.0[f.redis];
    let _ = redis.kill();
    let _ = redis.wait();
    eventually("KvrouteRedisDown pending", 15, || {
        let a = alerts(prom_port);
        a.iter()
            .any(|x| x["labels"]["alertname"] == "KvrouteRedisDown" && x["state"] == "pending")
            .then_some(())
            .ok_or(format!("{a:?}"))
    });
    let _ = std::fs::remove_dir_all(&dir);
}
