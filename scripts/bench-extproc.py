#!/usr/bin/env python3
"""Added latency of the ext_proc hop (Envoy -> kvroute -> Envoy), p50/p99, for a 2 KB and a
200 KB prompt: the same requests through Envoy with kvroute's ext_proc (deploy/envoy/envoy.yaml)
and through Envoy without it (same config, ext_proc filter removed, a static cluster to the
same server), alternating, on one machine.

    cargo build --release && python3 scripts/bench-extproc.py [--requests 300]

REQUEST_BODY_MODE=BUFFERED compares Envoy's buffered body mode instead of the shipped
FULL_DUPLEX_STREAMED; DEBUG=1 also prints kvroute's own decision-time histogram sums.
"""
import argparse, http.client, json, os, socket, subprocess, sys, tempfile, time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KV = os.path.join(ROOT, "target", "release", "kvroute")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def envoy_bin():
    import envoy
    return os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy")


def wait(port, path="/health", timeout=20):
    t = time.time()
    while time.time() - t < timeout:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"port {port} not ready")


def configs(listen_a, listen_b, grpc, admin_a, admin_b, sim):
    base = yaml.safe_load(open(os.path.join(ROOT, "deploy", "envoy", "envoy.yaml")))
    a = json.loads(json.dumps(base))
    a["admin"]["address"]["socket_address"]["port_value"] = admin_a
    a["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listen_a
    for c in a["static_resources"]["clusters"]:
        if c["name"] == "kvroute_ext_proc":
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = grpc
    mode = os.environ.get("REQUEST_BODY_MODE")
    if mode:  # e.g. BUFFERED, to compare with the shipped FULL_DUPLEX_STREAMED
        hcm_a = a["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        for f in hcm_a["http_filters"]:
            if f["name"] == "envoy.filters.http.ext_proc":
                f["typed_config"]["processing_mode"]["request_body_mode"] = mode
                f["typed_config"]["allow_mode_override"] = True
                if mode != "FULL_DUPLEX_STREAMED":
                    f["typed_config"]["processing_mode"]["request_trailer_mode"] = "SKIP"
    b = json.loads(json.dumps(a))
    b["admin"]["address"]["socket_address"]["port_value"] = admin_b
    b["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listen_b
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    b["static_resources"]["clusters"] = [{
        "name": "original_destination", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "original_destination", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": sim}}}}]}]}}]
    return a, b


def timed(conn, body):
    t = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    r = conn.getresponse()
    text = r.read()
    assert r.status == 200, (r.status, text[:300])
    return (time.perf_counter() - t) * 1e3


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, round((len(v) - 1) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    sim, zmq, router, grpc = free_port(), free_port(), free_port(), free_port()
    la, lb, aa, ab = free_port(), free_port(), free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen([KV, "serve", "--listen", f"127.0.0.1:{router}", "--zmq-bind", f"tcp://127.0.0.1:{zmq}",
                                       "--backend", f"http://127.0.0.1:{sim}", "--ext-proc-listen", f"127.0.0.1:{grpc}",
                                       "--admin-listen", "off", "--admin-on-serving-port"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([KV, "sim", "--port", str(sim), "--model", "m", "--speedup", "1000",
                                       "--max-model-len", "200000", "--max-num-seqs", "64"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait(router)
        wait(sim)
        tmp = tempfile.mkdtemp()
        for name, cfg, admin in zip("ab", configs(la, lb, grpc, aa, ab, sim), (aa, ab)):
            path = os.path.join(tmp, f"{name}.yaml")
            json.dump(cfg, open(path, "w"))
            procs.append(subprocess.Popen([envoy_bin(), "-c", path, "--concurrency", "1", "-l", "error", "--base-id", str(admin)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait(admin, "/ready")
        print(f"| prompt | requests | via Envoy only p50 / p99 (ms) | via Envoy + kvroute ext_proc p50 / p99 (ms) | added p50 / p99 (ms) |")
        print("|---|---|---|---|---|")
        for label, nbytes, fresh in (("2 KB", 2_000, False), ("200 KB", 200_000, False), ("200 KB, every prompt new", 200_000, True)):
            words = []
            size = 0
            i = 0
            while size < nbytes:
                w = f"w{i}"
                words.append(w)
                size += len(w) + 1
                i += 1
            body = json.dumps({"model": "m", "prompt": " ".join(words), "max_tokens": 1})
            ca, cb = http.client.HTTPConnection("127.0.0.1", la), http.client.HTTPConnection("127.0.0.1", lb)
            for _ in range(20):  # warm-up (also fills kvroute's prompt cache for this prompt)
                timed(ca, body), timed(cb, body)
            xa, xb = [], []
            for n in range(args.requests):
                if fresh:
                    # A different first word for each request on each path: nothing cached
                    # anywhere (router or server), tokenized and keyed from scratch.
                    xa.append(timed(ca, json.dumps({"model": "m", "prompt": f"a{n} " + " ".join(words), "max_tokens": 1})))
                    xb.append(timed(cb, json.dumps({"model": "m", "prompt": f"b{n} " + " ".join(words), "max_tokens": 1})))
                    continue
                xa.append(timed(ca, body))
                xb.append(timed(cb, body))
            if os.environ.get("DEBUG"):
                m = http.client.HTTPConnection("127.0.0.1", router); m.request("GET", "/metrics")
                t = m.getresponse().read().decode()
                print([l for l in t.splitlines() if l.startswith("kvroute_extproc_decision_seconds_sum") or l.startswith("kvroute_extproc_decision_seconds_count")])
            print(f"| {label} ({len(body):,} B body) | {args.requests} | {pct(xb, .5):.2f} / {pct(xb, .99):.2f} | "
                  f"{pct(xa, .5):.2f} / {pct(xa, .99):.2f} | {pct(xa, .5) - pct(xb, .5):.2f} / {pct(xa, .99) - pct(xb, .99):.2f} |")
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
