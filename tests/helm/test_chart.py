"""The kvtier Helm chart renders, lints and validates for every documented value
set (defaults and helm/kvtier/ci/*-values.yaml), and rejects invalid values at
render time with a message naming the value.

Rendering is offline (helm-python-sdk); core objects and every Ray pod template
are checked by kubernetes-validate in strict mode; RayService/RayCluster by
jsonschema against the KubeRay v1 CRD schema, made strict (unknown fields fail).
"""

from __future__ import annotations

import pytest

from helmkit import (CHART, KUBE_VERSION, VALUE_SETS, by_kind, cluster_spec, crd_validator, groups,
                      notes, pod_templates, render, validate_core, validate_crd)

CORE_KINDS = {"ConfigMap", "PersistentVolumeClaim", "Service", "ServiceAccount"}


def test_value_sets_cover_the_documented_cases():
    # S3 cold store, PVC cold store, CPU-only, no Serve app (RayCluster), and the defaults.
    assert set(VALUE_SETS) == {"default", "s3", "pvc", "cpu-only", "raycluster"}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict_passes(name):
    helm = pytest.importorskip("helm_python")
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []   # no warnings (strict)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_renders_and_validates(chart, name):
    docs = render(chart, VALUE_SETS[name])
    kinds = sorted(d["kind"] for d in docs)
    assert set(kinds) <= CORE_KINDS | {"RayService", "RayCluster", "ServiceMonitor"}, kinds
    # exactly one Ray object; names unique per kind
    assert len([k for k in kinds if k.startswith("Ray")]) == 1
    assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)
    for d in docs:
        assert d["metadata"]["namespace"] == "llm", d["metadata"]
        if d["kind"] in CORE_KINDS:
            validate_core(d)
        elif d["kind"] in ("RayService", "RayCluster"):
            assert validate_crd(d) == []
    for tpl in pod_templates(docs).values():
        validate_core(tpl)   # every Ray pod's spec: containers, volumes, probes, quantities


def test_crd_validation_is_strict(chart):
    # The check above would be worthless if unknown or mistyped fields passed.
    (rs,) = by_kind(render(chart), "RayService")
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 3          # typo of replicas
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # not a string
    errors = validate_crd(rs)
    assert any("'replica' was unexpected" in e for e in errors), errors
    assert any("rayStartParams.num-cpus" in e for e in errors), errors
    assert crd_validator("RayCluster") is not crd_validator("RayService")


def test_core_validation_is_strict(chart):
    import kubernetes_validate

    docs = render(chart)
    tpl = pod_templates(docs)["cache-shards"]
    tpl["template"]["spec"]["containers"][0]["resources"]["requests"]["memroy"] = "1Gi"
    tpl["template"]["spec"]["volumes"][0]["configMap"]["nmae"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(tpl)


def test_mode_picks_rayservice_or_raycluster(chart):
    assert [d["kind"] for d in render(chart) if d["kind"].startswith("Ray")] == ["RayService"]
    docs = render(chart, {"serve": {"enabled": False}})
    assert [d["kind"] for d in docs if d["kind"].startswith("Ray")] == ["RayCluster"]
    (rc,) = by_kind(docs, "RayCluster")
    # KubeRay runs the containers' own commands only with this annotation: every group
    # must then start Ray itself, and the head also keeps `kvtier start` running.
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for name, g in groups(docs).items():
        c = g["template"]["spec"]["containers"][0]
        script = c["args"][0]
        assert c["command"] == ["/bin/bash", "-lc", "--"]
        assert 'eval "$KUBERAY_GEN_RAY_START_CMD"' in script, name
        assert ("kvtier start --address auto" in script) == (name == "head"), name
    head_script = groups(docs)["head"]["template"]["spec"]["containers"][0]["args"][0]
    assert head_script.index("kvtier start") < head_script.index("KUBERAY_GEN_RAY_START_CMD")  # backgrounded first
    # With Serve, KubeRay's generated command is used unchanged.
    for g in groups(render(chart)).values():
        assert "command" not in g["template"]["spec"]["containers"][0]


def test_worker_groups_carry_replicas_scheduling_and_images(chart):
    values = {
        "image": {"repository": "registry.example/kvtier", "tag": "1.2.3"},
        "prefill": {"replicas": 3, "nodeSelector": {"pool": "h100"}, "image": {"tag": "1.2.4-cuda"},
                    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}]},
        "decode": {"replicas": 2, "affinity": {"podAntiAffinity": {}}},
        "cacheShards": {"replicas": 4, "image": {"pullPolicy": "Always"}},
    }
    gs = groups(render(chart, values))
    assert [gs[n]["replicas"] for n in ("prefill", "decode", "cache-shards")] == [3, 2, 4]
    for n in ("prefill", "decode", "cache-shards"):   # no autoscaling: the shard count is fixed
        assert gs[n]["minReplicas"] == gs[n]["maxReplicas"] == gs[n]["replicas"]
    spec = {n: g["template"]["spec"] for n, g in gs.items()}
    assert spec["prefill"]["nodeSelector"] == {"pool": "h100"}
    assert spec["prefill"]["tolerations"][0]["key"] == "dedicated"
    assert spec["decode"]["affinity"] == {"podAntiAffinity": {}}
    assert spec["prefill"]["containers"][0]["image"] == "registry.example/kvtier:1.2.4-cuda"
    assert spec["decode"]["containers"][0]["image"] == "registry.example/kvtier:1.2.3"
    assert spec["cache-shards"]["containers"][0]["imagePullPolicy"] == "Always"
    assert spec["head"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert cluster_spec(render(chart))["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("values, message", [
    ({"tier": {"warmBytes": -1}}, "/tier/warmBytes': minimum: got -1"),
    ({"tier": {"hotBytes": "-4GiB"}}, "/tier/hotBytes': '-4GiB' does not match"),
    ({"tier": {"warmBytes": "lots"}}, "/tier/warmBytes': 'lots' does not match"),
    ({"cold": {"bytes": -5}}, "/cold/bytes': minimum: got -5"),
    ({"cold": {"uri": "gs://bucket/kv"}}, "/cold/uri': 'gs://bucket/kv' does not match"),
    ({"cold": {"uri": "s3://"}}, "/cold/uri': 's3://' does not match"),
    ({"cold": {"uri": "relative/dir"}}, "/cold/uri': 'relative/dir' does not match"),
    ({"cold": {"uri": "s3://kv-bucket/p", "s3": {"region": ""}}}, "/cold/s3/region"),
    ({"tier": {"codec": "zip"}}, "/tier/codec': 'zip' does not match"),
    ({"tier": {"chunkTokens": 0}}, "/tier/chunkTokens': minimum: got 0"),
    ({"tier": {"tenant": "a b"}}, "/tier/tenant"),
    ({"prefill": {"gpus": -1}}, "/prefill/gpus': minimum: got -1"),
    ({"cacheShards": {"replicas": 0}}, "/cacheShards/replicas': minimum: got 0"),
    ({"cacheShards": {"memoryOverhead": "-1Gi"}}, "/cacheShards/memoryOverhead"),
    ({"serve": {"port": 70000}}, "/serve/port': maximum: got 70,000"),
    ({"serve": {"shape": "ring"}}, "/serve/shape"),
    ({"serve": {"engine": {"extraArgs": {"kv_transfer_config": {}}}}}, "/serve/engine/extraArgs"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),                 # a typo at the top
    ({"cold": {"s3": {"secretAccessKey": "wJalr..."}}}, "additional properties 'secretAccessKey' not allowed"),
    ({"cold": {"s3": {"credentialsSecret": {"name": "Bad_Name"}}}}, "/cold/s3/credentialsSecret/name"),
])
def test_invalid_values_fail_the_schema_with_a_message(chart, values, message):
    helm = pytest.importorskip("helm_python")
    with pytest.raises(helm.HelmValuesError) as e:
        render(chart, values)
    assert message in str(e.value)


