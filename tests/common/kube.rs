//! A real Kubernetes API server for black-box tests: Debian's `etcd` plus the prebuilt
//! `kube-apiserver` 1.20.2 of `../shared/k8s/` (see its README, "Limits of 1.20"), both
//! on free loopback ports in a temporary directory, killed when the [`Kube`] is dropped.
//!
//! Starting takes about 3–6 s on 2 cores (`/readyz`, then the `default` namespace); the
//! binary is unpacked once (about 1 s) into `$CARGO_TARGET_TMPDIR/kube/`, shared by every
//! test binary under a file lock. There is no scheduler, controller-manager or kubelet:
//! tests create Pods and set their `status` (podIP, `Ready`) themselves
//! ([`Kube::create_pod`], [`Kube::set_pod_status`]).
//!
//! Clients: [`Kube::kubeconfig`] is a kubeconfig file (token auth, TLS verification
//! off) that both `kubectl --kubeconfig` and kvroute's `--kubeconfig` read. With
//! [`Auth::Rbac`] the admin token is in `system:masters`; [`Kube::service_account_token`]
//! mints a real ServiceAccount token (TokenRequest API) and
//! [`Kube::kubeconfig_for_token`] writes a kubeconfig for it, so a process can run with
//! exactly the Role bound to that account.
//!
//! Needs `etcd` (Debian `etcd-server`) and `kubectl` on the PATH; a missing one is a
//! test failure naming the package, never a skip. The apiserver archive is found at
//! `$KVROUTE_KUBE_APISERVER_XZ`, else `../shared/k8s/` next to the repository (a ready
//! binary at `$KVROUTE_KUBE_APISERVER` is used as is).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const APISERVER_XZ: &str = "kube-apiserver-1.20.2-reflect2fix-linux-amd64.xz";
/// Size of the unpacked binary (its sha256 is in ../shared/k8s/README.md).
const APISERVER_BYTES: u64 = 110_256_128;
const ADMIN_TOKEN: &str = "kvroute-test-admin-token";

/// How the API server authorizes requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Every authenticated request is allowed (`--authorization-mode=AlwaysAllow`).
    AlwaysAllow,
    /// RBAC: the admin token is in `system:masters`, everyone else gets what Roles grant.
    Rbac,
}

/// A running etcd + kube-apiserver pair (see the module docs).
pub struct Kube {
    dir: PathBuf,
    auth: Auth,
    etcd: Child,
    apiserver: Option<Child>,
    etcd_port: u16,
    api_port: u16,
    binary: PathBuf,
    kubeconfig: PathBuf,
}

static INSTANCE: AtomicUsize = AtomicUsize::new(0);

impl Kube {
    /// An API server authorizing everything ([`Auth::AlwaysAllow`]).
    pub fn start() -> Kube {
        Kube::start_with(Auth::AlwaysAllow)
    }

