"""Triton kernels of kernels/pack.py and kernels/fp8.py against their torch references.

The kernels run on the CPU under TRITON_INTERPRET=1 (tests/conftest.py) on odd
shapes; every comparison here is bit for bit: these kernels do integer and
exactly-rounded float operations only (see the module docstrings).
"""

import pytest
import torch

from kernels import fp8, pack
from tritondev import tri

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("d", [64, 40])  # 40: not a power of two, masked columns in the kernel
def test_pack_triton_matches_torch_and_round_trips(bits, d):
    g = torch.Generator().manual_seed(bits * 100 + d)
    q = torch.randint(0, 1 << bits, (7, 5, d), generator=g, dtype=torch.int32)
    ref = pack.pack_torch(q, bits)
    got = tri(pack.pack_triton, q, bits)
    assert [p.shape[-1] for p in ref] == [d * b // 8 for b in pack.PLANES[bits]]
    for r, t in zip(ref, got):
        assert torch.equal(r, t)
    assert torch.equal(pack.unpack_torch(ref, bits, d), q)
    assert torch.equal(tri(pack.unpack_triton, ref, bits, d), q)


def test_pack_layout_is_little_end_first():
    # the stored layout is the format: byte = q0 | q1 << 4 for 4 bits; 3 bits = 2-bit plane + high-bit plane
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.int32)
    assert pack.pack_torch(q, 4)[0].tolist() == [[0x21, 0x43, 0x65, 0x07]]
    lo, hi = pack.pack_torch(q, 3)
    assert lo.tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 1 | 2 << 2 | 3 << 4 | 0 << 6]]
    assert hi.tolist() == [[0b01111000]]
    # 5 and 6 bits: a nibble plane (low 4 bits) + a 1- or 2-bit plane (the high bits)
    q = torch.tensor([[17, 2, 31, 4, 16, 6, 7, 0]], dtype=torch.int32)
    lo, hi = pack.pack_torch(q, 5)
    assert lo.tolist() == [[0x21, 0x4F, 0x60, 0x07]] and hi.tolist() == [[0b00010101]]
    q = torch.tensor([[63, 1, 32, 16]], dtype=torch.int32)
    lo, hi = pack.pack_torch(torch.cat([q, q], 1), 6)
    assert lo.tolist() == [[0x1F, 0x00, 0x1F, 0x00]] and hi.tolist() == [[0b01100011, 0b01100011]]


def test_pack_rejects_unpackable_head_dim():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack.pack_torch(torch.zeros(2, 12, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="7-bit"):
        pack.check_packable(64, 7)
    with pytest.raises(ValueError, match="multiple of 8"):  # 5 bits: a 1-bit plane
        pack.check_packable(36, 5)


def _fp8_input(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # channels spanning 1e-4 .. 1e2 put some values into e4m3's subnormals; special rows on top
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[-1])
    x[0, 0, 0, 0] = 0.0  # all-zero row: exponent clamps at EXP_MIN, codes are zero
    x[0, 0, 0, 1, :7] = -0.0
    x[0, 1, 0, 2] = 1e-3 * torch.randn(shape[-1], generator=g)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2, 5, 123, 64), (2, 2, 3, 130, 96)])
def test_fp8_triton_bit_identical_to_torch(shape, dtype):
    x = _fp8_input(shape, dtype, seed=shape[3])
    c_ref, e_ref = fp8.encode_torch(x)
    c_tri, e_tri = tri(fp8.encode_triton, x)
    assert torch.equal(e_ref, e_tri)
    assert torch.equal(c_ref, c_tri)  # integer e4m3 rounding == torch's float8_e4m3fn cast, bit for bit
    d_ref = fp8.decode_torch(c_ref, e_ref, dtype)
    d_tri = tri(fp8.decode_triton, c_ref, e_ref, dtype)
    assert d_tri.dtype == dtype and torch.equal(d_ref, d_tri)


def test_fp8_rounding_ties_and_carries_match_torch():
    # every e4m3 code, the midpoints between neighbours (ties to even) and values just around them
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[vals < 256]
    mids = (vals[1:] + vals[:-1]) / 2
    y = torch.cat([vals, mids, mids * (1 + 2**-20), mids * (1 - 2**-20)])
    y = torch.cat([y, -y])
    x = torch.zeros(1, 1, 1, 1, 2048)
    x[..., : y.numel()] = y
    x[..., -1] = 255.0  # pins the row's exponent to 0, so x is quantized as is
    codes, e = tri(fp8.encode_triton, x)
    assert e.item() == 0
    assert torch.equal(codes[..., : y.numel()].flatten(), y.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_relative_error_bound(dtype):
    x = _fp8_input((2, 2, 3, 50, 64), dtype, seed=7)
    codes, e = fp8.encode_torch(x)
    xh = fp8.decode_torch(codes, e, dtype).double()
    xd = x.double()
    # 3 mantissa bits, round to nearest: half an ulp is <= 2**-4 |x|; e4m3 subnormals are spaced 2**(e-9)
    bound = torch.maximum(xd.abs() * 2**-4, 2.0 ** (e.double() - 10).unsqueeze(-1))
    if dtype == torch.float16:
        bound = bound + 2**-25  # the decoded value may fall into fp16's subnormals (spacing 2**-24)
    assert ((xd - xh).abs() <= bound).all()
    assert (e >= fp8.EXP_MIN).all() and (e <= fp8.EXP_MAX).all()
    ratio = x.abs().amax(-1).double() / 2.0 ** e.double()
    nonzero = x.abs().amax(-1) > 0
    assert ((ratio[nonzero] >= 128) & (ratio[nonzero] < 256)).all()  # the documented scale choice
