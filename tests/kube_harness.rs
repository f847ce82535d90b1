//! The Kubernetes test harness itself (tests/common/kube.rs) against the real
//! kube-apiserver 1.20 + etcd: what the discovery tests build on must work as documented.

mod common;

use common::kube::{Auth, Kube};

fn jsonpath(kube: &Kube, ns: &str, pod: &str, path: &str) -> String {
    kube.kubectl_ok(&["get", "pod", pod, "-n", ns, "-o", &format!("jsonpath={path}")])
}

/// Pods are created with labels and annotations, their status is set as a kubelet would
/// (podIP, Ready true/false), labels change, they are deleted; CRD objects of
/// deploy/crds are accepted; everything survives an apiserver restart (same etcd).
#[test]
fn pods_status_crds_and_restart() {
    let mut kube = Kube::start();
    kube.create_namespace("pool");
    kube.create_pod("pool", "vllm-0", &[("app", "vllm")], &[("kvroute.io/kv-events-port", "6000")]);
    assert_eq!(jsonpath(&kube, "pool", "vllm-0", "{.status.podIP}"), "", "a new pod has no IP");

    kube.set_pod_status("pool", "vllm-0", Some("127.0.0.2"), true);
    assert_eq!(jsonpath(&kube, "pool", "vllm-0", "{.status.podIP}"), "127.0.0.2");
    let ready = r#"{.status.conditions[?(@.type=="Ready")].status}"#;
    assert_eq!(jsonpath(&kube, "pool", "vllm-0", ready), "True");
    let annotation = r#"{.metadata.annotations.kvroute\.io/kv-events-port}"#;
    assert_eq!(jsonpath(&kube, "pool", "vllm-0", annotation), "6000");

    kube.set_pod_status("pool", "vllm-0", Some("127.0.0.2"), false);
    assert_eq!(jsonpath(&kube, "pool", "vllm-0", ready), "False");
    kube.set_pod_status("pool", "vllm-0", None, false);
    assert_eq!(jsonpath(&kube, "pool", "vllm-0", "{.status.podIP}"), "", "podIP removed");

    kube.label_pod("pool", "vllm-0", &[("llm-d.ai/role", Some("prefill"))]);
    let selected =
        kube.kubectl_ok(&["get", "pods", "-n", "pool", "-l", "app=vllm,llm-d.ai/role=prefill", "-o", "name"]);
    assert_eq!(selected.trim(), "pod/vllm-0");

    kube.install_crds();
    kube.apply(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {name: vllm-pool, namespace: pool}\n\
         spec:\n  selector: {matchLabels: {app: vllm}}\n  targetPorts: [{number: 8000}]\n  \
         endpointPickerRef: {name: kvroute-epp, port: {number: 9002}}\n",
    );

    kube.restart_apiserver();
    assert_eq!(jsonpath(&kube, "pool", "vllm-0", "{.metadata.labels.app}"), "vllm", "the pod survived the restart");
    let pool = kube.kubectl_ok(&[
        "get",
        "inferencepools.inference.networking.k8s.io",
        "vllm-pool",
        "-n",
        "pool",
        "-o",
        "name",
    ]);
    assert!(pool.contains("vllm-pool"), "{pool}");

    kube.delete_pod("pool", "vllm-0");
    let left = kube.kubectl_ok(&["get", "pods", "-n", "pool", "-o", "name"]);
    assert_eq!(left.trim(), "", "deleted at once (no kubelet)");
}

/// With RBAC, a ServiceAccount token minted by the harness has exactly what its Role
/// grants, and the admin kubeconfig everything.
#[test]
fn rbac_service_account_token() {
    let kube = Kube::start_with(Auth::Rbac);
    kube.create_namespace("pool");
    let token = kube.service_account_token("pool", "reader");
    let kc = kube.kubeconfig_for_token(&token, "pool");
    let denied = kube.kubectl_as(&kc, &["get", "pods"]).expect_err("no Role bound yet");
    assert!(denied.contains("forbidden"), "{denied}");

    kube.apply(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: pods, namespace: pool}\n\
         rules: [{apiGroups: [\"\"], resources: [pods], verbs: [list]}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: pods, namespace: pool}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pods}\n\
         subjects: [{kind: ServiceAccount, name: reader, namespace: pool}]\n",
    );
    let listed = kube.kubectl_as(&kc, &["get", "pods", "-o", "name"]);
    assert!(listed.is_ok(), "{listed:?}");
    let secrets = kube.kubectl_as(&kc, &["get", "secrets"]).expect_err("secrets are not granted");
    assert!(secrets.contains("forbidden"), "{secrets}");
    kube.kubectl_ok(&["get", "secrets", "-n", "pool"]);
}
