"""The batched, pipelined load (kvtier.tiers.pipeline): verification, reasons for misses, ownership. No Ray."""

import threading
import time

import pytest
import torch

import kvtier
from kvtier.tiers.hot import HotTier
from kvtier.tiers.pipeline import Loader

SHAPE = (2, 2, 2, 256, 64)
MODEL = "pipe-test|L2|H2|D64|float32"


def make(i, codec="none", model=MODEL):
    key = kvtier.chunk_keys(list(range(256 * (i + 1))), "pipe-test")[-1]
    kv = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
    return key, kv, kvtier.compress(kv, codec, key=key, model_id=model)


@pytest.fixture(scope="module")
def loader():
    lo = Loader(threads=4)
    yield lo
    lo.close()


@pytest.mark.parametrize("codec", ["none", "kivi4"])
def test_a_batch_from_bytes_blocks_and_callables_decodes_in_order(loader, codec):
    items = [make(i, codec) for i in range(6)]
    keys = [k for k, _, _ in items]
    wires = [b.to_arrow() for _, _, b in items]
    sources = [wires[0], items[1][2], lambda: wires[2], lambda: items[3][2], wires[4].to_pybytes(), wires[5]]
    got = loader.load(keys, sources, "cpu", expect_model=MODEL)
    assert [g.status for g in got] == ["ok"] * 6 and [g.key for g in got] == keys
    for g, (_, kv, b) in zip(got, items):
        assert torch.equal(g.kv, kvtier.decompress(b))
        assert g.nbytes > 0
    if codec == "none":
        assert torch.equal(got[0].kv, items[0][1])  # lossless


def test_every_bad_source_is_a_miss_with_its_reason(loader):
    (k0, _, b0), (k1, _, b1), (k2, _, b2) = make(0), make(1), make(2)
    flipped = bytearray(b0.to_arrow().to_pybytes())
    flipped[len(flipped) // 2] ^= 1
    foreign = make(3, model="other|L2|H2|D64|float32")

    def broken():
        raise OSError("disk on fire")

    keys = [k0, k1, k2, foreign[0], "absent", "gone", "broken"]
    sources = [bytes(flipped), b2.to_arrow(), b2.to_arrow(), foreign[2], None, lambda: None, broken]
    got = loader.load(keys, sources, "cpu", expect_model=MODEL)
    assert [g.status for g in got] == ["corrupt", "corrupt", "ok", "model", "missing", "missing", "error"]
    assert "checksum" in got[0].error and k2 in got[1].error and "disk on fire" in got[6].error
    assert all(g.kv is None for g in got if g.status != "ok")


def test_cold_reads_run_in_parallel(loader):
    both = threading.Barrier(2, timeout=5)  # breaks (an error) unless two reads are in flight at once
    items = [make(i) for i in range(2)]

    def read(b):
        def f():
            both.wait()
            return b.to_arrow()
        return f

    got = loader.load([k for k, _, _ in items], [read(b) for _, _, b in items], "cpu")
    assert [g.status for g in got] == ["ok", "ok"]


def test_a_read_that_does_not_finish_is_a_timeout_not_a_hang(loader):
    key, _, b = make(4)
    t0 = time.monotonic()
    got = loader.load([key], [lambda: time.sleep(2) or b.to_arrow()], "cpu", timeout_s=0.2)
    assert got[0].status == "timeout" and time.monotonic() - t0 < 1.5


def test_kept_buffers_are_owned_and_the_hot_tier_adopts_them(loader):
    key, kv, b = make(5)
    wire = b.to_arrow()
    (g,) = loader.load([key], [wire], "cpu", keep_buffers=True)
    data = g.buffers["data"]
    lo, hi = wire.address, wire.address + wire.size
    assert not lo <= data.data_ptr() < hi, "kept buffers must not be views of the source (a shard's object)"
    assert not data.data_ptr() <= g.kv.data_ptr() < data.data_ptr() + data.numel(), "kv must not alias kept bytes"
    hot = HotTier(1 << 30, device="cpu")
    hot.put(g.block, g.buffers)
    assert hot.get(key).buffers["data"] is data, "adopted, not copied again"
    g.kv.zero_()
    assert torch.equal(hot.get_kv(key), kv)


def test_decode_false_hands_buffers_only(loader):
    key, kv, b = make(6, "kivi4")
    (g,) = loader.load([key], [b.to_arrow()], "cpu", decode=False)
    assert g.status == "ok" and g.kv is None and set(g.buffers) == set(b.buffers)
    hot = HotTier(1 << 30, device="cpu")
    hot.put(g.block, g.buffers)
    assert torch.equal(hot.get_kv(key), kvtier.decompress(b))


def test_staging_packs_every_buffer_aligned_and_byte_exact():
    from kvtier.tiers.pipeline import _ALIGN, _stage

    _, _, b = make(7, "kivi4")
    bufs = dict(b.buffers, extra=torch.arange(10, dtype=torch.uint8), empty=torch.empty(0, dtype=torch.uint8))
    staged = _stage(bufs, pin=False)  # pinned on CUDA; the packing is the same
    base = staged["extra"].untyped_storage().data_ptr()
    for name, src in bufs.items():
        want = src if isinstance(src, torch.Tensor) else torch.frombuffer(bytearray(src.to_pybytes()), dtype=torch.uint8)
        assert torch.equal(staged[name], want), name
        assert not want.numel() or (staged[name].data_ptr() - base) % _ALIGN == 0, "512-byte aligned slices"


def test_bad_arguments_name_the_value(loader):
    with pytest.raises(ValueError, match="2 keys and 1 sources"):
        loader.load(["a", "b"], [None], "cpu")
    with pytest.raises(ValueError, match="timeout_s=0"):
        loader.load([], [], "cpu", timeout_s=0)
    with pytest.raises(ValueError, match="threads=0"):
        Loader(threads=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("codec", ["none", "kivi4"])
def test_cuda_load_stages_pinned_decodes_on_the_gpu_and_hands_device_buffers(loader, codec):
    items = [make(i, codec) for i in range(8)]
    got = loader.load([k for k, _, _ in items], [b.to_arrow() for _, _, b in items], "cuda", keep_buffers=True)
    tol = dict(rtol=0, atol=0) if codec == "none" else dict(rtol=2**-7, atol=2**-7)
    for g, (_, _, b) in zip(got, items):
        assert g.status == "ok" and g.kv.is_cuda and all(t.is_cuda for t in g.buffers.values())
        torch.testing.assert_close(g.kv.cpu(), kvtier.decompress(b), **tol)
    hot = HotTier(1 << 30, device="cuda")
    hot.put(got[0].block, got[0].buffers)
    assert hot.get(got[0].key).buffers is not None and hot.get_kv(got[0].key).is_cuda
