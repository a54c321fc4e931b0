"""kvtier.metrics: TierMetrics recorded in a driver and in an actor, read back from
Ray's Prometheus exporter on a real local Ray; argument checks without Ray.

The Ray cluster of the exporter tests is their own, in a child process (its own
metrics port, a 500 ms report interval instead of Ray's 10 s), started once for
the module and shut down by the child before the assertions run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from kvtier.metrics import LATENCY_BOUNDARIES, METRICS, TierMetrics, exported_names

# -- argument checks (no Ray started: recording without ray.init goes nowhere) ---


@pytest.mark.parametrize("call, bad", [
    (lambda m: m.hit("lukewarm"), "lukewarm"),
    (lambda m: m.hit("none"), "'none'"),          # "none" is only for misses and get latency
    (lambda m: m.miss("gpu"), "gpu"),
    (lambda m: m.eviction("warm", -1), "n=-1"),
    (lambda m: m.tier_usage("warm", 1, -5, 10), "nbytes=-5"),
    (lambda m: m.get_latency(float("nan"), "hot"), "seconds=nan"),
    (lambda m: m.put_latency(-0.1), "seconds=-0.1"),
    (lambda m: m.demotion("cold", "warm", 1), "dst must be a lower tier"),
    (lambda m: m.transfer("ob ject", 10), "transport='ob ject'"),
    (lambda m: m.compression("kivi4", 100, 0), "stored_bytes=0"),
    (lambda m: m.compression(3.5, 100, 10), "codec=3.5"),
    (lambda m: m.error("cold", "", 1), "kind=''"),
])
def test_bad_arguments_raise_naming_the_value(call, bad):
    m = TierMetrics("client")
    with pytest.raises(ValueError, match=bad.replace("(", r"\(").replace(".", r"\.")):
        call(m)


def test_bad_role_and_shard_raise():
    with pytest.raises(ValueError, match="role='worker'"):
        TierMetrics("worker")
    with pytest.raises(ValueError, match="shard='a b'"):
        TierMetrics("shard", shard="a b")


def test_exported_names_follow_ray_naming():
    names = exported_names()
    assert "ray_kvtier_hits_total" in names                      # counter: ray_ + name + _total
    assert "ray_kvtier_tier_bytes" in names                      # gauge: ray_ + name
    assert {"ray_kvtier_get_latency_seconds_bucket", "ray_kvtier_get_latency_seconds_sum",
            "ray_kvtier_get_latency_seconds_count"} <= names     # histogram: three series
    assert all(n.startswith("ray_kvtier_") for n in names)
    assert len({m.name for m in METRICS}) == len(METRICS)


def test_import_kvtier_metrics_does_not_import_ray():
    code = "import sys, kvtier, kvtier.metrics; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- real Ray, real exporter ---------------------------------------------------------
# The Ray part runs in a child process with a Ray cluster of its own: the session's
# shared Ray (tests/rayfixture.py) may be up, and other tests' TierMetrics there
# would add to the counts asserted here. The child records, scrapes its exporter
# and prints the samples as JSON; the assertions are made here.

_KEEP = ("tier", "role", "shard", "src", "dst", "transport", "codec", "kind", "le")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> list[tuple[str, dict, float]]:
    """kvtier samples of the exporter, summed over Ray's own labels (WorkerId, NodeAddress, ...)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "kvtier" in s.name:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k in _KEEP))
                out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return [(n, dict(ls), v) for (n, ls), v in out.items()]


def _value(samples, name, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())


def _poll(port: int, done, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _scrape(port)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.3)


def _child(port: int, temp_dir: str) -> None:
    """Runs in the child: own Ray with metrics export on ``port``, records, scrapes, prints JSON."""
    import ray

    t0 = time.monotonic()
    # 500 ms instead of Ray's 10 s report interval: the export shows up in ~1 s.
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 500})
    try:
        @ray.remote(num_cpus=0)
        class Shard:
            def __init__(self):
                self.metrics = TierMetrics("shard", shard="shard-0")

            def work(self):
                m = self.metrics
                m.tier_usage("warm", 7, 7000, 10_000)
                m.hit("warm", 2)
                m.miss("warm")
                m.demotion("warm", "cold", 4)
                m.eviction("cold", 2)
                m.corrupt("cold")
                m.transfer("nixl", 4096)
                m.error("cold", "unreachable")
                return repr(m)

        shard = Shard.remote()              # its worker starts while the driver records
        pending = shard.work.remote()
        client = TierMetrics("client")
        client.hit("hot", 3, tokens=768)    # 3 blocks of 256 tokens: hits in blocks and in tokens
        client.miss("hot")
        client.miss("none")
        client.get_latency(0.004, "hot")    # lands in the le=0.005 bucket, not le=0.0025
        client.get_latency(0.2, "none")
        client.put_latency(0.02)
        client.tier_usage("hot", 3, 3000, 1 << 20)
        client.transfer("object_store", 1000)
        client.transfer("object_store", 500)
        client.compression("kivi4", 3500, 1000)
        client.compression("kivi4", 4500, 1000)
        client.eviction("hot", 0)           # a count of 0 records nothing (and does not raise)
        actor_repr = ray.get(pending, timeout=60)

        print(f"[child] init+record+actor {time.monotonic() - t0:.1f}s", file=sys.stderr)
        want = exported_names()
        first = _poll(port, lambda s: {n for n, _, _ in s} >= want
                      and _value(s, "ray_kvtier_hits_total", tier="warm") == 2
                      and _value(s, "ray_kvtier_hits_total", tier="hot") == 3, 20)
        # A gauge keeps the last value; a counter keeps adding.
        client.tier_usage("hot", 1, 1000, 1 << 20)
        client.hit("hot")
        second = _poll(port, lambda s: _value(s, "ray_kvtier_hits_total", tier="hot") == 4
                       and _value(s, "ray_kvtier_tier_bytes", tier="hot") == 1000, 10)
        print(f"[child] scraped {time.monotonic() - t0:.1f}s", file=sys.stderr)
        print(json.dumps({"actor": actor_repr, "first": first, "second": second}))
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def exported():
    """What the child scraped: {"actor": repr, "first": samples, "second": samples}."""
    pytest.importorskip("ray")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="kvtmet", dir="/tmp")  # short: Ray's socket paths stay < 107 chars
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(_free_port()), temp_dir],
                              env=env, capture_output=True, text=True, timeout=150)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.ray
