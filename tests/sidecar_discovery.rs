//! Black-box test: `kvroute sidecar --pool-name` takes its SSRF allow-list from the
//! InferencePool (llm-d's `--enable-ssrf-protection` with the pool), against a real
//! kube-apiserver (`common::kube`, RBAC on, the sidecar running with exactly the Role in
//! `deploy/kubernetes/base/role.yaml`). Pod IPs are loopback addresses (127.0.0.x); the
//! test plays the kubelet (podIP, `Ready`). A prefill target is allowed while it is a
//! Ready endpoint of the pool; a pod outside the pool gets 403 and no connection (a test
//! listener at its address proves it); a pod that leaves the pool is refused from then on;
//! until the pool's first listing, targets are answered 503, while `--prefill-allow`
//! entries work throughout.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::kube::{Auth, Kube};
use common::{free_ports, metric_sum, wait_for, wait_healthy, words, Children};
use serde_json::{json, Value};

const NS: &str = "default";

fn pool_yaml(port: u16) -> String {
    format!(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata:\n  name: vllm-prefill\n  \
         namespace: {NS}\nspec:\n  selector:\n    matchLabels:\n      app: vllm-prefill\n  targetPorts:\n  - number: \
         {port}\n  endpointPickerRef:\n    name: kvroute-epp\n    port:\n      number: 9002\n"
    )
}

/// POSTs a completion naming `prefiller`: status, `retry-after`, body.
fn post(side: u16, prefiller: &str, tag: &str) -> (u16, Option<String>, String) {
    let body = json!({"model": "m", "prompt": words(tag, 100), "max_tokens": 2});
    let r = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build()
        .post(&format!("http://127.0.0.1:{side}/v1/completions"))
        .set("x-prefiller-host-port", prefiller)
        .send_json(body);
    match r {
        Ok(r) | Err(ureq::Error::Status(_, r)) => {
            let retry = r.header("retry-after").map(str::to_string);
            (r.status(), retry, r.into_string().unwrap_or_default())
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn prefill_targets_are_allowed_while_they_are_ready_endpoints_of_the_pool() {
    let mut kube = Kube::start_with(Auth::Rbac);
    kube.install_crds();
    let role =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/base/role.yaml")).unwrap();
    kube.kubectl_stdin(&["apply", "-n", NS, "-f", "-"], Some(&role)).unwrap();
    let kubeconfig = kube.kubeconfig_for_token(&kube.service_account_token(NS, "kvroute"), NS);
    // `port` is every pod's serving port (one per pod IP, as in a cluster).
    let [port, dec, side, zmq, dead] = free_ports(5).try_into().unwrap();
    let (member, outsider) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    let kv = json!({"enable_kv_cache_events": true, "publisher": "zmq",
        "endpoint": format!("tcp://127.0.0.1:{zmq}"), "topic": format!("kv@{member}@m")});
    let mut kids = Children(vec![common::sim_at("127.0.0.2", port, 16, &kv, &[]), common::sim(dec, zmq, &[])]);
    // The pod outside the pool: a listener that must never see a connection.
    let trap = TcpListener::bind(("127.0.0.3", port)).unwrap();
    trap.set_nonblocking(true).unwrap();
    kube.apply(&pool_yaml(port));
    kube.create_pod(NS, "prefill-a", &[("app", "vllm-prefill")], &[]);
    kube.set_pod_status(NS, "prefill-a", Some("127.0.0.2"), true);
    kube.create_pod(NS, "other", &[("app", "other")], &[]);
    kube.set_pod_status(NS, "other", Some("127.0.0.3"), true);

    // The sidecar starts while the API server is down.
    kube.stop_apiserver();
    let static_entry = format!("127.0.0.1:{dead}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    cmd.args(["sidecar", "--port", &side.to_string(), "--vllm-port", &dec.to_string()])
        .args(["--pool-name", "vllm-prefill", "--pool-namespace", NS, "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--prefill-allow", &static_entry, "--prefill-timeout-ms", "3000"]);
    kids.0.push(cmd.env("RUST_LOG", "warn").stdout(Stdio::null()).spawn().unwrap());
    wait_healthy(&format!("http://127.0.0.1:{side}"));
    // The pool pod's prompt tokens (its sim listens on 127.0.0.2 only).
    let prefilled = || {
        let text = ureq::get(&format!("http://{member}/metrics")).call().unwrap().into_string().unwrap();
        text.lines()
            .filter(|l| l.starts_with("vllm:prompt_tokens_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };

    // Not listed yet: a pool target cannot be checked (503, retry); a static entry can
    // (nothing listens there: the prefill fails and the request is decoded alone).
    let (status, retry, text) = post(side, &member, "early");
    assert_eq!((status, retry.as_deref()), (503, Some("1")), "{text}");
    assert!(text.contains("has not been listed"), "{text}");
    assert_eq!(prefilled(), 0.0);
    let (status, _, text) = post(side, &static_entry, "static");
    assert_eq!(status, 200, "a --prefill-allow entry is allowed before the listing: {text}");
    assert_eq!(metric_sum(&[side], "kvroute_pd_requests_total{outcome=\"fallback\"}"), 1.0);

    // The pool is listed (under the least-privilege Role): its Ready pod is allowed.
    kube.start_apiserver();
    wait_for(Duration::from_secs(30), "the pool listed", || metric_sum(&[side], "kvroute_discovery_synced") == 1.0);
    let (status, _, text) = post(side, &member, "member");
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(prefilled(), v["usage"]["prompt_tokens"].as_f64().unwrap(), "the pool's pod prefilled the prompt");
    assert_eq!(metric_sum(&[side], "kvroute_pd_requests_total{outcome=\"disaggregated\"}"), 1.0);

    // A Ready pod with other labels is not in the pool: 403, never connected to.
    let (status, _, text) = post(side, &outsider, "outsider");
    assert_eq!(status, 403, "{text}");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["error"]["type"], "PermissionDeniedError", "{e}");
    // The pool pod's IP with another port is not an endpoint either.
    let (status, _, text) = post(side, &format!("127.0.0.2:{dead}"), "otherport");
    assert_eq!(status, 403, "{text}");

    // The pod leaves the pool (relabelled): refused from then on.
    let before = prefilled();
    kube.label_pod(NS, "prefill-a", &[("app", Some("retired"))]);
    wait_for(Duration::from_secs(10), "the pod gone from the pool", || {
        metric_sum(&[side], "kvroute_discovery_endpoints") == 0.0
    });
    let (status, _, text) = post(side, &member, "left");
    assert_eq!(status, 403, "{text}");
    assert_eq!(prefilled(), before, "a pod that left the pool must not be sent prompts");
    assert_eq!(metric_sum(&[side], "kvroute_sidecar_refused_prefillers_total"), 3.0);
    assert_eq!(metric_sum(&[side], "kvroute_sidecar_unverified_prefillers_total"), 1.0);
    std::thread::sleep(Duration::from_millis(200));
    assert!(trap.accept().is_err(), "the sidecar connected to a pod outside the pool");
}
