#!/usr/bin/env python3
"""Added latency of the ext_proc hop (Envoy -> kvroute -> Envoy), p50/p99, for a 2 KB and a
200 KB prompt: the same requests through Envoy with kvroute's ext_proc (deploy/envoy/envoy.yaml)
and through Envoy without it (same config, ext_proc filter removed, a static cluster to the
same server), alternating, on one machine.

    cargo build --release && python3 scripts/bench-extproc.py [--requests 300]

--attribution compares hit attribution on and off instead (two routers, two Envoys).

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


def with_ext_proc(listen, grpc, admin):
    """The shipped config on these ports."""
    a = yaml.safe_load(open(os.path.join(ROOT, "deploy", "envoy", "envoy.yaml")))
    a["admin"]["address"]["socket_address"]["port_value"] = admin
    a["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listen
    for c in a["static_resources"]["clusters"]:
        if c["name"] == "kvroute_ext_proc":
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = grpc
    return a


def configs(listen_a, listen_b, grpc, admin_a, admin_b, sim):
    a = with_ext_proc(listen_a, grpc, admin_a)
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


def timed(conn, body, check=None):
    t = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    r = conn.getresponse()
    text = r.read()
    assert r.status == 200, (r.status, text[:300])
    if check:
        check(text)
    return (time.perf_counter() - t) * 1e3


def start(procs, args):
    procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def compare_attribution(requests):
    """Hit attribution's cost on the ext_proc door: two routers, one with
    --no-hit-attribution, each behind its own Envoy (the shipped config), one sim;
    requests alternate between the two paths."""
    sim = free_port()
    procs = []
    try:
        start(procs, [KV, "sim", "--port", str(sim), "--model", "m", "--speedup", "1000", "--max-num-seqs", "64"])
        wait(sim)
        tmp = tempfile.mkdtemp()
        paths = {}
        for name, extra in (("on", []), ("off", ["--no-hit-attribution"])):
            router, grpc, listen, admin = free_port(), free_port(), free_port(), free_port()
            start(procs, [KV, "serve", "--listen", f"127.0.0.1:{router}", "--no-zmq-bind",
                          "--backend", f"http://127.0.0.1:{sim}", "--ext-proc-listen", f"127.0.0.1:{grpc}",
                          "--admin-listen", "off", "--admin-on-serving-port"] + extra)
            wait(router)
            path = os.path.join(tmp, f"{name}.yaml")
            json.dump(with_ext_proc(listen, grpc, admin), open(path, "w"))
            start(procs, [envoy_bin(), "-c", path, "--concurrency", "1", "-l", "error", "--base-id", str(admin)])
            wait(admin, "/ready")
            paths[name] = listen
        prompt = " ".join(f"w{i}" for i in range(400))  # ~2 KB
        no_usage = lambda t: None if b'"usage"' not in t else sys.exit("a usage chunk reached the client")
        rows = (
            ("2 KB, not streamed, 1 token", {"max_tokens": 1}, None),
            ("2 KB, streamed, 64 tokens (the door asks for usage and strips it)", {"max_tokens": 64, "stream": True}, no_usage),
            ("2 KB, streamed, 64 tokens, the client asks for usage", {"max_tokens": 64, "stream": True,
                                                                       "stream_options": {"include_usage": True}}, None),
        )
        print("| request | attribution off p50 / p99 (ms) | on p50 / p99 (ms) | on / off p50 |")
        print("|---|---|---|---|")
        for label, extra, check in rows:
            body = json.dumps({"model": "m", "prompt": prompt, **extra})
            con = {k: http.client.HTTPConnection("127.0.0.1", p) for k, p in paths.items()}
            for _ in range(20):
                for k in ("on", "off"):
                    timed(con[k], body)
            x = {"on": [], "off": []}
            for n in range(requests):
                order = ("on", "off") if n % 2 == 0 else ("off", "on")  # ABBA
                for k in order:
                    x[k].append(timed(con[k], body, check if k == "on" else None))
            on, off = x["on"], x["off"]
            print(f"| {label} | {pct(off, .5):.2f} / {pct(off, .99):.2f} | {pct(on, .5):.2f} / {pct(on, .99):.2f} | "
                  f"{pct(on, .5) / pct(off, .5):.3f} |")
    finally:
        for p in procs:
            p.kill()


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, round((len(v) - 1) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--attribution", action="store_true",
                    help="compare the door with hit attribution on and off (streamed and not) instead")
    args = ap.parse_args()
    if args.attribution:
        return compare_attribution(args.requests)
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
