"""The ``none`` codec: lossless passthrough of the raw bytes (bit-exact).

The baseline every ratio is measured against, and the codec to use when a
serving team needs greedy outputs identical to recompute.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from kvtier.codecs import Codec, register_codec


class NoneCodec(Codec):
    name = "none"
    lossless = True

    def encode(self, kv: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"data": kv.contiguous().view(-1).view(torch.uint8)}, {}

    def decode(self, buffers: Mapping[str, torch.Tensor], params: Mapping[str, Any],
               shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        data = buffers["data"]
        return data.view(dtype).reshape(shape)


register_codec(NoneCodec())
