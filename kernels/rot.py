"""Randomized Hadamard rotation + per-row uniform quantization: Triton kernel + torch reference.

Format (what ``kvtier.codecs.rot`` stores) for rows ``x`` of ``D`` values (one
token of one head of K or V; D a power of two, 16..256):
- rotation ``E = diag(s) @ H_D`` with ``H_D`` the Sylvester Hadamard matrix
  (entries +-1) and ``s`` the +-1 signs drawn from ``seed`` by splitmix64
  (pure integer arithmetic, so every machine and library version rebuilds the
  same signs from the seed in the block's params);
  ``y = x @ E / sqrt(D)`` is orthonormal: it spreads an outlier channel of
  keys over all D coordinates, so one per-row range suits every coordinate;
- per row an fp16 ``scale`` = (max y - min y) / (2**bits - 1) and fp16 ``zero``
  = min y; codes ``q = clamp(floor((y - zero)/scale + 1/2), 0, 2**bits-1)``
  packed along D by ``kernels.pack`` (planes ``q``/``q1``);
- decode: ``x^ = (scale * (q @ E.T) + zero * c) / sqrt(D)`` with ``c = 1 @ E.T``
  (``D * s[0]`` at index 0, else 0). ``q @ E.T`` is a product of small
  integers, exact in fp32 in any summation order; ``scale * t`` is exact too
  (11 bits of fp16 scale times |t| <= 15 * 256 < 2**12: 23 <= 24 bits) and
  ``zero * c`` is (c is 0 or +-D, a power of two), so the sum rounds once
  whether or not the GPU fuses it into an FMA: the tensor-core decode and the
  torch decode agree bit for bit. (kernels/mix.py's 8-bit codes break this
  bound, which is why it decodes centred codes instead.)
Bits per element: bits + 32/D (4.5 / 3.5 / 2.5 at D=64; 4.25 / 3.25 / 2.25 at D=128).

Error bound: in the rotated frame |y - y^| <= scale/2 + fp16 rounding of zero
+ (2**bits-1) * fp16 rounding of scale per coordinate; the rotation is
orthonormal, so a row's L2 error ||x - x^|| is at most sqrt(D) times that.

Encode codes of the two paths agree up to one step where y lies within fp32
rounding of a rounding boundary: the reference rotates in float64, the kernel
sums in fp32 on the tensor cores in its own order.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.kivi import quant_params, quantize, scale_params
from kernels.pack import PLANES, load_codes, out_value, out_view, pack_torch, store_codes, unpack_torch

# 64 rows of D=128 per block, 4 warps, 8 programs per SM: the fastest of 18 configurations tried on
# an H100 (encode 2.2 TB/s, decode 1.65 TB/s of bf16; kernels/NOTES.md)
TILE = 8192
NUM_WARPS = 4
PROGRAMS_PER_SM = 8
_M64 = (1 << 64) - 1


def signs(d: int, seed: int) -> list[int]:
    """d random +-1 from ``seed`` (splitmix64 of seed + i; top bit)."""
    out = []
    for i in range(d):
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        out.append(1 - 2 * ((z ^ (z >> 31)) >> 63))
    return out


@functools.lru_cache(maxsize=32)
def _rotation_cpu(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(d)
    and_ = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(and_)
    for b in range(d.bit_length()):
        parity ^= (and_ >> b) & 1
    h = 1 - 2 * parity  # Sylvester: H[i, j] = (-1) ** popcount(i & j)
    e = torch.tensor(signs(d, seed))[:, None] * h
    c = e.T.sum(0)  # = 1 @ E.T
    return e.to(torch.float32), c.to(torch.float32)


_DEV_CACHE: dict = {}


def rotation(d: int, seed: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(E [d, d] in ``dtype`` (+-1, exact in any float dtype), c [d] float32) on ``device``."""
    key = (d, seed, dtype, str(device))
    if key not in _DEV_CACHE:
        e, c = _rotation_cpu(d, seed)
        _DEV_CACHE[key] = (e.to(device=device, dtype=dtype).contiguous(), c.to(device))
    return _DEV_CACHE[key]


