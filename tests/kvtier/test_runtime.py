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


def wait_for(cond, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def warm_only(ray_session):
    """A tier whose hot tier is off (hot_bytes=0): every get goes to a warm shard."""
    with tier(hot_bytes=0) as info:
        yield info


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
    assert kvtier.lookup(k) == 0, "nothing was stored by the failed puts"


def test_hot_tier_serves_repeats_and_prefetch_fills_it(ray_session):
    one = kvtier.compress(kv_of(0), "none", key=keys_of(1)[0]).nbytes
    with tier(hot_bytes=3 * one):
        k = keys_of(5, model="hot")
        kvs = [kv_of(i) for i in range(5)]
        kvtier.put(k, kvs)
        st = kvtier.stats()
        assert st["hot"]["blocks"] == 3 and st["hot"]["bytes"] == 3 * one and st["hot"]["evictions"] == 2
        assert st["warm"]["blocks"] == 5, "every put is written through to warm"
        warm_hits = st["warm"]["hits"]
        assert torch.equal(kvtier.get(k[4]), kvs[4])  # hot hit: no warm read
        assert kvtier.stats()["warm"]["hits"] == warm_hits
        assert torch.equal(kvtier.get(k[0]), kvs[0])  # warm hit, promoted to hot
        st = kvtier.stats()
        assert st["warm"]["hits"] == warm_hits + 1 and api._get_client().hot.get(k[0]) is not None
        assert kvtier.prefetch(k[1:3]).result(timeout=10) == 2
        assert k[1] in api._get_client().hot and k[2] in api._get_client().hot


def test_warm_budget_drops_lru_without_cold_tier(ray_session):
    one = kvtier.compress(kv_of(0), "none", key=keys_of(1)[0]).nbytes
    with tier(hot_bytes=0, num_shards=1, warm_bytes=3 * one):
        k = keys_of(5, model="warm-budget")
        for i in range(5):
            kvtier.put(k[i], kv_of(i))
        st = wait_for(lambda: (s := kvtier.stats())["shards"][0]["bytes"] <= 3 * one and s, what="shard within budget")
        assert st["warm"]["blocks"] == 3 and st["warm"]["bytes"] == 3 * one and st["warm"]["evictions"] == 2
        assert st["shards"][0]["bytes"] == 3 * one, "the shard really dropped the evicted objects"
        assert [x is not None for x in kvtier.get(k)] == [False, False, True, True, True]


def test_controller_restart_rebuilds_index_from_shards(ray_session):
    import ray

    with tier(hot_bytes=0) as info:
        k = keys_of(6, model="restart")
        kvs = [kv_of(i) for i in range(6)]
        kvtier.put(k, kvs)
        pid = kvtier.stats()["controller"]["pid"]
        ctl = ray.get_actor(api.CONTROLLER, namespace=info["namespace"])
        ray.kill(ctl, no_restart=False)  # Ray restarts it (max_restarts=-1); it must rebuild from the shards
        # calls during the restart time out after rpc_timeout_s (5 s) instead of hanging
        st = wait_for(lambda: (s := kvtier.stats()).get("controller", {}).get("pid") not in (None, pid) and s,
                      timeout=90, what="a new controller process")
        assert st["warm"]["blocks"] == 6 and st["keys"] == 6, "the new controller rebuilt its index from the shards"
        assert kvtier.lookup(k) == 6
        out = kvtier.get(k)
        assert all(x is not None and torch.equal(x, y) for x, y in zip(out, kvs))


def test_dead_shard_is_forgotten_and_gets_do_not_hang(ray_session):
    import ray

    with tier(hot_bytes=0, rpc_timeout_s=3.0) as info:
        k = keys_of(8, model="dead-shard")
        kvs = [kv_of(i) for i in range(8)]
        kvtier.put(k, kvs)
        client = api._get_client()
        on0 = [i for i, key in enumerate(k) if client._pick_shard(key)["id"] == "kvtier-shard-0"]
        assert 0 < len(on0) < 8, "keys spread over both shards"
        ray.kill(ray.get_actor("kvtier-shard-0", namespace=info["namespace"]), no_restart=False)
        # ray.kill is asynchronous: until the process is gone its blocks may still be read (correctly);
        # after that they are misses. Every answer is right or None, and every get is bounded.
        deadline = time.monotonic() + 30
        while True:
            t0 = time.monotonic()
            out = kvtier.get(k)
            assert time.monotonic() - t0 < 3 * 3.0 + 5, "a get on a dead shard is bounded by the rpc timeout"
            for i, x in enumerate(out):
                assert x is None or torch.equal(x, kvs[i]), "wrong data"
                if i not in on0:
                    assert x is not None, "blocks of the live shard stay gettable"
            if all(out[i] is None for i in on0):
                break
            assert time.monotonic() < deadline, "the dead shard's blocks were still served 30 s after the kill"
            time.sleep(0.2)
        # the controller forgets the dead shard's blocks; Ray restarts the shard and puts work again
        wait_for(lambda: kvtier.lookup([k[i] for i in on0[:1]]) == 0, what="dead shard's blocks forgotten")
        st = wait_for(lambda: (s := kvtier.stats()) and all(x.get("alive") for x in s["shards"]) and s,
                      what="shard restarted")
        assert st["warm"]["blocks"] == 8 - len(on0)
        kvtier.put(k[on0[0]], kvs[on0[0]])
        assert torch.equal(kvtier.get(k[on0[0]]), kvs[on0[0]])
