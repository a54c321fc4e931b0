"""The batched, pipelined load (kvtier.tiers.pipeline): verification, reasons for misses, ownership. No Ray."""

import threading
import time

import pytest
import torch

import kvtier
from kvtier.tiers.hot import HotTier
from kvtier.tiers.pipeline import Later, Loader

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


def test_later_sources_are_fetched_by_key_and_a_failed_fetch_is_a_miss(loader):
    items = [make(i) for i in range(5)]
    keys = [k for k, _, _ in items]
    wires = {k: b.to_arrow() for k, _, b in items}
    asked = []

    def fetch(ks):
        asked.append(list(ks))
        return [None if k == keys[3] else wires[k] for k in ks]  # keys[3]'s copy was not had

    sources = [Later(wires[keys[0]].size), wires[keys[1]], Later(1), Later(1), items[4][2]]
    got = loader.load(keys, sources, "cpu", expect_model=MODEL, fetch=fetch)
    assert [g.status for g in got] == ["ok", "ok", "ok", "missing", "ok"]
    assert asked == [[keys[0], keys[2], keys[3]]]  # the CPU path: every Later in one call, nothing else
    assert torch.equal(got[2].kv, items[2][1])

    def broken(ks):
        raise RuntimeError("shard gone")

    got = loader.load(keys[:2], [Later(1), Later(1)], "cpu", fetch=broken)
    assert [g.status for g in got] == ["error"] * 2 and all("shard gone" in g.error for g in got)
    got = loader.load(keys[:2], [Later(1), Later(1)], "cpu", fetch=lambda ks: [])
    assert [g.status for g in got] == ["error"] * 2 and "gave 0 sources for 2 keys" in got[0].error
    with pytest.raises(ValueError, match="no fetch"):
        loader.load(keys[:1], [Later(1)], "cpu")


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


def test_staging_copies_and_hashes_in_one_pass_aligned_and_byte_exact():
    from kvtier.block import Block
    from kvtier.tiers.pipeline import _ALIGN, SEND_SLICE, _Call, _copy_in

    _, _, b = make(7, "kivi4")
    bufs = dict(b.buffers, extra=torch.arange(10, dtype=torch.uint8), empty=torch.empty(0, dtype=torch.uint8),
                big=torch.randint(0, 255, (SEND_SLICE * 2 + 5,), dtype=torch.uint8))
    block = Block.build(key=b.key, model=b.model, codec=b.codec, shape=b.shape, dtype=b.dtype, params=b.params,
                        buffers=bufs)
    call = _Call(None, None, threading.Event(), time.monotonic() + 10, None, copy_slice=1 << 20)
    host, spans, dev = _copy_in(block, block.buffers, block.hasher(), False, call)
    assert dev is None
    for name, src in block.buffers.items():
        off, size = spans[name]
        assert host[off:off + size].numpy().tobytes() == src.to_pybytes(), name
        assert off % _ALIGN == 0, "512-byte aligned spans"
    bad = bytearray(block.buffers["big"].to_pybytes())
    bad[SEND_SLICE + 3] ^= 4  # flipped in a later slice: the hash of the copy catches it
    forged = Block(key=block.key, model=block.model, codec=block.codec, shape=block.shape, dtype=block.dtype,
                   params=block.params, buffers=dict(block.buffers, big=bytes(bad)), checksum=block.checksum)
    with pytest.raises(kvtier.BlockFormatError, match="checksum mismatch"):
        _copy_in(forged, {n: memoryview(v) for n, v in forged.buffers.items()}, forged.hasher(), False, call)


