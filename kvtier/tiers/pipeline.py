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
  2. copy the payload, 8 MiB at a time (``KVTIER_LOAD_SLICE_MIB``), into
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
     calling thread only takes finished blocks; once all are taken, their
     decodes are queued on the current stream behind those events, runs of
     same-shaped blocks in one launch (``kvtier.codecs.batch``). A block
     whose checksum fails is never decoded (a miss); its device bytes are
     dropped. (The first
     version, 1 MiB slices whose copies the calling thread launched, reached
     17.6 GB/s on the H200: ~8000 GIL handoffs per 2 GB load.)

On CUDA a work item is a contiguous run of blocks (about ``KVTIER_LOAD_GROUP_MIB``,
64 MiB, at most the batch over the threads; a cold read is an item of its own).
A block made on a GPU carries payload sums (``kernels.wsum``, in its header).
When it sits in the object store's pages, which ``host_pages`` registers with
CUDA, the calling thread parses it, checks its header's own checksum and
launches its host-to-device copies straight from those pages on the copy
stream: no host copy, no host hash, no thread hand-off; one event per run lets
its decodes start, and every ``CHECK_BYTES`` sent (and at the end) one
``kernels.wsum`` launch on a check stream of its own verifies those payloads on
the device into a per-key flag, overlapping the next copies. Everything else (reads, ``+zstd``, blocks
without sums or outside registered pages) goes to the pool as above: parsed,
then staged into one pinned slab per run (hashed while copied, or verified on
the device if it has sums), each block sent on to a device tensor of its own
(the hot tier adopts blocks one by one, so it counts what it pins), one event
for the run, one hand-off to the calling thread. The load ends with one sync
(when any block was verified on the device): the flags are read and a block
that failed is a miss, its decoded tensor dropped. At most ``2 * threads`` pool
runs are staged and not yet taken by the calling thread at once (the pinned
memory in flight is bounded). ``keep_buffers=True``
also returns each block's payload as tensors on the device that nobody else
references, for the hot tier to adopt (the copy the decode read from: no second
host-to-device copy). Pinned buffers come from torch's caching host allocator:
reused across calls, never recycled before the copy that reads them has run.

A source may also be ``Later(size)``: bytes still to fetch (a warm shard's
object not yet pulled), which ``load`` asks its ``fetch`` callable for (by key)
run by run, just before staging each run on CUDA, so fetching the next run overlaps
the device copies of this one (one ``ray.get`` of a 16K-token batch's 63
objects before the load was 2.8 ms of a 30 ms rot4 warm get on the H200); on the
CPU all at once. A source ``fetch`` gives as None is a miss ("missing"); a fetch
that raises makes its keys errors with its reason.

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

from kernels import wsum
from kvtier.block import Block
from kvtier.codecs import TORCH_DTYPES, ZSTD_SUFFIX, get_codec
from kvtier.codecs.batch import Item, decode_many
from kvtier.errors import BlockFormatError, KvtierError
from kvtier.tiers import host_pages
from kvtier.tiers.hot import aliases, as_device, entry_buffers, owned

