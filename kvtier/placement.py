"""The placement policy: the tier's index, byte budgets, LRU orders, pins and leases.

``Placement`` is what the controller actor knows: for every key its size, where
copies live (one warm shard and/or the cold tier), when it was last read, and
who is reading it (pins). Each warm shard and the cold tier have a byte budget
and an LRU order. When a put or a promotion overflows a budget, the least
recently used unpinned blocks move down one tier:

    warm shard --demote--> cold --delete--> dropped (gone from the system)

A block leaves the system only when it falls off the cold tier (or when no cold
tier is configured, or writing it there failed). Moving data is never done here:
every decision comes back as an ``Order`` that the runtime hands to the shard
that holds the bytes, and the shard reports back (``demoted``).

Pins protect blocks under a reader; each pin belongs to a lease that expires
after ``ttl`` seconds, so a reader that dies cannot pin a block forever.

``LRU`` (one byte budget + recency order) is also what a process's hot tier uses.
This module is pure Python: no Ray, no I/O, no clocks except the injected one.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence


class LRU:
    """A byte budget and a recency order over keys (oldest first). ``capacity=0`` is unbounded."""

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity={capacity!r} must be an int >= 0 (0 = unbounded)")
        self.capacity = capacity
        self.used = 0
        self._order: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def add(self, key: str, size: int) -> None:
        """Insert or resize ``key`` and make it the most recently used."""
        self.used += size - self._order.pop(key, 0)
        self._order[key] = size

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> int:
        size = self._order.pop(key, 0)
        self.used -= size
        return size

    def victims(self, keep: Callable[[str], bool] = lambda k: False, extra: int = 0) -> list[str]:
        """Least recently used keys whose removal brings ``used + extra`` within
        capacity, skipping keys for which ``keep(key)`` is true (pinned ones)."""
        if not self.capacity:
            return []
        over = self.used + extra - self.capacity
        out: list[str] = []
        for key, size in self._order.items():
            if over <= 0:
                break
            if keep(key):
                continue
            out.append(key)
            over -= size
        return out


@dataclass(frozen=True)
class Order:
    """A data movement for the runtime to execute.

    demote       the shard writes these blocks to the cold tier, drops them, reports ``demoted``
    drop         the shard drops these warm copies (a copy exists below, or the block is evicted)
    delete_cold  delete these cold objects (any shard may execute it)
    ``gens`` are the shard's write generations: a shard ignores an order for an
    older copy than the one it holds (the key was put again meanwhile).
    """

    kind: str
    shard: str | None
    keys: tuple[str, ...]
    gens: tuple[int, ...] = ()


@dataclass
class Entry:
    key: str
    size: int
    shard: str | None = None   # the warm shard holding a copy
    gen: int = 0               # that shard's write generation of the copy
    ref: Any = None            # opaque handle of the warm bytes (the runtime stores a Ray ObjectRef)
    cold: bool = False         # a verified copy is in the cold tier
    moving: bool = False       # a demotion of the warm copy is under way
    last_access: float = 0.0
    pins: int = 0

    @property
    def tier(self) -> str | None:
        return "warm" if self.shard is not None else "cold" if self.cold else None


@dataclass
class _TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    demotions: int = 0
    failures: int = 0  # cold only: demotions whose cold write failed (the block left the system)
    dropped: int = 0   # blocks that left the system from this tier (no copy below)


class Placement:
    """The index and policy of warm shards + cold tier. Not thread-safe: the controller locks."""

    def __init__(self, shard_capacity: dict[str, int] | None = None, cold_capacity: int = 0,
                 cold_enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.entries: dict[str, Entry] = {}
        self.shards: dict[str, LRU] = {}
        self.cold = LRU(cold_capacity)
        self.cold_enabled = cold_enabled
        self.clock = clock
        self.counters = {"warm": _TierCounters(), "cold": _TierCounters()}
        self._leases: dict[int, tuple[list[str], float]] = {}  # lease -> (pinned keys, expiry)
        self._lease_ids = itertools.count(1)
        for sid, cap in (shard_capacity or {}).items():
            self.add_shard(sid, cap)

    # ---- shards -------------------------------------------------------
    def add_shard(self, shard: str, capacity: int) -> None:
        if shard not in self.shards:
            self.shards[shard] = LRU(capacity)

    def remove_shard(self, shard: str) -> list[str]:
        """Forget a dead shard. Its blocks with a cold copy stay (cold only);
        the others are gone. Returns the keys that left the system."""
        lru = self.shards.pop(shard, None)
        lost = []
        for key, e in list(self.entries.items()):
            if e.shard == shard:
                self._clear_warm(e)
                if not e.cold:
                    del self.entries[key]
                    lost.append(key)
        if lru is not None:
            self.counters["warm"].evictions += len(lost)
            self.counters["warm"].dropped += len(lost)
        return lost

    # ---- writes ---------------------------------------------------------
    def put_warm(self, key: str, size: int, shard: str, gen: int = 0, ref: Any = None) -> list[Order]:
        """A shard now holds ``key`` (a put, a promotion from cold, or an inventory at rebuild)."""
        if shard not in self.shards:
            raise KeyError(f"unknown shard {shard!r}")
        orders: list[Order] = []
        e = self.entries.get(key)
        if e is not None and e.shard == shard and gen and e.gen and gen < e.gen:
            # a late report of a copy this shard has since replaced (the controller runs calls concurrently and
            # Ray retries them after a controller restart): taking it would make the index name a copy the shard
            # no longer holds, so its drop/demote orders miss and the newer copy stays in the shard, uncounted
            return []
        if e is None:
            e = self.entries[key] = Entry(key, size)
        elif e.shard is not None and (e.shard != shard or e.moving):
            if e.shard != shard:  # an older copy elsewhere: drop it
                orders.append(Order("drop", e.shard, (key,), (e.gen,)))
            self._clear_warm(e)
        if e.cold and e.size != size:  # new content under the same key: the cold copy is stale
            orders += self._drop_cold(e, key)
        e.size, e.shard, e.gen, e.ref, e.moving = size, shard, gen, ref, False
        e.last_access = self.clock()
        self.shards[shard].add(key, size)
        if e.cold:
            self.cold.touch(key)
        return orders + self._enforce_shard(shard)

    def put_cold(self, key: str, size: int) -> list[Order]:
        """A verified copy of ``key`` is now in the cold tier (write-through, demotion, rebuild)."""
        if not self.cold_enabled:
            raise ValueError("the cold tier is disabled (cold_uri='')")
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = Entry(key, size, last_access=self.clock())
        e.cold = True
        self.cold.add(key, size)
        return self._enforce_cold()

    def demoted(self, key: str, shard: str, gen: int, ok: bool) -> list[Order]:
        """The shard finished a demote order for (key, gen): written to cold if ``ok``, dropped either way."""
        e = self.entries.get(key)
        if e is None:
            return [Order("delete_cold", None, (key,))] if ok else []  # deleted meanwhile
        if e.shard == shard and e.gen == gen and e.moving:
            self._clear_warm(e)
        orders: list[Order] = []
        if ok:
            self.counters["warm"].demotions += 1
            orders = self.put_cold(key, e.size)
        elif e.shard is None and not e.cold:
            del self.entries[key]  # the cold write failed and no copy is left: it left the system
            self.counters["cold"].failures += 1
            self.counters["warm"].dropped += 1
        return orders

    def forget(self, keys: Iterable[str], shard: str | None = None) -> list[Order]:
        """Readers found these warm copies gone (their shard died) or corrupt: forget them."""
        orders = []
        for key in keys:
            e = self.entries.get(key)
            if e is None or e.shard is None or (shard is not None and e.shard != shard):
                continue
            orders.append(Order("drop", e.shard, (key,), (e.gen,)))
            self._clear_warm(e)
            if not e.cold:
                del self.entries[key]
        return orders

    def forget_cold(self, keys: Iterable[str]) -> None:
        """Readers found these cold objects missing or corrupt (the cold store removed them)."""
        for key in keys:
            e = self.entries.get(key)
            if e is not None and e.cold:
                e.cold = False
                self.cold.remove(key)
                if e.shard is None:
                    del self.entries[key]

    def delete(self, keys: Iterable[str]) -> tuple[int, list[Order]]:
        orders, n = [], 0
        for key in keys:
            e = self.entries.pop(key, None)
            if e is None:
                continue
            n += 1
            if e.shard is not None:
                orders.append(Order("drop", e.shard, (key,), (e.gen,)))
                self.shards[e.shard].remove(key)
            if e.cold:
                self.cold.remove(key)
                orders.append(Order("delete_cold", None, (key,)))
        return n, _merge(orders)

    # ---- reads ----------------------------------------------------------
    def present(self, keys: Sequence[str]) -> list[bool]:
        return [k in self.entries for k in keys]

    def where(self, keys: Sequence[str]) -> list[str | None]:
        """The nearest tier of each key ("warm", "cold" or None), without counting a read."""
        return [e.tier if (e := self.entries.get(k)) is not None else None for k in keys]

    def lookup(self, keys: Sequence[str], have: Sequence[bool] = ()) -> int:
        """Number of leading keys present in any tier (``have[i]``: the caller holds key i itself)."""
        n = 0
        for i, k in enumerate(keys):
            if not (k in self.entries or (i < len(have) and have[i])):
                break
            n += 1
        return n

    def locate(self, keys: Sequence[str], pin_ttl: float | None = None,
               pin_warm: bool = True) -> tuple[list[Entry | None], int]:
        """Where each key is (a snapshot of its entry, or None), touching hits.
        With ``pin_ttl``, found keys are pinned under a new lease (returned; 0 = none);
        ``pin_warm=False`` pins only keys whose nearest copy is cold (the runtime's warm
        handles keep their bytes alive by themselves)."""
        now = self.clock()
        out: list[Entry | None] = []
        pinned = []
        warm, cold = self.counters["warm"], self.counters["cold"]
        for k in keys:
            e = self.entries.get(k)
            if e is None:
                warm.misses += 1
                cold.misses += 1 if self.cold_enabled else 0
                out.append(None)
                continue
            e.last_access = now
            if e.shard is not None:
                warm.hits += 1
                self.shards[e.shard].touch(k)
            else:
                warm.misses += 1
                cold.hits += 1
            if e.cold:
                self.cold.touch(k)
            if pin_ttl is not None and (pin_warm or e.shard is None):
                e.pins += 1
                pinned.append(k)
            out.append(Entry(k, e.size, e.shard, e.gen, e.ref, e.cold, e.moving, e.last_access, e.pins))
        lease = 0
        if pinned:
            lease = next(self._lease_ids)
            self._leases[lease] = (pinned, now + pin_ttl)
        return out, lease

    # ---- pins -----------------------------------------------------------
    def unpin(self, lease: int) -> list[Order]:
        """Release a lease (unknown or expired leases are ignored). Evicts what it held back."""
        held = self._leases.pop(lease, None)
        if held is None:
            return []
        for k in held[0]:
            e = self.entries.get(k)
            if e is not None and e.pins > 0:
                e.pins -= 1
        return self.enforce()

    def expire(self) -> list[Order]:
        """Release every lease past its expiry (a reader that died or hung)."""
        now = self.clock()
        orders = []
        for lease in [i for i, (_, expires) in self._leases.items() if expires <= now]:
            orders += self.unpin(lease)
        return orders

    @property
    def leases(self) -> int:
        return len(self._leases)

    # ---- budgets --------------------------------------------------------
    def enforce(self) -> list[Order]:
        orders = []
        for sid in list(self.shards):
            orders += self._enforce_shard(sid)
        return orders + self._enforce_cold()

    def _pinned(self, key: str) -> bool:
        e = self.entries.get(key)
        return e is not None and e.pins > 0

    def _enforce_shard(self, shard: str) -> list[Order]:
        lru = self.shards[shard]
        demote, drop = [], []
        for key in lru.victims(keep=self._pinned):
            e = self.entries[key]
            lru.remove(key)
            self.counters["warm"].evictions += 1
            if e.cold or not self.cold_enabled:
                drop.append((key, e.gen))
                self._clear_warm(e)
                if not e.cold:
                    del self.entries[key]
                    self.counters["warm"].dropped += 1
            else:  # the shard writes it down; the copy stays readable until it reports back
                e.moving = True
                demote.append((key, e.gen))
        orders = []
        if demote:
            orders.append(Order("demote", shard, *map(tuple, zip(*demote))))
        if drop:
            orders.append(Order("drop", shard, *map(tuple, zip(*drop))))
        return orders

    def _enforce_cold(self) -> list[Order]:
        gone = []
        for key in self.cold.victims(keep=self._pinned):
            e = self.entries[key]
            gone += self._drop_cold(e, key)
            self.counters["cold"].evictions += 1
            if e.shard is None:
                del self.entries[key]
                self.counters["cold"].dropped += 1
        return _merge(gone)

    def _drop_cold(self, e: Entry, key: str) -> list[Order]:
        e.cold = False
        self.cold.remove(key)
        return [Order("delete_cold", None, (key,))]

    def _clear_warm(self, e: Entry) -> None:
        if e.shard is not None and e.shard in self.shards:
            self.shards[e.shard].remove(e.key)
        e.shard, e.ref, e.moving, e.gen = None, None, False, 0

    # ---- stats ----------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        w, c = self.counters["warm"], self.counters["cold"]
        warm_cap = sum(l.capacity for l in self.shards.values())
        return {
            "warm": {"blocks": sum(len(l) for l in self.shards.values()), "bytes": sum(l.used for l in self.shards.values()),
                     "capacity_bytes": warm_cap, "hits": w.hits, "misses": w.misses, "evictions": w.evictions,
                     "demotions": w.demotions, "dropped": w.dropped},
            "cold": {"blocks": len(self.cold), "bytes": self.cold.used, "capacity_bytes": self.cold.capacity,
                     "hits": c.hits, "misses": c.misses, "evictions": c.evictions, "write_failures": c.failures,
                     "dropped": c.dropped,
                     "enabled": self.cold_enabled},
            "shards": {sid: {"blocks": len(l), "bytes": l.used, "capacity_bytes": l.capacity} for sid, l in self.shards.items()},
            "keys": len(self.entries), "leases": len(self._leases),
        }


def _merge(orders: list[Order]) -> list[Order]:
    """Coalesce orders of one kind and shard into one (one remote call each)."""
    by: dict[tuple[str, str | None], tuple[list[str], list[int]]] = {}
    for o in orders:
        keys, gens = by.setdefault((o.kind, o.shard), ([], []))
        keys.extend(o.keys)
        gens.extend(o.gens)
    return [Order(kind, shard, tuple(keys), tuple(gens)) for (kind, shard), (keys, gens) in by.items()]
