"""The tier on a real local Ray, through the public API: round trips, budgets, faults.

Every test shares the session's Ray (tests/rayfixture.py) and makes its own
tier in its own namespace (a controller and shards, ~2-4 s to start), stopped
at the end. Multi-process and multi-node scenarios are in test_runtime_cluster.py.
"""

from __future__ import annotations

import contextlib
import itertools
import time

import pytest
import torch

import kvtier
from kvtier.runtime import api
from waiting import wait_for

pytestmark = pytest.mark.ray

_ns = itertools.count()
SHAPE = (2, 2, 2, 256, 64)  # layers, K/V, kv heads, tokens, head_dim: 256 KiB raw in fp32


def kv_of(i: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(SHAPE, generator=g).to(dtype)


def keys_of(n: int, model: str = "test") -> list[str]:
    return kvtier.chunk_keys(list(range(256 * n)), model, chunk_tokens=256)


@contextlib.contextmanager
def tier(**cfg):
    base = dict(codec="none", cold_uri="", hot_bytes="64MiB", warm_bytes="64MiB", num_shards=2, rpc_timeout_s=5.0)
    base.update(cfg)
    info = kvtier.init(namespace=f"kvt-test-{next(_ns)}", config=base)
    try:
        yield info
    finally:
        kvtier.shutdown(stop=True)


def where(key: str) -> str | None:
    import ray

    bound = api._get_client()._keys([key])  # the tenant-bound key the tiers store
    loc = ray.get(api._get_client().controller.locate.remote(bound, pin=False), timeout=10)[0][0]
    return loc and loc.tier


@pytest.fixture(scope="module")
def warm_only(ray_session):
    """A tier whose hot tier is off (hot_bytes=0): every get goes to a warm shard."""
    with tier(hot_bytes=0) as info:
        yield info


def test_ray_init_gets_its_own_randomness_and_puts_the_callers_back(monkeypatch):
    """Ray draws its GCS subscriber ids from ``random``; an engine that seeded it (vLLM: seed=0) must not make two
    processes subscribe under one id (they evicted each other's polls thousands of times a second)."""
    import random

    import ray

    drawn = []
    monkeypatch.setattr(ray, "init", lambda **kw: drawn.append(random.getrandbits(224)))
    for _ in range(2):  # two "engines", both seeded alike
        random.seed(0)
        api._ray_init(address="auto")
        assert random.getrandbits(32) == random.Random(0).getrandbits(32), "the caller's random state is restored"
    assert drawn[0] != drawn[1] and random.Random(0).getrandbits(224) not in drawn


def test_bad_config_is_rejected_naming_the_value():
    with pytest.raises(ValueError, match="warm_bytes='lots'"):
        kvtier.init(config={"warm_bytes": "lots"})
    with pytest.raises(ValueError, match="unknown TierConfig field"):
        kvtier.init(config={"warm_byte": 1})
    with pytest.raises(kvtier.KvtierError, match="not initialized"):
        kvtier.get(keys_of(1)[0])


def test_round_trip_every_codec_through_a_warm_shard(warm_only):
    codecs = kvtier.list_codecs() + ["none+zstd"]
    assert "none" in codecs
    for n, codec in enumerate(codecs):
        k = keys_of(1, model=f"codec-{codec}")[0]
        kv = kv_of(n, torch.bfloat16)
        expected = kvtier.decompress(kvtier.compress(kv, codec, key=k))  # what the codec itself gives back
        kvtier.put(k, kv, codec=codec)
        api._get_client().flush()  # stored: the get below reads the shard, not this process's store queue
        out = kvtier.get(k)
        assert out is not None, codec
        assert out.dtype == kv.dtype and out.shape == kv.shape
        assert torch.equal(out, expected), f"{codec}: the tier changed what the codec decodes"
        if kvtier.get_codec(codec).lossless:
            assert torch.equal(out, kv), codec
    st = kvtier.stats()
    assert st["hot"]["blocks"] == 0 and st["warm"]["hits"] >= len(codecs)


def test_scenario_put_lookup_get_delete(warm_only):
    k = keys_of(4, model="scenario")
    kvs = [kv_of(i) for i in range(4)]
    kvtier.put(k[:2], kvs[:2])
    assert kvtier.lookup(k[:3]) == 2
    assert kvtier.contains(k[1]) and not kvtier.contains(k[2])
    out = kvtier.get(k)
    assert torch.equal(out[0], kvs[0]) and torch.equal(out[1], kvs[1]) and out[2] is None and out[3] is None
    out[0].add_(1.0)  # the caller owns what get returns: writing into it must not change the tier
    assert torch.equal(kvtier.get(k[0]), kvs[0])
    kvtier.put(k[3], kvs[3])
    assert kvtier.lookup(k) == 2, "a hole at k[2] ends the prefix"
    assert kvtier.delete(k[:1]) == 1
    assert kvtier.lookup(k) == 0 and kvtier.get(k[0]) is None
    assert kvtier.get(k[1]) is not None


def test_bad_arguments_get_clear_errors(warm_only):
    k = keys_of(2, model="bad")
    with pytest.raises(ValueError, match="2 keys and 1 tensors"):
        kvtier.put(k, [kv_of(0)])
    with pytest.raises(ValueError, match="kv has 3 dims"):
        kvtier.put(k[0], torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="not a valid key"):
        kvtier.get(["a/b"])
    with pytest.raises(kvtier.CodecError, match="unknown codec 'nope'"):
        kvtier.put(k[0], kv_of(0), codec="nope")
    with pytest.raises(ValueError, match="batch of 4097 keys exceeds the maximum batch size"):
        kvtier.lookup([k[0]] * 4097)
    assert kvtier.lookup(k) == 0, "nothing was stored by the failed puts"


def test_cached_locations_skip_locate_and_a_changed_copy_is_never_served(warm_only, monkeypatch):
    """A repeat warm get reads the location cache (no locate call); another writer's put or delete of a cached
    key, seen by the changes check of the same get, makes it the new content or a miss, never the old copy;
    the sync thread drops entries of blocks that left their shard (their ObjectRefs pin nothing after)."""
    import ray

    from kvtier.runtime.client import Client

    c = api._get_client()
    other = Client(c.controller, c.namespace, ray.get(c.controller.info.remote(), timeout=10), hot_bytes=0)
    try:
        k = keys_of(3, model="loccache")
        kvs = [kv_of(40 + i) for i in range(3)]
        kvtier.put(k, kvs)
        c.flush()
        assert all(torch.equal(a, b) for a, b in zip(kvtier.get(k), kvs))  # located once: cached
        bound = c._keys(k)
        assert all(c.locations.take([b])[0] for b in bound)
        calls = []
        real = c._locate
        monkeypatch.setattr(c, "_locate", lambda keys, down=False: calls.append(list(keys)) or real(keys, down))
        hits = c.locations.counters["hits"]
        assert all(torch.equal(a, b) for a, b in zip(kvtier.get(k), kvs))
        assert calls == [] and c.locations.counters["hits"] == hits + 3, "served from cached locations"

        monkeypatch.setattr(c.locations, "sync_due", lambda every_s: False)  # only the get's own check below
        new = kv_of(99)
        other.put([k[0]], [new])  # another writer replaces k[0] and deletes k[1]; this client's cache is stale
        other.flush()
        assert other.delete([k[1]]) == 1
        got = kvtier.get(k)
        assert torch.equal(got[0], new), "the newer copy, after the changes check sent it the locate way"
        assert got[1] is None and torch.equal(got[2], kvs[2])
        assert calls and set(calls[-1]) == set(bound[:2])

        monkeypatch.undo()
        other.delete([k[2]])  # no get of it here: the sync thread alone drops the entry (and its ObjectRef)
        wait_for(lambda: not c.locations.take([bound[2]])[0], timeout=10, what="sync drops a deleted key's entry")
    finally:
        other.close()


def test_hot_tier_serves_repeats_and_prefetch_fills_it(ray_session):
    one = kvtier.compress(kv_of(0), "none", key=keys_of(1)[0]).nbytes
    with tier(hot_bytes=3 * one):
        k = keys_of(5, model="hot")
        kvs = [kv_of(i) for i in range(5)]
        kvtier.put(k, kvs)
        st = kvtier.stats()
        assert st["warm"]["blocks"] == 5, "every put is written through to warm"
        assert st["hot"]["blocks"] == 0, "a CPU put with a shard on this node is not kept twice in one memory"
        assert kvtier.prefetch(k).result(timeout=10) == 5  # a prefetch does fill the CPU hot tier (LRU: 3 fit)
        st = kvtier.stats()
        assert st["hot"]["blocks"] == 3 and st["hot"]["bytes"] == 3 * one and st["hot"]["evictions"] == 2
        warm_hits = st["warm"]["hits"]
        assert torch.equal(kvtier.get(k[4]), kvs[4])  # hot hit: no warm read
        assert kvtier.stats()["warm"]["hits"] == warm_hits
        bound = api._get_client()._keys(k)  # the tenant-bound keys the tiers store
        hot_before = set(api._get_client().hot._entries)
        assert torch.equal(kvtier.get(k[0]), kvs[0])  # evicted from hot: a warm hit from this node's object store
        st = kvtier.stats()
        assert st["warm"]["hits"] == warm_hits + 1
        assert bound[0] not in api._get_client().hot and set(api._get_client().hot._entries) == hot_before, \
            "a CPU get of a local warm block decodes the object store's bytes; no second copy in the CPU hot tier"


def test_shutdown_leaves_no_thread_of_the_client_in_a_call(ray_session):
    """kvtier.shutdown() joins the client's sync and store threads (and waits for its prefetches): a thread
    left inside a Ray call when Ray shuts down is the suspected cause of CI's silent exit 1 (twice)."""
    with tier(hot_bytes="16MiB"):
        client = api._get_client()
        k = keys_of(6, model="close")
        kvtier.put(k, [kv_of(i) for i in range(6)])  # still queued for the shards when shutdown starts
        fut = kvtier.prefetch(k[:2])
        threads = [client._syncer, client.store._thread]
        assert all(t.is_alive() for t in threads)
    assert not any(t.is_alive() for t in threads), [t.name for t in threads if t.is_alive()]
    assert fut.done() and client.store.closed and client.store.queued_bytes() == 0


def test_warm_budget_drops_lru_without_cold_tier(ray_session):
    one = kvtier.compress(kv_of(0), "none", key=keys_of(1)[0]).nbytes
    with tier(hot_bytes=0, num_shards=1, warm_bytes=3 * one):
        k = keys_of(5, model="warm-budget")
        for i in range(5):
            kvtier.put(k[i], kv_of(i))
        assert kvtier.flush(30)
        st = wait_for(lambda: (s := kvtier.stats())["shards"][0]["bytes"] <= 3 * one and s, what="shard within budget")
        assert st["warm"]["blocks"] == 3 and st["warm"]["bytes"] == 3 * one and st["warm"]["evictions"] == 2
        assert st["shards"][0]["bytes"] == 3 * one, "the shard really dropped the evicted objects"
        assert [x is not None for x in kvtier.get(k)] == [False, False, True, True, True]


def one_block_bytes() -> int:  # every test key has the same length, so every "none" block has this size
    return kvtier.compress(kv_of(0), "none", key=keys_of(1)[0]).nbytes


def settled(one: int, warm_blocks: int, cold_blocks: int):
    """Stats once the asynchronous demotions have finished: the shards hold what the index says."""
    def ok():
        s = kvtier.stats()
        held = sum(x.get("bytes", 0) for x in s["shards"])
        # the shard drops a demoted block before its report reaches the controller: wait for the
        # reports too, or a count read in between is one demotion short
        reported = s["warm"]["demotions"] + s["warm"]["dropped"] >= s["warm"]["evictions"]
        return (s["warm"]["blocks"] == warm_blocks and s["cold"]["blocks"] == cold_blocks
                and held == warm_blocks * one and reported and s) or None
    return wait_for(ok, what=f"{warm_blocks} warm and {cold_blocks} cold blocks")


def test_eviction_cascade_hot_warm_cold_dropped(ray_session, tmp_path):
    from kvtier.tiers.cold import ColdStore

    one = one_block_bytes()
    with tier(hot_bytes=2 * one, num_shards=1, warm_bytes=3 * one, cold_uri=str(tmp_path), cold_bytes=3 * one):
        k = keys_of(10, model="cascade")
        kvs = [kv_of(i) for i in range(10)]
        for i in range(10):
            kvtier.put(k[i], kvs[i])
        st = settled(one, warm_blocks=3, cold_blocks=3)
        assert (st["hot"]["blocks"], st["hot"]["bytes"]) == (0, 0)  # CPU puts, a shard on this node: not kept twice
        assert (st["warm"]["bytes"], st["warm"]["evictions"], st["warm"]["demotions"]) == (3 * one, 7, 7)
        assert (st["cold"]["bytes"], st["cold"]["evictions"], st["cold"]["dropped"]) == (3 * one, 4, 4)
        # the shard runs demote orders concurrently (max_concurrency=8) and puts now reach it in batches, so
        # which 3 of the 7 demoted blocks cold kept depends on the order their writes finished; the cold dir
        # and the index must agree on them, and the 3 newest stay warm
        in_cold = [key for key in k if where(key) == "cold"]
        listed = sorted(key for key, _ in ColdStore(str(tmp_path)).list())
        assert listed == sorted(api._get_client()._keys(in_cold)), "cold dir = index"
        assert len(in_cold) == 3 and set(in_cold) <= set(k[:7]) and [where(key) for key in k[7:]] == ["warm"] * 3
        assert sum(kvtier.contains(key) for key in k) == 6, "4 fell off cold"

        # a cold hit: read, verified, returned, promoted to warm (which pushes warm's LRU block down)
        api._get_client().hot.clear()
        c = k.index(in_cold[0])
        assert torch.equal(kvtier.get(k[c]), kvs[c])
        st = kvtier.stats()
        assert st["cold"]["hits"] >= 1 and st["client"]["promotions"] == 1
        # its promotion was offered; a shard at its budget refuses promotions (issue 9's admission), so the
        # copy stays cold here: the index must still name one of the two
        assert where(k[c]) in ("warm", "cold")

        # a cold object swapped for another key's block is a miss, counted and removed, never data
        settled(one, warm_blocks=3, cold_blocks=3)
        victim = next(key for key in k if where(key) == "cold" and key != k[c])  # k[c] is in the hot tier now
        vb = api._get_client()._keys([victim])[0]  # its object is named after the tenant-bound key
        path = next(p for p in tmp_path.rglob(f"{vb}*") if p.is_file())
        other = next(p for p in tmp_path.rglob("*.kvb") if p.is_file() and vb not in p.name)
        path.write_bytes(other.read_bytes())
        assert kvtier.get(victim) is None
        assert not path.exists(), "the corrupt object was deleted"
        assert kvtier.stats()["cold"]["client_corrupt"] >= 1
        wait_for(lambda: not kvtier.contains(victim), what="the index forgot the corrupt cold block")


def test_controller_restart_rebuilds_index_from_shards_and_cold(ray_session, tmp_path):
    import ray

    one = one_block_bytes()
    with tier(hot_bytes=0, num_shards=2, warm_bytes=8 * one, cold_uri=str(tmp_path)) as info:
        k = keys_of(12, model="restart")
        kvs = [kv_of(i) for i in range(12)]
        for i in range(12):
            kvtier.put(k[i], kvs[i])
        st = wait_for(lambda: (s := kvtier.stats())["warm"]["blocks"] + s["cold"]["blocks"] == 12
                      and s["cold"]["blocks"] >= 4 and s, what="demotions settled")
        before = (st["warm"]["blocks"], st["cold"]["blocks"])
        pid = st["controller"]["pid"]
        ctl = ray.get_actor(api.CONTROLLER, namespace=info["namespace"])
        ray.kill(ctl, no_restart=False)  # Ray restarts it (max_restarts=-1); it must rebuild its index
        # calls during the restart time out after rpc_timeout_s (5 s) instead of hanging
        st = wait_for(lambda: (s := kvtier.stats()).get("controller", {}).get("pid") not in (None, pid) and s,
                      timeout=90, what="a new controller process")
        assert (st["warm"]["blocks"], st["cold"]["blocks"]) == before, "rebuilt from the shards and the cold store"
        assert st["keys"] == 12 and kvtier.lookup(k) == 12
        out = kvtier.get(k)
        assert all(x is not None and torch.equal(x, y) for x, y in zip(out, kvs))


def test_dead_shard_is_forgotten_gets_fall_back_to_cold_or_miss_and_never_hang(ray_session, tmp_path):
    import ray

    with tier(hot_bytes=0, rpc_timeout_s=3.0, cold_uri=str(tmp_path)) as info:
        k = keys_of(12, model="dead-shard")
        kvs = [kv_of(i) for i in range(12)]
        client = api._get_client()
        kvtier.put(k[:8], kvs[:8])  # warm only
        assert kvtier.flush(30)
        client.cfg = client.cfg.replace(write_through=True)
        kvtier.put(k[8:], kvs[8:])  # warm and cold
        assert kvtier.flush(30)
        on0 = {i for i, key in enumerate(client._keys(k)) if client._pick_shard(key)["id"] == "kvtier-shard-0"}
        lost, saved = sorted(on0 & set(range(8))), sorted(on0 & set(range(8, 12)))
        assert lost and saved and len(on0) < 12, "these keys spread over both shards, with and without cold copies"
        ray.kill(ray.get_actor("kvtier-shard-0", namespace=info["namespace"]), no_restart=False)
        # ray.kill is asynchronous: until the process is gone its blocks may still be read (correctly);
        # after that they are misses, or cold hits where a cold copy exists. Every get is bounded.
        deadline = time.monotonic() + 30
        while True:
            t0 = time.monotonic()
            out = kvtier.get(k)
            assert time.monotonic() - t0 < 3 * 3.0 + 5, "a get on a dead shard is bounded by the rpc timeout"
            for i, x in enumerate(out):
                assert x is None or torch.equal(x, kvs[i]), "wrong data"
                if i not in lost:
                    assert x is not None, "blocks of the live shard and blocks with a cold copy stay gettable"
            if all(out[i] is None for i in lost):
                break
            assert time.monotonic() < deadline, "the dead shard's blocks were still served 30 s after the kill"
            time.sleep(0.2)
        # the controller forgets the dead shard's warm copies; Ray restarts the shard and puts work again
        wait_for(lambda: kvtier.lookup([k[lost[0]]]) == 0, what="dead shard's blocks forgotten")
        assert all(kvtier.contains(k[i]) for i in saved), "blocks with a cold copy are still in the index"
        st = wait_for(lambda: (s := kvtier.stats()) and all(x.get("alive") for x in s["shards"]) and s,
                      what="shard restarted")
        assert st["warm"]["blocks"] == 12 - len(on0)
        assert all(torch.equal(x, kvs[i]) for i, x in zip(saved, kvtier.get([k[i] for i in saved])))
        assert kvtier.stats()["cold"]["hits"] >= st["cold"]["hits"] + len(saved), "now the index points to cold"
        kvtier.put(k[lost[0]], kvs[lost[0]])
        assert torch.equal(kvtier.get(k[lost[0]]), kvs[lost[0]])


def test_kvtier_start_once_then_status_reads_the_running_tier(ray_session, tmp_path, capsys):
    import json

    from kvtier.runtime import start, status

    ns = f"kvt-test-{next(_ns)}"
    cfg = tmp_path / "tier.json"
    cfg.write_text(json.dumps({"codec": "none", "cold_uri": "", "warm_bytes": "8MiB", "num_shards": 2}))
    assert start.main(["--address", ray_session, "--namespace", ns, "--config", str(cfg), "--once"]) == 0
    assert "2 warm shards of 4.0 MiB" in capsys.readouterr().out
    try:
        assert status.main(["--namespace", ns]) == 0
        out = capsys.readouterr().out
        assert "kvtier-shard-0" in out and "kvtier-shard-1" in out and "4.0 MiB" in out
        assert status.main(["--namespace", ns, "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["warm"]["capacity_bytes"] == 8 << 20 and len(st["shards"]) == 2
    finally:
        assert api.stop_tier(ns)
    assert status.main(["--namespace", ns]) == 1, "status never creates a tier"
    assert start.main(["--config", str(tmp_path / "missing.json")]) == 2