Source = Any  # bytes-like | Block | Callable[[], bytes-like | Block | None] | None
_ALIGN = 512  # staging offsets: what the CUDA caching allocator gives device buffers, so H2D copies stay aligned
MAX_THREADS = 16  # copy + hash is memory-bound: 16 threads saturated the H200 host's bandwidth (2026-12-01)
# Each slice costs a few GIL round trips (copy, hash, H2D launch: each releases the GIL). 1 MiB copy/hash slices
# with the H2D launched by the calling thread per 8 MiB reached only 17.6 GB/s of 55 on the H200 (16 threads, 2 GB):
# ~8000 GIL handoffs per load. Defaults below; ``KVTIER_LOAD_SLICE_MIB`` overrides the copy/hash slice (tuning).
# 8 MiB (was 2): on the H200 a 16K rot4 load took 52.7 ms with 8 MiB slices, 62.4 with 2 (runs of 32 MiB, 16 threads)
COPY_SLICE = int(float(os.environ.get("KVTIER_LOAD_SLICE_MIB", "8")) * (1 << 20))  # copied, then hashed
SEND_SLICE = 8 << 20  # one H2D copy per 8 MiB staged, launched by the worker that staged it
# CUDA: one work item stages a contiguous run of blocks of about this many bytes (at most total / threads, so
# every thread has work) into one pinned slab and records one event. A 16K rot4 load is 63 blocks of 9 MiB:
# one item per block took 77.8 ms on the H200 for 13.5 ms of GPU work (per-block Python of 16 threads taking
# turns on the GIL); runs of 64 MiB with 8 MiB slices 49.3 ms, and a 16K `none` load 83-89 ms instead of
# 107-117 (bench request h10-s3-1). ``KVTIER_LOAD_GROUP_MIB`` overrides it (0: one block per item).
# CUDA, inline runs: a device check is queued once this many bytes are sent and not checked (on a stream of its
# own, overlapping the next copies): one launch per load left the whole check (2.9 ms for 2 GB) after the last copy
CHECK_BYTES = 256 << 20
GROUP_BYTES = int(float(os.environ.get("KVTIER_LOAD_GROUP_MIB", "64")) * (1 << 20))


