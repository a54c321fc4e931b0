"""Helpers of the Helm chart tests (imported by name: tests/helm is on sys.path
under pytest): render the chart offline with
helm-python-sdk, split the manifests, and validate them — core objects with
kubernetes-validate (strict), RayService/RayCluster with jsonschema against the
KubeRay CRDs' openAPIV3Schema. No cluster and no network are involved.
"""

from __future__ import annotations

import copy
import functools
import glob
import os

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(REPO, "helm", "kvtier")
CRD_DIR = os.path.join(os.path.dirname(REPO), "shared", "k8s-schemas", "kuberay")
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "demo", "llm"

# Every documented value set: the defaults and the files in helm/kvtier/ci/.
VALUE_SETS = {"default": {}} | {
    os.path.basename(p)[: -len("-values.yaml")]: yaml.safe_load(open(p))
    for p in sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each: libyaml is ~10x faster


def render(chart, values: dict | None = None) -> list[dict]:
    """The chart's manifests (NOTES.txt left out) as a list of objects."""
    out = chart.render(copy.deepcopy(values or {}), name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.load_all(text, Loader=_Loader) if d]
    return docs


def notes(chart, values: dict | None = None) -> str:
    out = chart.render(copy.deepcopy(values or {}), name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def cluster_spec(docs: list[dict]) -> dict:
    """The Ray cluster spec, from the RayService or the RayCluster."""
    ray = [d for d in docs if d["kind"] in ("RayService", "RayCluster")]
    assert len(ray) == 1, [d["kind"] for d in ray]
    return ray[0]["spec"]["rayClusterConfig"] if ray[0]["kind"] == "RayService" else ray[0]["spec"]


def groups(docs: list[dict]) -> dict[str, dict]:
    """{"head": headGroupSpec, "prefill": ..., "decode": ..., "cache-shards": ...}"""
    spec = cluster_spec(docs)
    return {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def env_of(group: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(group).get("env", [])}


def _strict(schema):
    """The CRD schema with additionalProperties: false on every object that lists its
    properties (the API server prunes or, with strict field validation, rejects
    unknown fields; jsonschema would accept them silently)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str):
    import jsonschema

    path = os.path.join(CRD_DIR, f"ray.io_{kind.lower()}s.yaml")
    if not os.path.exists(path):
        pytest.skip(f"KubeRay CRD {path} is not here (it lives in the shared steering folder)")
    with open(path) as f:
        crd = yaml.load(f, Loader=_Loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def validate_crd(doc: dict) -> list[str]:
    """Errors of a RayService/RayCluster against its CRD schema ([] = valid)."""
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    v = crd_validator(doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def validate_core(doc: dict) -> None:
    """kubernetes-validate --strict of a core object; raises on an error."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Each Ray group's pod template wrapped as a core v1 PodTemplate, for kubernetes-validate."""
    return {name: {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": f"{RELEASE}-{name}", "namespace": NAMESPACE},
                   "template": g["template"]}
            for name, g in groups(docs).items()}
