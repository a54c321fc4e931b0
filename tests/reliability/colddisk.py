"""The cold-disk scenario of test_faults.py, run as a script inside a private mount namespace:

    unshare -m --propagation private python tests/reliability/colddisk.py BASE_DIR

It mounts a tmpfs that holds two blocks as the cold directory of an embedded tier
(its own local Ray, started here so that the shard sees the mount), fills it
(ENOSPC), remounts it read-only (EROFS), and prints one JSON line of what it saw:
demotions that fit and failed, warm reads, the shard's last error and log lines.
Not collected by pytest; test tooling, not part of kvtier.
"""

import json
import logging
import os
import subprocess
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]

import kvtier  # noqa: E402
import ray  # noqa: E402
from kvtier.keys import tenant_key  # noqa: E402
from kvtier.runtime import api  # noqa: E402
from tierkit import keys_of, kv_of, one_block_bytes, same, wait_for  # noqa: E402

base = sys.argv[1]
d = os.path.join(base, "cold")
os.makedirs(d)
one = one_block_bytes()
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={2 * one + 64 * 1024}", "tmpfs", d], check=True)  # holds 2 blocks
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
kvtier.init(config=dict(codec="none", hot_bytes=0, num_shards=1, warm_bytes=3 * one, cold_uri=d, rpc_timeout_s=3.0))
logs = ray._private.worker._global_node.get_logs_dir_path()
k = keys_of("disk", 12)
out = {}

def shard_logs(needle):
    hits = 0
    for f in os.listdir(logs):
        if f.startswith("worker-") or f.startswith("python-core-worker"):
            with open(os.path.join(logs, f), errors="replace") as fh:
                hits += fh.read().count(needle)
    return hits

# full: 7 puts into 3 warm slots -> 4 demotions, 2 fit on the disk, 2 fail with ENOSPC
kvtier.put(k[:7], [kv_of("disk", i) for i in range(7)])
st1 = wait_for(lambda: (s := kvtier.stats())["cold"]["blocks"] + s["cold"]["write_failures"] == 4 and s, 60)
warm_ok = all(same(x, kv_of("disk", i)) for i, x in zip(range(4, 7), kvtier.get(k[4:7])))
api._get_client().cfg = api._get_client().cfg.replace(write_through=True)
t0 = time.monotonic(); kvtier.put(k[7], kv_of("disk", 7)); wt_put_s = time.monotonic() - t0
api._get_client().cfg = api._get_client().cfg.replace(write_through=False)
st = kvtier.stats()
out["full"] = dict(cold_blocks=st1["cold"]["blocks"], write_failures=st1["cold"]["write_failures"],
                   shard_errors=sum(s.get("errors", 0) for s in st["shards"]), warm_ok=warm_ok,
                   wt_put_s=wt_put_s, wt_get=same(kvtier.get(k[7]), kv_of("disk", 7)),
                   client_errors=st["client"]["errors"], logged=shard_logs("No space left on device"),
                   last_error=st1["shards"][0]["last_error"],
                   cold_served=[same(kvtier.get(key), kv_of("disk", k.index(key))) for key in k[:4]
                                if api._get_client().cold.contains(tenant_key(key, ""))])
# read-only: remount, then more demotions fail with EROFS; what is on the disk is still read
subprocess.run(["mount", "-o", "remount,ro", d], check=True)
fails0 = kvtier.stats()["cold"]["write_failures"]
kvtier.put(k[8:12], [kv_of("disk", i) for i in range(8, 12)])
st = wait_for(lambda: (s := kvtier.stats())["cold"]["write_failures"] > fails0 and s, 60)
warm_ok = all(same(x, kv_of("disk", i)) for i, x in zip(range(9, 12), kvtier.get(k[9:12])))
caller_key = {tenant_key(x, ""): x for x in k}  # objects are named <tenant-bound key>~<version>.kvb
on_disk = sorted(caller_key[f[:-4].split("~")[0]] for _, _, fs in os.walk(d) for f in fs if f.endswith(".kvb"))
out["ro"] = dict(write_failures=st["cold"]["write_failures"] - fails0, warm_ok=warm_ok,
                 cold_served=all(same(kvtier.get(key), kv_of("disk", k.index(key))) for key in on_disk),
                 on_disk=len(on_disk), logged=shard_logs("Read-only file system"), last_error=st["shards"][0]["last_error"])
kvtier.shutdown()
print(json.dumps(out))
