"""Property test of the versioned index: random interleavings of put / overwrite / delete / get /
demote / promote over ``kvtier.placement.Placement``, with every message between controller and
shards (registers, promotions, demotion reports, orders) delivered late and out of order.
Every get must return the latest write of its key, or a miss. Pure Python, no Ray."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.placement import ALL_VERSIONS, Placement

KEYS = ("a", "b")
SHARDS = ("s0", "s1")
DELETED = object()


class World:
    """Two shards and a cold store as dicts; the controller's Placement; a queue of messages in flight."""

    def __init__(self, shard_cap: int, cold_cap: int) -> None:
        self.t = 0.0
        self.v = 0
        self.p = Placement({s: shard_cap for s in SHARDS}, cold_capacity=cold_cap, clock=lambda: self.t,
                           version_floor=lambda: 0, tombstone_ttl=1e9)
        self.shard = {s: {} for s in SHARDS}  # key -> [gen, version, data]
        self.gens = {s: 0 for s in SHARDS}
        self.cold: dict[tuple[str, int], object] = {}
        self.latest: dict[str, object] = {}
        self.inflight: list[tuple] = []
        self.n = 0

    # ---- the shard side ------------------------------------------------
    def _store(self, s, key, data, version):
        self.gens[s] += 1
        self.shard[s][key] = [self.gens[s], version, data]
        return self.gens[s]

    def _orders(self, orders):
        for o in orders:
            self.inflight.append(("order", o))

    def _run_order(self, o):
        if o.kind == "delete_cold":
            for key, v in zip(o.keys, o.gens):
                for kv in [kv for kv in self.cold if kv[0] == key and (v == ALL_VERSIONS or kv[1] == v)]:
                    del self.cold[kv]
            return
        items = self.shard[o.shard]
        for key, gen in zip(o.keys, o.gens):
            it = items.get(key)
            if o.kind == "drop":
                if it is not None and (not gen or it[0] == gen):
                    del items[key]
            elif o.kind == "demote":
                ok = it is not None and it[0] == gen
                if ok:
                    self.cold[(key, it[1])] = it[2]
                    del items[key]
                self.inflight.append(("demoted", key, o.shard, gen, ok, it[1] if ok else None))

    # ---- operations ----------------------------------------------------
    def put(self, key, s):
        self.n += 1
        # the put travels to its shard; the shard stores and registers under one lock (Shard.store), so
        # one shard's registers reach the controller in order, while shards race each other
        self.inflight.append(("register", key, s, (key, self.n)))

    def delete(self, key):
        _, orders = self.p.delete([key])
        self.latest[key] = DELETED
        self._orders(orders)

    def promote(self, key, s):
        (e,), _ = self.p.locate([key])
        if e is not None and e.shard is None and e.cold and (key, e.version) in self.cold:
            self.inflight.append(("promote", key, s, e.version, self.cold[(key, e.version)]))

    def deliver(self, i):
        if not self.inflight:
            return
        m = self.inflight.pop(i % len(self.inflight))
        if m[0] == "order":
            self._run_order(m[1])
        elif m[0] == "register":
            _, key, s, data = m
            gen = self._store(s, key, data, None)
            version, orders = self.p.write(key, 10, s, gen, ref=data)
            it = self.shard[s].get(key)
            if version:
                self.latest[key] = data
                if it is not None and it[0] == gen:
                    it[1] = version
            elif it is not None and it[0] == gen:
                del self.shard[s][key]
            self._orders(orders)
        elif m[0] == "promote":
            _, key, s, version, data = m
            if key in self.shard[s]:
                return  # Shard.store: a promotion never replaces a copy the shard holds (it may be newer)
            gen = self._store(s, key, data, version)
            self._orders(self.p.put_warm(key, 10, s, gen, ref=data, version=version))
        elif m[0] == "demoted":
            _, key, s, gen, ok, version = m
            self._orders(self.p.demoted(key, s, gen, ok, version))

    def get(self, key):
        (e,), _ = self.p.locate([key])
        if e is None:
            return
        if e.ref is not None:
            got = e.ref  # a Ray ObjectRef keeps the bytes it was registered with
        else:
            assert e.cold, "an entry with no warm copy must have a cold one"
            got = self.cold.get((key, e.version))
            if got is None:
                return  # the object was deleted under the reader: a miss
        want = self.latest.get(key)
        assert want is not DELETED, f"get({key}) returned deleted data {got}"
        assert got == want, f"get({key}) returned {got}, the latest write is {want}"


OPS = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.sampled_from(SHARDS)),
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.just("s0")),
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("promote"), st.sampled_from(KEYS), st.sampled_from(SHARDS)),
    st.tuples(st.just("deliver"), st.integers(0, 50)),
    st.tuples(st.just("deliver"), st.just(0)),
    st.tuples(st.just("deliver"), st.just(0)),
    st.tuples(st.just("promote"), st.sampled_from(KEYS), st.just("s1")),
    st.tuples(st.just("deliver_all"),),
    st.tuples(st.just("tick"),),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=8, max_size=40), shard_cap=st.sampled_from([10, 20]), cold_cap=st.sampled_from([0, 20]))
def test_every_get_returns_the_latest_write_or_a_miss(ops, shard_cap, cold_cap):
    w = World(shard_cap, cold_cap)
    for op in ops:
        if op[0] == "deliver_all":
            while w.inflight:
                w.deliver(0)
        elif op[0] == "tick":
            w.t += 1.0
            w._orders(w.p.expire())
        else:
            getattr(w, op[0])(*op[1:])
        for key in KEYS:
            w.get(key)
    while w.inflight:  # at rest, the index and the shards agree on every byte count
        w.deliver(0)
    for s in SHARDS:
        assert w.p.shards[s].used == 10 * len(w.shard[s]), (s, w.shard[s], w.p.entries)
    for key in KEYS:
        w.get(key)
