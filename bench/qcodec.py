"""GPU speed of the ``q*`` codec path (``kvtier.codecs.mix``) against its kernels alone and a device copy.

Times, in one run on the same input, median of CUDA-event-timed calls:
- a device-to-device copy of the input (the memory-bandwidth reference);
- the kernels alone (``kernels.mix.encode_triton`` / ``decode_triton``), with and without key weights;
- the codec's own path, ``MixCodec.encode`` / ``decode`` (the Codec API that ``kvtier.compress`` calls:
  the kernels, with the key weights fused into them, the weight and overflow checks, sink detection,
  the sink copy; not the D2H copy and Arrow framing of a block), with and without key weights;
on a Llama-8B-shaped chunk set ([32, 2, 8, 4096, 128] bf16 = 512 MiB) and on one 256-token chunk of
the same model (32 MiB: the size ``kvtier.compress`` sees, where per-call overheads show), with the
q5-like bit table 3/2/4/2 cycling over the slabs and lognormal key weights. Then a torch profile of one
weighted codec encode + decode (where the time outside the kernels goes), and a check that a
weighted block decodes on CUDA to within one bf16 ulp of the CPU decode of the same buffers.

    python bench/qcodec.py --out bench/results/qcodec-h200.md

``bench/kernels.py`` times every codec's kernels; this file is the q codecs' library path.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's kernels package, not bench/kernels.py

from kernels import mix as M  # noqa: E402
from kvtier.codecs.mix import MixCodec, detect_sinks  # noqa: E402

AIM_TBPS = 1.0  # issue 13: encode and decode of the q codecs at >= 1 TB/s of bf16 input on the H200


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` CUDA-event-timed calls after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def rows_for(shape, reps: int, seed: int):
    """[(label, encode s, decode s or None)] for one input shape, plus the codec and its inputs."""
    L, _, H, T, D = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    kv = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.exp(0.5 * torch.randn(L, H, D, device="cuda", generator=g)).to(torch.float16)
    bits = [(3, 2, 4, 2)[s % 4] for s in range(2 * L)]
    codec = MixCodec("q5")
    seed_ = codec.seed
    dst = torch.empty_like(kv)
    rows = [("device copy (baseline)", timed(lambda: dst.copy_(kv), reps), None)]
    for label, kw in (("kernels alone, unweighted", None), ("kernels alone, key weights", w)):
        bufs = M.encode_triton(kv, bits, seed_, kw)
        rows.append((label, timed(lambda: M.encode_triton(kv, bits, seed_, kw), reps),
                     timed(lambda: M.decode_triton(bufs, shape, torch.bfloat16, bits, seed_, kw), reps)))
    nrm = M.encode_triton(kv, bits, seed_, w)["nrm"]
    rows.append(("sink detection alone (detect_sinks on the row norms: part of the codec path)",
                 timed(lambda: detect_sinks(nrm), reps), None))
    for label, kw in (("codec path, unweighted", None), ("codec path, key weights", w)):
        bufs, params = codec.encode(kv, bits=bits, key_weights=kw)
        u8 = {k: v.contiguous().view(-1).view(torch.uint8) for k, v in bufs.items()}
        rows.append((label, timed(lambda: codec.encode(kv, bits=bits, key_weights=kw), reps),
                     timed(lambda: codec.decode(u8, params, shape, torch.bfloat16, torch.device("cuda")), reps)))
    return rows, codec, kv, w, bits


def table(shape, rows, nbytes) -> list[str]:
    out = [f"### {list(shape)} bf16 = {nbytes / 2**20:.0f} MiB", "",
           "| path | encode ms | encode TB/s | decode ms | decode TB/s |", "|---|---:|---:|---:|---:|"]
    for label, enc, dec in rows:
        d = "- | -" if dec is None else f"{1e3 * dec:.3f} | {nbytes / dec / 1e12:.2f}"
        out.append(f"| {label} | {1e3 * enc:.3f} | {nbytes / enc / 1e12:.2f} | {d} |")
    return out + [""]


def profile(codec, kv, w, bits) -> list[str]:
    """Self CUDA and CPU time per op of 5 weighted encode + decode calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as prof_

    bufs, params = codec.encode(kv, bits=bits, key_weights=w)
    u8 = {k: v.contiguous().view(-1).view(torch.uint8) for k, v in bufs.items()}
    shape = tuple(kv.shape)
    torch.cuda.synchronize()
    with prof_(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            codec.encode(kv, bits=bits, key_weights=w)
            codec.decode(u8, params, shape, torch.bfloat16, torch.device("cuda"))
        torch.cuda.synchronize()
    ka = p.key_averages()
    by_dev = ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60)
    by_cpu = ka.table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60)
    return ["### Profile: 5 weighted codec encode + decode calls of the 512 MiB set (torch.profiler)", "",
            "By self GPU time:", "", "```", by_dev.strip(), "```", "", "By CPU time (incl. children):", "",
            "```", by_cpu.strip(), "```", ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "qcodec-h200.md")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/qcodec.py times the CUDA path; no CUDA device here")
    load0 = os.getloadavg()[0]
    body: list[str] = []
    aims: list[str] = []
    big = None
    for shape in ((32, 2, 8, 4096, 128), (32, 2, 8, 256, 128)):
        rows, codec, kv, w, bits = rows_for(shape, a.reps, seed=0)
        nbytes = kv.numel() * kv.element_size()
        body += table(shape, rows, nbytes)
        for label, enc, dec in rows:
            if label.startswith("codec path"):
                for op, t in (("encode", enc), ("decode", dec)):
                    tb = nbytes / t / 1e12
                    aims.append(f"- {list(shape)[3]} tokens, {label}, {op}: {tb:.2f} TB/s "
                                f"({'met' if tb >= AIM_TBPS else 'missed'}; aim {AIM_TBPS})")
        if big is None:
            big = (codec, kv, w, bits)
        print("\n".join(body), flush=True)
    codec, kv, w, bits = big
    if not a.no_profile:
        body += profile(codec, kv, w, bits)
    # CUDA vs CPU decode of one weighted block (a slice: the torch reference is slow)
    small = kv[:2, :, :2, :256].contiguous()
    bufs, params = codec.encode(small, bits=[3, 2, 4, 2], key_weights=w[:2, :2])
    u8 = {k: v.contiguous().view(-1).view(torch.uint8) for k, v in bufs.items()}
    gpu = codec.decode(u8, params, tuple(small.shape), torch.bfloat16, torch.device("cuda")).float().cpu()
    cpu = codec.decode({k: v.cpu() for k, v in u8.items()}, params, tuple(small.shape), torch.bfloat16,
                       torch.device("cpu")).float()
    ulp = (gpu - cpu).abs() / (cpu.abs().clamp_min(2**-20) * 2**-8)
    lines = ["# q codec path on the GPU: the codec vs its kernels vs a device copy", "",
             f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}",
             f"- command: `python bench/qcodec.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- bits 3/2/4/2 cycling over the (layer, K/V) slabs; key weights exp(0.5 N(0,1)) fp16; median of "
             f"{a.reps} CUDA-event-timed calls; TB/s = bf16 input bytes / time",
             f"- 1-minute load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end", ""]
    lines += body + ["## Aims", ""] + aims + [
        "", f"- weighted block, CUDA vs CPU decode of the same buffers: {int((ulp > 1).sum())} of "
        f"{ulp.numel()} values differ by more than one bf16 ulp (max {float(ulp.max()):.2f} ulp)"]
    report = "\n".join(lines) + "\n"
    print(report)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
