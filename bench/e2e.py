"""End-to-end benchmark: time to first token (TTFT) for a kvtier hit from each tier against recompute.

For each prompt length, TTFT is the time from having the token ids to the
first generated token (argmax of the last position's logits):
  recompute  a full prefill of the prompt;
  hit        chunk keys -> lookup -> get the prefix's blocks from one tier
             (hot / warm / cold) -> decompress onto the device -> rebuild the
             DynamicCache -> prefill only the uncached tail (at least the last
             token; with 256-token chunks a 16384-token prompt reuses 16128).
  floor      the ideal hit: only the tail's prefill, over KV already in the
             model's cache (built before the clock starts). No hit in this
             harness can beat it; hit - floor is kvtier's own share.
Both paths ask the model for the last position's logits only (``logits_to_keep=1``),
as a serving engine does, and both run the same forward (``--forward``):
``lean`` (the CPU default) is ``bench/lean_llama.py``, the model's own weights
with fused projections and few launches; ``graph`` (the CUDA default) is that
with the tail over a cache replayed as a captured CUDA graph, as a serving
engine runs such batches (transformers' eager forward left the 256-token tail
bound by Python and launches, 42-50 ms against 16.9 ms graphed on the H200, so
no hit could show more than ~13x); ``hf`` is transformers' forward with ``--attention``
(default ``gqa``: ``kvtier.hf.register_attention``, sdpa with ``enable_gqa``
and a lower-right causal bias, so a tail over cached KV does not expand the KV
heads; ``sdpa`` is transformers' own). A hit's cache has room for its tail
(``hf.chunks_to_cache(reserve=...)``: no whole-cache cat). Median of ``--reps`` timed repetitions after an
untimed first run; speedup = recompute / hit, both measured in this run.
The untimed first hit also checks correctness: its first token against
recompute's (must match with codec ``none``), the top-1 agreement over the
whole uncached tail, the tail logits' relative error, and the fetched KV's
relative error against what the prefill computed (0 with ``none``).

The tier is the real one, through the public API: ``kvtier.get`` on a Ray
tier (controller, warm shard actors, cold directory), started for the run
(``ray.init`` with up to 16 CPUs, then ``kvtier.init`` joins it) or joined if
Ray already runs here. hot = this process's hot tier (on the GPU with
``--device cuda``, filled by the put; on the CPU by a prefetch, since a CPU put
with a shard on the node is not kept twice); warm = the hot tier cleared, so the blocks come from the
shards' objects through the library's batched, pipelined load (threaded
checksums, pinned staging, H2D on a copy stream); cold = the warm copies
dropped too with the controller's ``forget`` (the cold copies come from
``write_through``). Ray travels to the GPU machine as wheels
(``bench/gpu_bundle.sh``). Baselines measured in the same run: recompute; on
CUDA the pinned host-to-device bandwidth (the floor of a warm get) and the
cold directory's direct-I/O read bandwidth (the floor of a cold hit).
Before each cold repetition the block files are evicted from the page cache
(``posix_fadvise(DONTNEED)``), so a cold hit reads the disk.

    python bench/e2e.py                  # CPU: SmolLM2-135M, 512..8192 tokens
    python bench/e2e.py --device cuda    # GPU: Llama-8B-shaped random bf16 model, 1K..16K tokens

Prints a table and writes ``bench/results/e2e-<device>.md`` (``--out``).
Not a throughput benchmark: one request at a time, batch 1.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# ``python bench/e2e.py`` puts bench/ first on sys.path, where bench/kernels.py would shadow the kernels
# package; the repo root goes there instead (the GPU machine has no installed kvtier)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import kvtier  # noqa: E402
from bench.lean_llama import LeanLlama  # noqa: E402
from kvtier import hf  # noqa: E402

TIERS = ("hot", "warm", "cold")
REPO = _HERE.parent
EVAL_TEXT = Path(os.environ.get("KVTIER_EVAL_TEXT", REPO.parent / "shared" / "data" / "eval-text"))
# Llama-3-8B's shape: 16K tokens of bf16 KV = 32 layers x 2 x 8 heads x 128 x 2 B = 128 KiB/token = 2 GiB
LLAMA8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=256, max_position_embeddings=512)


# ---- model and prompts --------------------------------------------------------------------------

def build_model(name: str, device: torch.device, dtype: torch.dtype | None = None, attention: str = "sdpa"):
    """(model, tokenizer or None, model_id). ``llama8b``/``tiny`` have random weights: timing does not depend on them.
    ``attention``: ``sdpa`` (transformers') or ``gqa`` (``kvtier.hf.register_attention``: the same results, no
    KV-head expansion for a tail over cached KV); recompute and hits run the same model either way."""
    impl = hf.register_attention() if attention == "gqa" else "sdpa"
    if name == "smollm2":
        from kvtier.model import load_model, model_id_for

        model, tok = load_model(dtype=dtype or torch.float32, device=device, progress=None)
        model.set_attn_implementation(impl)
        return model, tok, model_id_for(model)
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in ("llama8b", "tiny"):
        raise ValueError(f"--model {name!r}: expected smollm2, llama8b or tiny")
    config = LlamaConfig(**(LLAMA8B if name == "llama8b" else TINY), attn_implementation=impl)
    dtype = dtype or (torch.bfloat16 if name == "llama8b" else torch.float32)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: an fp32 8B model would need 32 GiB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), None, kvtier.model_fingerprint(f"bench-{name}", config.num_hidden_layers,
                                                      config.num_key_value_heads, config.head_dim, str(dtype)[6:])


def prompt_ids(n: int, tok, vocab: int) -> tuple[np.ndarray, str]:
    """``n`` token ids: the eval text (Python docs) through the tokenizer if there is one, else seeded random ids."""
    if tok is not None and EVAL_TEXT.is_dir():
        text = "\n".join(p.read_text(errors="replace") for p in sorted(EVAL_TEXT.rglob("*.rst.txt")))
        ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)
        if len(ids) >= n:
            return ids[:n], "Python 3.11 docs (tutorial, faq)"
    return np.random.default_rng(n).integers(0, vocab, n, dtype=np.int64), "random token ids"


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def forward(model, ids: torch.Tensor, cache=None, start: int = 0, keep: int = 1):
    """Logits of the last ``keep`` positions, and the cache."""
    out = model(ids[:, start:], past_key_values=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[0].float(), out.past_key_values


def kv_pool(model, tokens: int):
    """The fixed KV buffer a graphed tail reads (``LeanLlama(graphs=True)``), else None (a new one per cache)."""
    return model.kv_pool(tokens) if isinstance(model, LeanLlama) else None


def hit(model, ids: torch.Tensor, ids_np: np.ndarray, store, model_id: str, ct: int, keep: int = 1,
        marks: list | None = None, want: list | None = None):
    """A cache hit: keys -> lookup -> get -> rebuild the cache -> prefill the tail. Returns (logits, cached
    tokens, relative error of the fetched KV against ``want``). ``marks`` gets a synced clock after the get,
    the rebuild, the tail's return to Python (its kernels launched) and the tail's end."""
    keys = kvtier.chunk_keys(ids_np, model_id, ct)[: hf.reusable_chunks(len(ids_np), ct)]
    n = store.lookup(keys)
    kvs = store.get(keys[:n])
    if any(kv is None for kv in kvs):
        raise RuntimeError(f"{sum(kv is None for kv in kvs)} of {n} blocks vanished between lookup and get")
    err = None if want is None else float(sum((a.float() - b.float()).square().sum() for a, b in zip(kvs, want))
                                          / sum(b.float().square().sum() for b in want)) ** 0.5
    if marks is not None:
        marks.append(sync(ids.device))
    with torch.inference_mode():  # room for the tail: its KV is written in place, not cat onto the cache
        cache = hf.chunks_to_cache(kvs, model.config, reserve=len(ids_np) - n * ct, out=kv_pool(model, len(ids_np)))
    del kvs
    if marks is not None:
        marks.append(sync(ids.device))
    logits, _ = forward(model, ids, cache, n * ct, keep)
    if marks is not None:
        marks += [time.perf_counter(), sync(ids.device)]
    return logits, n * ct, err


# ---- the tier: where the blocks live ------------------------------------------------------------

class RayTier:
    """The real tier through the public API: a Ray started here (or the running one) and ``kvtier.init``."""

    def __init__(self, device: torch.device, cold_root: str, ct: int, hot_bytes: str, warm_bytes: str):
        import ray

        from kvtier.runtime import api

        self.cold_root, self.device = cold_root, device
        self.started_ray = not ray.is_initialized()
        if self.started_ray:  # the tier's actors and the load's threads get the machine's cores (16 on the H200)
            ray.init(num_cpus=min(16, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                     _temp_dir=tempfile.mkdtemp(prefix="kvtier-bench-ray-"))
        kvtier.init(namespace=f"kvtier-bench-{os.getpid()}", config=dict(
            hot_bytes=hot_bytes, warm_bytes=warm_bytes, num_shards=2, cold_uri=cold_root, write_through=True,
            codec="none", chunk_tokens=ct, rpc_timeout_s=60.0))
        self.client = api._get_client()
        self.lookup = kvtier.lookup
        self.cold_hits = 0

    def get(self, keys):
        return kvtier.get(keys, device=self.device)

    def put(self, keys, chunks, codec: str) -> tuple[int, int]:
        c0 = dict(self.client.counters)
        kvtier.put(keys, chunks, codec=codec)
        c = self.client.counters
        return c["put_bytes"] - c0["put_bytes"], c["raw_put_bytes"] - c0["raw_put_bytes"]

    def _tiers(self, keys) -> list:
        import ray

        bound = self.client._keys(list(keys))  # the tenant-bound keys the tiers store
        return [loc and loc.tier for loc in ray.get(self.client.controller.locate.remote(bound, pin=False), timeout=60)[0]]

    def _wait(self, keys, want: str, what: str) -> None:
        end = time.monotonic() + 120
        while (w := self._tiers(keys)) != [want] * len(keys):
            if time.monotonic() > end:
                raise RuntimeError(f"{what}: tiers are {sorted(set(map(str, w)))} after 120 s, expected all {want}")
            time.sleep(0.05)

    def prepare(self, tier: str, keys) -> None:
        # the put's stores (warm, and the cold write-through) run in the background: let them finish, or the
        # first hot rows are timed against 2 GB of stores sharing the host (their launch-bound tails were
        # 10-12 ms slower than the floor's on the H200)
        self.client.flush()
        if tier == "hot":
            bound = self.client._keys(list(keys))
            if any(k not in self.client.hot for k in bound):  # a CPU put with a shard here is not kept: prefetch
                kvtier.prefetch(list(keys)).result(timeout=120)
            missing = sum(k not in self.client.hot for k in bound)
            if missing:
                raise RuntimeError(f"{missing} of {len(keys)} blocks are not in the hot tier: raise --hot-bytes")
            return
        self.client.hot.clear()
        # a cold hit offers its blocks back to warm: let that land first (the flush above)
        if tier == "warm":
            self._wait(keys, "warm", "blocks did not settle in warm")
        else:
            # not "all warm first": a cold hit's promotions are offered to the store queue and skipped when it is
            # full (1 GiB: 16K tokens of bf16 `none` KV is 2.1 GB), so some blocks stay cold only; that was the
            # "did not settle in warm" failure of the 16K cold row. Every warm copy is dropped, whatever is warm.
            import ray

            ray.get(self.client.controller.forget.remote(self.client._keys(list(keys)), []), timeout=60)  # warm out
            self._wait(keys, "cold", "warm copies were not dropped")
            drop_page_cache(self.cold_root)
        self.cold_hits = self.client.served["cold"]["hits"]

    def served_cold(self) -> int:
        return self.client.served["cold"]["hits"] - self.cold_hits

    def phases(self) -> list | None:
        """The last get's phases as the client timed them: [(name, seconds), ...]."""
        return list(getattr(self.client, "last_get", {}).items()) or None

    def delete(self, keys) -> None:
        kvtier.delete(list(keys))

    def close(self) -> None:
        import ray

        kvtier.shutdown(stop=True)
        if self.started_ray:
            ray.shutdown()


