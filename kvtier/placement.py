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

Versions: every write (a put) gets a version from ``next_version`` (strictly
increasing, floored at wall-clock nanoseconds so a restarted controller never
hands out a version an older copy already carries). The index holds one version
per key; a copy in any tier (a warm shard, a cold object) is valid only for the
version it was written from. A promotion, a demotion report, a shard's inventory
or a cold listing applies only if its version is still the key's current one
(or, at a rebuild, newer); otherwise the answer is an order to drop or delete
that stale copy. A delete leaves a tombstone (the version at deletion) so a copy
of the deleted data that is still in flight (a promotion, a late demotion, a cold
listing retried after an outage) cannot bring the key back. Tombstones expire
after ``tombstone_ttl`` seconds (longer than any in-flight call: those are
bounded by ``rpc_timeout_s``) or beyond ``max_tombstones``, oldest first, and
never while ``listing_pending`` (a cold listing that may still report them).

Change log: every time a key's warm copy stops being the one the index names
(dropped, demoted, replaced by a newer put, forgotten, deleted, its shard gone)
the key is appended to a bounded log under a new sequence number
(``change_seq``); ``changes(since)`` answers which keys changed after a given
number, so a client's cache of warm locations can check that an entry it used is
still current without asking where every key is (``kvtier.runtime.location_cache``).

Pins protect blocks under a reader; each pin belongs to a lease that expires
after ``ttl`` seconds, so a reader that dies cannot pin a block forever.

``LRU`` (one byte budget + recency order) is also what a process's hot tier uses.
This module is pure Python: no Ray, no I/O, no clocks except the injected one.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence


CHANGE_LOG = 1 << 16  # keys whose warm copy changed, newest last; a reader further behind is told "all" (None)


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


ALL_VERSIONS = -1  # a delete_cold "version" meaning every object of the key


