"""The worker side of the kvtier connector: KV pages in and out of the tier.

It runs in each vLLM worker process, beside the paged KV tensors. Loading is
synchronous and happens before the step's forward: one batched ``kvtier.get``
of the planned chunks (bounded by ``load_timeout_s``), decoded chunks written
into the request's blocks (on CPU straight into the pages, ``pages.write_chunks``). Any chunk that does not come back whole (a miss since
the lookup, a checksum mismatch the tier turned into a miss, a shard or tier
that is down, a timeout, a wrong shape) fails that chunk's blocks, which vLLM
recomputes (``kv_load_failure_policy="recompute"``). Saving copies the finished
pages of finished chunks out after the forward (index_select, memcpy speed) and
leaves the reordering into chunks, compression and the put to one background thread fed by a bounded queue: a
full backlog (``save_queue`` batches or ``SAVE_QUEUE_BYTES`` of raw pages) drops the save before copying
it (a later miss, counted in ``dropped_saves``), never stalls the engine. The save stays out of the
forward's way: it compresses and puts one chunk at a time, each only once no forward has run for
``IDLE_GAP_S`` (``load``/``save`` mark each forward's start and end; a busy engine for ``SAVE_IDLE_WAIT_S``
declines the rest), and its thread runs at the lowest OS priority (nice 19, Linux per-thread), so other
processes' forwards win the cores too (q1+zstd costs ~120-180 ms of CPU per 256-token chunk on the 2-core box).
A prefill's saves for a remote decode (``SaveSpec.handoff``) are the exception: that decode waits for them,
so a second thread saves them at once, at normal priority.

It knows the page layout only through ``pages.PageLayout``; vLLM-specific
detection of the layout lives in ``connector.py``.
"""

from __future__ import annotations

import logging
import os
import re
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import Callable, Sequence

import torch

from kvtier.vllm import pages
from kvtier.vllm.scheduler import LoadSpec, SaveSpec

log = logging.getLogger("kvtier.vllm")


