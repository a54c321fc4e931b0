"""TierConfig and sizes: good values normalise, bad ones raise ValueError naming the value.

Every config here names ``codec="none"`` (the one codec that always exists) so
these tests do not depend on which lossy codecs are registered.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from kvtier import CodecError, TierConfig
from kvtier.config import default_cold_uri, format_size, parse_size

BASE = {"codec": "none"}


@pytest.mark.parametrize("value, want", [
    ("4GiB", 4 << 30),
    ("512MB", 512_000_000),
    ("512MiB", 512 << 20),
    ("64k", 64_000),
    ("1.5GiB", 3 << 29),
    (" 8 mib ", 8 << 20),
    ("100", 100),
    ("2TB", 2 * 10**12),
    ("0", 0),
    (0, 0),
    (12345, 12345),
    (1e9, 10**9),  # a float that is a whole number (YAML/JSON may give one)
])
def test_parse_size_accepts(value, want):
    assert parse_size(value) == want


@pytest.mark.parametrize("value", [-1, "-1", "lots", "4 GB B", "4XB", "", "1e9", 1.5, float("nan"), float("inf"),
                                   None, True, [4], "9" * 400])
def test_parse_size_rejects_naming_the_value(value):
    with pytest.raises(ValueError, match=re.escape(f"warm_bytes={value!r}")):
        parse_size(value, "warm_bytes")


def test_format_size():
    assert format_size(4 << 30) == "4.0 GiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(100) == "100 B"


def test_sizes_in_config_are_normalised_to_ints():
    cfg = TierConfig(hot_bytes="64MiB", warm_bytes="1GiB", cold_bytes="10GB", num_shards=4, **BASE)
    assert (cfg.hot_bytes, cfg.warm_bytes, cfg.cold_bytes) == (64 << 20, 1 << 30, 10 * 10**9)
    assert cfg.shard_bytes == (1 << 30) // 4
    assert all(isinstance(getattr(cfg, f), int) for f in ("hot_bytes", "warm_bytes", "cold_bytes"))


def test_from_any_accepts_dict_config_and_none():
    cfg = TierConfig.from_any({"warm_bytes": "2GiB", "cold_uri": "s3://bucket/kv", **BASE})
    assert cfg.warm_bytes == 2 << 30 and cfg.cold_uri == "s3://bucket/kv"
    assert TierConfig.from_any(cfg) is cfg
    if "kivi4" in _codecs():  # the default codec; registered once the codec modules exist
        assert TierConfig.from_any(None) == TierConfig()
    with pytest.raises(TypeError, match="not list"):
        TierConfig.from_any([1, 2])


def _codecs() -> list[str]:
    from kvtier import list_codecs

    return list_codecs()


def test_defaults_are_documented_values():
    f = {x.name: x for x in dataclasses.fields(TierConfig)}
    assert f["hot_bytes"].default == 1 << 30 and f["warm_bytes"].default == 4 << 30
    assert f["chunk_tokens"].default == 256 and f["codec"].default == "x4+zstd"
    assert default_cold_uri().endswith("cold")


@pytest.mark.parametrize("field, value, msg", [
    ("hot_bytes", -5, "hot_bytes=-5 must not be negative"),
    ("warm_bytes", "lots", "warm_bytes='lots' is not a size"),
    ("cold_bytes", "4 parsecs", "cold_bytes='4 parsecs' is not a size"),
    ("num_shards", 0, "num_shards=0"),
    ("num_shards", True, "num_shards=True"),
    ("chunk_tokens", 0, "chunk_tokens=0"),
    ("chunk_tokens", 70000, "chunk_tokens=70000"),
    ("cold_uri", "ftp://host/dir", "cold_uri='ftp://host/dir' has unknown scheme 'ftp'"),
    ("cold_uri", "s3://", "cold_uri='s3://' names no bucket"),
    ("cold_uri", 5, "cold_uri=5"),
    ("tenant", "a/b", "tenant='a/b'"),
    ("tenant", "x" * 65, "tenant='xxxx"),
    ("rpc_timeout_s", 0, "rpc_timeout_s=0"),
    ("rpc_timeout_s", True, "rpc_timeout_s=True"),
    ("rpc_timeout_s", float("inf"), "rpc_timeout_s=inf"),
    ("write_through", "false", "write_through='false' must be a bool"),
    ("s3_endpoint", 9000, "s3_endpoint=9000"),
])
def test_bad_values_raise_value_error_naming_them(field, value, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        TierConfig(**{field: value}, **BASE)
    with pytest.raises(ValueError, match=re.escape(msg)):  # the dict path validates the same way
        TierConfig.from_any({field: value, **BASE})


def test_unknown_codec_is_a_value_error_naming_it():
    with pytest.raises(CodecError, match="unknown codec 'zip9'") as e:
        TierConfig(codec="zip9")
    assert isinstance(e.value, ValueError)


def test_unknown_dict_field_is_rejected_naming_it():
    with pytest.raises(ValueError, match=r"unknown TierConfig field\(s\) \['hot_byts'\]"):
        TierConfig.from_any({"hot_byts": "1GiB", **BASE})


def test_good_uris_are_accepted():
    for uri in ("/tmp/kv", "file:///tmp/kv", "s3://bucket", "s3://bucket/pre/fix", "S3://Bucket/x", ""):
        assert TierConfig(cold_uri=uri, **BASE).cold_uri == uri


def test_config_is_frozen_and_replace_validates():
    cfg = TierConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hot_bytes = 1  # type: ignore[misc]
    assert cfg.replace(hot_bytes="1KiB").hot_bytes == 1024
    with pytest.raises(ValueError, match="num_shards=-1"):
        cfg.replace(num_shards=-1)
    assert TierConfig.from_any(cfg.to_dict()) == cfg


def test_from_file_and_env(tmp_path, monkeypatch):
    p = tmp_path / "kvtier.json"
    p.write_text(json.dumps({"warm_bytes": "256MiB", "num_shards": 3, **BASE}))
    cfg = TierConfig.from_file(str(p))
    assert cfg.warm_bytes == 256 << 20 and cfg.num_shards == 3
    monkeypatch.setenv("KVTIER_CONFIG", str(p))
    assert TierConfig.from_env() == cfg
    with pytest.raises(ValueError, match="does not exist"):
        TierConfig.from_file(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json' is not valid JSON"):
        TierConfig.from_file(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object, not list"):
        TierConfig.from_file(str(tmp_path / "list.json"))
    (tmp_path / "neg.json").write_text(json.dumps({"hot_bytes": -1, **BASE}))
    with pytest.raises(ValueError, match="hot_bytes=-1"):
        TierConfig.from_file(str(tmp_path / "neg.json"))


def test_model_id_and_cold_uri_parameters_are_validated():
    """Issue 9 items 5 and 13: a model id per process; pyarrow's s3 URI parameters honoured or named."""
    from kvtier.config import TierConfig

    assert TierConfig(model_id="SmolLM2|L30|H3|D64|float32").model_id.startswith("SmolLM2")
    with pytest.raises(ValueError, match="model_id=5"):
        TierConfig(model_id=5)
    with pytest.raises(ValueError, match="'endpoint'"):
        TierConfig(cold_uri="s3://b/p?endpoint=h:1")
    with pytest.raises(ValueError, match="scheme='ftp'"):
        TierConfig(cold_uri="s3://b/p?endpoint_override=h:1&scheme=ftp")
    with pytest.raises(ValueError, match="s3:// only"):
        TierConfig(cold_uri="/tmp/x?endpoint_override=h:1")
    assert TierConfig(cold_uri="s3://b/p?endpoint_override=h:1&scheme=http&region=eu-west-1").cold_uri.endswith("eu-west-1")
