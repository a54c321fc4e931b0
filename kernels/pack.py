"""Bit packing of quantization codes: the layout every uniform codec stores.

Codes are small unsigned integers ``q`` of shape ``[rows, D]`` packed along the
last (head_dim) axis, little end first: for ``bits`` in {1, 2, 4, 8} byte ``j``
of a row holds codes ``j*k .. j*k+k-1`` (``k = 8 // bits``), code ``i`` of the
byte in bits ``i*bits .. i*bits+bits-1``. Three-, five- and six-bit codes are
stored as two bit planes so that every plane is a power-of-two packing: the
first plane holds the low bits (2 for 3-bit codes, 4 for 5 and 6), the second
the high bits (1, 1, 2): e.g. 3 bits = a 2-bit plane of D/4 bytes a row + a
1-bit plane of D/8 bytes, exactly 3 bits/elem with no byte straddling.

Here are the torch reference (``pack_torch``/``unpack_torch``), the Triton
device helpers that the codec kernels inline (``pack_tile``/``unpack_tile``),
and a stand-alone Triton kernel over whole tensors (``pack_triton``/
``unpack_triton``) used by the tests to compare the two paths bit for bit.
This module knows nothing of scales, groups or codecs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}  # bits -> bits of each plane
PLANE_NAMES = ("q", "q1")


def plane_bytes(rows: int, d: int, bits: int) -> list[int]:
    """Bytes of each plane for ``rows`` rows of ``d`` codes (what decode must find)."""
    return [rows * d * b // 8 for b in PLANES[bits]]


def check_packable(d: int, bits: int) -> None:
    if bits not in PLANES:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {sorted(PLANES)}")
    per = max(8 // b for b in PLANES[bits])
    if d % per:
        raise ValueError(f"{bits}-bit codes pack {per} to a byte: head_dim {d} must be a multiple of {per}")


# ---------------------------------------------------------------- torch reference
def _pack_plane(q: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    q = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    return (q << shifts).sum(-1).to(torch.uint8)


def _unpack_plane(b: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=b.device, dtype=torch.int32) * bits
    q = (b.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*b.shape[:-1], d)


def pack_torch(q: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Integer codes ``[..., D]`` in ``[0, 2**bits)`` -> list of uint8 planes ``[..., D*b/8]``."""
    check_packable(q.shape[-1], bits)
    if len(PLANES[bits]) == 2:
        lo, hi = PLANES[bits]
        return [_pack_plane(q & ((1 << lo) - 1), lo), _pack_plane(q >> lo, hi)]
    return [_pack_plane(q, bits)]


def unpack_torch(planes: list[torch.Tensor], bits: int, d: int) -> torch.Tensor:
    """Inverse of ``pack_torch``: int32 codes ``[..., d]``."""
    if len(PLANES[bits]) == 2:
        lo, hi = PLANES[bits]
        return _unpack_plane(planes[0], lo, d) | (_unpack_plane(planes[1], hi, d) << lo)
    return _unpack_plane(planes[0], bits, d)


