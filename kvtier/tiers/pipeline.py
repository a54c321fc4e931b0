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
  2. copy the payload, 2 MiB at a time (``KVTIER_LOAD_SLICE_MIB``), into
     memory this call owns (pinned staging for a CUDA target, plain memory for
     a CPU hot tier) and hash each slice right after copying it, while it is in
     cache: one pass over the source instead of a checksum pass and a copy
     pass. A block with no copy to make (CPU, nothing kept) is hashed in place.
     ``+zstd`` blocks are verified first, then inflated into owned memory
     (python-zstandard releases the GIL: 1 GB of q1+zstd inflated at 5.5 GB/s
     in 16 threads on the H200), then staged; ``keep_buffers`` hands over the
     inflated payload, which the hot tier adopts as it is.
  3. CUDA: every 8 MiB staged, the same worker launches that slice's
     host-to-device copy on the loader's copy stream, so PCIe starts after the
     first slice, not after the first block (pinned H2D 55 GB/s on the H200,
     pageable 6), and records an event after its block's last copy. The
     calling thread only takes finished blocks: once a block's checksum
     matches, its decode is queued on the current stream behind that event
     (block i decodes while later blocks cross PCIe). A block whose checksum
     fails is never decoded (a miss); its device bytes are dropped. (The first
     version, 1 MiB slices whose copies the calling thread launched, reached
     17.6 GB/s on the H200: ~8000 GIL handoffs per 2 GB load.)

At most ``2 * threads`` blocks are staged and not yet taken by the calling
thread at once (the pinned memory in flight is bounded). ``keep_buffers=True``
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
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from kvtier.block import Block
from kvtier.codecs import TORCH_DTYPES, ZSTD_SUFFIX, get_codec
from kvtier.errors import BlockFormatError, KvtierError
from kvtier.tiers.hot import as_device, entry_buffers, owned

