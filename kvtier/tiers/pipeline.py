"""The batched, pipelined load: many blocks' bytes in, decoded KV chunks on one device out.

``Loader.load(keys, sources, device)`` takes one source per key, already
located by the caller: the Arrow bytes of a block (a warm shard's object as
``ray.get`` returned it: a zero-copy view of the object store), a ``Block``
its reader already verified, or a callable producing either (a cold read,
which then runs in the pool, so cold reads proceed in parallel). It returns one
``Loaded`` per key, in order. Per block, in a thread pool (every step below
releases the GIL: numpy copies, xxhash, zstd):

  1. parse the Arrow structure and header; a swapped or foreign-model block is
     a miss with its reason.
  2. copy the payload, 1 MiB at a time, into memory this call owns (pinned
     staging for a CUDA target, plain memory for a CPU hot tier) and hash each
     slice right after copying it, while it is in cache: one pass over the
     source instead of a checksum pass and a copy pass. A block with no copy to
     make (CPU, nothing kept) is hashed in place. ``+zstd`` blocks are verified
     first, then inflated into owned memory, then staged.
  3. CUDA: every 8 MiB staged, the calling thread queues that slice's
     host-to-device copy on a copy stream, so PCIe starts after the first slice,
     not after the first block (pinned H2D 55 GB/s on the H200, pageable 6;
     16 threads copy + hash ~50 GB/s there). Once a block's checksum matches,
     its decode is queued on the current stream behind an event: block i
     decodes while later blocks cross PCIe. A block whose checksum fails is
     never decoded (a miss); its device bytes are dropped.

At most ``2 * threads`` blocks are staged and not yet handed to the copy
stream at once (the pinned memory in flight is bounded). ``keep_buffers=True``
also returns each block's payload as tensors on the device that nobody else
references, for the hot tier to adopt (the copy the decode read from: no second
host-to-device copy). Pinned buffers come from torch's caching host allocator:
reused across calls, never recycled before the copy that reads them has run.

This module knows nothing of Ray, shards or the controller: where the bytes
come from is the caller's business. Every wait is bounded (``timeout_s``).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from kvtier.block import Block
from kvtier.codecs import TORCH_DTYPES, ZSTD_SUFFIX, get_codec
from kvtier.errors import BlockFormatError, KvtierError
from kvtier.tiers.hot import as_device, entry_buffers, owned

Source = Any  # bytes-like | Block | Callable[[], bytes-like | Block | None] | None
_ALIGN = 512  # staging offsets: what the CUDA caching allocator gives device buffers, so H2D copies stay aligned
MAX_THREADS = 16  # copy + hash is memory-bound: 16 threads saturated the H200 host's bandwidth (2026-12-01)
COPY_SLICE = 1 << 20  # copied then hashed while in L2 (1-2 MiB per core on the hosts we run on)
SEND_SLICE = 8 << 20  # one H2D copy per 8 MiB staged: 256 launches for 2 GiB, each ~10 us of Python


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
class _Staged:
    """A verified block and its payload in memory this call owns (``spans``: name -> (offset, size) in
    ``host``), or already decoded on the CPU (``kv``)."""

    block: Block
    codec: str
    params: Mapping[str, Any]
    host: torch.Tensor | None = None
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
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
        call = _Call(queue.SimpleQueue(), threading.Semaphore(2 * self.threads), threading.Event(),
                     time.monotonic() + timeout_s, cuda)
        for i, (k, s) in enumerate(zip(keys, sources)):
            self._pool.submit(self._work, call, i, k, s, device, expect_model, keep_buffers, decode)
        copy = self._stream(device) if cuda else None
        main = torch.cuda.current_stream(device) if cuda else None
        out: list[Loaded | None] = [None] * len(keys)
        dev: dict[int, torch.Tensor] = {}
        left = len(keys)
        while left:
            try:
                ev = call.events.get(timeout=max(0.0, call.deadline - time.monotonic()))
            except queue.Empty:
                break
            kind, i, what = ev
            if kind == "slice":  # (host tensor, start, end): its H2D copy now, on the copy stream
                host, a, b = what
                with torch.cuda.stream(copy):
                    d = dev.get(i)
                    if d is None:
                        d = dev[i] = torch.empty(host.numel(), dtype=torch.uint8, device=device)
                    d[a:b].copy_(host[a:b], non_blocking=True)
                continue
            left -= 1
            if cuda and isinstance(what, _Staged):
                call.inflight.release()
            if isinstance(what, Loaded):
                out[i] = what
            else:
                try:
                    out[i] = self._finish(keys[i], what, dev.pop(i, None), device, copy, main, keep_buffers, decode)
                except BlockFormatError as e:
                    out[i] = Loaded(keys[i], "corrupt", error=str(e))
            dev.pop(i, None)
        call.stop.set()  # abandoned work (a timeout) stops at its next slice
        return [o if o is not None else Loaded(k, "timeout", error=f"not read and verified within {timeout_s}s")
                for k, o in zip(keys, out)]

    # ---- in the pool -------------------------------------------------------------------
    def _work(self, call: "_Call", i: int, key: str, src: Source, device: torch.device, expect_model: str | None,
              keep: bool, decode: bool) -> None:
        try:
            what = self._stage(call, i, key, src, device, expect_model, keep, decode)
        except BlockFormatError as e:
            what = Loaded(key, "corrupt", error=str(e))
        except (OSError, KvtierError, ValueError) as e:
            what = Loaded(key, "error", error=f"{type(e).__name__}: {e}")
        except _Stopped:
            return
        except Exception as e:  # noqa: BLE001 - e.g. no pinned memory left: a miss with its reason, not a hang
            what = Loaded(key, "error", error=f"{type(e).__name__}: {e}")
        call.events.put(("done", i, what))

    def _stage(self, call: "_Call", i: int, key: str, src: Source, device: torch.device, expect_model: str | None,
               keep: bool, decode: bool):
        if callable(src):
            src = src()
        if src is None:
            return Loaded(key, "missing")
        verified = isinstance(src, Block)  # its reader verified it (a cold read)
        block = src if verified else Block.from_arrow(src, expect_key=key, verify=False)
        if block.key != key:
            raise BlockFormatError(f"block holds key {block.key!r}, expected {key!r}")
        if expect_model is not None and block.model != expect_model:
            return Loaded(key, "model", error=f"block of model {block.model!r}, expected {expect_model!r}")
        codec, params, bufs = block.codec, block.params, block.buffers
        inflated = codec.endswith(ZSTD_SUFFIX)
        if inflated:  # verified before inflating; the inflated tensors belong to this call
            if not verified:
                _check(block, bufs, call)
            verified = True
            codec, params, bufs = entry_buffers(block, torch.device("cpu"))
        if device.type == "cpu":
            if not (keep and not inflated):  # nothing to copy: hashed in place, decoded from the source
                if not verified:
                    _check(block, bufs, call)
                kv = _decode(key, codec, params, block, bufs if inflated else None, device,
                             private=inflated and not keep) if decode else None
                return _Staged(block, codec, params, kv=kv, buffers=bufs if inflated else None)
            host, spans = _copy_in(block, bufs, None if verified else _hasher(block), False, call, None)
            v = _Staged(block, codec, params, host=host, spans=spans)
            v.buffers = {n: host[a:a + s] for n, (a, s) in spans.items()}
            v.kv = _decode(key, codec, params, block, v.buffers, device, private=False) if decode else None
            return v
        if not call.inflight.acquire(timeout=max(0.0, call.deadline - time.monotonic())):
            return Loaded(key, "timeout", error="no staging slot freed before the deadline")
        try:
            host, spans = _copy_in(block, bufs, None if verified else _hasher(block), True, call,
                                   lambda host, a, b: call.events.put(("slice", i, (host, a, b))))
        except BaseException:
            call.inflight.release()
            raise
        return _Staged(block, codec, params, host=host, spans=spans)

    # ---- in the calling thread ---------------------------------------------------------
    def _finish(self, key: str, v: _Staged, d: torch.Tensor | None, device: torch.device, copy, main,
                keep: bool, decode: bool) -> Loaded:
        if device.type == "cpu":
            return Loaded(key, "ok", v.kv, v.block, v.buffers if keep else None, _nbytes(v.block))
        if d is None:  # a block with no payload bytes: nothing crossed
            d = torch.empty(max(v.host.numel(), 1), dtype=torch.uint8, device=device)
        ready = torch.cuda.Event()
        ready.record(copy)
        main.wait_event(ready)
        d.record_stream(main)  # allocated on the copy stream, read (and freed) on the current one
        bufs = {n: d[a:a + s] for n, (a, s) in v.spans.items()}
        kv = _decode(key, v.codec, v.params, v.block, bufs, device, private=not keep) if decode else None
        return Loaded(key, "ok", kv, v.block, bufs if keep else None, _nbytes(v.block))

    def _stream(self, device: torch.device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s


@dataclass
class _Call:
    events: "queue.SimpleQueue"  # ("slice", i, (host, start, end)) | ("done", i, _Staged | Loaded)
    inflight: threading.Semaphore  # staged blocks not yet handed to the copy stream (CUDA)
    stop: threading.Event
    deadline: float
    cuda: bool


class _Stopped(Exception):
    """The call returned (timed out): this block's work is abandoned."""


