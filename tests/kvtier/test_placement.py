"""Placement policy scenarios: the index, budgets, LRU demotion, pins and leases. No Ray."""

import pytest

from kvtier.placement import LRU, Order, Placement


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def keys(n, p="k"):
    return [f"{p}{i}" for i in range(n)]


def make(shard_cap=300, cold_cap=0, cold=True, shards=("s0",)):
    clock = Clock()
    return Placement({s: shard_cap for s in shards}, cold_capacity=cold_cap, cold_enabled=cold, clock=clock), clock


def kinds(orders):
    return {(o.kind, o.shard): list(o.keys) for o in orders}


def test_lru_victims_oldest_first_and_skip_kept():
    lru = LRU(250)
    for k in "abc":
        lru.add(k, 100)
    assert lru.used == 300
    assert lru.victims() == ["a"]
    lru.touch("a")
    assert lru.victims() == ["b"]
    assert lru.victims(keep=lambda k: k == "b") == ["c"]
    assert LRU(0).victims() == []  # unbounded
    with pytest.raises(ValueError, match="capacity=-1"):
        LRU(-1)


def test_lookup_counts_leading_keys_only():
    p, _ = make()
    k = keys(4)
    for key in k[:2]:
        p.put_warm(key, 10, "s0")
    assert p.lookup(k[:3]) == 2
    p.put_warm(k[3], 10, "s0")  # a later key does not extend the prefix past the hole at k[2]
    assert p.lookup(k) == 2
    assert p.lookup(k, have=[False, False, True]) == 4  # the caller holds k[2] in its hot tier
    assert p.present(k) == [True, True, False, True]


def test_overflow_demotes_lru_to_cold_then_cold_overflow_drops():
    p, _ = make(shard_cap=300, cold_cap=200)
    k = keys(4)
    for key in k[:3]:
        assert p.put_warm(key, 100, "s0") == []
    orders = p.put_warm(k[3], 100, "s0")
    assert kinds(orders) == {("demote", "s0"): [k[0]]}
    # until the shard reports, k0 is still readable warm and still present
    assert p.lookup(k) == 4
    assert p.stats()["warm"]["bytes"] == 300
    assert p.demoted(k[0], "s0", orders[0].gens[0], ok=True) == []
    entries, _ = p.locate([k[0]])
    assert entries[0].shard is None and entries[0].cold
    st = p.stats()
    assert (st["warm"]["blocks"], st["warm"]["bytes"], st["cold"]["blocks"], st["cold"]["bytes"]) == (3, 300, 1, 100)

    # two more demotions overflow the 200-byte cold tier: the oldest cold block leaves the system
    for key in keys(2, "n"):
        (o,) = p.put_warm(key, 100, "s0")
        p.demoted(o.keys[0], "s0", o.gens[0], ok=True)
    assert p.stats()["cold"]["bytes"] == 200
    assert p.lookup([k[0]]) == 0, "k0 fell off the cold tier"
    assert p.lookup(k[1:3]) == 2, "k1, k2 went down to cold, not away"
    assert p.stats()["cold"]["evictions"] == 1


def test_nothing_is_lost_before_leaving_cold():
    p, _ = make(shard_cap=100, cold_cap=0)  # unbounded cold
    ks = keys(50)
    for key in ks:
        for o in p.put_warm(key, 100, "s0"):
            for kk, g in zip(o.keys, o.gens):
                p.demoted(kk, "s0", g, ok=True)
    assert p.lookup(ks) == 50
    st = p.stats()
    assert st["warm"]["blocks"] == 1 and st["cold"]["blocks"] == 49 and st["warm"]["demotions"] == 49


def test_failed_demotion_evicts_and_no_cold_tier_drops():
    p, _ = make(shard_cap=100)
    p.put_warm("a", 100, "s0")
    (o,) = p.put_warm("b", 100, "s0")
    p.demoted("a", "s0", o.gens[0], ok=False)  # cold write failed: a is gone, counted
    assert p.present(["a", "b"]) == [False, True]
    assert p.stats()["warm"]["evictions"] == 1 and p.stats()["cold"]["write_failures"] == 1

    q, _ = make(shard_cap=100, cold=False)
    q.put_warm("a", 100, "s0")
    assert kinds(q.put_warm("b", 100, "s0")) == {("drop", "s0"): ["a"]}
    assert q.present(["a"]) == [False]


