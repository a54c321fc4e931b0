"""With no Ray running, the engine's processes share one local tier (kvtier/vllm/tier.py).

Two processes (like vLLM's scheduler and worker, started together) connect with
``address="local"`` at the same time: exactly one starts the tier's helper process,
both join it, a chunk one puts the other finds, and the helper exits with the
process that started it. No vLLM needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from rayfixture import subprocess_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = r"""
import json, os, sys, time
import torch
import kvtier
from kvtier.config import TierConfig
from kvtier.vllm import tier
import ray

role, done = sys.argv[1], sys.argv[2]
tier.start("local", "vllm-local-test", TierConfig(codec="none", cold_uri="", hot_bytes=0, warm_bytes="64MiB",
                                                   num_shards=1), 150.0)
assert tier.ready(170.0), tier.error()
info = {"role": role, "gcs": ray.get_runtime_context().gcs_address, "pid": os.getpid()}
key = kvtier.chunk_keys(list(range(16)), "m", chunk_tokens=16)[0]
if role == "a":
    kvtier.put(key, torch.arange(2 * 2 * 16 * 4, dtype=torch.float32).view(1, 2, 2, 16, 4))
end = time.time() + 120
while kvtier.lookup([key]) < 1 and time.time() < end:
    time.sleep(0.2)
got = kvtier.get(key)
info["found"] = got is not None and float(got.sum()) == float(sum(range(256)))
print("RESULT " + json.dumps(info), flush=True)
end = time.time() + 120
while not os.path.exists(done) and time.time() < end:  # the starter keeps the tier up until both are done
    time.sleep(0.2)
"""


def test_two_processes_share_one_local_tier(tmp_path):
    env = subprocess_env()
    env["KVTIER_HOME"] = str(tmp_path)
    env.pop("RAY_ADDRESS", None)
    # a user's default: Ray 2.60 starts a new local cluster with token auth, and the processes joining it by
    # address must send the token (they did not: every lookup missed); HOME keeps the token (~/.ray) private
    env.pop("RAY_AUTH_MODE", None)
    env["HOME"] = str(tmp_path)
    done = tmp_path / "done"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, role, str(done)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for role in ("a", "b")]
    results, logs = [], []
    addr_path = tmp_path / "vllm" / "vllm-local-test.addr"
    try:
        for p in procs:
            lines = []
            deadline = time.time() + 240
            for line in p.stdout:
                lines.append(line)
                if line.startswith("RESULT "):
                    results.append(json.loads(line[7:]))
                    break
                if time.time() > deadline:
                    break
            logs.append("".join(lines[-20:]))
        addr = json.loads(addr_path.read_text())
    finally:
        done.write_text("1")
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    assert len(results) == 2, "\n".join(logs)
    assert results[0]["gcs"] == results[1]["gcs"]  # one Ray, one tier
    assert all(r["found"] for r in results)
    assert addr["address"] == results[0]["gcs"] and addr["pid"] not in {r["pid"] for r in results}
    assert addr["auth_mode"] == "token"
    end = time.time() + 90  # the helper notices its starter is gone (1 s polls) and stops the tier
    while time.time() < end and _alive(addr["pid"]):
        time.sleep(0.5)
    assert not _alive(addr["pid"]), "the tier helper outlived the processes that used it"
    assert not addr_path.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
