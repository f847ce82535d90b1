#!/usr/bin/env python3
"""Soak: many concurrent streams held open through the gateway to slow simulators; the
router's memory (RSS) sampled every second; every stream must end complete.

    cargo build --release && python3 scripts/soak.py [--streams 10000] [--hold 60] [--sims 4]

Each stream asks for `hold` tokens from a sim that emits one token per second
(`--inter-token-latency-us 1000000`), so every stream stays open ~`hold` seconds. The
clients are plain asyncio sockets (HTTP/1.1, one connection per stream), or with
`--h2 N` HTTP/2 cleartext (prior knowledge, the `h2` package) with up to N streams per
connection, as Envoy in front of kvroute multiplexes. Prints RSS over time (warm-up =
while streams open) and a summary; exits 1 if any stream was lost.
"""
import argparse, asyncio, json, os, resource, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KV = os.environ.get("KVROUTE_BIN", os.path.join(ROOT, "target", "release", "kvroute"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(port, path="/health", timeout=30):
    t = time.time()
    while time.time() - t < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if b" 200 " in s.recv(100):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"port {port} never answered {path}")


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def stream(port, model, tokens, stats, i):
    body = json.dumps({"model": model, "prompt": f"soak stream {i} " + "x " * 20, "max_tokens": tokens,
                       "stream": True, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(head + body)
        await w.drain()
        stats["open"] += 1
        status = (await r.readline()).split(b" ")[1:2]
        chunks, done, last = 0, False, b""
        while True:
            line = await r.readline()
            if not line:
                break
            if line.strip():
                last = line.strip()
            if line.startswith(b"data: "):
                if line.strip() == b"data: [DONE]":
                    done = True
                else:
                    chunks += 1
        w.close()
        stats["open"] -= 1
        if status == [b"200"] and done and chunks >= tokens:
            stats["ok"] += 1
        else:
            stats["lost"] += 1
            stats["why"].append(f"stream {i}: status {status} done {done} chunks {chunks}: {last[:200]!r}")
    except OSError as e:
        stats["lost"] += 1
        stats["why"].append(f"stream {i}: {e}")


class H2Conn:
    """One HTTP/2 cleartext connection carrying many streams (the `h2` package)."""

    def __init__(self, port):
        self.port, self.streams, self.w, self.conn = port, {}, None, None

    async def open(self):
        import h2.config, h2.connection, h2.settings
        r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        self.conn.increment_flow_control_window(16 << 20)
        self.w.write(self.conn.data_to_send())
        asyncio.create_task(self.read(r))

    async def read(self, r):
        import h2.events
        while True:
            data = await r.read(1 << 16)
            if not data:
                break
            for ev in self.conn.receive_data(data):
                s = self.streams.get(getattr(ev, "stream_id", None))
                if isinstance(ev, h2.events.ResponseReceived) and s:
                    s["status"] = dict(ev.headers).get(":status")
                elif isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if s:
                        s["body"] += ev.data
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and s:
                    s["done"].set_result(isinstance(ev, h2.events.StreamEnded))
            self.w.write(self.conn.data_to_send())
        for s in self.streams.values():
            if not s["done"].done():
                s["done"].set_result(False)

    async def request(self, body, stats):
        sid = self.conn.get_next_available_stream_id()
        s = {"status": None, "body": b"", "done": asyncio.get_running_loop().create_future()}
        self.streams[sid] = s
        self.conn.send_headers(sid, [(":method", "POST"), (":path", "/v1/completions"), (":scheme", "http"),
                                     (":authority", "x"), ("content-type", "application/json")])
        self.conn.send_data(sid, body, end_stream=True)
        self.w.write(self.conn.data_to_send())
        stats["open"] += 1
        ended = await s["done"]
        stats["open"] -= 1
        del self.streams[sid]
        return s["status"], ended, s["body"]


async def stream_h2(conn, model, tokens, stats, i):
    body = json.dumps({"model": model, "prompt": f"soak stream {i} " + "x " * 20, "max_tokens": tokens,
                       "stream": True, "ignore_eos": True}).encode()
    try:
        status, ended, data = await conn.request(body, stats)
        lines = [l.strip() for l in data.split(b"\n") if l.startswith(b"data: ")]
        done = b"data: [DONE]" in lines
        chunks = len(lines) - done
        if status == "200" and ended and done and chunks >= tokens:
            stats["ok"] += 1
        else:
            stats["lost"] += 1
            stats["why"].append(f"stream {i}: status {status} ended {ended} chunks {chunks}: {data[-200:]!r}")
    except Exception as e:  # noqa: BLE001 — any client-side failure is a lost stream
        stats["lost"] += 1
        stats["why"].append(f"stream {i}: {e!r}")


async def run(a, router_port, router_pid):
    stats = {"open": 0, "ok": 0, "lost": 0, "why": []}
    t0 = time.time()
    tasks = []
    samples = []
    # Open the streams over ~`ramp` seconds, then sample until all are done.
    per_tick = max(1, a.streams // (a.ramp * 10))
    i = 0
    conns = []
    if a.h2:
        for _ in range((a.streams + a.h2 - 1) // a.h2):
            c = H2Conn(router_port)
            await c.open()
            conns.append(c)
    while i < a.streams or any(not t.done() for t in tasks):
        for _ in range(per_tick):
            if i < a.streams:
                if conns:
                    job = stream_h2(conns[i % len(conns)], a.model, a.hold, stats, i)
                else:
                    job = stream(router_port, a.model, a.hold, stats, i)
                tasks.append(asyncio.create_task(job))
                i += 1
        await asyncio.sleep(0.1)
        el = time.time() - t0
        if not samples or el - samples[-1][0] >= 1.0:
            samples.append((el, stats["open"], rss_mb(router_pid)))
            if a.verbose:
                print(f"{el:6.1f} s  open {stats['open']:6d}  ok {stats['ok']:6d}  lost {stats['lost']}  "
                      f"router RSS {samples[-1][2]:.1f} MB", flush=True)
        if el > a.hold * 3 + a.ramp + 60:
            break
    return stats, samples


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=10000)
    ap.add_argument("--hold", type=int, default=60, help="seconds (= tokens at 1 token/s) each stream is held")
    ap.add_argument("--sims", type=int, default=4)
    ap.add_argument("--ramp", type=int, default=20, help="seconds over which the streams open")
    ap.add_argument("--model", default="soak")
    ap.add_argument("--serve-args", default="", help="extra kvroute serve arguments")
    ap.add_argument("--h2", type=int, default=0, metavar="N",
                    help="HTTP/2 cleartext, up to N streams per connection (default 0: HTTP/1.1, one per stream)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * a.streams + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    procs = []
    try:
        sim_ports = [free_port() for _ in range(a.sims)]
        per_sim = a.streams // a.sims + 64
        for p in sim_ports:
            procs.append(subprocess.Popen(
                [KV, "sim", "--port", str(p), "--model", a.model, "--inter-token-latency-us", "1000000",
                 "--prefill-overhead-us", "1000", "--max-num-seqs", str(per_sim), "--max-waiting", str(per_sim),
                 "--num-gpu-blocks", str(per_sim * 8)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in sim_ports:
            wait_http(p)
        rp = free_port()
        cmd = [KV, "serve", "--listen", f"127.0.0.1:{rp}", "--no-zmq-bind"] + \
              sum([["--backend", f"http://127.0.0.1:{p}"] for p in sim_ports], []) + a.serve_args.split()
        router = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(router)
        wait_http(rp)
        time.sleep(1.5)  # first health probes
        base = rss_mb(router.pid)
        stats, samples = asyncio.run(run(a, rp, router.pid))
    finally:
        for p in procs:
            p.kill()
    peak_open = max(s[1] for s in samples)
    held = [s for s in samples if s[1] >= 0.95 * peak_open]
    how = f"HTTP/2, {a.h2} streams per connection" if a.h2 else "HTTP/1.1, a connection per stream"
    print(f"\n{a.streams} streams × {a.hold} s through the gateway to {a.sims} sims (1 token/s each; {how})")
    print(f"completed {stats['ok']}, lost {stats['lost']}; peak open {peak_open}; router RSS idle {base:.1f} MB")
    print("\n| t (s) | open streams | router RSS (MB) |\n|---|---|---|")
    step = max(1, len(samples) // 20)
    for s in samples[::step]:
        print(f"| {s[0]:.0f} | {s[1]} | {s[2]:.1f} |")
    if held:
        print(f"\nwhile ≥ 95 % of the streams were open ({held[0][0]:.0f}–{held[-1][0]:.0f} s): RSS "
              f"{min(h[2] for h in held):.1f}–{max(h[2] for h in held):.1f} MB")
    for w in stats["why"][:10]:
        print(w)
    sys.exit(1 if stats["lost"] else 0)


if __name__ == "__main__":
    main()
