"""The background store: what takes a put's blocks to the warm shards (and the cold tier) off the request path.

``put`` compresses and serializes each chunk once, keeps it in the hot tier,
and hands the bytes to a ``StoreQueue``; a worker thread sends them on
(``send``: write-through to the cold tier, then one ``store`` call per shard,
waiting for the shard's answer, which comes after the controller registered
the blocks). So ``put`` returns after the compression, and:

* a block is visible to *other* processes' ``lookup``/``get`` only once it is
  really stored (the controller learns of it from the shard);
* the putting process reads back what it put at once: ``pending(key)`` gives
  the bytes of a block still queued or in flight, which ``get`` and ``lookup``
  use when the hot tier does not hold it (budget 0, evicted);
* the queue is bounded in bytes: a ``submit`` that does not fit waits for room
  (backpressure: puts slow down to the rate the shards take blocks) and raises
  ``KvtierError`` naming the wait after ``timeout_s``. Nothing is dropped and
  the bound is never exceeded, except by one batch larger than the whole bound,
  which is admitted alone into an empty queue (else it could never be stored).

A failed send is the sender's to report (it logs and counts); the blocks stay
in this process's hot tier. ``flush`` waits until everything submitted has been
sent. Knows nothing of Ray: ``send`` is given by the client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvtier.errors import KvtierError

log = logging.getLogger("kvtier.store")


@dataclass(frozen=True)
class Pending:
    """One block on its way to a shard: its key, its Arrow bytes, its size."""

    key: str
    wire: Any  # pyarrow.Buffer
    nbytes: int
    version: int = 0  # 0: a put; else a promotion of that version of a cold hit
    write_through: bool = False  # the put's own setting, fixed when it was queued (not when it is sent)


class StoreQueue:
    def __init__(self, send: Callable[[list[Pending]], None], max_bytes: int, timeout_s: float,
                 max_batch: int = 64, max_batch_bytes: int = 0) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"store queue max_bytes={max_bytes!r} must be a positive int")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"store queue timeout_s={timeout_s!r} must be a positive number of seconds")
        self._send = send
        self.max_bytes = max_bytes
        self.timeout_s = float(timeout_s)
        self.max_batch = max_batch
        # bytes per send (0: no limit). The shard stores a batch before the controller can order evictions, so a
        # batch larger than a slice of the shard's budget overshoots it: 64 coalesced 512 KiB puts into a 4 MiB
        # shard peaked at 9x its budget (tests/reliability/test_never_wrong.py::test_11)
        self.max_batch_bytes = max_batch_bytes
        self._queue: deque[list[Pending]] = deque()
        self._pending: dict[str, Pending] = {}  # queued or in flight, by key (the latest put of a key wins)
        self._bytes = 0
        self._cv = threading.Condition()
        self._closed = False
        # blocks queued and blocks done (sent or failed) so far: the queue is FIFO, so a flush waits for the count
        # done to reach the count queued when it was called, not for an empty queue (other threads keep putting)
        self._queued_n = 0
        self._done_n = 0
        self.counters = {"submitted": 0, "sent": 0, "waits": 0, "wait_s": 0.0, "send_errors": 0}
        self._thread = threading.Thread(target=self._run, name="kvtier-store", daemon=True)
        self._thread.start()

    # ---- the putting thread ----------------------------------------------
    def submit(self, items: Sequence[Pending]) -> None:
        """Queue ``items`` (one batch: sent together); waits while the queue is full."""
        items = list(items)
        if not items:
            return
        size = sum(p.nbytes for p in items)
        deadline = time.monotonic() + self.timeout_s
        with self._cv:
            t0 = None
            while self._bytes and self._bytes + size > self.max_bytes:
                if self._closed:
                    raise KvtierError("the store queue is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KvtierError(f"the store queue stayed full for {self.timeout_s:g}s ({self._bytes} of "
                                      f"{self.max_bytes} bytes queued, {size} more wanted): the warm shards "
                                      "are not taking blocks")
                if t0 is None:
                    t0 = time.monotonic()
                    self.counters["waits"] += 1
                self._cv.wait(left)
            if t0 is not None:
                self.counters["wait_s"] += time.monotonic() - t0
            if self._closed:
                raise KvtierError("the store queue is closed")
            self._enqueue(items, size)

    def _enqueue(self, items: list[Pending], size: int) -> None:  # under self._cv
        for p in items:
            self._pending[p.key] = p
        self._bytes += size
        self._queued_n += len(items)
        self._queue.append(items)
        self.counters["submitted"] += len(items)
        self._cv.notify_all()

    def offer(self, items: Sequence[Pending]) -> bool:
        """Queue ``items`` only if they fit now (never waits): for work that may be skipped, such as
        promoting a cold hit to warm on a get path. False if not queued."""
        items = list(items)
        size = sum(p.nbytes for p in items)
        with self._cv:
            if not items or self._closed or (self._bytes and self._bytes + size > self.max_bytes):
                return False
            self._enqueue(items, size)
        return True

    def pending(self, key: str) -> Pending | None:
        """The block of ``key`` if it is still queued or being sent."""
        return self._pending.get(key)

    def queued_bytes(self) -> int:
        return self._bytes

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every block submitted before this call has been sent or has failed (True), or
        ``timeout_s`` passed (False). Blocks other threads submit meanwhile are not waited for."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._cv:
            target = self._queued_n
            while self._done_n < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    @property
    def closed(self) -> bool:
        """True once ``close`` gave up waiting: a sender checks it to skip retries and follow-up calls."""
        return self._closed

    def close(self, timeout_s: float = 5.0) -> bool:
        """Send what is queued (within ``timeout_s``), then stop the worker: blocks still queued then are
        dropped (the caller is going away), the batch in flight ends within the sender's own bound (it skips
        retries once ``closed``) and is waited for up to ``timeout_s`` more. True if the worker stopped: no
        thread of this queue is left inside a remote call (none may be inside Ray at ``ray.shutdown()``).
        Dropped blocks count as done, so no ``flush`` waits on them."""
        self.flush(timeout_s)
        with self._cv:
            self._closed = True
            dropped = [p for entry in self._queue for p in entry]
            self._queue.clear()
            for p in dropped:
                if self._pending.get(p.key) is p:
                    del self._pending[p.key]
            self._bytes -= sum(p.nbytes for p in dropped)
            self._done_n += len(dropped)
            self._cv.notify_all()
        if dropped:
            log.warning("kvtier: closing with %d blocks not yet stored: dropped", len(dropped))
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ---- the worker thread -----------------------------------------------
    def _next_batch(self) -> list[Pending]:
        """Coalesce queued puts into one send (one store call per shard), within ``max_batch`` blocks and
        ``max_batch_bytes``; a put larger than that is split (its blocks are independent). Under the lock."""
        batch: list[Pending] = []
        nbytes = 0
        limit = self.max_batch_bytes or float("inf")
        while self._queue and len(batch) < self.max_batch:
            entry = self._queue[0]
            take = 0
            while take < len(entry) and len(batch) + take < self.max_batch and \
                    (not (batch or take) or nbytes + entry[take].nbytes <= limit):
                nbytes += entry[take].nbytes
                take += 1
            if take == 0:
                break
            batch += entry[:take]
            if take == len(entry):
                self._queue.popleft()
            else:
                self._queue[0] = entry[take:]
                break
        return batch

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                batch = self._next_batch()
            try:
                self._send(batch)
                self.counters["sent"] += len(batch)
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one failed batch
                self.counters["send_errors"] += 1
                log.warning("kvtier: storing %d blocks failed: %s: %s; they stay in the hot tier",
                            len(batch), type(e).__name__, e)
            finally:
                with self._cv:
                    for p in batch:
                        if self._pending.get(p.key) is p:
                            del self._pending[p.key]
                    self._bytes -= sum(p.nbytes for p in batch)
                    self._done_n += len(batch)
                    self._cv.notify_all()
