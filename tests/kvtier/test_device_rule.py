"""One device rule through the real tier: ``get(keys, device=X)`` returns every tensor on X, whichever tier
served it; ``device=None`` means ``kvtier.tiers.hot.default_device()`` (the GPU if there is one, else the CPU).

The CUDA test needs the GPU machine (Ray travels there as wheels: bench/gpu_bundle.sh); CI runs the CPU one.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import kvtier
from kvtier.runtime import api
from kvtier.tiers.hot import default_device

pytestmark = pytest.mark.ray
_ns = itertools.count()
SHAPE = (2, 2, 2, 256, 64)


def chunks(n, seed):
    return [torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def served_from_each_tier(device, tmp_path, codec="none"):
    """(tensors of one get whose blocks come from hot, warm and cold at once, the chunks put)."""
    kvtier.init(namespace=f"kvt-device-{next(_ns)}", config=dict(
        codec=codec, hot_bytes="64MiB", warm_bytes="64MiB", num_shards=2, cold_uri=str(tmp_path / "cold"),
        write_through=True, rpc_timeout_s=10.0))
    client = api._get_client()
    keys = kvtier.chunk_keys(list(range(256 * 3)), f"device-rule-{next(_ns)}")
    kvs = chunks(3, 7)
    kvtier.put(keys, kvs)
    client.flush()
    assert kvtier.prefetch(keys).result(timeout=30) == 3  # key 0 stays hot (a CPU put is not kept there)
    bound = client._keys(keys)  # the tenant-bound keys the tiers store
    client.hot.delete(bound[1])  # key 1: warm
    client.hot.delete(bound[2])  # key 2: cold only
    import ray

    ray.get(client.controller.forget.remote([bound[2]], []), timeout=30)
    locs = ray.get(client.controller.locate.remote(bound, pin=False), timeout=30)[0]
    assert [loc.tier for loc in locs[1:]] == ["warm", "cold"] and bound[0] in client.hot
    return kvtier.get(keys, device=device), kvs


def test_cpu_device_and_none_mean_one_device_for_every_tier(ray_session, tmp_path):
    try:
        got, kvs = served_from_each_tier("cpu", tmp_path)
        assert [t.device.type for t in got] == ["cpu"] * 3
        assert all(torch.equal(a, b) for a, b in zip(got, kvs))
        got = kvtier.get(kvtier.chunk_keys(list(range(256 * 3)), "absent-model"), device=None)
        assert got == [None] * 3
    finally:
        kvtier.shutdown(stop=True)
    if not torch.cuda.is_available():
        assert default_device() == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", ["cuda", None, "cpu"])
def test_cuda_every_tensor_on_the_asked_device(ray_session, tmp_path, device):
    try:
        got, kvs = served_from_each_tier(device, tmp_path)
        want = torch.device("cpu") if device == "cpu" else default_device()
        assert [t.device for t in got] == [want] * 3, "hot, warm and cold hits on one device"
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, kvs))
        if device != "cpu":  # the warm/cold hits were copied to the GPU once, into the hot tier
            hot = api._get_client().hot
            assert all(t.is_cuda for k in hot._entries for t in hot.get(k).buffers.values())
    finally:
        kvtier.shutdown(stop=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_a_warm_hit_is_copied_from_registered_object_store_pages_and_verified_on_the_gpu(ray_session):
    kvtier.init(namespace=f"kvt-device-{next(_ns)}", config=dict(
        codec="rot4", hot_bytes="64MiB", warm_bytes="256MiB", num_shards=1, rpc_timeout_s=10.0))
    try:
        client = api._get_client()
        keys = kvtier.chunk_keys(list(range(256 * 4)), f"device-pages-{next(_ns)}")
        kvs = [kv.cuda() for kv in chunks(4, 11)]
        kvtier.put(keys, kvs)
        client.flush()
        want = [kvtier.decompress(kvtier.compress(kv, "rot4"), "cuda") for kv in kvs]
        for k in client._keys(keys):
            client.hot.delete(k)
        got = kvtier.get(keys, device="cuda")
        assert all(g is not None and torch.equal(g, w) for g, w in zip(got, want))
        pages = client.loader.pages
        assert pages.registered_bytes > 0 and pages.refused == 0, "warm blocks came from registered plasma pages"
        # the same direct path with a corrupt payload byte and a corrupt header byte in the object store
        import numpy as np
        import ray

        blocks = [kvtier.compress(kv, "rot4", key=k, model_id="m") for kv, k in zip(kvs, keys)]
        wires = [np.frombuffer(b.to_arrow(), dtype=np.uint8).copy() for b in blocks]
        wires[1][-5000] ^= 4
        at = bytes(wires[2]).index(b'"seed":')
        wires[2][at + 8] = ord("1") if wires[2][at + 8] != ord("1") else ord("2")  # still JSON, another seed
        src = ray.get([ray.put(w) for w in wires])
        got = client.loader.load(keys, src, "cuda", expect_model="m")
        assert [g.status for g in got] == ["ok", "corrupt", "corrupt", "ok"]
        assert "payload sums mismatch" in got[1].error and "checksum mismatch" in got[2].error
        assert torch.equal(got[0].kv, want[0]) and torch.equal(got[3].kv, want[3])
    finally:
        kvtier.shutdown(stop=True)
