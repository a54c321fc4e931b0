"""Prefill -> decode handoff on one machine: the tier path against a direct NIXL pull.

    python bench/handoff.py [--chunks 5,32] [--codecs none,fp8] [--reps 5] [--out bench/results/handoff-cpu.md]

The P/D shape of the Serve app: a prefill process has just compressed and put a
prompt's chunks; a decode process needs them as KV tensors. A Ray actor plays
prefill: per repetition it makes fresh SmolLM2-shaped chunks ([30, 2, 3, 64, 64]
fp32, 64-token chunks as in tests/ray_apps/test_serve_pd.py: 2.8 MiB raw each),
stores them with ``kvtier.put`` (waits for ``kvtier.flush``: the shard holds
them, as decode's connector waits for) and publishes the same blocks' bytes
with ``kvtier.transport.NixlTransport``. The driver plays decode, timing:

    tier       kvtier.get(keys): locate at the controller, ray.get from the warm shard, verify, decode
               (what the vLLM connector's decode does today)
    nixl       kvtier.transport.pull (metadata fetch from the source's listener, one READ of all blocks,
               verify) + kvtier.decompress of each block: the direct path issue 12 asks for; the
               connector does not use it yet, so this measures its parts, not a connector run;
               the metadata wait (the transport's ``metadata_wait_us`` counter) is shown apart

Fresh keys every repetition, so the driver's own hot tier never serves a get.
Both paths must give identical tensors (asserted). The baseline is the tier
path in the same run; the ratio is tier time / nixl time (> 1: NIXL faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/kernels.py shadows `kernels`

import torch  # noqa: E402

SHAPE = (30, 2, 3, 64, 64)  # SmolLM2-135M, 64-token chunks, fp32 (the P/D test's engines)
NAMESPACE = "kvtier-bench-handoff"


def prefill_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Prefill:
        """The prefill side: puts chunks into the tier and publishes the same bytes over NIXL."""

        def __init__(self, gcs: str) -> None:
            import kvtier
            from kvtier.transport.nixl import NixlTransport

            kvtier.init(address=gcs, namespace=NAMESPACE)
            self.nixl = NixlTransport(lease_s=60)

        def save(self, tag: str, n: int, codec: str) -> tuple[list[str], dict]:
            import kvtier

            keys = [f"{tag}-{i}" for i in range(n)]
            g = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
            kvs = [torch.randn(SHAPE, generator=g) for _ in range(n)]
            blocks = kvtier.put(keys, kvs, codec=codec)
            assert kvtier.flush(120), "the puts reached the shard"
            desc = self.nixl.publish([(b.key, b.to_arrow()) for b in blocks])
            return keys, desc

        def leases(self) -> int:
            return self.nixl.stats()["open_leases"]

    return Prefill


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", default="5,32", help="chunks per handoff (5 = the P/D test's ~320-token prompt)")
    ap.add_argument("--codecs", default="none,fp8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results/handoff-cpu.md")
    args = ap.parse_args(argv)
    chunk_counts = [int(x) for x in args.chunks.split(",")]
    codecs = args.codecs.split(",")
    if args.reps < 1 or any(c < 1 for c in chunk_counts):
        raise SystemExit(f"--reps={args.reps} and --chunks={args.chunks} must be >= 1")

    import ray

    import kvtier
    from kvtier.transport import pull
    from kvtier.transport.nixl import NixlTransport

    load_start = load_avg()
    tmp = tempfile.mkdtemp(prefix="kvthand", dir="/tmp")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster for this run only
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    rows = []
    t_wall = time.perf_counter()
    try:
        kvtier.init(namespace=NAMESPACE, config={"num_shards": 1, "warm_bytes": "1GiB", "hot_bytes": "256MiB",
                                                   "chunk_tokens": SHAPE[3]})
        prefill = prefill_actor().remote(ray.get_runtime_context().gcs_address)
        sink = NixlTransport(lease_s=60)
        for codec in codecs:
            for n in chunk_counts:
                tier_s, nixl_s, meta_s, wire = [], [], [], 0
                for rep in range(args.reps + 1):  # rep 0 warms both paths (first contact, imports) and is dropped
                    keys, desc = ray.get(prefill.save.remote(f"{codec}-{n}-{rep}", n, codec), timeout=300)
                    wire = sum(b["len"] for b in desc["blocks"])
                    order = ("tier", "nixl") if rep % 2 else ("nixl", "tier")
                    out = {}
                    for path in order:
                        t0 = time.perf_counter()
                        if path == "tier":
                            got = kvtier.get(keys)
                        else:
                            meta0 = sink.counters["metadata_wait_us"]
                            blocks = pull(sink, desc, timeout_s=30)
                            if rep:
                                meta_s.append((sink.counters["metadata_wait_us"] - meta0) / 1e6)
                            got = [kvtier.decompress(b) if b is not None else None for b in blocks]
                        dt = time.perf_counter() - t0
                        assert all(g is not None for g in got), f"{path}: a miss in rep {rep}"
                        out[path] = got
                        if rep:
                            (tier_s if path == "tier" else nixl_s).append(dt)
                    assert all(torch.equal(a, b) for a, b in zip(out["tier"], out["nixl"])), "paths disagree"
                raw = n * torch.Size(SHAPE).numel() * 4
                t_med, n_med = statistics.median(tier_s), statistics.median(nixl_s)
                rows.append({"codec": codec, "chunks": n, "tokens": n * SHAPE[3], "raw_mib": raw / 2**20,
                             "wire_mib": wire / 2**20, "tier_ms": t_med * 1e3, "tier_max": max(tier_s) * 1e3,
                             "nixl_ms": n_med * 1e3, "nixl_max": max(nixl_s) * 1e3, "ratio": t_med / n_med,
                             "meta_ms": statistics.median(meta_s) * 1e3})
                r = rows[-1]
                print(f"{codec:5s} {n:3d} chunks ({r['tokens']:5d} tok, {r['wire_mib']:6.1f} MiB wire): "
                      f"tier {r['tier_ms']:7.1f} ms  nixl {r['nixl_ms']:7.1f} ms (metadata {r['meta_ms']:.1f})  "
                      f"tier/nixl {r['ratio']:.2f}x",
                      flush=True)
        leases = ray.get(prefill.leases.remote(), timeout=60)
    finally:
        kvtier.shutdown(stop=True)
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t_wall
    write(rows, args, load_start, load_avg(), wall, leases, argv)
    return 0


def write(rows, args, load_start, load_end, wall, leases, argv) -> None:
    lines = [
        "# Prefill -> decode handoff: tier path vs direct NIXL pull (CPU)", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared box), "
        f"torch {torch.__version__}",
        f"- command: `python bench/handoff.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- load average (1/5/15 min) at start: {load_start}; at end: {load_end}; wall {wall:.0f} s",
        f"- {args.reps} repetitions per row after one warm-up, median (and max) per handoff; "
        f"NIXL leases still open at the end: {leases}",
        "- chunk: SmolLM2-135M [30, 2, 3, 64, 64] fp32 (64 tokens, 2.8 MiB raw); prefill is a Ray actor "
        "(another process), decode the driver; fresh keys each repetition (no hot-tier hit)",
        "- tier = `kvtier.get` (controller locate + warm shard + verify + decode); nixl = `kvtier.transport.pull` "
        "(metadata fetch + one READ + verify) + `kvtier.decompress`. The vLLM connector uses the tier path; the "
        "NIXL path is not wired into it yet (issue 12), so its row measures the parts it would use.", "",
        "| codec | chunks | tokens | raw MiB | wire MiB | tier ms (max) | nixl ms (max) | of it nixl metadata ms "
        "| tier / nixl |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['chunks']} | {r['tokens']} | {r['raw_mib']:.1f} | {r['wire_mib']:.1f} | "
                     f"{r['tier_ms']:.1f} ({r['tier_max']:.1f}) | {r['nixl_ms']:.1f} ({r['nixl_max']:.1f}) | "
                     f"{r['meta_ms']:.1f} | {r['ratio']:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
