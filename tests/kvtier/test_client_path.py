"""The client's data path on a real local Ray: one definition of a hit, read-your-writes before the store
lands, model identity on reads, one batched load, and the handoff's bytes being the stored ones."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

import kvtier
from kvtier.runtime import api

pytestmark = pytest.mark.ray
_ns = itertools.count()
SHAPE = (2, 2, 2, 256, 64)


def kvs_of(n, seed=0):
    return [torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def keys_of(n, model):
    return kvtier.chunk_keys(list(range(256 * n)), model)


@pytest.fixture()
def tier(ray_session):
    ns = f"kvt-path-{next(_ns)}"

    def start(**cfg):
        base = dict(codec="none", cold_uri="", hot_bytes="64MiB", warm_bytes="64MiB", num_shards=2, rpc_timeout_s=10.0)
        return kvtier.init(namespace=ns, config=dict(base, **cfg))

    yield start
    kvtier.shutdown(stop=True)


def test_stats_and_the_client_count_the_same_hits_in_blocks_and_tokens(tier):
    tier()
    k, kvs = keys_of(3, "hits"), kvs_of(3)
    kvtier.put(k, kvs)
    assert kvtier.flush(30)  # stored: the warm reads below come from the shards, not this process's queue
    assert kvtier.prefetch(k).result(timeout=30) == 3  # into the hot tier (a prefetch is not a hit)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(kvtier.get(k), kvs))  # 3 hot hits
    api._get_client().hot.clear()
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(kvtier.get(k[:2]), kvs))  # 2 warm hits, one load
    st = kvtier.stats()
    client = api._get_client()
    assert client.served["hot"]["hits"] == 3 and client.served["warm"]["hits"] == 2
    assert st["warm"]["hits"] == 2 and st["warm"]["hit_tokens"] == 2 * 256, "the controller heard the same hits"
    assert st["hot"]["hits"] == 3 and st["hot"]["hit_tokens"] == 3 * 256
    assert st["hot"]["all_clients"]["hits"] == 3
    assert st["warm"]["located"] >= 2  # what the index answered, kept apart from hits
    assert set(client.last_get) == {"locate", "fetch", "load"}


def test_a_put_is_read_back_at_once_even_before_its_store_lands(tier):
    tier(hot_bytes=0)  # no hot tier: the read-back must come from the store queue or the shard
    client = api._get_client()
    gate = threading.Event()
    send = client.store._send
    client.store._send = lambda batch: (gate.wait(10), send(batch))  # hold the store back
    k, kvs = keys_of(2, "ryw"), kvs_of(2, 10)
    kvtier.put(k, kvs)
    assert client.store.pending(client._keys(k)[0]) is not None, "put returned before the store"
    assert kvtier.lookup(k) == 2 and kvtier.contains(k[1])
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(kvtier.get(k), kvs))
    gate.set()
    assert kvtier.flush(30) and client.store.pending(client._keys(k)[0]) is None
    assert kvtier.stats()["warm"]["blocks"] == 2


def test_a_block_of_another_model_is_a_counted_miss(tier):
    tier(model_id="model-a|L2|H2|D64|float32")
    k, kvs = keys_of(1, "models"), kvs_of(1, 20)
    (block,) = kvtier.put(k, kvs)
    assert block.model == "model-a|L2|H2|D64|float32"
    assert kvtier.flush(30)
    kvtier.shutdown()  # the client only: the tier keeps running
    tier(model_id="model-b|L2|H2|D64|float32")  # the same tier and keys, another model: a new client
    assert kvtier.get(k) == [None]
    assert api._get_client().counters["foreign_model"] == 1
    with pytest.raises(ValueError, match="model-a"):
        kvtier.put(k, [block])  # a block of another model is refused, naming it


def test_put_returns_the_stored_bytes_and_stores_a_block_as_it_is(tier):
    tier()
    k, kvs = keys_of(2, "blocks"), kvs_of(2, 30)
    blocks = kvtier.put(k, kvs)
    client = api._get_client()
    assert [b.key for b in blocks] == client._keys(k)
    pending = client.store.pending(blocks[0].key)
    assert pending is None or pending.wire is blocks[0].to_arrow(), "the queued bytes are the block's own"
    again = kvtier.put(k[0], blocks[0])  # a Block is stored as is, not encoded again
    assert again is blocks[0]
    assert kvtier.flush(30)
    client.hot.clear()
    assert torch.equal(kvtier.get(k[0]).cpu(), kvs[0])


def test_a_warm_zstd_get_inflates_each_block_once_in_the_load(tier, monkeypatch):
    """The tier path takes the load pipeline's route for +zstd blocks: inflated once, in the pool, and the
    hot tier adopts those bytes (it inflated every block again on the caller's thread: 1.6 s at 16K on the H200)."""
    import kvtier.tiers.hot as hot_mod

    tier(codec="kivi4+zstd")
    k, kvs = keys_of(3, "zstd-route"), kvs_of(3, seed=40)
    kvtier.put(k, kvs)
    assert kvtier.flush(30)
    api._get_client().hot.clear()
    calls = []
    real = hot_mod._zstd_decompress
    monkeypatch.setattr(hot_mod, "_zstd_decompress", lambda *a: calls.append(threading.current_thread().name) or real(*a))
    got = kvtier.get(k)
    assert [g is not None for g in got] == [True] * 3 and api._get_client().served["warm"]["hits"] == 3
    assert len(calls) == 3 and all(n.startswith("kvtier-load") for n in calls), calls
    again = kvtier.get(k)  # now hot: decoded from the adopted, inflated bytes; nothing inflated again
    assert len(calls) == 3 and all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(again, got))