class WorkerSide:
    def __init__(self, layers: Sequence[torch.Tensor], layout: pages.PageLayout, chunk_tokens: int,
                 codec: str | None, save_queue: int, load_timeout_s: float,
                 get: Callable[[list[str]], list], put: Callable[[list[str], list, str | None], None],
                 ready: Callable[[float], bool], handoff=None) -> None:
        self.layers = list(layers)
        self._handoff = handoff  # kvtier.vllm.handoff.Handoff: direct P/D pulls and arena saves (None: tier only)
        self.layout = layout
        self.chunk_tokens = chunk_tokens
        self.codec = codec
        self.load_timeout_s = load_timeout_s
        self._get, self._put, self._ready = get, put, ready
        self._queue: queue.Queue = queue.Queue(maxsize=save_queue)
        lay0 = layers[0] if layers else None
        self._chunk_bytes = (len(self.layers) * 2 * layout.kv_heads * chunk_tokens * layout.head_dim *
                             (lay0.element_size() if lay0 is not None else 4))
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._load_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-load")
        self._errors: set[int] = set()
        self.counters = {"loaded_chunks": 0, "failed_chunks": 0, "saved_chunks": 0, "dropped_saves": 0,
                         "save_errors": 0}
        self._in_forward = False
        self._forward_end = 0.0  # time.monotonic() of the last forward's end
        # a prefill's saves for a remote decode are on that decode's path (it waits for them, handoff_wait_s):
        # they get their own thread at normal priority that does not wait for the engine to be idle. At nice
        # 19 behind the decode engine's busy scheduling loop they missed the 5 s wait on the 2-core box
        self._handoff_queue: queue.Queue = queue.Queue(maxsize=save_queue)
        self._savers = [threading.Thread(target=self._save_loop, args=(self._queue, False), name="kvtier-save",
                                         daemon=True),
                        threading.Thread(target=self._save_loop, args=(self._handoff_queue, True),
                                         name="kvtier-save-handoff", daemon=True)]
        for t in self._savers:
            t.start()

    # ---- load -------------------------------------------------------------
    def load(self, specs: Sequence[LoadSpec]) -> None:
        """Fill the planned blocks before the forward; failed blocks go to ``take_errors``. Called before every
        forward (vLLM's ``start_load_kv``), so it also marks the forward as running for the saver."""
        self._in_forward = True
        if not specs:
            return
        keys = [k for s in specs for k in s.keys]
        got: list = [None] * len(keys)
        # the scheduler offered these chunks, so its process reached the tier; this one connects at the same
        # time and is ready within seconds: wait for it (bounded) rather than fail a hit on an engine's first step
        if self._ready(min(self.load_timeout_s, 15.0)):
            fut = (self._load_pool.submit(self._get, keys) if self._handoff is None
                   else self._load_pool.submit(self._handoff.get, specs, keys))  # arena first, then the tier
            try:
                got = list(fut.result(timeout=self.load_timeout_s))
            except FutureTimeout:
                log.warning("kvtier: loading %d chunks took over %.1fs; recomputing them", len(keys),
                            self.load_timeout_s)
            except Exception as e:  # noqa: BLE001 - a tier error is a miss: vLLM recomputes
                log.warning("kvtier: loading %d chunks failed (%s: %s); recomputing them", len(keys),
                            type(e).__name__, e)
            if len(got) != len(keys):
                got = [None] * len(keys)
        lay = self.layout
        want = (len(self.layers), 2, lay.kv_heads, self.chunk_tokens, lay.head_dim)
        i = 0
        for spec in specs:
            good_rows, good_kvs, failed = [], [], False
            for row in spec.block_ids:
                kv = got[i]
                i += 1
                if failed or kv is None or tuple(kv.shape) != want:
                    if kv is not None and tuple(kv.shape) != want:
                        log.warning("kvtier: chunk of shape %s does not fit %s; recomputing", tuple(kv.shape), want)
                    failed = True  # vLLM truncates at the first failed block: later chunks would be dropped
                    self._errors.update(b for b in row if b >= 0)
                    self.counters["failed_chunks"] += 1
                    continue
                good_rows.append(row)
                good_kvs.append(kv)
            if good_rows:
                if lay.format == "cpu-vec":  # straight into the pages: one pass over the bytes, not three
                    pages.write_chunks(self.layers, lay, good_rows, good_kvs)
                else:
                    chunks = torch.stack([kv.to(self.layers[0].device, lay.dtype) for kv in good_kvs])
                    pages.scatter(self.layers, lay, torch.tensor(good_rows, dtype=torch.long), chunks)
                self.counters["loaded_chunks"] += len(good_rows)

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    # ---- save -------------------------------------------------------------
    def save(self, specs: Sequence[SaveSpec]) -> None:
        """Copy the chunks out of the pages (the pages may be reused after this step) and queue the puts.
        Called after every forward (vLLM's ``wait_for_save``): the forward is over."""
        self._in_forward, self._forward_end = False, time.monotonic()
        if not specs or not self._ready():
            return
        for spec in specs:
            nbytes = len(spec.keys) * self._chunk_bytes
            q = self._handoff_queue if spec.handoff else self._queue
            with self._bytes_lock:
                # checked before the copy: a save that would be dropped costs the engine nothing. This thread
                # is the only producer, so a queue with room now still has room at the put below
                full = q.full() or (self._queued_bytes and self._queued_bytes + nbytes > SAVE_QUEUE_BYTES)
                if not full:
                    self._queued_bytes += nbytes
            if full:
                self.counters["dropped_saves"] += len(spec.keys)
                if self.counters["dropped_saves"] == len(spec.keys) or self.counters["dropped_saves"] % 100 < len(spec.keys):
                    log.warning("kvtier: save backlog full (%d batches, %.0f MiB); dropped %d chunks of %s "
                                "(%d so far): they will be misses", self._queue.qsize(), self._queued_bytes / 2**20,
                                len(spec.keys), spec.req_id, self.counters["dropped_saves"])
                continue
            raw = pages.copy_pages(self.layers, self.layout, torch.tensor(spec.block_ids, dtype=torch.long),
                                   self.chunk_tokens)
            q.put_nowait((spec.keys, raw, nbytes))

    def _save_loop(self, q: queue.Queue, handoff: bool) -> None:
        _off_the_forwards_cores()
        if not handoff:
            _lowest_priority()
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                keys, raw, nbytes = item
                try:
                    deadline = time.monotonic() + SAVE_IDLE_WAIT_S
                    if not (handoff or self._wait_idle(deadline)):
                        raise _Declined(len(keys))
                    chunks = pages.pages_to_chunks(raw, self.layout, len(keys))
                    del raw
                    for i, (key, kv) in enumerate(zip(keys, chunks.unbind(0))):
                        if not (handoff or self._wait_idle(deadline)):
                            raise _Declined(len(keys) - i)
                        put = self._handoff.save if handoff and self._handoff is not None else self._put
                        put([key], [kv], self.codec)  # one chunk at a time: each ~40-150 ms of work
                        self.counters["saved_chunks"] += 1
                except _Declined as d:
                    self.counters["dropped_saves"] += d.chunks
                    log.warning("kvtier: the engine was busy for %.0f s; dropped %d chunks of a save (they will be "
                                "misses)", SAVE_IDLE_WAIT_S, d.chunks)
                finally:
                    with self._bytes_lock:
                        self._queued_bytes -= nbytes
            except Exception as e:  # noqa: BLE001 - a failed save is a later miss, not an engine error
                self.counters["save_errors"] += 1
                log.warning("kvtier: saving %d chunks failed (%s: %s)", len(item[0]), type(e).__name__, e)
            finally:
                q.task_done()

    def _wait_idle(self, deadline: float) -> bool:
        """Until no forward has run for ``IDLE_GAP_S`` (the save never shares the cores with one), or False at
        ``deadline``."""
        while True:
            now = time.monotonic()
            if not self._in_forward and now - self._forward_end >= IDLE_GAP_S:
                return True
            if now >= deadline:
                return False
            time.sleep(0.005)

    def flush(self, timeout_s: float) -> bool:
        """Wait (bounded) until every queued save is done; True if it drained."""
        done = threading.Event()

        def wait() -> None:
            self._handoff_queue.join()
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush(timeout_s)
        for q in (self._queue, self._handoff_queue):
            try:
                q.put(None, timeout=1.0)
            except queue.Full:
                pass
        self._load_pool.shutdown(wait=False, cancel_futures=True)


