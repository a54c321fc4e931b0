"""vLLM paged KV caches <-> kvtier chunks, in pure torch (no vLLM import).

A kvtier chunk is ``[layers, 2, kv_heads, chunk_tokens, head_dim]`` (0 = K, 1 = V).
vLLM keeps one paged tensor per attention layer; a chunk of ``chunk_tokens``
tokens spans ``chunk_tokens // block_size`` whole blocks of it. Two page formats
are known:

``cpu-vec``  vLLM's CPU attention with the ``vec`` ISA (x86 without AMX, block
             size a multiple of 32; ``v1/attention/backends/cpu_attn.py``):
             ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, and each
             (block, head) page holds K transposed ``[head_dim, block_size]``
             followed by V ``[block_size, head_dim]`` (not K|V per token: reading
             it naively was off by 14.7 against transformers' K/V, this reading by 5.7e-6).
``flash``    CUDA flash-attention: ``[2, num_blocks, block_size, kv_heads, head_dim]``.

Other layouts (the CPU ``amx``/``neon``/``vsx``/``vec16`` ISAs, MLA, fp8 caches)
are not decoded here: ``detect`` names them and the connector refuses them, so a
page is never read in a layout nobody checked. The torch code here runs on CPU
and CUDA (index_select / index_copy_ and views only) and is the reference;
``gather``/``scatter`` of the ``flash`` format on CUDA take the one-launch Triton
copy of ``kernels/pages.py`` (bit-identical: a copy; 2-4 torch kernels per
layer and every byte moved twice made save / load 0.48 / 0.32 TB/s on an
H200). This module knows nothing of tiers, keys or vLLM's scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

FORMATS = ("cpu-vec", "flash")
IMPLS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class PageLayout:
    """The shape of one layer's paged KV tensor, and how its pages are laid out."""

    format: str
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"page format {self.format!r} is not supported; known: {FORMATS}")

    def shape(self) -> tuple[int, ...]:
        if self.format == "cpu-vec":
            return (self.num_blocks, self.kv_heads, self.block_size, 2 * self.head_dim)
        return (2, self.num_blocks, self.block_size, self.kv_heads, self.head_dim)


