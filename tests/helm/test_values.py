"""Values land where they must: the tier config is rendered once (a ConfigMap that
kvtier.TierConfig reads back) and every Ray pod points at it; the warm budget sizes
the cache-shard pods; Secrets are referenced, never inlined; GPUs are requested
only where asked; the cold tier is a PVC mounted everywhere or S3.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from helmkit import VALUE_SETS, by_kind, container, env_of, groups, one, render
from kvtier.config import TierConfig, parse_size

MiB = 1 << 20


def tier_config(docs) -> TierConfig:
    cm = one(docs, "ConfigMap", "-config")
    return TierConfig.from_any(json.loads(cm["data"]["config.json"]))   # kvtier's own validation


def chart_values(name: str, chart) -> dict:
    return chart.merge_values(VALUE_SETS[name])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_tier_config_is_rendered_once_and_read_by_kvtier(chart, name):
    docs = render(chart, VALUE_SETS[name])
    v = chart_values(name, chart)
    cfg = tier_config(docs)
    assert cfg.warm_bytes == parse_size(v["tier"]["warmBytes"])
    assert cfg.hot_bytes == parse_size(v["tier"]["hotBytes"])
    assert cfg.cold_bytes == parse_size(v["cold"]["bytes"])
    assert (cfg.codec, cfg.chunk_tokens, cfg.tenant) == (v["tier"]["codec"], v["tier"]["chunkTokens"], v["tier"]["tenant"])
    assert cfg.num_shards == v["cacheShards"]["replicas"] * v["cacheShards"]["shardsPerPod"]
    assert cfg.cold_uri == v["cold"]["uri"]
    # One source: the config's fields appear in no other manifest (the Serve app gets its path).
    others = [yaml.safe_dump(d) for d in docs if d["metadata"]["name"] != "demo-kvtier-config"]
    assert len(others) == len(docs) - 1
    for text in others:
        assert str(cfg.warm_bytes) not in text and '"codec"' not in text and "chunk_tokens" not in text
    # Every Ray pod mounts it and names it in $KVTIER_CONFIG.
    for gname, g in groups(docs).items():
        assert env_of(g)["KVTIER_CONFIG"]["value"] == "/etc/kvtier/config.json", gname
        mounts = {m["name"]: m for m in container(g)["volumeMounts"]}
        assert mounts["kvtier-config"]["mountPath"] == "/etc/kvtier" and mounts["kvtier-config"]["readOnly"]
        vols = {vol["name"]: vol for vol in g["template"]["spec"]["volumes"]}
        assert vols["kvtier-config"]["configMap"]["name"] == "demo-kvtier-config"


@pytest.mark.parametrize("size", ["1.5GiB", "512MB", "64k", "4gi", "7 TB", "3Ti", 12_345_678, "100"])
def test_chart_parses_sizes_like_kvtier(chart, size):
    cfg = tier_config(render(chart, {"tier": {"hotBytes": size}}))
    assert cfg.hot_bytes == parse_size(size)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_warm_budget_sizes_the_cache_shard_pods(chart, name):
    docs = render(chart, VALUE_SETS[name])
    c = chart_values(name, chart)["cacheShards"]
    cfg = tier_config(docs)
    shard = groups(docs)["cache-shards"]
    # object store = shardsPerPod x shard_bytes + headroom; memory = object store + overhead
    object_store = c["shardsPerPod"] * cfg.shard_bytes + parse_size(c["objectStoreHeadroom"])
    memory = object_store + parse_size(c["memoryOverhead"])
    res = container(shard)["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"] == f"{math.ceil(memory / MiB)}Mi"
    assert int(res["requests"]["memory"][:-2]) * MiB >= c["shardsPerPod"] * cfg.shard_bytes   # the budget fits
    assert int(shard["rayStartParams"]["object-store-memory"]) == object_store
    shm = next(v for v in shard["template"]["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": f"{math.ceil(object_store / MiB)}Mi"}
    # Shard actors are placed by this custom resource: shardsPerPod units per pod.
    assert json.loads(json.loads(shard["rayStartParams"]["resources"])) == {"kvtier_shard": c["shardsPerPod"]}


def test_doubling_the_warm_budget_grows_the_shard_memory(chart):
    mem = [int(container(groups(render(chart, {"tier": {"warmBytes": w}}))["cache-shards"])
               ["resources"]["requests"]["memory"][:-2]) for w in ("16GiB", "32GiB")]
    assert mem[1] - mem[0] == 16 * 1024 // 2   # 2 shards: +8 GiB each


def test_s3_credentials_come_from_the_secret_never_inline(chart):
    docs = render(chart, VALUE_SETS["s3"])
    cfg = tier_config(docs)
    assert cfg.cold_uri == "s3://kvtier-cache/prod"
    assert (cfg.s3_endpoint, cfg.s3_region) == ("http://minio.storage.svc:9000", "us-east-1")
    for gname, g in groups(docs).items():
        env = env_of(g)
        for var, key in (("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")):
            assert "value" not in env[var], gname
            assert env[var]["valueFrom"] == {"secretKeyRef": {"name": "kvtier-s3", "key": key}}
        assert env["KVTIER_API_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "kvtier-api", "key": "token"}}
        assert "kvtier-cold" not in {v["name"] for v in g["template"]["spec"]["volumes"]}   # no PVC with S3
    assert by_kind(docs, "PersistentVolumeClaim") == []
    assert "AWS" not in one(docs, "ConfigMap", "-config")["data"]["config.json"]
    # Key names are values too: other names flow through.
    # tokens bound to tenants: a JSON object token -> tenant from its own Secret
    env = env_of(groups(render(chart, {"serve": {"apiTokensSecret": {"name": "kvtier-tenants"}}}))["decode"])
    assert env["KVTIER_API_TOKENS"]["valueFrom"] == {"secretKeyRef": {"name": "kvtier-tenants", "key": "tokens.json"}}
    env = env_of(groups(render(chart, {"cold": {"uri": "s3://kv-bucket/p", "s3": {"credentialsSecret": {
        "name": "creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"}}}}))["head"])
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": "secret"}


def test_no_secret_env_without_a_secret(chart):
    for name in ("default", "raycluster"):   # PVC; S3 through pod identity (IRSA)
        for g in groups(render(chart, VALUE_SETS[name])).values():
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "KVTIER_API_TOKEN", "KVTIER_API_TOKENS"} & set(env_of(g))
    docs = render(chart, VALUE_SETS["raycluster"])
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/kvtier-cache")
    for g in groups(docs).values():
        assert g["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_pvc_cold_store_is_one_claim_mounted_in_every_ray_pod(chart):
    docs = render(chart, VALUE_SETS["pvc"])
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "local-nvme"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1600Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"   # cold blocks outlive the release
    assert tier_config(docs).cold_uri == "/mnt/nvme/kvtier"
    for gname, g in groups(docs).items():   # controller (head), shards and clients all read and write cold
        mounts = {m["name"]: m["mountPath"] for m in container(g)["volumeMounts"]}
        vols = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        assert mounts["kvtier-cold"] == "/mnt/nvme/kvtier", gname
        assert vols["kvtier-cold"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert mounts["models"] == "/models" and vols["models"]["persistentVolumeClaim"]["claimName"] == "llm-models"
    existing = render(chart, {"cold": {"pvc": {"existingClaim": "shared-nvme"}}})
    assert by_kind(existing, "PersistentVolumeClaim") == []
    vols = {v["name"]: v for v in groups(existing)["head"]["template"]["spec"]["volumes"]}
    assert vols["kvtier-cold"]["persistentVolumeClaim"]["claimName"] == "shared-nvme"
    assert by_kind(render(chart, {"cold": {"uri": ""}}), "PersistentVolumeClaim") == []   # no cold tier


def _gpu_keys(resources: dict) -> set[str]:
    return {k for part in resources.values() for k in part if "gpu" in k}


def test_cpu_only_requests_no_gpu(chart):
    docs = render(chart, VALUE_SETS["cpu-only"])
    for gname, g in groups(docs).items():
        assert _gpu_keys(container(g)["resources"]) == set(), gname
        assert "num-gpus" not in g["rayStartParams"]
        assert "tolerations" not in g["template"]["spec"]
    args = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["accelerator"] == "cpu" and args["dtype"] == "float32"   # the app's accelerator_config {"kind": "cpu"}
    assert args["prefill_replicas"] == args["decode_replicas"] == 1


def test_gpus_are_requested_on_prefill_and_decode_only(chart):
    gs = groups(render(chart, VALUE_SETS["pvc"]))   # 4 GPUs per prefill/decode pod
    for n in ("prefill", "decode"):
        assert container(gs[n])["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert gs[n]["rayStartParams"]["num-gpus"] == "4"
        assert json.loads(json.loads(gs[n]["rayStartParams"]["resources"])) == {f"kvtier_{n}": 4, "kvtier_engine": 4}
    for n in ("head", "cache-shards"):
        assert _gpu_keys(container(gs[n])["resources"]) == set()
    assert gs["head"]["rayStartParams"]["num-cpus"] == "0"   # no work on the head
    amd = groups(render(chart, {"gpuResourceName": "amd.com/gpu"}))
    assert container(amd["prefill"])["resources"]["limits"]["amd.com/gpu"] == 1


def app_args(docs) -> dict:
    serve = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    return app["args"]


def test_serve_config_runs_the_app_with_the_config_path(chart):
    docs = render(chart, VALUE_SETS["pvc"])
    serve = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = serve["applications"]
    assert app["import_path"] == "ray_apps.serve:app" and app["route_prefix"] == "/"
    assert app["args"] == {"shape": "pd", "model": "/models/Meta-Llama-3.1-8B-Instruct",
                           "tier_config": "/etc/kvtier/config.json", "accelerator": "gpu", "dtype": "bfloat16",
                           "max_model_len": 8192, "prefix_caching": True,
                           "prefill_replicas": 4, "decode_replicas": 4,   # one engine per GPU
                           "engine_resources": {"prefill": {"kvtier_prefill": 1}, "decode": {"kvtier_decode": 1}}}
    assert "deployments" not in app, "Ray Serve LLM names and places its own deployments"
    assert "model" not in app_args(render(chart))


def test_engine_args_tensor_parallel_and_the_shared_shape(chart):
    args = app_args(render(chart, {**VALUE_SETS["pvc"], "serve": {
        "shape": "shared", "engine": {"tensorParallelSize": 2, "acceleratorType": "H100", "dtype": "float16",
                                      "extraArgs": {"gpu_memory_utilization": 0.85}}}}))
    # 2 pods x 4 GPUs / 2 per engine: 4 engines, on the pods of both groups (kvtier_engine)
    assert args["shape"] == "shared" and args["replicas"] == 4 and "prefill_replicas" not in args
    assert args["tensor_parallel_size"] == 2 and args["accelerator_type"] == "H100" and args["dtype"] == "float16"
    assert args["engine_resources"] == {"engine": {"kvtier_engine": 1}}
    assert args["engine_kwargs"] == {"gpu_memory_utilization": 0.85}


def test_the_app_accepts_the_rendered_args(chart, monkeypatch, tmp_path):
    pytest.importorskip("ray.serve.llm")
    from ray_apps.serve import AppConfig, llm_config

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"codec": "kivi4", "cold_uri": str(tmp_path / "cold")}))
    for name in ("pvc", "cpu-only", "default"):
        args = app_args(render(chart, VALUE_SETS[name]))
        args["tier_config"] = str(cfg)   # the mounted ConfigMap's path, here
        args.pop("model", None)          # a folder on the cluster's volume
        app = AppConfig.from_args(args)
        role = "prefill" if app.shape == "pd" else "engine"
        bundle = llm_config(app, "/models/m", 1, role)["placement_group_config"]["bundle_per_worker"]
        assert bundle[f"kvtier_{role}"] == 1 and ("GPU" in bundle) == (app.accelerator == "gpu"), name


def test_service_monitor_scrapes_port_8080_of_every_ray_pod(chart):
    docs = render(chart, VALUE_SETS["s3"])
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service", "-metrics")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert svc["spec"]["clusterIP"] == "None"
    (port,) = svc["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("metrics", 8080, "metrics")
    for gname, g in groups(docs).items():
        assert svc["spec"]["selector"].items() <= g["template"]["metadata"]["labels"].items(), gname
        assert {"name": "metrics", "containerPort": 8080} in container(g)["ports"]
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
    assert by_kind(render(chart), "ServiceMonitor") == []


def test_grafana_dashboard_configmap(chart):
    import os

    from helmkit import CHART

    cm = one(render(chart), "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    with open(os.path.join(CHART, "dashboards", "kvtier.json")) as f:
        assert json.loads(cm["data"]["kvtier.json"]) == json.load(f)
    assert not [d for d in render(chart, {"grafana": {"dashboard": {"enabled": False}}}) if d["metadata"]["name"].endswith("-dashboard")]
