"""The warm tier's storage inside one shard: key -> (handle of the bytes, size, generation).

A warm shard keeps compressed blocks in host memory. In the runtime the bytes
are Ray objects owned by the shard actor (``ray.put`` inside the shard), so a
reader on the same node maps them zero-copy from the object store, and the
handle stored here is the ``ObjectRef``. This module only keeps the table and
its byte count; it does not know what a handle is, and it does not decide what
to evict (the controller's ``kvtier.placement`` does, and the shard executes).

Every write gets a new generation number (local to the shard). Orders from the
controller carry the generation they were decided on, so an order about an older
copy never removes a newer one written under the same key in between. Each copy
also carries the tier-wide version the controller gave its write (0 until the
controller has answered), which goes with it to the cold tier on demotion.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WarmItem:
    key: str
    size: int
    gen: int
    handle: Any
    version: int = 0


class WarmStore:
    """A thread-safe table of the blocks one shard holds, with its byte count."""

    def __init__(self, capacity_bytes: int) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"warm shard capacity_bytes={capacity_bytes!r} must be an int >= 0")
        self.capacity = capacity_bytes
        self._items: dict[str, WarmItem] = {}
        self._gens = itertools.count(1)
        self._lock = threading.Lock()
        self.bytes = 0
        self.stored = self.dropped = self.demoted = self.demote_failures = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def add(self, key: str, size: int, handle: Any, version: int = 0) -> WarmItem:
        """Hold a new copy of ``key`` (replacing an older one); returns it with its generation."""
        item = WarmItem(key, int(size), next(self._gens), handle, version)
        with self._lock:
            old = self._items.get(key)
            self.bytes += item.size - (old.size if old else 0)
            self._items[key] = item
            self.stored += 1
        return item

    def get(self, key: str, gen: int | None = None) -> WarmItem | None:
        """The current copy of ``key``; None if absent or (with ``gen``) not that generation."""
        item = self._items.get(key)
        if item is None or (gen is not None and gen and item.gen != gen):
            return None
        return item

    def set_version(self, key: str, gen: int, version: int) -> None:
        """The controller gave the write of copy ``gen`` of ``key`` this version (if it is still held)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None and item.gen == gen:
                self._items[key] = WarmItem(item.key, item.size, item.gen, item.handle, version)

    def remove(self, key: str, gen: int | None = None) -> WarmItem | None:
        """Drop the copy of ``key`` if it is of generation ``gen`` (any if None or 0)."""
        with self._lock:
            item = self._items.get(key)
            if item is None or (gen is not None and gen and item.gen != gen):
                return None
            del self._items[key]
            self.bytes -= item.size
            self.dropped += 1
            return item

    def items(self) -> list[WarmItem]:
        with self._lock:
            return list(self._items.values())

    def stats(self) -> dict[str, Any]:
        return {"blocks": len(self._items), "bytes": self.bytes, "capacity_bytes": self.capacity,
                "stored": self.stored, "dropped": self.dropped, "demoted": self.demoted,
                "demote_failures": self.demote_failures}
