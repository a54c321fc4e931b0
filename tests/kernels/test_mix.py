"""Triton kernels of kernels/mix.py (a bit width per slab) against their torch reference.

CPU, TRITON_INTERPRET=1 (tests/conftest.py). The rotation is kernels/rot.py's,
so are the bounds: a code may move by one step where the rotated value sits
within fp32 rounding of a rounding boundary (kernel fp32 vs reference float64),
a scale by one fp16 ulp; the decoders are compared bit for bit on the same
buffers. Odd shapes: 3 KV heads, 37/50 tokens, head_dim 16 and 64; bit tables per
layer and per head; with and without key weights (fused into the kernels).
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


def _w(shape, seed):
    L, _, H, _, D = shape
    g = torch.Generator().manual_seed(seed)
    return torch.exp(0.5 * torch.randn(L, H, D, generator=g)).to(torch.float16)


CASES = [  # shape, bit table (layer * 2 + kv, or (layer * 2 + kv) * H + head), key weights
    ((3, 2, 3, 37, 64), [2, 3, 4, 8, 5, 6], False),  # every width, interleaved
    ((2, 2, 3, 50, 16), [3, 3, 3, 3], True),  # one width only: a single launch covers every slab
    ((2, 2, 3, 50, 64), [8, 2, 2, 8], True),  # per layer, weighted: launched over per-head slabs
    ((2, 2, 3, 37, 64), [6, 5, 4, 3, 2, 8, 5, 5, 2, 3, 4, 6], True),  # per head (unweighted: same launch path)
]


def _codes(bufs, bits, d):
    return {b: unpack_torch([bufs[n] for n in mix.plane_names(b)], b, d) for b in mix.width_slabs(bits)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bits,weighted", CASES)
def test_mix_triton_matches_torch(shape, bits, weighted, dtype):
    kv = _kv(shape, dtype, seed=sum(bits) + shape[3])
    w = _w(shape, 3) if weighted else None
    ref = mix.encode_torch(kv, bits, SEED, w)
    tri = tri_(mix.encode_triton, kv, bits, SEED, w)
    assert sorted(ref) == sorted(tri)
    for b, q_ref in _codes(ref, bits, shape[-1]).items():
        diff = (q_ref - _codes(tri, bits, shape[-1])[b]).abs()
        assert diff.max() <= 1 and diff.float().mean() <= 1e-3, (b, diff.max(), diff.float().mean())
    assert torch.allclose(ref["scale"].float(), tri["scale"].float(), rtol=2**-10, atol=2**-24)
    assert torch.allclose(ref["nrm"], tri["nrm"], rtol=1e-5)  # squared row norms for sink detection
    out_ref = mix.decode_torch(tri, shape, dtype, bits, SEED, w)
    out_tri = tri_(mix.decode_triton, tri, shape, dtype, bits, SEED, w)
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
@pytest.mark.parametrize("weighted", [False, True])
def test_mix_error_bound_per_slab_width(dtype, weighted):
    shape = (4, 2, 3, 40, 64)
    bits = [2, 8, 4, 3, 3, 4, 5, 6]
    kv = _kv(shape, dtype, seed=5)
    w = _w(shape, 4) if weighted else None
    b = mix.encode_torch(kv, bits, SEED, w)
    out = mix.decode_torch(b, shape, dtype, bits, SEED, w).double()
    x = kv.double()
    d = shape[-1]
    wf = torch.ones(4, 2, 3, 1, d, dtype=torch.float64)
    if weighted:
        wf[:, 0, :, 0] = w.double()
    qmax = torch.tensor([(1 << w_) - 1 for w_ in bits], dtype=torch.float64).reshape(4, 2, 1, 1)
    s = b["scale"].double()
    # in the weighted frame, per rotated coordinate: s/2, plus (qmax/2) * the fp16 rounding of s (the range may
    # fall short of max|y| by that), plus fp32 slop; sqrt(D) of that per row (orthonormal rotation), plus the
    # rounding of x * w to fp16 (weighted, non-fp32 input) and of the output to its dtype (times w)
    per = s / 2 + qmax / 2 * s * 2**-11 + 1e-6 * s * qmax
    out_ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[dtype]
    in_ulp = 2**-11 if weighted and dtype != torch.float32 else 0.0
    bound = math.sqrt(d) * per + (x * wf).norm(dim=-1) * in_ulp + (out.abs() * wf * out_ulp).norm(dim=-1)
    err = ((x - out) * wf).norm(dim=-1)
    assert (err <= bound).all()
    # and the widths do what they say: the 8-bit slab is >50x more precise than the 2-bit one, and each
    # added bit about halves the error (2 -> 3 -> 4 -> 5 -> 6: layers 0-3 hold every width)
    rel = (err / (x * wf).norm(dim=-1)).mean((2, 3)).flatten()
    assert rel[1] * 50 < rel[0]
    by_width = [rel[bits.index(k)] for k in (2, 3, 4, 5, 6)]
    assert all(1.6 < a / b_ < 2.6 for a, b_ in zip(by_width, by_width[1:])), by_width


def test_per_layer_table_and_its_per_head_expansion_store_the_same_bytes():
    shape = (2, 2, 3, 37, 64)
    kv = _kv(shape, torch.bfloat16, seed=9)
    per_layer = [5, 2, 6, 3]
    per_head = [b for b in per_layer for _ in range(3)]
    a = mix.encode_torch(kv, per_layer, SEED)
    b = mix.encode_torch(kv, per_head, SEED)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(mix.decode_torch(a, shape, torch.bfloat16, per_layer, SEED),
                       mix.decode_torch(a, shape, torch.bfloat16, per_head, SEED))
    assert mix.plane_rows(shape, per_layer) == mix.plane_rows(shape, per_head) == {2: 111, 3: 111, 5: 111, 6: 111}
    # and a per-head table does put a width on one head only: head 1 of layer 0's K at 8 bits, the rest at 2
    one = [2] * 12
    one[1] = 8
    c = mix.encode_torch(kv, one, SEED)
    assert c["q8"].shape == (37, 64) and c["q2"].shape == (11 * 37, 16)
    err = (mix.decode_torch(c, shape, torch.bfloat16, one, SEED).float() - kv.float()).norm(dim=-1).mean(-1)
    assert err[0, 0, 1] * 30 < err[0, 0, 0] and err[0, 0, 1] * 30 < err[0, 0, 2]


def test_bad_tables_and_weights_are_named():
    shape = (2, 2, 3, 10, 64)
    kv = _kv(shape, torch.float32, seed=2)
    with pytest.raises(ValueError, match="bit table of 5 entries for 2 layers, 3 heads: expected 4 .* or 12"):
        mix.encode_torch(kv, [2, 3, 4, 8, 2], SEED)
    with pytest.raises(ValueError, match=r"key weights torch.float32 \(2, 3, 64\): expected float16"):
        mix.encode_torch(kv, [2, 3, 4, 8], SEED, torch.ones(2, 3, 64))
    with pytest.raises(ValueError, match=r"\(3, 3, 64\): expected float16 \[2, 3, 64\]"):
        mix.decode_torch({"scale": torch.zeros(2, 2, 3, 10, dtype=torch.float16)}, shape, torch.float32,
                         [2, 3, 4, 8], SEED, torch.ones(3, 3, 64, dtype=torch.float16))


def test_width_slabs_and_payload_bits():
    assert mix.width_slabs([4, 2, 4, 8]) == {2: [1], 4: [0, 2], 8: [3]}
    assert mix.plane_names(3) == ("q3", "q3h") and mix.plane_names(8) == ("q8",)
    assert mix.plane_names(5) == ("q5", "q5h") and mix.plane_names(6) == ("q6", "q6h")
    # codes + one fp16 per row: 2 layers, 3 heads, 10 tokens, D 64; per layer and per head
    assert mix.payload_bits((2, 2, 3, 10, 64), [2, 3, 4, 8]) == 30 * 64 * 17 + 4 * 30 * 16
    per_head = [2, 3, 4, 5, 6, 8, 2, 2, 2, 2, 2, 2]
    assert mix.payload_bits((2, 2, 3, 10, 64), per_head) == 10 * 64 * sum(per_head) + 12 * 10 * 16


def test_codec_refuses_keys_whose_weighted_values_leave_fp16():
    # the codec's check() bounds |kv|, the kernels round kv * w to fp16: an overflow must be an error, not inf
    from kvtier.codecs.mix import MixCodec
    from kvtier.errors import CodecError

    shape = (2, 2, 3, 16, 64)
    kv = _kv(shape, torch.bfloat16, seed=3)
    kv[1, 0, 2, 5, 7] = 3000.0
    w = torch.ones(2, 3, 64, dtype=torch.float16)
    MixCodec("q5").encode(kv, bits=[4] * 4, key_weights=w)  # in range: fine
    w[1, 2, 7] = 30.0  # 3000 * 30 = 90000 > 65504
    with pytest.raises(CodecError, match="keys times their weights exceed the fp16 range"):
        MixCodec("q5").encode(kv, bits=[4] * 4, key_weights=w)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy says what the test makes happen
def test_an_fp16_overflow_marks_the_row_norm_infinite_on_both_paths():
    # x * w = 64000 fits fp16 (the product is checked by nothing else), but the row's rotated max 512000 gives
    # a 2-bit scale of 341333 > 65504: the row's norm must say so (the codec's one overflow check reads it)
    shape = (1, 2, 2, 16, 64)
    kv = _kv(shape, torch.bfloat16, seed=4)
    kv[0, 0, 1, 3] = 8000.0
    w = torch.ones(1, 2, 64, dtype=torch.float16)
    w[0, 1] = 8.0
    for enc in (mix.encode_torch, lambda *a: tri_(mix.encode_triton, *a)):
        nrm = enc(kv, [2, 2], SEED, w)["nrm"]
        assert torch.isinf(nrm[0, 0, 1, 3]) and int(torch.isinf(nrm).sum()) == 1
