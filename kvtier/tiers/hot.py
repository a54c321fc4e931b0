"""The hot tier: compressed blocks in the memory of one process's device.

Each serving process (a prefill or decode worker, a notebook) has one
``HotTier``: a byte budget over the payload bytes it holds and a local LRU
order. It is the nearest copy: a hit costs a decode and no remote call.

Ownership: the tier owns every byte it holds, and counts each entry at the
block's serialized size (as the warm and cold tiers do). An entry is the block's header
(codec, params, shape, dtype) plus its payload buffers as tensors *on the tier's
device*, allocated by the tier (or handed over by the fetch pipeline, which
allocated them for it). It never keeps a view of memory someone else owns (a
shard's object in the Ray object store, the caller's tensor, a pinned staging
buffer), so what it counts is what it pins, and a shard dropping a block frees
that block's memory. On CUDA the payload lives on the GPU and a hit decodes there
without crossing PCIe; no host copy is kept. ``+zstd`` blocks are kept inflated
(the entropy stage is for the cold tier; decoding must not pay it per hit).

Device rule of ``get_kv(key, device)`` (and ``get_kvs``, which decodes a run
of same-shaped hits in one launch): the result is on ``device``; ``None``
means the tier's device. Decoding on another device moves the compressed
buffers there first (fewer bytes than the decoded chunk).

Evicting drops the block only from this process: the runtime stores every put
in a warm shard too, so a copy is always further down.

Not here: anything remote (Ray), the index of other tiers (``kvtier.placement``).
Thread-safe: the client's prefetch thread fills the tier while the caller reads.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from kvtier.block import Block
from kvtier.codecs import TORCH_DTYPES, ZSTD_SUFFIX, _zstd_decompress, decompress, get_codec
from kvtier.codecs.batch import Item, decode_many
from kvtier.errors import BlockFormatError
from kvtier.placement import LRU


def default_device() -> torch.device:
    """The device ``device=None`` means everywhere in kvtier: the first GPU if there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def as_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device with an index on CUDA (``"cuda"`` and ``"cuda:0"`` compare equal after this)."""
    if device is None:
        return default_device()
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in memory of its own. On the CPU a numpy copy, not ``clone``: a torch CPU op in a
    load pool thread starts an OpenMP team for that thread, whose spin-wait afterwards slowed the caller's
    next forward 50x on 2 cores (numpy copies use no OpenMP). Fresh memory each time: malloc reuses the
    pages a dropped result freed (an mmap'd copy measured 18.1 ms for a 5.9 MB chunk, a clone 0.07 ms)."""
    if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype)
    np.copyto(out.view(-1).view(torch.uint8).numpy(), t.view(-1).view(torch.uint8).numpy())
    return out


def owned(out: torch.Tensor, memory: Any) -> torch.Tensor:
    """``out`` itself, or a copy if it aliases a cached buffer (the ``none``
    codec decodes to a view of its payload): a caller writing into a returned
    tensor must never change what the tier serves next, and Ray object-store
    memory is read-only."""
    return _copy(out) if aliases(out, memory) else out


def aliases(out: torch.Tensor, memory: Any) -> bool:
    """Whether ``out``'s storage overlaps any of ``memory`` (tensors, or Arrow buffers)."""
    start = out.untyped_storage().data_ptr()
    end = start + out.untyped_storage().nbytes()
    for b in memory:
        if isinstance(b, torch.Tensor):
            lo, hi = b.untyped_storage().data_ptr(), b.untyped_storage().data_ptr() + b.untyped_storage().nbytes()
        else:
            lo, hi = b.address, b.address + b.size
        if lo < end and start < hi:
            return True
    return False


def decode_block(block: Block, device: str | torch.device | None = None) -> torch.Tensor:
    """Decompress ``block`` on ``device`` (``None``: ``default_device()``) into a tensor that owns its memory."""
    return owned(decompress(block, as_device(device)), block.buffers.values())


