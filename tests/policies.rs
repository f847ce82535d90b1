//! Black-box tests: `kvroute serve --policy NAME` runs the peers' policies on live traffic
//! (real `kvroute sim`s, real HTTP), so they can be A/B-tested against kvroute's default.

mod common;

use std::process::{Command, Stdio};

use common::{free_ports, words, Children};
use serde_json::{json, Value};

fn complete(router: &str, prompt: &str) -> String {
    let r = ureq::post(&format!("{router}/v1/completions"))
        .send_json(json!({"model": "m", "prompt": prompt, "max_tokens": 2}))
        .unwrap();
    r.header("x-kvroute-pod").unwrap_or_default().to_string()
}

#[test]
fn each_peer_policy_routes_live_traffic_and_keeps_a_shared_prefix_on_its_pod() {
    for policy in ["dynamo", "dynamo-approx", "sglang", "smg", "aibrix", "prodstack", "llm-d-approx"] {
        let [rp, zp, a, b, c] = free_ports(5).try_into().unwrap();
        let mut kids = Children([a, b, c].iter().map(|p| common::sim(*p, zp, &[])).collect());
        kids.0.push(common::serve(rp, zp, &[a, b, c], &["--policy", policy]));
        let router = format!("http://127.0.0.1:{rp}");
        let explain: Value = ureq::post(&format!("{}/v1/route/explain", common::admin(&router)))
            .send_json(json!({"model": "m", "prompt": "hello"}))
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(explain["profile"], policy, "{explain}");
        let system = words(&format!("{policy}sys"), 120);
        let first = complete(&router, &format!("{system} first question"));
        std::thread::sleep(std::time::Duration::from_millis(100));
        for q in ["second", "third"] {
            assert_eq!(complete(&router, &format!("{system} {q} question")), first, "{policy}: the prefix moved");
        }
    }
}

#[test]
fn a_policy_and_a_scheduler_config_together_or_an_unknown_policy_refuse_to_start() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kvroute"))
            .args(["serve", "--listen", "127.0.0.1:0", "--backend", "http://127.0.0.1:9"])
            .args(common::admin_args(free_ports(1)[0]))
            .args(args)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["--policy", "nope"]);
    assert!(e.contains("policy nope") && e.contains("sglang") && e.contains("dynamo"), "{e}");
    let cfg = std::env::temp_dir().join(format!("kvroute-policies-{}.yaml", std::process::id()));
    std::fs::write(
        &cfg,
        "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: x, plugins: [{pluginRef: queue-scorer}]}]\n",
    )
    .unwrap();
    let e = run(&["--policy", "sglang", "--scheduler-config", cfg.to_str().unwrap()]);
    assert!(e.contains("give one"), "{e}");
}
