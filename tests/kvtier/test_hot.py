"""The hot tier (one process's LRU of compressed blocks) and the warm shard's table. No Ray."""

import pytest
import torch

import kvtier
from kvtier.tiers.hot import HotTier, decode_block
from kvtier.tiers.warm import WarmStore

SHAPE = (2, 2, 2, 256, 64)


def block(i, codec="none"):
    key = kvtier.chunk_keys(list(range(256 * (i + 1))), "hot-test")[-1]
    kv = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
    return kvtier.compress(kv, codec, key=key), kv


def test_budget_and_lru_order():
    blocks = [block(i)[0] for i in range(4)]
    one = blocks[0].nbytes  # the budget counts serialized bytes, as every tier does
    hot = HotTier(3 * one, device="cpu")
    for b in blocks[:3]:
        assert hot.put(b) == []
    assert hot.get(blocks[0].key).key == blocks[0].key  # touch: blocks[1] is now the oldest
    assert hot.put(blocks[3]) == [blocks[1].key]
    st = hot.stats()
    assert (st["blocks"], st["bytes"], st["capacity_bytes"], st["evictions"]) == (3, 3 * one, 3 * one, 1)
    assert (st["hits"], st["misses"]) == (1, 0)
    assert hot.get(blocks[1].key) is None and hot.stats()["misses"] == 1


def test_a_block_larger_than_the_budget_is_not_kept_and_zero_disables():
    b, _ = block(0)
    assert HotTier(b.nbytes - 1).put(b) == []
    hot = HotTier(0)
    hot.put(b)
    assert len(hot) == 0 and hot.get_kv(b.key) is None
    with pytest.raises(ValueError, match="capacity_bytes=-5"):
        HotTier(-5)


@pytest.mark.parametrize("codec", ["none", "kivi4", "none+zstd"])
def test_get_kv_decodes_and_the_caller_owns_the_result(codec):
    if codec.split("+")[0] not in kvtier.list_codecs():
        pytest.skip(f"codec {codec} is not registered in this checkout")
    if codec.endswith("+zstd"):
        pytest.importorskip("zstandard", reason="the GPU machine has no zstandard (CI and dev machines do)")
    b, kv = block(1, codec)
    hot = HotTier(1 << 30, device="cpu")
    hot.put(b)
    out = hot.get_kv(b.key)
    assert torch.equal(out, kvtier.decompress(b))
    out.mul_(0)  # writing into the result must not change the cached block
    assert torch.equal(hot.get_kv(b.key), kvtier.decompress(b))
    if codec == "none":
        assert torch.equal(out.add_(kv), kv)  # sanity: out was a real, writable tensor


def test_the_tier_owns_its_bytes_and_never_views_the_source():
    b, kv = block(4)
    wire = kvtier.Block.from_arrow(b.to_arrow())  # as a warm get sees it: views of someone else's buffer
    src = wire.buffers["data"]
    hot = HotTier(1 << 30, device="cpu")
    hot.put(wire)
    held = hot.get(wire.key).buffers["data"]
    assert not src.address <= held.data_ptr() < src.address + src.size, "a copy, not a view of the source"
    del wire, src  # dropping the source (a shard dropping its object) leaves the hot copy intact
    assert torch.equal(hot.get_kv(b.key), kv)
    assert hot.stats()["bytes"] == b.nbytes


def test_device_none_is_the_tiers_device_and_a_foreign_model_is_a_miss():
    b, kv = block(5)
    hot = HotTier(1 << 30, device="cpu")
    hot.put(b)
    assert hot.get_kv(b.key).device.type == "cpu" and hot.get_kv(b.key, device="cpu").device.type == "cpu"
    assert hot.get_kv(b.key, expect_model="another-model") is None
    assert hot.stats()["misses"] == 1


def test_decode_block_copies_only_when_aliasing():
    b, kv = block(2)
    out = decode_block(b, torch.device("cpu"))  # device=None would mean the GPU where there is one
    assert torch.equal(out, kv)
    payload = b.buffers["data"]
    assert not (payload.address <= out.data_ptr() < payload.address + payload.size), "none codec output was copied"


def test_delete_and_clear():
    b0, b1 = block(0)[0], block(1)[0]
    hot = HotTier(1 << 30)
    hot.put(b0)
    hot.put(b1)
    assert hot.delete(b0.key) and not hot.delete(b0.key)
    assert b0.key not in hot and b1.key in hot
    hot.clear()
    assert len(hot) == 0 and hot.stats()["bytes"] == 0


def test_warm_store_generations_protect_newer_copies():
    w = WarmStore(1000)
    a1 = w.add("a", 100, "ref1")
    a2 = w.add("a", 120, "ref2")  # put again: new generation, bytes replaced, not added
    assert a2.gen > a1.gen and w.bytes == 120 and len(w) == 1
    assert w.remove("a", a1.gen) is None, "an order about the old copy must not drop the new one"
    assert w.get("a").handle == "ref2"
    assert w.remove("a", a2.gen).handle == "ref2"
    assert w.bytes == 0 and w.stats()["dropped"] == 1
    with pytest.raises(ValueError, match="capacity_bytes=-1"):
        WarmStore(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU machine, not CI)")
@pytest.mark.parametrize("codec", ["none", "kivi4"])
def test_cuda_hot_tier_keeps_payload_on_the_gpu_and_decodes_there(codec):
    if codec not in kvtier.list_codecs():
        pytest.skip(f"codec {codec} is not registered in this checkout")
    b, _ = block(3, codec)
    hot = HotTier(1 << 30, device="cuda")
    hot.put(b)
    assert all(t.is_cuda for t in hot.get(b.key).buffers.values()), "payload kept in device memory"
    out = hot.get_kv(b.key)
    assert out.is_cuda
    ref = kvtier.decompress(b)
    # none: the same bytes; kivi4: the GPU kernel may round a dequantized bf16 value 1 ulp (2**-7) off the CPU path
    tol = dict(rtol=0, atol=0) if codec == "none" else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(out.cpu(), ref, **tol)
    out.zero_()
    torch.testing.assert_close(hot.get_kv(b.key).cpu(), ref, **tol, msg="the caller owns the result")
    assert not hot.get_kv(b.key, device="cpu").is_cuda


def test_large_copies_are_writable_and_independent():
    from kvtier.tiers.hot import _copy

    src = torch.arange((4 << 20) // 2 + 7, dtype=torch.bfloat16).view(-1, 1)
    out = _copy(src)
    assert torch.equal(out, src) and out.shape == src.shape and out.dtype == src.dtype
    out.add_(1)
    assert not torch.equal(out, src), "writing into the copy leaves the source alone"
