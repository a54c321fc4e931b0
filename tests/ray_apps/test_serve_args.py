"""The Serve app's arguments and ``kvtier serve``'s argument errors, without Ray:
building an application only binds deployments, it starts nothing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve")

import ray_apps.serve as serve_mod  # noqa: E402
from ray_apps.serve import main, settings_from_args, worker_config  # noqa: E402


def test_defaults_bind_loopback_and_strings_from_serve_run_are_converted(tmp_path, monkeypatch):
    monkeypatch.delenv("KVTIER_API_TOKEN", raising=False)
    monkeypatch.delenv("KVTIER_CONFIG", raising=False)
    s = settings_from_args({"prefill_replicas": "2", "num_cpus": "0.5", "limits": '{"max_prompt_tokens": 99}'})
    assert (s["host"], s["port"], s["prefill_replicas"], s["num_cpus"]) == ("127.0.0.1", 8000, 2, 0.5)
    assert s["limits"]["max_prompt_tokens"] == 99 and s["api_token"] is None
    assert worker_config(s)["max_prompt_tokens"] == 99


def test_tier_from_a_json_file_or_a_dict(tmp_path):
    path = tmp_path / "tier.json"
    path.write_text(json.dumps({"codec": "none", "chunk_tokens": 32, "warm_bytes": "1GiB"}))
    s = settings_from_args({"tier": str(path)})
    assert (s["tier"]["codec"], s["tier"]["chunk_tokens"], s["tier"]["warm_bytes"]) == ("none", 32, 1 << 30)
    assert settings_from_args({"config": {"codec": "fp8"}})["tier"]["codec"] == "fp8"


@pytest.mark.parametrize("args, match", [
    ({"replicas": 2}, "unknown app arg"),
    ({"decode_replicas": 0}, "decode_replicas=0"),
    ({"port": "http"}, "port='http'"),
    ({"tier": {"codec": "zip"}}, "zip"),
    ({"tier": "/nonexistent/tier.json"}, "does not exist"),
    ({"limits": {"max_tokens_cap": 0}}, "max_tokens_cap=0"),
    ({"tenant": "a/b"}, "tenant='a/b'"),
    ({"api_token": "short"}, "at least 8"),
])
def test_bad_args_are_named(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        settings_from_args(args)


def test_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("KVTIER_API_TOKEN", "from-env-123")
    assert settings_from_args({})["api_token"] == "from-env-123"


def test_app_is_a_builder_that_serve_calls_with_the_helm_charts_args(monkeypatch, tmp_path):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as call

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"codec": "none"}))
    built = call(serve_mod.app, {"tier_config": str(path), "prefill_replicas": 4, "decode_replicas": 4})
    assert type(built).__name__ == "Application"
    monkeypatch.setenv("KVTIER_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="does not exist"):  # no args: the tier config comes from $KVTIER_CONFIG
        call(serve_mod.app, {})
    monkeypatch.delenv("KVTIER_CONFIG")
    with pytest.raises(ValueError, match="dtype='int3'"):
        serve_mod.build_app({"dtype": "int3"})
    with pytest.raises(ValueError, match="both given"):
        settings_from_args({"tier": {}, "tier_config": str(path)})


def test_kvtier_serve_rejects_bad_args_before_starting_ray(capsys):
    assert main(["--tier", "/nonexistent/tier.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--transport", "carrier-pigeon"])