# ---------------------------------------------------------------- Triton device helpers
@triton.jit
def _pack_plane_tile(q, R: tl.constexpr, BD: tl.constexpr, B: tl.constexpr):
    PER: tl.constexpr = 8 // B
    q3 = tl.reshape(q, (R, BD // PER, PER))
    shifts = tl.arange(0, PER) * B
    # the B-bit fields are disjoint, so the sum is a bitwise or
    return tl.sum(q3 << shifts[None, None, :], axis=2)


@triton.jit
def _unpack_plane_tile(b, R: tl.constexpr, BD: tl.constexpr, B: tl.constexpr):
    PER: tl.constexpr = 8 // B
    shifts = tl.arange(0, PER) * B
    q3 = (b[:, :, None] >> shifts[None, None, :]) & ((1 << B) - 1)
    return tl.reshape(q3, (R, BD))


@triton.jit
def _store_plane(q, p, row_off, row_mask, D, R: tl.constexpr, BD: tl.constexpr, B: tl.constexpr):
    PER: tl.constexpr = 8 // B
    packed = _pack_plane_tile(q, R, BD, B)
    cp = tl.arange(0, BD // PER)
    tl.store(p + row_off[:, None] * (D // PER) + cp[None, :], packed.to(tl.uint8),
             mask=row_mask[:, None] & (cp[None, :] < D // PER))


@triton.jit
def _load_plane(p, row_off, row_mask, D, R: tl.constexpr, BD: tl.constexpr, B: tl.constexpr):
    PER: tl.constexpr = 8 // B
    cp = tl.arange(0, BD // PER)
    b = tl.load(p + row_off[:, None] * (D // PER) + cp[None, :],
                mask=row_mask[:, None] & (cp[None, :] < D // PER), other=0).to(tl.int32)
    return _unpack_plane_tile(b, R, BD, B)


@triton.jit
def store_codes(q, pa, pb, row_off, cols, row_mask, D, R: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr):
    """Pack int32 codes ``q`` [R, BD] and store them at plane pointers ``pa``
    (and ``pb``, the high-bit plane of 3/5/6 bits: ``PLANES``). ``row_off`` [R] is
    the row index of each tile row, ``cols`` = arange(BD); columns >= D and rows
    outside ``row_mask`` are skipped."""
    # one branch per two-plane width (constexpr: resolved at compile time), the split as in PLANES
    if BITS == 3:
        _store_plane(q & 3, pa, row_off, row_mask, D, R, BD, 2)
        _store_plane(q >> 2, pb, row_off, row_mask, D, R, BD, 1)
    elif BITS == 5:
        _store_plane(q & 15, pa, row_off, row_mask, D, R, BD, 4)
        _store_plane(q >> 4, pb, row_off, row_mask, D, R, BD, 1)
    elif BITS == 6:
        _store_plane(q & 15, pa, row_off, row_mask, D, R, BD, 4)
        _store_plane(q >> 4, pb, row_off, row_mask, D, R, BD, 2)
    else:
        _store_plane(q, pa, row_off, row_mask, D, R, BD, BITS)


@triton.jit
def load_codes(pa, pb, row_off, row_mask, D, R: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr):
    """Load and unpack the int32 codes [R, BD] of rows ``row_off`` (0 where masked)."""
    if BITS == 3:
        q = _load_plane(pa, row_off, row_mask, D, R, BD, 2) | (_load_plane(pb, row_off, row_mask, D, R, BD, 1) << 2)
    elif BITS == 5:
        q = _load_plane(pa, row_off, row_mask, D, R, BD, 4) | (_load_plane(pb, row_off, row_mask, D, R, BD, 1) << 4)
    elif BITS == 6:
        q = _load_plane(pa, row_off, row_mask, D, R, BD, 4) | (_load_plane(pb, row_off, row_mask, D, R, BD, 2) << 4)
    else:
        q = _load_plane(pa, row_off, row_mask, D, R, BD, BITS)
    return q


@triton.jit
def out_value(x, BF16: tl.constexpr, out_ty: tl.constexpr):
    """float32 ``x`` as stored by a decoder: bf16 bit patterns (int16) rounded to
    nearest even when ``BF16`` (the launcher passes the bf16 output viewed as
    int16), else ``x.to(out_ty)``. Finite inputs only."""
    if BF16:
        u = x.to(tl.int32, bitcast=True)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int16)
    else:
        return x.to(out_ty)


def out_view(out: torch.Tensor) -> torch.Tensor:
    """The tensor a decode kernel writes through (bf16 as int16, see ``out_value``)."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


# ---------------------------------------------------------------- stand-alone Triton kernels
@triton.jit
def _pack_kernel(q_ptr, pa, pb, n_rows, D, R: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    cols = tl.arange(0, BD)
    rmask = rows < n_rows
    q = tl.load(q_ptr + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & (cols[None, :] < D), other=0)
    store_codes(q.to(tl.int32), pa, pb, rows, cols, rmask, D, R, BD, BITS)


@triton.jit
def _unpack_kernel(pa, pb, q_ptr, n_rows, D, R: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    cols = tl.arange(0, BD)
    rmask = rows < n_rows
    q = load_codes(pa, pb, rows, rmask, D, R, BD, BITS)
    tl.store(q_ptr + rows[:, None] * D + cols[None, :], q.to(tl.uint8), mask=rmask[:, None] & (cols[None, :] < D))


def _rows_per_program(n_rows: int, bd: int) -> int:
    return max(16, min(triton.next_power_of_2(n_rows), 8192 // bd))


def pack_triton(q: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Triton twin of ``pack_torch`` (any device Triton runs on, incl. the CPU interpreter)."""
    d = q.shape[-1]
    check_packable(d, bits)
    q2 = q.reshape(-1, d).contiguous()
    n = q2.shape[0]
    planes = [torch.empty(*q.shape[:-1], d * b // 8, dtype=torch.uint8, device=q.device) for b in PLANES[bits]]
    bd = max(triton.next_power_of_2(d), 8)
    r = _rows_per_program(n, bd)
    _pack_kernel[(triton.cdiv(n, r),)](q2, planes[0], planes[-1], n, d, R=r, BD=bd, BITS=bits)
    return planes


def unpack_triton(planes: list[torch.Tensor], bits: int, d: int) -> torch.Tensor:
    check_packable(d, bits)
    lead = planes[0].shape[:-1]
    n = planes[0].numel() * 8 // (PLANES[bits][0] * d)
    out = torch.empty(*lead, d, dtype=torch.uint8, device=planes[0].device)
    bd = max(triton.next_power_of_2(d), 8)
    r = _rows_per_program(n, bd)
    _unpack_kernel[(triton.cdiv(n, r),)](planes[0].contiguous(), planes[-1].contiguous(), out, n, d,
                                         R=r, BD=bd, BITS=bits)
    return out.to(torch.int32)
