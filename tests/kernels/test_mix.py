"""Triton kernels of kernels/mix.py (a bit width per slab) against their torch reference.

CPU, TRITON_INTERPRET=1 (tests/conftest.py). Per row the math is kernels/rot.py's,
so the bounds are rot's: a code may move by one step where the rotated value sits
within fp32 rounding of a rounding boundary (kernel fp32 vs reference float64),
scales/zeros by one fp16 ulp; the decoders are compared bit for bit on the same
buffers. Odd shapes: 5 or 3 KV heads, 37/50 tokens, head_dim 16 and 64.
"""

import math

import pytest
import torch

from kernels import mix, rot
from kernels.pack import unpack_torch

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SEED = 777


def _kv(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[:, 0] = x[:, 0] * torch.logspace(-1, 1, shape[-1]) + 3 * torch.randn(shape[-1], generator=g)
    return x.to(dtype)


CASES = [  # shape, bit table (layer * 2 + kv)
    ((3, 2, 5, 37, 64), [2, 3, 4, 8, 3, 2]),  # every width, interleaved
    ((2, 2, 3, 50, 16), [3, 3, 3, 3]),  # one width only: a single launch covers every slab
    ((2, 2, 3, 50, 64), [8, 2, 2, 8]),
]


def _codes(bufs, bits, d):
    return {b: unpack_torch([bufs[n] for n in mix.plane_names(b)], b, d) for b in mix.width_slabs(bits)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bits", CASES)
def test_mix_triton_matches_torch(shape, bits, dtype):
    kv = _kv(shape, dtype, seed=sum(bits) + shape[3])
    ref = mix.encode_torch(kv, bits, SEED)
    tri = mix.encode_triton(kv, bits, SEED)
    assert sorted(ref) == sorted(tri)
    for b, q_ref in _codes(ref, bits, shape[-1]).items():
        diff = (q_ref - _codes(tri, bits, shape[-1])[b]).abs()
        assert diff.max() <= 1 and diff.float().mean() <= 1e-3, (b, diff.max(), diff.float().mean())
    for k in ("scale", "zero"):
        assert torch.allclose(ref[k].float(), tri[k].float(), rtol=2**-10, atol=2**-24)
    assert torch.allclose(ref["nrm"], tri["nrm"], rtol=1e-5)  # squared row norms for sink detection
    out_ref = mix.decode_torch(tri, shape, dtype, bits, SEED)
    out_tri = mix.decode_triton(tri, shape, dtype, bits, SEED)
    assert out_tri.dtype == dtype and torch.equal(out_ref, out_tri)


def test_mix_of_one_width_is_rot_exactly():
    # per row the format is rot's: a uniform table stores rot's codes, scales and zeros byte for byte
    shape = (2, 2, 3, 40, 64)
    kv = _kv(shape, torch.bfloat16, seed=1)
    for b in (2, 3, 4):
        m = mix.encode_torch(kv, [b] * 4, SEED)
        r = rot.encode_torch(kv, b, SEED)
        for mk, rk in zip(mix.plane_names(b), ("q", "q1")):
            assert torch.equal(m[mk].flatten(), r[rk].flatten())
        assert torch.equal(m["scale"], r["scale"]) and torch.equal(m["zero"], r["zero"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mix_error_bound_per_slab_width(dtype):
    shape = (3, 2, 3, 40, 64)
    bits = [2, 8, 4, 3, 3, 4]
    kv = _kv(shape, dtype, seed=5)
    b = mix.encode_torch(kv, bits, SEED)
    out = mix.decode_torch(b, shape, dtype, bits, SEED).double()
    x = kv.double()
    d = shape[-1]
    qmax = torch.tensor([(1 << w) - 1 for w in bits], dtype=torch.float64).reshape(3, 2, 1, 1)
    s, z = b["scale"].double(), b["zero"].double()
    # rot's bound (kernels/rot.py) with each slab's own qmax: per rotated coordinate scale/2 + fp16 rounding
    # of zero and scale, sqrt(D) of that per row, plus rounding to the output dtype
    per = s / 2 + z.abs() * 2**-11 + qmax * s * 2**-11 + 1e-6 * (s * qmax + z.abs())
    out_ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[dtype]
    bound = math.sqrt(d) * per + (out.abs() * out_ulp).norm(dim=-1)
    err = (x - out).norm(dim=-1)
    assert (err <= bound).all()
    # and the widths do what they say: the 8-bit slab is >50x more precise than the 2-bit one
    rel = (err / x.norm(dim=-1)).mean((2, 3))
    assert rel[0, 1] * 50 < rel[0, 0]


def test_width_slabs_and_payload_bits():
    assert mix.width_slabs([4, 2, 4, 8]) == {2: [1], 4: [0, 2], 8: [3]}
    assert mix.plane_names(3) == ("q3", "q3h") and mix.plane_names(8) == ("q8",)
    # codes + two fp16 per row: 2 layers, 3 heads, 10 tokens, D 64
    assert mix.payload_bits((2, 2, 3, 10, 64), [2, 3, 4, 8]) == 30 * 64 * 17 + 4 * 30 * 32
