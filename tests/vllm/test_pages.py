"""vLLM page formats <-> kvtier chunks (kvtier/vllm/pages.py): pure torch, no vLLM, no model."""

from __future__ import annotations

import os

import pytest
import torch

from kvtier.vllm import pages

# the Triton copy runs on the CPU interpreter here (tests/conftest.py), compiled on a GPU run (TRITON_INTERPRET=0)
DEV = torch.device("cuda" if os.environ.get("TRITON_INTERPRET", "1") == "0" and torch.cuda.is_available() else "cpu")

SHAPES = [  # (layers, kv_heads, head_dim, block_size, blocks_per_chunk): odd sizes on purpose
    (3, 5, 24, 4, 3),
    (2, 1, 64, 32, 2),
    (1, 3, 8, 16, 1),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # copies only: every dtype round-trips exactly


def _paged(fmt, layers, h, d, bs, nblocks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lay = pages.PageLayout(fmt, nblocks, bs, h, d, dtype)
    return lay, [torch.randn(lay.shape(), generator=g).to(dtype) for _ in range(layers)]


def _reference_tokens(fmt, t, lay, block, offset):
    """K and V [heads, head_dim] of one token, read element by element from the format's definition."""
    if fmt == "flash":
        return t[0, block, offset], t[1, block, offset]
    page = t[block].reshape(lay.kv_heads, 2, lay.block_size * lay.head_dim)
    k = page[:, 0].reshape(lay.kv_heads, lay.head_dim, lay.block_size)[:, :, offset]  # K transposed
    v = page[:, 1].reshape(lay.kv_heads, lay.block_size, lay.head_dim)[:, offset]
    return k, v


@pytest.mark.parametrize("fmt", pages.FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_reads_each_token_where_the_format_puts_it(fmt, shape, dtype):
    layers, h, d, bs, per = shape
    lay, ts = _paged(fmt, layers, h, d, bs, 4 * per + 1, dtype)
    ids = torch.tensor([[2 * per + j for j in range(per)], [j + 1 for j in range(per)]])  # out of order
    out = pages.gather(ts, lay, ids, per * bs)
    assert out.shape == (2, layers, 2, h, per * bs, d) and out.dtype == dtype
    for c in range(2):
        for tok in (0, per * bs - 1, (per * bs) // 2):
            block = int(ids[c, tok // bs])
            for li in range(layers):
                k, v = _reference_tokens(fmt, ts[li], lay, block, tok % bs)
                assert torch.equal(out[c, li, 0, :, tok], k) and torch.equal(out[c, li, 1, :, tok], v)


@pytest.mark.parametrize("fmt", pages.FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter_then_gather_round_trips_and_touches_nothing_else(fmt, shape):
    layers, h, d, bs, per = shape
    lay, ts = _paged(fmt, layers, h, d, bs, 3 * per + 2, torch.float32)
    before = [t.clone() for t in ts]
    chunks = torch.randn(2, layers, 2, h, per * bs, d)
    ids = torch.tensor([[per + 1 + j for j in range(per)], [2 * per + 1 + j for j in range(per)]])
    pages.scatter(ts, lay, ids, chunks)
    assert torch.equal(pages.gather(ts, lay, ids, per * bs), chunks)
    untouched = sorted(set(range(3 * per + 2)) - set(ids.flatten().tolist()))
    dim = 1 if fmt == "flash" else 0
    for t, b in zip(ts, before):
        assert torch.equal(t.index_select(dim, torch.tensor(untouched)), b.index_select(dim, torch.tensor(untouched)))


@pytest.mark.parametrize("fmt", pages.FORMATS)
def test_scatter_skips_blocks_marked_minus_one(fmt):
    lay, ts = _paged(fmt, 2, 3, 16, 8, 6, torch.float32)
    before = [t.clone() for t in ts]
    chunks = torch.randn(1, 2, 2, 3, 16, 16)
    pages.scatter(ts, lay, torch.tensor([[-1, 4]]), chunks)
    got = pages.gather(ts, lay, torch.tensor([[3, 4]]), 16)
    assert torch.equal(got[..., 8:, :], chunks[..., 8:, :])       # block 4 written
    dim = 1 if fmt == "flash" else 0
    for t, b in zip(ts, before):
        keep = torch.tensor([0, 1, 2, 3, 5])
        assert torch.equal(t.index_select(dim, keep), b.index_select(dim, keep))


def test_tokens_kv_cuts_a_partial_last_block():
    lay, ts = _paged("cpu-vec", 2, 3, 8, 4, 5, torch.float32)
    full = pages.gather(ts, lay, torch.tensor([[2, 0, 3]]), 12)[0]
    assert torch.equal(pages.tokens_kv(ts, lay, [2, 0, 3], 10), full[..., :10, :])


def test_detect_names_the_format_it_refuses():
    assert pages.detect(torch.zeros(7, 3, 32, 128), "vec") == pages.PageLayout("cpu-vec", 7, 32, 3, 64, torch.float32)
    with pytest.raises(ValueError, match="cpu-amx"):
        pages.detect(torch.zeros(7, 3, 32, 128), "amx")
    with pytest.raises(ValueError, match="MLA"):
        pages.detect(torch.zeros(7, 32, 576), "vec")
    with pytest.raises(ValueError, match="flash-attention layout"):
        pages.detect(torch.zeros(3, 7, 16, 2, 8, device="meta"))
    with pytest.raises(ValueError, match="page format 'paged-x'"):
        pages.PageLayout("paged-x", 1, 1, 1, 1, torch.float32)


def test_bad_shapes_are_errors_naming_them():
    lay, ts = _paged("flash", 2, 3, 8, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="not a multiple of block_size=4"):
        pages.gather(ts, lay, torch.tensor([[0]]), 6)
    with pytest.raises(ValueError, match=r"expected \[chunks, 2\]"):
        pages.gather(ts, lay, torch.tensor([[0, 1, 2]]), 8)
    with pytest.raises(ValueError, match="do not fit"):
        pages.scatter(ts, lay, torch.tensor([[0, 1]]), torch.zeros(1, 3, 2, 3, 8, 8))


# ---------------------------------------------------------------- the Triton copy (kernels/pages.py)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gather_and_scatter_are_bit_identical_to_torch(shape, dtype):
    # CPU interpreter (tests/conftest.py); layers are separate allocations, so some lie below layer 0 in
    # memory and the kernel's per-layer offsets from layer 0 are negative
    layers, h, d, bs, per = shape
    lay, ts = _paged("flash", layers, h, d, bs, 4 * per + 1, dtype)
    ids = torch.tensor([[2 * per + j for j in range(per)], [j + 1 for j in range(per)]])
    want = pages.gather(ts, lay, ids, per * bs, impl="torch")
    got = pages.gather([t.to(DEV) for t in ts], lay, ids, per * bs, impl="triton").cpu()
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    chunks = torch.randn(want.shape).to(dtype)
    ids2 = ids.clone()
    ids2[1, 0] = -1  # a block vLLM already holds: skipped by both
    ref = [t.clone() for t in ts]
    pages.scatter(ref, lay, ids2, chunks, impl="torch")
    dev = [t.clone().to(DEV) for t in ts]  # a copy also on the CPU: ts stays as it was
    pages.scatter(dev, lay, ids2, chunks, impl="triton")
    for a, b in zip(ref, dev):
        assert torch.equal(a.view(torch.uint8), b.cpu().view(torch.uint8))
    assert not torch.equal(ref[0], ts[0])  # it wrote something


def test_triton_path_refuses_what_it_cannot_address():
    lay, ts = _paged("flash", 2, 3, 8, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="block id 5 is outside"):
        pages.gather(ts, lay, torch.tensor([[0, 5]]), 8, impl="triton")
    with pytest.raises(ValueError, match="block id -2 is outside"):
        pages.scatter(ts, lay, torch.tensor([[-2, 1]]), torch.zeros(1, 2, 2, 3, 8, 8), impl="triton")
    with pytest.raises(ValueError, match="contiguous flash pages"):
        pages.gather([ts[0], ts[1].transpose(2, 3).contiguous().transpose(2, 3)], lay, torch.tensor([[0, 1]]), 8,
                     impl="triton")
    vec, vts = _paged("cpu-vec", 1, 3, 8, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="format 'cpu-vec'"):
        pages.gather(vts, vec, torch.tensor([[0, 1]]), 8, impl="triton")
    with pytest.raises(ValueError, match="impl 'cuda'"):
        pages.gather(ts, lay, torch.tensor([[0, 1]]), 8, impl="cuda")
    # auto on CPU is the torch path (the CPU engine's), whatever the format
    assert torch.equal(pages.gather(ts, lay, torch.tensor([[0, 1]]), 8), pages.gather(ts, lay, torch.tensor([[0, 1]]), 8, impl="torch"))


def test_triton_copy_of_layers_at_unaligned_offsets_in_one_buffer():
    # layers 3 fp16 elements (6 bytes) apart in one allocation: the kernel drops its 16-byte alignment hint
    lay = pages.PageLayout("flash", 5, 4, 3, 8, torch.float16)
    n = 2 * 5 * 4 * 3 * 8
    flat = torch.randn(3 * n + 9).to(torch.float16).to(DEV)
    ts = [flat[3 + i * (n + 3): 3 + i * (n + 3) + n].view(lay.shape()) for i in range(2)]
    from kernels import pages as KP

    assert KP.layer_offsets(ts, ts[0].device)[1] == 1
    ids = torch.tensor([[4, 1], [0, 2]])
    want = pages.gather(ts, lay, ids, 8, impl="torch")
    assert torch.equal(pages.gather(ts, lay, ids, 8, impl="triton"), want)
    before = flat.clone()
    pages.scatter(ts, lay, ids, want.flip(0).contiguous(), impl="triton")
    assert torch.equal(pages.gather(ts, lay, ids, 8, impl="torch"), want.flip(0))
    assert torch.equal(flat[:3], before[:3]) and torch.equal(flat[3 + n: 6 + n], before[3 + n: 6 + n])