def test_block_already_in_cold_is_dropped_from_warm_not_rewritten():
    p, _ = make(shard_cap=100)
    p.put_cold("a", 100)
    p.put_warm("a", 100, "s0", gen=7, version=p.entries["a"].version)  # promotion of a cold hit
    assert kinds(p.put_warm("b", 100, "s0")) == {("drop", "s0"): ["a"]}
    entries, _ = p.locate(["a"])
    assert entries[0].tier == "cold"


def test_pins_protect_a_block_under_a_reader_and_leases_expire():
    p, clock = make(shard_cap=200)
    p.put_warm("a", 100, "s0")
    p.put_warm("b", 100, "s0")
    entries, lease = p.locate(["a"], pin_ttl=30)
    assert lease and entries[0].pins == 1
    p.put_warm("b", 100, "s0")  # b is now the most recent: a is the LRU victim, but pinned
    assert kinds(p.put_warm("c", 100, "s0")) == {("demote", "s0"): ["b"]}
    assert p.stats()["warm"]["bytes"] == 200
    # a reader that dies never unpins; 31 s later its lease expires and a can go
    clock.t += 29
    assert p.expire() == [] and p.leases == 1
    clock.t += 2
    assert p.expire() == [] and p.leases == 0  # within budget: nothing to move yet
    assert kinds(p.put_warm("d", 100, "s0")) == {("demote", "s0"): ["a"]}


def test_unpin_releases_a_pin():
    p, _ = make(shard_cap=100)
    p.put_warm("a", 100, "s0")
    _, lease = p.locate(["a"], pin_ttl=10)
    # the only other candidate is the new block itself: the budget holds, b goes down, pinned a stays
    assert kinds(p.put_warm("b", 100, "s0")) == {("demote", "s0"): ["b"]}
    assert p.present(["a"]) == [True] and p.stats()["warm"]["bytes"] == 100
    assert p.unpin(lease) == []
    assert p.unpin(lease) == []  # a second unpin of the same lease does nothing
    assert kinds(p.put_warm("c", 100, "s0")) == {("demote", "s0"): ["a"]}


def test_repeated_put_moves_copy_and_stale_order_is_harmless():
    p, _ = make(shards=("s0", "s1"))
    p.put_warm("a", 10, "s0", gen=1)
    orders = p.put_warm("a", 10, "s1", gen=4)  # put again, landed on the other shard
    assert orders == [Order("drop", "s0", ("a",), (1,))]
    assert p.stats()["shards"]["s0"]["bytes"] == 0 and p.stats()["shards"]["s1"]["bytes"] == 10
    # a late report about the old copy does not clear the new one
    p.demoted("a", "s0", 1, ok=False)
    entries, _ = p.locate(["a"])
    assert entries[0].shard == "s1"


def test_dead_shard_forgets_its_blocks_but_keeps_cold_copies():
    p, _ = make(shards=("s0", "s1"))
    p.put_warm("a", 10, "s0")
    p.put_warm("b", 10, "s0")
    p.put_cold("b", 10)
    p.put_warm("c", 10, "s1")
    assert sorted(p.remove_shard("s0")) == ["a"]
    p.add_shard("s0", 300)
    assert p.present(["a", "b", "c"]) == [False, True, True]
    entries, _ = p.locate(["b"])
    assert entries[0].tier == "cold"


def test_forget_and_delete():
    p, _ = make()
    p.put_warm("a", 10, "s0", gen=2)
    p.put_warm("b", 10, "s0", gen=3)
    p.put_cold("b", 10)
    assert p.forget(["a", "b"]) == [Order("drop", "s0", ("a",), (2,)), Order("drop", "s0", ("b",), (3,))]
    assert p.present(["a", "b"]) == [False, True]
    n, orders = p.delete(["b", "zz"])
    assert n == 1 and kinds(orders) == {("delete_cold", None): ["b"]}
    assert p.stats()["keys"] == 0 and p.stats()["cold"]["bytes"] == 0


def test_hits_and_misses_per_tier():
    p, _ = make()
    p.put_warm("a", 10, "s0")
    p.put_cold("b", 10)
    p.locate(["a", "b", "c"])
    st = p.stats()
    assert (st["warm"]["hits"], st["warm"]["misses"]) == (1, 2)
    assert (st["cold"]["hits"], st["cold"]["misses"]) == (1, 1)


