"""The app's args and its HTTP guard without Ray or an engine: ``AppConfig``, the
LLMConfig it builds, tokens bound to tenants, the per-tenant ``cache_salt``."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("ray.serve.llm")

from ray_apps.ingress import TenantAuth, cache_salt, check_tokens  # noqa: E402
from ray_apps.serve import AppConfig, kv_transfer_config, llm_config  # noqa: E402


@pytest.fixture(autouse=True)
def no_env_tokens(monkeypatch):
    monkeypatch.delenv("KVTIER_API_TOKEN", raising=False)
    monkeypatch.delenv("KVTIER_API_TOKENS", raising=False)
    monkeypatch.delenv("KVTIER_CONFIG", raising=False)


def test_serve_run_strings_are_converted():
    cfg = AppConfig.from_args({"replicas": "2", "prefix_caching": "false", "kvtier": "true",
                               "kv_cache_bytes": "256MiB", "tier": '{"codec": "none", "chunk_tokens": 128}',
                               "engine_kwargs": '{"seed": 3}'})
    assert cfg.replicas == 2 and cfg.prefix_caching is False and cfg.kvtier is True
    assert cfg.kv_cache_bytes == 256 << 20 and cfg.tier["codec"] == "none" and cfg.engine_kwargs == {"seed": 3}


@pytest.mark.parametrize("args, needle", [
    ({"shape": "ring"}, "shape='ring'"),
    ({"replicas": "0"}, "replicas=0"),
    ({"replicas": "two"}, "replicas='two'"),
    ({"accelerator": "tpu"}, "accelerator='tpu'"),
    ({"accelerator_type": "H100"}, "need accelerator='gpu'"),
    ({"dtype": "int8"}, "dtype='int8'"),
    ({"block_size": 20}, "block_size=20"),
    ({"model": "/no/such/folder"}, "model='/no/such/folder'"),
    ({"prefix_caching": "maybe"}, "prefix_caching='maybe'"),
    ({"engine_kwargs": {"kv_transfer_config": {}}}, "without kv_transfer_config"),
    ({"tier": {"codec": "nope"}}, "nope"),
    ({"kv_cache_bytes": "lots"}, "kv_cache_bytes='lots'"),
    ({"cpu_reserved": "-1"}, "cpu_reserved=-1"),
    ({"cpu_reserved": 1, "accelerator": "gpu"}, "cpu_reserved=1"),
    ({"num_gpus": 1}, "unknown app arg(s) ['num_gpus']"),
    ({"api_tokens": {"short": "a"}}, "at least 8 characters"),
    ({"api_tokens": {"long-enough-token": "bad tenant!"}}, "tenant 'bad tenant!'"),
    ({"api_token": "long-enough-token", "tenant": "no spaces"}, "tenant='no spaces'"),
])
def test_bad_args_name_the_bad_value(args, needle):
    with pytest.raises(ValueError) as e:
        AppConfig.from_args(args)
    assert needle in str(e.value)


def test_tokens_come_from_args_or_the_environment(monkeypatch):
    assert AppConfig.from_args({"api_token": "tok-12345678", "tenant": "team-a"}).api_tokens == {"tok-12345678": "team-a"}
    assert AppConfig.from_args({}).api_tokens == {}
    monkeypatch.setenv("KVTIER_API_TOKENS", json.dumps({"tok-aaaaaaaa": "a", "tok-bbbbbbbb": "b"}))
    assert AppConfig.from_args({}).api_tokens == {"tok-aaaaaaaa": "a", "tok-bbbbbbbb": "b"}
    monkeypatch.setenv("KVTIER_API_TOKENS", "{nope")
    with pytest.raises(ValueError, match="KVTIER_API_TOKENS"):
        AppConfig.from_args({})


def test_the_engine_config_carries_kvtiers_connector_and_the_tier(tmp_path):
    cfg = AppConfig.from_args({"replicas": 3, "namespace": "ns1", "tier": {"codec": "none", "chunk_tokens": 64,
                                                                           "cold_uri": str(tmp_path)}})
    c = llm_config(cfg, "/models/x", cfg.replicas)
    kv = c["engine_kwargs"]["kv_transfer_config"]
    assert kv["kv_connector"] == "KVTierConnector" and kv["kv_connector_module_path"] == "kvtier.vllm"
    assert kv["kv_role"] == "kv_both" and kv["kv_load_failure_policy"] == "recompute"
    extra = kv["kv_connector_extra_config"]
    assert extra["namespace"] == "ns1" and extra["codec"] == "none" and extra["chunk_tokens"] == 64
    assert "address" not in extra, "the replica fills in its cluster's address (tier_backend)"
    assert c["deployment_config"]["num_replicas"] == 3 and c["accelerator_config"] == {"kind": "cpu"}
    assert c["engine_kwargs"]["enable_prompt_tokens_details"] is True
    assert c["model_loading_config"] == {"model_id": "SmolLM2-135M-Instruct", "model_source": "/models/x"}
    off = llm_config(AppConfig.from_args({"kvtier": False}), "/models/x", 1)
    assert "kv_transfer_config" not in off["engine_kwargs"]
    # vLLM would reserve a core more for the engine with a connector: the app reserves the same for both
    assert c["runtime_env"]["env_vars"]["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1" == \
        off["runtime_env"]["env_vars"]["VLLM_CPU_NUM_OF_RESERVED_CPU"]
    assert llm_config(AppConfig.from_args({"cpu_reserved": "0"}), "/m", 1)["runtime_env"]["env_vars"][
        "VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    gpu = llm_config(AppConfig.from_args({"accelerator": "gpu", "accelerator_type": "H100"}), "/m", 1)
    assert gpu["accelerator_config"] == {"kind": "gpu"} and gpu["accelerator_type"] == "H100"
    assert "enforce_eager" not in gpu["engine_kwargs"] and "kv_cache_memory_bytes" not in gpu["engine_kwargs"]
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in gpu["runtime_env"]["env_vars"]
    assert kv_transfer_config(AppConfig.from_args({"address": "10.0.0.1:6379"}))["kv_connector_extra_config"][
        "address"] == "10.0.0.1:6379"


def test_the_connector_accepts_the_apps_extra_config():
    ident = pytest.importorskip("kvtier.vllm.identity")
    extra = kv_transfer_config(AppConfig.from_args({"tier": {"codec": "none"}}))["kv_connector_extra_config"]
    s = ident.ConnectorSettings.parse({**extra, "address": "127.0.0.1:6379"})
    assert s.namespace == "kvtier" and s.tier_config(128).codec == "none"


def test_cache_salt_is_per_tenant_and_keeps_vllms_limits():
    assert cache_salt("a", None) != cache_salt("b", None) != cache_salt("", None)
    assert cache_salt("a", "x") != cache_salt("a", "y") != cache_salt("a", None)
    long = cache_salt("t" * 64, "s" * 500)
    assert len(long) <= 128 and not set("/@\\\0") & set(long)


def _call(auth: TenantAuth, headers: dict[str, str], path: str = "/v1/completions", root_path: str = ""):
    """Run the middleware on one request; returns (status, body, tenant seen by the app)."""
    seen, sent = {}, []

    async def app(scope, receive, send):
        seen["tenant"] = scope.get("state", {}).get("kvtier_tenant")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request", "body": b""}

    auth.app = app
    scope = {"type": "http", "path": path, "root_path": root_path, "method": "POST",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(auth(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), seen.get("tenant")


def test_tenant_auth_binds_the_tenant_to_the_token():
    auth = TenantAuth(None, check_tokens({"tok-aaaaaaaa": "a", "tok-bbbbbbbb": "b"}))
    assert _call(auth, {"Authorization": "Bearer tok-aaaaaaaa"})[2] == "a"
    assert _call(auth, {"Authorization": "bearer tok-bbbbbbbb"})[2] == "b"
    status, body, tenant = _call(auth, {})
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and tenant is None
    assert _call(auth, {"Authorization": "Bearer tok-aaaaaaa"})[0] == 401  # a prefix of a token is not it
    status, body, _ = _call(auth, {"Authorization": "Bearer tok-aaaaaaaa", "X-KVTier-Tenant": "b"})
    assert status == 403 and body["error"]["code"] == "tenant_mismatch"
    assert _call(auth, {"Authorization": "Bearer tok-aaaaaaaa", "X-KVTier-Tenant": "a"})[2] == "a"
    assert _call(auth, {}, path="/health")[0] == 200, "the health route never needs the token"
    # under a Serve route prefix ASGI's path includes it: still the health route, and only that one
    assert _call(auth, {}, path="/kvtier/health", root_path="/kvtier")[0] == 200
    assert _call(auth, {}, path="/kvtier/health")[0] == 401
    assert _call(auth, {}, path="/kvtier/v1/models", root_path="/kvtier")[0] == 401


def test_an_open_app_has_only_the_default_tenant():
    auth = TenantAuth(None, {})
    assert _call(auth, {})[2] == ""
    status, body, _ = _call(auth, {"X-KVTier-Tenant": "team-a"})
    assert status == 403 and body["error"]["code"] == "tenant_not_allowed"


def test_engine_resources_place_each_role_on_its_pods():
    cfg = AppConfig.from_args({"shape": "pd", "accelerator": "gpu",
                               "engine_resources": '{"prefill": {"kvtier_prefill": 1}, "decode": {"kvtier_decode": 1}}'})
    assert llm_config(cfg, "/m", 1, "prefill")["placement_group_config"] == {
        "bundle_per_worker": {"CPU": 1, "GPU": 1, "kvtier_prefill": 1}}
    assert llm_config(cfg, "/m", 1, "decode")["placement_group_config"]["bundle_per_worker"]["kvtier_decode"] == 1
    assert "placement_group_config" not in llm_config(AppConfig(), "/m", 1)
    with pytest.raises(ValueError, match="engine_resources"):
        AppConfig.from_args({"engine_resources": {"gpu": {"x": 1}}})
    with pytest.raises(ValueError, match=r"engine_resources\['engine'\]"):
        AppConfig.from_args({"engine_resources": {"engine": {"x": 0}}})


def test_the_backend_is_registered_again_for_each_new_cluster():
    """Ray's registry remembers a registration per process: after ray.shutdown() and a new ray.init() in the
    same driver, ``is_registered`` still said True and the new cluster's replicas got Ray's default backend
    (no tier joined: every P/D request a miss, seen when two app test modules ran in one pytest process)."""
    import ray
    from ray.llm._internal.serve.engines.vllm.kv_transfer import factory

    from ray_apps import tier_backend

    if ray.is_initialized():
        pytest.skip("needs a driver with no Ray running: the registration then waits for the next ray.init")
    reg = factory._kv_backend_registry
    tier_backend.register()
    assert tier_backend.CONNECTOR in reg._pending  # flushed into the next cluster's KV when Ray starts
    reg._pending.clear()  # what that flush does; the process keeps its loader cache (is_registered: True)
    assert factory.KVConnectorBackendFactory.is_registered(tier_backend.CONNECTOR)
    tier_backend.register()
    assert tier_backend.CONNECTOR in reg._pending, "the next cluster gets the registration too"
    factory.KVConnectorBackendFactory.unregister_backend(tier_backend.CONNECTOR)