def inv_sqrt(d: int) -> float:
    """1/sqrt(d) rounded to float32, so both paths multiply by the same number."""
    return float(np.float32(1.0 / math.sqrt(d)))


# ---------------------------------------------------------------- torch reference
def encode_torch(x: torch.Tensor, bits: int, seed: int) -> dict[str, torch.Tensor]:
    """``x`` [..., D] -> {"q"(, "q1"): packed codes [..., D*b/8], "scale", "zero": fp16 [...]}."""
    d = x.shape[-1]
    qmax = (1 << bits) - 1
    e, _ = rotation(d, seed, torch.float64, x.device)
    y = ((x.double() @ e) * (1.0 / math.sqrt(d))).float()
    scale, zero, inv = quant_params(y.amin(-1), y.amax(-1), qmax)
    q = quantize(y, zero.unsqueeze(-1), inv.unsqueeze(-1), qmax)
    out = dict(zip(("q", "q1"), pack_torch(q, bits)))
    out.update(scale=scale, zero=zero)
    return out


def decode_torch(bufs: dict[str, torch.Tensor], shape, dtype: torch.dtype, bits: int, seed: int) -> torch.Tensor:
    d = shape[-1]
    lead = tuple(shape[:-1])
    planes = [bufs["q"]] + ([bufs["q1"]] if bits == 3 else [])
    q = unpack_torch([p.reshape(*lead, -1) for p in planes], bits, d).float()
    e, c = rotation(d, seed, torch.float32, q.device)
    t = q @ e.T  # small integers: exact
    s = bufs["scale"].reshape(lead).float().unsqueeze(-1)
    z = bufs["zero"].reshape(lead).float().unsqueeze(-1)
    return ((s * t + z * c) * inv_sqrt(d)).to(dtype)


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def load_rotation(e_ptr, D: tl.constexpr, TRANSPOSE: tl.constexpr):
    """E [D, D] (or E.T), +-1 in the launcher's dtype: loaded once per persistent program."""
    i = tl.arange(0, D)
    if TRANSPOSE:
        return tl.load(e_ptr + i[None, :] * D + i[:, None])
    else:
        return tl.load(e_ptr + i[:, None] * D + i[None, :])


@triton.jit
def rotate_rows(x, E, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    """x [R, D] (the input dtype) @ E [D, D] (+-1), summed in fp32: the encoders' Hadamard prologue
    (kernels/rot.py and kernels/mix.py). The caller scales by 1/sqrt(D)."""
    if UPCAST:  # the CPU interpreter multiplies bf16 as raw uint16 (triton 3.9 create_dot): same math in fp32
        acc = tl.dot(x.to(tl.float32), E.to(tl.float32), input_precision="ieee")
    elif SPLIT:
        # fp32 input: x = hi + mid + lo exactly, each a bf16 (8 significant bits each); three bf16
        # tensor-core products with E (+-1, exact) accumulate in fp32. An fp32 E would need 256 KiB of
        # shared memory at D=256 (measured: OutOfResources on the H100), tf32 would keep 11 bits of x.
        hi = x.to(tl.bfloat16)
        r = x - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(hi, E)
        acc = tl.dot(mid, E, acc)
        acc = tl.dot(lo, E, acc)
    else:  # bf16/fp16: +-1 * x is exact, products accumulate in fp32
        acc = tl.dot(x, E)
    return acc


@triton.jit
def _rot_encode_kernel(x_ptr, e_ptr, pa, pb, s_ptr, z_ptr, n_rows, rs,
                       D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, SPLIT: tl.constexpr,
                       UPCAST: tl.constexpr):
    # persistent: each program loads E once and walks row blocks pid, pid + nprog, ...
    i = tl.arange(0, D)
    E = load_rotation(e_ptr, D, False)
    QMAX: tl.constexpr = (1 << BITS) - 1
    for blk in range(tl.program_id(0), tl.cdiv(n_rows, R), tl.num_programs(0)):
        rows = blk * R + tl.arange(0, R)
        rmask = rows < n_rows
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + i[None, :], mask=rmask[:, None], other=0.0)
        acc = rotate_rows(x, E, UPCAST, SPLIT)
        y = acc * rs
        mn = tl.min(y, axis=1)
        mx = tl.max(y, axis=1)
        sh, s, inv = scale_params(mx - mn, QMAX)
        zh = mn.to(tl.float16)
        v = (y - zh.to(tl.float32)[:, None]) * inv[:, None]
        q = tl.minimum(tl.maximum(v + 0.5, 0.0), QMAX).to(tl.int32)
        tl.store(s_ptr + rows, sh, mask=rmask)
        tl.store(z_ptr + rows, zh, mask=rmask)
        store_codes(q, pa, pb, rows, i, rmask, D, R, D, BITS)


