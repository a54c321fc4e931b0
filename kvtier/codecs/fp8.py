"""The ``fp8`` codec: e4m3fn values with one power-of-two scale per row.

A row is one token of one head of K or V (head_dim values). The format and
the kernels are in ``kernels/fp8.py``: D bytes of e4m3fn codes and one int8
exponent per row, 8 + 8/D bits per element (ratio 1.97 on bf16 at D=64, 1.98
at D=128), relative error <= 2**-4 per element. A per-row scale rather than
one per (layer, head): e4m3 keeps its 3 mantissa bits only down to 2**-15 of
its largest value (normals span 2**-6 .. 448), so a shared scale would push
rows whose range is far below the head's maximum into its subnormals; the
per-row byte costs 8/D bits. A power of two rather than an fp16 scale: one
byte instead of two, exact scaling, and bit-identical results on every path.

This module checks a stored block before a kernel reads it and dispatches:
Triton on CUDA tensors, the torch reference elsewhere.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from kernels import fp8 as F
from kvtier.codecs import Codec, register_codec
from kvtier.codecs.kivi import expect_names, on_device, take

PARAMS = {"format": "e4m3fn", "scale": "pow2_row"}


class FP8Codec(Codec):
    name = "fp8"

    def encode(self, kv: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        with on_device(kv.device):
            codes, exp = (F.encode_triton if kv.is_cuda else F.encode_torch)(kv)
        return {"codes": codes, "exp": exp}, dict(PARAMS)

    def decode(self, buffers: Mapping[str, torch.Tensor], params: Mapping[str, Any],
               shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        for k, v in PARAMS.items():
            if params.get(k) != v:
                raise ValueError(f"fp8 block has {k}={params.get(k)!r}; this kvtier reads {k}={v!r}")
        expect_names(buffers, {"codes", "exp"})
        rows = math.prod(shape[:-1])
        codes = take(buffers, "codes", torch.uint8, tuple(shape))
        exp = take(buffers, "exp", torch.int8, tuple(shape[:-1]))
        lo, hi = int(exp.min()), int(exp.max())  # one byte a row: cheap, and keeps 2**e a normal float
        if rows and (lo < F.EXP_MIN or hi > F.EXP_MAX):
            raise ValueError(f"fp8 exponents span [{lo}, {hi}], outside [{F.EXP_MIN}, {F.EXP_MAX}]")
        with on_device(device):
            return (F.decode_triton if device.type == "cuda" else F.decode_torch)(codes, exp, dtype)


register_codec(FP8Codec())
