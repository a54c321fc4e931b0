"""GPU speed of the ``q*`` codec path with and without query-weighted keys (``kvtier.codecs.mix``).

Times ``MixCodec.encode`` / ``decode`` — the codec's own path: the Triton
kernels of ``kernels/mix.py``, sink detection, and, with key weights, the torch
multiply (fp32 encode) and divide (fp32 decode, then the cast) around them —
on a Llama-8B-shaped chunk set ([32, 2, 8, 4096, 128] bf16 = 512 MiB), with
the q5-like bit table 3/2/4/2 cycling over the slabs. Baselines in the same
run: a device copy of the input (the memory-bandwidth reference) and the
unweighted path. Also checks that a weighted block decodes on CUDA to within
one bf16 ulp of the CPU decode of the same buffers.

    python bench/qcodec.py --out bench/results/qcodec-h200.md

Not ``bench/kernels.py`` (the kernels alone, owned by the kernel work); this
measures what the key weights add on top of them.
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

from kvtier.codecs.mix import MixCodec  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="32,2,8,4096,128")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "qcodec-h200.md")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/qcodec.py times the CUDA path; no CUDA device here")
    load0 = os.getloadavg()[0]
    shape = tuple(int(x) for x in a.shape.split(","))
    L, _, H, T, D = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.exp(0.5 * torch.randn(L, H, D, device="cuda", generator=g)).to(torch.float16)
    bits = [(3, 2, 4, 2)[s % 4] for s in range(2 * L)]
    codec = MixCodec("q5")
    nbytes = kv.numel() * kv.element_size()
    rows = [("device copy (baseline)", timed(lambda: kv.clone(), a.reps), None)]
    for label, kw in (("q5-like, unweighted", None), ("q5-like, key weights", w)):
        bufs, params = codec.encode(kv, bits=bits, key_weights=kw)
        u8 = {k: v.contiguous().view(-1).view(torch.uint8) for k, v in bufs.items()}
        enc = timed(lambda: codec.encode(kv, bits=bits, key_weights=kw), a.reps)
        dec = timed(lambda: codec.decode(u8, params, shape, torch.bfloat16, torch.device("cuda")), a.reps)
        rows.append((label, enc, dec))
    # CUDA vs CPU decode of one weighted block (a slice: the torch reference is slow)
    small = kv[:2, :, :2, :256].contiguous()
    bufs, params = codec.encode(small, bits=[3, 2, 4, 2], key_weights=w[:2, :2])
    u8 = {k: v.contiguous().view(-1).view(torch.uint8) for k, v in bufs.items()}
    gpu = codec.decode(u8, params, tuple(small.shape), torch.bfloat16, torch.device("cuda")).float().cpu()
    cpu = codec.decode({k: v.cpu() for k, v in u8.items()}, params, tuple(small.shape), torch.bfloat16,
                       torch.device("cpu")).float()
    ulp = (gpu - cpu).abs() / (cpu.abs().clamp_min(2**-20) * 2**-8)
    lines = ["# q codec path on the GPU: key weights vs none", "",
             f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}",
             f"- command: `python bench/qcodec.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- input: {list(shape)} bf16 = {nbytes / 2**20:.0f} MiB; bits 3/2/4/2 cycling over slabs; "
             f"median of {a.reps} CUDA-event-timed calls; TB/s = bf16 input bytes / time",
             f"- 1-minute load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end", "",
             "| path | encode ms | encode TB/s | decode ms | decode TB/s |", "|---|---:|---:|---:|---:|"]
    for label, enc, dec in rows:
        d = "" if dec is None else f"{1e3 * dec:.3f} | {nbytes / dec / 1e12:.2f}"
        lines.append(f"| {label} | {1e3 * enc:.3f} | {nbytes / enc / 1e12:.2f} | {d or '- | -'} |")
    lines += ["", f"- weighted block, CUDA vs CPU decode of the same buffers: {int((ulp > 1).sum())} of "
              f"{ulp.numel()} values differ by more than one bf16 ulp (max {float(ulp.max()):.2f} ulp)"]
    report = "\n".join(lines) + "\n"
    print(report)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
