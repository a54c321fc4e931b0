"""vLLM flash-attention pages <-> kvtier chunks in one Triton launch for all layers.

The torch twin and the definition of both layouts are ``kvtier/vllm/pages.py``
(``gather``/``scatter`` with ``impl="torch"``): that path is the reference, this
one must be a bit-for-bit copy of it (tests/vllm/test_pages.py compares them on
every dtype under TRITON_INTERPRET=1). Only the CUDA ``flash`` format is here:
the CPU ``vec`` format exists only in vLLM's CPU engine, where Triton runs in
no compiled form and the torch path is the one that runs.

Layout: each layer is its own tensor ``[2, num_blocks, block_size, kv_heads,
head_dim]``; a chunk is ``[C, layers, 2, kv_heads, chunk_tokens, head_dim]``.
One page of one layer and one of K/V (``block_size * kv_heads`` rows of
``head_dim``, contiguous) goes to ``kv_heads`` runs of ``block_size * head_dim``
contiguous elements of the chunk. One program moves one such page, so a read
and a write are each whole 256-byte rows at head_dim 128 (coalesced on both
sides); the grid is (blocks, 2 * layers).

All layers in one launch: the kernel gets layer 0 as its base pointer and each
layer's element offset from it (``layer_offsets``: every layer lives in the same
address space, and vLLM's allocations are 256-byte aligned, so the distance is a
whole number of elements). The torch path moves every byte twice (an
index_select to pages, then a permuting copy; the inverse on load) and launches
2-4 kernels per layer: 0.48 / 0.32 TB/s on an H200 for save / load, this copy
1.76 / 1.83 TB/s, against 2.12 TB/s for one contiguous copy of the same bytes
in the same run (bench/results/vllm-pages-h200.md).

Elements are moved as integers of their size (a copy never looks at a float),
so any 1/2/4-byte dtype is exact. This module knows nothing of vLLM, keys or tiers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32}
# rows of head_dim per loop step: 4096 elements (8 KiB of bf16), 4 steps per 32 KiB page at Llama shapes
# (16 tokens x 8 heads x 128). The H200 sweep (TILE 2048-16384 x 2/4/8 warps) put every configuration
# at 1.4-1.8 TB/s with no clear winner (the default itself measured 1.48-1.83 in one run: noise ~15 %)
TILE = 4096
NUM_WARPS = 4
_OFFSETS: dict = {}


@triton.jit
def _flash_pages_kernel(base, off_ptr, ids_ptr, chunk, NB, PER,
                        L: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                        RB: tl.constexpr, BD: tl.constexpr, ALIGN: tl.constexpr, TO_CHUNKS: tl.constexpr):
    b = tl.program_id(0)              # index into the flattened [C, PER] block table
    lk = tl.program_id(1)             # layer * 2 + kv
    li = lk // 2
    kv = lk % 2
    blk = tl.load(ids_ptr + b).to(tl.int64)
    if blk >= 0:                      # -1: a block vLLM already holds (scatter skips it)
        c = b // PER
        j = b % PER
        T = PER * BS
        # offsets come in units of ALIGN elements (16 bytes where every layer allows it): the compiler then
        # knows each page row is 16-byte aligned and moves it in 16-byte vectors (an offset of unknown
        # alignment would make every access a 2-byte one)
        page = tl.load(off_ptr + li) * ALIGN + (kv * NB + blk) * (BS * H * D)
        cbase = ((c.to(tl.int64) * L + li) * 2 + kv) * H * T * D + j.to(tl.int64) * BS * D
        d = tl.arange(0, BD)
        dmask = d < D
        for r0 in range(0, BS * H, RB):
            r = r0 + tl.arange(0, RB)     # page row = token * H + head
            rmask = (r < BS * H)[:, None] & dmask[None, :]
            tok = r // H
            h = r % H
            p_off = page + r[:, None].to(tl.int64) * D + d[None, :]
            c_off = cbase + (h.to(tl.int64) * T + tok)[:, None] * D + d[None, :]
            if TO_CHUNKS:
                tl.store(chunk + c_off, tl.load(base + p_off, mask=rmask), mask=rmask)
            else:
                tl.store(base + p_off, tl.load(chunk + c_off, mask=rmask), mask=rmask)


def layer_offsets(layers, device: torch.device) -> tuple[torch.Tensor, int]:
    """(int64 [layers] offsets of each layer from layer 0 in units of ``align`` elements, ``align``): 16 bytes'
    worth of elements where every offset is a multiple of that, else 1. Cached: vLLM's layers never move."""
    key = tuple(t.data_ptr() for t in layers) + (layers[0].element_size(), str(device))
    if key not in _OFFSETS:
        es = layers[0].element_size()
        delta = [p - key[0] for p in key[: len(layers)]]
        bad = [i for i, x in enumerate(delta) if x % es]
        if bad:
            raise ValueError(f"layer {bad[0]} starts {delta[bad[0]]} bytes from layer 0, not a whole number of "
                             f"{es}-byte elements; the one-launch page kernel cannot address it")
        align = 16 // es if all(x % 16 == 0 for x in delta) and key[0] % 16 == 0 else 1
        if len(_OFFSETS) > 64:  # bounded: a process that re-allocates caches keeps no stale entries forever
            _OFFSETS.clear()
        _OFFSETS[key] = (torch.tensor([x // (es * align) for x in delta], dtype=torch.int64, device=device), align)
    return _OFFSETS[key]


def supported(layers) -> bool:
    """Whether this kernel can move these layers: contiguous, one dtype of 1/2/4 bytes, one device."""
    t0 = layers[0]
    return t0.element_size() in _INT and all(t.is_contiguous() and t.dtype == t0.dtype and t.device == t0.device
                                             for t in layers)


def _launch(layers, ids: torch.Tensor, chunks: torch.Tensor, num_blocks: int, block_size: int, to_chunks: bool):
    c, nl, _, h, tokens, d = chunks.shape
    if ids.numel() == 0:  # nothing to move (an empty grid is a launch error)
        return
    per = tokens // block_size
    it = _INT[layers[0].element_size()]
    base = layers[0].view(it)
    bd = triton.next_power_of_2(d)
    rb = max(1, min(triton.next_power_of_2(block_size * h), TILE // bd))
    grid = (ids.numel(), 2 * nl)
    offsets, align = layer_offsets(layers, base.device)
    _flash_pages_kernel[grid](base, offsets, ids, chunks.view(it), num_blocks, per,
                              L=nl, H=h, D=d, BS=block_size, RB=rb, BD=bd, ALIGN=align, TO_CHUNKS=to_chunks,
                              num_warps=NUM_WARPS)


def gather_flash(layers, ids: torch.Tensor, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 num_chunks: int, per: int) -> torch.Tensor:
    """Chunks ``[C, layers, 2, kv_heads, chunk_tokens, head_dim]`` from the pages ``ids`` (int64, flattened
    ``[C, per]`` block table on the layers' device, ids >= 0)."""
    out = torch.empty((num_chunks, len(layers), 2, kv_heads, per * block_size, head_dim),
                      dtype=layers[0].dtype, device=layers[0].device)
    _launch(layers, ids, out, num_blocks, block_size, True)
    return out


def scatter_flash(layers, ids: torch.Tensor, chunks: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """Write contiguous ``chunks`` (the layers' dtype and device) into the pages ``ids``; -1 ids are skipped."""
    _launch(layers, ids, chunks, num_blocks, block_size, False)


__all__ = ["gather_flash", "scatter_flash", "layer_offsets", "supported"]
