"""Calibrated codec profiles: per-model bit allocations, their digest, lookup and storage.

A profile says, for one model fingerprint, how many bits each slab (the K or
the V of one layer) gets under each quality budget of the ``q*`` codecs
(``kvtier.codecs.mix``), as measured by ``kvtier.codecs.calibrate``, and
optionally the per-channel key weights (``key_weights``, [layers][kv_heads]
[head_dim]) that make key quantization error small where the queries look. It is a
canonical JSON document; its digest (XXH3-128 of those bytes) names it. A
block encoded with a profile records the digest and the bit table it used, so
the block decodes from its own header alone: no profile is consulted on decode
and none can be substituted (the checksum covers both).

Profiles are found by model fingerprint (``lookup``), in this process's
registry. To make a profile live with the tier rather than in one process,
``store``/``fetch`` put it into and get it from the tier through kvtier's public
``put``/``get`` under a key derived from the fingerprint (``tier_key``), as a
``none``-codec chunk whose values are the JSON bytes (fp16 holds 0..255
exactly). ``fetch`` verifies the digest and the fingerprint before registering.

A profile also answers a *ratio* target (``ratio_bits``, the ``x*`` codecs): the same greedy
allocation the calibration uses (``allocate``), over the profile's measured sensitivities, spending the
bits a target ratio leaves once the per-row scales, key weights and a sink row are paid for.

This module is not the calibration (``calibrate.py``) nor the codec (``mix.py``).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import xxhash

from kvtier.errors import CodecError

FORMAT = "kvtier-codec-profile"
VERSION = 2  # 2 added the optional key_weights; a version-1 document reads as one without them
KEY_PREFIX = "kvtier-profile|"
MAX_PROFILE_BYTES = 1 << 20  # 1 MiB: a 128-layer model's tables are ~10 KiB
# What a slab's codes cost per element behind the +zstd stage (mix's entropy layout), by width: measured on
# SmolLM2 chunks (uniform tables, key weights on); budgets after zstd are spent in these bits, not in code bits,
# since a 2-bit code costs 1.47 and an 8-bit one 7.65: a step up does not cost its width difference
ZSTD_BITS = {2: 1.47, 3: 2.55, 4: 3.61, 5: 4.64, 6: 5.71, 8: 7.65}
CODE_BITS = {b: float(b) for b in ZSTD_BITS}  # without the entropy stage a code costs its width
KW_MIN, KW_MAX = 1 / 64, 64.0  # key weights are normalized to a geometric mean of 1; measured 0.3-3.9 on SmolLM2
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"  # profiles shipped with kvtier (calibrated here)


def model_layout_key(fingerprint: str) -> str:
    """The fingerprint without its KV-dtype field (``name|L|H|D|dtype[|Wdigest]``, ``kvtier.keys``): a profile
    measured on bf16 KV serves fp16/fp32 KV of the same weights too; the weights digest stays in."""
    parts = fingerprint.split("|")
    return "|".join(parts[:4] + parts[5:]) if len(parts) >= 5 else fingerprint


@dataclass(frozen=True)
class Profile:
    model: str  # the model fingerprint it was calibrated on
    layers: int
    kv_heads: int
    head_dim: int
    budgets: Mapping[str, list[int]]  # codec name -> bits per slab: layer * 2 + kv, or (layer * 2 + kv) * H + head
    info: Mapping[str, Any]  # how it was measured (text, windows, sensitivities, measured Δppl): provenance only
    key_weights: list | None = None  # [layers][kv_heads][head_dim] positive floats, or None (unweighted keys)

    def to_json(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, "model": self.model, "layers": self.layers,
               "kv_heads": self.kv_heads, "head_dim": self.head_dim,
               "budgets": {k: list(v) for k, v in self.budgets.items()}, "info": self.info,
               "key_weights": self.key_weights}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return xxhash.xxh3_128(self.to_json()).hexdigest()

    @classmethod
    def from_json(cls, raw: bytes) -> "Profile":
        if len(raw) > MAX_PROFILE_BYTES:
            raise CodecError(f"codec profile of {len(raw)} bytes exceeds {MAX_PROFILE_BYTES}")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise CodecError(f"codec profile is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") not in (1, VERSION):
            raise CodecError(f"not a kvtier codec profile of version {VERSION}: format={doc.get('format') if isinstance(doc, dict) else doc!r}")
        p = cls(model=doc["model"], layers=doc["layers"], kv_heads=doc["kv_heads"], head_dim=doc["head_dim"],
                budgets=doc["budgets"], info=doc["info"], key_weights=doc.get("key_weights"))
        p.validate()
        return p

    def validate(self) -> None:
        from kernels.mix import WIDTHS as widths  # what the q-mix kernels pack


        for name in ("layers", "kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CodecError(f"codec profile {name}={v!r} is not a positive int")
        if not isinstance(self.model, str) or not self.model:
            raise CodecError(f"codec profile model={self.model!r} is not a fingerprint")
        if not isinstance(self.budgets, Mapping) or not isinstance(self.info, Mapping):
            raise CodecError("codec profile budgets/info must be objects")
        for name, bits in self.budgets.items():
            if (not isinstance(bits, list) or len(bits) not in (2 * self.layers, 2 * self.layers * self.kv_heads)
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b in widths for b in bits)):
                raise CodecError(f"codec profile budget {name!r} must list {2 * self.layers} (per layer) or "
                                 f"{2 * self.layers * self.kv_heads} (per head) bit widths in {widths}, "
                                 f"got {bits!r}"[:300])
        if self.key_weights is not None:
            w = self.key_weights
            ok = (isinstance(w, list) and len(w) == self.layers
                  and all(isinstance(h, list) and len(h) == self.kv_heads for h in w)
                  and all(isinstance(c, list) and len(c) == self.head_dim for h in w for c in h)
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) and KW_MIN <= v <= KW_MAX
                          for h in w for c in h for v in c))
            if not ok:
                raise CodecError(f"codec profile key_weights must be [{self.layers}][{self.kv_heads}]"
                                 f"[{self.head_dim}] numbers in [{KW_MIN}, {KW_MAX}], got {str(w)[:120]}")

    def key_weight_tensor(self) -> torch.Tensor | None:
        """The key weights as the fp16 [L, H, D] tensor a block stores (None without weights)."""
        return None if self.key_weights is None else torch.tensor(self.key_weights, dtype=torch.float16)

    def _check_layout(self, shape: tuple[int, ...]) -> None:
        L, _, H, _, D = shape
        if (L, H, D) != (self.layers, self.kv_heads, self.head_dim):
            raise CodecError(f"codec profile {self.digest[:12]} of {self.model!r} is for {self.layers} layers, "
                             f"{self.kv_heads} KV heads, head_dim {self.head_dim}; the chunk has shape {shape}")

    def bits_for(self, codec: str, shape: tuple[int, ...]) -> list[int]:
        """The bit table of budget ``codec`` for a chunk of ``shape``; a chunk of another layout is refused."""
        self._check_layout(shape)
        if codec not in self.budgets:
            raise CodecError(f"codec profile {self.digest[:12]} has no budget {codec!r} (has {sorted(self.budgets)})")
        return list(self.budgets[codec])

    def sensitivities(self, shape: tuple[int, ...]) -> list[float]:
        """The measured sensitivity of each slab (``info.sensitivity_kl``), checked against the chunk's layout."""
        self._check_layout(shape)
        sens = self.info.get("sensitivity_kl")
        n = 2 * self.layers
        if (not isinstance(sens, list) or len(sens) not in (n, n * self.kv_heads)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in sens)):
            raise CodecError(f"codec profile {self.digest[:12]} has no usable sensitivity_kl for a ratio target "
                             f"({n} or {n * self.kv_heads} non-negative numbers); recalibrate it")
        return [float(v) for v in sens]


