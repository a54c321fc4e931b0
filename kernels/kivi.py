"""KIVI-style asymmetric group quantization of a KV chunk: Triton kernel + torch reference.

Format (what ``kvtier.codecs.kivi`` stores) for ``kv`` [L, 2, H, T, D]:
- keys (kv[:, 0]) per channel over groups of ``k_group`` tokens: for every
  (layer, head, token group, channel) an fp16 ``scale`` and fp16 ``zero``
  (``k_scale``/``k_zero``, [L, H, ceil(T/k_group), D]); the last group is
  ragged when ``k_group`` does not divide T (its scale comes from the tokens it
  has; no padding is stored). Per channel because keys carry outlier channels
  (KIVI, Liu et al. 2024): a per-token key group would spend its range on them.
- values (kv[:, 1]) per token over groups of ``v_group`` channels
  (``v_scale``/``v_zero``, [L, H, T, D/v_group]).
- codes ``q = clamp(floor((x - zero)/scale + 1/2), 0, 2**bits - 1)`` with the
  fp16-rounded scale and zero, packed along D by ``kernels.pack``
  ([L, 2, H, T, D*bits/8] per plane). ``x^ = q*scale + zero``.
Bits per element: bits + 32/2 * (1/k_group + 1/v_group) (two fp16 per group).

Error bound per element: |x - x^| <= scale/2 + fp16 rounding of zero
+ (2**bits-1) * fp16 rounding of scale, plus rounding to the output dtype.

Both paths do the same fp32 operations in the same order (multiply by the
reciprocal of the fp16 scale; add 1/2 and truncate), so codes, scales and
decoded values agree bit for bit on the CPU interpreter. On a GPU the compiler
may fuse a multiply-add into an FMA, which moves a code by one at an exact
rounding tie (measured in bench/kernels.py --check).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pack import PLANES, load_codes, out_value, out_view, pack_torch, store_codes, unpack_torch

# elements per program and warps: 8192 / 4 on an H100 encodes at 1.71 TB/s of bf16 and decodes at 2.07;
# 8 warps encoded at 1.12 (the key kernel reduces over tokens, across warps); see kernels/NOTES.md
TILE = 8192
NUM_WARPS = 4


def quant_params(mn: torch.Tensor, mx: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16 scale and zero of groups with minimum ``mn`` and maximum ``mx`` (fp32),
    and the fp32 reciprocal of the scale (0 for a constant group)."""
    scale_h = ((mx - mn) / qmax).to(torch.float16)
    zero_h = mn.to(torch.float16)
    s = scale_h.float()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    return scale_h, zero_h, inv