# KVTIER_SAVE_NICE (0-19) overrides it, for measuring the save's cost at another priority
SAVE_NICE = int(os.environ.get("KVTIER_SAVE_NICE", "19"))
# the save waits until the engine has run no forward for IDLE_GAP_S: vLLM's steps follow each other within
# ~2-10 ms here (scheduling, sampling), so a gap of 30 ms is a pause in traffic, not the space between two
# decode steps. It waits at most SAVE_IDLE_WAIT_S, then declines the rest (counted in dropped_saves)
IDLE_GAP_S = 0.03
SAVE_IDLE_WAIT_S = 30.0
# raw fp32 pages waiting for compression: 256 MiB is ~5.6K SmolLM2 tokens (46 KiB each); the batch count
# alone (save_queue) let 8 batches of 8K tokens hold 3 GiB on a 23 GiB box. One batch larger than this is
# still taken into an empty backlog (else a long prompt could never be saved)
SAVE_QUEUE_BYTES = 256 << 20


class _Declined(Exception):
    def __init__(self, chunks: int) -> None:
        self.chunks = chunks


def _off_the_forwards_cores() -> None:
    """Move the calling thread to the cores vLLM left free of the forward's OpenMP threads (all of the
    engine's cores when it left none).

    vLLM's CPU worker binds its OpenMP team through the environment it spawns the worker with
    (``GOMP_CPU_AFFINITY`` / ``OMP_PLACES`` / ``KMP_AFFINITY``); the team's master is the worker's main
    thread, bound to the first core, and every thread it starts later inherits that one core: the saver
    ran beside the forward's master on core 0 while the core vLLM reserved (for its scheduler process)
    was idle half the time. The engine's own cores are its parent's (the EngineCore process, unbound)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        cpus = os.sched_getaffinity(os.getppid())
    except OSError:
        cpus = set(range(os.cpu_count() or 1))
    free = cpus - _omp_bound_cpus()
    try:
        os.sched_setaffinity(0, free or cpus)  # 0: this thread (Linux applies it per thread)
    except OSError as e:  # a sandbox may refuse it: the save still works where it is
        log.info("kvtier: could not move the save thread off the forward's cores (%s)", e)


def _omp_bound_cpus() -> set[int]:
    """The CPU ids vLLM bound this worker's OpenMP threads to (empty when it bound none)."""
    text = os.environ.get("GOMP_CPU_AFFINITY") or os.environ.get("OMP_PLACES") or ""
    kmp = re.search(r"proclist=\[([^\]]*)\]", os.environ.get("KMP_AFFINITY", ""))
    if kmp:
        text += " " + kmp.group(1)
    out: set[int] = set()
    for lo, hi in re.findall(r"(\d+)(?:-(\d+))?", text):
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _lowest_priority() -> None:
    """Lower the calling thread (and the threads it starts: torch's OpenMP team for its compression) to
    nice 19. On Linux ``setpriority`` on a thread id applies to that thread alone; elsewhere it would
    renice the whole engine, so it is skipped there."""
    if not os.uname().sysname == "Linux" or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SAVE_NICE)
    except OSError as e:  # a sandbox may refuse it: the save still works, at normal priority
        log.info("kvtier: could not lower the save thread's priority (%s)", e)
