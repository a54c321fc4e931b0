"""The tier across processes and nodes: concurrent clients, two nodes, the embedded default.

Each scenario runs real client processes (``python -c``) so that nothing is
shared with this process but the Ray cluster: three clients joining one
cluster at once (one controller, everyone reads everyone's blocks), a
two-node ``ray.cluster_utils.Cluster`` (shards spread over nodes, a block put
on one node read on the other), and ``kvtier.init()`` with no Ray running
(an embedded tier, its cold blocks on a real S3 server on 127.0.0.1, that
``shutdown()`` stops).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rayfixture import subprocess_env

pytestmark = pytest.mark.ray

COMMON = textwrap.dedent("""
    import json, sys, time, zlib
    import torch
    import kvtier

    def kv_of(tag, i):
        g = torch.Generator().manual_seed(7919 * i + zlib.crc32(tag.encode()))  # same in every process
        return torch.randn((2, 2, 2, 256, 64), generator=g).to(torch.bfloat16)

    def keys_of(tag, n):
        return kvtier.chunk_keys(list(range(256 * n)), tag, chunk_tokens=256)

    def wait_for(cond, timeout=90.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            time.sleep(0.2)
        raise SystemExit(f"timed out waiting for {cond}")

    CFG = dict(codec="none", cold_uri="", hot_bytes=0, warm_bytes="64MiB", num_shards=2, rpc_timeout_s=10.0)
""")

CLIENT = COMMON + textwrap.dedent("""
    addr, ns, me, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    kvtier.init(address=addr, namespace=ns, config=CFG)
    import ray
    controller = ray.get_actor("kvtier-controller", namespace=ns)._actor_id.hex()
    mine = keys_of(f"proc{me}", 4)
    kvtier.put(mine, [kv_of(f"proc{me}", i) for i in range(4)])
    checked = 0
    for other in range(n):
        ks = keys_of(f"proc{other}", 4)
        wait_for(lambda: kvtier.lookup(ks) == 4)
        for i, got in enumerate(kvtier.get(ks)):
            assert got is not None and torch.equal(got, kv_of(f"proc{other}", i)), (me, other, i)
            checked += 1
    print(json.dumps({"controller": controller, "checked": checked}))
    kvtier.shutdown()
""")


def run_all(scripts: list[list[str]], timeout: float = 240.0, extra_env: dict | None = None) -> list[str]:
    env = subprocess_env()
    env.update(extra_env or {})
    env.pop("RAY_ADDRESS", None)  # each script says which cluster it joins
    procs = [subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for args in scripts]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"client process failed ({p.returncode}):\n{err[-3000:]}"
        outs.append(out.strip().splitlines()[-1])
    return outs


def test_three_client_processes_share_one_tier(ray_session):
    from kvtier.runtime.api import stop_tier

    ns = "kvt-test-procs"
    try:
        # all three start at once on a namespace with no tier: they race to create the controller
        outs = [json.loads(o) for o in run_all([[CLIENT, ray_session, ns, str(i), "3"] for i in range(3)])]
        assert len({o["controller"] for o in outs}) == 1, "two clients starting at once made two controllers"
        assert [o["checked"] for o in outs] == [12, 12, 12]
    finally:
        stop_tier(ns)


MULTINODE = COMMON + textwrap.dedent("""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        info = kvtier.init(address=cluster.address, namespace="multinode", config=CFG)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        assert len(nodes) == 2, nodes
        shard_nodes = sorted(s["node_id"] for s in info["shards"])
        assert shard_nodes == nodes, f"shards not spread over the nodes: {shard_nodes} vs {nodes}"
        here = ray.get_runtime_context().get_node_id()
        there = [n for n in nodes if n != here][0]

        a = keys_of("from-head", 2)
        kvtier.put(a, [kv_of("from-head", i) for i in range(2)])

        @ray.remote(num_cpus=0)
        def on_other_node(addr, keys):
            import torch, kvtier, ray
            kvtier.init(address=addr, namespace="multinode", config=CFG)
            got = kvtier.get(keys)
            b = kvtier.chunk_keys(list(range(512)), "from-worker", chunk_tokens=256)
            kvtier.put(b, [kv_of("from-worker", i) for i in range(2)])
            node = ray.get_runtime_context().get_node_id()
            kvtier.shutdown()
            return node, [None if x is None else x.float().sum().item() for x in got], b

        node, sums, b = ray.get(on_other_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(there, soft=False)).remote(cluster.address, a), timeout=180)
        assert node == there
        assert sums == [kv_of("from-head", i).float().sum().item() for i in range(2)], sums
        got = kvtier.get(b)  # put on the other node, read here
        assert all(x is not None and torch.equal(x, kv_of("from-worker", i)) for i, x in enumerate(got))
        st = kvtier.stats()
        assert sorted(s["node_id"] for s in st["shards"] if s["blocks"]) == nodes, st["shards"]
        print(json.dumps({"ok": True, "blocks": st["warm"]["blocks"]}))
        kvtier.shutdown(stop=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
def test_two_node_cluster_block_put_on_one_node_is_read_on_the_other():
    (out,) = run_all([[MULTINODE]], timeout=300)
    assert json.loads(out) == {"ok": True, "blocks": 4}


EMBEDDED = COMMON + textwrap.dedent("""
    import os
    import ray
    from kvtier.tiers.cold import ColdStore

    endpoint = sys.argv[1]
    assert not ray.is_initialized() and "RAY_ADDRESS" not in os.environ
    one = kvtier.compress(kv_of("x", 0), "none", key=keys_of("embedded", 1)[0]).nbytes
    uri = "s3://kvtier-test/embedded"
    info = kvtier.init(config=dict(CFG, num_shards=1, warm_bytes=2 * one, cold_uri=uri, s3_endpoint=endpoint))
    assert info["embedded"] and ray.is_initialized()
    k = keys_of("embedded", 4)
    kvtier.put(k, [kv_of("embedded", i) for i in range(4)])
    # the warm shard holds 2 blocks: the 2 older ones are demoted to S3 by the shard
    wait_for(lambda: kvtier.stats()["cold"]["blocks"] == 2)
    on_s3 = sorted(key for key, _ in ColdStore(uri, s3_endpoint=endpoint).list())
    from kvtier.runtime import api
    assert on_s3 == sorted(api._get_client()._keys(k[:2])), on_s3  # objects are named after tenant-bound keys
    assert kvtier.lookup(k) == 4
    got = kvtier.get(k)
    assert all(x is not None and torch.equal(x, kv_of("embedded", i)) for i, x in enumerate(got))
    st = kvtier.stats()
    assert st["cold"]["hits"] == 2 and st["warm"]["hits"] == 2, st
    kvtier.shutdown()
    assert not ray.is_initialized(), "shutdown of an embedded tier stops its Ray"
    print(json.dumps({"ok": True, "shards": len(st["shards"]), "on_s3": len(on_s3)}))
""")


def test_embedded_tier_with_an_s3_cold_store_starts_and_stops_with_the_process():
    """kvtier.init() with no Ray running: a local Ray, one shard, cold blocks on a real S3 server."""
    from s3server import s3_server

    with s3_server() as s3:
        env = dict(s3.env())  # credentials reach every Ray process through the environment, never the config
        (out,) = run_all([[EMBEDDED, s3.endpoint]], timeout=240, extra_env=env)
    assert json.loads(out) == {"ok": True, "shards": 1, "on_s3": 2}