@triton.jit
def _rot_decode_kernel(pa, pb, s_ptr, z_ptr, e_ptr, c_ptr, o_ptr, n_rows, rs,
                       D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr):
    i = tl.arange(0, D)
    Et = load_rotation(e_ptr, D, True)  # E.T, fp16 +-1
    c = tl.load(c_ptr + i)
    for blk in range(tl.program_id(0), tl.cdiv(n_rows, R), tl.num_programs(0)):
        rows = blk * R + tl.arange(0, R)
        rmask = rows < n_rows
        q = load_codes(pa, pb, rows, rmask, D, R, D, BITS)
        t = tl.dot(q.to(tl.float16), Et)  # codes <= 15 are exact in fp16; sums <= 15*256 exact in fp32
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        x = (s[:, None] * t + z[:, None] * c[None, :]) * rs
        tl.store(o_ptr + rows[:, None].to(tl.int64) * D + i[None, :], out_value(x, BF16, o_ptr.dtype.element_ty),
                 mask=rmask[:, None])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _grid(n_rows: int, r: int, device: torch.device) -> int:
    nblk = triton.cdiv(n_rows, r)
    if device.type == "cuda":
        # several programs per SM keep enough loads in flight; E is loaded once per program
        return min(nblk, PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(nblk, 16)  # CPU interpreter: each program costs ~1 ms of Python, blocks are what matter


def encode_triton(x: torch.Tensor, bits: int, seed: int) -> dict[str, torch.Tensor]:
    d = x.shape[-1]
    x2 = x.contiguous()
    n = x2.numel() // d
    lead = tuple(x.shape[:-1])
    e, _ = rotation(d, seed, torch.float16 if x.dtype == torch.float16 else torch.bfloat16, x.device)
    planes = [torch.empty(*lead, d * b // 8, dtype=torch.uint8, device=x.device) for b in PLANES[bits]]
    out = dict(zip(("q", "q1"), planes))
    out["scale"], out["zero"] = (torch.empty(lead, dtype=torch.float16, device=x.device) for _ in range(2))
    r = max(16, TILE // d)
    _rot_encode_kernel[(_grid(n, r, x.device),)](x2, e, planes[0], planes[-1], out["scale"], out["zero"], n,
                                                 inv_sqrt(d), D=d, R=r, BITS=bits,
                                                 SPLIT=x.dtype == torch.float32,
                                                 UPCAST=_interpreting() and x.dtype != torch.float16,
                                                 num_warps=NUM_WARPS)
    return out


def decode_triton(bufs: dict[str, torch.Tensor], shape, dtype: torch.dtype, bits: int, seed: int) -> torch.Tensor:
    d = shape[-1]
    dev = bufs["q"].device
    n = math.prod(shape) // d
    out = torch.empty(shape, dtype=dtype, device=dev)
    e, c = rotation(d, seed, torch.float16, dev)
    pa = bufs["q"].contiguous()
    pb = bufs["q1"].contiguous() if bits == 3 else pa
    r = max(16, TILE // d)
    _rot_decode_kernel[(_grid(n, r, dev),)](pa, pb, bufs["scale"], bufs["zero"], e, c, out_view(out), n,
                                            inv_sqrt(d), D=d, R=r, BITS=bits, BF16=dtype == torch.bfloat16,
                                            num_warps=NUM_WARPS)
    return out
