"""Benchmark: time to first token of vLLM (CPU, SmolLM2-135M fp32) with and without the kvtier connector.

TTFT = wall time of ``LLM.generate`` with ``max_tokens=1`` for one prompt of N
real-text tokens (N = 512 .. 8K, the model's context), after a warm-up request.
Rows, each a separate engine state, all measured in this run:

  recompute        vLLM, prefix caching off, no connector (the baseline; also "miss without connector")
  vllm-prefix      vLLM's own in-memory prefix cache, same engine, the prompt's second request
  miss+connector   connector on, the prompt not in the tier (computes, then saves in the background)
  warm <codec>     a fresh engine process, the prompt's chunks in the warm tier (stored by an earlier engine
                   with that codec)
  cold <codec>     the same, after every warm copy is dropped (shards killed): chunks read from disk
  8 concurrent     8 prompts sharing a 2K-token prefix + 256 own tokens, one batch: time to the last first token

Engines (each a spawned EngineCore + worker, 20-110 s to start here): no connector
(prefix off), no connector (prefix on), then connector engines with codecs none,
fp8 and kivi4 in turn, each reading what the one before stored. The tier is this
process's (Ray + controller + shards, write-through cold tier in a temp dir).

    python bench/vllm.py                 # writes bench/results/vllm-cpu.md
    python bench/vllm.py --lengths 512 2048 --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
# this file is bench/vllm.py: with bench/ first on sys.path, `import vllm` would import this file
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.join(HERE, "..", "tests", "vllm"))
sys.path.insert(0, os.path.join(HERE, ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8000])
    p.add_argument("--codecs", nargs="+", default=["none", "fp8", "kivi4"])
    p.add_argument("--chunk-tokens", type=int, default=64,
                   help="the connector's chunk size (vLLM's prefix cache works in 32-token blocks; a hit recomputes "
                        "up to chunk_tokens-1 tail tokens, so 64 keeps that tail small)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of each hit (the best is reported)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "vllm-cpu.md"))
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    import kvtier
    from enginekit import connector_config, eval_tokens, generate, start_engine, stop_engine

    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="kvtbench", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    ns = f"bench-vllm-{uuid.uuid4().hex[:6]}"
    kvtier.init(namespace=ns, config=dict(codec="none", cold_uri=os.path.join(tmp, "cold"), hot_bytes=0,
                                          warm_bytes="8GiB", num_shards=2, write_through=True))
    lengths = args.lengths
    # one prompt set per use, disjoint text (the eval text has ~129K tokens: 4 sets of 15.6K, then the
    # concurrent prompts and the warm-up from 100K on), so that no row reads another row's blocks
    offset = 0

    def prompt_set(name: str) -> list[list[int]]:
        nonlocal offset
        out = []
        for n in lengths:
            out.append(eval_tokens(n, offset))
            offset += n
        assert offset < 100000, f"prompt sets need {offset} tokens of eval text"
        return out

    warm_up = eval_tokens(300, 100000)
    res: dict[tuple[str, int], float] = {}
    first_tok: dict[tuple[str, int], str] = {}

    def measure(llm, row: str, prompts: list[list[int]], reps: int = 1, expect_cached: bool | None = None):
        for ids in prompts:
            best = None
            for _ in range(reps):
                texts, cached, dt = generate(llm, [ids], max_tokens=1)
                if expect_cached is True and cached[0] == 0:
                    print(f"  warning: {row} at {len(ids)} tokens got no cached tokens", flush=True)
                best = dt if best is None else min(best, dt)
            res[(row, len(ids))] = best
            first_tok[(row, len(ids))] = texts[0]
            print(f"  {row:>16} {len(ids):>5} tokens: {best * 1e3:8.0f} ms (cached {cached[0]})", flush=True)

    shared = eval_tokens(1024, 101000)
    conc = [shared + eval_tokens(128, 104000 + i * 200) for i in range(8)]

    def concurrent(llm, row):
        _, cached, dt = generate(llm, conc, max_tokens=1)
        res[(row, 8)] = dt
        print(f"  {row:>16} 8 x {len(conc[0])} tokens: {dt * 1e3:8.0f} ms (cached {cached})", flush=True)

    print("engine: no connector, prefix caching off", flush=True)
    base_set = prompt_set("base")
    llm = start_engine(None)
    generate(llm, [warm_up], max_tokens=1)
    measure(llm, "recompute", base_set)
    concurrent(llm, "8 conc recompute")
    stop_engine(llm)

    print("engine: no connector, vLLM prefix caching on", flush=True)
    llm = start_engine(None, prefix_caching=True)
    generate(llm, [warm_up], max_tokens=1)
    measure(llm, "vllm-prefix miss", base_set)
    measure(llm, "vllm-prefix", base_set, reps=args.reps)
    generate(llm, [conc[0]], max_tokens=1)
    concurrent(llm, "8 conc vllm-prefix")
    stop_engine(llm)

    stored: list[tuple[str, list[list[int]]]] = []  # (codec, prompts) stored by an earlier engine
    for i, codec in enumerate(args.codecs + ["none"]):
        print(f"engine: connector, codec {codec} (fresh process)", flush=True)
        llm = start_engine(connector_config(ns, codec=codec, chunk_tokens=args.chunk_tokens))
        generate(llm, [warm_up], max_tokens=1)
        time.sleep(3)  # both engine processes finish joining the tier (in the background) before timing
        generate(llm, [warm_up], max_tokens=1)
        if stored:
            prev_codec, prev = stored[-1]
            measure(llm, f"warm {prev_codec}", prev, reps=args.reps, expect_cached=True)
        if i < len(args.codecs):
            s = prompt_set(codec)
            measure(llm, "miss+connector" if i == 0 else f"miss+connector {codec}", s)
            stored.append((codec, s))
            if i == 0:
                generate(llm, [conc[0]], max_tokens=1)
                time.sleep(2)  # its chunks are saved in the background
        else:  # the last engine: cold reads of every codec's prompts, then the concurrent batch from the tier
            for sid in range(2):
                ray.kill(ray.get_actor(f"kvtier-shard-{sid}", namespace=ns), no_restart=False)
            end = time.time() + 60
            while kvtier.stats()["warm"]["blocks"] and time.time() < end:
                time.sleep(0.5)
            for codec_s, s in stored:
                measure(llm, f"cold {codec_s}", s, expect_cached=True)
            concurrent(llm, "8 conc kvtier")
        stop_engine(llm)
        time.sleep(3)  # the last saves land before the next engine looks

    total = time.time() - t_start
    write(args, res, first_tok, lengths, total)
    kvtier.shutdown(stop=True)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def write(args, res, first_tok, lengths, total) -> None:
    rows = ["recompute", "vllm-prefix", "miss+connector"] + [f"warm {c}" for c in args.codecs] + \
           [f"cold {c}" for c in args.codecs]
    head = "| row | " + " | ".join(f"{n} tok" for n in lengths) + " |\n|---|" + "---:|" * len(lengths)
    lines = []
    for r in rows:
        cells = [f"{res[(r, n)] * 1e3:.0f}" if (r, n) in res else "-" for n in lengths]
        lines.append(f"| {r} (ms) | " + " | ".join(cells) + " |")
    for r in rows[1:]:
        cells = [f"{res[('recompute', n)] / res[(r, n)]:.2f}x" if (r, n) in res and ("recompute", n) in res else "-"
                 for n in lengths]
        lines.append(f"| recompute / {r} | " + " | ".join(cells) + " |")
    table = "\n".join([head, *lines])
    n4 = 4096 if 4096 in lengths else max(lengths)
    aims = []

    def ratio(a, b, n):
        return res[(a, n)] / res[(b, n)] if (a, n) in res and (b, n) in res else float("nan")

    r = ratio("recompute", "warm none", n4)
    aims.append(f"- warm hit (none) >= 5x faster than recompute at {n4}: {r:.2f}x -> {'met' if r >= 5 else 'missed'}")
    r = ratio("warm none", "vllm-prefix", n4)
    aims.append(f"- warm hit (none) within 1.5x of vLLM's prefix cache at {n4}: {r:.2f}x -> "
                f"{'met' if r <= 1.5 else 'missed'}")
    for n in lengths:
        r = ratio("miss+connector", "recompute", n)
        aims.append(f"- miss with connector <= 1.05x of no connector at {n}: {r:.3f}x -> {'met' if r <= 1.05 else 'missed'}")
    aims.append("- identical text with `none`: asserted by tests/vllm/test_engine.py (miss, full and partial hit, "
                "fresh engine from warm and cold), not by this benchmark")
    conc = [f"| {k} | {res[(k, 8)] * 1e3:.0f} |" for k in ("8 conc recompute", "8 conc vllm-prefix", "8 conc kvtier")
            if (k, 8) in res]
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    load = os.getloadavg()
    text = (f"# vLLM + kvtier on CPU: time to first token\n\n"
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  \n"
            f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs; "
            f"load average at the end {load[0]:.1f}); vllm-cpu 0.32.0, SmolLM2-135M-Instruct fp32, block 32, "
            f"{args.chunk_tokens}-token chunks, prefix caching off unless named  \nCommand: `{cmd}` ({total:.0f} s)  \n"
            "TTFT = wall time of one `generate(max_tokens=1)`; hits are the best of "
            f"{args.reps}; every other cell one run. Baseline: `recompute` in the same run.\n\n"
            + table + "\n\n## Aims\n" + "\n".join(aims) +
            "\n\n## 8 concurrent requests sharing a 1024-token prefix (+128 own tokens each)\n"
            "| engine | time to the last first token (ms) |\n|---|---:|\n" + "\n".join(conc) + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