def test_cold_disabled_rejects_cold_writes():
    p, _ = make(cold=False)
    with pytest.raises(ValueError, match="cold tier is disabled"):
        p.put_cold("a", 1)
    with pytest.raises(KeyError, match="unknown shard"):
        p.put_warm("a", 1, "nope")


def test_locate_can_pin_only_cold_copies():
    p, _ = make()
    p.put_warm("w", 10, "s0")
    p.put_cold("c", 10)
    entries, lease = p.locate(["w", "c", "x"], pin_ttl=5, pin_warm=False)
    assert [e.pins if e else None for e in entries] == [0, 1, None] and lease
    _, lease2 = p.locate(["w"], pin_ttl=5, pin_warm=False)
    assert lease2 == 0, "nothing pinned, no lease to release"


def test_late_report_of_a_replaced_copy_is_ignored():
    # after a controller restart Ray retries a shard's register calls, and the controller runs calls concurrently:
    # the report of gen 3 can arrive after the one of gen 5 that replaced it in the shard
    p, _ = make(shard_cap=200)
    p.put_warm("a", 100, "s0", gen=5, ref="new")
    assert p.put_warm("a", 100, "s0", gen=3, ref="old") == []
    entries, _ = p.locate(["a"])
    assert (entries[0].gen, entries[0].ref) == (5, "new")
    p.put_warm("b", 100, "s0", gen=6)
    # the eviction order names the copy the shard really holds, so the shard demotes it
    assert p.put_warm("c", 100, "s0", gen=7) == [Order("demote", "s0", ("a",), (5,))]


# ---------------------------------------------------------------- issue 9: the versioned index
def test_issue9_1_an_overwrite_invalidates_the_cold_copy_of_the_same_size():
    p, _ = make(shard_cap=100)
    p.put_warm("k", 100, "s0", gen=1)  # A
    (o,) = p.put_warm("x", 100, "s0", gen=2)  # A demoted
    assert kinds([o]) == {("demote", "s0"): ["k"]}
    p.demoted("k", "s0", 1, ok=True, version=p.entries["k"].version)
    v_a = p.entries["k"].version
    orders = p.put_warm("k", 100, "s0", gen=3)  # B: same size, new content
    assert Order("delete_cold", None, ("k",), (v_a,)) in orders, "the cold copy of A is stale"
    # B is evicted: demoted (it has no copy below), never dropped "because a cold copy exists"
    assert kinds(p.put_warm("y", 100, "s0", gen=4)) == {("demote", "s0"): ["k"]}
    assert not p.entries["k"].cold


def test_issue9_1_a_late_demotion_report_of_an_older_version_is_refused():
    p, _ = make(shard_cap=100)
    p.put_warm("k", 100, "s0", gen=1)
    v_a = p.entries["k"].version
    p.put_warm("x", 100, "s0", gen=2)  # A demotion ordered
    p.put_warm("k", 100, "s0", gen=3)  # B lands during the demotion
    assert p.demoted("k", "s0", 1, ok=True, version=v_a) == [Order("delete_cold", None, ("k",), (v_a,))]
    e = p.entries["k"]
    assert e.shard == "s0" and e.gen == 3 and not e.cold, "B stays the current version, A's object is deleted"


def test_issue9_2_a_late_promotion_never_replaces_a_newer_put():
    p, _ = make(shards=("s0", "s1"))
    p.put_cold("k", 10)
    v_a = p.entries["k"].version
    p.put_warm("k", 10, "s0", gen=5, ref="B")  # a newer put
    assert p.put_warm("k", 10, "s1", gen=1, ref="A", version=v_a) == [Order("drop", "s1", ("k",), (1,))]
    (e,), _ = p.locate(["k"])
    assert e.ref == "B" and p.stats()["stale_copies"] == 1


