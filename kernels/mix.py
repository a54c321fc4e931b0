"""Rotation + per-row quantization with a bit width per slab: Triton kernel + torch reference.

The ``q*`` codecs (``kvtier.codecs.mix``) store each slab — the K or the V of
one layer, ``kv_heads * tokens`` rows of ``D`` values, contiguous in a
``[L, 2, H, T, D]`` chunk — at its own bit width. Per row: the randomized
Hadamard rotation of ``kernels.rot`` (signs from the stored seed),
``y = x @ E / sqrt(D)``, then a *symmetric* quantizer with one fp16 scale
``s = max|y| / (qmax/2)`` (qmax = 2**bits - 1) and the implicit zero
``z = -(qmax/2) * s``: codes ``q = clamp(floor((y - z)/s + 1/2), 0, qmax)``,
``y^ = q*s + z``, packed along D by ``kernels.pack``. After the rotation a row
is near-Gaussian around ~0, so a stored per-row zero (rot's) buys little: it
costs 16/D bits (0.25 bit/elem at D=64, 8 % of a 3-bit budget), which buys more
as code bits in the slabs that need them.

Error bound per rotated coordinate: |y - y^| <= s/2 + (qmax/2) * fp16 rounding
of s (the range can fall short of max|y| by that), and ||x - x^|| <= sqrt(D)
times that per row (the rotation is orthonormal), plus the output rounding.

Layout for slab bit widths ``bits[s]`` (s = layer * 2 + kv):
- ``scale``: fp16 ``[L, 2, H, T]``, every row in chunk order;
- for each width ``b`` present, the codes of the slabs of that width, in slab
  order, as one packed ``[n_b * H * T, D*b/8]`` plane (two, low 2 bits and high
  bit, for b = 3: ``kernels.pack`` layout).
One launch per width present (<= 3): each program maps its block of "virtual"
rows (rows of the width's slabs, in order) to chunk rows through the slab table,
so nothing is gathered or copied (a gather would move the input twice and halve
the kernel's TB/s).

Both paths compute per row what ``kernels.rot`` computes; codes agree up to one
step where y lies within fp32 rounding of a rounding boundary (the reference
rotates in float64, the kernel sums in fp32 on the tensor cores), scales by one
fp16 ulp likewise (tests/kernels/test_mix.py counts them). Decoders agree bit
for bit on the same buffers (integer codes times +-1 are exact).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import rot as RT
from kernels.kivi import quantize
from kernels.pack import PLANES, load_codes, out_value, out_view, pack_torch, store_codes

# 1 bit with a per-row range was useless in screening; 5..7 would need new pack planes; 8 is the near-lossless step
WIDTHS = (2, 3, 4, 8)


def width_slabs(bits: list[int]) -> dict[int, list[int]]:
    """{width: slab ids in order} for the widths present."""
    out: dict[int, list[int]] = {}
    for s, b in enumerate(bits):
        out.setdefault(b, []).append(s)
    return dict(sorted(out.items()))


def plane_names(b: int) -> tuple[str, ...]:
    return (f"q{b}", f"q{b}h") if b == 3 else (f"q{b}",)


# ---------------------------------------------------------------- torch reference
def encode_torch(kv: torch.Tensor, bits: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Also returns ``nrm``: fp32 [L, 2, H, T] squared row norms (for sink detection; not stored)."""
    L, _, H, T, D = kv.shape
    e, _ = RT.rotation(D, seed, torch.float64, kv.device)
    x = kv.reshape(L * 2, H * T, D)
    scale = torch.empty(L * 2, H * T, dtype=torch.float16, device=kv.device)
    nrm = torch.empty(L * 2, H * T, dtype=torch.float32, device=kv.device)
    out: dict[str, torch.Tensor] = {}
    for b, slabs in width_slabs(bits).items():
        idx = torch.tensor(slabs, device=kv.device)
        qmax = (1 << b) - 1
        y = ((x[idx].double() @ e) * (1.0 / math.sqrt(D))).float()
        sc = (y.abs().amax(-1) / (qmax * 0.5)).to(torch.float16)
        s32 = sc.float()
        inv = torch.where(s32 > 0, 1.0 / torch.where(s32 > 0, s32, 1.0), 0.0)
        q = quantize(y, implicit_zero(s32, qmax).unsqueeze(-1), inv.unsqueeze(-1), qmax)
        for name, plane in zip(plane_names(b), pack_torch(q.reshape(-1, D), b)):
            out[name] = plane
        scale[idx], nrm[idx] = sc, y.square().sum(-1)
    out["scale"] = scale.reshape(L, 2, H, T)
    out["nrm"] = nrm.reshape(L, 2, H, T)
    return out


