"""What names a vLLM request's KV in kvtier: the connector's settings, the model identity, the keys.

``ConnectorSettings.parse(extra)`` validates ``kv_connector_extra_config``:
``address``/``namespace``/``codec`` and the connector's own knobs, every other key a
TierConfig field (an unknown key is an error naming it). ``model_identity`` binds
the model's fingerprint (name, layers, KV heads, head_dim, KV dtype), a digest of
its config and weight files and the page format into one string; ``request_keys``
chains kvtier's chunk keys over a request's prompt with that identity, the
request's ``cache_salt`` and the tenant inside. Two models, two page formats, two
salts or two tenants therefore never share a key. No vLLM import here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kvtier.config import TierConfig
from kvtier.keys import chunk_keys, model_fingerprint

# the connector's own settings; everything else in extra_config is a TierConfig field
_OWN = {"address", "namespace", "save_queue", "load_timeout_s", "connect_timeout_s", "handoff_wait_s", "transport",
        "handoff_arena_bytes"}
TRANSPORTS = ("auto", "nixl", "tier")  # the ``transport`` setting (kvtier.vllm.handoff)
_FULL_HASH_BYTES = 2 << 30  # weight files up to 2 GiB in all are hashed whole (~1-2 s); larger ones sampled
_SAMPLE = 4 << 20


@dataclass(frozen=True)
class ConnectorSettings:
    address: str = "auto"          # "auto": $RAY_ADDRESS if set, else a local tier; "local": always local
    namespace: str = "kvtier"
    save_queue: int = 8            # chunks batches waiting to be compressed+put; a full queue drops the save
    load_timeout_s: float = 30.0   # a load that takes longer is a failure (recompute)
    connect_timeout_s: float = 600.0  # Ray + the tier took over 120 s to start on this 2-core box at load 40
    # how long decode asks vLLM to hold a request whose prefill's saves are not in the tier yet; they land
    # ~0.1-1 s after prefill's response here (codec none, 5 chunks of 64 tokens, 2 loaded cores)
    handoff_wait_s: float = 5.0
    # how decode gets a remote prefill's chunks: "nixl" pulls them from the prefill worker's arena (a NIXL
    # agent per worker; start-up fails if NIXL cannot start), "tier" through the tier, "auto" over NIXL where
    # it imports and both sides have an arena. Either way the tier holds a copy and is the fallback
    transport: str = "auto"
    handoff_arena_bytes: int = 256 << 20  # each worker's ring of recent handoff blocks (touched as written)
    tier: dict = field(default_factory=dict)   # TierConfig fields given explicitly

    @classmethod
    def parse(cls, extra: Mapping[str, Any] | None) -> "ConnectorSettings":
        extra = dict(extra or {})
        own = {k: extra.pop(k) for k in list(extra) if k in _OWN}
        known = {f.name for f in dataclasses.fields(TierConfig)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kv_connector_extra_config has unknown key(s) {unknown}; known: "
                             f"{sorted(_OWN | known)}")
        TierConfig.from_any(extra)  # validates every value, naming a bad one
        s = cls(tier=extra, **own)
        if not isinstance(s.address, str) or not s.address:
            raise ValueError(f"address={s.address!r} must be 'auto', 'local' or a Ray address")
        if not isinstance(s.namespace, str) or not s.namespace:
            raise ValueError(f"namespace={s.namespace!r} must be a non-empty string")
        if not isinstance(s.save_queue, int) or isinstance(s.save_queue, bool) or s.save_queue < 1:
            raise ValueError(f"save_queue={s.save_queue!r} must be an int >= 1")
        if s.transport not in TRANSPORTS:
            raise ValueError(f"transport={s.transport!r} is not one of {list(TRANSPORTS)}")
        b = s.handoff_arena_bytes
        if not isinstance(b, int) or isinstance(b, bool) or not 1 << 20 <= b <= 1 << 40:
            raise ValueError(f"handoff_arena_bytes={b!r} must be an int from 1 MiB to 1 TiB")
        for name in ("load_timeout_s", "connect_timeout_s", "handoff_wait_s"):
            v = getattr(s, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 86400:
                raise ValueError(f"{name}={v!r} must be a positive number of seconds")
        return s

    def tier_config(self, block_size: int) -> TierConfig:
        """The TierConfig this connector runs with: ``chunk_tokens`` defaults to the multiple of
        ``block_size`` nearest 256 (vLLM's CPU default block is 128: 256 tokens = 2 blocks)."""
        cfg = dict(self.tier)
        if "chunk_tokens" not in cfg:
            cfg["chunk_tokens"] = max(1, round(256 / block_size)) * block_size
        tc = TierConfig.from_any(cfg)
        if tc.chunk_tokens % block_size:
            raise ValueError(f"chunk_tokens={tc.chunk_tokens} must be a multiple of vLLM's block_size={block_size}")
        return tc


@functools.lru_cache(maxsize=8)
def weights_digest(model_path: str, revision: str = "") -> str:
    """A digest of a local model folder's config and weight files (20 hex chars), or of the hub
    name and revision when ``model_path`` is not a local folder (vLLM resolves it; we cannot)."""
    h = hashlib.blake2b(b"kvtier/vllm/weights/v1\0", digest_size=10)
    p = Path(model_path)
    if not p.is_dir():
        h.update(f"hub:{model_path}@{revision}".encode())
        return h.hexdigest()
    files = sorted(f for f in p.iterdir() if f.is_file() and (
        f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".pt", ".gguf")))
    if not files:
        raise ValueError(f"model folder {model_path!r} has no config.json or weight files to identify it by")
    whole = sum(f.stat().st_size for f in files) <= _FULL_HASH_BYTES
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if whole or size <= 2 * _SAMPLE:
                for piece in iter(lambda: fh.read(8 << 20), b""):
                    h.update(piece)
            else:  # head (header + first tensors) and tail: a retrained or re-quantized file differs there
                h.update(fh.read(_SAMPLE))
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def tier_model_id(model_path: str, num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str) -> str:
    """The model id the connector's blocks carry and every get expects (``TierConfig.model_id`` unless set):
    kvtier's fingerprint of a local folder (``kvtier.model.folder_identity``: name, KV shape and dtype,
    weights digest), the one ``kvtier.model.model_id_for`` gives the same model loaded through kvtier, so
    a codec profile calibrated on it applies; a hub name vLLM resolves itself gets no weights digest."""
    from kvtier.model import folder_identity

    p = Path(model_path)
    if p.is_dir():
        name, digest = folder_identity(p)
    else:
        name, digest = str(model_path).rstrip("/").rsplit("/", 1)[-1], ""
    return model_fingerprint(name.replace("|", "_"), num_layers, kv_heads, head_dim, kv_dtype, digest)


def model_identity(name: str, num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str,
                   weights: str, page_format: str) -> str:
    """``<fingerprint>|W<weights digest>|P<page format>``: what the KV of one model in one layout is."""
    fp = model_fingerprint(name.replace("|", "_"), num_layers, kv_heads, head_dim, kv_dtype)
    return f"{fp}|W{weights}|P{page_format}"


def request_keys(token_ids: Sequence[int], identity: str, chunk_tokens: int, tenant: str,
                 cache_salt: str | None) -> list[str]:
    """The chained keys of every full chunk of ``token_ids`` for this identity, salt and tenant."""
    salt = cache_salt or ""
    return chunk_keys(list(token_ids), f"{identity}|S{len(salt)}:{salt}", chunk_tokens, tenant)