_LOCK = threading.Lock()
_BY_MODEL: dict[str, Profile] = {}


def register(profile: Profile) -> str:
    """Make ``profile`` the one used for its model in this process; returns its digest."""
    profile.validate()
    with _LOCK:
        _BY_MODEL[model_layout_key(profile.model)] = profile
    return profile.digest


def unregister(model: str) -> None:
    with _LOCK:
        _BY_MODEL.pop(model_layout_key(model), None)


def lookup(model: str | None) -> Profile | None:
    """The registered profile of fingerprint ``model`` (any KV dtype), or None."""
    if not model:
        return None
    with _LOCK:
        return _BY_MODEL.get(model_layout_key(model))


def register_builtin() -> list[str]:
    """Register every profile shipped in ``PROFILE_DIR``; returns their digests."""
    return [register(Profile.from_json(f.read_bytes())) for f in sorted(PROFILE_DIR.glob("*.json"))]


# ---- living with the tier: through kvtier.put / kvtier.get -------------------
def tier_key(model: str) -> str:
    """The tier key a model's profile is stored under (one per model layout; newest wins)."""
    return xxhash.xxh3_128((KEY_PREFIX + model_layout_key(model)).encode()).hexdigest()


def to_tensor(profile: Profile) -> torch.Tensor:
    """The profile's JSON bytes as a [1, 2, 1, n, 1] fp16 chunk (one byte per value, 0..255 exact in fp16),
    storable with the ``none`` codec through the tier API; the second half of dim 1 is zeros."""
    raw = profile.to_json()
    t = torch.zeros(1, 2, 1, len(raw), 1, dtype=torch.float16)
    t[0, 0, 0, :, 0] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.float16)
    return t


