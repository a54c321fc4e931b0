"""Configuration of a kvtier tier: a frozen dataclass that validates itself.

Sizes are ints (bytes) or strings such as ``"4GiB"``, ``"512MB"``, ``"64k"``;
they are normalised to ints on construction. A bad value raises ``ValueError``
naming the field and the value. This module knows nothing of Ray.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any, name: str = "size") -> int:
    """``"4GiB"`` -> 4294967296; ints pass through. Raises ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a size; use an int of bytes or a string like '4GiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}={value!r} is not a size; use an int of bytes or a string like '4GiB', '512MB'")
        number = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if not math.isfinite(number):  # "9" * 400 parses to inf; int(inf) would raise OverflowError
            raise ValueError(f"{name}={value!r} is too large to be a size")
        size = int(number)
    else:
        raise ValueError(f"{name}={value!r} is not a size; use an int of bytes or a string like '4GiB'")
    if size < 0:
        raise ValueError(f"{name}={value!r} must not be negative")
    return size


def format_size(n: int) -> str:
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def default_cold_uri() -> str:
    return os.path.join(os.environ.get("KVTIER_HOME", os.path.join(os.path.expanduser("~"), ".cache", "kvtier")), "cold")


_COLD_SCHEMES = ("file", "s3")
_S3_URI_OPTIONS = ("endpoint_override", "scheme", "region")  # pyarrow's S3 URI parameters that kvtier honours


def s3_uri_options(uri: str) -> dict[str, str]:
    """pyarrow-style parameters of ``s3://bucket/prefix?endpoint_override=host:port&scheme=http&region=r``.
    Any other parameter raises ValueError naming it: dropping one silently would send signed requests
    to a public AWS bucket of the same name."""
    from urllib.parse import parse_qsl, urlsplit

    query = urlsplit(uri).query
    out: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _S3_URI_OPTIONS:
            raise ValueError(f"cold_uri parameter {name!r} is not supported; kvtier honours {list(_S3_URI_OPTIONS)}")
        if name in out:
            raise ValueError(f"cold_uri parameter {name!r} is given twice")
        if not value:
            raise ValueError(f"cold_uri parameter {name!r} has no value")
        out[name] = value
    if "scheme" in out and out["scheme"] not in ("http", "https"):
        raise ValueError(f"cold_uri parameter scheme={out['scheme']!r} must be 'http' or 'https'")
    if "scheme" in out and "endpoint_override" not in out:
        raise ValueError("cold_uri parameter 'scheme' needs 'endpoint_override' (host:port)")
    return out


@dataclass(frozen=True)
class TierConfig:
    """Budgets and policy of one tier deployment.

    hot_bytes      device-memory budget of each process's hot tier (compressed bytes)
    warm_bytes     host-memory budget of all warm shards together
    num_shards     warm shard actors; warm_bytes is split evenly between them
    cold_uri       local directory or ``s3://bucket/prefix``; "" disables the cold tier
    cold_bytes     budget of the cold tier (0 = unbounded)
    codec          codec used by put() when the caller names none
    chunk_tokens   tokens per chunk (one key, one block)
    write_through  also write each put to the cold tier at once (durability over speed)
    tenant         the tenant every key is bound to (isolation between tenants sharing one tier)
    model_id       model (fingerprint) written into every block this process puts and expected in
                   every block it reads: a block of another model under the same key is a miss
    """

    hot_bytes: int = 1 << 30
    warm_bytes: int = 4 << 30
    num_shards: int = 2
    cold_uri: str = field(default_factory=default_cold_uri)
    cold_bytes: int = 0
    codec: str = "x4+zstd"  # bench/results/quality.md: the highest ratio at <= 0.5 % Δppl and >= 97 % top-1
    chunk_tokens: int = 256
    write_through: bool = False
    tenant: str = ""
    model_id: str = ""
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    rpc_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("hot_bytes", "warm_bytes", "cold_bytes"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name))
        if not isinstance(self.num_shards, int) or isinstance(self.num_shards, bool) or self.num_shards < 1:
            raise ValueError(f"num_shards={self.num_shards!r} must be an int >= 1")
        if not isinstance(self.chunk_tokens, int) or isinstance(self.chunk_tokens, bool) or not 1 <= self.chunk_tokens <= 65536:
            raise ValueError(f"chunk_tokens={self.chunk_tokens!r} must be an int in [1, 65536]")
        if not isinstance(self.cold_uri, str):
            raise ValueError(f"cold_uri={self.cold_uri!r} must be a string (a local path or s3://bucket/prefix)")
        if "://" in self.cold_uri:
            scheme = self.cold_uri.split("://", 1)[0].lower()
            if scheme not in _COLD_SCHEMES:
                raise ValueError(f"cold_uri={self.cold_uri!r} has unknown scheme {scheme!r}; expected a local path, file:// or s3://")
            if scheme == "s3" and not self.cold_uri.split("://", 1)[1].split("?", 1)[0].strip("/"):
                raise ValueError(f"cold_uri={self.cold_uri!r} names no bucket; expected s3://bucket/prefix")
            if scheme == "s3":
                opts = s3_uri_options(self.cold_uri)
                if "endpoint_override" in opts and self.s3_endpoint:
                    raise ValueError(f"cold_uri names endpoint_override={opts['endpoint_override']!r} and "
                                     f"s3_endpoint={self.s3_endpoint!r} is set too; give one of them")

        if "?" in self.cold_uri and not self.cold_uri.lower().startswith("s3://"):
            raise ValueError(f"cold_uri={self.cold_uri!r}: URI parameters are supported for s3:// only")
        if not isinstance(self.tenant, str) or not re.fullmatch(r"[A-Za-z0-9._-]{0,64}", self.tenant):
            raise ValueError(f"tenant={self.tenant!r} must be up to 64 characters of letters, digits, '.', '_' or '-'")
        if (not isinstance(self.rpc_timeout_s, (int, float)) or isinstance(self.rpc_timeout_s, bool)
                or not 0 < self.rpc_timeout_s < math.inf):
            raise ValueError(f"rpc_timeout_s={self.rpc_timeout_s!r} must be a positive number of seconds")
        if not isinstance(self.write_through, bool):  # "false" from an env var or CLI would be truthy
            raise ValueError(f"write_through={self.write_through!r} must be a bool")
        if not isinstance(self.model_id, str) or len(self.model_id) > 512:
            raise ValueError(f"model_id={self.model_id!r} must be a string of at most 512 characters")
        for name in ("s3_endpoint", "s3_region"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a string")
        from kvtier.codecs import get_codec  # late import: codecs import config-free modules only

        get_codec(self.codec)  # raises CodecError naming an unknown codec

    @property
    def shard_bytes(self) -> int:
        return self.warm_bytes // self.num_shards

    @classmethod
    def from_any(cls, config: "TierConfig | Mapping[str, Any] | None") -> "TierConfig":
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"unknown TierConfig field(s) {unknown}; known: {sorted(known)}")
            return cls(**dict(config))
        raise TypeError(f"config must be a TierConfig, a dict or None, not {type(config).__name__}")

    @classmethod
    def from_file(cls, path: str) -> "TierConfig":
        """Read a JSON config (what the Helm chart renders into a ConfigMap)."""
        import json

        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"config file {path!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a JSON object, not {type(data).__name__}")
        return cls.from_any(data)

    @classmethod
    def from_env(cls) -> "TierConfig":
        """``$KVTIER_CONFIG`` (a JSON file) if set, else the defaults."""
        path = os.environ.get("KVTIER_CONFIG")
        return cls.from_file(path) if path else cls()

    def replace(self, **changes: Any) -> "TierConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
