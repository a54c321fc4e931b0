"""kernels/wsum.py: the Triton payload sums against their torch reference, bit for bit, and what they catch.

CPU, TRITON_INTERPRET=1 (tests/conftest.py); compiled on the GPU with TRITON_INTERPRET=0 (tritondev.DEV).
"""

import pytest
import torch

from kernels import wsum
from tritondev import DEV


def _bytes(n, seed):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _triton(bufs):
    dev = [b.to(DEV) for b in bufs]
    got = wsum.sums_triton([(b.data_ptr(), b.numel()) for b in dev], DEV).cpu().tolist()
    return [tuple(v & wsum._M64 for v in g) for g in got]


def test_the_kernel_matches_the_reference_over_many_buffers_of_odd_sizes_in_one_launch():
    bufs = [_bytes(n, i) for i, n in enumerate([1, 3, 4, 7, 4096, 4099, wsum.CHUNK + 5, 2 * wsum.CHUNK])]
    bufs.insert(3, torch.empty(0, dtype=torch.uint8))
    want = [wsum.sums_torch(b) for b in bufs]
    assert _triton(bufs) == want
    assert want[3] == (0, 0) and len(set(want)) == len(want)


def test_partial_sums_add_up_and_zero_bytes_count_only_through_the_size():
    a = _bytes(300_001, 5)
    whole = wsum.sums_torch(a)
    for cut in (1, 2, 3, 4, 150_000, 300_000):
        lo, hi = wsum.sums_torch(a[:cut]), wsum.sums_torch(a[cut:], start=cut)
        assert tuple((x + y) & wsum._M64 for x, y in zip(lo, hi)) == whole
    padded = torch.cat([a, torch.zeros(8, dtype=torch.uint8)])
    assert wsum.sums_torch(padded) == whole, "trailing zeros add nothing: a block's sums carry each buffer's size"


def test_every_single_bit_flip_swap_and_zeroed_range_changes_both_lanes():
    a = _bytes(50_000, 9)
    want = wsum.sums_torch(a)
    for pos in [0, 1, 2, 3, 4, 999, 25_000, 49_999]:
        for bit in range(8):
            b = a.clone()
            b[pos] ^= 1 << bit
            got = wsum.sums_torch(b)
            assert got[0] != want[0] and got[1] != want[1], (pos, bit)
    swapped = a.clone()
    swapped[100:104], swapped[2000:2004] = a[2000:2004], a[100:104]
    zeroed = a.clone()
    zeroed[30_000:31_000] = 0
    for bad in (swapped, zeroed):
        got = wsum.sums_torch(bad)
        assert got[0] != want[0] and got[1] != want[1]
    assert _triton([swapped, zeroed]) == [wsum.sums_torch(swapped), wsum.sums_torch(zeroed)]


def test_hex_sums_name_each_tensors_bytes_whatever_its_dtype():
    t = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    got = wsum.hex_sums({"a": t, "b": t.to(torch.float16)})
    assert set(got) == {"a", "b"} and all(len(h) == 32 for h in got.values())
    assert got["a"] == wsum.to_hex(wsum.sums_torch(t.reshape(-1).view(torch.uint8)))
    with pytest.raises(ValueError, match="1-D uint8"):
        wsum.sums_torch(t)


def test_the_kernel_refuses_unaligned_buffers_by_address():
    a = _bytes(64, 3).to(DEV)
    with pytest.raises(ValueError, match="4-byte aligned"):
        wsum.sums_triton([(a.data_ptr() + 1, 8)], DEV)