@dataclass(frozen=True, eq=False)
class HotEntry:
    """A block as the hot tier holds it: header fields and payload tensors on the tier's device."""

    key: str
    model: str
    codec: str  # the base codec: a ``+zstd`` block is held inflated
    shape: tuple[int, ...]
    dtype: str
    params: Mapping[str, Any]
    buffers: Mapping[str, torch.Tensor]
    nbytes: int  # what it counts against the hot budget: the block's serialized size (the wire it adopted on
    #              CPU; on CUDA the payload plus ~1 KiB of header not held), or the inflated payload of a +zstd block

    def decode(self, device: torch.device) -> torch.Tensor:
        """The KV chunk on ``device``, owning its memory (never a view of this entry's buffers)."""
        bufs = self.buffers
        if any(t.device != device for t in bufs.values()):
            bufs = {n: t.to(device) for n, t in bufs.items()}
        try:
            out = get_codec(self.codec).decode(bufs, self.params, self.shape, TORCH_DTYPES[self.dtype], device)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise BlockFormatError(f"hot block {self.key[:16]!r} does not decode: {type(e).__name__}: {e}") from None
        if tuple(out.shape) != self.shape or out.dtype != TORCH_DTYPES[self.dtype]:
            raise BlockFormatError(f"hot block {self.key[:16]!r} decoded to {tuple(out.shape)} {out.dtype}, "
                                   f"its header says {self.shape} {self.dtype}")
        return owned(out, bufs.values())


