"""Triton kernels of kernels/mix.py (a bit width per slab) against their torch reference.

CPU, TRITON_INTERPRET=1 (tests/conftest.py). The rotation is kernels/rot.py's,
so are the bounds: a code may move by one step where the rotated value sits
within fp32 rounding of a rounding boundary (kernel fp32 vs reference float64),
a scale by one fp16 ulp; the decoders are compared bit for bit on the same
buffers. Odd shapes: 5 or 3 KV heads, 37/50 tokens, head_dim 16 and 64.
"""

import math

import pytest
import torch

from kernels import mix, rot
from kernels.pack import unpack_torch
from tritondev import tri as tri_

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
    tri = tri_(mix.encode_triton, kv, bits, SEED)
    assert sorted(ref) == sorted(tri)
    for b, q_ref in _codes(ref, bits, shape[-1]).items():
        diff = (q_ref - _codes(tri, bits, shape[-1])[b]).abs()
        assert diff.max() <= 1 and diff.float().mean() <= 1e-3, (b, diff.max(), diff.float().mean())
    assert torch.allclose(ref["scale"].float(), tri["scale"].float(), rtol=2**-10, atol=2**-24)
    assert torch.allclose(ref["nrm"], tri["nrm"], rtol=1e-5)  # squared row norms for sink detection
    out_ref = mix.decode_torch(tri, shape, dtype, bits, SEED)
    out_tri = tri_(mix.decode_triton, tri, shape, dtype, bits, SEED)
    assert out_tri.dtype == dtype and torch.equal(out_ref, out_tri)


def test_format_is_the_symmetric_quantizer_of_the_rotated_row():
    # an independent float64 reading of the stored bytes: x^ = ((q - qmax/2) * s) @ E.T / sqrt(D)
    shape = (2, 2, 3, 40, 64)
    kv = _kv(shape, torch.float32, seed=1)
    bits = [2, 3, 4, 8]
    b = mix.encode_torch(kv, bits, SEED)
    assert "zero" not in b  # the zero is implicit: -(qmax/2) * s
    out = mix.decode_torch(b, shape, torch.float32, bits, SEED).double().reshape(4, -1, 64)
    e, _ = rot.rotation(64, SEED, torch.float64, torch.device("cpu"))
    s = b["scale"].double().reshape(4, -1, 1)
    for w, slabs in mix.width_slabs(bits).items():
        q = unpack_torch([b[n] for n in mix.plane_names(w)], w, 64).double().reshape(len(slabs), -1, 64)
        want = ((q - ((1 << w) - 1) / 2) * s[slabs]) @ e.T / 8.0
        assert torch.allclose(out[slabs], want, rtol=1e-6, atol=1e-6)
        y = kv.double().reshape(4, -1, 64)[slabs] @ e / 8.0  # the scale is max|y| / (qmax/2), fp16-rounded
        assert torch.allclose(s[slabs].squeeze(-1), y.abs().amax(-1) / (((1 << w) - 1) / 2), rtol=2**-11)


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
    s = b["scale"].double()
    # per rotated coordinate: s/2, plus (qmax/2) * the fp16 rounding of s (the range may fall short of max|y|
    # by that), plus fp32 slop; sqrt(D) of that per row (orthonormal rotation), plus rounding to the output dtype
    per = s / 2 + qmax / 2 * s * 2**-11 + 1e-6 * s * qmax
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
    # codes + one fp16 per row: 2 layers, 3 heads, 10 tokens, D 64
    assert mix.payload_bits((2, 2, 3, 10, 64), [2, 3, 4, 8]) == 30 * 64 * 17 + 4 * 30 * 16
