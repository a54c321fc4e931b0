"""Many blocks decoded at once: one kernel launch for a run of blocks that share codec, shape, dtype and params.

A GPU get of 16K tokens is 63 blocks; decoding them one by one cost ~87 us of launch Python each on the H200
host (5.5 ms of a 18 ms rot4 load, more than the decodes' 1.6 ms of GPU time). A codec whose payload is
laid out layer-major (every buffer is its rows in order of the leading dimensions: ``rot*``, and ``x*``/``q*``
without a ``+zstd`` byte layout) says so with ``batch_params(params, k)``: the params that decode the k
blocks' buffers concatenated as one block of ``k * layers`` layers. ``decode_many`` concatenates each buffer
on the device (one copy of the compressed bytes, cheap beside the decode's output), decodes once and hands
out ``out[j]``: views of one fresh tensor, never of a cached buffer. At most ``MAX_BATCH_BYTES`` of compressed
bytes are concatenated per launch, so the transient copy stays small beside the decoded output.

A run that does not batch (one block, another codec, a decode error) is decoded block by block, so a bad
block fails alone and names itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from kvtier.codecs import get_codec
from kvtier.errors import BlockFormatError

MAX_BATCH_BYTES = 256 << 20  # compressed bytes concatenated for one launch (a 16K-token rot4 get: 3 launches)


@dataclass
class Item:
    """One block to decode: its key (for errors), base codec, params, shape, dtype and payload buffers on the
    target device (flat uint8)."""

    key: str
    codec: str
    params: Mapping[str, Any]
    shape: tuple[int, ...]
    dtype: torch.dtype
    buffers: Mapping[str, torch.Tensor]


def decode_many(items: Sequence[Item], device: torch.device,
                one: Callable[[int], torch.Tensor]) -> list[torch.Tensor | BlockFormatError]:
    """Per item, its decoded chunk or the ``BlockFormatError`` it raised. Consecutive items that batch are
    decoded in one call; ``one(i)`` decodes ``items[i]`` alone (the caller's per-block path: its checks, its
    copy rule)."""
    out: list[torch.Tensor | BlockFormatError] = []
    i = 0
    while i < len(items):
        j = i + 1
        while j < len(items) and _same(items[i], items[j]):
            j += 1
        per = max(1, MAX_BATCH_BYTES // max(1, sum(t.numel() for t in items[i].buffers.values())))
        for a in range(i, j, per):  # the concatenated copy is at most MAX_BATCH_BYTES
            b = min(j, a + per)
            got = _batch(items[a:b], device) if b - a > 1 else None
            if got is None:
                got = []
                for t in range(a, b):
                    try:
                        got.append(one(t))
                    except BlockFormatError as e:
                        got.append(e)
            out += got
        i = j
    return out


def _same(a: Item, b: Item) -> bool:
    if a.codec != b.codec or a.shape != b.shape or a.dtype != b.dtype or a.buffers.keys() != b.buffers.keys():
        return False
    if any(a.buffers[n].numel() != b.buffers[n].numel() for n in a.buffers):
        return False
    return a.params is b.params or a.params == b.params


def _batch(group: Sequence[Item], device: torch.device) -> list[torch.Tensor] | None:
    """The group decoded in one call, or None (not batchable here, or the decode failed: the caller decodes
    block by block, so the failing block is named)."""
    first = group[0]
    codec = get_codec(first.codec)
    rule = getattr(codec, "batch_params", None)
    k = len(group)
    params = rule(first.params, k) if rule is not None else None
    if params is None:
        return None
    if any(t.dtype != torch.uint8 or t.dim() != 1 or t.device.type != device.type
           or (device.index is not None and t.device.index != device.index)
           for it in group for t in it.buffers.values()):
        return None
    shape = (k * first.shape[0], *first.shape[1:])
    try:
        bufs = {n: torch.cat([it.buffers[n] for it in group]) for n in first.buffers}
        out = codec.decode(bufs, params, shape, first.dtype, device)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError):
        return None
    if tuple(out.shape) != shape or out.dtype != first.dtype:
        return None
    return list(out.view(k, *first.shape).unbind(0))


__all__ = ["Item", "decode_many"]
