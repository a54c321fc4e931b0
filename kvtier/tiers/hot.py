"""The hot tier: compressed blocks in the device memory of one process.

Each serving process (a prefill or decode worker, a notebook) has one
``HotTier``: a byte budget over the *compressed* size of the blocks it holds and
a local LRU order. It is the nearest copy: a hit costs a decode on the device
and no remote call. On CUDA the payload buffers are kept on the GPU, so a hit
decodes there without crossing PCIe; on CPU machines the "device" is the CPU and
the ``Block``'s own Arrow buffers are used.

Evicting from the hot tier drops the block only from this process: the runtime
writes every put through to a warm shard, so a copy is always further down.

Not here: anything remote (Ray), the index of other tiers (``kvtier.placement``).
Not thread-safe by itself; ``HotTier`` takes a lock around its state because the
client's prefetch thread fills it while the caller reads.
"""

from __future__ import annotations

import mmap
import threading
from typing import Any

import torch

from kvtier.block import Block
from kvtier.codecs import ZSTD_SUFFIX, TORCH_DTYPES, decompress, get_codec
from kvtier.errors import BlockFormatError
from kvtier.placement import LRU


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_HUGE_COPY_BYTES = 4 << 20  # copies this large go to huge pages (below it malloc reuses warm heap pages)


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor; large ones in memory advised to use 2 MiB pages: a fresh 32 MiB
    malloc here costs 8192 page faults, and the copy took 21 ms instead of 8 ms with huge pages."""
    n = t.numel() * t.element_size()
    if t.device.type != "cpu" or n < _HUGE_COPY_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t.clone()
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    out = torch.frombuffer(m, dtype=t.dtype, count=t.numel()).view(t.shape)  # the tensor keeps ``m`` alive
    return out.copy_(t)


def owned(out: torch.Tensor, memory: Any) -> torch.Tensor:
    """``out`` itself, or a copy if it aliases a cached buffer (the ``none``
    codec decodes to a view of its payload): a caller writing into a returned
    tensor must never change what the tier serves next, and Ray object-store
    memory is read-only."""
    start = out.untyped_storage().data_ptr()
    end = start + out.untyped_storage().nbytes()
    for b in memory:
        if isinstance(b, torch.Tensor):
            lo, hi = b.untyped_storage().data_ptr(), b.untyped_storage().data_ptr() + b.untyped_storage().nbytes()
        else:
            lo, hi = b.address, b.address + b.size
        if lo < end and start < hi:
            return _copy(out)
    return out


def decode_block(block: Block, device: str | torch.device | None = None) -> torch.Tensor:
    """Decompress ``block`` on ``device`` into a tensor that owns its memory."""
    return owned(decompress(block, device), block.buffers.values())


class HotTier:
    """A byte-budgeted LRU of compressed blocks on one device."""

    def __init__(self, capacity_bytes: int, device: str | torch.device | None = None) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"hot tier capacity_bytes={capacity_bytes!r} must be an int >= 0 (0 disables the hot tier)")
        self.device = torch.device(device) if device is not None else _default_device()
        self.capacity = capacity_bytes
        self._lru = LRU(capacity_bytes)
        self._blocks: dict[str, Block] = {}
        self._dev: dict[str, dict[str, torch.Tensor]] = {}  # payload on the GPU (CUDA only)
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def put(self, block: Block) -> list[str]:
        """Keep ``block`` (most recently used); returns the keys evicted to make room.
        A block larger than the whole budget is not kept."""
        size = block.nbytes
        if size > self.capacity:
            return []
        dev = None
        if self.device.type != "cpu" and not block.codec.endswith(ZSTD_SUFFIX):
            dev = {n: torch.frombuffer(memoryview(b), dtype=torch.uint8).to(self.device) if b.size else
                   torch.empty(0, dtype=torch.uint8, device=self.device) for n, b in block.buffers.items()}
        with self._lock:
            self._blocks[block.key] = block
            if dev is not None:
                self._dev[block.key] = dev
            self._lru.add(block.key, size)
            evicted = self._lru.victims()
            for k in evicted:
                self._drop(k)
            self.evictions += len(evicted)
        return evicted

    def get(self, key: str) -> Block | None:
        with self._lock:
            block = self._blocks.get(key)
            if block is None:
                self.misses += 1
                return None
            self.hits += 1
            self._lru.touch(key)
            return block

    def get_kv(self, key: str, device: str | torch.device | None = None) -> torch.Tensor | None:
        """Decode a hit on ``device`` (default: this tier's device); None on a miss."""
        block = self.get(key)
        if block is None:
            return None
        device = torch.device(device) if device is not None else self.device
        dev = self._dev.get(key)
        if dev is not None and device == self.device:
            base = get_codec(block.codec)
            try:
                out = base.decode(dev, block.params, tuple(block.shape), TORCH_DTYPES[block.dtype], device)
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
                raise BlockFormatError(f"hot block {key[:16]!r} does not decode: {type(e).__name__}: {e}") from None
            return owned(out, dev.values())
        return decode_block(block, device)

    def delete(self, key: str) -> bool:
        with self._lock:
            if key not in self._blocks:
                return False
            self._drop(key)
            return True

    def clear(self) -> None:
        with self._lock:
            for k in list(self._blocks):
                self._drop(k)

    def _drop(self, key: str) -> None:
        self._blocks.pop(key, None)
        self._dev.pop(key, None)
        self._lru.remove(key)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"blocks": len(self._blocks), "bytes": self._lru.used, "capacity_bytes": self.capacity,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions, "device": str(self.device)}