@triton.jit
def scale_params(span, QDIV: tl.constexpr):
    """The kernels' twin of ``quant_params``: (fp16 scale = span / QDIV, that scale in fp32, its fp32
    reciprocal, 0 for a zero scale). Both divisions are ``div_rn`` (IEEE, as torch divides): Triton's ``/``
    on fp32 is the approximate div.full.f32 on NVIDIA GPUs (2 ulp), which moved fp16 scales by one ulp from
    torch's where the quotient is an fp16 tie (common with bf16/fp16 inputs: the H200 test run, kivi3)."""
    sh = tl.div_rn(span, tl.full(span.shape, QDIV, tl.float32)).to(tl.float16)
    s = sh.to(tl.float32)
    inv = tl.where(s > 0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
    return sh, s, inv


def quantize(x: torch.Tensor, zero_h: torch.Tensor, inv: torch.Tensor, qmax: int) -> torch.Tensor:
    return ((x - zero_h.float()) * inv + 0.5).clamp(0.0, float(qmax)).to(torch.int32)


# ---------------------------------------------------------------- torch reference
def encode_torch(kv: torch.Tensor, bits: int, k_group: int, v_group: int) -> dict[str, torch.Tensor]:
    L, _, H, T, D = kv.shape
    qmax = (1 << bits) - 1
    k = kv[:, 0].float()
    v = kv[:, 1].float()
    ng = -(-T // k_group)
    pad = ng * k_group - T
    kmin = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).reshape(L, H, ng, k_group, D).amin(3)
    kmax = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).reshape(L, H, ng, k_group, D).amax(3)
    ks, kz, kinv = quant_params(kmin, kmax, qmax)
    kq = quantize(k, kz.repeat_interleave(k_group, 2)[:, :, :T], kinv.repeat_interleave(k_group, 2)[:, :, :T], qmax)
    v5 = v.reshape(L, H, T, D // v_group, v_group)
    vs, vz, vinv = quant_params(v5.amin(-1), v5.amax(-1), qmax)
    vq = quantize(v5, vz.unsqueeze(-1), vinv.unsqueeze(-1), qmax).reshape(L, H, T, D)
    planes = pack_torch(torch.stack([kq, vq], dim=1), bits)
    out = dict(zip(("q", "q1"), planes))
    out.update(k_scale=ks, k_zero=kz, v_scale=vs, v_zero=vz)
    return out


def decode_torch(bufs: dict[str, torch.Tensor], shape, dtype: torch.dtype, bits: int, k_group: int,
                 v_group: int) -> torch.Tensor:
    L, _, H, T, D = shape
    planes = [bufs["q"]] + ([bufs["q1"]] if bits == 3 else [])
    q = unpack_torch([p.reshape(L, 2, H, T, -1) for p in planes], bits, D).float()
    ks = bufs["k_scale"].reshape(L, H, -1, D).float().repeat_interleave(k_group, 2)[:, :, :T]
    kz = bufs["k_zero"].reshape(L, H, -1, D).float().repeat_interleave(k_group, 2)[:, :, :T]
    k = q[:, 0] * ks + kz
    vs = bufs["v_scale"].reshape(L, H, T, D // v_group, 1).float()
    vz = bufs["v_zero"].reshape(L, H, T, D // v_group, 1).float()
    v = (q[:, 1].reshape(L, H, T, D // v_group, v_group) * vs + vz).reshape(L, H, T, D)
    return torch.stack([k, v], dim=1).to(dtype)


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def _kivi_encode_kernel(x_ptr, pa, pb, s_ptr, z_ptr, H, T, NG, D: tl.constexpr,
                        KV: tl.constexpr, R: tl.constexpr, BD: tl.constexpr, G: tl.constexpr,
                        BITS: tl.constexpr):
    pid_s = tl.program_id(0)  # (layer, head)
    pid_t = tl.program_id(1)  # block of R tokens
    slab = ((pid_s // H) * 2 + KV) * H + pid_s % H
    t = pid_t * R + tl.arange(0, R)
    cols = tl.arange(0, BD)
    tmask = t < T
    cmask = cols < D
    mask = tmask[:, None] & cmask[None, :]
    row = slab.to(tl.int64) * T + t
    x = tl.load(x_ptr + row[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    QMAX: tl.constexpr = (1 << BITS) - 1
    if KV == 0:
        # keys: per channel over groups of G tokens; R = KB * G tokens per program
        KB: tl.constexpr = R // G
        x3 = tl.reshape(x, (KB, G, BD))
        mn = tl.min(tl.reshape(tl.where(mask, x, float("inf")), (KB, G, BD)), axis=1)
        mx = tl.max(tl.reshape(tl.where(mask, x, float("-inf")), (KB, G, BD)), axis=1)
        ok = mn <= mx  # False only for groups past T (never stored); keeps inf out of the arithmetic
        mn = tl.where(ok, mn, 0.0)
        mx = tl.where(ok, mx, 0.0)
        sh, s, inv = scale_params(mx - mn, QMAX)
        zh = mn.to(tl.float16)
        v = (x3 - zh.to(tl.float32)[:, None, :]) * inv[:, None, :]
        q = tl.reshape(tl.minimum(tl.maximum(v + 0.5, 0.0), QMAX).to(tl.int32), (R, BD))
        g = pid_t * KB + tl.arange(0, KB)
        soff = (pid_s.to(tl.int64) * NG + g)[:, None] * D + cols[None, :]
        smask = (g < NG)[:, None] & cmask[None, :]
    else:
        # values: per token over groups of G channels
        NGV: tl.constexpr = BD // G
        x3 = tl.reshape(x, (R, NGV, G))
        mn = tl.min(x3, axis=2)  # masked lanes are 0 and their groups are never stored
        mx = tl.max(x3, axis=2)
        sh, s, inv = scale_params(mx - mn, QMAX)
        zh = mn.to(tl.float16)
        v = (x3 - zh.to(tl.float32)[:, :, None]) * inv[:, :, None]
        q = tl.reshape(tl.minimum(tl.maximum(v + 0.5, 0.0), QMAX).to(tl.int32), (R, BD))
        gv = tl.arange(0, NGV)
        soff = (pid_s.to(tl.int64) * T + t)[:, None] * (D // G) + gv[None, :]
        smask = tmask[:, None] & (gv < D // G)[None, :]
    tl.store(s_ptr + soff, sh, mask=smask)
    tl.store(z_ptr + soff, zh, mask=smask)
    store_codes(q, pa, pb, row, cols, tmask, D, R, BD, BITS)


@triton.jit
def _kivi_decode_kernel(pa, pb, s_ptr, z_ptr, o_ptr, H, T, NG, D: tl.constexpr,
                        KV: tl.constexpr, R: tl.constexpr, BD: tl.constexpr, G: tl.constexpr,
                        BITS: tl.constexpr, BF16: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    slab = ((pid_s // H) * 2 + KV) * H + pid_s % H
    t = pid_t * R + tl.arange(0, R)
    cols = tl.arange(0, BD)
    tmask = t < T
    cmask = cols < D
    row = slab.to(tl.int64) * T + t
    q = load_codes(pa, pb, row, tmask, D, R, BD, BITS).to(tl.float32)
    if KV == 0:
        KB: tl.constexpr = R // G
        g = pid_t * KB + tl.arange(0, KB)
        soff = (pid_s.to(tl.int64) * NG + g)[:, None] * D + cols[None, :]
        smask = (g < NG)[:, None] & cmask[None, :]
        s = tl.load(s_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        x = tl.reshape(tl.reshape(q, (KB, G, BD)) * s[:, None, :] + z[:, None, :], (R, BD))
    else:
        NGV: tl.constexpr = BD // G
        gv = tl.arange(0, NGV)
        soff = (pid_s.to(tl.int64) * T + t)[:, None] * (D // G) + gv[None, :]
        smask = tmask[:, None] & (gv < D // G)[None, :]
        s = tl.load(s_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        x = tl.reshape(tl.reshape(q, (R, NGV, G)) * s[:, :, None] + z[:, :, None], (R, BD))
    tl.store(o_ptr + row[:, None] * D + cols[None, :], out_value(x, BF16, o_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


def _tiles(T: int, D: int, k_group: int) -> tuple[int, int, int]:
    """(BD, tokens per program for K, for V). K programs cover whole token groups."""
    bd = triton.next_power_of_2(D)
    rv = max(1, TILE // bd)
    rk = max(k_group, rv // k_group * k_group)
    return bd, rk, rv


def encode_triton(kv: torch.Tensor, bits: int, k_group: int, v_group: int) -> dict[str, torch.Tensor]:
    L, _, H, T, D = kv.shape
    x = kv.contiguous()
    dev = x.device
    ng = -(-T // k_group)
    planes = [torch.empty(L, 2, H, T, D * b // 8, dtype=torch.uint8, device=dev) for b in PLANES[bits]]
    out = dict(zip(("q", "q1"), planes))
    f16 = dict(dtype=torch.float16, device=dev)
    out["k_scale"], out["k_zero"] = torch.empty(L, H, ng, D, **f16), torch.empty(L, H, ng, D, **f16)
    out["v_scale"], out["v_zero"] = (torch.empty(L, H, T, D // v_group, **f16) for _ in range(2))
    bd, rk, rv = _tiles(T, D, k_group)
    pa, pb = planes[0], planes[-1]
    _kivi_encode_kernel[(L * H, triton.cdiv(T, rk))](x, pa, pb, out["k_scale"], out["k_zero"], H, T, ng, D,
                                                     KV=0, R=rk, BD=bd, G=k_group, BITS=bits, num_warps=NUM_WARPS,
                                                     enable_fp_fusion=False)
    _kivi_encode_kernel[(L * H, triton.cdiv(T, rv))](x, pa, pb, out["v_scale"], out["v_zero"], H, T, ng, D,
                                                     KV=1, R=rv, BD=bd, G=v_group, BITS=bits, num_warps=NUM_WARPS,
                                                     enable_fp_fusion=False)
    return out


def decode_triton(bufs: dict[str, torch.Tensor], shape, dtype: torch.dtype, bits: int, k_group: int,
                  v_group: int) -> torch.Tensor:
    L, _, H, T, D = shape
    ng = -(-T // k_group)
    out = torch.empty(shape, dtype=dtype, device=bufs["q"].device)
    o, bf16 = out_view(out), dtype == torch.bfloat16
    pa = bufs["q"].contiguous()
    pb = bufs["q1"].contiguous() if bits == 3 else pa
    bd, rk, rv = _tiles(T, D, k_group)
    _kivi_decode_kernel[(L * H, triton.cdiv(T, rk))](pa, pb, bufs["k_scale"], bufs["k_zero"], o, H, T, ng, D,
                                                     KV=0, R=rk, BD=bd, G=k_group, BITS=bits, BF16=bf16,
                                                     num_warps=NUM_WARPS)
    _kivi_decode_kernel[(L * H, triton.cdiv(T, rv))](pa, pb, bufs["v_scale"], bufs["v_zero"], o, H, T, ng, D,
                                                     KV=1, R=rv, BD=bd, G=v_group, BITS=bits, BF16=bf16,
                                                     num_warps=NUM_WARPS)
    return out