    /// An API server with the given authorization mode; returns once `/readyz` answers
    /// ok and the `default` namespace exists (panics after 60 s, with both logs).
    pub fn start_with(auth: Auth) -> Kube {
        require_tool("etcd", "apt-get install -y etcd-server");
        require_tool("kubectl", "kubectl 1.20 or newer from your distribution or the Kubernetes release");
        let binary = apiserver_binary();
        let n = INSTANCE.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("kvroute-kube-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let key = dir.join("sa.key");
        run_ok(Command::new("openssl").args(["genrsa", "-out"]).arg(&key).arg("2048"), "openssl genrsa");
        fs::write(dir.join("tokens.csv"), format!("{ADMIN_TOKEN},kvroute-admin,kvroute-admin,system:masters\n"))
            .unwrap();
        // A port taken between choosing and binding makes a process exit: try again.
        let mut last = String::new();
        for _ in 0..3 {
            let ports = super::free_ports(3);
            let etcd = spawn_etcd(&dir, ports[0], ports[1]);
            let mut kube = Kube {
                dir: dir.clone(),
                auth,
                etcd,
                apiserver: None,
                etcd_port: ports[0],
                api_port: ports[2],
                binary: binary.clone(),
                kubeconfig: dir.join("kubeconfig"),
            };
            fs::write(&kube.kubeconfig, kubeconfig_text(&kube.server(), ADMIN_TOKEN)).unwrap();
            match kube.boot() {
                Ok(()) => return kube,
                Err(e) => last = e,
            }
        }
        panic!("kube-apiserver did not start: {last}");
    }

    /// Starts the apiserver on `api_port` and waits until it serves.
    fn boot(&mut self) -> Result<(), String> {
        let mode = match self.auth {
            Auth::AlwaysAllow => "AlwaysAllow",
            Auth::Rbac => "RBAC",
        };
        let log = fs::File::create(self.dir.join("kube-apiserver.log")).unwrap();
        let child = Command::new(&self.binary)
            .arg(format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port))
            .arg(format!("--secure-port={}", self.api_port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--cert-dir={}", self.dir.join("certs").display()))
            .arg(format!("--token-auth-file={}", self.dir.join("tokens.csv").display()))
            .arg(format!("--authorization-mode={mode}"))
            .arg(format!("--service-account-key-file={}", self.dir.join("sa.key").display()))
            .arg(format!("--service-account-signing-key-file={}", self.dir.join("sa.key").display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--api-audiences=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--disable-admission-plugins=ServiceAccount")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        self.apiserver = Some(child);
        let t = Instant::now();
        let mut ready = false;
        while t.elapsed() < Duration::from_secs(60) {
            if let Some(c) = self.apiserver.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!("kube-apiserver exited ({status}):\n{}", self.logs()));
                }
            }
            if let Ok(Some(status)) = self.etcd.try_wait() {
                return Err(format!("etcd exited ({status}):\n{}", self.logs()));
            }
            let args: &[&str] =
                if ready { &["get", "namespace", "default", "-o", "name"] } else { &["get", "--raw", "/readyz"] };
            match self.kubectl_once(args, None) {
                Ok(out) if ready && out.trim() == "namespace/default" => return Ok(()),
                Ok(out) if !ready && out.trim() == "ok" => ready = true,
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        Err(format!("not ready after 60 s:\n{}", self.logs()))
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The admin kubeconfig (token auth, `insecure-skip-tls-verify`, namespace `default`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The admin bearer token (in `system:masters`).
    pub fn admin_token(&self) -> &str {
        ADMIN_TOKEN
    }

    /// The tail of the etcd and apiserver logs (for failure messages).
    pub fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!("--- etcd.log\n{}\n--- kube-apiserver.log\n{}", tail("etcd.log"), tail("kube-apiserver.log"))
    }

    fn kubectl_once(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        kubectl_with(&self.kubeconfig, args, stdin)
    }

    /// `kubectl --kubeconfig <admin> ARGS`: stdout, or stderr as the error. Transient
    /// connection errors (the server just started or restarted) are retried for 20 s.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_stdin(args, None)
    }

    /// [`Kube::kubectl`] with `stdin` piped in (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        retry_transient(|| self.kubectl_once(args, stdin))
    }

    /// [`Kube::kubectl`] that panics with kubectl's error (and the server logs).
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.kubectl(args).unwrap_or_else(|e| panic!("kubectl {}: {e}\n{}", args.join(" "), self.logs()))
    }

    /// `kubectl apply -f -` of `yaml` (any number of documents); panics on failure.
    pub fn apply(&self, yaml: &str) -> String {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
            .unwrap_or_else(|e| panic!("kubectl apply: {e}\n--- input\n{yaml}"))
    }

    /// Installs the CRDs of `deploy/crds/` and waits until they are served.
    pub fn install_crds(&self) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/crds");
        self.install_crds_from(&dir);
    }

    /// Applies every CRD in `dir` (a Kustomize directory or plain files) and waits
    /// until each one is `Established`.
    pub fn install_crds_from(&self, dir: &Path) {
        let flag = if dir.join("kustomization.yaml").exists() { "-k" } else { "-f" };
        let out = self.kubectl_ok(&["apply", flag, &dir.to_string_lossy(), "-o", "name"]);
        for crd in out.lines().filter(|l| l.starts_with("customresourcedefinition")) {
            self.kubectl_ok(&["wait", "--for=condition=Established", "--timeout=30s", crd]);
        }
    }

    /// Creates namespace `ns` (no error if it exists).
    pub fn create_namespace(&self, ns: &str) {
        self.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"));
    }