def test_issue9_3_a_delete_leaves_a_tombstone_that_outlives_in_flight_copies():
    p, clock = make()
    p.put_cold("k", 10)
    v = p.entries["k"].version
    p.delete(["k"])
    assert p.put_warm("k", 10, "s0", gen=1, version=v) == [Order("drop", "s0", ("k",), (1,))], "late promotion"
    assert p.put_cold("k", 10, v, adopt=True) == [Order("delete_cold", None, ("k",), (v,))], "late listing"
    assert p.present(["k"]) == [False]
    p.put_warm("k", 10, "s0", gen=2)  # a new put after the delete is a new version: taken
    assert p.present(["k"]) == [True] and "k" not in p.tombstones
    p.delete(["k"])
    clock.t += p.tombstone_ttl + 1
    p.expire()
    assert "k" not in p.tombstones, "tombstones are bounded by a TTL"
    p.listing_pending = True
    p.delete(["j"])
    clock.t += p.tombstone_ttl + 1
    p.expire()
    assert "j" in p.tombstones, "kept while a cold listing may still report the key"


def test_change_log_names_every_key_whose_warm_copy_stopped_being_current():
    import kvtier.placement as P

    p, _ = make(shard_cap=300, cold_cap=10_000, shards=("s0", "s1"))
    p.write("a", 100, "s0", 1, ref="ra")
    p.write("b", 100, "s0", 1, ref="rb")
    p.write("c", 100, "s1", 1, ref="rc")
    s0 = p.change_seq
    assert p.changes(s0) == [] and s0 == 0, "new keys change no copy a reader could hold"
    p.write("a", 100, "s1", 2, ref="ra2")  # overwritten elsewhere: the old handle is stale
    assert p.changes(s0) == ["a"]
    _, orders = p.write("d", 250, "s0", 2, ref="rd")  # over s0's budget: "b" is demoted (still readable until done)
    assert ("demote", "s0") in kinds(orders) and p.changes(s0) == ["a"]
    p.demoted("b", "s0", 1, ok=True)
    assert sorted(p.changes(s0)) == ["a", "b"]
    s1 = p.change_seq
    p.delete(["c"])
    p.remove_shard("s0")  # "d" was there
    assert sorted(p.changes(s1)) == ["c", "d"] and p.changes(p.change_seq) == []
    assert p.changes(-1) is None and p.changes(p.change_seq + 1) is None and p.changes("0") is None
    small, _ = make()
    small._changes = P.deque(maxlen=2)
    for i in range(3):
        small.write("x", 10, "s0", 1 + 2 * i, ref=i)
        small.write("x", 10, "s0", 2 + 2 * i, ref=i)
    assert small.changes(small.change_seq - 2) == ["x"] and small.changes(small.change_seq - 3) is None, \
        "a reader further behind than the log reaches is told to distrust everything"


def test_location_cache_keeps_only_answers_it_can_check_and_distrusts_all_on_doubt():
    from kvtier.runtime.location import Location
    from kvtier.runtime.location_cache import LocationCache

    warm = {k: Location(k, 10, "s0", ref=f"ref-{k}") for k in "abc"}
    lc = LocationCache(max_entries=2)
    lc.learn(dict(warm, d=Location("d", 10, None, cold=True), e=None), "inc1", 5)  # cold and absent: not kept
    got, seq, inc = lc.take(list("abcde"))
    assert set(got) == {"b", "c"} and (seq, inc) == (5, "inc1"), "bounded (LRU), warm entries only"
    assert lc.apply("inc1", 7, ["b"]) == {"b"} and set(lc.take(list("abc"))[0]) == {"c"} and lc.seq == 7
    lc.learn({"a": warm["a"]}, "inc1", 6)  # answered before change 7, which the cache has consumed: not kept
    assert not lc.take(["a"])[0]
    lc.learn({"a": warm["a"]}, "inc1", 7)
    assert set(lc.take(["a", "c"])[0]) == {"a", "c"}
    assert lc.apply("inc1", 9, None) is None and len(lc) == 0, "the log no longer reaches back: all distrusted"
    lc.learn({"a": warm["a"]}, "inc1", 9)
    assert lc.apply("inc2", 0, []) is None and len(lc) == 0, "a restarted controller: nothing learned holds"
    lc.learn({"a": warm["a"]}, "inc1", 50)  # an answer of the old controller arriving late: resets, then kept
    assert lc.incarnation == "inc1" and lc.take(["a"])[0]
    lc.drop(["a"])
    assert not lc.take(["a"])[0]
    with pytest.raises(ValueError, match="max_entries=-1"):
        LocationCache(-1)
