"""Smoke run of bench/e2e.py on a tiny random Llama: the benchmark's whole code path in seconds.

The benchmark measures ``kvtier.get`` through the real tier (``kvtier.init`` on
the session's shared Ray, in its own namespace).
Each must produce one recompute row, one floor row (the ideal hit: the tail alone) and one
row per (codec, tier) for every prompt length, hits that reuse every full chunk but the last token's, and, with
codec ``none``, bit-identical KV and the same first token as recompute. Timings
are not asserted: this box is shared, and the numbers belong to the real runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from rayfixture import ray_session  # noqa: E402,F401

CT = 16
LENGTHS = (48, 57)  # 48: an exact multiple (the last whole chunk is recomputed); 57: a partial tail


@pytest.fixture(scope="module")
def e2e():
    import torch

    spec = importlib.util.spec_from_file_location("bench_e2e", REPO / "bench" / "e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    # tiny matmuls: a second OpenMP thread only waits on a busy 2-core box (24 ms per 64x128 linear seen at load 12)
    torch.set_num_threads(1)
    yield mod
    torch.set_num_threads(threads)


def run(e2e, tmp_path) -> tuple[list[dict], str]:
    out = tmp_path / "e2e-cpu.md"
    rows = e2e.main(["--device", "cpu", "--model", "tiny", "--chunk-tokens", str(CT), "--no-baselines",
                     "--lengths", ",".join(map(str, LENGTHS)), "--codecs", "none,kivi4", "--reps", "1",
                     "--cold-dir", str(tmp_path), "--out", str(out)])
    return rows, out.read_text()


def check(rows: list[dict], report: str) -> None:
    want = [(n, kind, "-") for n in LENGTHS for kind in ("recompute", "floor")]  # floor: the ideal hit, no kvtier
    want += [(n, tier, codec) for n in LENGTHS for codec in ("none", "kivi4") for tier in ("hot", "warm", "cold")]
    assert sorted((r["tokens"], r["tier"], r["codec"]) for r in rows) == sorted(want)
    for r in rows:
        assert r["ttft"] > 0 and r["recompute"] > 0
        if r["tier"] == "recompute":
            continue
        assert r["cached"] == (r["tokens"] - 1) // CT * CT  # every full chunk but the one holding the last token
        if r["tier"] == "floor":
            assert r["mb"] == 0  # nothing read from any tier: the tail alone over KV already in the cache
            continue
        assert r["mb"] > 0 and len(r["stages"]) == 4
        if r["codec"] == "none":
            assert r["kv_err"] == 0.0, r  # the tier returned the prefill's KV bit for bit
            assert r["first_ok"] and r["agree"] == 1.0, r
            assert r["ratio"] < 1.0  # header and Arrow framing are counted: 'none' is a little larger than raw
        else:
            assert 0 < r["kv_err"] < 0.2, r  # kivi4's error on random activations is ~6e-2
            assert r["ratio"] > 1.0
    # the report holds the same rows as the table printed, plus the date, device and command
    for r in rows:
        assert f"| {r['tokens']} | {r['tier']} | {r['codec']} |" in report
    assert "- date: " in report and "- device: " in report and "- command: `python bench/e2e.py" in report


@pytest.mark.ray
def test_through_kvtier_get_on_the_real_tier(e2e, tmp_path, ray_session):
    import ray

    rows, report = run(e2e, tmp_path)
    check(rows, report)
    assert "load " in report, "the get's phases as the client timed them"
    assert not any(p.name.startswith("kvtier-bench-cold-") for p in tmp_path.iterdir())  # cold dir removed
    assert ray.is_initialized()  # joined the session's Ray and left it running
    namespaces = {a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert f"kvtier-bench-{os.getpid()}" not in namespaces  # its tier was stopped
