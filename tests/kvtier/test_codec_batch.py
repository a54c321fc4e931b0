"""kvtier.codecs.batch: a run of same-shaped blocks decoded in one call equals decoding them one by one."""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.codecs import TORCH_DTYPES, get_codec
from kvtier.codecs.batch import Item, decode_many
from kvtier.errors import BlockFormatError
from kvtier.tiers.hot import HotTier, entry_buffers

SMOL = "SmolLM2-135M-Instruct|L30|H3|D64|bfloat16|W1dff70ef9e211d0a"  # the shipped profile: sinks, key weights
CUDA = torch.cuda.is_available()


def _blocks(codec: str, n: int, model: str | None = SMOL, shape=(30, 2, 3, 64, 64), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        kv = torch.randn(*shape, generator=g).to(torch.bfloat16) * (1 + i)
        kv[:, :, :, 0] *= 30  # an attention-sink-like token: x* / q* blocks store it exactly
        out.append(kvtier.compress(kv, codec, key=f"{seed:08x}{i:024x}", model_id=model))
    return out


def _items(blocks, device="cpu"):
    items = []
    for b in blocks:
        base, params, bufs = entry_buffers(b, torch.device(device))
        items.append(Item(b.key, base, params, tuple(b.shape), TORCH_DTYPES[b.dtype], bufs))
    return items


def _one(items, device, calls):
    def one(t):
        calls.append(t)
        it = items[t]
        try:
            return get_codec(it.codec).decode(it.buffers, it.params, it.shape, it.dtype, torch.device(device))
        except ValueError as e:
            raise BlockFormatError(f"block {it.key[:8]}: {e}") from None
    return one


@pytest.mark.parametrize("codec", ["rot4", "x5", "q1"])
def test_a_run_decodes_in_one_call_bit_for_bit(codec):
    blocks = _blocks(codec, 4)
    if codec != "rot4":
        assert blocks[0].params["sinks"] and blocks[0].params["kw"], "the profile's sinks and key weights are covered"
    items, calls = _items(blocks), []
    got = decode_many(items, torch.device("cpu"), _one(items, "cpu", calls))
    assert calls == [], "every block came from the one batched decode"
    for g, b in zip(got, blocks):
        assert torch.equal(g, kvtier.decompress(b))
    g0 = got[0]
    g0.zero_()
    assert torch.equal(got[1], kvtier.decompress(blocks[1])), "the outputs do not overlap"


def test_runs_split_where_shape_or_params_change_and_a_bad_block_fails_alone():
    a = _blocks("rot4", 2, shape=(4, 2, 2, 32, 64), seed=1)
    b = _blocks("rot4", 2, shape=(4, 2, 2, 16, 64), seed=2)  # another shape: a run of its own
    c = _blocks("x5", 3, model=None, shape=(4, 2, 2, 32, 64), seed=3)
    blocks = a + b + c
    items = _items(blocks)
    bad = items[5]
    bad.buffers = {**bad.buffers, "scale": bad.buffers["scale"][:-2]}  # truncated: this block must fail, not its run
    calls: list[int] = []
    got = decode_many(items, torch.device("cpu"), _one(items, "cpu", calls))
    assert isinstance(got[5], BlockFormatError) and blocks[5].key[:8] in str(got[5])
    assert set(calls) == {4, 5, 6}, "the run with the bad block fell back to one by one, the others batched"
    for i, (g, blk) in enumerate(zip(got, blocks)):
        if i != 5:
            assert torch.equal(g, kvtier.decompress(blk)), i


def test_zstd_layout_blocks_do_not_batch_but_decode():
    blocks = _blocks("x4+zstd", 2)
    items, calls = _items(blocks), []
    got = decode_many(items, torch.device("cpu"), _one(items, "cpu", calls))
    assert calls == [0, 1]  # their byte layout shuffles each buffer as a whole
    assert all(torch.equal(g, kvtier.decompress(b)) for g, b in zip(got, blocks))


def test_hot_tier_get_kvs_batches_hits_and_keeps_misses_and_models_apart():
    blocks = _blocks("x5", 3)
    hot = HotTier(1 << 30, device="cpu")
    for b in blocks:
        hot.put(b)
    keys = [blocks[0].key, "f" * 32, blocks[1].key, blocks[2].key]
    got = hot.get_kvs(keys, expect_model=SMOL)
    assert got[1] is None
    for g, b in zip([got[0], got[2], got[3]], blocks):
        assert torch.equal(g, kvtier.decompress(b))
    assert hot.get_kvs(keys[:1], expect_model="another") == [None]
    assert torch.equal(hot.get_kv(blocks[2].key), got[3])


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the Triton decode kernels)")
@pytest.mark.parametrize("codec", ["rot4", "x5"])
def test_cuda_a_run_equals_block_by_block(codec):
    blocks = _blocks(codec, 5)
    items, calls = _items(blocks, "cuda"), []
    got = decode_many(items, torch.device("cuda"), _one(items, "cuda", calls))
    assert calls == []
    for g, b in zip(got, blocks):
        assert g.is_cuda and torch.equal(g, kvtier.decompress(b, "cuda"))