    /// Creates a Pod `ns/name` with `labels` and `annotations` (one container, never
    /// scheduled: nothing runs it). Its status stays empty until [`Kube::set_pod_status`].
    pub fn create_pod(&self, ns: &str, name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) {
        let map = |kv: &[(&str, &str)]| {
            serde_json::Value::Object(kv.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect())
        };
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": map(labels), "annotations": map(annotations)},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai",
                                     "ports": [{"containerPort": 8000, "name": "http"}]}]}
        });
        self.kubectl_stdin(&["create", "-f", "-"], Some(&pod.to_string()))
            .unwrap_or_else(|e| panic!("creating pod {ns}/{name}: {e}"));
    }

    /// Sets a Pod's status as a kubelet would: `Running`, `podIP` (none when `None`)
    /// and the `Ready` condition.
    pub fn set_pod_status(&self, ns: &str, name: &str, ip: Option<&str>, ready: bool) {
        let flag = if ready { "True" } else { "False" };
        let now = rfc3339_now();
        let mut status = serde_json::json!({
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": flag, "lastTransitionTime": now},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}
            ]
        });
        // A merge patch of the status subresource: null removes podIP.
        status["podIP"] = ip.map_or(serde_json::Value::Null, serde_json::Value::from);
        status["podIPs"] = ip.map_or(serde_json::Value::Null, |ip| serde_json::json!([{"ip": ip}]));
        let patch = serde_json::json!({"status": status}).to_string();
        self.kubectl(&["patch", "pod", name, "-n", ns, "--subresource=status", "--type=merge", "-p", &patch])
            .unwrap_or_else(|e| panic!("patching status of pod {ns}/{name}: {e}"));
    }

    /// Replaces a Pod's labels (`kubectl label --overwrite`; a `None` value removes one).
    pub fn label_pod(&self, ns: &str, name: &str, labels: &[(&str, Option<&str>)]) {
        let mut args =
            vec!["label".to_string(), "pod".into(), name.into(), "-n".into(), ns.into(), "--overwrite".into()];
        args.extend(labels.iter().map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => format!("{k}-"),
        }));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.kubectl_ok(&args);
    }

    /// Deletes a Pod at once (no kubelet to wait for).
    pub fn delete_pod(&self, ns: &str, name: &str) {
        self.kubectl_ok(&["delete", "pod", name, "-n", ns, "--grace-period=0", "--force", "--wait=false"]);
    }

    /// Kills the apiserver (SIGKILL) and starts it again on the same port with the same
    /// etcd data, returning once it serves again. Clients see connection errors meanwhile.
    pub fn restart_apiserver(&mut self) {
        self.stop_apiserver();
        self.boot().unwrap_or_else(|e| panic!("kube-apiserver did not restart: {e}"));
    }

    /// Kills the apiserver and leaves it down (etcd keeps running) until
    /// [`Kube::start_apiserver`].
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the apiserver again after [`Kube::stop_apiserver`].
    pub fn start_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "the apiserver is running");
        self.boot().unwrap_or_else(|e| panic!("kube-apiserver did not start again: {e}"));
    }

    /// Creates ServiceAccount `ns/name` if missing and mints a token for it (TokenRequest
    /// API, valid 1 h): requests with it are `system:serviceaccount:<ns>:<name>`.
    pub fn service_account_token(&self, ns: &str, name: &str) -> String {
        self.apply(&format!("apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {ns}}}\n"));
        let token = self.kubectl_ok(&["create", "token", name, "-n", ns, "--duration=1h"]);
        token.trim().to_string()
    }

    /// Writes a kubeconfig for `token` (namespace `ns`) into the server's directory.
    pub fn kubeconfig_for_token(&self, token: &str, ns: &str) -> PathBuf {
        let n = INSTANCE.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join(format!("kubeconfig-{n}"));
        let text = kubeconfig_text(&self.server(), token).replace("namespace: default", &format!("namespace: {ns}"));
        fs::write(&path, text).unwrap();
        path
    }

    /// `kubectl --kubeconfig FILE ARGS` (e.g. with [`Kube::kubeconfig_for_token`]'s file),
    /// transient errors retried.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<String, String> {
        retry_transient(|| kubectl_with(kubeconfig, args, None))
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kube test server files kept in {}", self.dir.display());
        }
    }
}

