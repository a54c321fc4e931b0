"""Triton kernels of kernels/kivi.py and kernels/rot.py against their torch references.

Run on the CPU under TRITON_INTERPRET=1 on odd shapes (kv_heads 5, 123 or 130
tokens: ragged token groups; head_dim 96: masked columns). KIVI does the same
fp32 operations on both paths, so everything is compared bit for bit. The rot
encoder rotates in fp32 on the kernel side and in float64 in the reference,
so a code may move by one step where the rotated value sits within fp32
rounding of a rounding boundary (bounded below); the rot decoder is exact
(integer codes times +-1) and compared bit for bit.
"""

import math

import pytest
import torch

from kernels import kivi, rot
from tritondev import tri as tri_

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _kv(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[:, 0] *= torch.logspace(-1, 1, shape[-1])  # keys: outlier channels, 100x apart
    x[:, 0] += 3 * torch.randn(shape[-1], generator=g)  # and per-channel offsets, as RoPE'd keys have
    return x.to(dtype)


KIVI_CASES = [  # bits, k_group, v_group, shape
    (4, 64, 64, (3, 2, 5, 123, 64)),
    (2, 32, 32, (3, 2, 5, 130, 64)),
    (3, 16, 32, (2, 2, 3, 37, 96)),  # 3-bit planes, head_dim 96 (columns masked to 128), 37 tokens
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,k_group,v_group,shape", KIVI_CASES)
def test_kivi_triton_bit_identical_to_torch(bits, k_group, v_group, shape, dtype):
    kv = _kv(shape, dtype, seed=bits + shape[3])
    ref = kivi.encode_torch(kv, bits, k_group, v_group)
    tri = tri_(kivi.encode_triton, kv, bits, k_group, v_group)
    assert sorted(ref) == sorted(tri)
    L, _, H, T, D = shape
    assert ref["k_scale"].shape == (L, H, math.ceil(T / k_group), D)
    assert ref["v_scale"].shape == (L, H, T, D // v_group)
    # also compiled on a GPU: the kernel divides with div_rn and its launch turns FMA contraction off, so
    # every fp32 operation rounds as torch's (the H200 run before that: fp16 scales one ulp off at ties,
    # codes one step off on <= 2e-5 of values)
    for name in ref:
        assert torch.equal(ref[name], tri[name]), name
    out_ref = kivi.decode_torch(ref, shape, dtype, bits, k_group, v_group)
    out_tri = tri_(kivi.decode_triton, ref, shape, dtype, bits, k_group, v_group)
    assert out_tri.dtype == dtype and torch.equal(out_ref, out_tri)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 2])
def test_kivi_error_bound(bits, dtype):
    shape = (2, 2, 3, 70, 64)
    k_group, v_group = 32, 16
    kv = _kv(shape, dtype, seed=11)
    b = kivi.encode_torch(kv, bits, k_group, v_group)
    out = kivi.decode_torch(b, shape, dtype, bits, k_group, v_group).double()
    qmax = (1 << bits) - 1
    T = shape[3]
    ks = b["k_scale"].double().repeat_interleave(k_group, 2)[:, :, :T]
    kz = b["k_zero"].double().repeat_interleave(k_group, 2)[:, :, :T]
    vs = b["v_scale"].double().repeat_interleave(v_group, 3)
    vz = b["v_zero"].double().repeat_interleave(v_group, 3)
    for i, (s, z) in enumerate(((ks, kz), (vs, vz))):
        x = kv[:, i].double()
        # scale/2 from rounding; plus the fp16 rounding of zero (half an ulp, <= 2**-11 |zero|) and of scale,
        # which qmax steps multiply; plus rounding the result to the output dtype
        bound = s / 2 + z.abs() * 2**-11 + qmax * s * 2**-11 + 2**-24
        out_ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[dtype]
        bound = bound + out[:, i].abs() * out_ulp
        assert ((x - out[:, i]).abs() <= bound).all()
        assert (s > 0).all()  # random data: no constant group


ROT_CASES = [((3, 2, 5, 123, 64), bits, dtype) for bits in (4, 3, 2) for dtype in DTYPES]
# head_dim 128 (Llama's): the interpreter spends ~4 s a case on its 128x128 products, so two cases
ROT_CASES += [((2, 2, 3, 130, 128), 3, torch.bfloat16), ((2, 2, 3, 130, 128), 4, torch.float32)]


@pytest.mark.parametrize("shape,bits,dtype", ROT_CASES)
def test_rot_triton_matches_torch(shape, bits, dtype):
    kv = _kv(shape, dtype, seed=bits * 7 + shape[-1])
    seed = 12345
    ref = rot.encode_torch(kv, bits, seed)
    tri = tri_(rot.encode_triton, kv, bits, seed)
    assert sorted(ref) == sorted(tri)
    q_ref = rot.unpack_torch([ref[k] for k in ("q", "q1") if k in ref], bits, shape[-1])
    q_tri = rot.unpack_torch([tri[k] for k in ("q", "q1") if k in tri], bits, shape[-1])
    diff = (q_ref - q_tri).abs()
    # fp32 (kernel) vs float64 (reference) rotation: a code moves by at most one step, and only at a boundary
    assert diff.max() <= 1
    assert diff.float().mean() <= 1e-3
    for k in ("scale", "zero"):
        # min/max of the rotated row differ by fp32 rounding at most; after fp16 rounding: equal or one ulp
        assert torch.allclose(ref[k].float(), tri[k].float(), rtol=2**-10, atol=2**-24)
    out_ref = rot.decode_torch(tri, shape, dtype, bits, seed)
    out_tri = tri_(rot.decode_triton, tri, shape, dtype, bits, seed)
    assert out_tri.dtype == dtype and torch.equal(out_ref, out_tri)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_rot_error_bound(bits, dtype):
    shape = (2, 2, 3, 40, 64)
    kv = _kv(shape, dtype, seed=bits)
    b = rot.encode_torch(kv, bits, seed=99)
    out = rot.decode_torch(b, shape, dtype, bits, seed=99).double()
    x = kv.double()
    qmax = (1 << bits) - 1
    s, z = b["scale"].double(), b["zero"].double()
    d = shape[-1]
    # per rotated coordinate: scale/2 + fp16 rounding of zero and of scale (times qmax steps) + fp32 slop;
    # the rotation is orthonormal, so a row's L2 error is at most sqrt(D) times that ...
    per = s / 2 + z.abs() * 2**-11 + qmax * s * 2**-11 + 1e-6 * (s * qmax + z.abs())
    out_ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[dtype]
    # ... plus rounding the decoded row to the output dtype (half an ulp per element, L2 over the row)
    bound = math.sqrt(d) * per + (out.abs() * out_ulp).norm(dim=-1)
    err = (x - out).norm(dim=-1)
    assert (err <= bound).all()
    # and the rotation is doing its job: the error is spread, far below the per-element worst case
    assert (err / math.sqrt(d)).mean() < (s / 2).mean()


def test_rot_signs_are_a_fixed_function_of_the_seed():
    # a stored block names its seed; these signs must never change, or old blocks decode to garbage
    s = rot.signs(16, 0x6B76746965720001)
    assert s == [-1, 1, -1, -1, -1, 1, 1, -1, -1, 1, 1, -1, 1, 1, -1, -1]
    assert rot.signs(16, 1) != s
    e, c = rot.rotation(64, 5, torch.float64, torch.device("cpu"))
    assert torch.equal(e @ e.T, 64 * torch.eye(64, dtype=torch.float64))  # orthogonal up to sqrt(D)
    assert torch.equal(c.double(), torch.ones(64, dtype=torch.float64) @ e.T)
