//! `kvroute simulate` with a disaggregated fleet, black-box: the command line, the report
//! and the JSON (the simulation itself is unit-tested in crates/bench/src/offline_pd.rs).

use std::process::Command;

fn kvroute(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvroute")).args(args).output().expect("run kvroute")
}

const WORKLOAD: [&str; 12] = [
    "simulate",
    "--groups",
    "4",
    "--prompts-per-group",
    "10",
    "--system-tokens",
    "4000",
    "--question-tokens",
    "1000",
    "--output-tokens",
    "20",
    "--qps=4",
];

#[test]
fn a_pd_fleet_runs_pd_policies_on_its_roles_and_the_others_aggregated() {
    let dir = std::env::temp_dir().join(format!("kvroute-simulate-pd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let mut args = WORKLOAD.to_vec();
    args.extend([
        "--prefill-servers",
        "1",
        "--decode-servers",
        "3",
        "--policies",
        "default,pd-always,pd-llmd:0,pd-kvroute",
        "--output-json",
        json.to_str().unwrap(),
    ]);
    let o = kvroute(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("1 prefill + 3 decode"), "{out}");
    assert!(out.contains("ITL p90 (ms)") && out.contains("| split |"), "{out}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["prefill_servers"], 1);
    let p = |name: &str| doc["policies"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone();
    assert_eq!(p("pd-always")["split_requests"], 40, "every request split");
    assert_eq!(p("pd-llmd:0")["split_requests"], 0);
    assert_eq!(p("default")["split_requests"], 0, "aggregated: no prefill servers");
    assert!(p("pd-always")["kv_transfer_tokens"].as_u64().unwrap() > 0);
    for name in ["default", "pd-always", "pd-kvroute"] {
        let itl = p(name)["itl_p90_s"].as_f64().unwrap();
        assert!((0.012..0.1).contains(&itl), "{name}: ITL p90 {itl}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_endpoint_picker_config_with_a_pd_handler_runs_on_the_pd_fleet() {
    // llm-d's P/D sample shape: prefix-based decider, nonCachedTokens 16.
    let yaml = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llmd/llmd-pd-prefix.yaml");
    let json = std::env::temp_dir().join(format!("kvroute-simulate-pd-config-{}.json", std::process::id()));
    let mut args = WORKLOAD.to_vec();
    let extra = ["--prefill-servers", "1", "--decode-servers", "3", "--policies", "default", "--config", yaml];
    args.extend(extra);
    args.extend(["--output-json", json.to_str().unwrap()]);
    let o = kvroute(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let p = |name: &str| doc["policies"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone();
    // Every prompt has ≥ 1000 new tokens: all split, so the config ran on the P/D fleet.
    assert_eq!(p("config")["split_requests"], 40);
    assert_eq!(p("default")["split_requests"], 0);
}

#[test]
fn pd_flags_are_checked() {
    let run = |extra: &[&str]| {
        let mut args = WORKLOAD.to_vec();
        args.extend(extra);
        let o = kvroute(&args);
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (ok, err) = run(&["--policies", "pd-always"]);
    assert!(!ok && err.contains("needs --prefill-servers"), "{err}");
    let (ok, err) = run(&["--prefill-servers", "2", "--decode-servers", "2", "--servers", "5"]);
    assert!(!ok && err.contains("--servers must equal"), "{err}");
    let (ok, err) = run(&["--prefill-servers", "2"]);
    assert!(!ok && err.contains("--decode-servers"), "{err}");
    let (ok, err) = run(&["--prefill-servers", "1", "--decode-servers", "1", "--engine", "per-request"]);
    assert!(!ok && err.contains("--engine continuous"), "{err}");
    let (ok, err) = run(&["--prefill-servers", "1", "--decode-servers", "1", "--policies", "pd-llmd:x"]);
    assert!(!ok && err.contains("token count"), "{err}");
}