@dataclass(frozen=True)
class Order:
    """A data movement for the runtime to execute.

    demote       the shard writes these blocks to the cold tier, drops them, reports ``demoted``
    drop         the shard drops these warm copies (a copy exists below, the block is evicted, or the
                 copy is stale: its version is not the key's current one)
    delete_cold  delete these cold objects (any shard may execute it)
    ``gens`` of demote/drop are the shard's write generations: a shard ignores an order for an
    older copy than the one it holds (the key was put again meanwhile). ``gens`` of delete_cold
    are the versions of the objects to delete (each version is its own object).
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
    cold: bool = False         # a verified copy of this version is in the cold tier
    moving: bool = False       # a demotion of the warm copy is under way
    last_access: float = 0.0
    pins: int = 0
    version: int = 0           # the write this entry's copies hold

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
                 cold_enabled: bool = True, clock: Callable[[], float] = time.monotonic,
                 version_floor: Callable[[], int] = time.time_ns, tombstone_ttl: float = 600.0,
                 max_tombstones: int = 1 << 20) -> None:
        self.entries: dict[str, Entry] = {}
        self.shards: dict[str, LRU] = {}
        self.cold = LRU(cold_capacity)
        self.cold_enabled = cold_enabled
        self.clock = clock
        self.counters = {"warm": _TierCounters(), "cold": _TierCounters()}
        self._leases: dict[int, tuple[list[str], float]] = {}  # lease -> (pinned keys, expiry)
        self._lease_ids = itertools.count(1)
        self._version = 0
        self._version_floor = version_floor
        # key -> (version at deletion, expiry); 1M tombstones of 40-char keys are ~150 MB at most
        self.tombstones: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.tombstone_ttl = tombstone_ttl
        self.max_tombstones = max_tombstones
        self.listing_pending = False  # a cold listing may still report objects: keep every tombstone
        self.stale = 0  # copies refused because their version was not current (or deleted)
        self.change_seq = 0  # the number of the last entry in ``_changes``
        self._changes: deque[str] = deque(maxlen=CHANGE_LOG)
        for sid, cap in (shard_capacity or {}).items():
            self.add_shard(sid, cap)

    # ---- versions -------------------------------------------------------
    def next_version(self) -> int:
        self._version = max(self._version + 1, int(self._version_floor()))
        return self._version

    def _seen(self, version: int) -> None:
        self._version = max(self._version, version)

    def _deleted(self, key: str, version: int) -> bool:
        t = self.tombstones.get(key)
        return t is not None and version <= t[0]

    def expire_tombstones(self) -> None:
        now = self.clock()
        while self.tombstones and (len(self.tombstones) > self.max_tombstones or
                                   (not self.listing_pending and next(iter(self.tombstones.values()))[1] <= now)):
            self.tombstones.popitem(last=False)

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
    def write(self, key: str, size: int, shard: str, gen: int = 0, ref: Any = None) -> tuple[int, list[Order]]:
        """A put: ``shard`` now holds new content of ``key``. Returns (its new version, orders);
        version 0 means the report was refused (a late report of a copy the shard has since replaced)."""
        if shard not in self.shards:
            raise KeyError(f"unknown shard {shard!r}")
        e = self.entries.get(key)
        if e is not None and e.shard == shard and gen and e.gen and gen < e.gen:
            # a late report of a copy this shard has since replaced (the controller runs calls concurrently and
            # Ray retries them after a controller restart): taking it would make the index name a copy the shard
            # no longer holds, so its drop/demote orders miss and the newer copy stays in the shard, uncounted
            return 0, []
        version = self.next_version()
        self.tombstones.pop(key, None)
        return version, self._replace(key, size, version, shard, gen, ref)

    def put_warm(self, key: str, size: int, shard: str, gen: int = 0, ref: Any = None,
                 version: int | None = None, adopt: bool = False) -> list[Order]:
        """A shard holds a copy of ``key`` at ``version`` (a promotion from cold, or an inventory at a
        rebuild when ``adopt``). It is taken only if ``version`` is the key's current one (or, with
        ``adopt``, newer than what the index knows); otherwise the answer orders the shard to drop it.
        ``version=None`` is a put (``write``)."""
        if version is None:
            return self.write(key, size, shard, gen, ref)[1]
        if shard not in self.shards:
            raise KeyError(f"unknown shard {shard!r}")
        refuse = [Order("drop", shard, (key,), (gen,))]
        e = self.entries.get(key)
        if self._deleted(key, version) or (e is None and not adopt) or (e is not None and version < e.version):
            self.stale += 1
            return refuse
        self._seen(version)
        if e is None or version > e.version:
            if not adopt:
                self.stale += 1
                return refuse
            return self._replace(key, size, version, shard, gen, ref)
        # the current version
        if e.shard is not None and e.shard != shard:
            self.stale += 1  # one warm copy per version: keep the one the index names
            return refuse
        if e.shard == shard and e.gen and gen and gen < e.gen:
            return []  # an older copy of the same version, already replaced in the shard
        if e.shard is not None:  # a newer copy of the same version in the same shard: the old handle is stale
            self._changed(key)
        e.shard, e.gen, e.ref, e.moving = shard, gen, ref, False
        e.last_access = self.clock()
        self.shards[shard].add(key, e.size)
        if e.cold:
            self.cold.touch(key)
        return self._enforce_shard(shard)

    def _replace(self, key: str, size: int, version: int, shard: str, gen: int, ref: Any) -> list[Order]:
        """Make ``key`` name new content (``version``) held by ``shard``; order every older copy away."""
        orders: list[Order] = []
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = Entry(key, size)
        else:
            if e.shard is not None and e.shard != shard:  # an older copy elsewhere: drop it
                orders.append(Order("drop", e.shard, (key,), (e.gen,)))
            self._clear_warm(e)  # on the same shard the new copy replaced the old one there
            if e.cold:  # the cold object holds the older version: it is stale whatever its size
                orders += self._drop_cold(e, key)
        e.size, e.shard, e.gen, e.ref, e.moving, e.version = size, shard, gen, ref, False, version
        e.last_access = self.clock()
        self.shards[shard].add(key, size)
        return orders + self._enforce_shard(shard)

    def put_cold(self, key: str, size: int, version: int | None = None, adopt: bool = True) -> list[Order]:
        """A verified copy of ``key`` at ``version`` is now in the cold tier (a demotion, a write-through,
        a listing at rebuild when ``adopt``). Taken only if ``version`` is current (with ``adopt``: or newer
        than the index knows, or the key is unknown); otherwise the answer deletes that stale object.
        ``version=None``: the entry's current version (a new one for an unknown key)."""
        if not self.cold_enabled:
            raise ValueError("the cold tier is disabled (cold_uri='')")
        e = self.entries.get(key)
        if version is None:
            version = e.version if e is not None else self.next_version()
        stale = [Order("delete_cold", None, (key,), (version,))]
        if self._deleted(key, version) or (e is not None and version < e.version) or (e is None and not adopt):
            self.stale += 1
            return stale
        self._seen(version)
        orders: list[Order] = []
        if e is None:
            e = self.entries[key] = Entry(key, size, last_access=self.clock(), version=version)
        elif version > e.version:
            if not adopt:
                self.stale += 1
                return stale
            if e.shard is not None:  # the warm copy is older than this cold object
                orders.append(Order("drop", e.shard, (key,), (e.gen,)))
                self._clear_warm(e)
            if e.cold:
                orders += self._drop_cold(e, key)
            e.size, e.version = size, version
        e.cold = True
        self.cold.add(key, e.size)
        return orders + self._enforce_cold()

    def demoted(self, key: str, shard: str, gen: int, ok: bool, version: int | None = None) -> list[Order]:
        """The shard finished a demote order for (key, gen): written to cold as ``version`` if ``ok``,
        dropped either way. A report about a version that is no longer current deletes what it wrote."""
        e = self.entries.get(key)
        if e is None or (version is not None and version != e.version):
            if ok and version is not None:
                return [Order("delete_cold", None, (key,), (version,))]  # deleted or overwritten meanwhile
            return [Order("delete_cold", None, (key,), (ALL_VERSIONS,))] if ok and e is None else []
        if e.shard == shard and e.gen == gen and e.moving:
            self._clear_warm(e)
        orders: list[Order] = []
        if ok:
            self.counters["warm"].demotions += 1
            orders = self.put_cold(key, e.size, e.version)
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

    def forget_cold(self, keys: Iterable[str], versions: Sequence[int] = ()) -> None:
        """Readers found these cold objects (of ``versions[i]`` when given) missing or corrupt."""
        for i, key in enumerate(keys):
            e = self.entries.get(key)
            if e is not None and e.cold and (i >= len(versions) or versions[i] == e.version):
                e.cold = False
                self.cold.remove(key)
                if e.shard is None:
                    del self.entries[key]

    def delete(self, keys: Iterable[str]) -> tuple[int, list[Order]]:
        """Remove ``keys`` from every tier and leave a tombstone for each (also for keys not in the
        index: a cold listing still under way may report them later)."""
        orders, n = [], 0
        now = self.clock()
        for key in keys:
            self.tombstones.pop(key, None)
            self.tombstones[key] = (self.next_version(), now + self.tombstone_ttl)
            e = self.entries.pop(key, None)
            if e is None:
                continue
            n += 1
            if e.shard is not None:
                orders.append(Order("drop", e.shard, (key,), (e.gen,)))
                self._clear_warm(e)
            if e.cold:
                self.cold.remove(key)
                orders.append(Order("delete_cold", None, (key,), (e.version,)))
        self.expire_tombstones()
        return n, _merge(orders)

    # ---- reads ----------------------------------------------------------
    def present(self, keys: Sequence[str]) -> list[bool]:
        return [k in self.entries for k in keys]

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
            out.append(Entry(k, e.size, e.shard, e.gen, e.ref, e.cold, e.moving, e.last_access, e.pins, e.version))
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
        """Release every lease past its expiry (a reader that died or hung); expire old tombstones."""
        self.expire_tombstones()
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
        return [Order("delete_cold", None, (key,), (e.version,))]

    def _clear_warm(self, e: Entry) -> None:
        if e.shard is not None:
            self._changed(e.key)
            if e.shard in self.shards:
                self.shards[e.shard].remove(e.key)
        e.shard, e.ref, e.moving, e.gen = None, None, False, 0

    # ---- change log -----------------------------------------------------
    def _changed(self, key: str) -> None:
        self.change_seq += 1
        self._changes.append(key)

    def changes(self, since: int) -> list[str] | None:
        """Keys whose warm copy changed after change number ``since`` (each at most once, any order);
        None if the log no longer reaches back that far (the caller must then distrust everything)."""
        if not isinstance(since, int) or since < 0 or since > self.change_seq:
            return None  # not a number this index gave out (e.g. from a controller before a restart)
        first = self.change_seq - len(self._changes) + 1  # the number of the oldest entry kept
        if since + 1 < first:
            return None
        return list(set(itertools.islice(self._changes, since + 1 - first, None)))

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
            "keys": len(self.entries), "leases": len(self._leases), "tombstones": len(self.tombstones),
            "stale_copies": self.stale,
        }


def _merge(orders: list[Order]) -> list[Order]:
    """Coalesce orders of one kind and shard into one (one remote call each)."""
    by: dict[tuple[str, str | None], tuple[list[str], list[int]]] = {}
    for o in orders:
        keys, gens = by.setdefault((o.kind, o.shard), ([], []))
        keys.extend(o.keys)
        gens.extend(o.gens)
    return [Order(kind, shard, tuple(keys), tuple(gens)) for (kind, shard), (keys, gens) in by.items()]
