"""The quality-budget codecs ``q0.5``, ``q1``, ``q2``, ``q5``: calibrated bits per slab + exact sink tokens.

Ask for a quality budget, not a scheme: ``q1`` is "the smallest KV this
model's calibration kept within +1 % Δppl", ``q2`` within +2 %, ``q5`` within +5 %, ``q0.5``
within +0.5 % (and >= 97 % top-1 agreement on the calibration text).

Per row (one token of one head of K or V): ``rot``'s randomized Hadamard
rotation, then a symmetric 2/3/4/8-bit quantizer with one fp16 scale per row
(``kernels/mix.py``; 16/D bits per element of overhead, half of rot's). What is new, each measured on SmolLM2-135M
(kernels/NOTES.md, "issue 13"):
- **a bit width per slab** (the K or the V of one layer) from a per-model
  profile (``profile.py``, written by ``calibrate.py``): slabs differ in how
  much a 2-bit slab hurts by more than 10x, so bits go where they matter;
- **sink tokens kept exact**: the first token of a sequence takes a large
  share of attention; quantizing it cost rot3 half its Δppl (+3.4 % -> +1.6 %
  with it exact). The chunk does not know its position, so the codec finds
  sinks from the chunk itself: a token whose row norms deviate from the
  chunk's median by a mean |log ratio| > ``SINK_TAU`` over all slabs and heads
  (0.8: the sink measured 1.16-1.23, every other token <= 0.52). Those tokens
  are stored again in the input dtype (``sink`` buffer, their indices in the
  params), every byte counted; at most ``MAX_SINKS`` per chunk;
- **query-weighted keys** (when the profile has ``key_weights``): what a key's
  error costs is its error along the queries, E[(q . dk)^2]. Each key channel
  c of layer l, head h is multiplied by w = (E[q_c^2] / E[k_c^2])^(1/4)
  (calibrated on post-RoPE queries and keys; the minimizer of that error for a
  diagonal weighting under an isotropic quantizer) before the rotation and
  divided by it after decoding, so the error lands where the queries look
  less. On SmolLM2 it cut KL by 9-34 % at equal bits (bench/results/quality.md, notes). The
  weights travel in the block (``kw`` buffer, fp16 [L, H, D]: 11.5 KiB, 1.2 %
  of a 256-token q5 chunk, counted in every ratio), so decoding still reads
  nothing else. The kernels apply them (``kernels/mix.py``: no extra pass
  over the chunk; as torch operations around the kernels they cost 3-3.5x,
  bench/results/qcodec-h200.md).

Without a profile for the chunk's model (or without a ``model_id``) a codec
falls back to one width for every slab (``FALLBACK``), still with the sinks.

A block is self-describing: bit table, seed, sink indices and the profile's
digest are in its params, under the block checksum; decoding reads nothing
else, so no other profile can ever be applied to it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from kernels import mix as M
from kernels.pack import plane_bytes
from kvtier.codecs import Codec, register_codec
from kvtier.codecs import profile as P
from kvtier.codecs.kivi import expect_names, int_param, is_pow2, on_device, take
from kvtier.codecs.rot import MAX_D, MIN_D, ROTATION, SEED, check_rotatable
from kvtier.errors import CodecError

SINK_TAU = 0.8
MAX_SINKS = 8  # 8 of 256 tokens would add 0.5 bit/elem; the sink is one token, the cap bounds a pathological chunk
# fallback widths without a profile: the smallest uniform width that met each budget on both texts in
# bench/results/quality.md (uniform 4 bits, rot4: +1.61 % on the held-out text, so q1 needs 8; uniform
# 3 bits, rot3: +6.1 %, so q5 needs 4, and q2 4 too). Conservative on purpose: an uncalibrated model has
# no measurement.
FALLBACK = {"q0.5": 8, "q1": 8, "q2": 4, "q5": 4}


def detect_sinks(nrm: torch.Tensor) -> list[int]:
    """Tokens whose row norms (``nrm``: squared, [L, 2, H, T]) deviate most from each row set's median."""
    T = nrm.shape[-1]
    if T < 2:
        return []
    n = nrm.clamp_min(1e-30).sqrt()
    med = n.median(-1, keepdim=True).values
    score = (n / med).log().abs().mean((0, 1, 2))
    top = score.topk(min(MAX_SINKS, T))
    return sorted(int(t) for s, t in zip(top.values.tolist(), top.indices.tolist()) if s > SINK_TAU)