def test_a_flipped_byte_is_a_miss_on_every_path(loader):
    key, _, b = make(8)
    flipped = bytearray(b.to_arrow().to_pybytes())
    flipped[len(flipped) // 3] ^= 1
    for keep in (False, True):  # hashed in place / hashed while copied for the hot tier
        (g,) = loader.load([key], [bytes(flipped)], "cpu", keep_buffers=keep)
        assert g.status == "corrupt" and "checksum" in g.error and g.kv is None


def test_cuda_work_items_are_contiguous_runs_of_about_group_bytes():
    from kvtier.tiers.pipeline import _groups

    mib = 1 << 20
    srcs = [bytes(mib)] * 3 + [lambda: None, None] + [bytes(mib)] * 5
    # 8 MiB over 2 threads: runs of min(3 MiB, 8/2 MiB); a read (size unknown) or a missing source stands alone
    assert _groups(srcs, 2, 3 * mib) == [[0, 1, 2], [3], [4], [5, 6, 7], [8, 9]]
    assert _groups(srcs, 8, 3 * mib) == [[0], [1], [2], [3], [4], [5], [6], [7], [8], [9]]  # 1 MiB per thread
    assert _groups(srcs, 1, 0) == [[i] for i in range(10)]  # group_bytes 0: a block per work item


def test_bad_arguments_name_the_value(loader):
    with pytest.raises(ValueError, match="2 keys and 1 sources"):
        loader.load(["a", "b"], [None], "cpu")
    with pytest.raises(ValueError, match="timeout_s=0"):
        loader.load([], [], "cpu", timeout_s=0)
    with pytest.raises(ValueError, match="threads=0"):
        Loader(threads=0)
    with pytest.raises(ValueError, match="group_bytes=-1"):
        Loader(threads=1, group_bytes=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("codec", ["none", "kivi4"])
def test_cuda_load_stages_pinned_decodes_on_the_gpu_and_hands_device_buffers(loader, codec):
    items = [make(i, codec) for i in range(8)]
    got = loader.load([k for k, _, _ in items], [b.to_arrow() for _, _, b in items], "cuda", keep_buffers=True)
    tol = dict(rtol=0, atol=0) if codec == "none" else dict(rtol=2**-7, atol=2**-7)
    for g, (_, _, b) in zip(got, items):
        assert g.status == "ok" and g.kv.is_cuda and all(t.is_cuda for t in g.buffers.values())
        torch.testing.assert_close(g.kv.cpu(), kvtier.decompress(b), **tol)
        # the caller's chunk is its own memory, not the payload the hot tier adopts (none decodes to a view)
        assert not any(g.kv.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in g.buffers.values())
    hot = HotTier(1 << 30, device="cuda")
    hot.put(got[0].block, got[0].buffers)
    assert hot.get(got[0].key).buffers is not None and hot.get_kv(got[0].key).is_cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_many_slices_a_flipped_byte_and_zstd_on_one_call(loader):
    big = torch.randn((4, 2, 8, 256, 128), generator=torch.Generator().manual_seed(3))  # 8 MiB fp32: two H2D slices
    key_big = kvtier.chunk_keys(list(range(256)), "pipe-big")[0]
    b_big = kvtier.compress(big, "none", key=key_big, model_id=MODEL)
    k1, _, b1 = make(9)
    flipped = bytearray(b1.to_arrow().to_pybytes())
    flipped[-4096] ^= 1  # in the payload's last slice: its H2D copy was already queued when the hash failed
    k2, _, b2 = make(10, "kivi4+zstd")
    got = loader.load([key_big, k1, k2], [b_big.to_arrow(), bytes(flipped), b2.to_arrow()], "cuda")
    assert [g.status for g in got] == ["ok", "corrupt", "ok"]
    assert torch.equal(got[0].kv.cpu(), big) and got[1].kv is None
    torch.testing.assert_close(got[2].kv.cpu(), kvtier.decompress(b2), rtol=2**-7, atol=2**-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_one_run_of_blocks_with_a_corrupt_one_in_the_middle():
    items = [make(20 + i, "kivi4") for i in range(5)]
    wires = [b.to_arrow() for _, _, b in items]
    flipped = bytearray(wires[2].to_pybytes())
    flipped[-3000] ^= 1
    lo = Loader(threads=1, group_bytes=1 << 30)  # all five blocks in one work item, one pinned slab, one event
    try:
        got = lo.load([k for k, _, _ in items], wires[:2] + [bytes(flipped)] + wires[3:], "cuda", keep_buffers=True)
    finally:
        lo.close()
    assert [g.status for g in got] == ["ok", "ok", "corrupt", "ok", "ok"] and got[2].kv is None
    for g, (_, _, b) in zip(got, items):
        if g.status == "ok":
            torch.testing.assert_close(g.kv.cpu(), kvtier.decompress(b), rtol=2**-7, atol=2**-7)
            ptrs = {t.untyped_storage().data_ptr() for t in g.buffers.values()}
            assert len(ptrs) == 1, "each block's device buffers are one allocation of its own (the hot tier adopts it)"
    assert len({next(iter(g.buffers.values())).untyped_storage().data_ptr() for g in got if g.buffers}) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("threads, group", [(4, None), (1, 1 << 30)])
def test_cuda_blocks_made_on_the_gpu_are_verified_there_and_never_hashed_on_the_host(monkeypatch, threads, group):
    from kvtier.block import Block

    items = []
    for i, codec in enumerate(["none", "kivi4", "rot4", "x5", "none", "kivi4"]):
        key, kv, _ = make(40 + i)
        items.append((key, kv, kvtier.compress(kv.cuda(), codec, key=key, model_id=MODEL)))
    assert all(b.sums is not None for _, _, b in items), "a block made on the GPU carries its payload sums"
    wires = [bytearray(b.to_arrow().to_pybytes()) for _, _, b in items]
    wires[1][-4096] ^= 0x10  # a payload byte of block 1 (kivi4), near its end
    wires[4][len(wires[4]) // 2] ^= 1  # the middle of block 4's payload (none)
    hashed = []
    real = Block.hasher
    monkeypatch.setattr(Block, "hasher", lambda self: hashed.append(self.key) or real(self))
    lo = Loader(threads=threads, group_bytes=group)
    try:
        got = lo.load([k for k, _, _ in items], [bytes(w) for w in wires], "cuda", keep_buffers=True)
    finally:
        lo.close()
    assert [g.status for g in got] == ["ok", "corrupt", "ok", "ok", "corrupt", "ok"]
    assert "payload sums mismatch" in got[1].error and got[1].kv is None and got[4].kv is None
    assert hashed == [], "verified on the device, not hashed on the host"
    for g, (_, _, b) in zip(got, items):
        if g.status == "ok":
            assert g.kv.is_cuda and torch.equal(g.kv, kvtier.decompress(b, "cuda"))


def test_a_zstd_block_is_inflated_once_and_the_hot_tier_adopts_the_inflated_bytes(loader, monkeypatch):
    import kvtier.tiers.hot as hot_mod

    key, _, b = make(11, "kivi4+zstd")
    calls = []
    real = hot_mod._zstd_decompress
    monkeypatch.setattr(hot_mod, "_zstd_decompress", lambda *a: calls.append(1) or real(*a))
    (g,) = loader.load([key], [b.to_arrow()], "cpu", keep_buffers=True)
    hot = HotTier(1 << 30, device="cpu")
    hot.put(g.block, g.buffers)
    name = next(iter(g.buffers))
    assert len(calls) == 1, "inflated by the load only"
    assert hot.get(key).codec == "kivi4" and hot.get(key).buffers[name] is g.buffers[name], "adopted as inflated"
    assert torch.equal(hot.get_kv(key), kvtier.decompress(b))
    with pytest.raises(ValueError, match="inflated payload"):
        hot.put(g.block, {n: t[:1] for n, t in g.buffers.items()})  # not the inflated sizes: refused, not kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fetches_later_sources_run_by_run():
    items = [make(40 + i, "kivi4") for i in range(6)]
    keys = [k for k, _, _ in items]
    wires = {k: b.to_arrow() for k, _, b in items}
    asked = []

    def fetch(ks):
        asked.append(list(ks))
        return [wires[k] for k in ks]

    lo = Loader(threads=1, group_bytes=2 * wires[keys[0]].size)  # runs of two blocks
    try:
        got = lo.load(keys, [Later(wires[k].size) for k in keys], "cuda", fetch=fetch)
    finally:
        lo.close()
    assert asked == [keys[0:2], keys[2:4], keys[4:6]]  # one fetch per run, as each run is staged
    for g, (_, _, b) in zip(got, items):
        assert g.status == "ok"
        torch.testing.assert_close(g.kv.cpu(), kvtier.decompress(b), rtol=2**-7, atol=2**-7)
