"""``LocationCache``: the warm locations a client learned from the controller, to skip ``locate`` on a hit.

A warm get used to start with one ``locate`` round trip to the controller
(1.4 ms on the 2-core box, 2.7x a whole ``ray.get`` of a SmolLM2 chunk). This
cache keeps the ``Location``s (warm ObjectRefs) that ``locate`` answered, so a
later get of the same keys fetches and loads at once, while one ``changes``
call to the controller (which returns only key names) runs alongside:

- ``take(keys)`` gives the cached entries plus the change number and controller
  incarnation they are known to be current at (read together, under one lock).
- The caller fetches and loads those blocks (verified as always: key, model,
  checksum), and before using any result asks the controller which keys
  changed since that number (``Controller.changes``, issued before the fetch;
  its answer reflects a moment after the get started). ``apply`` drops those
  entries and says which results to discard; a controller of another
  incarnation, a log that no longer reaches back, or no answer discards them
  all. A discarded or failed key goes through the normal locate path in the same
  get, so a stale entry costs a locate, never wrong data.
- ``learn`` stores a locate answer's warm entries only if they are at least as
  new as the change number the cache has applied (an older answer may predate a
  change the cache has already consumed).

Memory: an entry holds its block's ObjectRef, which keeps the object alive in
the object store (Ray reference counting) even after its shard dropped it.
So the cache is bounded (``max_entries``, LRU) and the client syncs it with the
controller about once a second while it is not empty (``sync``), dropping the
entries of blocks their shards dropped: such an object outlives its shard's
budget by at most that long. Counted in no budget; the README says so.

Not here: the fetch and load (``get_path``), the change log (``kvtier.placement``).
Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Iterable, Sequence

from kvtier.runtime.location import Location

MAX_ENTRIES = 16384  # 4M tokens of 256-token chunks; an entry is a few hundred bytes (its ObjectRef included)


class LocationCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        if not isinstance(max_entries, int) or max_entries < 0:
            raise ValueError(f"max_entries={max_entries!r} must be an int >= 0 (0: no cache)")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._d: OrderedDict[str, Location] = OrderedDict()
        self.incarnation: str | None = None
        self.seq = 0  # every change up to this number has been applied
        self.synced_at = time.monotonic()
        self.counters = {"hits": 0, "stale": 0, "flushes": 0}

    def __len__(self) -> int:
        return len(self._d)

    def take(self, keys: Sequence[str]) -> tuple[dict[str, Location], int, str | None]:
        """(cached warm locations of ``keys``, the change number and incarnation they are current at)."""
        with self._lock:
            got = {}
            for k in keys:
                loc = self._d.get(k)
                if loc is not None:
                    self._d.move_to_end(k)
                    got[k] = loc
            return got, self.seq, self.incarnation

    def learn(self, locs: dict[str, Location | None], incarnation: str, seq: int) -> None:
        """Keep the warm entries of a ``locate`` answer given at (``incarnation``, ``seq``)."""
        if not self.max_entries:
            return
        with self._lock:
            if incarnation != self.incarnation:  # a new controller: nothing learned from the old one holds
                self._reset(incarnation, seq)
            elif seq < self.seq:
                return  # may predate a change already applied (and so never seen again): not kept
            for k, loc in locs.items():
                if loc is not None and loc.tier == "warm":
                    self._d[k] = loc
                    self._d.move_to_end(k)
            while len(self._d) > self.max_entries:
                self._d.popitem(last=False)

    def apply(self, incarnation: str, seq: int, changed: Iterable[str] | None) -> set[str] | None:
        """A ``changes`` answer: drop the changed keys; returns them, or None when every entry (and every
        result taken from the cache before this answer) must be distrusted."""
        with self._lock:
            self.synced_at = time.monotonic()
            if changed is None or incarnation != self.incarnation:
                self._reset(incarnation, seq)
                return None
            out = set(changed)
            for k in out:
                self._d.pop(k, None)
            self.seq = max(self.seq, seq)
            return out

    def drop(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` (this process put, deleted, or failed to read them)."""
        with self._lock:
            for k in keys:
                self._d.pop(k, None)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def _reset(self, incarnation: str | None, seq: int) -> None:
        if self._d:
            self.counters["flushes"] += 1
        self._d.clear()
        self.incarnation, self.seq = incarnation, seq

    def sync_due(self, every_s: float) -> bool:
        return bool(self._d) and time.monotonic() - self.synced_at >= every_s