def implicit_zero(s32: torch.Tensor, qmax: int) -> torch.Tensor:
    """z = -(qmax/2) * s in fp32: exact (an 11-bit fp16 scale times <= 8 bits of qmax/2)."""
    return -(qmax * 0.5) * s32


def decode_torch(bufs: dict[str, torch.Tensor], shape, dtype: torch.dtype, bits: list[int], seed: int) -> torch.Tensor:
    L, _, H, T, D = shape
    out = torch.empty(L * 2, H * T, D, dtype=dtype, device=bufs["scale"].device)
    scale = bufs["scale"].reshape(L * 2, H * T)
    for b, slabs in width_slabs(bits).items():
        idx = torch.tensor(slabs, device=out.device)
        sub = {"q": bufs[plane_names(b)[0]], "scale": scale[idx],
               "zero": implicit_zero(scale[idx].float(), (1 << b) - 1)}  # rot's decoder with the implicit zero
        if b == 3:
            sub["q1"] = bufs[plane_names(b)[1]]
        out[idx] = RT.decode_torch(sub, (len(slabs), H * T, D), dtype, b, seed)
    return out.reshape(shape)


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def _src_rows(slab_ptr, v, vmask, RPS):
    slab = tl.load(slab_ptr + v // RPS, mask=vmask, other=0)
    return slab.to(tl.int64) * RPS + v % RPS


@triton.jit
def _mix_encode_kernel(x_ptr, e_ptr, slab_ptr, pa, pb, s_ptr, n_ptr, n_rows, RPS, rs,
                       D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, SPLIT: tl.constexpr,
                       UPCAST: tl.constexpr):
    # kernels/rot.py's encode loop; rows are virtual (this width's slabs) and map to chunk rows
    i = tl.arange(0, D)
    E = tl.load(e_ptr + i[:, None] * D + i[None, :])
    QMAX: tl.constexpr = (1 << BITS) - 1
    for blk in range(tl.program_id(0), tl.cdiv(n_rows, R), tl.num_programs(0)):
        v = blk * R + tl.arange(0, R)
        vmask = v < n_rows
        src = _src_rows(slab_ptr, v, vmask, RPS)
        x = tl.load(x_ptr + src[:, None] * D + i[None, :], mask=vmask[:, None], other=0.0)
        if UPCAST:  # the CPU interpreter multiplies bf16 as raw uint16 (see kernels/rot.py)
            acc = tl.dot(x.to(tl.float32), E.to(tl.float32), input_precision="ieee")
        elif SPLIT:  # fp32 input as three exact bf16 parts (see kernels/rot.py)
            hi = x.to(tl.bfloat16)
            r = x - hi.to(tl.float32)
            mid = r.to(tl.bfloat16)
            lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(hi, E)
            acc = tl.dot(mid, E, acc)
            acc = tl.dot(lo, E, acc)
        else:
            acc = tl.dot(x, E)
        y = acc * rs
        sh = (tl.max(tl.abs(y), axis=1) / (QMAX * 0.5)).to(tl.float16)
        s = sh.to(tl.float32)
        z = -(QMAX * 0.5) * s
        inv = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)
        q = tl.minimum(tl.maximum((y - z[:, None]) * inv[:, None] + 0.5, 0.0), QMAX).to(tl.int32)
        tl.store(s_ptr + src, sh, mask=vmask)
        tl.store(n_ptr + src, tl.sum(y * y, axis=1), mask=vmask)
        store_codes(q, pa, pb, v, i, vmask, D, R, D, BITS)


