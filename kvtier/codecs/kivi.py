"""The ``kivi4`` codec: KIVI-style asymmetric group quantization.

Keys are quantized per channel over groups of tokens, values per token over
groups of channels (KIVI, Liu et al., ICML 2024), with an fp16 scale and zero
per group; codes are packed along head_dim. The format, the error bound and
the kernels are in ``kernels/kivi.py``; this module picks the group sizes,
checks the input, validates a stored block before a kernel reads it, and
dispatches: Triton on CUDA tensors, the torch reference elsewhere.

Bits per element (two fp16 per group): bits + 16/k_group + 16/v_group.
  kivi4: k_group 64 tokens, v_group 64 channels -> 4.5 bits, ratio 3.56 on bf16
Group sizes from a quick probe on SmolLM2-135M (kernels/NOTES.md; Δppl):
kivi4 at 64/64 +0.48 %, at 32/32 +0.72 % (no gain for 0.5 bit more), at
128/64 +0.73 %; kivi2 at 32/32 +19.7 %, at 64/64 +27.5 %, at 16/16 +10.8 %
(but 4 bits/elem, kivi4's size). Two bits stay poor without KIVI's fp16
window of recent tokens, which a stored prefix chunk cannot have: ``kivi2``
(5.33x, +20-23 %) was deleted, the ``q*`` codecs beat it.

Also the small helpers the other quantizing codecs share: ``take`` (a stored
buffer of exactly the expected size, viewed as the expected dtype/shape),
``check_fp16_range`` and ``on_device`` (Triton launches on the current CUDA
device: a worker holding tensors on cuda:1 must make that device current).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import torch

from kernels import kivi as K
from kernels.pack import plane_bytes
from kvtier.codecs import Codec, register_codec
from kvtier.errors import CodecError

FP16_MAX = 65504.0


def take(bufs: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored buffer ``name`` as ``dtype`` of ``shape``; a wrong size is a corrupt block, never a kernel read."""
    if name not in bufs:
        raise ValueError(f"buffer {name!r} is missing (have {sorted(bufs)})")
    b = bufs[name]
    want = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if b.dtype != torch.uint8 or b.numel() != want:
        raise ValueError(f"buffer {name!r} holds {b.numel()} bytes, expected {want} for {dtype} {tuple(shape)}")
    return b.contiguous().view(dtype).reshape(shape)


def expect_names(bufs: Mapping[str, Any], names: set[str]) -> None:
    if set(bufs) != names:
        raise ValueError(f"buffers {sorted(bufs)} do not match the format's {sorted(names)}")


def check_fp16_range(kv: torch.Tensor, codec: str, limit: float = FP16_MAX) -> None:
    """Scales and zeros are fp16: a value beyond ``limit`` cannot be represented."""
    if kv.dtype == torch.float16 and limit >= FP16_MAX:
        return
    amax = float(kv.abs().amax())
    if amax > limit:
        raise CodecError(f"codec {codec!r} stores fp16 scales and zeros: kv holds |x| = {amax:g} > {limit:g}; "
                         f"use 'fp8' or 'none' for such values")


def on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def int_param(params: Mapping[str, Any], name: str, ok) -> int:
    v = params.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not ok(v):
        raise ValueError(f"bad codec parameter {name}={v!r}")
    return v


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


class KiviCodec(Codec):
    def __init__(self, name: str, bits: int, k_group: int, v_group: int):
        self.name, self.bits, self.k_group, self.v_group = name, bits, k_group, v_group

    def v_group_for(self, d: int) -> int:
        """Value group: the configured size, or the largest power of two dividing head_dim if smaller."""
        return min(self.v_group, d & -d)

    def check(self, kv: torch.Tensor) -> None:
        d = kv.shape[-1]
        per = 8 // self.bits
        if d % per:
            raise CodecError(f"codec {self.name!r} packs {per} codes to a byte: "
                             f"head_dim {d} must be a multiple of {per}")
        check_fp16_range(kv, self.name)

    def encode(self, kv: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        vg = self.v_group_for(kv.shape[-1])
        enc = K.encode_triton if kv.is_cuda else K.encode_torch
        with on_device(kv.device):
            bufs = enc(kv, self.bits, self.k_group, vg)
        return bufs, {"bits": self.bits, "k_group": self.k_group, "v_group": vg}

    def decode(self, buffers: Mapping[str, torch.Tensor], params: Mapping[str, Any],
               shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if len(shape) != 5 or shape[1] != 2:
            raise ValueError(f"kivi block shape {shape} is not [layers, 2, kv_heads, tokens, head_dim]")
        L, _, H, T, D = shape
        bits = int_param(params, "bits", lambda b: b in (2, 3, 4) and D % (8 // b) == 0)
        kg = int_param(params, "k_group", lambda g: is_pow2(g) and g <= 1024)
        vg = int_param(params, "v_group", lambda g: is_pow2(g) and D % g == 0)
        ng = -(-T // kg)
        planes = ("q", "q1") if bits == 3 else ("q",)
        expect_names(buffers, {*planes, "k_scale", "k_zero", "v_scale", "v_zero"})
        bufs = {}
        for name, nbytes in zip(planes, plane_bytes(L * 2 * H * T, D, bits)):
            bufs[name] = take(buffers, name, torch.uint8, (nbytes,))
        for kind, gshape in (("k", (L, H, ng, D)), ("v", (L, H, T, D // vg))):
            for part in ("scale", "zero"):
                bufs[f"{kind}_{part}"] = take(buffers, f"{kind}_{part}", torch.float16, gshape)
        dec = K.decode_triton if device.type == "cuda" else K.decode_torch
        with on_device(device):
            return dec(bufs, shape, dtype, bits, kg, vg)


register_codec(KiviCodec("kivi4", bits=4, k_group=64, v_group=64))