def detect(t: torch.Tensor, cpu_isa: str | None = None) -> PageLayout:
    """The layout of one layer's KV tensor, or a ValueError naming what it is.

    ``cpu_isa`` is vLLM's CPU attention ISA for this cache (``"vec"``, ``"amx"``, ...)
    on CPU, None for a CUDA tensor."""
    if t.device.type == "cpu":
        if t.dim() != 4:
            raise ValueError(f"CPU KV cache of shape {tuple(t.shape)} (dims {t.dim()}) is not the "
                             "[num_blocks, kv_heads, block_size, 2*head_dim] layout of vLLM's CPU attention "
                             "(an MLA cache?); refused")
        if cpu_isa != "vec":
            raise ValueError(f"vLLM CPU attention ISA {cpu_isa!r} lays pages out in a format kvtier does not "
                             f"decode (page format 'cpu-{cpu_isa}'); supported: 'cpu-vec' (x86 without AMX, "
                             "block_size a multiple of 32, head_dim a multiple of 32)")
        n, h, bs, d2 = t.shape
        if d2 % 2:
            raise ValueError(f"CPU KV cache last dim {d2} is odd; expected 2*head_dim")
        return PageLayout("cpu-vec", n, bs, h, d2 // 2, t.dtype)
    if t.dim() == 5 and t.shape[0] == 2:
        _, n, bs, h, d = t.shape
        return PageLayout("flash", n, bs, h, d, t.dtype)
    raise ValueError(f"{t.device.type} KV cache of shape {tuple(t.shape)} is not the flash-attention layout "
                     "[2, num_blocks, block_size, kv_heads, head_dim]; refused")


def _check(layers: Sequence[torch.Tensor], lay: PageLayout, block_ids: torch.Tensor, chunk_tokens: int) -> int:
    if chunk_tokens % lay.block_size:
        raise ValueError(f"chunk_tokens={chunk_tokens} is not a multiple of block_size={lay.block_size}")
    per = chunk_tokens // lay.block_size
    if block_ids.dim() != 2 or block_ids.shape[1] != per:
        raise ValueError(f"block_ids has shape {tuple(block_ids.shape)}, expected [chunks, {per}]")
    for i, t in enumerate(layers):
        if tuple(t.shape) != lay.shape() or t.dtype != lay.dtype:
            raise ValueError(f"layer {i} KV tensor {tuple(t.shape)} {t.dtype} does not match {lay}")
    return per


def copy_pages(layers: Sequence[torch.Tensor], lay: PageLayout, block_ids: torch.Tensor,
               chunk_tokens: int) -> torch.Tensor:
    """The raw pages ``block_ids`` (``[C, chunk_tokens // block_size]``) of every layer, copied out as they
    are (index_select: memcpy speed), so vLLM may reuse the blocks at once; ``pages_to_chunks`` turns the
    copy into chunks later (off the engine's step)."""
    _check(layers, lay, block_ids, chunk_tokens)
    ids = block_ids.to(layers[0].device, torch.long).reshape(-1)
    # index_select on 2-D views: on CPU the 4-D form was 75x slower (3.1 ms vs 0.04 ms for 32 SmolLM2 blocks)
    n, per_block = lay.num_blocks, lay.kv_heads * lay.block_size * 2 * lay.head_dim
    # written in place (out=): a stack of per-layer copies would move every byte twice
    if lay.format == "cpu-vec":
        raw = torch.empty((len(layers), ids.numel(), per_block), dtype=lay.dtype, device=ids.device)
        for li, t in enumerate(layers):
            torch.index_select(t.view(n, per_block), 0, ids, out=raw[li])
        return raw.view(len(layers), ids.numel(), lay.kv_heads, 2, lay.block_size * lay.head_dim)
    raw = torch.empty((len(layers), 2, ids.numel(), per_block // 2), dtype=lay.dtype, device=ids.device)
    for li, t in enumerate(layers):
        for i in (0, 1):
            torch.index_select(t[i].view(n, per_block // 2), 0, ids, out=raw[li, i])
    return raw.view(len(layers), 2, ids.numel(), lay.block_size, lay.kv_heads, lay.head_dim)


def pages_to_chunks(raw: torch.Tensor, lay: PageLayout, num_chunks: int) -> torch.Tensor:
    """Chunks ``[C, layers, 2, kv_heads, chunk_tokens, head_dim]`` from a ``copy_pages`` copy."""
    nl, c, h, bs, d = raw.shape[0], num_chunks, lay.kv_heads, lay.block_size, lay.head_dim
    per = (raw.shape[1] if lay.format == "cpu-vec" else raw.shape[2]) // c
    out = torch.empty((c, nl, 2, h, per * bs, d), dtype=raw.dtype, device=raw.device)
    if lay.format == "cpu-vec":  # raw [L, C*per, H, 2, bs*D]; K pages are [D, bs], V pages [bs, D]
        k = raw[:, :, :, 0].reshape(nl, c, per, h, d, bs).permute(1, 0, 3, 2, 5, 4)
        v = raw[:, :, :, 1].reshape(nl, c, per, h, bs, d).permute(1, 0, 3, 2, 4, 5)
        out[:, :, 0].view(c, nl, h, per, bs, d).copy_(k)
        out[:, :, 1].view(c, nl, h, per, bs, d).copy_(v)
    else:  # raw [L, 2, C*per, bs, H, D]
        out.view(c, nl, 2, h, per, bs, d).copy_(raw.view(nl, 2, c, per, bs, h, d).permute(2, 0, 1, 5, 3, 4, 6))
    return out


def _use_triton(layers: Sequence[torch.Tensor], lay: PageLayout, impl: str) -> bool:
    """Whether ``impl`` picks the Triton copy: ``auto`` on CUDA for the flash format, ``triton`` wherever
    Triton runs (the CPU interpreter in tests); a layout the kernel cannot take is an error, never a guess."""
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if impl == "torch" or (impl == "auto" and (layers[0].device.type != "cuda" or lay.format != "flash")):
        return False
    from kernels import pages as KP  # Triton only where it is used: the CPU engine's path is torch

    if lay.format == "flash" and KP.supported(layers):
        return True
    if impl == "auto":
        return False
    raise ValueError(f"impl='triton' moves contiguous flash pages of one 1/2/4-byte dtype; got format "
                     f"{lay.format!r}, {layers[0].dtype}, contiguous={[t.is_contiguous() for t in layers][:4]}")


def _check_ids(block_ids: torch.Tensor, lay: PageLayout, lowest: int) -> None:
    """The Triton copy addresses raw memory: an id out of range is an error here, not a stray write.
    (The worker's block tables are CPU tensors: checking them costs no GPU sync.)"""
    if block_ids.numel() and bool((block_ids < lowest).any() | (block_ids >= lay.num_blocks).any()):
        bad = block_ids[(block_ids < lowest) | (block_ids >= lay.num_blocks)][0].item()
        raise ValueError(f"block id {bad} is outside [{lowest}, {lay.num_blocks})")


def gather(layers: Sequence[torch.Tensor], lay: PageLayout, block_ids: torch.Tensor,
           chunk_tokens: int, impl: str = "auto") -> torch.Tensor:
    """Chunks ``[C, layers, 2, kv_heads, chunk_tokens, head_dim]`` (a new tensor) from the pages
    ``block_ids[c]`` (``[C, chunk_tokens // block_size]``, in token order) of every layer.
    ``impl``: ``auto`` (Triton for flash pages on CUDA, else torch), ``torch`` or ``triton``."""
    if _use_triton(layers, lay, impl):
        from kernels import pages as KP

        per = _check(layers, lay, block_ids, chunk_tokens)
        _check_ids(block_ids, lay, 0)
        ids = block_ids.to(layers[0].device, torch.long).reshape(-1)
        return KP.gather_flash(layers, ids, lay.num_blocks, lay.block_size, lay.kv_heads, lay.head_dim,
                               block_ids.shape[0], per)
    return pages_to_chunks(copy_pages(layers, lay, block_ids, chunk_tokens), lay, block_ids.shape[0])


def scatter(layers: Sequence[torch.Tensor], lay: PageLayout, block_ids: torch.Tensor,
            chunks: torch.Tensor, impl: str = "auto") -> None:
    """Write chunks ``[C, layers, 2, kv_heads, chunk_tokens, head_dim]`` into the pages
    ``block_ids[c]`` of every layer, in place (the inverse of ``gather``); a block id of -1 is skipped.
    ``impl`` as for ``gather``."""
    if chunks.dim() != 6:
        raise ValueError(f"chunks has {chunks.dim()} dims, expected 6: [chunks, layers, 2, kv_heads, tokens, head_dim]")
    c, nl, two, h, tokens, d = chunks.shape
    if (nl, two, h, d) != (len(layers), 2, lay.kv_heads, lay.head_dim) or c != block_ids.shape[0]:
        raise ValueError(f"chunks of shape {tuple(chunks.shape)} do not fit {len(layers)} layers of {lay} "
                         f"and {block_ids.shape[0]} chunks of block ids")
    per = _check(layers, lay, block_ids, tokens)
    bs = lay.block_size
    dev = layers[0].device
    ids = block_ids.to(dev, torch.long).reshape(-1)
    if _use_triton(layers, lay, impl):
        from kernels import pages as KP

        _check_ids(block_ids, lay, -1)
        KP.scatter_flash(layers, ids, chunks.to(device=dev, dtype=lay.dtype).contiguous(), lay.num_blocks, bs)
        return
    keep = None if bool((ids >= 0).all()) else (ids >= 0).nonzero().view(-1)  # -1: a block vLLM already holds
    if keep is not None:
        ids = ids.index_select(0, keep)
    chunks = chunks.to(device=dev, dtype=lay.dtype)
    for li, t in enumerate(layers):
        src = chunks[:, li].view(c, 2, h, per, bs, d)
        if lay.format == "cpu-vec":
            page = torch.empty((c, per, h, 2, bs * d), dtype=lay.dtype, device=dev)
            page[:, :, :, 0].view(c, per, h, d, bs).copy_(src[:, 0].permute(0, 2, 1, 4, 3))
            page[:, :, :, 1].view(c, per, h, bs, d).copy_(src[:, 1].permute(0, 2, 1, 3, 4))
            page = page.view(c * per, -1)
            t.view(lay.num_blocks, -1).index_copy_(0, ids, page if keep is None else page[keep])  # 2-D: fast
        else:
            page = src.permute(1, 0, 3, 4, 2, 5).reshape(2, c * per, -1)  # [2, C*per, bs*H*D]
            for i in (0, 1):
                t[i].view(lay.num_blocks, -1).index_copy_(0, ids, page[i] if keep is None else page[i][keep])


def tokens_kv(layers: Sequence[torch.Tensor], lay: PageLayout, block_ids: Sequence[int],
              num_tokens: int) -> torch.Tensor:
    """The K/V of the first ``num_tokens`` tokens held in ``block_ids`` (a request's block table), as
    ``[layers, 2, kv_heads, num_tokens, head_dim]``: for comparing pages against another engine's K/V."""
    nb = -(-num_tokens // lay.block_size)
    ids = torch.tensor(list(block_ids[:nb]), dtype=torch.long).view(1, nb)
    return gather(layers, lay, ids, nb * lay.block_size)[0, :, :, :, :num_tokens]


def write_chunks(layers: Sequence[torch.Tensor], lay: PageLayout, block_ids: Sequence[Sequence[int]],
                 chunks: Sequence[torch.Tensor]) -> None:
    """``scatter`` for the ``cpu-vec`` format from a list of decoded chunks
    (``[layers, 2, kv_heads, chunk_tokens, head_dim]`` each), each written straight into its pages: one
    pass over the bytes, where stacking the chunks and building each layer's pages first took three (at 4K
    tokens, 185 MB each for SmolLM2 fp32: stack 0.2-2 s and scatter 0.5-2.3 s on the loaded 2-core box).
    A run of consecutive block ids (the usual allocation) is one copy per layer and K/V; -1 is skipped."""
    if lay.format != "cpu-vec":
        raise ValueError(f"write_chunks writes cpu-vec pages, not {lay.format!r}; use scatter")
    if len(block_ids) != len(chunks):
        raise ValueError(f"{len(block_ids)} rows of block ids for {len(chunks)} chunks")
    bs, h, d = lay.block_size, lay.kv_heads, lay.head_dim
    want = (len(layers), 2, h, None, d)
    for row, kv in zip(block_ids, chunks):
        if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4]) != (want[0], 2, h, d) \
                or kv.shape[3] != len(row) * bs:
            raise ValueError(f"chunk of shape {tuple(kv.shape)} does not fit {len(row)} blocks of {lay} "
                             f"and {len(layers)} layers")
    for i, t in enumerate(layers):
        if tuple(t.shape) != lay.shape() or t.dtype != lay.dtype:
            raise ValueError(f"layer {i} KV tensor {tuple(t.shape)} {t.dtype} does not match {lay}")
    for row, kv in zip(block_ids, chunks):
        kv = kv.to(device=layers[0].device, dtype=lay.dtype)
        runs, j = [], 0  # (first block, first position in the row, length) of consecutive ids
        while j < len(row):
            if row[j] < 0:
                j += 1
                continue
            k = j
            while k + 1 < len(row) and row[k + 1] == row[k] + 1:
                k += 1
            runs.append((int(row[j]), j, k - j + 1))
            j = k + 1
        for li, t in enumerate(layers):
            pg = t.view(lay.num_blocks, h, 2, bs * d)
            for b0, j0, n in runs:
                src = kv[li, :, :, j0 * bs:(j0 + n) * bs].view(2, h, n, bs, d)
                pg[b0:b0 + n, :, 0].view(n, h, d, bs).copy_(src[0].permute(1, 0, 3, 2))  # K pages are [D, bs]
                pg[b0:b0 + n, :, 1].view(n, h, bs, d).copy_(src[1].permute(1, 0, 2, 3))