@pytest.mark.parametrize("values, message", [
    ({"tier": {"warmBytes": "1KiB"}}, "tier.warmBytes=1KiB over 2 shards"),
    ({"prefill": {"replicas": 0}}, "prefill.replicas=0: the Serve app in shape pd"),
    ({"serve": {"shape": "shared"}, "prefill": {"replicas": 0}, "decode": {"replicas": 0}}, "shape shared needs"),
    ({"prefill": {"gpus": 0}}, "all on GPUs or all on CPUs"),
    ({"serve": {"engine": {"tensorParallelSize": 3}}, "prefill": {"gpus": 4}, "decode": {"gpus": 4}},
     "prefill.gpus=4 is not a multiple of serve.engine.tensorParallelSize=3"),
    ({"cold": {"uri": "/etc/kvtier/cold"}}, "cold.uri=\"/etc/kvtier/cold\" lies under a path the chart mounts"),
])
def test_invalid_combinations_fail_the_render_with_a_message(chart, values, message):
    helm = pytest.importorskip("helm_python")
    with pytest.raises(helm.HelmRenderError) as e:
        render(chart, values)
    assert message in str(e.value)


def test_lint_reports_invalid_values():
    helm = pytest.importorskip("helm_python")
    report = helm.lint(CHART, {"cold": {"uri": "ftp://host/kv"}}, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert any("/cold/uri" in e for e in report["errors"]), report


def test_prefill_and_decode_may_be_zero_without_serve(chart):
    gs = groups(render(chart, {"serve": {"enabled": False}, "prefill": {"replicas": 0}, "decode": {"replicas": 0}}))
    assert gs["prefill"]["replicas"] == gs["decode"]["replicas"] == 0


@pytest.mark.parametrize("name", VALUE_SETS)
def test_notes_say_how_to_reach_api_and_dashboard(chart, name):
    text = notes(chart, VALUE_SETS[name])
    assert "port-forward svc/demo-kvtier-head-svc 8265:8265" in text        # Ray dashboard
    if VALUE_SETS[name].get("serve", {}).get("enabled", True):
        assert "port-forward svc/demo-kvtier-serve-svc 8000:8000" in text   # the OpenAI API
        assert "/v1/models" in text
    else:
        assert 'kvtier.init(address="auto")' in text
    assert "Grafana" in text and "kvtier-overview" in text
    if name == "s3":   # the API token: how to read it, never the token
        assert "Authorization: Bearer $TOKEN" in text and "get secret kvtier-api" in text
