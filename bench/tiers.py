"""Tier benchmark: put/get throughput and latency per tier, lookup rate, shard memory.

    python bench/tiers.py [--clients 1,8] [--ops 12] [--out bench/results/tiers.md]

Starts a local Ray (num_cpus=2) and three tiers in it: ``main`` (hot + warm +
cold dir), ``cold`` (one shard holding one block, so round-robin reads are cold
hits) and ``wt`` (write-through to cold at put). For each KV shape and codec it
measures, with 1 and 8 concurrent client processes (each its own Python process
joining the cluster, started together behind a file barrier):

    put        kvtier.put: compress, serialize, hot tier, queued for the background store
               (the shard's store and registration run off the request path)
    put+cold   the same with write_through=True (also written to the cold dir)
    get hot    kvtier.get of a block in this process's hot tier
    get warm   kvtier.get with the hot tier cleared: locate + ray.get + verify + decode
    get warm again  the same chunks again: their locations are cached, so a changes check that the
               fetch and load overlap replaces the locate call
    get warm x8  the same for a batch of 8 chunks in one call (one locate, one ray.get)
    get cold   kvtier.get of a block only in the cold dir: read, verify, decode, promote
    lookup     kvtier.lookup of 64 keys (keys/s)

Throughput is raw (uncompressed) KV bytes per second over the wall time of a
phase, summed over clients (a put phase ends when the background store has
stored everything); p50/p99 are per operation. Baselines in the same
run, same process: ``ray.put``/``ray.get`` of the raw tensor bytes (no tier, no
checksum, no copy out), and pickle + zlib to a file and back (the kvtc
proof-of-concept's cold path). Writes a markdown table with date, device and
command to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

# `python bench/tiers.py` puts bench/ first on sys.path, where bench/kernels.py would shadow the
# `kernels` package that the codecs import: drop it (the repo's packages come from the install).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPES = {  # [layers, 2, kv_heads, tokens, head_dim], bf16
    "llama8b": (32, 2, 8, 256, 128),   # 32 MiB raw
    "smollm2": (30, 2, 3, 256, 64),    # 5.6 MiB raw
}
LOOKUP_BATCH = 64


def kv_for(shape: tuple, i: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)


def keys_for(tag: str, n: int) -> list[str]:
    import kvtier

    return kvtier.chunk_keys(list(range(256 * n)), f"bench-{tag}", chunk_tokens=256)


def raw_bytes(shape: tuple) -> int:
    return int(np.prod(shape)) * 2


# ---- the client side: run in this process (1 client) or in workers (N clients) ------
def barrier(d: str, name: str, me: int, n: int, timeout: float = 600.0) -> None:
    open(os.path.join(d, f"{name}.{me}"), "w").close()
    end = time.monotonic() + timeout
    while sum(f.startswith(name + ".") for f in os.listdir(d)) < n:
        if time.monotonic() > end:
            raise TimeoutError(f"barrier {name}: not all {n} clients arrived")
        time.sleep(0.005)


def run_phases(spec: dict) -> list[dict]:
    """One client's share of every phase: [{phase, t0, t1, lat: [s...], bytes}]. Times of all
    clients are on one clock (wall time in workers), so a phase's wall time spans every client."""
    import kvtier
    from kvtier.runtime import api

    me, n, d = spec["me"], spec["n"], spec["barrier"]
    shape, tag, codec, ops = tuple(spec["shape"]), spec["tag"], spec["codec"], spec["ops"]
    raw = raw_bytes(shape)
    out = []

    def phase(name, ns, fn, count, nbytes):
        kvtier.init(namespace=ns, config=dict(spec["configs"][ns], codec=codec))
        barrier(d, f"{tag}-{name}", me, n)
        lat, parts = [], []
        t0 = time.perf_counter()
        for i in range(count):
            s = time.perf_counter()
            fn(i)
            lat.append(time.perf_counter() - s)
            parts.append(dict(api._get_client().last_get))  # the client's own phases of that get (if it left hot)
        if name.startswith("put"):  # the phase ends when the background store has stored every block
            api._get_client().flush()
        out.append({"phase": name, "t0": t0 + spec["clock_offset"], "t1": time.perf_counter() + spec["clock_offset"],
                    "lat": lat, "bytes": nbytes * count, "parts": parts})

    kv = kv_for(shape, me)
    put_keys = keys_for(f"{tag}-put-{me}-{spec['run']}", ops)
    phase("put", "main", lambda i: kvtier.put(put_keys[i], kv), ops, raw)
    wt_keys = keys_for(f"{tag}-wt-{me}-{spec['run']}", ops)
    phase("put+cold", "wt", lambda i: kvtier.put(wt_keys[i], kv), ops, raw)

    warm = keys_for(f"{tag}-shared", spec["shared"])

    def get_hot(i):
        assert kvtier.get(warm[me % len(warm)]) is not None

    kvtier.init(namespace="main", config=dict(spec["configs"]["main"], codec=codec))
    # into this process's hot tier: a CPU put with a shard on this node is not kept there, nor a CPU get of a
    # local warm block (the object store holds those bytes); a prefetch is what fills a CPU hot tier
    assert kvtier.prefetch([warm[me % len(warm)]]).result(timeout=60) == 1
    phase("get hot", "main", get_hot, ops, raw)

    def get_warm(i):
        api._get_client().hot.clear()  # force the warm path every time
        assert kvtier.get(warm[(me + i) % len(warm)]) is not None

    phase("get warm", "main", get_warm, ops, raw)  # 8 of the 12 are this client's first read of the chunk
    phase("get warm again", "main", get_warm, ops, raw)  # all read before: locations cached

    def get_warm_batch(i):  # a prefix of 8 chunks, as a serving worker asks: one locate, one ray.get
        api._get_client().hot.clear()
        assert all(x is not None for x in kvtier.get(warm))

    get_warm_batch(-1)  # untimed: the first batched load starts the load pool's threads (~30 ms, seen here)
    phase("get warm x8", "main", get_warm_batch, max(2, ops // 2), raw * len(warm))
    cold = keys_for(f"{tag}-cold", spec["shared"])

    def get_cold(i):
        api._get_client().hot.clear()
        assert kvtier.get(cold[(me + i) % len(cold)]) is not None

    phase("get cold", "cold", get_cold, max(2, ops // 2), raw)
    lk = keys_for("lookup", LOOKUP_BATCH)

    def lookup(i):
        assert kvtier.lookup(lk) == LOOKUP_BATCH

    phase("lookup", "main", lookup, ops * 10, LOOKUP_BATCH)
    return out


def worker_main(spec_json: str) -> int:
    import ray

    spec = json.loads(spec_json)
    ray.init(address=spec["address"], log_to_driver=False)
    spec["clock_offset"] = time.time() - time.perf_counter()
    res = run_phases(spec)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ---- the driver -------------------------------------------------------------------
def prepare(tag: str, shape: tuple, codec: str, configs: dict, shared: int) -> None:
    """Blocks every client reads: ``shared`` chunks in main (warm) and in the cold tier, lookup keys."""
    import kvtier
    from kvtier.runtime import api

    kvtier.init(namespace="main", config=dict(configs["main"], codec=codec))
    kvtier.put(keys_for(f"{tag}-shared", shared), [kv_for(shape, 100 + i) for i in range(shared)])
    small = (1, 2, 1, 256, 8)
    kvtier.put(keys_for("lookup", LOOKUP_BATCH), [kv_for(small, i) for i in range(LOOKUP_BATCH)], codec="none")
    kvtier.init(namespace="cold", config=dict(configs["cold"], codec=codec))
    ck = keys_for(f"{tag}-cold", shared)
    for i, k in enumerate(ck):
        kvtier.put(k, kv_for(shape, 200 + i))
    end = time.monotonic() + 120
    while kvtier.stats()["cold"]["blocks"] < shared - 1 and time.monotonic() < end:
        time.sleep(0.1)
    api._get_client().hot.clear()


def summarize(results: list[list[dict]], shape: tuple) -> list[dict]:
    rows = []
    for name in [r["phase"] for r in results[0]]:
        per = [next(r for r in res if r["phase"] == name) for res in results]
        lat = np.array(sum((p["lat"] for p in per), []))
        wall = max(p["t1"] for p in per) - min(p["t0"] for p in per)
        total = sum(p["bytes"] for p in per)
        parts = [q for p in per for q in p.get("parts", []) if q]
        rows.append({"phase": name, "clients": len(results), "ops": len(lat), "wall_s": wall,
                     "rate": total / wall, "p50_ms": 1e3 * float(np.percentile(lat, 50)),
                     "p99_ms": 1e3 * float(np.percentile(lat, 99)),
                     "parts": {k: 1e3 * float(np.median([q[k] for q in parts])) for k in parts[0]} if parts else {}})
    return rows


def object_store_bytes(address: str) -> int | None:
    """Plasma bytes in use on the cluster, from Ray's memory summary (None if Ray does not say)."""
    import re

    try:
        from ray._private.internal_api import memory_summary

        m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=address, stats_only=True))
    except Exception:  # noqa: BLE001 - a private API: the table then says "not measured"
        return None
    return int(m.group(1)) << 20 if m else None


def baselines(shape: tuple, codec: str, ops: int, tmp: str) -> list[dict]:
    import ray

    import kvtier

    kv = kv_for(shape, 0)
    raw = raw_bytes(shape)
    arr = kv.view(torch.uint8).numpy()
    rows = []

    def measure(name, fn, count):
        lat = []
        for i in range(count):
            s = time.perf_counter()
            fn(i)
            lat.append(time.perf_counter() - s)
        lat = np.array(lat)
        rows.append({"phase": name, "clients": 1, "ops": count, "wall_s": float(lat.sum()),
                     "rate": raw * count / float(lat.sum()), "p50_ms": 1e3 * float(np.percentile(lat, 50)),
                     "p99_ms": 1e3 * float(np.percentile(lat, 99))})

    measure("baseline compress", lambda i: kvtier.compress(kv, codec), ops)  # what put cannot avoid
    refs = []
    measure("baseline ray.put raw", lambda i: refs.append(ray.put(arr)), ops)
    measure("baseline ray.get raw", lambda i: ray.get(refs[i % len(refs)]), ops)
    # the same bytes handed over as a tensor the caller owns (a copy out of plasma): what a get must deliver
    measure("baseline ray.get owned", lambda i: torch.from_numpy(ray.get(refs[i % len(refs)]).copy()), ops)
    del refs
    path = os.path.join(tmp, "pickle.zlib")

    def pz_put(i):
        with open(path, "wb") as f:
            f.write(zlib.compress(pickle.dumps(kv)))

    def pz_get(i):
        with open(path, "rb") as f:
            pickle.loads(zlib.decompress(f.read()))  # the baseline being measured; kvtier never unpickles

    measure("baseline pickle+zlib put", pz_put, 3)
    measure("baseline pickle+zlib get", pz_get, 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,8", help="client counts (comma-separated)")
    ap.add_argument("--ops", type=int, default=12, help="operations per client per phase")
    ap.add_argument("--cases", default="llama8b:none,smollm2:none,smollm2:kivi4",
                    help="shape:codec pairs (shapes: %s)" % ",".join(SHAPES))
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "tiers.md"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    import ray

    import kvtier
    from kvtier.runtime import api

    load = [os.getloadavg()[0]]  # the machine is shared: the 1-minute load average says how much
    tmp = tempfile.mkdtemp(prefix="kvtb", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.path.join(tmp, "ray"), log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    clients = [int(c) for c in args.clients.split(",")]
    cases = [tuple(c.split(":")) for c in args.cases.split(",")]
    report, mem = [], []
    try:
        for run, (shape_name, codec) in enumerate(cases):
            shape = SHAPES[shape_name]
            one = kvtier.compress(kv_for(shape, 0), codec, key=keys_for("x", 1)[0]).nbytes
            shared = 8
            configs = {
                "main": dict(hot_bytes=4 * one, warm_bytes=max(64 * one, 1 << 30), num_shards=2,
                             cold_uri=os.path.join(tmp, "cold-main"), rpc_timeout_s=30.0),
                "cold": dict(hot_bytes=4 * one, warm_bytes=one, num_shards=1,
                             cold_uri=os.path.join(tmp, f"cold-{run}"), rpc_timeout_s=30.0),
                "wt": dict(hot_bytes=4 * one, warm_bytes=max(64 * one, 1 << 30), num_shards=2, write_through=True,
                           cold_uri=os.path.join(tmp, "cold-wt"), rpc_timeout_s=30.0),
            }
            tag = f"{shape_name}-{codec}"
            prepare(tag, shape, codec, configs, shared)
            for n in clients:
                bdir = tempfile.mkdtemp(dir=tmp)
                spec = {"address": address, "n": n, "barrier": bdir, "shape": shape, "tag": tag, "codec": codec,
                        "ops": args.ops, "configs": configs, "shared": shared, "run": f"{run}-{n}"}
                print(f"[{tag}] {n} client(s)...", flush=True)
                if n == 1:
                    results = [run_phases(dict(spec, me=0, clock_offset=0.0))]
                else:
                    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(dict(spec, me=i))],
                                              stdout=subprocess.PIPE, text=True) for i in range(n)]
                    results = []
                    for p in procs:
                        stdout, _ = p.communicate(timeout=1800)
                        line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
                        if p.returncode != 0 or not line:
                            raise RuntimeError(f"bench worker failed with status {p.returncode}")
                        results.append(json.loads(line[-1][7:]))
                for row in summarize(results, shape):
                    report.append(dict(row, case=tag, raw=raw_bytes(shape)))
            for row in baselines(shape, codec, args.ops, tmp):
                report.append(dict(row, case=tag, raw=raw_bytes(shape)))
            held = budget = 0
            for ns in ("main", "cold", "wt"):
                kvtier.init(namespace=ns, config=dict(configs[ns], codec=codec))
                for s in kvtier.stats()["shards"]:
                    mem.append({"case": tag, "shard": f"{ns}/{s['id']}", "bytes": s.get("bytes", 0),
                                "capacity": s.get("capacity_bytes", 0), "index": s.get("index_bytes", 0)})
                    held, budget = held + s.get("bytes", 0), budget + s.get("capacity_bytes", 0)
            plasma = object_store_bytes(address)
            if plasma is not None:  # what the node's object store really holds: all tiers, hot tiers' reads, in flight
                mem.append({"case": tag, "shard": "object store of the node (all of the above + in flight)",
                            "bytes": plasma, "capacity": budget, "index": held, "total": True})
            for ns in ("main", "cold", "wt"):
                api.stop_tier(ns)
            load.append(os.getloadavg()[0])
    finally:
        kvtier.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    text = render(report, mem, argv, load)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


def render(report: list[dict], mem: list[dict], argv, load: list[float]) -> str:
    import datetime

    cpu = platform.processor() or platform.machine()
    lines = [
        "# Tier benchmark (bench/tiers.py)", "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- device: {os.cpu_count()} CPU cores ({cpu}), no GPU; torch {torch.__version__}, "
        f"ray {__import__('ray').__version__}, Python {platform.python_version()}",
        f"- command: `python bench/tiers.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- 1-minute load average at the start and after each case: {', '.join(f'{x:.1f}' for x in load)} "
        "(the machine is shared with other work; on 2 cores every figure scales with it)",
        "- GB/s = raw (uncompressed bf16) KV bytes per second over the phase's wall time, all clients together;"
        " lookup rates are keys/s in batches of 64. p50/p99 per operation.",
        "- 8 clients = 8 client processes plus the shard and controller actors on the same 2 cores: those rows"
        " measure CPU contention more than the tier. kivi4 runs the codec's torch reference path here (no GPU).",
        "- Baselines (same process, same run): `ray.get raw` returns a zero-copy read-only view (no checksum, no"
        " copy out); `ray.get owned` is that plus the copy that makes it the caller's tensor, which is what a tier"
        " get delivers (after verifying the XXH3-128 checksum and decoding); `compress` is `kvtier.compress` of"
        " the chunk alone (encode + checksum), the floor of a put.", "",
        "| case | operation | clients | ops | GB/s raw (total) | GB/s per client | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report:
        if r["phase"] == "lookup":
            rate = f"{r['rate']:,.0f} keys/s"
            per = f"{r['rate'] / r['clients']:,.0f} keys/s"
        else:
            rate, per = f"{r['rate'] / 1e9:.2f}", f"{r['rate'] / 1e9 / r['clients']:.2f}"
        lines.append(f"| {r['case']} | {r['phase']} | {r['clients']} | {r['ops']} | {rate} | {per} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    lines += ["", "## Aims (issue 3, this 2-core machine), computed from the rows above", ""]
    for r in report:
        if r["clients"] != 1:
            continue
        if r["phase"] == "get warm":
            ok = r["rate"] >= 1e9 and r["p99_ms"] <= 50
            lines.append(f"- {r['case']}: warm get of one chunk {r['rate'] / 1e9:.2f} GB/s raw per client (aim >= 1), "
                         f"p99 {r['p99_ms']:.1f} ms (aim <= 50): **{'met' if ok else 'missed'}**")
        if r["phase"] == "lookup":
            lines.append(f"- {r['case']}: batched lookups {r['rate']:,.0f} keys/s (aim >= 20,000): "
                         f"**{'met' if r['rate'] >= 20000 else 'missed'}**")
    one = {(r["case"], r["phase"]): r for r in report if r["clients"] == 1}
    for case in dict.fromkeys(r["case"] for r in report):
        warm, own = one.get((case, "get warm")), one.get((case, "baseline ray.get owned"))
        batch, put, comp = one.get((case, "get warm x8")), one.get((case, "put")), one.get((case, "baseline compress"))
        if warm and own:
            x = warm["rate"] / own["rate"]
            ok = warm["rate"] >= 2e9 and x >= 0.5
            p = warm.get("parts") or {}
            why = (f" Median phases of one warm get (the client's own clock): "
                   + " + ".join(f"{k} {v:.1f}" for k, v in p.items())
                   + f" ms of p50 {warm['p50_ms']:.1f} ms (locate: the controller call's wait; a repeat get uses"
                   " its cached location and waits only for what the fetch and load did not hide of the changes"
                   f" check's round trip), {p.get('locate', 0) / own['p50_ms']:.1f}x the whole `ray.get owned`."
                   if p else "")
            lines.append(f"- {case} (issue 10): warm get {warm['rate'] / 1e9:.2f} GB/s per client (aim >= 2), "
                         f"{x:.2f}x `ray.get owned` of the same bytes (aim >= 0.5): **{'met' if ok else 'missed'}**."
                         + why)
        again = one.get((case, "get warm again"))
        if again and own:
            x = again["rate"] / own["rate"]
            p = again.get("parts") or {}
            lines.append(f"- {case} (issue 10): warm get of a chunk read before (its location cached) "
                         f"{again['rate'] / 1e9:.2f} GB/s per client (aim >= 2), {x:.2f}x `ray.get owned` (aim >= 0.5): "
                         f"**{'met' if again['rate'] >= 2e9 and x >= 0.5 else 'missed'}**. Median phases: "
                         + " + ".join(f"{k} {v:.1f}" for k, v in p.items()) + f" ms of p50 {again['p50_ms']:.1f} ms.")
        if warm and batch:
            lines.append(f"- {case} (issue 10): batched warm get {batch['rate'] / 1e9:.2f} GB/s vs single "
                         f"{warm['rate'] / 1e9:.2f} GB/s (aim: batched >= single): "
                         f"**{'met' if batch['rate'] >= warm['rate'] else 'missed'}**")
        if put and comp:
            x = put["p50_ms"] / comp["p50_ms"]
            lines.append(f"- {case} (issue 10): put p50 {put['p50_ms']:.1f} ms = {x:.2f}x compress alone "
                         f"({comp['p50_ms']:.1f} ms; aim <= 1.3x): **{'met' if x <= 1.3 else 'missed'}**")
    within = all(m["bytes"] <= m["capacity"] for m in mem if m["capacity"] and not m.get("total"))
    lines.append(f"- every warm shard within its budget at the end of every case: **{'met' if within else 'missed'}**")
    lines += ["", "## Memory held by the warm shards (every tier of the run, end of each case)", "",
              "The last row of each case is the node's object store as Ray reports it (MiB resolution), against"
              " the sum of the shard budgets and of what the shards say they hold; the object store also holds"
              " objects still referenced by readers and puts in flight.", "",
              "| case | shard | bytes held | budget | index says |", "|---|---|---:|---:|---:|"]
    for m in mem:
        lines.append(f"| {m['case']} | {m['shard']} | {m['bytes']:,} | {m['capacity']:,} | {m['index']:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