@triton.jit
def _mix_decode_kernel(pa, pb, s_ptr, e_ptr, c_ptr, slab_ptr, o_ptr, n_rows, RPS, rs,
                       D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr):
    i = tl.arange(0, D)
    Et = tl.load(e_ptr + i[None, :] * D + i[:, None])
    c = tl.load(c_ptr + i)
    for blk in range(tl.program_id(0), tl.cdiv(n_rows, R), tl.num_programs(0)):
        v = blk * R + tl.arange(0, R)
        vmask = v < n_rows
        src = _src_rows(slab_ptr, v, vmask, RPS)
        q = load_codes(pa, pb, v, vmask, D, R, D, BITS)
        t = tl.dot(q.to(tl.float16), Et)  # small integers: exact (kernels/rot.py)
        s = tl.load(s_ptr + src, mask=vmask, other=0.0).to(tl.float32)
        QMAX: tl.constexpr = (1 << BITS) - 1
        z = -(QMAX * 0.5) * s
        x = (s[:, None] * t + z[:, None] * c[None, :]) * rs
        tl.store(o_ptr + src[:, None] * D + i[None, :], out_value(x, BF16, o_ptr.dtype.element_ty),
                 mask=vmask[:, None])


def encode_triton(kv: torch.Tensor, bits: list[int], seed: int) -> dict[str, torch.Tensor]:
    L, _, H, T, D = kv.shape
    x = kv.contiguous()
    dev = x.device
    rps = H * T
    e, _ = RT.rotation(D, seed, torch.float16 if x.dtype == torch.float16 else torch.bfloat16, dev)
    out = {"scale": torch.empty(L, 2, H, T, dtype=torch.float16, device=dev)}
    out["nrm"] = torch.empty(L, 2, H, T, dtype=torch.float32, device=dev)
    r = max(16, RT.TILE // D)
    for b, slabs in width_slabs(bits).items():
        n = len(slabs) * rps
        planes = [torch.empty(n, D * pb // 8, dtype=torch.uint8, device=dev) for pb in PLANES[b]]
        out.update(zip(plane_names(b), planes))
        table = torch.tensor(slabs, dtype=torch.int32, device=dev)
        _mix_encode_kernel[(RT._grid(n, r, dev),)](x, e, table, planes[0], planes[-1], out["scale"],
                                                  out["nrm"], n, rps, RT.inv_sqrt(D), D=D, R=r, BITS=b,
                                                  SPLIT=x.dtype == torch.float32,
                                                  UPCAST=RT._interpreting() and x.dtype != torch.float16,
                                                  num_warps=RT.NUM_WARPS)
    return out


def decode_triton(bufs: dict[str, torch.Tensor], shape, dtype: torch.dtype, bits: list[int], seed: int) -> torch.Tensor:
    L, _, H, T, D = shape
    dev = bufs["scale"].device
    rps = H * T
    out = torch.empty(shape, dtype=dtype, device=dev)
    e, c = RT.rotation(D, seed, torch.float16, dev)
    r = max(16, RT.TILE // D)
    for b, slabs in width_slabs(bits).items():
        n = len(slabs) * rps
        names = plane_names(b)
        pa = bufs[names[0]].contiguous()
        pb = bufs[names[-1]].contiguous()
        table = torch.tensor(slabs, dtype=torch.int32, device=dev)
        _mix_decode_kernel[(RT._grid(n, r, dev),)](pa, pb, bufs["scale"], e, c, table, out_view(out),
                                                  n, rps, RT.inv_sqrt(D), D=D, R=r, BITS=b,
                                                  BF16=dtype == torch.bfloat16, num_warps=RT.NUM_WARPS)
    return out


def payload_bits(shape, bits: list[int]) -> int:
    """Stored bits of codes + the per-row fp16 scale (sinks and framing not included)."""
    L, _, H, T, D = shape
    return sum(b * H * T * D + 16 * H * T for b in bits)


__all__ = ["WIDTHS", "width_slabs", "plane_names", "encode_torch", "decode_torch", "encode_triton",
           "decode_triton", "payload_bits"]