fn spawn_etcd(dir: &Path, client: u16, peer: u16) -> Child {
    let data = dir.join("etcd");
    let log = fs::File::create(dir.join("etcd.log")).unwrap();
    Command::new("etcd")
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
        .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
        .args(["--unsafe-no-fsync"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run etcd: {e}"))
}

fn kubeconfig_text(server: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kvroute-test\n  cluster:\n    server: {server}\n    \
         insecure-skip-tls-verify: true\nusers:\n- name: kvroute-test\n  user:\n    token: {token}\ncontexts:\n- \
         name: kvroute-test\n  context:\n    cluster: kvroute-test\n    user: kvroute-test\n    namespace: default\n\
         current-context: kvroute-test\n"
    )
}

fn kubectl_with(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(kubeconfig).arg("--request-timeout=20s").args(args);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| format!("cannot run kubectl: {e}"))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().ok_or("no stdin")?;
        pipe.write_all(text.as_bytes()).map_err(|e| format!("writing to kubectl: {e}"))?;
    }
    let out: Output = child.wait_with_output().map_err(|e| format!("kubectl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout)))
    }
}

/// Errors a client sees while the apiserver (re)starts; anything else is final.
fn transient(err: &str) -> bool {
    [
        "connection refused",
        "connection reset",
        "EOF",
        "TLS handshake timeout",
        "ServiceUnavailable",
        "the server is currently unable",
        "i/o timeout",
        "etcdserver: request timed out",
    ]
    .iter()
    .any(|s| err.contains(s))
}

fn retry_transient(mut f: impl FnMut() -> Result<String, String>) -> Result<String, String> {
    let t = Instant::now();
    loop {
        match f() {
            Err(e) if transient(&e) && t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(250))
            }
            other => return other,
        }
    }
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
}

fn require_tool(name: &str, install: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file())).unwrap_or(false);
    assert!(
        found,
        "`{name}` is not on the PATH: the Kubernetes tests need it ({install}); scripts/test.sh installs it"
    );
}

/// The unpacked kube-apiserver: `$KVROUTE_KUBE_APISERVER`, else unpacked once from the
/// xz archive into `$CARGO_TARGET_TMPDIR/kube/` (a lock file serialises test binaries).
fn apiserver_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KVROUTE_KUBE_APISERVER") {
        return PathBuf::from(p);
    }
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kube");
    fs::create_dir_all(&cache).unwrap();
    let bin = cache.join("kube-apiserver-1.20.2");
    let unpacked = |p: &Path| fs::metadata(p).map(|m| m.len() == APISERVER_BYTES).unwrap_or(false);
    if unpacked(&bin) {
        return bin;
    }
    let _lock = UnpackLock::take(&cache.join("unpack.lock"));
    if !unpacked(&bin) {
        let xz = std::env::var_os("KVROUTE_KUBE_APISERVER_XZ")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/k8s").join(APISERVER_XZ));
        assert!(xz.is_file(), "{} not found: the Kubernetes tests need the prebuilt kube-apiserver (../shared/k8s/README.md; or set KVROUTE_KUBE_APISERVER_XZ)", xz.display());
        let tmp = cache.join(format!("kube-apiserver.{}.tmp", std::process::id()));
        let out = fs::File::create(&tmp).unwrap();
        let status = Command::new("xz").arg("-dc").arg(&xz).stdout(out).status().unwrap_or_else(|e| panic!("xz: {e}"));
        assert!(status.success(), "xz -dc {} failed", xz.display());
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(unpacked(&tmp), "{} unpacked to an unexpected size", xz.display());
        fs::rename(&tmp, &bin).unwrap();
    }
    bin
}

/// A lock file created exclusively; one left by a killed process is taken over after 2 min.
struct UnpackLock(PathBuf);

impl UnpackLock {
    fn take(path: &Path) -> UnpackLock {
        let t = Instant::now();
        loop {
            match fs::OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(_) => return UnpackLock(path.to_path_buf()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = fs::metadata(path)
                        .and_then(|m| m.modified())
                        .map(|m| m.elapsed().unwrap_or_default() > Duration::from_secs(120))
                        .unwrap_or(false);
                    if stale {
                        let _ = fs::remove_file(path);
                    }
                    assert!(t.elapsed() < Duration::from_secs(300), "{} held for 5 min", path.display());
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{}: {e}", path.display()),
            }
        }
    }
}

impl Drop for UnpackLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (for condition timestamps).
fn rfc3339_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().unwrap_or_else(|e| panic!("date: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