def baselines(device: torch.device, nbytes: int, cold_root: str) -> dict:
    """Floors measured in this run: pinned and pageable H2D GB/s (CUDA), and the cold directory's
    direct-I/O read GB/s (O_DIRECT, 8 MiB reads: what a cold hit can read at most)."""
    out = {}
    if device.type == "cuda":
        n = max(nbytes, 64 << 20)
        for name, pin in (("pinned_h2d", True), ("pageable_h2d", False)):
            host = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
            host.fill_(1)
            dev = torch.empty(n, dtype=torch.uint8, device=device)
            dev.copy_(host, non_blocking=pin)
            times = []
            for _ in range(5):
                t0 = sync(device)
                dev.copy_(host, non_blocking=pin)
                times.append(sync(device) - t0)
            out[name] = n / min(times) / 1e9
            del host, dev
    path = os.path.join(cold_root, "direct-io-probe")
    n = max(min(nbytes, 2 << 30), 64 << 20) // (8 << 20) * (8 << 20)
    block = np.ones(8 << 20, dtype=np.uint8)
    with open(path, "wb") as f:
        for _ in range(n // block.size):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    try:
        import mmap

        buf = mmap.mmap(-1, 8 << 20)  # page-aligned, as O_DIRECT needs
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            t0, got = time.perf_counter(), 0
            while (k := os.readv(fd, [buf])) > 0:
                got += k
            out["direct_read"] = got / (time.perf_counter() - t0) / 1e9
        finally:
            os.close(fd)
    except OSError as e:  # tmpfs has no O_DIRECT
        out["direct_read_error"] = f"{type(e).__name__}: {e}"
    finally:
        os.remove(path)
    return out


def drop_page_cache(root: str) -> None:
    """Evict the cold files from the page cache: a cold hit must read the disk, not RAM."""
    for folder, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(folder, f), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_hits(model, ids, ids_np, backend, model_id: str, ct: int, tier: str, keys, reps: int, first: int):
    """Median seconds of ``reps`` hits from ``tier``, the stage times of one hit, and its get phases.

    On CUDA the staged hit is an extra one (its syncs would stop stages overlapping); on the CPU stages
    never overlap, so the first timed hit is the staged one (an 8K-token kivi4 hit costs ~10 s here)."""
    device, times, stages, parts = ids.device, [], None, None
    for i in range(reps + (device.type == "cuda")):
        backend.prepare(tier, keys)
        gc.collect()
        staged = i == 0
        marks = [sync(device)]
        logits, _, _ = hit(model, ids, ids_np, backend, model_id, ct, marks=marks if staged else None)
        end = sync(device)
        if int(logits[-1].argmax()) != first:
            raise RuntimeError(f"{tier} hit at {len(ids_np)} tokens changed its first token")
        if tier == "cold" and backend.served_cold() != len(keys):
            raise RuntimeError(f"cold hit at {len(ids_np)} tokens: only {backend.served_cold()} of {len(keys)} "
                               "blocks came from the cold tier")
        if staged:
            stages = [marks[1] - marks[0], marks[2] - marks[1], marks[3] - marks[2], marks[4] - marks[2]]
            parts = backend.phases()
        if not staged or device.type != "cuda":
            times.append(end - marks[0])
    return statistics.median(times), stages, parts


def time_floor(model, ids, chunks: list, cached: int, reps: int, tail_keep: int):
    """The ideal hit, measured like a hit minus kvtier: the tail's prefill over KV already in the model's
    cache (rebuilt from the prefill's own chunks before the clock starts, with the same room for the tail).
    Returns (median seconds, [0, 0, launched, tail] of one timed run, the untimed first run's tail logits).
    The second run is untimed too: the first with one logit kept (a graphed forward captures it there)."""
    device, times, stages, first = ids.device, [], None, None
    for i in range(reps + 2):
        with torch.inference_mode():
            cache = hf.chunks_to_cache(chunks, model.config, reserve=ids.shape[1] - cached,
                                       out=kv_pool(model, ids.shape[1]))
        gc.collect()
        t0 = sync(device)
        logits, _ = forward(model, ids, cache, cached, tail_keep if i == 0 else 1)
        launched = time.perf_counter()
        end = sync(device)
        del cache
        if i < 2:
            first = logits if i == 0 else first
            continue
        times.append(end - t0)
        stages = stages or [0.0, 0.0, launched - t0, end - t0]
    return statistics.median(times), stages, first


# ---- the run ----------------------------------------------------------------------------------

def run(args, checkpoint=lambda rows, info: None) -> tuple[list[dict], dict]:
    device = torch.device(args.device)
    model, tok, base_id = build_model(args.model, device, args.dtype and getattr(torch, args.dtype), args.attention)
    if args.forward in ("lean", "graph"):
        model = LeanLlama(model, graphs=args.forward == "graph")  # the same weights; recompute, floor and hits run it
    max_pos = int(model.config.max_position_embeddings)
    lengths = [n for n in args.lengths if n <= max_pos]
    notes = [f"lengths above max_position_embeddings={max_pos} dropped: {sorted(set(args.lengths) - set(lengths))}"
             ] if len(lengths) < len(args.lengths) else []
    cold_root = tempfile.mkdtemp(prefix="kvtier-bench-cold-", dir=args.cold_dir)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    floors = baselines(device, min(max(lengths, default=0) * per_token, (1 << 30) if device.type == "cuda" else 256 << 20),
                       cold_root) if args.baselines else {}
    print("  baselines:", ", ".join(f"{k} {v:.2f} GB/s" if isinstance(v, float) else f"{k} {v}" for k, v in floors.items()))
    backend = RayTier(device, cold_root, args.chunk_tokens, args.hot_bytes, args.warm_bytes)
    lo = backend.client.loader
    notes.append(f"load pipeline: {lo.threads} threads, runs of {lo.group_bytes / 2**20:g} MiB of blocks per work "
                 f"item (CUDA), copy + hash per {lo.copy_slice / 2**20:g} MiB, H2D per "
                 f"{lo.send_slice / 2**20:g} MiB; on CUDA a block made on the GPU (payload sums) is copied straight "
                 "from registered object-store pages and verified on the GPU (kernels.wsum), no host copy or hash; "
                 "Python's cyclic GC frozen after start-up and run between timed runs, "
                 "never inside one (as timeit does), for recompute and hits alike")
    # a full collection over the model's, Ray's and transformers' objects landed inside some timed tails (+16-30 ms
    # of a launch-bound 23 ms tail on the H200): freeze what exists now, collect only between timed runs
    gc.collect()
    gc.freeze()
    gc.disable()
    rows, ct, src = [], args.chunk_tokens, ""
    try:
        for n_tok in lengths:
            ids_np, src = prompt_ids(n_tok, tok, model.config.vocab_size)
            ids = torch.from_numpy(ids_np).to(device).unsqueeze(0)
            cached = hf.reusable_chunks(n_tok, ct) * ct
            tail = n_tok - cached
            ref_logits, cache = forward(model, ids, keep=tail)  # untimed first run: the KV to store + reference logits
            ref_top = ref_logits.argmax(-1)
            chunks = hf.cache_to_chunks(cache, ct)[: cached // ct]
            del cache
            reps = args.reps if n_tok < args.long_from else args.long_reps  # recompute and each hit
            times = []
            for _ in range(reps):
                gc.collect()
                t0 = sync(device)
                logits, _ = forward(model, ids)
                times.append(sync(device) - t0)
                if int(logits[-1].argmax()) != int(ref_top[-1]):
                    raise RuntimeError(f"recompute at {n_tok} tokens is not deterministic")
            recompute = statistics.median(times)
            rows.append(dict(tokens=n_tok, tier="recompute", codec="-", cached=0, ttft=recompute, recompute=recompute,
                             first_ok=True, agree=1.0, rel=0.0, mb=0.0, ratio=None, stages=None, kv_err=None,
                             parts=None))
            say(rows[-1])
            floor, fstages, flogits = time_floor(model, ids, chunks, cached, reps, tail)
            ftop = flogits.argmax(-1)
            rows.append(dict(tokens=n_tok, tier="floor", codec="-", cached=cached, ttft=floor, recompute=recompute,
                             first_ok=int(ftop[-1]) == int(ref_top[-1]), agree=float((ftop == ref_top).float().mean()),
                             rel=float((flogits - ref_logits).norm() / ref_logits.norm()), mb=0.0, ratio=None,
                             stages=fstages, kv_err=0.0, parts=None))
            say(rows[-1])
            del flogits
            for codec in args.codecs:
                model_id = f"{base_id}|bench-codec={codec}"  # one key space per codec: both live in the tier at once
                keys = kvtier.chunk_keys(ids_np, model_id, ct)[: cached // ct]
                nbytes, raw = backend.put(keys, chunks, codec)
                for tier in args.tiers:
                    backend.prepare(tier, keys)
                    logits, got, kv_err = hit(model, ids, ids_np, backend, model_id, ct, keep=tail, want=chunks)
                    if got != cached:
                        raise RuntimeError(f"{tier} hit at {n_tok} tokens reused {got} tokens, expected {cached}")
                    top = logits.argmax(-1)
                    rel = float((logits - ref_logits).norm() / ref_logits.norm())
                    ttft, stages, parts = time_hits(model, ids, ids_np, backend, model_id, ct, tier, keys, reps,
                                                    int(top[-1]))
                    rows.append(dict(tokens=n_tok, tier=tier, codec=codec, cached=cached, ttft=ttft, recompute=recompute,
                                     first_ok=int(top[-1]) == int(ref_top[-1]), agree=float((top == ref_top).float().mean()),
                                     rel=rel, mb=nbytes / 1e6, ratio=raw / nbytes, stages=stages, kv_err=kv_err,
                                     parts=parts))
                    say(rows[-1])
                backend.delete(keys)
            # the floor again, after the hits: how far the launch-bound tail drifted over the run (shared host)
            again, _, _ = time_floor(model, ids, chunks, cached, reps, tail)
            notes.append(f"floor at {n_tok} tokens timed again after the hits: {again * 1e3:.1f} ms (before them: "
                         f"{floor * 1e3:.1f} ms)")
            del chunks
            checkpoint(rows, {"notes": notes + [f"partial: lengths after {n_tok} not run yet"], "floors": floors})
    finally:
        gc.enable()
        gc.unfreeze()
        backend.close()
        shutil.rmtree(cold_root, ignore_errors=True)
    from kvtier.tiers import host_pages

    pg = backend.client.loader.pages
    if device.type == "cuda":
        notes.append(f"object-store pages registered for direct copies: {pg.registered_bytes / 2**30:.2f} GiB in "
                     f"{pg.registered_s * 1e3:.0f} ms, at the first read of each {host_pages.WINDOW >> 20} MiB window (untimed "
                     f"first hits); refused {pg.refused}")
    notes.append(f"prompts: {src}; chunk_tokens={ct}; the last partial (or, for exact multiples, the last whole) "
                 "chunk is always recomputed")
    return rows, {"notes": notes, "max_pos": max_pos, "floors": floors}


# ---- output -----------------------------------------------------------------------------------

HEAD = ("tokens", "tier", "codec", "cached", "TTFT ms", "recompute ms", "speedup", "1st tok = recompute",
        "tail top-1 agree", "tail logit rel err", "KV rel err", "MB read", "ratio")
STAGES = ("tokens", "tier", "codec", "get ms", "get GB/s (MB read / get)", "rebuild ms", "kvtier ms (get + rebuild)",
          "tail ms (kernels launched after)", "get phases ms")


def cells(r: dict) -> list[str]:
    return [str(r["tokens"]), r["tier"], r["codec"], str(r["cached"]), f"{r['ttft'] * 1e3:.1f}",
            f"{r['recompute'] * 1e3:.1f}", f"{r['recompute'] / r['ttft']:.1f}x", "yes" if r["first_ok"] else "NO",
            f"{r['agree']:.3f}", f"{r['rel']:.1e}", "-" if r["kv_err"] is None else f"{r['kv_err']:.1e}",
            f"{r['mb']:.4g}", "-" if r["ratio"] is None else f"{r['ratio']:.2f}"]


def stage_cells(r: dict) -> list[str]:
    get, rebuild, launch, tail = (f"{x * 1e3:.1f}" for x in r["stages"])
    parts = " + ".join(f"{n} {x * 1e3:.1f}" for n, x in r["parts"]) if r["parts"] else "-"
    own = f"{(r['stages'][0] + r['stages'][1]) * 1e3:.1f}"
    gbs = f"{get_gbs(r):.2f}" if r["stages"][0] else "-"
    return [str(r["tokens"]), r["tier"], r["codec"], get, gbs, rebuild, own, f"{tail} ({launch})", parts]


def get_gbs(r: dict) -> float:
    """Serialized bytes fetched per second of the staged get."""
    return r["mb"] / 1e3 / r["stages"][0]


def say(r: dict) -> None:
    print("  " + " | ".join(cells(r)), flush=True)


def markdown(rows: list[dict], head=HEAD, fmt=cells) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r)) + " |" for r in rows])


