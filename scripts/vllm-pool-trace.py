#!/usr/bin/env python3
"""Drive vLLM's own BlockPool like its scheduler does and record a trace for the index
conformance tests (tests/data/vllm_pool_trace.json).

Nothing here re-implements vLLM: the block hashes (request block hasher, sha256_cbor,
NONE_HASH from PYTHONHASHSEED), the prefix cache (`BlockPool`: get_cached_block, touch,
get_new_blocks with eviction, cache_full_blocks, free_blocks, reset_prefix_cache), the
events (`take_events`) and their msgpack encoding (`KVEventBatch` + msgspec) are vLLM's
unmodified code, loaded without torch by the vector generator's loader in
../shared/vectors/gen (see its README). This script only plays the scheduler: it admits
requests (prefix hit = longest run of cached blocks, at most num_tokens - 1 tokens reused,
as vLLM does, so a block-aligned prompt recomputes its last block), prefills them in
steps (several identical prompts prefilled in one step each cache their own copy of the
same blocks), decodes, frees finished requests in reverse block order, and now and then
resets the prefix cache. After every step it records the batch of events the pool
published and, for every prompt seen so far, how many leading blocks the pool can serve
from cache (`get_cached_block`), which is what kvroute's index must report.

vLLM does not de-duplicate cached blocks (block_pool.py, "NOTE #1"): the same hash can be
stored twice and removed once while a copy stays cached. The trace counts how often that
happens; the test asserts it does.

Usage (vLLM's sources unpacked by ../shared/vectors/gen/fetch_vllm_sources.sh):
    VSRC=/tmp/vsrc PIP=pip ../shared/vectors/gen/fetch_vllm_sources.sh 0.33.0
    pip install cbor2 msgspec
    PYTHONHASHSEED=0 python3 scripts/vllm-pool-trace.py --vsrc /tmp/vsrc \
        --gen ../shared/vectors/gen --out tests/data/vllm_pool_trace.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

VERSION = "0.33.0"
ALGO = "sha256_cbor"
BLOCK_SIZE = 16
FIXED_TS = 1700000000.25


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vsrc", required=True, help="unpacked vLLM sources (<vsrc>/0.33.0/vllm)")
    ap.add_argument("--gen", required=True, help="the vector generator folder (vllm_isolated.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=64, help="GPU blocks in the pool (small: evictions)")
    a = ap.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":
        sys.exit("run with PYTHONHASHSEED=0 (vLLM seeds NONE_HASH from it)")
    sys.path.insert(0, a.gen)
    import gen_vllm_vectors as g  # the generator's loader and request stand-in
    import logging

    import msgspec

    logging.disable(logging.WARNING)  # the pool's "failed to reset" warnings

    c = g.load_version(a.vsrc, VERSION, int_hashes=True)
    fn = g.hash_fn_by_name(c, ALGO)
    g.init_none_hash(c, fn)
    enc = msgspec.msgpack.Encoder()
    runs = [run(c, g, fn, enc, int(s), a.steps, a.blocks) for s in a.seeds.split(",")]
    assert not c.vi.call_log(), c.vi.call_log()
    out = {
        "meta": {
            "what": "vLLM's BlockPool driven like its scheduler; after each step the batch it "
            "published and every known prompt's longest cached prefix (get_cached_block)",
            "vllm_version": VERSION,
            "files": c.files,
            "algo": ALGO,
            "pythonhashseed": "0",
            "block_size": BLOCK_SIZE,
            "num_gpu_blocks": a.blocks,
            "generator": "scripts/vllm-pool-trace.py",
        },
        "runs": runs,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    for r in runs:
        print(f"seed {r['seed']}: {len(r['steps'])} steps, {len(r['prompts'])} prompts, {r['stats']}")


class Prompts:
    """Prompt families: shared system prefixes + user suffixes, repeats, block-aligned."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.prefixes = [[rng.randrange(1000, 50000) for _ in range(BLOCK_SIZE * rng.randint(1, 3))] for _ in range(3)]
        self.seen: list[list[int]] = []

    def next(self) -> list[int]:
        r = self.rng
        if self.seen and r.random() < 0.45:
            return list(r.choice(self.seen[-12:]))  # a repeat (often block-aligned)
        toks = list(r.choice(self.prefixes)) if r.random() < 0.8 else []
        n = BLOCK_SIZE * r.randint(1, 3) if r.random() < 0.5 else r.randint(1, 3 * BLOCK_SIZE)
        toks += [r.randrange(1000, 50000) for _ in range(n)]
        self.seen.append(toks)
        return list(toks)