def _nbytes(block: Block) -> int:
    return block.nbytes if block._wire else sum(b.size for b in block.buffers.values())


def _np(b) -> np.ndarray:
    if isinstance(b, torch.Tensor):
        return b.detach().reshape(-1).view(torch.uint8).numpy()
    return np.frombuffer(b, dtype=np.uint8) if memoryview(b).nbytes else np.empty(0, dtype=np.uint8)


def _check(block: Block, bufs: Mapping[str, Any], call: _Call) -> None:
    """The payload checksum, computed in place (slices, so an abandoned call stops early)."""
    h = _hasher(block)
    for name in sorted(bufs):
        src = _np(bufs[name])
        h.update(Block.buffer_prefix(name, src.nbytes))
        for a in range(0, src.nbytes, SEND_SLICE):
            if call.stop.is_set():
                raise _Stopped
            h.update(src[a:a + SEND_SLICE])
    _compare(block, h)


def _copy_in(block: Block, bufs: Mapping[str, Any], h, pin: bool, call: _Call,
             sent: Callable[[torch.Tensor, int, int], None] | None) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """Every buffer copied into one host tensor (512-byte aligned spans, in sorted name order: the checksum's
    order), each 1 MiB slice hashed right after its copy when ``h`` is given; ``sent(start, end)`` after
    each ~8 MiB (``sent(host, start, end)``). Raises ``BlockFormatError`` if the checksum does not match."""
    names = sorted(bufs)
    srcs = {n: _np(bufs[n]) for n in names}
    spans, off = {}, 0
    for n in names:
        off = -(-off // _ALIGN) * _ALIGN
        spans[n] = (off, srcs[n].nbytes)
        off += srcs[n].nbytes
    host = torch.empty(max(off, 1), dtype=torch.uint8, pin_memory=pin)
    dst = host.numpy()
    told = 0
    for n in names:
        src, (base, size) = srcs[n], spans[n]
        if h is not None:
            h.update(Block.buffer_prefix(n, size))
        for a in range(0, size, COPY_SLICE):
            if call.stop.is_set():
                raise _Stopped
            b = min(size, a + COPY_SLICE)
            piece = dst[base + a:base + b]
            np.copyto(piece, src[a:b])
            if h is not None:
                h.update(piece)
            if sent is not None and base + b - told >= SEND_SLICE:
                sent(host, told, base + b)
                told = base + b
    if sent is not None and off > told:
        sent(host, told, off)
    if h is not None:
        _compare(block, h)
    return host, spans


def _hasher(block: Block):
    try:
        return block.hasher()
    except RecursionError:
        raise BlockFormatError("corrupt block: header params nested too deeply") from None


def _compare(block: Block, h) -> None:
    got = h.hexdigest()
    if got != block.checksum:
        raise BlockFormatError(f"corrupt block {block.key!r}: payload checksum mismatch (stored "
                               f"{block.checksum[:16]}…, computed {got[:16]}…)")


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