def from_tensor(t: torch.Tensor, model: str) -> Profile:
    if not isinstance(t, torch.Tensor) or t.dim() != 5 or tuple(t.shape[:3]) != (1, 2, 1) or t.shape[4] != 1:
        raise CodecError(f"tier object under the profile key of {model!r} is not a profile chunk: "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    vals = t[0, 0, 0, :, 0].float()
    if bool(((vals < 0) | (vals > 255) | (vals != vals.round())).any()):
        raise CodecError(f"profile chunk of {model!r} holds values that are not bytes")
    p = Profile.from_json(bytes(vals.to(torch.uint8).tolist()))
    if model_layout_key(p.model) != model_layout_key(model):
        raise CodecError(f"profile stored for {model!r} belongs to {p.model!r}")
    return p


def store(profile: Profile, put: Callable[[str, torch.Tensor, str], Any]) -> str:
    """Store ``profile`` in a tier through ``put(key, tensor, codec)`` (e.g. ``kvtier.put``); returns the key."""
    key = tier_key(profile.model)
    put(key, to_tensor(profile), "none")
    return key


def fetch(model: str, get: Callable[[str], torch.Tensor | None]) -> Profile | None:
    """Get, verify and register the profile of ``model`` from a tier through ``get(key)`` (e.g.
    ``kvtier.get``); None when the tier holds none (a miss)."""
    t = get(tier_key(model))
    if t is None:
        return None
    p = from_tensor(t, model)
    register(p)
    return p


def r(b: int) -> float:
    """A b-bit row's quantization error power relative to 2 bits: (3 / (2**b - 1))**2."""
    return (3.0 / (2**b - 1)) ** 2


def allocate(sens: list[float], avg_bits: float, cost: Mapping[int, float] = ZSTD_BITS) -> list[int]:
    """Greedy: start every slab at the smallest width, spend ``avg_bits * n`` bits (``cost``: bits per element
    of each width) on the slab whose predicted cost ``c_s * r(b)`` falls most per bit spent; ties go to the
    lower slab index."""
    n, widths = len(sens), sorted(cost)
    c = [max(s, 0.0) / (r(2) - r(4)) + 1e-12 for s in sens]
    bits = [widths[0]] * n
    budget = avg_bits * n - cost[widths[0]] * n + 1e-9
    while True:
        best, pick = 0.0, None
        for i in range(n):
            # the best gain per bit over every larger width, not just the next one: 4 -> 8 may pay only as a whole
            for w in (w for w in widths if w > bits[i]):
                spend = cost[w] - cost[bits[i]]
                if spend > budget:
                    continue
                g = c[i] * (r(bits[i]) - r(w)) / spend
                if g > best:
                    best, pick = g, (i, w)
        if pick is None:
            return bits
        budget -= cost[pick[1]] - cost[bits[pick[0]]]
        bits[pick[0]] = pick[1]


def side_bits(shape: tuple[int, ...], dtype_bits: int, zstd: bool, key_weights: bool) -> float:
    """Bits per KV element a ``mix`` block spends beside its codes: one fp16 scale per row of ``head_dim``
    (11.7 bits behind the entropy stage's byte shuffle, measured), the fp16 key weights (one per layer, head
    and channel: 8 / tokens per element) and one sink row in the KV's dtype. Measured on SmolLM2 q blocks:
    0.20-0.21 bits beside the codes (bench/results/quality.md: bits/elem minus the profile's zstd_bits)."""
    T, D = shape[3], shape[4]
    return (11.7 if zstd else 16.0) / D + (8.0 / T if key_weights else 0.0) + dtype_bits / T


def ratio_bits(sens: list[float], ratio: float, shape: tuple[int, ...], dtype_bits: int, zstd: bool,
               key_weights: bool) -> list[int]:
    """The bit table (one width per entry of ``sens``) whose block is about ``ratio`` times smaller than the
    chunk in 16-bit KV: ``allocate`` spends ``16 / ratio`` bits per element less ``side_bits``, counted after
    the entropy stage with ``zstd``. A ratio the smallest width cannot reach gets the smallest width."""
    avg = 16.0 / ratio - side_bits(shape, dtype_bits, zstd, key_weights)
    return allocate(sens, avg, ZSTD_BITS if zstd else CODE_BITS)