Source = Any  # bytes-like | Block | Callable[[], bytes-like | Block | None] | None
_ALIGN = 512  # staging offsets: what the CUDA caching allocator gives device buffers, so H2D copies stay aligned
MAX_THREADS = 16  # copy + hash is memory-bound: 16 threads saturated the H200 host's bandwidth (2026-12-01)
# Each slice costs a few GIL round trips (copy, hash, H2D launch: each releases the GIL). 1 MiB copy/hash slices
# with the H2D launched by the calling thread per 8 MiB reached only 17.6 GB/s of 55 on the H200 (16 threads, 2 GB):
# ~8000 GIL handoffs per load. Defaults below; ``KVTIER_LOAD_SLICE_MIB`` overrides the copy/hash slice (tuning).
COPY_SLICE = int(float(os.environ.get("KVTIER_LOAD_SLICE_MIB", "2")) * (1 << 20))  # copied, then hashed from cache
SEND_SLICE = 8 << 20  # one H2D copy per 8 MiB staged, launched by the worker that staged it


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
    ``host``); for a CPU target, what to decode from (``decode_from``, None: the block's own buffers)."""

    block: Block
    codec: str
    params: Mapping[str, Any]
    host: torch.Tensor | None = None
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    dev: torch.Tensor | None = None  # CUDA: the payload's device copy, written on the copy stream
    ready: Any = None  # CUDA: an event on the copy stream after this block's last H2D copy
    buffers: dict[str, torch.Tensor] | None = None  # CPU: what the hot tier may keep
    decode_from: Mapping[str, torch.Tensor] | None = None
    private: bool = False  # nobody else reads ``decode_from``: an output aliasing it needs no copy


class Loader:
    """A thread pool and one copy stream per CUDA device; ``load`` may be called from several threads."""

    def __init__(self, threads: int | None = None) -> None:
        n = threads if threads is not None else min(MAX_THREADS, os.cpu_count() or 2)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"threads={threads!r} must be a positive int")
        self.threads = n
        self.copy_slice = max(_ALIGN, COPY_SLICE // _ALIGN * _ALIGN)
        self.send_slice = max(SEND_SLICE, self.copy_slice)
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
                     time.monotonic() + timeout_s, self._stream(device) if cuda else None,
                     self.copy_slice, self.send_slice)
        for i, (k, s) in enumerate(zip(keys, sources)):
            self._pool.submit(self._work, call, i, k, s, device, expect_model, keep_buffers, decode)
        main = torch.cuda.current_stream(device) if cuda else None
        out: list[Loaded | None] = [None] * len(keys)
        left = len(keys)
        while left:
            try:
                _, i, what = call.events.get(timeout=max(0.0, call.deadline - time.monotonic()))
            except queue.Empty:
                break
            left -= 1
            if cuda and isinstance(what, _Staged):
                call.inflight.release()
            if isinstance(what, Loaded):
                out[i] = what
                continue
            try:
                out[i] = self._finish(keys[i], what, device, main, keep_buffers, decode)
            except BlockFormatError as e:
                out[i] = Loaded(keys[i], "corrupt", error=str(e))
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
        if device.type == "cpu":  # decoded by the calling thread (``_finish``), not here: see ``_finish``
            if not (keep and not inflated):  # nothing to copy: hashed in place, decoded from the source
                if not verified:
                    _check(block, bufs, call)
                return _Staged(block, codec, params, buffers=bufs if inflated else None,
                               decode_from=bufs if inflated else None, private=inflated and not keep)
            host, spans, _ = _copy_in(block, bufs, None if verified else _hasher(block), False, call)
            v = _Staged(block, codec, params, host=host, spans=spans)
            v.buffers = v.decode_from = {n: host[a:a + s] for n, (a, s) in spans.items()}
            return v
        if not call.inflight.acquire(timeout=max(0.0, call.deadline - time.monotonic())):
            return Loaded(key, "timeout", error="no staging slot freed before the deadline")
        try:
            # this thread launches its own H2D copies on the copy stream (streams are thread-safe; the current
            # stream and device are per thread); the device bytes are allocated on that stream too
            with torch.cuda.device(device), torch.cuda.stream(call.copy):
                v = _Staged(block, codec, params)
                v.host, v.spans, v.dev = _copy_in(block, bufs, None if verified else _hasher(block), True, call,
                                                  device)
                v.ready = torch.cuda.Event()
                v.ready.record(call.copy)
        except BaseException:
            call.inflight.release()
            raise
        return v

    # ---- in the calling thread ---------------------------------------------------------
    def _finish(self, key: str, v: _Staged, device: torch.device, main, keep: bool, decode: bool) -> Loaded:
        if device.type == "cpu":
            # CPU decodes run here: a torch CPU op in a pool thread starts an OpenMP team for that thread, whose
            # spinning after the op slowed the caller's next forward 50x (a 3 ms tail took 154 ms on 2 cores)
            kv = _decode(key, v.codec, v.params, v.block, v.decode_from, device, v.private) if decode else None
            return Loaded(key, "ok", kv, v.block, v.buffers if keep else None, _nbytes(v.block))
        main.wait_event(v.ready)  # this block's bytes are on the device (and every copy queued before them)
        v.dev.record_stream(main)  # allocated on the copy stream, read (and freed) on the current one
        bufs = {n: v.dev[a:a + s] for n, (a, s) in v.spans.items()}
        kv = _decode(key, v.codec, v.params, v.block, bufs, device, private=not keep) if decode else None
        return Loaded(key, "ok", kv, v.block, bufs if keep else None, _nbytes(v.block))

    def _stream(self, device: torch.device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s


@dataclass
class _Call:
    events: "queue.SimpleQueue"  # ("done", i, _Staged | Loaded), one per key
    inflight: threading.Semaphore  # CUDA: staged blocks the calling thread has not taken yet (pinned memory held)
    stop: threading.Event
    deadline: float
    copy: Any  # CUDA: the copy stream
    copy_slice: int = COPY_SLICE
    send_slice: int = SEND_SLICE


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
        for a in range(0, src.nbytes, call.send_slice):
            if call.stop.is_set():
                raise _Stopped
            h.update(src[a:a + call.send_slice])
    _compare(block, h)


def _copy_in(block: Block, bufs: Mapping[str, Any], h, pin: bool, call: _Call,
             device: torch.device | None = None) -> tuple[torch.Tensor, dict[str, tuple[int, int]], torch.Tensor | None]:
    """Every buffer copied into one host tensor (512-byte aligned spans, in sorted name order: the checksum's
    order), each ``copy_slice`` hashed right after its copy when ``h`` is given. With a CUDA ``device`` the
    host tensor is pinned and every ``send_slice`` staged is copied on to a device tensor at once, on the
    current (copy) stream. Returns (host, spans, device tensor or None). Raises ``BlockFormatError`` if the
    checksum does not match (the device bytes are then never decoded)."""
    names = sorted(bufs)
    srcs = {n: _np(bufs[n]) for n in names}
    spans, off = {}, 0
    for n in names:
        off = -(-off // _ALIGN) * _ALIGN
        spans[n] = (off, srcs[n].nbytes)
        off += srcs[n].nbytes
    host = torch.empty(max(off, 1), dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(max(off, 1), dtype=torch.uint8, device=device) if device is not None else None
    dst = host.numpy()
    told, step = 0, call.copy_slice
    for n in names:
        src, (base, size) = srcs[n], spans[n]
        if h is not None:
            h.update(Block.buffer_prefix(n, size))
        for a in range(0, size, step):
            if call.stop.is_set():
                raise _Stopped
            b = min(size, a + step)
            piece = dst[base + a:base + b]
            np.copyto(piece, src[a:b])
            if h is not None:
                h.update(piece)
            if dev is not None and base + b - told >= call.send_slice:
                dev[told:base + b].copy_(host[told:base + b], non_blocking=True)
                told = base + b
    if dev is not None and off > told:
        dev[told:off].copy_(host[told:off], non_blocking=True)
    if h is not None:
        _compare(block, h)
    return host, spans, dev


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