def entry_buffers(block: Block, device: torch.device) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(base codec, params, payload tensors on ``device`` that own their memory) for ``block``:
    a fresh copy of every buffer, inflated first for a ``+zstd`` block."""
    codec, params, raw = block.codec, dict(block.params), block.buffers
    if codec.endswith(ZSTD_SUFFIX):
        raw = _zstd_decompress(raw, params.pop("zstd", None), block.raw_nbytes)
        codec = codec[: -len(ZSTD_SUFFIX)]
    out = {}
    for name, b in raw.items():
        mv = memoryview(b)
        if mv.nbytes == 0:
            out[name] = torch.empty(0, dtype=torch.uint8, device=device)
            continue
        with warnings.catch_warnings():  # read-only memory (an Arrow buffer): only read, then copied
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(mv, dtype=torch.uint8)
        # a copy in every case: to the GPU (one H2D), or a CPU clone the tier owns (never a view of a shard's object)
        out[name] = src.to(device) if device.type != "cpu" else _copy(src)
    return codec, params, out


def wire_buffers(wire) -> dict[str, torch.Tensor]:
    """The payload buffers of a block's Arrow bytes that this process just serialized, as uint8 CPU
    tensors viewing ``wire`` (no copy, no checksum: trusted bytes, never a block read from elsewhere).
    ``put`` hands them to a CPU hot tier, which then owns ``wire``: nothing else writes it."""
    import numpy as np
    import pyarrow as pa

    batch = pa.ipc.open_stream(wire).read_next_batch()
    out = {}
    with warnings.catch_warnings():  # read-only Arrow memory: the tier and the codecs only read it
        warnings.simplefilter("ignore", UserWarning)
        for name, col in zip(batch.schema.names, batch.columns):
            _, offsets, data = col.buffers()
            start, end = np.frombuffer(offsets, dtype="<i8", count=2, offset=8 * col.offset).tolist()
            out[name] = (torch.frombuffer(memoryview(data.slice(start, end - start)), dtype=torch.uint8)
                         if end > start else torch.empty(0, dtype=torch.uint8))
    return out


class HotTier:
    """A byte-budgeted LRU of compressed blocks on one device."""

    def __init__(self, capacity_bytes: int, device: str | torch.device | None = None) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"hot tier capacity_bytes={capacity_bytes!r} must be an int >= 0 (0 disables the hot tier)")
        self.device = as_device(device)
        self.capacity = capacity_bytes
        self._lru = LRU(capacity_bytes)
        self._entries: dict[str, HotEntry] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, block: Block, buffers: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        """Keep ``block`` (most recently used); returns the keys evicted to make room.

        ``buffers``: its payload already on this tier's device, in memory handed over to the tier
        (the fetch pipeline's device copy: no second host-to-device copy); for a ``+zstd`` block the
        inflated payload (the pipeline inflated it: inflating it again here, on the caller's thread, cost
        a warm 16K-token q1+zstd get on the H200 1.6 s, 63 x 25 ms). Without it the tier copies (and
        inflates) the block's buffers. A block larger than the whole budget is not kept."""
        if not self.capacity or sum(b.size for b in block.buffers.values()) > self.capacity:
            return []
        if buffers is not None:
            if any(t.device != self.device for t in buffers.values()):
                raise ValueError(f"hot tier on {self.device} was handed buffers on "
                                 f"{sorted({str(t.device) for t in buffers.values()})}")
            codec, params, bufs = block.codec, dict(block.params), dict(buffers)
            if codec.endswith(ZSTD_SUFFIX):
                sizes = params.pop("zstd", None)
                codec = codec[: -len(ZSTD_SUFFIX)]
                got = {n: t.numel() * t.element_size() for n, t in bufs.items()}
                if got != sizes:
                    raise ValueError(f"+zstd block {block.key[:16]!r}: handed buffers of {got} bytes, its header "
                                     f"says the inflated payload is {sizes}")
        else:
            codec, params, bufs = entry_buffers(block, self.device)
        payload = sum(t.numel() for t in bufs.values())
        size = block.nbytes if codec == block.codec else payload  # nbytes: cached by whoever serialized it
        entry = HotEntry(block.key, block.model, codec, tuple(block.shape), block.dtype, params, bufs, max(size, payload))
        if entry.nbytes > self.capacity:
            return []
        with self._lock:
            self._entries[block.key] = entry
            self._lru.add(block.key, entry.nbytes)
            evicted = self._lru.victims()
            for k in evicted:
                self._drop(k)
            self.evictions += len(evicted)
        return evicted

    def get(self, key: str) -> HotEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._lru.touch(key)
            return entry

    def get_kv(self, key: str, device: str | torch.device | None = None,
               expect_model: str | None = None) -> torch.Tensor | None:
        """Decode a hit on ``device`` (``None``: this tier's device); None on a miss. An entry of
        another model than ``expect_model`` is a miss (and counted as one)."""
        kv = self.get_kvs([key], device, expect_model)[0]
        if isinstance(kv, BlockFormatError):
            raise kv
        return kv

    def get_kvs(self, keys: list[str], device: str | torch.device | None = None,
                expect_model: str | None = None) -> list[torch.Tensor | BlockFormatError | None]:
        """``get_kv`` of each key, a hit that does not decode given as its ``BlockFormatError``. Hits of one
        codec, shape and params decode in one launch (``kvtier.codecs.batch``: a 16K-token get is 63 blocks)."""
        device = self.device if device is None else as_device(device)
        out: list[torch.Tensor | BlockFormatError | None] = [None] * len(keys)
        hits: list[tuple[int, HotEntry]] = []
        for i, key in enumerate(keys):
            entry = self.get(key)
            if entry is not None and expect_model is not None and entry.model != expect_model:
                with self._lock:
                    self.hits -= 1
                    self.misses += 1
                entry = None
            if entry is not None:
                hits.append((i, entry))
        items = [Item(e.key, e.codec, e.params, e.shape, TORCH_DTYPES[e.dtype], e.buffers) for _, e in hits]
        for (i, _), kv in zip(hits, decode_many(items, device, lambda t: hits[t][1].decode(device))):
            out[i] = kv
        return out

    def delete(self, key: str) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key)
            return True

    def clear(self) -> None:
        with self._lock:
            for k in list(self._entries):
                self._drop(k)

    def _drop(self, key: str) -> None:
        self._entries.pop(key, None)
        self._lru.remove(key)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"blocks": len(self._entries), "bytes": self._lru.used, "capacity_bytes": self.capacity,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions, "device": str(self.device)}
