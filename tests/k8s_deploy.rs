//! The Kubernetes deploy assets (deploy/kubernetes, deploy/crds) against real tools:
//! `kubectl kustomize` renders every overlay, `kubernetes-validate --strict` checks the
//! output against a current Kubernetes schema, a real kube-apiserver (1.20, CRDs
//! installed) accepts it in a server-side dry run, and a token bound to the base's Role
//! can do exactly what discovery needs.

mod common;

use common::kube::{Auth, Kube};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const OVERLAYS: [&str; 4] = ["standalone", "gie", "gie-istio", "shared-index"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize DIR` (no server involved).
fn kustomize(dir: &Path) -> String {
    let out = Command::new("kubectl").arg("kustomize").arg(dir).output().expect("kubectl (see tests/common/kube.rs)");
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn render(overlay: &str) -> String {
    kustomize(&repo().join("deploy/kubernetes/overlays").join(overlay))
}

/// Every document of a multi-document YAML stream, as JSON values.
fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered output"))
}

fn of_kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

/// The kvroute config held by the rendered ConfigMap.
fn router_config(objs: &[Value]) -> Value {
    let cm = of_kind(objs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"].as_str().unwrap().starts_with("kvroute-config"));
    let text =
        cm.expect("the kvroute-config ConfigMap")["data"]["config.yaml"].as_str().expect("config.yaml").to_string();
    docs(&text).remove(0)
}

fn kvroute_container(objs: &[Value]) -> &Value {
    &find(objs, "Deployment", "kvroute")["spec"]["template"]["spec"]["containers"][0]
}

/// Runs `kubernetes-validate --strict` (PyPI, as `python3 -m kubernetes_validate`) on
/// `yaml`: its output, or the failure.
fn kubernetes_validate(yaml: &str) -> Result<String, String> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let file = std::env::temp_dir().join(format!("kvroute-validate-{}-{n}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new("python3").args(["-m", "kubernetes_validate", "--strict"]).arg(&file).output();
    let _ = std::fs::remove_file(&file);
    let out = out.unwrap_or_else(|e| {
        panic!("kubernetes-validate: {e} (pip install kubernetes-validate; scripts/test.sh installs it)")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !text.contains("No module named kubernetes_validate"),
        "kubernetes-validate is missing: pip install kubernetes-validate (scripts/test.sh installs it)"
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The 1.20 test server serves PodDisruptionBudget only as policy/v1beta1 (policy/v1 came
/// in 1.21, which the assets target); the dry run there gets that version, same fields.
/// kubernetes-validate checks the real policy/v1 output.
fn for_kubernetes_1_20(yaml: &str) -> String {
    yaml.replace(
        "apiVersion: policy/v1\nkind: PodDisruptionBudget",
        "apiVersion: policy/v1beta1\nkind: PodDisruptionBudget",
    )
}

/// Every field of `sent` must be in `stored` with the same value: the API server prunes
/// fields a CRD schema does not declare (1.20 does so silently), so a misspelt field of a
/// custom resource shows up here. Returns the paths that went missing or changed.
fn pruned(sent: &Value, stored: &Value, path: &str) -> Vec<String> {
    match (sent, stored) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .flat_map(|(k, v)| match b.get(k) {
                Some(w) => pruned(v, w, &format!("{path}.{k}")),
                None => vec![format!("{path}.{k}")],
            })
            .collect(),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().flat_map(|(i, (v, w))| pruned(v, w, &format!("{path}[{i}]"))).collect()
        }
        (a, b) if a == b => vec![],
        _ => vec![format!("{path}: sent {sent}, stored {stored}")],
    }
}

const CUSTOM_KINDS: [&str; 5] = ["InferencePool", "InferenceObjective", "HTTPRoute", "Gateway", "DestinationRule"];

/// `kubectl apply --dry-run=server` of `yaml` in `ns`; panics naming any custom-resource
/// field the server pruned.
fn server_dry_run(kube: &Kube, ns: &str, yaml: &str) -> Result<(), String> {
    let out = kube.kubectl_stdin(&["apply", "--dry-run=server", "-n", ns, "-o", "json", "-f", "-"], Some(yaml))?;
    let out: Value = serde_json::from_str(&out).map_err(|e| format!("kubectl output: {e}"))?;
    let stored: Vec<Value> =
        if out["kind"] == "List" { out["items"].as_array().cloned().unwrap_or_default() } else { vec![out] };
    for sent in docs(yaml).iter().filter(|o| CUSTOM_KINDS.iter().any(|k| o["kind"] == *k)) {
        let (kind, name) = (&sent["kind"], &sent["metadata"]["name"]);
        let back = stored
            .iter()
            .find(|o| o["kind"] == *kind && o["metadata"]["name"] == *name)
            .ok_or(format!("{kind} {name} not returned"))?;
        let lost = pruned(&sent["spec"], &back["spec"], "spec");
        if !lost.is_empty() {
            return Err(format!("{kind} {name}: the server dropped or changed {lost:?}"));
        }
    }
    Ok(())
}

/// Every overlay renders, passes `kubernetes-validate --strict` (unknown CRD kinds only
/// warn), and holds together: probes, security context, the config's discovery and the
/// references between objects (pool → picker Service → container port → config).
#[test]
fn overlays_render_validate_and_fit_together() {
    // The validator must be able to fail: a wrong type is refused.
    let bad = render("standalone").replacen("replicas: 2", "replicas: two", 1);
    assert!(bad.contains("replicas: two"));
    let refused = kubernetes_validate(&bad).expect_err("replicas: two must not validate");
    assert!(refused.contains("replicas"), "{refused}");

    let vllm_yaml = std::fs::read_to_string(repo().join("deploy/kubernetes/examples/vllm-deployment.yaml")).unwrap();
    kubernetes_validate(&vllm_yaml).unwrap_or_else(|e| panic!("examples/vllm-deployment.yaml: {e}"));
    let vllm = docs(&vllm_yaml).remove(0);
    let vllm_labels = &vllm["spec"]["template"]["metadata"]["labels"];

    for overlay in OVERLAYS {
        let yaml = render(overlay);
        kubernetes_validate(&yaml).unwrap_or_else(|e| panic!("{overlay}: kubernetes-validate --strict: {e}"));
        let objs = docs(&yaml);
        let config = router_config(&objs);
        let c = kvroute_container(&objs);
        let pod = &find(&objs, "Deployment", "kvroute")["spec"]["template"]["spec"];

        // Probes: readiness /ready, liveness /health, on the serving port.
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready", "{overlay}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health", "{overlay}");
        let http = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "http").expect("http port");
        assert_eq!(config["listen"].as_str().unwrap().rsplit(':').next().unwrap(), http["containerPort"].to_string());
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{overlay}");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{overlay}");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{overlay}");
        // The drain fits in the grace period: preStop sleep + shutdown_grace_s < terminationGracePeriodSeconds.
        let pre_stop: u64 = c["lifecycle"]["preStop"]["exec"]["command"][1].as_str().unwrap().parse().unwrap();
        let grace = config["shutdown_grace_s"].as_u64().expect("shutdown_grace_s");
        assert!(pre_stop + grace < pod["terminationGracePeriodSeconds"].as_u64().unwrap(), "{overlay}");
        assert_eq!(find(&objs, "PodDisruptionBudget", "kvroute")["apiVersion"], "policy/v1");
        assert_eq!(find(&objs, "RoleBinding", "kvroute-discovery")["subjects"][0]["name"], pod["serviceAccountName"]);

        // Dial mode: nothing bound for events; the hashing matches the example vLLM pods.
        assert_eq!(config["discovery"]["mode"], "kubernetes", "{overlay}");
        assert_eq!(config["ingest"]["bind"], serde_json::json!([]), "{overlay}");
        let vllm_c = &vllm["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = vllm_c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(
            args.contains(&format!("--block-size={}", config["hash"]["block_size"]).as_str()),
            "{overlay}: {args:?}"
        );
        assert!(
            args.contains(&format!("--prefix-caching-hash-algo={}", config["hash"]["algo"].as_str().unwrap()).as_str())
        );
        let seed = vllm_c["env"].as_array().unwrap().iter().find(|e| e["name"] == "PYTHONHASHSEED").unwrap();
        assert_eq!(seed["value"], config["hash"]["seed"], "{overlay}: PYTHONHASHSEED = hash.seed");
        let kv = &config["discovery"]["kubernetes"];
        let kv_events: Value =
            serde_json::from_str(args[args.iter().position(|a| *a == "--kv-events-config").unwrap() + 1]).unwrap();
        assert_eq!(kv_events["endpoint"], format!("tcp://*:{}", kv["kv_events_port"]), "{overlay}");
        assert_eq!(kv_events["replay_endpoint"], format!("tcp://*:{}", kv["kv_replay_port"]), "{overlay}");
        assert!(kv_events["topic"].as_str().unwrap().starts_with("kv@$(POD_IP):8000@"), "{overlay}");

        match overlay {
            "standalone" | "shared-index" => {
                let (key, value) = kv["endpoint_selector"].as_str().unwrap().split_once('=').unwrap();
                assert_eq!(vllm_labels[key], value, "{overlay}: the selector matches the example pods");
                assert_eq!(kv["target_ports"], serde_json::json!([8000]));
                let svc = find(&objs, "Service", "kvroute");
                assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
            }
            _ => {
                let pool = find(&objs, "InferencePool", kv["pool_name"].as_str().unwrap());
                assert_eq!(pool["apiVersion"], format!("{}/v1", kv["pool_group"].as_str().unwrap()));
                for (k, v) in pool["spec"]["selector"]["matchLabels"].as_object().unwrap() {
                    assert_eq!(&vllm_labels[k], v, "{overlay}: the pool selects the example pods");
                }
                assert_eq!(pool["spec"]["targetPorts"][0]["number"], 8000);
                // pool → Service:port → container port → ext_proc.listen
                let epp = &pool["spec"]["endpointPickerRef"];
                let svc = find(&objs, "Service", epp["name"].as_str().unwrap());
                let port = svc["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["port"] == epp["port"]["number"])
                    .expect("picker port");
                let cport = c["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == port["targetPort"])
                    .expect("target port");
                let listen = config["ext_proc"]["listen"].as_str().unwrap();
                assert_eq!(listen.rsplit(':').next().unwrap(), cport["containerPort"].to_string(), "{overlay}");
                assert!(port["name"].as_str().unwrap().starts_with("grpc-"), "meshes need the gRPC port name");
                let route = of_kind(&objs, "HTTPRoute")[0];
                assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["name"], pool["metadata"]["name"]);
                assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["kind"], "InferencePool");
            }
        }
        match overlay {
            "shared-index" => {
                assert_eq!(find(&objs, "Deployment", "kvroute")["spec"]["replicas"], 3);
                assert_eq!(config["index"]["backend"], "redis");
                let host =
                    config["index"]["url"].as_str().unwrap().trim_start_matches("redis://").split(':').next().unwrap();
                find(&objs, "Service", host);
                find(&objs, "StatefulSet", host);
            }
            "gie-istio" => {
                let route = of_kind(&objs, "HTTPRoute")[0];
                let gw = find(&objs, "Gateway", route["spec"]["parentRefs"][0]["name"].as_str().unwrap());
                assert_eq!(gw["spec"]["gatewayClassName"], "istio");
                let dr = of_kind(&objs, "DestinationRule")[0];
                assert_eq!(dr["spec"]["host"], "kvroute-epp");
                assert_eq!(dr["spec"]["trafficPolicy"]["tls"]["mode"], "SIMPLE");
                assert_eq!(config["tls"]["grpc"], true, "the DestinationRule originates TLS: kvroute must serve it");
                for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                    assert_eq!(
                        c[probe]["httpGet"]["scheme"], "HTTPS",
                        "{probe}: tls.cert makes the serving port HTTPS"
                    );
                }
                let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "epp-tls").unwrap();
                assert!(config["tls"]["cert"].as_str().unwrap().starts_with(mount["mountPath"].as_str().unwrap()));
            }
            _ => {
                assert!(config.get("tls").is_none(), "{overlay}");
                assert_eq!(find(&objs, "Deployment", "kvroute")["spec"]["replicas"], 2, "{overlay}");
            }
        }
    }
}

/// Every overlay (and the example vLLM Deployment) passes a server-side dry run on a real
/// kube-apiserver with deploy/crds installed (plus stand-ins for the Gateway API and
/// Istio kinds), and the server keeps every field of the custom resources.
#[test]
fn overlays_pass_server_dry_run() {
    let kube = Kube::start();
    kube.install_crds();
    kube.install_crds_from(&repo().join("tests/fixtures/k8s/gateway-api-istio-standins.yaml"));
    kube.create_namespace("llm");

    // The dry run must be able to fail: schema bounds, and fields the schema lacks.
    let pool = |ports: &str, picker: &str| {
        format!(
            "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {{name: p}}\nspec:\n  \
             selector: {{matchLabels: {{app: vllm}}}}\n  targetPorts: [{ports}]\n  endpointPickerRef: {picker}\n"
        )
    };
    let good = "{name: kvroute-epp, port: {number: 9002}}";
    server_dry_run(&kube, "llm", &pool("{number: 8000}", good)).expect("a valid pool");
    let e = server_dry_run(&kube, "llm", &pool("{number: 70000}", good)).expect_err("port 70000");
    assert!(e.contains("targetPorts"), "{e}");
    let e = server_dry_run(&kube, "llm", &pool("{number: 8000}", "{name: kvroute-epp, prot: {number: 9002}}"))
        .expect_err("misspelt field");
    // (kubectl's validation against the server's published schema refuses it; where that
    // is off, the pruning check below names it as spec.endpointPickerRef.prot.)
    assert!(e.contains("prot"), "{e}");

    for overlay in OVERLAYS {
        let yaml = for_kubernetes_1_20(&render(overlay));
        server_dry_run(&kube, "llm", &yaml).unwrap_or_else(|e| panic!("{overlay}: server dry run: {e}"));
    }
    let vllm = std::fs::read_to_string(repo().join("deploy/kubernetes/examples/vllm-deployment.yaml")).unwrap();
    server_dry_run(&kube, "llm", &vllm).unwrap_or_else(|e| panic!("examples/vllm-deployment.yaml: {e}"));
    // Dry runs leave nothing behind.
    assert_eq!(
        kube.kubectl_ok(&[
            "get",
            "deployments,services,configmaps,inferencepools.inference.networking.k8s.io",
            "-n",
            "llm",
            "-o",
            "name"
        ])
        .trim(),
        ""
    );
}

/// `kubectl auth can-i` with the token's kubeconfig: true for "yes", false for "no".
/// `resource` may name a subresource as `pods/log` (not kubectl's resource/name form).
fn can_i(kube: &Kube, kc: &Path, verb: &str, resource: &str, ns: &str) -> bool {
    let (resource, sub) =
        resource.split_once('/').map_or((resource, None), |(r, s)| (r, Some(format!("--subresource={s}"))));
    let mut args = vec!["auth", "can-i", verb, resource, "-n", ns];
    args.extend(sub.as_deref());
    match kube.kubectl_as(kc, &args) {
        Ok(out) => out.trim() == "yes",
        // (a warning such as "the server doesn't have a resource type" may come first)
        Err(out) if out.trim().lines().last() == Some("no") => false,
        Err(e) => panic!("can-i {verb} {resource}: {e}"),
    }
}

/// With RBAC on, the base's ServiceAccount, Role and RoleBinding give a real token of
/// that account exactly what discovery needs (read and watch pods, InferencePools of
/// both groups and InferenceObjectives, in its namespace) and nothing else.
#[test]
fn role_is_least_privilege() {
    let base = docs(&kustomize(&repo().join("deploy/kubernetes/base")));
    // The rules, exactly: adding one must be a decision that changes this test.
    let rules = &find(&base, "Role", "kvroute-discovery")["rules"];
    let expected = serde_json::json!([
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["inference.networking.k8s.io", "inference.networking.x-k8s.io"], "resources": ["inferencepools"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["inference.networking.x-k8s.io"], "resources": ["inferenceobjectives"], "verbs": ["get", "list", "watch"]}
    ]);
    assert_eq!(rules, &expected);

    let kube = Kube::start_with(Auth::Rbac);
    kube.install_crds();
    kube.create_namespace("pool");
    kube.create_namespace("other");
    let rbac: Vec<String> = ["ServiceAccount", "Role", "RoleBinding"]
        .iter()
        .flat_map(|k| of_kind(&base, k))
        .map(|o| serde_yaml::to_string(o).unwrap())
        .collect();
    kube.kubectl_stdin(&["apply", "-n", "pool", "-f", "-"], Some(&rbac.join("---\n")))
        .expect("the base's RBAC objects");
    let sa = find(&base, "ServiceAccount", "kvroute")["metadata"]["name"].as_str().unwrap();
    let token = kube.service_account_token("pool", sa);
    let kc = kube.kubeconfig_for_token(&token, "pool");

    let read = [
        "pods",
        "inferencepools.inference.networking.k8s.io",
        "inferencepools.inference.networking.x-k8s.io",
        "inferenceobjectives.inference.networking.x-k8s.io",
    ];
    for resource in read {
        for verb in ["get", "list", "watch"] {
            assert!(can_i(&kube, &kc, verb, resource, "pool"), "{verb} {resource} in its namespace");
            assert!(!can_i(&kube, &kc, verb, resource, "other"), "{verb} {resource} in another namespace");
        }
        for verb in ["create", "update", "patch", "delete"] {
            assert!(!can_i(&kube, &kc, verb, resource, "pool"), "{verb} {resource}");
        }
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("list", "configmaps"),
        ("list", "services"),
        ("list", "endpoints"),
        ("list", "deployments"),
        ("patch", "pods/status"),
        ("create", "pods/exec"),
        ("get", "pods/log"),
        ("list", "inferencemodelrewrites.inference.networking.x-k8s.io"),
        ("create", "serviceaccounts/token"),
        ("list", "leases.coordination.k8s.io"),
    ] {
        assert!(!can_i(&kube, &kc, verb, resource, "pool"), "{verb} {resource}");
    }
    assert!(!can_i(&kube, &kc, "list", "nodes", "pool"), "cluster-scoped");

    // And real requests with the token, as discovery makes them.
    kube.create_pod("pool", "vllm-0", &[("app", "vllm")], &[]);
    let pods = kube.kubectl_as(&kc, &["get", "pods", "-o", "name"]).expect("list pods");
    assert_eq!(pods.trim(), "pod/vllm-0");
    kube.kubectl_as(&kc, &["get", "--raw", "/api/v1/namespaces/pool/pods?watch=1&timeoutSeconds=1"])
        .expect("watch pods");
    kube.kubectl_as(
        &kc,
        &[
            "get",
            "--raw",
            "/apis/inference.networking.k8s.io/v1/namespaces/pool/inferencepools?watch=1&timeoutSeconds=1",
        ],
    )
    .expect("watch inferencepools");
    kube.kubectl_as(&kc, &["get", "inferenceobjectives.inference.networking.x-k8s.io"]).expect("list objectives");
    for denied in [vec!["get", "secrets"], vec!["get", "pods", "-n", "other"], vec!["get", "--raw", "/api/v1/pods"]] {
        let e = kube.kubectl_as(&kc, &denied).expect_err("forbidden");
        assert!(e.contains("forbidden") || e.contains("Forbidden"), "{denied:?}: {e}");
    }
}

/// The image and the Deployment agree: the image's user is the pod's `runAsUser`, it
/// exposes the container's ports, and its default command reads the config where the
/// ConfigMap is mounted.
#[test]
fn dockerfile_agrees_with_the_deployment() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let line = |word: &str| {
        dockerfile
            .lines()
            .rev()
            .find(|l| l.starts_with(word))
            .unwrap_or_else(|| panic!("no {word} in the Dockerfile"))
            .to_string()
    };
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert_eq!(dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")), 2, "two stages");
    let objs = docs(&render("gie"));
    let pod = &find(&objs, "Deployment", "kvroute")["spec"]["template"]["spec"];
    let c = kvroute_container(&objs);
    let user = line("USER ");
    assert_eq!(user, format!("USER {}:{}", pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]));
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    let expose = line("EXPOSE ");
    let exposed: Vec<&str> = expose.split_whitespace().skip(1).collect();
    for p in c["ports"].as_array().unwrap() {
        assert!(exposed.contains(&p["containerPort"].to_string().as_str()), "{p} not exposed: {exposed:?}");
    }
    let cmd: Value = serde_json::from_str(line("CMD ").trim_start_matches("CMD ")).unwrap();
    assert_eq!(&cmd, &c["args"], "the image's default command is the Deployment's");
    let config_mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "config").unwrap();
    assert!(cmd[2].as_str().unwrap().starts_with(config_mount["mountPath"].as_str().unwrap()));
}

/// Each overlay's config is one `kvroute serve` starts with (unknown keys, wrong types,
/// unreadable key files are errors there). The listeners move to free loopback ports, the
/// TLS pair is made here, Redis is a local `redis-server`. While this kvroute has no
/// Kubernetes discovery (`serve --help` without `--discovery`), the keys that discovery
/// adds (`discovery`, `shutdown_grace_s`) are taken out and the rest is checked; once it
/// has, the whole file runs, with `$KUBECONFIG` naming a real API server.
#[test]
fn overlay_configs_start_kvroute() {
    let bin = env!("CARGO_BIN_EXE_kvroute");
    let help = Command::new(bin).args(["serve", "--help"]).output().unwrap();
    let discovery = String::from_utf8_lossy(&help.stdout).contains("--discovery");
    let kube = discovery.then(|| {
        let k = Kube::start();
        k.install_crds();
        k
    });
    let dir = std::env::temp_dir().join(format!("kvroute-overlay-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kvroute-epp", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let redis_port = common::free_ports(1)[0];
    let redis = Command::new("redis-server")
        .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (scripts/test.sh installs it)");
    let _children = common::Children(vec![redis]);

    for overlay in OVERLAYS {
        let mut config = router_config(&docs(&render(overlay)));
        let obj = config.as_object_mut().unwrap();
        if !discovery {
            obj.remove("discovery");
            obj.remove("shutdown_grace_s");
        }
        let ports = common::free_ports(4);
        let local = |i: usize| Value::from(format!("127.0.0.1:{}", ports[i]));
        obj.insert("listen".into(), local(0));
        obj["admin"]["listen"] = local(1);
        if let Some(ext) = obj.get_mut("ext_proc") {
            ext["listen"] = local(2);
            ext["health_listen"] = local(3);
        }
        if let Some(tls) = obj.get_mut("tls") {
            tls["cert"] = cert.to_string_lossy().into();
            tls["key"] = key.to_string_lossy().into();
        }
        if let Some(index) = obj.get_mut("index") {
            index["url"] = format!("redis://127.0.0.1:{redis_port}").into();
        }
        let file = dir.join(format!("{overlay}.yaml"));
        std::fs::write(&file, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let log = dir.join(format!("{overlay}.log"));
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--config"]).arg(&file).env("RUST_LOG", "warn");
        if let Some(k) = &kube {
            cmd.env("KUBECONFIG", k.kubeconfig());
        }
        let child =
            cmd.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        let mut guard = common::Children(vec![child]);
        let t = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = guard.0[0].try_wait() {
                panic!(
                    "{overlay}: kvroute serve exited ({status}) with its config:\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_ok() {
                break;
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(20), "{overlay}: not listening after 20 s");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        drop(guard);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