def test_every_metric_is_exported_under_its_documented_name(exported):
    seen = {n for n, _, _ in exported["first"]}
    want = exported_names()
    assert seen == want, f"missing {sorted(want - seen)}, unexpected {sorted(seen - want)}"
    assert exported["actor"] == "TierMetrics(role='shard', shard='shard-0')"


@pytest.mark.ray
def test_counters_and_gauges_read_back_from_driver_and_actor(exported):
    s = exported["first"]
    # driver: role=client; actor: role=shard, shard=shard-0
    assert _value(s, "ray_kvtier_hits_total", tier="hot", role="client") == 3
    assert _value(s, "ray_kvtier_hit_tokens_total", tier="hot", role="client") == 768
    assert _value(s, "ray_kvtier_hits_total", tier="warm", role="shard", shard="shard-0") == 2
    assert _value(s, "ray_kvtier_misses_total", tier="hot") == 1
    assert _value(s, "ray_kvtier_misses_total", tier="none") == 1
    assert _value(s, "ray_kvtier_misses_total", tier="warm", shard="shard-0") == 1
    assert _value(s, "ray_kvtier_tier_bytes", tier="warm", shard="shard-0") == 7000
    assert _value(s, "ray_kvtier_tier_blocks", tier="warm") == 7
    assert _value(s, "ray_kvtier_tier_capacity_bytes", tier="warm") == 10_000
    assert _value(s, "ray_kvtier_tier_capacity_bytes", tier="hot", role="client") == 1 << 20
    assert _value(s, "ray_kvtier_demotions_total", src="warm", dst="cold") == 4
    assert _value(s, "ray_kvtier_evictions_total", tier="cold") == 2
    assert _value(s, "ray_kvtier_evictions_total", tier="hot") == 0
    assert _value(s, "ray_kvtier_corrupt_blocks_total", tier="cold") == 1
    assert _value(s, "ray_kvtier_transfer_bytes_total", transport="object_store") == 1500
    assert _value(s, "ray_kvtier_transfer_bytes_total", transport="nixl") == 4096
    assert _value(s, "ray_kvtier_errors_total", tier="cold", kind="unreachable") == 1
    # Exact mean ratio from the byte counters: 8000 raw / 2000 stored = 4.0.
    raw = _value(s, "ray_kvtier_raw_bytes_total", codec="kivi4")
    stored = _value(s, "ray_kvtier_stored_bytes_total", codec="kivi4")
    assert (raw, stored) == (8000, 2000)

    later = exported["second"]   # after hit("hot") and tier_usage("hot", 1, 1000, ...)
    assert _value(later, "ray_kvtier_hits_total", tier="hot") == 4
    assert _value(later, "ray_kvtier_tier_bytes", tier="hot", role="client") == 1000


@pytest.mark.ray
def test_histograms_read_back_with_their_buckets(exported):
    s = exported["first"]
    assert _value(s, "ray_kvtier_get_latency_seconds_count", tier="hot") == 1
    # Ray exports a histogram's _sum as bucket midpoints: 0.004 s in (0.0025, 0.005] adds 0.00375.
    assert 0.0025 <= _value(s, "ray_kvtier_get_latency_seconds_sum", tier="hot") <= 0.005
    assert _value(s, "ray_kvtier_get_latency_seconds_bucket", tier="hot", le="0.0025") == 0
    assert _value(s, "ray_kvtier_get_latency_seconds_bucket", tier="hot", le="0.005") == 1
    assert _value(s, "ray_kvtier_get_latency_seconds_count", tier="none") == 1
    les = {ls["le"] for n, ls, _ in s if n == "ray_kvtier_get_latency_seconds_bucket"}
    assert len(les) == len(LATENCY_BOUNDARIES) + 1   # every boundary and +Inf
    assert _value(s, "ray_kvtier_put_latency_seconds_bucket", le="0.01") == 0
    assert _value(s, "ray_kvtier_put_latency_seconds_bucket", le="0.025") == 1
    assert _value(s, "ray_kvtier_compression_ratio_count", codec="kivi4") == 2
    assert _value(s, "ray_kvtier_compression_ratio_bucket", codec="kivi4", le="3.0") == 0
    assert _value(s, "ray_kvtier_compression_ratio_bucket", codec="kivi4", le="3.5") == 1   # 3.5
    assert _value(s, "ray_kvtier_compression_ratio_bucket", codec="kivi4", le="5.0") == 2   # 4.5


if __name__ == "__main__":  # the child process of the `exported` fixture
    _child(int(sys.argv[1]), sys.argv[2])
