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
One launch per width present (<= 4): each block of rows lies in one slab of
the width, found through the slab table (one scalar load per block), so nothing
is gathered or copied (a gather would move the input twice and halve the
kernel's TB/s) and each block's rows are contiguous on both sides.

Both paths compute per row what ``kernels.rot`` computes; codes agree up to one
step where y lies within fp32 rounding of a rounding boundary (the reference
rotates in float64, the kernel sums in fp32 on the tensor cores), scales by one
fp16 ulp likewise (tests/kernels/test_mix.py counts them). Decoders agree bit
for bit on the same buffers, on the GPU too: both compute
``(s * ((q - qmax/2) @ E.T)) * (1/sqrt(D))``, where the centred product is exact
and the two products round once each. (Decoding rot's way, ``(s * (q @ E.T) +
z * c) / sqrt(D)``, did not: with 8-bit codes ``s * t`` needs 11 + 16 bits, so
it rounds, and whether the GPU fuses it with ``+ z * c`` into an FMA changes the
result, and the large cancellation at index 0 amplifies it: 4.8e-4 of fp32
values > 1 ulp from torch on the H200.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import rot as RT
from kernels.kivi import quantize, scale_params
from kernels.pack import PLANES, load_codes, out_value, out_view, pack_torch, store_codes, unpack_torch

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
    """``x^ = (s * ((q - qmax/2) @ E.T)) / sqrt(D)``: the product of centred codes is exact (half-integers,
    sums <= 127.5 * 256 < 2**15), then two fp32 roundings, the kernel's exactly (see the module docstring)."""
    L, _, H, T, D = shape
    out = torch.empty(L * 2, H * T, D, dtype=dtype, device=bufs["scale"].device)
    scale = bufs["scale"].reshape(L * 2, H * T)
    e, _ = RT.rotation(D, seed, torch.float32, out.device)
    for b, slabs in width_slabs(bits).items():
        idx = torch.tensor(slabs, device=out.device)
        planes = [bufs[n].reshape(len(slabs) * H * T, -1) for n in plane_names(b)]  # stored flat
        q = unpack_torch(planes, b, D).float().reshape(len(slabs), H * T, D) - ((1 << b) - 1) * 0.5
        s = scale[idx].float().unsqueeze(-1)
        out[idx] = ((s * (q @ e.T)) * RT.inv_sqrt(D)).to(dtype)
    return out.reshape(shape)


# ---------------------------------------------------------------- Triton kernels
# Rows per block, warps, persistent programs per SM: kernels/rot.py's (the fastest of its H100 sweep);
# module globals so that bench/kernels.py --sweep can try others.
TILE = RT.TILE
NUM_WARPS = RT.NUM_WARPS
PROGRAMS_PER_SM = RT.PROGRAMS_PER_SM
_TABLES: dict = {}


@triton.jit
def _slab_block(slab_ptr, blk, BPS, RPS, R: tl.constexpr):
    """Block ``blk`` of this width's rows: (chunk rows, rows in the width's planes, mask). A block never
    straddles two slabs, so both row ranges are contiguous (one scalar table load per block): loads and
    stores vectorize as in kernels/rot.py. (A per-row table lookup and a division by the runtime row count
    per slab lost that: q-mix encode/decode 0.80 / 0.91 TB/s on an H200 against rot4's 2.38 / 1.85.)"""
    si = blk // BPS
    r = (blk % BPS) * R + tl.arange(0, R)
    slab = tl.load(slab_ptr + si).to(tl.int64)
    return slab * RPS + r, si.to(tl.int64) * RPS + r, r < RPS


@triton.jit
def _mix_encode_kernel(x_ptr, e_ptr, slab_ptr, pa, pb, s_ptr, n_ptr, n_blocks, BPS, RPS, rs,
                       D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, SPLIT: tl.constexpr,
                       UPCAST: tl.constexpr):
    # kernels/rot.py's encode loop, over this width's slabs only
    i = tl.arange(0, D)
    E = RT.load_rotation(e_ptr, D, False)
    QMAX: tl.constexpr = (1 << BITS) - 1
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        src, v, vmask = _slab_block(slab_ptr, blk, BPS, RPS, R)
        x = tl.load(x_ptr + src[:, None] * D + i[None, :], mask=vmask[:, None], other=0.0)
        y = RT.rotate_rows(x, E, UPCAST, SPLIT) * rs
        sh, s, inv = scale_params(tl.max(tl.abs(y), axis=1), QMAX * 0.5)
        z = -(QMAX * 0.5) * s
        q = tl.minimum(tl.maximum((y - z[:, None]) * inv[:, None] + 0.5, 0.0), QMAX).to(tl.int32)
        tl.store(s_ptr + src, sh, mask=vmask)
        tl.store(n_ptr + src, tl.sum(y * y, axis=1), mask=vmask)
        store_codes(q, pa, pb, v, i, vmask, D, R, D, BITS)


@triton.jit
def _mix_decode_kernel(pa, pb, s_ptr, e_ptr, slab_ptr, o_ptr, n_blocks, BPS, RPS, rs,
                       D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr):
    i = tl.arange(0, D)
    Et = RT.load_rotation(e_ptr, D, True)
    QMAX: tl.constexpr = (1 << BITS) - 1
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        src, v, vmask = _slab_block(slab_ptr, blk, BPS, RPS, R)
        q = load_codes(pa, pb, v, vmask, D, R, D, BITS)
        # centred codes q - qmax/2: half-integers, exact in fp16; their sums <= 127.5 * 256 exact in fp32
        t = tl.dot((q.to(tl.float32) - QMAX * 0.5).to(tl.float16), Et)
        s = tl.load(s_ptr + src, mask=vmask, other=0.0).to(tl.float32)
        x = (s[:, None] * t) * rs  # two roundings, as decode_torch: no FMA can fuse a product of products
        tl.store(o_ptr + src[:, None] * D + i[None, :], out_value(x, BF16, o_ptr.dtype.element_ty),
                 mask=vmask[:, None])


def _launch_shape(slabs: list[int], rps: int, d: int, dev: torch.device):
    """(slab table on ``dev`` (cached: a host-to-device copy per call would stall the stream), rows per
    block, blocks per slab, blocks, grid)."""
    key = (tuple(slabs), str(dev))
    if key not in _TABLES:
        if len(_TABLES) > 256:  # bounded: bit tables come from a handful of profiles
            _TABLES.clear()
        _TABLES[key] = torch.tensor(slabs, dtype=torch.int32, device=dev)
    r = max(16, TILE // d)
    bps = triton.cdiv(rps, r)
    n_blocks = len(slabs) * bps
    if dev.type == "cuda":
        grid = min(n_blocks, PROGRAMS_PER_SM * torch.cuda.get_device_properties(dev).multi_processor_count)
    else:
        grid = min(n_blocks, 16)  # the CPU interpreter: see kernels/rot.py
    return _TABLES[key], r, bps, n_blocks, grid


def encode_triton(kv: torch.Tensor, bits: list[int], seed: int) -> dict[str, torch.Tensor]:
    L, _, H, T, D = kv.shape
    x = kv.contiguous()
    dev = x.device
    rps = H * T
    e, _ = RT.rotation(D, seed, torch.float16 if x.dtype == torch.float16 else torch.bfloat16, dev)
    out = {"scale": torch.empty(L, 2, H, T, dtype=torch.float16, device=dev)}
    out["nrm"] = torch.empty(L, 2, H, T, dtype=torch.float32, device=dev)
    for b, slabs in width_slabs(bits).items():
        n = len(slabs) * rps
        planes = [torch.empty(n, D * pb // 8, dtype=torch.uint8, device=dev) for pb in PLANES[b]]
        out.update(zip(plane_names(b), planes))
        table, r, bps, n_blocks, grid = _launch_shape(slabs, rps, D, dev)
        _mix_encode_kernel[(grid,)](x, e, table, planes[0], planes[-1], out["scale"], out["nrm"], n_blocks, bps,
                                    rps, RT.inv_sqrt(D), D=D, R=r, BITS=b, SPLIT=x.dtype == torch.float32,
                                    UPCAST=RT._interpreting() and x.dtype != torch.float16, num_warps=NUM_WARPS)
    return out


def decode_triton(bufs: dict[str, torch.Tensor], shape, dtype: torch.dtype, bits: list[int], seed: int) -> torch.Tensor:
    L, _, H, T, D = shape
    dev = bufs["scale"].device
    rps = H * T
    out = torch.empty(shape, dtype=dtype, device=dev)
    e, _ = RT.rotation(D, seed, torch.float16, dev)
    for b, slabs in width_slabs(bits).items():
        names = plane_names(b)
        pa = bufs[names[0]].contiguous()
        pb = bufs[names[-1]].contiguous()
        table, r, bps, n_blocks, grid = _launch_shape(slabs, rps, D, dev)
        _mix_decode_kernel[(grid,)](pa, pb, bufs["scale"], e, table, out_view(out), n_blocks, bps, rps,
                                    RT.inv_sqrt(D), D=D, R=r, BITS=b, BF16=dtype == torch.bfloat16,
                                    num_warps=NUM_WARPS)
    return out


def payload_bits(shape, bits: list[int]) -> int:
    """Stored bits of codes + the per-row fp16 scale (sinks and framing not included)."""
    L, _, H, T, D = shape
    return sum(b * H * T * D + 16 * H * T for b in bits)


__all__ = ["WIDTHS", "width_slabs", "plane_names", "encode_torch", "decode_torch", "encode_triton",
           "decode_triton", "payload_bits"]