class MixCodec(Codec):
    uses_model = True  # compress() passes model_id: the profile is looked up by fingerprint

    def __init__(self, name: str, seed: int = SEED):
        self.name, self.seed = name, seed

    def check(self, kv: torch.Tensor) -> None:
        check_rotatable(kv, self.name)

    def bits(self, shape: tuple[int, ...], model_id: str | None) -> tuple[list[int], str | None, torch.Tensor | None]:
        """(bit table, profile digest, fp16 key weights or None) for a chunk of ``shape`` of model ``model_id``."""
        prof = P.lookup(model_id)
        if prof is None:
            return [FALLBACK[self.name]] * (2 * shape[0]), None, None
        return prof.bits_for(self.name, shape), prof.digest, prof.key_weight_tensor()

    def encode(self, kv: torch.Tensor, model_id: str | None = None, bits: list[int] | None = None,
               key_weights: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``bits``/``key_weights``: an explicit table and weights (calibration measures candidates with
        them; no profile is named)."""
        if bits is None:
            bits, digest, key_weights = self.bits(tuple(kv.shape), model_id)
        else:
            digest = None
        w = None
        if key_weights is not None:
            L, _, H, _, D = kv.shape
            w = key_weights.to(device=kv.device, dtype=torch.float16)
            if tuple(w.shape) != (L, H, D) or not bool(((w > 0) & torch.isfinite(w)).all()):
                raise CodecError(f"codec {self.name!r}: key weights of shape {tuple(w.shape)} must be positive "
                                 f"and [{L}, {H}, {D}] for a chunk of shape {tuple(kv.shape)}")
        enc = M.encode_triton if kv.is_cuda else M.encode_torch
        with on_device(kv.device):
            # the kernels weight the K rows (kernels/mix.py): x * w rounded to fp16 (fp32 for fp32 KV), 2**-11
            # relative, 4x finer than the bf16 the KV came in
            bufs = enc(kv, bits, self.seed, w)
            nrm = bufs.pop("nrm")
            # check() bounded |kv|, not |kv * w|: the kernels mark an fp16 overflow with an infinite row norm;
            # one sum, read after detect_sinks' own wait (no second sync)
            bad = None if w is None else ~torch.isfinite(nrm.sum())
            sinks = detect_sinks(nrm)
            if bad is not None and bool(bad):
                raise CodecError(f"codec {self.name!r}: keys times their weights exceed the fp16 range; use 'fp8' "
                                 f"or 'none' for such values")
        if sinks:
            bufs["sink"] = kv[:, :, :, sinks].contiguous()
        if w is not None:
            bufs["kw"] = w.contiguous()
        return bufs, {"bits": bits, "seed": self.seed, "rotation": ROTATION, "sinks": sinks, "profile": digest,
                      "kw": key_weights is not None}

    def decode(self, buffers: Mapping[str, torch.Tensor], params: Mapping[str, Any],
               shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if len(shape) != 5 or shape[1] != 2:
            raise ValueError(f"{self.name} block shape {shape} is not [layers, 2, kv_heads, tokens, head_dim]")
        L, _, H, T, D = shape
        if not is_pow2(D) or not MIN_D <= D <= MAX_D:
            raise ValueError(f"{self.name} block head_dim {D} is not a power of two in [{MIN_D}, {MAX_D}]")
        if params.get("rotation") != ROTATION:
            raise ValueError(f"{self.name} block rotation {params.get('rotation')!r}; this kvtier reads {ROTATION!r}")
        seed = int_param(params, "seed", lambda s: 0 <= s < 2**64)
        bits = params.get("bits")
        if (not isinstance(bits, list) or len(bits) != 2 * L
                or not all(isinstance(b, int) and not isinstance(b, bool) and b in M.WIDTHS for b in bits)):
            raise ValueError(f"bad bit table {str(bits)[:120]} for {L} layers (widths {M.WIDTHS})")
        sinks = params.get("sinks")
        if (not isinstance(sinks, list) or len(sinks) > MAX_SINKS
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < T for t in sinks)
                or sinks != sorted(set(sinks))):
            raise ValueError(f"bad sink token list {str(sinks)[:120]} for {T} tokens")
        digest = params.get("profile")
        if digest is not None and (not isinstance(digest, str) or len(digest) != 32):
            raise ValueError(f"bad profile digest {digest!r}")
        weighted = params.get("kw", False)
        if not isinstance(weighted, bool):
            raise ValueError(f"bad key-weights flag {weighted!r}")
        names = {"scale"} | ({"sink"} if sinks else set()) | ({"kw"} if weighted else set())
        bufs = {}
        for b, slabs in M.width_slabs(bits).items():
            for name, nbytes in zip(M.plane_names(b), plane_bytes(len(slabs) * H * T, D, b)):
                bufs[name] = take(buffers, name, torch.uint8, (nbytes,))
                names.add(name)
        expect_names(buffers, names)
        bufs["scale"] = take(buffers, "scale", torch.float16, (L, 2, H, T))
        if weighted:
            w = take(buffers, "kw", torch.float16, (L, H, D))
            if not bool(((w > 0) & torch.isfinite(w)).all()):
                raise ValueError("key weights must be positive and finite")
        dec = M.decode_triton if device.type == "cuda" else M.decode_torch
        with on_device(device):
            out = dec(bufs, shape, dtype, bits, seed, w if weighted else None)  # the kernels divide by w
            if sinks:
                out[:, :, :, sinks] = take(buffers, "sink", dtype, (L, 2, H, len(sinks), D))
        return out


for _name in FALLBACK:
    register_codec(MixCodec(_name))
P.register_builtin()
