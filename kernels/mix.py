"""Rotation + per-row quantization with a bit width per slab: Triton kernel + torch reference.

The ``q*`` codecs (``kvtier.codecs.mix``) store each slab at its own bit
width. A slab is a contiguous row range of a ``[L, 2, H, T, D]`` chunk: the K
or the V of one layer (``H * T`` rows; a bit table of ``2 * L`` entries, index
``layer * 2 + kv``) or of one head of one layer (``T`` rows; ``2 * L * H``
entries, index ``(layer * 2 + kv) * H + head``). Per row: the randomized
Hadamard rotation of ``kernels.rot`` (signs from the stored seed),
``y = x @ E / sqrt(D)``, then a *symmetric* quantizer with one fp16 scale
``s = max|y| / (qmax/2)`` (qmax = 2**bits - 1) and the implicit zero
``z = -(qmax/2) * s``: codes ``q = clamp(floor((y - z)/s + 1/2), 0, qmax)``,
``y^ = q*s + z``, packed along D by ``kernels.pack``. After the rotation a row
is near-Gaussian around ~0, so a stored per-row zero (rot's) buys little: it
costs 16/D bits (0.25 bit/elem at D=64, 8 % of a 3-bit budget), which buys more
as code bits in the slabs that need them.

Optional key weights ``w`` (fp16 ``[L, H, D]``, positive): every K row of
layer l, head h is multiplied by ``w[l, h]`` before the rotation and divided by
it after decoding (``kvtier.codecs.mix`` says why). Fused into the kernels: a
block of rows lies in one (layer, K/V, head), so it loads its weight row once
(V rows load 1.0). Encode multiplies in fp16, ``fp16(x) * w`` rounded once (fp32
for fp32 input), so the tensor cores take it (``weighted_input``); decode
multiplies the fp32 result by ``1 / w`` (fp32, an IEEE reciprocal the launcher
computes once per call) before the one rounding to the output dtype. An fp16
overflow of ``x * w`` or of a scale shows as an infinite row norm (``nrm``).
(As torch operations around the kernels the weights cost 3-3.5x the kernel
time on an H200: bench/results/qcodec-h200.md.)

Error bound per rotated coordinate (of the weighted row): |y - y^| <= s/2 +
(qmax/2) * fp16 rounding of s (the range can fall short of max|y| by that), and
||xw - xw^|| <= sqrt(D) times that per row (the rotation is orthonormal), plus
the rounding of ``x * w`` to fp16 and of the output; channel c of a K row is off
by that error divided by w[c].

Layout for slab bit widths ``bits[s]``:
- ``scale``: fp16 ``[L, 2, H, T]``, every row in chunk order;
- for each width ``b`` present, the codes of the slabs of that width, in slab
  order, as one packed ``[rows_b, D*b/8]`` plane (two, low and high bits, for
  b = 3, 5, 6: ``kernels.pack`` layout). A per-layer table and its per-head
  expansion (each entry repeated H times) give the same bytes.
One launch per width present (<= 7): each block of rows lies in one slab of
the width, found through the slab table (one scalar load per block), so nothing
is gathered or copied (a gather would move the input twice and halve the
kernel's TB/s) and each block's rows are contiguous on both sides. Per-layer
tables without weights launch over per-layer slabs (fewer partial blocks when
T is not a multiple of the block's rows); otherwise over per-head slabs.

Both paths compute per row what ``kernels.rot`` computes; codes agree up to one
step where y lies within fp32 rounding of a rounding boundary (the reference
rotates in float64, the kernel sums in fp32 on the tensor cores), scales by one
fp16 ulp likewise (tests/kernels/test_mix.py counts them). Decoders agree bit
for bit on the same buffers, on the GPU too: both compute
``((s * ((q - qmax/2) @ E.T)) * (1/sqrt(D))) * (1/w)``, where the centred
product is exact and each further product rounds once. (Decoding rot's way,
``(s * (q @ E.T) + z * c) / sqrt(D)``, did not: with 8-bit codes ``s * t`` needs
11 + 16 bits, so it rounds, and whether the GPU fuses it with ``+ z * c`` into
an FMA changes the result, and the large cancellation at index 0 amplifies it:
4.8e-4 of fp32 values > 1 ulp from torch on the H200.)
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels import rot as RT
from kernels.kivi import quantize, scale_params

FP16_MAX = 65504.0
from kernels.pack import PLANES, load_codes, out_value, out_view, pack_torch, store_codes, unpack_torch

# 1 bit with a per-row range was useless in screening; 7 would need a 4+2+1 packing; 8 is the near-lossless step
WIDTHS = (2, 3, 4, 5, 6, 8)


def slab_rows(shape, bits: list[int]) -> int:
    """Rows per slab of a bit table for a chunk of ``shape``: H * T (per layer) or T (per head)."""
    L, _, H, T, _ = shape
    if len(bits) == 2 * L:
        return H * T
    if len(bits) == 2 * L * H:
        return T
    raise ValueError(f"bit table of {len(bits)} entries for {L} layers, {H} heads: expected {2 * L} (per layer) "
                     f"or {2 * L * H} (per head)")


def width_slabs(bits: list[int]) -> dict[int, list[int]]:
    """{width: slab ids in order} for the widths present."""
    out: dict[int, list[int]] = {}
    for s, b in enumerate(bits):
        out.setdefault(b, []).append(s)
    return dict(sorted(out.items()))


def plane_names(b: int) -> tuple[str, ...]:
    return (f"q{b}", f"q{b}h") if len(PLANES[b]) == 2 else (f"q{b}",)


def plane_rows(shape, bits: list[int]) -> dict[int, int]:
    """{width: rows in that width's planes} (what decode must find: kernels.pack.plane_bytes of these)."""
    rps = slab_rows(shape, bits)
    return {b: len(slabs) * rps for b, slabs in width_slabs(bits).items()}


def _check_weights(w: torch.Tensor, shape) -> None:
    L, _, H, _, D = shape
    if w.dtype != torch.float16 or tuple(w.shape) != (L, H, D):
        raise ValueError(f"key weights {w.dtype} {tuple(w.shape)}: expected float16 [{L}, {H}, {D}]")


# ---------------------------------------------------------------- torch reference
def weighted_input(kv: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """What the encoders rotate: ``kv`` with K rows times ``w``: an fp16 product of ``kv`` in fp16 (an fp32
    product for fp32 input). For bf16 input with |x| >= 2**-14 the cast is exact, so this is x * w rounded
    once; below, fp16's subnormal step (2**-24) adds at most 2**-25 * w."""
    if w is None:
        return kv
    if kv.dtype == torch.float32:
        x = kv.clone()
        x[:, 0] *= w.float()[:, :, None, :]
    else:
        x = kv.to(torch.float16).clone()
        x[:, 0] *= w[:, :, None, :]  # IEEE fp16 multiply: the exact product rounded once, as on the GPU
    return x


def encode_torch(kv: torch.Tensor, bits: list[int], seed: int, w: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Also returns ``nrm``: fp32 [L, 2, H, T] squared norms of the rotated (weighted) rows (for sink
    detection; not stored)."""
    L, _, H, T, D = kv.shape
    rps = slab_rows(kv.shape, bits)
    if w is not None:
        _check_weights(w, kv.shape)
    e, _ = RT.rotation(D, seed, torch.float64, kv.device)
    x = weighted_input(kv, w).reshape(-1, rps, D)
    scale = torch.empty(x.shape[:2], dtype=torch.float16, device=kv.device)
    nrm = torch.empty(x.shape[:2], dtype=torch.float32, device=kv.device)
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
        # an fp16 overflow (of x * w or of the scale) shows as an infinite row norm: the codec's one check
        scale[idx], nrm[idx] = sc, torch.where(s32 <= FP16_MAX, y.square().sum(-1), float("inf"))
    out["scale"] = scale.reshape(L, 2, H, T)
    out["nrm"] = nrm.reshape(L, 2, H, T)
    return out


def implicit_zero(s32: torch.Tensor, qmax: int) -> torch.Tensor:
    """z = -(qmax/2) * s in fp32: exact (an 11-bit fp16 scale times <= 8 bits of qmax/2)."""
    return -(qmax * 0.5) * s32


def decode_torch(bufs: dict[str, torch.Tensor], shape, dtype: torch.dtype, bits: list[int], seed: int,
                 w: torch.Tensor | None = None) -> torch.Tensor:
    """``x^ = ((s * ((q - qmax/2) @ E.T)) * (1/sqrt(D))) * (1/w)``: the product of centred codes is exact
    (half-integers, sums <= 127.5 * 256 < 2**15), then fp32 products that round once each, the kernel's
    exactly (see the module docstring)."""
    L, _, H, T, D = shape
    rps = slab_rows(shape, bits)
    out = torch.empty(L * 2 * H * T // rps, rps, D, dtype=dtype, device=bufs["scale"].device)
    scale = bufs["scale"].reshape(-1, rps)
    e, _ = RT.rotation(D, seed, torch.float32, out.device)
    invw = None
    if w is not None:
        _check_weights(w, shape)
        invw = torch.ones(L, 2, H, 1, D, dtype=torch.float32, device=out.device)
        invw[:, 0, :, 0] = torch.reciprocal(w.float().to(out.device))
        invw = invw.expand(L, 2, H, T, D).reshape(-1, rps, D)
    for b, slabs in width_slabs(bits).items():
        idx = torch.tensor(slabs, device=out.device)
        planes = [bufs[n].reshape(len(slabs) * rps, -1) for n in plane_names(b)]  # stored flat
        q = unpack_torch(planes, b, D).float().reshape(len(slabs), rps, D) - ((1 << b) - 1) * 0.5
        s = scale[idx].float().unsqueeze(-1)
        x = (s * (q @ e.T)) * RT.inv_sqrt(D)
        out[idx] = (x if invw is None else x * invw[idx]).to(dtype)
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
    """Block ``blk`` of this width's rows: (slab id, chunk rows, rows in the width's planes, mask). A block
    never straddles two slabs, so both row ranges are contiguous (one scalar table load per block): loads and
    stores vectorize as in kernels/rot.py. (A per-row table lookup and a division by the runtime row count
    per slab lost that: q-mix encode/decode 0.80 / 0.91 TB/s on an H200 against rot4's 2.38 / 1.85.)"""
    si = blk // BPS
    r = (blk % BPS) * R + tl.arange(0, R)
    slab = tl.load(slab_ptr + si).to(tl.int64)
    return slab, slab * RPS + r, si.to(tl.int64) * RPS + r, r < RPS


@triton.jit
def _slab_weights(w_ptr, slab, H, i, D: tl.constexpr):
    """Row [layer, head] of a [L, H, D] table for a per-head slab ``(layer * 2 + kv) * H + head`` if it is a K
    slab, else ones (in the table's dtype)."""
    is_k = (slab // H) % 2 == 0
    wrow = (slab // (2 * H)) * H + slab % H
    w = tl.load(w_ptr + wrow * D + i)  # V's (layer, head) row exists too: no mask needed
    return tl.where(is_k, w, tl.full(w.shape, 1.0, w.dtype))


@triton.jit
def _mix_encode_kernel(x_ptr, e_ptr, slab_ptr, w_ptr, pa, pb, s_ptr, n_ptr, n_blocks, BPS, RPS, H, rs,
                       D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, SPLIT: tl.constexpr,
                       UPCAST: tl.constexpr, HAS_W: tl.constexpr):
    # kernels/rot.py's encode loop, over this width's slabs only
    i = tl.arange(0, D)
    E = RT.load_rotation(e_ptr, D, False)
    QMAX: tl.constexpr = (1 << BITS) - 1
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        slab, src, v, vmask = _slab_block(slab_ptr, blk, BPS, RPS, R)
        x = tl.load(x_ptr + src[:, None] * D + i[None, :], mask=vmask[:, None], other=0.0)
        if HAS_W:  # weighted_input's products: fp16 for the tensor cores (fp32 input: fp32, then SPLIT)
            wr = _slab_weights(w_ptr, slab, H, i, D)
            if SPLIT:
                x = x * wr.to(tl.float32)[None, :]
            else:  # fp16 x fp16, one rounding; no fp32 [R, D] tile: an fp32 product cost 38 % of encode (H200)
                x = x.to(tl.float16) * wr[None, :]
        y = RT.rotate_rows(x, E, UPCAST, SPLIT) * rs
        sh, s, inv = scale_params(tl.max(tl.abs(y), axis=1), QMAX * 0.5)
        z = -(QMAX * 0.5) * s
        q = tl.minimum(tl.maximum((y - z[:, None]) * inv[:, None] + 0.5, 0.0), QMAX).to(tl.int32)
        tl.store(s_ptr + src, sh, mask=vmask)
        # an fp16 overflow (of x * w or of the scale: NaN compares false too) -> an infinite norm
        tl.store(n_ptr + src, tl.where(s <= 65504.0, tl.sum(y * y, axis=1), float("inf")), mask=vmask)
        store_codes(q, pa, pb, v, i, vmask, D, R, D, BITS)


@triton.jit
def _mix_decode_kernel(pa, pb, s_ptr, e_ptr, slab_ptr, w_ptr, o_ptr, n_blocks, BPS, RPS, H, rs,
                       D: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr,
                       HAS_W: tl.constexpr):
    i = tl.arange(0, D)
    Et = RT.load_rotation(e_ptr, D, True)
    QMAX: tl.constexpr = (1 << BITS) - 1
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        slab, src, v, vmask = _slab_block(slab_ptr, blk, BPS, RPS, R)
        q = load_codes(pa, pb, v, vmask, D, R, D, BITS)
        # centred codes q - qmax/2: half-integers, exact in fp16; their sums <= 127.5 * 256 exact in fp32
        t = tl.dot((q.to(tl.float32) - QMAX * 0.5).to(tl.float16), Et)
        s = tl.load(s_ptr + src, mask=vmask, other=0.0).to(tl.float32)
        x = (s[:, None] * t) * rs  # two roundings, as decode_torch: no FMA can fuse a product of products
        if HAS_W:  # w_ptr: fp32 1/w, computed once per call by the launcher (a div_rn per block and column
            x = x * _slab_weights(w_ptr, slab, H, i, D)[None, :]  # cost 59 % of the decode on an H200)
        tl.store(o_ptr + src[:, None] * D + i[None, :], out_value(x, BF16, o_ptr.dtype.element_ty),
                 mask=vmask[:, None])


def _launch_shape(slabs: tuple[int, ...], rps: int, d: int, dev: torch.device):
    """(slab table on ``dev`` (cached: a host-to-device copy per call would stall the stream), rows per
    block, blocks per slab, blocks, grid)."""
    key = (slabs, str(dev))
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


def _launch_table(shape, bits: list[int], weighted: bool) -> tuple[int, tuple[tuple[int, tuple[int, ...]], ...]]:
    """(rows per slab, ((width, slab ids), ...)) that the kernels walk: per-head slabs when weighted (a block
    must lie in one head to load one weight row) or when the table is per head; a per-layer table expands to
    the same bytes. Cached: a per-head table has 2 * L * H entries (512 for Llama-8B), and this Python would
    cost a 256-token chunk's launch more than its kernels take."""
    L, _, H, T, _ = shape
    return _plan(tuple(bits), L, H, T, weighted)


@functools.lru_cache(maxsize=256)
def _plan(bits: tuple[int, ...], L: int, H: int, T: int, weighted: bool):
    rps = slab_rows((L, 2, H, T, 0), list(bits))
    if weighted and rps == H * T:
        bits, rps = tuple(b for b in bits for _ in range(H)), T
    return rps, tuple((b, tuple(slabs)) for b, slabs in width_slabs(list(bits)).items())


def encode_triton(kv: torch.Tensor, bits: list[int], seed: int, w: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    L, _, H, T, D = kv.shape
    x = kv.contiguous()
    dev = x.device
    if w is not None:
        _check_weights(w, kv.shape)
        w = w.to(dev).contiguous()
    rps, plan = _launch_table(kv.shape, bits, w is not None)
    # the rotation's operand dtype: weighted rows are rounded to fp16 (fp32 input: split into bf16 parts)
    fp16_op = x.dtype == torch.float16 or (w is not None and x.dtype != torch.float32)
    e, _ = RT.rotation(D, seed, torch.float16 if fp16_op else torch.bfloat16, dev)
    out = {"scale": torch.empty(L, 2, H, T, dtype=torch.float16, device=dev)}
    out["nrm"] = torch.empty(L, 2, H, T, dtype=torch.float32, device=dev)
    for b, slabs in plan:
        n = len(slabs) * rps
        planes = [torch.empty(n, D * pb // 8, dtype=torch.uint8, device=dev) for pb in PLANES[b]]
        out.update(zip(plane_names(b), planes))
        tab, r, bps, n_blocks, grid = _launch_shape(slabs, rps, D, dev)
        _mix_encode_kernel[(grid,)](x, e, tab, out["scale"] if w is None else w, planes[0], planes[-1],
                                    out["scale"], out["nrm"], n_blocks, bps, rps, H, RT.inv_sqrt(D), D=D, R=r,
                                    BITS=b, SPLIT=x.dtype == torch.float32,
                                    UPCAST=RT._interpreting() and not fp16_op, HAS_W=w is not None,
                                    num_warps=NUM_WARPS)
    return out


def decode_triton(bufs: dict[str, torch.Tensor], shape, dtype: torch.dtype, bits: list[int], seed: int,
                  w: torch.Tensor | None = None) -> torch.Tensor:
    L, _, H, T, D = shape
    dev = bufs["scale"].device
    if w is not None:
        _check_weights(w, shape)
        invw = torch.reciprocal(w.to(dev).float())  # IEEE on CPU and GPU: decode_torch's factors exactly
    rps, plan = _launch_table(shape, bits, w is not None)
    out = torch.empty(shape, dtype=dtype, device=dev)
    e, _ = RT.rotation(D, seed, torch.float16, dev)
    for b, slabs in plan:
        names = plane_names(b)
        pa = bufs[names[0]].contiguous()
        pb = bufs[names[-1]].contiguous()
        tab, r, bps, n_blocks, grid = _launch_shape(slabs, rps, D, dev)
        _mix_decode_kernel[(grid,)](pa, pb, bufs["scale"], e, tab, bufs["scale"] if w is None else invw,
                                    out_view(out), n_blocks, bps, rps, H, RT.inv_sqrt(D), D=D, R=r, BITS=b,
                                    BF16=dtype == torch.bfloat16, HAS_W=w is not None, num_warps=NUM_WARPS)
    return out


def payload_bits(shape, bits: list[int]) -> int:
    """Stored bits of codes + the per-row fp16 scale (sinks, key weights and framing not included)."""
    L, _, H, T, D = shape
    return sum(b * rows * D for b, rows in plane_rows(shape, bits).items()) + 16 * L * 2 * H * T


__all__ = ["WIDTHS", "slab_rows", "width_slabs", "plane_names", "plane_rows", "weighted_input", "encode_torch",
           "decode_torch", "encode_triton", "decode_triton", "payload_bits"]
