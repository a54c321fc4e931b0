"""The Grafana dashboard (helm/kvtier/dashboards/kvtier.json) is built on exactly
the metrics kvtier.metrics defines, under the names Ray's exporter gives them
(tests/kvtier/test_metrics.py reads those names back from a real exporter).
No Ray and no Grafana here: the PromQL is checked by its identifiers.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from helmkit import CHART
from kvtier.metrics import DEFAULT_TAGS, METRICS, exported_names

# PromQL functions, aggregations and keywords the dashboard may use; any other
# identifier outside label matchers, ranges and label lists is a metric name.
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "rate", "irate", "increase", "delta",
    "histogram_quantile", "clamp_min", "clamp_max", "abs", "and", "or", "unless", "bool", "offset",
}
# Labels Ray's exporter adds to every series (and "le" of histogram buckets).
RAY_LABELS = {"le", "NodeAddress", "WorkerId", "SessionName", "Component", "Version"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(os.path.join(CHART, "dashboards", "kvtier.json")) as f:
        return json.load(f)


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])   # panels inside collapsed rows
    return out


def _targets(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(dash) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                        # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                                      # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                                     # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)   # label lists
    e = re.sub(r"(?<![A-Za-z0-9_:])[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?(ms|s|m|h|d|w|y)?", "", e)  # numbers, durations
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e) if w not in PROMQL_WORDS}


def label_names(expr: str) -> set[str]:
    names = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return names


def test_metric_names_parser():
    expr = ('histogram_quantile(0.99, sum by (le, tier) (rate(ray_kvtier_get_latency_seconds_bucket'
            '{tier!="none", shard=~"a.*"}[$__rate_interval]))) / sum(ray_x_total offset 5m)')
    assert metric_names(expr) == {"ray_kvtier_get_latency_seconds_bucket", "ray_x_total"}
    assert label_names(expr) == {"le", "tier", "shard"}


def test_every_expr_uses_only_metrics_that_kvtier_exports(dashboard):
    exported = exported_names()
    targets = _targets(dashboard)
    assert len(targets) >= 15
    for title, expr in targets:
        names = metric_names(expr)
        assert names, f"{title!r}: no metric in {expr!r}"
        assert names <= exported, f"{title!r}: {sorted(names - exported)} are not metrics kvtier.metrics defines"


def test_every_label_is_one_kvtier_or_ray_sets(dashboard):
    known = {k for m in METRICS for k in m.tag_keys} | set(DEFAULT_TAGS) | RAY_LABELS
    for title, expr in _targets(dashboard):
        assert label_names(expr) <= known, f"{title!r}: unknown labels {sorted(label_names(expr) - known)}"


def test_every_metric_kvtier_defines_is_on_the_dashboard(dashboard):
    used = set().union(*(metric_names(e) for _, e in _targets(dashboard)))
    for m in METRICS:
        assert any(n.startswith(f"ray_{m.name}") for n in used), f"{m.name} is on no panel"


def test_panels_the_issue_asks_for(dashboard):
    by_title = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in _panels(dashboard)}

    def panel(word):
        found = [t for t in by_title if word.lower() in t.lower()]
        assert found, f"no panel about {word!r}: {sorted(by_title)}"
        return " ".join(e for t in found for e in by_title[t])

    assert "ray_kvtier_misses_total" in panel("hit rate") and "by (tier)" in panel("hit rate")
    assert "ray_kvtier_tier_capacity_bytes" in panel("capacity") and "ray_kvtier_tier_bytes" in panel("capacity")
    for quantile in ("histogram_quantile(0.5,", "histogram_quantile(0.99,"):
        assert quantile in panel("get latency") and quantile in panel("put latency")
    assert "by (transport)" in panel("transfer throughput")
    assert "ray_kvtier_demotions_total" in panel("demotions") and "ray_kvtier_evictions_total" in panel("evictions")
    assert "ray_kvtier_corrupt_blocks_total" in panel("corrupt")
    assert "ray_kvtier_raw_bytes_total" in panel("compression ratio")


def test_dashboard_is_importable_grafana_json(dashboard):
    assert dashboard["uid"] == "kvtier-overview" and dashboard["title"] == "kvtier"
    (ds,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    # no two panels overlap on the 24-column grid
    cells = {}
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
