"""Benchmark: vLLM pages <-> kvtier chunks (kvtier/vllm/pages.py) in TB/s of KV, on CUDA or CPU.

What the connector does per hit/save, without vLLM: ``gather`` copies whole chunks
out of paged per-layer tensors (a save), ``scatter`` writes chunks back into pages
(a load). Shapes are vLLM's: by default Llama-3-8B (32 layers, 8 KV heads,
head_dim 128, bf16), block 16, the CUDA flash-attention layout
``[2, num_blocks, block_size, kv_heads, head_dim]`` per layer, 256-token chunks
on shuffled blocks (a real block table is not contiguous). Both paths of
``gather``/``scatter`` are timed: ``torch`` (the reference, and the CPU engine's
path) and ``triton`` (kernels/pages.py, one launch for all layers; flash format,
CUDA only), each checked bit for bit against the other. Baseline, measured in
the same run: one contiguous ``copy_`` of the same number of bytes (the device's
copy roofline). TB/s counts KV bytes moved once (read+write = 2x traffic).

    python bench/pages.py                       # CUDA if present, else CPU (smaller default)
    python bench/pages.py --out $OUT/vllm-pages-h200.md

Needs torch and triton (the pages module is loaded by path: no kvtier, Ray or vLLM import).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the top-level kernels package (the Triton path)
_spec = importlib.util.spec_from_file_location("kvtier_pages", os.path.join(HERE, "..", "kvtier", "vllm", "pages.py"))
pages = sys.modules["kvtier_pages"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pages)


def timeit(fn, reps: int, dev: torch.device) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after 2 warm-ups (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


sweep_rows: list[str] = []  # --sweep: Triton tile / warp configurations (flash)


def run(args) -> list[dict]:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    L, H, D, bs = args.layers, args.kv_heads, args.head_dim, args.block_size
    per = args.chunk_tokens // bs
    rows = []
    for fmt in args.formats:
        nblocks = args.chunks * per + 1
        lay = pages.PageLayout(fmt, nblocks, bs, H, D, dtype)
        layers = [torch.randn(lay.shape(), device=dev, dtype=torch.float32).to(dtype) for _ in range(L)]
        g = torch.Generator().manual_seed(0)
        # a CPU block table, as the connector's worker passes it (its range check then costs no GPU sync)
        ids = (torch.randperm(nblocks - 1, generator=g)[: args.chunks * per] + 1).view(args.chunks, per)
        chunks = pages.gather(layers, lay, ids, args.chunk_tokens, impl="torch")
        nbytes = chunks.numel() * chunks.element_size()
        assert torch.equal(chunks[0, 0, 0, :, :bs], _first_block_k(layers[0], lay, int(ids[0, 0]))), "gather is wrong"
        flat_src = torch.empty(nbytes // chunks.element_size(), device=dev, dtype=dtype)
        flat_dst = torch.empty_like(flat_src)
        t_copy = timeit(lambda: flat_dst.copy_(flat_src), args.reps, dev)
        t_copy_pages = timeit(lambda: pages.copy_pages(layers, lay, ids, args.chunk_tokens), args.reps, dev)
        timed = [("contiguous copy (baseline)", t_copy),
                 ("copy_pages: blocks out, as they are (save, on the engine step)", t_copy_pages)]
        impls = ["torch"] + (["triton"] if fmt == "flash" and (dev.type == "cuda" or args.triton_cpu) else [])
        for impl in impls:
            got = pages.gather(layers, lay, ids, args.chunk_tokens, impl=impl)
            assert torch.equal(got.view(torch.uint8), chunks.view(torch.uint8)), f"{impl} gather differs from torch"
            del got
            before = [t.clone() for t in layers[:2]]
            pages.scatter(layers, lay, ids, chunks, impl=impl)  # the pages already hold chunks: bytes unchanged
            assert all(torch.equal(a, b) for a, b in zip(before, layers[:2])), f"{impl} scatter changed the pages"
            del before
            timed.append((f"gather ({impl}): pages -> chunks (save, all of it)",
                          timeit(lambda: pages.gather(layers, lay, ids, args.chunk_tokens, impl=impl), args.reps, dev)))
            timed.append((f"scatter ({impl}): chunks -> pages (load)",
                          timeit(lambda: pages.scatter(layers, lay, ids, chunks, impl=impl), args.reps, dev)))
        shuffled = chunks.flip(0).contiguous()  # other bytes: a scatter that writes nothing would pass above
        for impl in impls:
            pages.scatter(layers, lay, ids, shuffled, impl=impl)
            assert torch.equal(pages.gather(layers, lay, ids, args.chunk_tokens, impl="torch"), shuffled), \
                f"{impl} scatter then gather did not round-trip"
            pages.scatter(layers, lay, ids, chunks, impl="torch")
        if args.sweep and "triton" in impls:
            from kernels import pages as KP

            saved = KP.TILE, KP.NUM_WARPS
            for tile in (2048, 4096, 8192, 16384):
                for warps in (2, 4, 8):
                    KP.TILE, KP.NUM_WARPS = tile, warps
                    for op, fn in (("gather", lambda: pages.gather(layers, lay, ids, args.chunk_tokens, impl="triton")),
                                   ("scatter", lambda: pages.scatter(layers, lay, ids, chunks, impl="triton"))):
                        t = timeit(fn, args.reps, dev)
                        sweep_rows.append(f"| {op} | {tile} | {warps} | {t * 1e3:.3f} | {nbytes / t / 1e12:.3f} |")
            KP.TILE, KP.NUM_WARPS = saved
        for op, t in timed:
            rows.append({"format": fmt, "op": op, "tokens": args.chunks * args.chunk_tokens, "MiB": nbytes / 2**20,
                         "ms": t * 1e3, "TB/s": nbytes / t / 1e12, "vs copy": t_copy / t})
        del layers, chunks, shuffled, flat_src, flat_dst
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _first_block_k(t, lay, block):
    if lay.format == "flash":
        return t[0, block].permute(1, 0, 2)  # [H, bs, D]
    page = t[block].reshape(lay.kv_heads, 2, lay.block_size * lay.head_dim)[:, 0]
    return page.reshape(lay.kv_heads, lay.head_dim, lay.block_size).transpose(1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--chunks", type=int, default=None, help="chunks per call (default: 64 on CUDA = 16K tokens, 4 on CPU)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--formats", nargs="+", default=["flash", "cpu-vec"], choices=list(pages.FORMATS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="also time the Triton copy at other tile sizes / warp counts")
    p.add_argument("--triton-cpu", action="store_true", help="also time the Triton path on CPU (interpreter: slow)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "vllm-pages.md"))
    args = p.parse_args()
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.chunks is None:
        args.chunks = 64 if cuda else 4
    load0 = os.getloadavg()
    t0 = time.time()
    rows = run(args)
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    head = "| format | op | tokens | MiB | ms | TB/s | vs copy |\n|---|---|---:|---:|---:|---:|---:|"
    lines = [f"| {r['format']} | {r['op']} | {r['tokens']} | {r['MiB']:.0f} | {r['ms']:.3f} | {r['TB/s']:.3f} | "
             f"{r['vs copy']:.2f} |" for r in rows]
    table = "\n".join([head, *lines])
    print(table)
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    load1 = os.getloadavg()
    aims = [] if cuda else ["- (CPU run: the aim is for the H200)"]
    if cuda and "cpu-vec" in args.formats:
        aims.append("- cpu-vec: vLLM's CPU engine layout, timed here on the GPU for comparison only; on a CPU its "
                    "path is torch (Triton is not compiled there), so it has no GPU aim")
    for fmt in [f for f in args.formats if f == "flash"] if cuda else ():
        best = {k: max((r for r in rows if r["format"] == fmt and r["op"].startswith(k)), key=lambda r: r["TB/s"])
                for k in ("gather", "scatter")}
        aims += [f"- {fmt} {'save' if k == 'gather' else 'load'}: {r['TB/s']:.2f} TB/s ({r['op'].split(':')[0]}); "
                 f"aim >= 1 TB/s: {'met' if r['TB/s'] >= 1 else 'MISSED'}" for k, r in best.items()]
    text = (f"# vLLM pages <-> kvtier chunks\n\nDate: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  \n"
            f"Device: {dev_name}; torch {torch.__version__}  \nCommand: `{cmd}`  \n"
            f"Shape: {args.layers} layers, {args.kv_heads} KV heads, head_dim {args.head_dim}, {args.dtype}, block "
            f"{args.block_size}, {args.chunk_tokens}-token chunks on shuffled blocks, {args.chunks} chunks per call.  \n"
            "TB/s = KV bytes moved once / median time; 'vs copy' = time of one contiguous copy_ of the same bytes "
            "(baseline, same run) / time of the op (1.0 = copy speed).  \n"
            f"Load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
            f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; run time {time.time() - t0:.0f} s.\n\n" + table + "\n\n"
            "Aims (issue 11: save and load >= 1 TB/s of bf16 KV on the H200), best path of each:\n\n"
            + "\n".join(aims) + "\n"
            + ("" if not sweep_rows else "\nTriton copy configurations (flash; the rows above use kernels/pages.py's "
               "TILE / NUM_WARPS):\n\n| op | TILE | num_warps | ms | TB/s |\n|---|---:|---:|---:|---:|\n"
               + "\n".join(sweep_rows) + "\n"))
    print("\n".join(aims))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
