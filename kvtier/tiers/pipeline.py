"""The batched, pipelined load: many blocks' bytes in, decoded KV chunks on one device out.

``Loader.load(keys, sources, device)`` takes one source per key, already
located by the caller: the Arrow bytes of a block (a warm shard's object as
``ray.get`` returned it: a zero-copy view of the object store), a ``Block``
its reader already verified, or a callable producing either (a cold read,
which then runs in the pool, so cold reads proceed in parallel). It returns one
``Loaded`` per key, in order. Stages, overlapped:

  1. read + verify, in a thread pool: ``Block.from_arrow`` checks the XXH3-128
     checksum (xxhash releases the GIL: 16 threads verify 16 blocks at once);
     a corrupt, truncated, swapped or foreign-model block is a miss with a reason.
  2. CPU target: decode in the same thread. CUDA target: copy the payload into
     pinned staging memory in the same thread (pageable H2D ran at 19.2 GB/s on
     the H200, pinned at 55.4 GB/s), then the calling thread queues each block's
     host-to-device copy on a copy stream as soon as its verification is done,
     and its decode on the current stream behind an event: block i decodes
     while block i+1 crosses PCIe and block i+2 is being verified.

``keep_buffers=True`` also returns each block's payload as tensors on the
device that nobody else references, for the hot tier to adopt (the copy the
decode read from: no second host-to-device copy, and the hot tier owns them).
Pinned staging buffers come from torch's caching host allocator: reused across
calls, and never recycled before the copy that reads them has run.

This module knows nothing of Ray, shards or the controller: where the bytes
come from is the caller's business. Every wait is bounded (``timeout_s``).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from kvtier.block import Block
from kvtier.codecs import TORCH_DTYPES, ZSTD_SUFFIX, get_codec
from kvtier.errors import BlockFormatError, KvtierError
from kvtier.tiers.hot import as_device, entry_buffers, owned

Source = Any  # bytes-like | Block | Callable[[], bytes-like | Block | None] | None
_ALIGN = 512  # staging offsets: what the CUDA caching allocator gives device buffers, so H2D copies stay aligned
MAX_THREADS = 16  # verification is memory-bound: 16 threads saturated the H200 host's bandwidth (2026-12-01)


@dataclass
class Loaded:
    """What happened to one key: ``status`` is ok, missing (no source, or the read found nothing),
    corrupt (failed verification), model (a valid block of another model), error (the read raised)
    or timeout. ``kv`` is set when ok; ``buffers`` too with ``keep_buffers``."""

    key: str
    status: str
    kv: torch.Tensor | None = None
    block: Block | None = None
    buffers: dict[str, torch.Tensor] | None = None
    nbytes: int = 0
    error: str = ""


@dataclass
class _Verified:
    block: Block
    staged: dict[str, torch.Tensor] = field(default_factory=dict)  # pinned host copies (CUDA target)
    codec: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    kv: torch.Tensor | None = None
    buffers: dict[str, torch.Tensor] | None = None


class Loader:
    """A thread pool and one copy stream per CUDA device; ``load`` may be called from several threads."""

    def __init__(self, threads: int | None = None) -> None:
        n = threads if threads is not None else min(MAX_THREADS, os.cpu_count() or 2)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"threads={threads!r} must be a positive int")
        self.threads = n
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="kvtier-load")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def load(self, keys: Sequence[str], sources: Sequence[Source], device: str | torch.device | None = None, *,
             expect_model: str | None = None, keep_buffers: bool = False, decode: bool = True,
             timeout_s: float = 60.0) -> list[Loaded]:
        """One ``Loaded`` per key, in order. ``decode=False`` (a prefetch into the hot tier) stops after the
        device copy: ``kv`` stays None, ``buffers`` are set (``keep_buffers`` is implied)."""
        keep_buffers = keep_buffers or not decode
        if len(keys) != len(sources):
            raise ValueError(f"load got {len(keys)} keys and {len(sources)} sources; they must pair up")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
        device = as_device(device)
        cuda = device.type == "cuda"
        futs = [self._pool.submit(self._verify, k, s, device, expect_model, keep_buffers, decode)
                for k, s in zip(keys, sources)]
        deadline = time.monotonic() + timeout_s
        out: list[Loaded] = []
        copy = self._stream(device) if cuda else None
        main = torch.cuda.current_stream(device) if cuda else None
        for key, fut in zip(keys, futs):
            try:
                v = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                fut.cancel()
                out.append(Loaded(key, "timeout", error=f"not read and verified within {timeout_s}s"))
                continue
            if isinstance(v, Loaded):
                out.append(v)
                continue
            if cuda:
                try:
                    v.kv, v.buffers = self._to_device(v, device, copy, main, keep_buffers, decode)
                except BlockFormatError as e:
                    out.append(Loaded(key, "corrupt", error=str(e)))
                    continue
            out.append(Loaded(key, "ok", v.kv, v.block, v.buffers if keep_buffers else None, _nbytes(v.block)))
        return out

    # ---- stage 1 (+ CPU decode / CUDA staging), in the pool ---------------------------
    def _verify(self, key: str, src: Source, device: torch.device, expect_model: str | None, keep: bool,
                decode: bool):
        try:
            if callable(src):
                src = src()
            if src is None:
                return Loaded(key, "missing")
            block = src if isinstance(src, Block) else Block.from_arrow(src, expect_key=key)
            if block.key != key:
                raise BlockFormatError(f"block holds key {block.key!r}, expected {key!r}")
        except BlockFormatError as e:
            return Loaded(key, "corrupt", error=str(e))
        except (OSError, KvtierError, ValueError) as e:
            return Loaded(key, "error", error=f"{type(e).__name__}: {e}")
        if expect_model is not None and block.model != expect_model:
            return Loaded(key, "model", error=f"block of model {block.model!r}, expected {expect_model!r}")
        try:
            if block.codec.endswith(ZSTD_SUFFIX) or (keep and device.type == "cpu"):
                # inflated/copied into memory this call owns: the decode reads it, the hot tier may keep it
                codec, params, bufs = entry_buffers(block, torch.device("cpu"))
            else:
                codec, params, bufs = block.codec, block.params, None
            v = _Verified(block, codec=codec, params=params)
            if device.type == "cpu":
                v.kv = _decode(key, codec, params, block, bufs, device, private=not keep) if decode else None
                v.buffers = bufs
            else:
                v.staged = _stage(bufs if bufs is not None else block.buffers)
            return v
        except BlockFormatError as e:
            return Loaded(key, "corrupt", error=str(e))

    # ---- stage 2 on CUDA, in the calling thread --------------------------------------
    def _to_device(self, v: _Verified, device: torch.device, copy, main, keep: bool, decode: bool):
        with torch.cuda.stream(copy):
            dev = {}
            for name, host in v.staged.items():
                t = host.to(device, non_blocking=True)
                t.record_stream(main)  # allocated on the copy stream, read (and freed) on the current one
                dev[name] = t
            ready = torch.cuda.Event()
            ready.record(copy)
        main.wait_event(ready)
        if not decode:
            return None, dev
        return _decode(v.block.key, v.codec, v.params, v.block, dev, device, private=not keep), dev

    def _stream(self, device: torch.device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s


def _nbytes(block: Block) -> int:
    return block.nbytes if block._wire else sum(b.size for b in block.buffers.values())


def _stage(buffers: Mapping[str, Any], pin: bool = True) -> dict[str, torch.Tensor]:
    """One pinned host tensor holding every buffer (512-byte aligned slices), filled by this thread."""
    sizes = {n: b.numel() * b.element_size() if isinstance(b, torch.Tensor) else memoryview(b).nbytes
             for n, b in buffers.items()}
    total = sum(-(-s // _ALIGN) * _ALIGN for s in sizes.values())
    pinned = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
    out, off = {}, 0
    for name, b in buffers.items():
        n = sizes[name]
        dst = pinned[off:off + n]
        if n:
            src = b if isinstance(b, torch.Tensor) else _u8(b)
            dst.copy_(src)  # memcpy without the GIL
        out[name] = dst
        off += -(-n // _ALIGN) * _ALIGN
    return out


def _u8(b) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # read-only memory (Arrow, object store): only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(memoryview(b), dtype=torch.uint8)


def _decode(key: str, codec: str, params, block: Block, bufs: Mapping[str, torch.Tensor] | None,
            device: torch.device, private: bool) -> torch.Tensor:
    """Decode ``bufs`` (or the block's own buffers, viewed) on ``device``. ``private``: nobody else will
    read ``bufs``, so an output aliasing them (the ``none`` codec) needs no copy."""
    if bufs is None:
        bufs = {n: _u8(b) if b.size else torch.empty(0, dtype=torch.uint8) for n, b in block.buffers.items()}
        private = False  # views of the caller's source memory
    try:
        out = get_codec(codec).decode(bufs, params, tuple(block.shape), TORCH_DTYPES[block.dtype], device)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise BlockFormatError(f"block {key[:16]!r} does not decode with codec {codec!r}: {type(e).__name__}: {e}") from None
    if tuple(out.shape) != tuple(block.shape) or out.dtype != TORCH_DTYPES[block.dtype]:
        raise BlockFormatError(f"codec {codec!r} decoded {tuple(out.shape)} {out.dtype}, block says {block.shape} {block.dtype}")
    return out if private else owned(out, bufs.values())

