"""The ``rot4`` codec: randomized Hadamard rotation + per-row quantization.

Each row (one token of one head, head_dim values) is rotated by
``diag(signs) @ Hadamard / sqrt(D)`` — signs drawn from the seed stored in
the block's params — then quantized asymmetrically with an fp16 scale and zero
per row. The rotation spreads outlier channels over the whole row, so a single
range per token fits K as well as V, with the group overhead of one head_dim
(QuaRot, Ashkboos et al. 2024, rotates KV the same way). Format, error bound
and kernels: ``kernels/rot.py``. This module checks the input (power-of-two
head_dim, 16..256, the 16 being tl.dot's smallest tile and 256 the largest
rotation kept on chip), validates stored blocks and dispatches: Triton on
CUDA tensors, the torch reference elsewhere.

Bits per element: bits + 32/D. On bf16 at D=64: rot4 4.5 (ratio 3.56); at D=128:
4.25. ``rot3`` (4.57x, +3.7 % Δppl) and ``rot2`` (6.4x, +48-61 %) were deleted: the
calibrated ``q*`` codecs beat them in ratio and Δppl on both texts
(bench/results/quality.md); the kernels still take any width.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from kernels import rot as R
from kernels.pack import plane_bytes
from kvtier.codecs import Codec, register_codec
from kvtier.codecs.kivi import FP16_MAX, check_fp16_range, expect_names, int_param, is_pow2, on_device, take
from kvtier.errors import CodecError

SEED = 0x6B76746965720001  # any fixed 64-bit value; stored in every block, so it may change without breaking old blocks
ROTATION = "hadamard_signs_splitmix64"
MIN_D, MAX_D = 16, 256


def check_rotatable(kv: torch.Tensor, name: str) -> None:
    """What a Hadamard-rotating codec (rot*, q*) needs of a chunk: a power-of-two head_dim in range, and
    values whose rotated coordinates (at most sqrt(D) * max|x|) an fp16 zero holds."""
    d = kv.shape[-1]
    if not is_pow2(d) or not MIN_D <= d <= MAX_D:
        raise CodecError(f"codec {name!r} rotates head_dim with a Hadamard transform: head_dim {d} "
                         f"must be a power of two in [{MIN_D}, {MAX_D}]; use 'kivi4' or 'fp8'")
    check_fp16_range(kv, name, FP16_MAX / math.sqrt(d))


class RotCodec(Codec):
    def __init__(self, name: str, bits: int, seed: int = SEED):
        self.name, self.bits, self.seed = name, bits, seed

    def check(self, kv: torch.Tensor) -> None:
        check_rotatable(kv, self.name)

    def encode(self, kv: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        enc = R.encode_triton if kv.is_cuda else R.encode_torch
        with on_device(kv.device):
            bufs = enc(kv, self.bits, self.seed)
        return bufs, {"bits": self.bits, "seed": self.seed, "rotation": ROTATION}

    def batch_params(self, params: Mapping[str, Any], k: int) -> Mapping[str, Any]:
        """Every buffer is per row in order of the leading dims: k blocks concatenated are one block of
        k * layers layers with the same params (``kvtier.codecs.batch``)."""
        return params

    def decode(self, buffers: Mapping[str, torch.Tensor], params: Mapping[str, Any],
               shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        d = shape[-1]
        if not is_pow2(d) or not MIN_D <= d <= MAX_D:
            raise ValueError(f"rot block head_dim {d} is not a power of two in [{MIN_D}, {MAX_D}]")
        if params.get("rotation") != ROTATION:
            raise ValueError(f"rot block rotation {params.get('rotation')!r}; this kvtier reads {ROTATION!r}")
        bits = int_param(params, "bits", lambda b: b in (2, 3, 4))
        seed = int_param(params, "seed", lambda s: 0 <= s < 2**64)
        rows = math.prod(shape[:-1])
        planes = ("q", "q1") if bits == 3 else ("q",)
        expect_names(buffers, {*planes, "scale", "zero"})
        bufs = {name: take(buffers, name, torch.uint8, (n,)) for name, n in zip(planes, plane_bytes(rows, d, bits))}
        for name in ("scale", "zero"):
            bufs[name] = take(buffers, name, torch.float16, tuple(shape[:-1]))
        dec = R.decode_triton if device.type == "cuda" else R.decode_torch
        with on_device(device):
            return dec(bufs, shape, dtype, bits, seed)


register_codec(RotCodec("rot4", 4))
