"""FP8 (e4m3fn) quantization with one power-of-two scale per row: kernel + reference.

Format (what ``kvtier.codecs.fp8`` stores): for every row of ``D`` values (one
token of one head of K or V), ``exp`` = one int8 ``e`` and ``codes`` = ``D``
bytes, the e4m3fn bit patterns of ``x / 2**e``. ``e`` is chosen from the row's
absolute maximum so that ``|x| / 2**e`` lies in [128, 256): below e4m3's
maximum of 448, so nothing saturates, and a power of two, so scaling is exact
and both paths agree bit for bit. 8 + 8/D bits per element (8.125 at D=64,
8.0625 at D=128). Relative error per element <= 2**-4 (3 mantissa bits,
round-to-nearest-even); values under 2**-6 * 2**e fall in e4m3's subnormals,
absolute error <= 2**(e-10).

The torch reference uses torch's own float8_e4m3fn cast. The Triton kernel
builds the e4m3 bits with integer operations instead of ``.to(tl.float8e4nv)``:
Triton's CPU interpreter rounds fp8 casts half-up and mishandles the mantissa
carry (triton 3.9 ``_convert_float``), and the tests run that interpreter; the
bit arithmetic is exact everywhere, and agreeing with torch's cast proves it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# |x| / 2**e in [128, 256): e = biased_exponent(absmax) - 127 - 7
EXP_SHIFT = 134
# e is clamped so that 2**e and 2**-e are normal fp32 numbers built from bits (127 -/+ e in [7, 247])
EXP_MIN, EXP_MAX = -100, 120


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32, exactly, for integer e in [EXP_MIN, EXP_MAX]."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def row_exponents(x: torch.Tensor) -> torch.Tensor:
    """int32 scale exponent of each row of ``x`` (float32, [..., D])."""
    amax = x.abs().amax(dim=-1)
    biased = (amax.view(torch.int32) >> 23) & 0xFF
    return (biased - EXP_SHIFT).clamp(EXP_MIN, EXP_MAX)


# ---------------------------------------------------------------- torch reference
def encode_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., D] float -> (codes uint8 [..., D], exp int8 [...])."""
    xf = x.float()
    e = row_exponents(xf)
    y = xf * _pow2(-e).unsqueeze(-1)
    codes = y.to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, e.to(torch.int8)


def decode_torch(codes: torch.Tensor, exp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = codes.view(torch.float8_e4m3fn).float()
    return (y * _pow2(exp).unsqueeze(-1)).to(dtype)


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def _e4m3_bits(y):
    """float32 y with |y| < 256 -> e4m3fn bit pattern (int32), round to nearest even."""
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    # normal e4m3 (|y| >= 2**-6): round the fp32 mantissa to 3 bits on the bit pattern;
    # a carry out of the mantissa correctly bumps the exponent
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
    # subnormal e4m3: m * 2**-9, m = rne(|y| * 512) via the 2**23 magic number (m = 8 is the smallest normal)
    m = (tl.abs(y) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    return sign | tl.where(a < 0x3C800000, m, normal)


@triton.jit
def _e4m3_value(c):
    """e4m3fn bit pattern (int32 0..255) -> float32 value (exact)."""
    ef = (c >> 3) & 15
    mf = c & 7
    normal = (((ef + 120) << 23) | (mf << 20)).to(tl.float32, bitcast=True)
    v = tl.where(ef == 0, mf.to(tl.float32) * 0.001953125, normal)  # 2**-9
    return tl.where((c & 0x80) != 0, -v, v)


@triton.jit
def _fp8_encode_kernel(x_ptr, c_ptr, e_ptr, n_rows, D: tl.constexpr, R: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    cols = tl.arange(0, BD)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(tl.maximum(biased - 134, -100), 120)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    codes = _e4m3_bits(x * inv[:, None])
    tl.store(c_ptr + offs, codes.to(tl.uint8), mask=mask)
    tl.store(e_ptr + rows, e.to(tl.int8), mask=rmask)


@triton.jit
def _fp8_decode_kernel(c_ptr, e_ptr, o_ptr, n_rows, D: tl.constexpr, R: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    cols = tl.arange(0, BD)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    c = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.int32)
    e = tl.load(e_ptr + rows, mask=rmask, other=0).to(tl.int32)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    x = _e4m3_value(c) * scale[:, None]
    tl.store(o_ptr + offs, x.to(o_ptr.dtype.element_ty), mask=mask)


# elements per program and warps: 4096 / 4 was the fastest of 6 configurations on an H100 (encode
# 1.99 TB/s, decode 1.83 TB/s of bf16; 8192 / 8 decoded at 1.64); see kernels/NOTES.md
TILE = 4096
NUM_WARPS = 4


def _rows(d: int) -> tuple[int, int]:
    bd = triton.next_power_of_2(d)
    return max(1, TILE // bd), bd


def encode_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    x2 = x.contiguous()
    n = x2.numel() // d
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    exp = torch.empty(x.shape[:-1], dtype=torch.int8, device=x.device)
    r, bd = _rows(d)
    _fp8_encode_kernel[(triton.cdiv(n, r),)](x2, codes, exp, n, d, R=r, BD=bd, num_warps=NUM_WARPS)
    return codes, exp


def decode_triton(codes: torch.Tensor, exp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = codes.shape[-1]
    n = codes.numel() // d
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    r, bd = _rows(d)
    _fp8_decode_kernel[(triton.cdiv(n, r),)](codes.contiguous(), exp.contiguous(), out, n, d, R=r, BD=bd,
                                             num_warps=NUM_WARPS)
    return out