def device_name(device: torch.device) -> tuple[str, str]:
    """(description, file tag): 'NVIDIA H100 80GB HBM3', 'h100'; or the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tag = next((t for t in ("h100", "h200", "a100", "l40s", "b200") if t in name.lower()), "gpu")
        return name, tag
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads", "cpu"


def aim(rows: list[dict], floors: dict) -> list[str]:
    """The aims of issue 10 on the GPU, at the longest prompt, best codec for each: warm >= 12x recompute,
    hot >= 20x, the warm get stage >= 80 % of the pinned H2D bandwidth, a cold get >= 80 % of direct-I/O reads."""
    longest = max((r["tokens"] for r in rows), default=0)
    out = []
    floor = next((r for r in rows if r["tier"] == "floor" and r["tokens"] == longest), None)
    if floor:
        out.append(f"Floor at {longest} tokens (the tail alone over KV already in the model's cache, this run): "
                   f"{floor['ttft'] * 1e3:.1f} ms = {floor['recompute'] / floor['ttft']:.1f}x recompute, the ideal hit"
                   + (f"; its kernels were all launched at {floor['stages'][2] / floor['stages'][3]:.0%} of its time"
                      + (" (launch-bound: it varies between measurements with the host's load)"
                         if floor["stages"][2] > 0.9 * floor["stages"][3] else "") if floor.get("stages") else "")
                   + ".")
    for tier, want in (("warm", 12), ("hot", 20)):
        cand = [r for r in rows if r["tier"] == tier and r["tokens"] == longest]
        if cand:
            best = max(cand, key=lambda r: r["recompute"] / r["ttft"])
            x = best["recompute"] / best["ttft"]
            bound = ""
            if floor and best["ttft"] < floor["ttft"]:
                bound = (f" This hit beat the floor ({floor['ttft'] * 1e3:.1f} ms): the tail varied more "
                         "than kvtier's share between the two measurements.")
            elif floor and x < want:
                budget = best["recompute"] / want - floor["ttft"]
                bound = (f" It needs kvtier's share (get + rebuild) <= {budget * 1e3:.1f} ms over the floor; this hit "
                         f"spent {(best['ttft'] - floor['ttft']) * 1e3:.1f} ms over it." if budget > 0 else
                         f" Unreachable here: the floor alone is {floor['recompute'] / floor['ttft']:.1f}x.")
            out.append(f"Aim: {tier} hit at {longest} tokens >= {want}x recompute. Best: {best['codec']}, {x:.1f}x: "
                       f"{'met' if x >= want else f'missed by {want / x:.2f}x'}.{bound}")
    for tier, floor, name in (("warm", "pinned_h2d", "pinned H2D"), ("cold", "direct_read", "direct-I/O read")):
        cand = [r for r in rows if r["tier"] == tier and r["tokens"] == longest and r["stages"]]
        if cand and isinstance(floors.get(floor), float):
            best = max(cand, key=get_gbs)
            f = get_gbs(best) / floors[floor]
            out.append(f"Aim: {tier} get stage >= 80 % of the {name} bandwidth ({floors[floor]:.2f} GB/s, this run). "
                       f"Best: {best['codec']}, {get_gbs(best):.2f} GB/s = {100 * f:.0f} %: "
                       f"{'met' if f >= 0.8 else 'missed'}.")
    return out


FORWARDS = {"graph": "bench/lean_llama.py, the tail over the cache replayed as a CUDA graph",
            "lean": "bench/lean_llama.py, eager", "hf": "transformers' eager forward, attention {attention}"}


def write_report(rows, info, args, path: Path, wall: float) -> None:
    import transformers

    dev, _ = device_name(torch.device(args.device))
    text = [f"# kvtier end-to-end benchmark: time to first token, hit vs recompute ({args.device})", "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- device: {dev}",
            f"- command: `python bench/e2e.py {' '.join(sys.argv[1:])}`",
            f"- model: {args.model} (forward: {FORWARDS[args.forward].format(attention=args.attention)}, the same for "
            f"recompute and hits); tier: kvtier.get on Ray (hot {args.hot_bytes}, warm {args.warm_bytes}, 2 shards, "
            f"cold directory, write-through); codecs: {', '.join(args.codecs)}; "
            f"timed repetitions of recompute and of each hit: {args.reps} below {args.long_from} tokens, "
            f"{args.long_reps} from there",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
            f"wall time {wall:.0f} s" + (f"; 1-min load average {args.load:.1f} at the start, {os.getloadavg()[0]:.1f} "
                                         f"at the end ({os.cpu_count()} cores)" if args.load is not None else ""),
            *[f"- {n}" for n in info["notes"]],
            "- baselines (this run): " + (", ".join(f"{k} {v:.2f} GB/s" if isinstance(v, float) else f"{k}: {v}"
                                                  for k, v in info.get("floors", {}).items()) or "not measured"), "",
            "TTFT = median of the timed repetitions; speedup = recompute / hit. Agreement and errors come from the "
            "untimed first hit: its first token against recompute's, top-1 agreement and relative logit error over "
            "the whole recomputed tail, and the relative error of the fetched KV against what the prefill computed. "
            "'MB read' = the blocks' serialized bytes fetched from the tier; ratio = raw KV bytes / serialized bytes.",
            "", markdown(rows), "",
            "One hit timed by stage (on CUDA an extra one, the device synced between stages, which the timed "
            "repetitions overlap; on the CPU the first timed repetition): get = keys, lookup, fetch, verify, "
            "transfer, decompress; rebuild = DynamicCache from the chunks (one copy per chunk into a buffer with room "
            "for the tail); kvtier ms = get + rebuild, kvtier's own share of the hit (the floor row's are 0: its cache "
            "is built before the clock); "
            "tail = prefill of the uncached tail to the first token (in brackets: when its kernels were all launched, "
            "i.e. the Python/launch time); get GB/s = serialized MB fetched / get ms; get phases: the client's own timing "
            "of the same get (locate = the controller call, or for locations cached from an earlier get the wait for "
            "the changes check and the hot tier's adoption after the load; fetch = time inside ray.get of the warm "
            "objects, run by run inside the load, overlapping the device copies of the run before; load = the rest "
            "of the load: read + verify + stage + H2D + decode in the pipeline).", "",
            markdown([r for r in rows if r["stages"]], STAGES, stage_cells), ""]
    text += aim(rows, info.get("floors", {})) + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", help="smollm2 (CPU default), llama8b (GPU default: random bf16 weights) or tiny")
    p.add_argument("--hot-bytes", help="this process's hot tier (default 6GiB on CUDA: 16K tokens of bf16 Llama-8B KV "
                   "is 2 GiB per codec; 1GiB on the CPU)")
    p.add_argument("--warm-bytes", help="the warm shards together (default 8GiB on CUDA, 2GiB on the CPU)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the H2D and direct-I/O floors (the smoke test)")
    p.add_argument("--lengths", help="prompt lengths in tokens, comma separated")
    p.add_argument("--codecs", help="comma separated (CPU default none,kivi4; GPU none,kivi4,rot4)")
    p.add_argument("--tiers", default=",".join(TIERS))
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="model and KV dtype (default: bfloat16 for llama8b, float32 otherwise)")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--forward", choices=("graph", "lean", "hf"),
                   help="the model forward both arms run: lean = bench/lean_llama.py (fused projections, few launches), "
                   "graph = lean with the tail over a cache replayed as a CUDA graph (CUDA default), "
                   "hf = transformers' eager forward with --attention (lean is the CPU default)")
    p.add_argument("--attention", choices=("gqa", "sdpa"), default="gqa",
                   help="with --forward hf, both arms' attention: gqa = kvtier.hf.register_attention (sdpa, enable_gqa, lower-right causal), "
                   "sdpa = transformers' (expands the KV heads for a masked tail)")
    p.add_argument("--reps", type=int, help="timed repetitions (CPU default 3, GPU 5)")
    p.add_argument("--long-reps", type=int, help="repetitions from --long-from tokens on (CPU default 2)")
    p.add_argument("--long-from", type=int, default=4096)
    p.add_argument("--torch-threads", type=int, help="torch CPU threads (default: torch's); 1 resists a busy machine")
    p.add_argument("--cold-dir", help="where the cold tier's temporary folder goes (default: the system temp dir)")
    p.add_argument("--out", help="report file, or a folder for e2e-<device>.md (default bench/results/)")
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.model = a.model or ("llama8b" if gpu else "smollm2")
    a.forward = a.forward or ("graph" if gpu else "lean")
    a.hot_bytes = a.hot_bytes or ("6GiB" if gpu else "1GiB")
    a.warm_bytes = a.warm_bytes or ("8GiB" if gpu else "2GiB")
    a.lengths = [int(x) for x in (a.lengths or ("1024,4096,8192,16384,16385" if gpu else "512,1024,2048,4096,8192")).split(",")]
    a.codecs = (a.codecs or ("none,kivi4,rot4" if gpu else "none,kivi4")).split(",")
    a.tiers = a.tiers.split(",")
    if bad := [t for t in a.tiers if t not in TIERS]:
        p.error(f"--tiers {bad}: expected some of {TIERS}")
    a.reps = a.reps or (5 if gpu else 3)
    a.long_reps = a.long_reps or (a.reps if gpu else 2)
    return a


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    args.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"e2e: {args.model} on {args.device}, kvtier.get on Ray, lengths {args.lengths}, codecs {args.codecs}")
    print("  " + " | ".join(HEAD), flush=True)
    out = Path(args.out or REPO / "bench" / "results")
    if out.is_dir():
        out = out / f"e2e-{device_name(torch.device(args.device))[1]}.md"
    # the report is rewritten after each prompt length: a run cut short still leaves what it measured
    rows, info = run(args, lambda r, i: write_report(r, i, args, out, time.perf_counter() - t0))
    write_report(rows, info, args, out, time.perf_counter() - t0)
    print("\n" + markdown(rows) + "\n\n" + markdown([r for r in rows if r["stages"]], STAGES, stage_cells))
    for n in info["notes"]:
        print("note:", n)
    for line in aim(rows, info.get("floors", {})):
        print(line)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