@dataclass(frozen=True)
class Later:
    """A source still to fetch (``load``'s ``fetch`` gets it when its run is staged); ``size``: about how many
    bytes it is, for cutting runs."""

    size: int


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

    def __init__(self, threads: int | None = None, *, group_bytes: int | None = None,
                 copy_slice: int | None = None) -> None:
        n = threads if threads is not None else int(os.environ.get("KVTIER_LOAD_THREADS", "0")) or min(
            MAX_THREADS, os.cpu_count() or 2)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"threads={threads!r} must be a positive int")
        g = GROUP_BYTES if group_bytes is None else group_bytes
        c = COPY_SLICE if copy_slice is None else copy_slice
        for name, v in (("group_bytes", g), ("copy_slice", c)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative int of bytes")
        self.threads = n
        self.group_bytes = g
        self.copy_slice = max(_ALIGN, c // _ALIGN * _ALIGN)
        self.send_slice = max(SEND_SLICE, self.copy_slice)
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="kvtier-load")
        self.pages = host_pages.shared()  # object-store windows registered for direct host-to-device copies
        self._streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def load(self, keys: Sequence[str], sources: Sequence[Source], device: str | torch.device | None = None, *,
             expect_model: str | None = None, keep_buffers: bool = False, decode: bool = True,
             timeout_s: float = 60.0, fetch: Callable[[list[str]], Sequence[Source]] | None = None) -> list[Loaded]:
        """One ``Loaded`` per key, in order. ``decode=False`` (a prefetch into the hot tier) stops after the
        device copy: ``kv`` stays None, ``buffers`` are set (``keep_buffers`` is implied).
        ``keep_buffers="owned"`` (CPU): hand over only payloads this call owns anyway (inflated ``+zstd``),
        make no copy for keeping (a CPU get of object-store bytes decodes them in place).
        ``fetch(keys)``: the sources of those keys' ``Later`` entries, in order (None where not had)."""
        keep_buffers = keep_buffers or not decode
        if len(keys) != len(sources):
            raise ValueError(f"load got {len(keys)} keys and {len(sources)} sources; they must pair up")
        sources = list(sources)
        if fetch is None and any(isinstance(s, Later) for s in sources):
            raise ValueError("load got Later sources and no fetch to get them with")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
        device = as_device(device)
        cuda = device.type == "cuda"
        call = _Call(queue.SimpleQueue(), threading.Semaphore(2 * self.threads), threading.Event(),
                     time.monotonic() + timeout_s, self._stream(device) if cuda else None,
                     self.copy_slice, self.send_slice, self.pages if cuda else None)
        if not cuda:
            _fill(sources, range(len(sources)), keys, fetch)  # the CPU path has no device copies to overlap it with
        if cuda:
            with torch.cuda.device(device), torch.cuda.stream(call.copy):  # written on the copy stream only
                call.flags = torch.zeros(len(keys), dtype=torch.int32, device=device)
            self.pages.new_call()
            checks: list = []  # blocks sent here and not verified yet
            check = self._stream(device, "check")
            for group in _groups(sources, self.threads, self.group_bytes):
                _fill(sources, group, keys, fetch)  # this run's bytes; the last run's copies are under way meanwhile
                rest = self._stage_inline(call, group, keys, sources, device, expect_model, checks)
                if rest:
                    self._pool.submit(self._work_group, call, rest, keys, sources, device, expect_model,
                                      keep_buffers)
                if sum(v.dev.numel() for _, v, _ in checks) >= CHECK_BYTES:
                    _check_after_copies(call, device, check, checks)
            if checks:
                _check_after_copies(call, device, check, checks)
        elif len(keys) == 1 and not callable(sources[0]):
            # one block in hand (a single warm get): staged here; handing it to a pool thread and back cost
            # two thread switches (~0.5 ms of a 4.4 ms SmolLM2 warm get on the 2-core box)
            self._work(call, 0, keys[0], sources[0], device, expect_model, keep_buffers)
        else:
            for i, (k, s) in enumerate(zip(keys, sources)):
                self._pool.submit(self._work, call, i, k, s, device, expect_model, keep_buffers)
        main = torch.cuda.current_stream(device) if cuda else None
        out: list[Loaded | None] = [None] * len(keys)
        on_device: list[tuple[int, _Staged]] = []  # CUDA: blocks whose bytes are on the device, to decode
        left = len(keys)
        while left:
            try:
                done, slot = call.events.get(timeout=max(0.0, call.deadline - time.monotonic()))
            except queue.Empty:
                break
            if slot:
                call.inflight.release()
            left -= len(done)
            staged = []
            for i, what in done:
                if isinstance(what, Loaded):
                    out[i] = what
                else:
                    staged.append((i, what))
            if cuda:
                if staged:
                    main.wait_event(staged[0][1].ready)  # one event per group
                    on_device += staged
                continue
            for i, what in staged:
                try:
                    out[i] = self._finish(keys[i], what, device, keep_buffers, decode)
                except BlockFormatError as e:
                    out[i] = Loaded(keys[i], "corrupt", error=str(e))
        call.stop.set()  # abandoned work (a timeout) stops at its next slice
        if on_device:  # decoded once every block is on the device: per run, the launches' Python bounded the load
            on_device.sort(key=lambda d: d[0])
            for (i, _), o in zip(on_device, _finish_cuda(keys, on_device, device, main, keep_buffers, decode)):
                out[i] = o
        if call.checked:
            main.wait_stream(self._stream(device, "check"))  # the inline runs' checks (the pool's precede
            main.wait_stream(call.copy)                      # their runs' events, which main waited for)
            bad = call.flags.cpu().tolist()  # the one sync of a CUDA load (the decodes queued before it)
            for i, o in enumerate(out):
                if o is not None and o.status == "ok" and bad[i]:
                    out[i] = Loaded(keys[i], "corrupt", error=f"corrupt block {keys[i]!r}: payload sums mismatch "
                                                              f"on {device} (kernels.wsum)")
        return [o if o is not None else Loaded(k, "timeout", error=f"not read and verified within {timeout_s}s")
                for k, o in zip(keys, out)]

    # ---- in the calling thread, CUDA: blocks the GPU verifies, straight from registered pages -------------
    def _stage_inline(self, call: "_Call", idxs: list[int], keys: Sequence[str], sources: Sequence[Source],
                      device: torch.device, expect_model: str | None, checks: list) -> list[int]:
        """The run's blocks that carry payload sums and sit in registered object-store pages: parsed, their
        headers verified, each block's bytes sent to a device tensor of its own in one copy on the copy
        stream, here (no host copy and no hash is left to spread over threads, and the pool's threads taking
        turns on the GIL made a 16K rot4 load 49-66 ms when its parts took 23 ms on one thread, H200); one
        event for the run. They join ``checks``, which ``load`` verifies on the device every ``CHECK_BYTES``.
        Returns the indices left for the pool (reads, ``+zstd``, blocks without sums or outside registered pages)."""
        rest, done = [], []
        with torch.cuda.device(device), torch.cuda.stream(call.copy):
            for i in idxs:
                src = sources[i]
                if src is None or callable(src) or isinstance(src, Block):
                    rest.append(i)
                    continue
                try:
                    block = Block.from_arrow(src, expect_key=keys[i], verify=False)
                    if expect_model is not None and block.model != expect_model:
                        done.append((i, _foreign(keys[i], block, expect_model)))
                        continue
                    if block.sums is None or block.codec.endswith(ZSTD_SUFFIX):
                        rest.append(i)
                        continue
                    expected = block.check_header()
                    v = _send_direct(call, block, _np(src), device)
                    if v is None:
                        rest.append(i)
                        continue
                except Exception as e:  # noqa: BLE001 - a miss with its reason (e.g. no device memory left)
                    done.append((i, _failed(keys[i], e)))
                    continue
                done.append((i, v))
                checks.append((i, v, expected))
            if any(isinstance(v, _Staged) for _, v in done):
                _seal(call, device, done, [])
        if done:
            call.events.put((sorted(done, key=lambda d: d[0]), False))
        return rest

    # ---- in the pool -------------------------------------------------------------------
    def _work(self, call: "_Call", i: int, key: str, src: Source, device: torch.device, expect_model: str | None,
              keep: bool) -> None:
        """CPU: one block per work item (its staging is a copy for the hot tier or nothing)."""
        try:
            what = self._parse(key, src, expect_model, call)
            if not isinstance(what, Loaded):
                what = _stage_cpu(call, keep, *what[:5])  # a CPU load has no device sums to check
        except _Stopped:
            return
        except Exception as e:  # noqa: BLE001 - a miss with its reason, never a hang
            what = _failed(key, e)
        call.events.put(([(i, what)], False))

    def _work_group(self, call: "_Call", idxs: list[int], keys: Sequence[str], sources: Sequence[Source],
                    device: torch.device, expect_model: str | None, keep: bool) -> None:
        """CUDA: a contiguous run of blocks parsed, then copied and hashed into one pinned slab, each block's
        bytes sent on to a device tensor of its own (the hot tier adopts blocks one by one), one event."""
        done: list[tuple[int, Any]] = []
        todo = []
        try:
            for i in idxs:
                try:
                    what = self._parse(keys[i], sources[i], expect_model, call)
                except _Stopped:
                    raise
                except Exception as e:  # noqa: BLE001
                    what = _failed(keys[i], e)
                (done.append((i, what)) if isinstance(what, Loaded) else todo.append((i, what)))
            slot = bool(todo) and call.inflight.acquire(timeout=max(0.0, call.deadline - time.monotonic()))
            if todo and not slot:
                done += [(i, Loaded(keys[i], "timeout", error="no staging slot freed before the deadline"))
                         for i, _ in todo]
            elif todo:
                try:
                    done += _stage_cuda(call, device, keys, todo)
                except BaseException:
                    call.inflight.release()
                    raise
        except _Stopped:
            return
        call.events.put((sorted(done, key=lambda d: d[0]), slot))

    def _parse(self, key: str, src: Source, expect_model: str | None, call: "_Call"):
        """The block's header checked (key, model); a ``Loaded`` (a miss) or what to stage: (block, base codec,
        params, payload buffers, verified, expected device sums). ``+zstd``: verified here, then inflated into
        memory this call owns. On CUDA a block with payload sums has its header verified here and its payload
        on the device after the copy (``expected``: buffer name -> lanes), never hashed on the host."""
        if callable(src):
            src = src()
        if src is None:
            return Loaded(key, "missing")
        verified = isinstance(src, Block)  # its reader verified it (a cold read)
        block = src if verified else Block.from_arrow(src, expect_key=key, verify=False)
        if block.key != key:
            raise BlockFormatError(f"block holds key {block.key!r}, expected {key!r}")
        if expect_model is not None and block.model != expect_model:
            return _foreign(key, block, expect_model)
        codec, params, bufs = block.codec, block.params, block.buffers
        if codec.endswith(ZSTD_SUFFIX):  # verified before inflating; the inflated tensors belong to this call
            if not verified:
                _check(block, bufs, call)
            verified = True
            codec, params, bufs = entry_buffers(block, torch.device("cpu"))
        expected = None
        if not verified and call.copy is not None and block.sums is not None:
            expected = block.check_header()
        return block, codec, params, bufs, verified, expected

    # ---- in the calling thread ---------------------------------------------------------
    def _finish(self, key: str, v: _Staged, device: torch.device, keep: bool, decode: bool) -> Loaded:
        """CPU: one block decoded. CPU decodes run here: a torch CPU op in a pool thread starts an OpenMP
        team for that thread, whose spinning after the op slowed the caller's next forward 50x (a 3 ms tail
        took 154 ms on 2 cores)."""
        kv = _decode(key, v.codec, v.params, v.block, v.decode_from, device, v.private) if decode else None
        return Loaded(key, "ok", kv, v.block, v.buffers if keep else None, _nbytes(v.block))

    def _stream(self, device: torch.device, role: str = "copy"):
        """One stream per device and role: ``copy`` (host-to-device copies, the pool's checks) and ``check``
        (the device checks of inline runs, so they overlap the next runs' copies)."""
        s = self._streams.get((device, role))
        if s is None:
            s = self._streams[(device, role)] = torch.cuda.Stream(device)
        return s


@dataclass
class _Call:
    events: "queue.SimpleQueue"  # ([(i, _Staged | Loaded), ...], holds a staging slot), one per work item
    inflight: threading.Semaphore  # CUDA: staged runs the calling thread has not taken yet (pinned memory held)
    stop: threading.Event
    deadline: float
    copy: Any  # CUDA: the copy stream
    copy_slice: int = COPY_SLICE
    send_slice: int = SEND_SLICE
    pages: Any = None  # CUDA: the loader's ``HostPages`` (registered object-store windows)
    flags: torch.Tensor | None = None  # CUDA: per key, non-zero when its payload failed the device check
    checked: bool = False  # some block was verified on the device: ``load`` reads ``flags`` (one sync)


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


def _foreign(key: str, block: Block, expect_model: str) -> Loaded:
    return Loaded(key, "model", error=f"block of model {block.model!r}, expected {expect_model!r}")


def _failed(key: str, e: Exception) -> Loaded:
    if isinstance(e, BlockFormatError):
        return Loaded(key, "corrupt", error=str(e))
    # OSError, KvtierError, ValueError (a read), or e.g. no pinned memory left: a miss with its reason
    return Loaded(key, "error", error=f"{type(e).__name__}: {e}")


def _fill(sources: list, idxs, keys: Sequence[str], fetch) -> None:
    """Replace the ``Later`` entries among ``sources[idxs]`` with what ``fetch`` gives for them (None: a miss).
    A fetch that raises, or gives the wrong count, makes each of them an error naming why (a miss with its
    reason, like a cold read that raised)."""
    todo = [i for i in idxs if isinstance(sources[i], Later)]
    if not todo:
        return
    try:
        got = list(fetch([keys[i] for i in todo]))
        if len(got) != len(todo):
            raise KvtierError(f"fetch gave {len(got)} sources for {len(todo)} keys")
    except Exception as e:  # noqa: BLE001 - becomes each key's error in the load, never a hang or a raise
        got = [_raiser(e)] * len(todo)
    for i, src in zip(todo, got):
        sources[i] = src


def _raiser(e: Exception):
    def read():
        raise e
    return read


def _known_size(src: Source) -> int | None:
    """Bytes of a source in hand (None for a read still to run: a cold read is a work item of its own)."""
    if isinstance(src, Later):
        return src.size
    if src is None or callable(src):
        return None
    if isinstance(src, Block):
        return sum(b.size for b in src.buffers.values())
    try:
        return memoryview(src).nbytes
    except TypeError:
        return None


def _groups(sources: Sequence[Source], threads: int, group_bytes: int) -> list[list[int]]:
    """Contiguous runs of source indices of about ``group_bytes`` each (at most total / threads, so every
    thread gets work; one block at least); a source whose size is unknown (a read) is a run of its own."""
    sizes = [_known_size(s) for s in sources]
    target = max(1, min(group_bytes, sum(s for s in sizes if s) // threads))
    out: list[list[int]] = []
    cur: list[int] = []
    acc = 0
    for i, n in enumerate(sizes):
        if n is None:
            out += [cur, [i]] if cur else [[i]]
            cur, acc = [], 0
            continue
        cur.append(i)
        acc += n
        if acc >= target:
            out.append(cur)
            cur, acc = [], 0
    if cur:
        out.append(cur)
    return out


def _stage_cpu(call: _Call, keep: bool | str, block: Block, codec: str, params, bufs, verified: bool) -> _Staged:
    inflated = block.codec.endswith(ZSTD_SUFFIX)
    if codec == "none" and keep is not True and not inflated:
        # its decode is a view of the payload, so the caller needs a copy anyway: made here, hashed as it is
        # copied (one pass over the source instead of a hash pass and then a copy on the calling thread), and
        # the decode views it (nothing else reads it)
        host, spans, _ = _copy_in(block, bufs, None if verified else _hasher(block), False, call)
        return _Staged(block, codec, params, host=host, spans=spans, private=True,
                       decode_from={n: host[a:a + sz] for n, (a, sz) in spans.items()})
    if not (keep is True and not inflated):  # nothing to copy: hashed in place, decoded from the source
        if not verified:
            _check(block, bufs, call)
        return _Staged(block, codec, params, buffers=bufs if inflated else None,
                       decode_from=bufs if inflated else None, private=inflated and not keep)
    host, spans, _ = _copy_in(block, bufs, None if verified else _hasher(block), False, call)
    v = _Staged(block, codec, params, host=host, spans=spans)
    v.buffers = v.decode_from = {n: host[a:a + s] for n, (a, s) in spans.items()}
    return v


def _stage_cuda(call: _Call, device: torch.device, keys: Sequence[str], todo: list) -> list[tuple[int, Any]]:
    """``todo``'s blocks ((index, parsed) pairs) copied into one pinned slab, each sent on to its own device
    tensor on the copy stream; one event after the last copy. A block with payload sums (outside registered
    pages) is copied without a host hash and verified on the device (one ``kernels.wsum`` launch for the
    run, its verdict in ``call.flags``); any other block is hashed while it is copied. A block that fails
    its checksum is a miss (its device bytes are never served); the others are unaffected."""
    layouts = [_layout(p[3]) for _, p in todo]
    bases, off = [], 0
    for lay in layouts:
        off = -(-off // _ALIGN) * _ALIGN
        bases.append(off)
        off += max(lay[2], 1)
    out: list[tuple[int, Any]] = []
    checks: list[tuple[int, _Staged, dict]] = []
    # this thread launches its own H2D copies on the copy stream (streams are thread-safe; the current stream
    # and device are per thread); the device bytes are allocated on that stream too
    with torch.cuda.device(device), torch.cuda.stream(call.copy):
        slab = torch.empty(off, dtype=torch.uint8, pin_memory=True)
        for (i, (block, codec, params, bufs, verified, expected)), lay, base in zip(todo, layouts, bases):
            v = _Staged(block, codec, params)
            try:
                h = None if verified or expected is not None else _hasher(block)
                v.host, v.spans, v.dev = _copy_in(block, bufs, h, True, call, device, layout=lay,
                                                  host=slab[base:base + max(lay[2], 1)])
            except _Stopped:
                raise
            except Exception as e:  # noqa: BLE001 - this block is a miss, the rest of the run goes on
                out.append((i, _failed(keys[i], e)))
                continue
            out.append((i, v))
            if expected is not None:
                checks.append((i, v, expected))
        return _seal(call, device, out, checks)


def _seal(call: _Call, device: torch.device, out: list, checks: list) -> list[tuple[int, Any]]:
    """On the copy stream, after a run's copies: its device check, then one event every staged block of the
    run carries."""
    if checks:
        _check_on_device(call, device, checks)
    ready = torch.cuda.Event()
    ready.record(call.copy)
    for _, v in out:
        if isinstance(v, _Staged):
            v.ready = ready
    return out


def _send_direct(call: _Call, block: Block, wire: np.ndarray, device: torch.device) -> _Staged | None:
    """The block's whole serialized bytes (``wire``, registered object-store pages) copied to one device
    tensor on the current (copy) stream, one copy per registered window it spans (one, mostly): no host
    copy. The payload buffers are views at their offsets in it (Arrow keeps them 8-byte aligned). None when
    the bytes are not all in registered pages (the pool stages the block instead). The source stays alive
    until ``load`` has synced (it does when any block was verified on the device, which this one is)."""
    base = wire.ctypes.data
    pieces = call.pages.pieces(base, wire.nbytes) if call.pages is not None else None
    if pieces is None:
        return None
    spans = {}
    for n, b in block.buffers.items():
        off = b.address - base if b.size else 0
        if not 0 <= off <= wire.nbytes - b.size:
            return None  # not a slice of these bytes (cannot happen for a parsed wire): stage it
        spans[n] = (off, b.size)
    dev = torch.empty(max(wire.nbytes, 1), dtype=torch.uint8, device=device)
    d0, stream = dev.data_ptr(), call.copy.cuda_stream
    for addr, size, o in pieces:
        if not host_pages.copy_async(d0 + o, addr, size, stream):
            dev[o:o + size].copy_(_u8(wire[o:o + size]), non_blocking=True)
    v = _Staged(block, block.codec, block.params)
    v.spans, v.dev = spans, dev
    return v


def _check_after_copies(call: _Call, device: torch.device, stream, checks: list) -> None:
    """``checks``'s blocks verified on ``stream`` once the copy stream's work queued so far (their copies)
    has run; ``checks`` is emptied."""
    with torch.cuda.device(device), torch.cuda.stream(stream):
        stream.wait_stream(call.copy)
        _check_on_device(call, device, checks)
    checks.clear()


def _check_on_device(call: _Call, device: torch.device, checks: list[tuple[int, _Staged, dict]]) -> None:
    """One ``kernels.wsum`` launch over every buffer of ``checks``'s blocks, on the current stream (the copy
    stream after a pool run's copies, or the check stream once it waited for them); a block whose lanes
    differ from its header's gets a non-zero ``call.flags[i]``."""
    spans, want, idx = [], [], []
    for i, v, expected in checks:
        for n, (a, size) in v.spans.items():
            spans.append((v.dev.data_ptr() + a, size))
            want.append([x - (1 << 64) if x >= 1 << 63 else x for x in expected[n]])
            idx.append(i)
    got = wsum.sums_triton(spans, device)
    both = torch.tensor([x for w in want for x in w] + idx, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    want_t, idx_t = both[:2 * len(idx)].view(-1, 2), both[2 * len(idx):]
    call.flags.index_add_(0, idx_t, (got != want_t).any(1).to(torch.int32))
    call.checked = True


def _layout(bufs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]], int]:
    """(byte views of the buffers, name -> (offset, size) in sorted name order at 512-byte aligned offsets,
    total bytes)."""
    srcs = {n: _np(bufs[n]) for n in sorted(bufs)}
    spans, off = {}, 0
    for n, src in srcs.items():
        off = -(-off // _ALIGN) * _ALIGN
        spans[n] = (off, src.nbytes)
        off += src.nbytes
    return srcs, spans, off


def _copy_in(block: Block, bufs: Mapping[str, Any], h, pin: bool, call: _Call,
             device: torch.device | None = None, *, layout=None,
             host: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, tuple[int, int]], torch.Tensor | None]:
    """Every buffer copied into one host tensor (512-byte aligned spans, in sorted name order: the checksum's
    order), each ``copy_slice`` hashed right after its copy when ``h`` is given. With a CUDA ``device`` the
    host tensor is pinned and every ``send_slice`` staged is copied on to a device tensor at once, on the
    current (copy) stream. ``host``: staging memory to use (a slice of a group's pinned slab) instead of a
    new tensor. Returns (host, spans, device tensor or None). Raises ``BlockFormatError`` if the checksum
    does not match (the device bytes are then never decoded)."""
    srcs, spans, off = layout if layout is not None else _layout(bufs)
    if host is None:
        host = torch.empty(max(off, 1), dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(max(off, 1), dtype=torch.uint8, device=device) if device is not None else None
    dst = host.numpy()
    told, step = 0, call.copy_slice
    for n, src in srcs.items():
        base, size = spans[n]
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


def _finish_cuda(keys: Sequence[str], staged: list[tuple[int, _Staged]], device: torch.device, main, keep: bool,
                 decode: bool) -> list[Loaded]:
    """A load's blocks, their bytes on the device (``load`` made ``main`` wait for their runs' events),
    decoded on ``main``: consecutive same-shaped blocks in one launch (``kvtier.codecs.batch``). Once per
    load, not per run: a 16K-token rot4 get decodes in ~1.2 ms of GPU time, but 16 runs' launches (concatenations,
    decode, views) kept the calling thread busy ~5 ms more, and it is the load's bound (H200)."""
    items = []
    for i, v in staged:
        v.dev.record_stream(main)  # allocated on the copy stream, read (and freed) on the current one
        bufs = {n: v.dev[a:a + s] for n, (a, s) in v.spans.items()}
        items.append(Item(keys[i], v.codec, v.params, tuple(v.block.shape), TORCH_DTYPES[v.block.dtype], bufs))
    kvs = decode_many(items, device, lambda t: _decode(items[t].key, items[t].codec, items[t].params,
                                                       staged[t][1].block, items[t].buffers, device,
                                                       private=True)) if decode else [None] * len(items)
    if keep and decode:
        _own(kvs, items)
    out = []
    for (i, v), it, kv in zip(staged, items, kvs):
        if isinstance(kv, BlockFormatError):
            out.append(Loaded(keys[i], "corrupt", error=str(kv)))
        else:
            out.append(Loaded(keys[i], "ok", kv, v.block, it.buffers if keep else None, _nbytes(v.block)))
    return out


def _own(kvs: list, items: Sequence[Item]) -> None:
    """In place: each decoded chunk that aliases its device payload (the ``none`` codec's is a view of it), which
    the hot tier keeps, replaced by a copy, all in one multi-tensor copy (one ``clone`` launch per block took
    3.5 ms of a 16K-token ``none`` warm get on the H200: 63 launches of ~55 us for ~1 ms of copying)."""
    idx = [i for i, (kv, it) in enumerate(zip(kvs, items))
           if isinstance(kv, torch.Tensor) and aliases(kv, it.buffers.values())]
    if not idx:
        return
    srcs = [kvs[i] for i in idx]
    dsts = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in srcs]
    torch._foreach_copy_(dsts, srcs)
    for i, d in zip(idx, dsts):
        kvs[i] = d


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