def run(c, g, fn, enc, seed: int, steps: int, num_blocks: int) -> dict:
    rng = random.Random(seed)
    pool = c.bp.BlockPool(num_gpu_blocks=num_blocks, enable_caching=True,
                          hash_block_size=BLOCK_SIZE, enable_kv_cache_events=True)
    prompts = Prompts(rng)
    probe_index: dict[tuple, int] = {}
    probes: list[dict] = []
    running: list[dict] = []
    out_steps = []
    stats = dict(stored=0, stored_again=0, removed=0, removed_with_copy_left=0, cleared=0, admitted=0,
                 admitted_concurrently_identical=0, deferred=0)
    n_req = 0
    last: list[int] = []

    def hashes_of(req):
        req.block_hashes.extend(g.compute_block_hashes(c, fn, req))

    def probe(tokens):
        key = tuple(tokens)
        if key not in probe_index and len(tokens) >= BLOCK_SIZE:
            r = g.FakeRequest(c, {"token_ids": tokens}, "probe")
            hashes_of(r)
            probe_index[key] = len(probes)
            probes.append({"tokens": tokens, "hashes": [c.kcu.maybe_convert_block_hash(h) for h in r.block_hashes],
                           "_raw": list(r.block_hashes)})

    def cached_prefix(raw):
        n = 0
        for h in raw:
            if pool.get_cached_block(h, [0]) is None:
                break
            n += 1
        return n

    for _step in range(steps):
        action = rng.random()
        admitted = []
        if action < 0.02:
            # Refused (no event) while requests run, as /reset_prefix_cache is.
            pool.reset_prefix_cache()
        elif action < 0.04:
            # A benchmark between two runs: drain, then reset.
            for r in running:
                pool.free_blocks(list(reversed(r["blocks"])))
            running.clear()
            assert pool.reset_prefix_cache()
        elif action < 0.5 or not running:
            # Admit 1-3 requests; sometimes the same prompt twice in one step.
            k = rng.choice([1, 1, 2, 3])
            batch = [prompts.next() for _ in range(k)]
            if k >= 2 and rng.random() < 0.4:
                batch[1] = list(batch[0])
                stats["admitted_concurrently_identical"] += 1
            for toks in batch:
                n_req += 1
                out_len = rng.randint(0, 2 * BLOCK_SIZE)
                req = g.FakeRequest(c, {"token_ids": toks}, f"req-{n_req}")
                hashes_of(req)
                # Prefix hit as the KV cache manager computes it: longest cached run,
                # at most num_tokens - 1 tokens (the last token is always recomputed).
                hit = []
                for h in req.block_hashes:
                    b = pool.get_cached_block(h, [0])
                    if b is None:
                        break
                    hit.append(b[0])
                max_hit = (len(toks) - 1) // BLOCK_SIZE
                hit = hit[:max_hit]
                need = -(-len(toks) // BLOCK_SIZE) - len(hit)
                evictable_hit = sum(1 for b in hit if b.ref_cnt == 0)
                if need > pool.get_num_free_blocks() - evictable_hit:
                    stats["deferred"] += 1
                    continue
                pool.touch(hit)
                blocks = hit + pool.get_new_blocks(need)
                admitted.append({"req": req, "blocks": blocks, "cached": len(hit), "left": out_len})
                probe(toks)
            # Prefill everything admitted this step: each request caches its own full
            # blocks (identical prompts in one step cache separate copies).
            for r in admitted:
                req = r["req"]
                full = req.num_tokens // BLOCK_SIZE
                pool.cache_full_blocks(req, r["blocks"], r["cached"], full, BLOCK_SIZE, 0)
                r["cached"] = max(r["cached"], full)
                stats["admitted"] += 1
            running.extend(admitted)
        elif action < 0.68:
            # Decode a few tokens for every running request.
            for r in running:
                req = r["req"]
                for _ in range(min(r["left"], rng.randint(1, 8))):
                    if req.num_tokens == len(r["blocks"]) * BLOCK_SIZE:
                        if pool.get_num_free_blocks() == 0:
                            break
                        r["blocks"] += pool.get_new_blocks(1)
                    tok = rng.randrange(1000, 50000)
                    req.all_token_ids.append(tok)
                    r["left"] -= 1
                    hashes_of(req)
                full = req.num_tokens // BLOCK_SIZE
                pool.cache_full_blocks(req, r["blocks"], r["cached"], full, BLOCK_SIZE, 0)
                r["cached"] = max(r["cached"], full)
                if req.num_tokens % BLOCK_SIZE == 0:
                    probe(list(req.all_token_ids))
        else:
            # Finish one or two requests: blocks freed tail first, as vLLM frees them.
            for _ in range(rng.choice([1, 1, 2])):
                if not running:
                    break
                r = running.pop(rng.randrange(len(running)))
                pool.free_blocks(list(reversed(r["blocks"])))
        events = pool.take_events()
        payload = None
        if events:
            for ev in events:
                name = type(ev).__name__
                if name == "BlockStored":
                    for h in ev.block_hashes:
                        stats["stored"] += 1
                        stats["stored_again"] += int(_copies(pool, c, h) > 1)
                elif name == "BlockRemoved":
                    for h in ev.block_hashes:
                        stats["removed"] += 1
                        stats["removed_with_copy_left"] += int(_copies(pool, c, h) > 0)
                elif name == "AllBlocksCleared":
                    stats["cleared"] += 1
            batch = c.ke.KVEventBatch(ts=FIXED_TS, events=events, data_parallel_rank=0)
            payload = enc.encode(batch).hex()
        # Only the prompts whose cached prefix changed are listed (a new prompt starts at 0).
        now = [cached_prefix(p["_raw"]) for p in probes]
        changed = [[i, n] for i, n in enumerate(now) if n != (last[i] if i < len(last) else 0)]
        last = now
        out_steps.append({"payload_hex": payload, "probes": len(probes), "changed": changed})
    for p in probes:
        del p["_raw"]
    return {"seed": seed, "prompts": probes, "steps": out_steps, "stats": stats}


def _copies(pool, c, ext_hash) -> int:
    """Cached copies (physical blocks) of the block whose event hash is `ext_hash`, now."""
    n = 0
    for key, blocks in pool.cached_block_hash_to_block._cache.items():
        h = c.kcu.get_block_hash(key)
        if c.kcu.maybe_convert_block_hash(h) == ext_hash:
            n += 1 if not isinstance(blocks, dict) else len(blocks)
    return n


if __name__ == "__main__":
    main()
