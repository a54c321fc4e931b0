"""Faults injected into a real tier on a real local Ray, each under client load, bounded in time.

Every scenario checks the three promises of issue 6 over every call it made:
no call raised, no call outlived its bound (``rpc_timeout_s`` based, never a
hang), and no get returned anything but the exact bytes its key was put with
(codec ``none``; a miss is allowed, wrong data never). Then it checks that what
was in the warm or cold tier before the fault is still there, and measures the
recovery (printed with ``-s``; the figures in bench/results/reliability.md come
from such a run).

The Ray of this module is started after a real S3 server (tests/s3server.py)
and with its credentials in the environment, so the tier's actors can reach
it: credentials travel by environment only, never in the config.
Scenarios already proven elsewhere are cited in reliability.md, not repeated
(an idle dead shard and controller restart: tests/kvtier/test_runtime.py;
ColdStore-level outages: tests/kvtier/test_cold.py).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid

import pytest

import kvtier
from kvtier.keys import tenant_key
from kvtier.runtime import api
from rayfixture import REPO_DIR, subprocess_env
from tierkit import Load, controller, keys_of, kv_of, one_block_bytes, same, tier, wait_for

ray = pytest.importorskip("ray")
import ray.cloudpickle  # noqa: E402

pytestmark = pytest.mark.ray
# the actor below runs this module's code in a Ray worker, which cannot import test modules by name
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

RPC = 2.0  # rpc_timeout_s of the tiers here: short, so that faults show within a test's budget
# the longest any public call may take: a few rpc timeouts in a row (locate, then a shard's reply) plus
# 10 s of slack for this 2-core box running other test jobs at load ~14 (measured: worst call 6.9 s)
BOUND_S = 3 * RPC + 10.0


def check_load(load: Load, hung: list[str]) -> None:
    assert hung == [], f"client threads still inside a call {BOUND_S:.0f} s after stop: {hung}"
    assert load.errors() == [], load.errors()[:5]
    assert load.count("wrong") == 0, "a get returned bytes that are not what was put under its key"
    assert load.slowest() < BOUND_S, f"a call took {load.slowest():.1f} s (bound {BOUND_S:.0f} s)"


def report(name: str, **figures) -> None:
    print(f"\nRELIABILITY {name}: " + json.dumps(figures, sort_keys=True))


# ---------------------------------------------------------------- a warm shard dies under load
def test_warm_shard_killed_during_mixed_load(cluster, tmp_path):
    from kvtier.tiers.cold import ColdStore

    # 128 MiB of warm per shard (512 blocks): the load's queued puts (~1 ms each) demote far fewer of the
    # preloaded blocks before the kill than with 32 MiB (a demoted block has a cold copy: it is served, not lost)
    with tier(num_shards=2, warm_bytes="256MiB", rpc_timeout_s=RPC, cold_uri=str(tmp_path)) as info:
        client = api._get_client()
        k = keys_of("shard-kill", 16)
        kvs = [kv_of("shard-kill", i) for i in range(16)]
        kvtier.put(k[:10], kvs[:10])  # warm only
        client.cfg = client.cfg.replace(write_through=True)
        kvtier.put(k[10:], kvs[10:])  # warm + cold
        client.cfg = client.cfg.replace(write_through=False)
        # puts return once queued: stored before the kill, or a queued warm-only block would go to the shard
        # Ray restarts and be served after it (this failed whenever the store queue ran late)
        assert kvtier.flush(30), "the preloaded blocks stored within 30 s"
        on0 = {i for i, key in enumerate(k) if client._pick_shard(tenant_key(key, ""))["id"] == "kvtier-shard-0"}
        warm_only, saved, live = sorted(on0 & set(range(10))), sorted(on0 & set(range(10, 16))), sorted(set(range(16)) - on0)
        assert warm_only and saved and live, "the keys spread over both shards, with and without cold copies"

        load = Load("shard-kill-load", k, kvs, threads=3).start()
        time.sleep(1.0)
        t_kill = time.monotonic()
        ray.kill(ray.get_actor("kvtier-shard-0", namespace=info["namespace"]), no_restart=False)
        cold = ColdStore(str(tmp_path))

        def lost_now() -> list[int]:  # warm-only on shard 0 at the kill: not demoted (to cold) by the load
            return [i for i in warm_only if not cold.contains(tenant_key(k[i], ""))]

        # the controller's monitor (1 s period) sees the dead shard and forgets its warm-only blocks
        forgotten = wait_for(lambda: lost_now() and kvtier.lookup([k[i] for i in lost_now()]) == 0
                             and time.monotonic(), timeout=30,
                             what="the dead shard's warm-only blocks forgotten (or: the load demoted every one of them "
                                  "to cold before the kill, leaving none to lose)") - t_kill
        lost = lost_now()
        saved += [i for i in warm_only if i not in lost]  # demoted before the kill: their cold copy serves them
        # Ray restarts the shard (max_restarts=-1): a new put to it round-trips again
        probe = keys_of("shard-kill-probe", 64)
        probe = [p for p in probe if client._pick_shard(tenant_key(p, ""))["id"] == "kvtier-shard-0"]

        def round_trip():
            kvtier.put(probe[0], kv_of("shard-kill-probe", 0))
            return same(kvtier.get(probe[0]), kv_of("shard-kill-probe", 0))

        serving = wait_for(lambda: round_trip() and time.monotonic(), timeout=60, what="shard-0 serving again") - t_kill
        time.sleep(1.0)
        hung = load.stop(BOUND_S)
        check_load(load, hung)
        assert load.count("ok", "get", after=t_kill) > 0, "the tier kept serving gets after the kill"
        assert load.count("n", "put", after=t_kill) > 0

        out = kvtier.get(k)
        for i, x in enumerate(out):
            if i in lost:
                assert x is None, "a block whose only copy died with its shard"
            else:
                assert same(x, kvs[i]), f"block {i} (live shard or cold copy) must still be served"
        assert all(kvtier.contains(k[i]) for i in saved) and not any(kvtier.contains(k[i]) for i in lost)
        st = kvtier.stats()
        assert all(s["alive"] for s in st["shards"])
        report("shard_kill", forgotten_s=round(forgotten, 2), serving_again_s=round(serving, 2),
               ops=len(load.ops), ops_after_kill=load.count("n", after=t_kill), wrong=load.count("wrong"),
               misses=load.count("miss"), slowest_s=round(load.slowest(), 2), lost_warm_only=len(lost),
               saved_by_cold=len(saved))


# ---------------------------------------------------------------- the controller dies under load
def test_controller_killed_and_restarted_under_load(cluster, tmp_path):
    from kvtier.tiers.cold import ColdStore

    one = one_block_bytes()
    with tier(num_shards=2, warm_bytes=12 * one, rpc_timeout_s=RPC, cold_uri=str(tmp_path)) as info:
        k = keys_of("ctl-kill", 16)
        kvs = [kv_of("ctl-kill", i) for i in range(16)]
        kvtier.put(k, kvs)
        st = wait_for(lambda: (s := kvtier.stats())["warm"]["blocks"] + s["cold"]["blocks"] == 16
                      and s["cold"]["blocks"] >= 2 and s, what="demotions settled")
        before = {"warm": st["warm"]["blocks"], "cold": st["cold"]["blocks"]}
        pid = st["controller"]["pid"]

        load = Load("ctl-kill-load", k, kvs, threads=3, put_frac=0.2).start()
        time.sleep(2.0)
        t_kill = time.monotonic()
        ray.kill(controller(info["namespace"]), no_restart=False)
        back = wait_for(lambda: kvtier.stats().get("controller", {}).get("pid") not in (None, pid) and time.monotonic(),
                        timeout=120, what="a new controller process") - t_kill
        time.sleep(2.0)
        hung = load.stop(BOUND_S)
        check_load(load, hung)
        first_get = load.first_ok_after(t_kill + back)

        # every block a shard or the cold store holds now is gettable, byte for byte
        last = {}

        def settled():
            s = last["st"] = kvtier.stats()
            return s["warm"]["blocks"] == sum(x.get("blocks", 0) for x in s["shards"]) and s
        try:
            settled_st = wait_for(settled, timeout=30, what="shards and index agree")
        except AssertionError:
            dbg = []
            for i in range(2):
                h = ray.get_actor(f"kvtier-shard-{i}", namespace=info["namespace"])
                items = ray.get(h.inventory.remote(), timeout=30)["items"]
                ks = [it[0] for it in items]
                ctl = controller(info["namespace"])
                w = [loc and loc.tier for loc in ray.get(ctl.locate.remote(ks, pin=False), timeout=30)[0]]
                dbg.append([(kk[:8], it[2], ww) for kk, it, ww in zip(ks, items, w)])
            raise AssertionError(f"index and shards disagree: {dbg}") from None
        shards = [ray.get_actor(f"kvtier-shard-{i}", namespace=info["namespace"]) for i in range(2)]
        held = {item[0] for h in shards for item in ray.get(h.inventory.remote(), timeout=30)["items"]}
        held |= {key for key, _ in ColdStore(str(tmp_path)).list()}
        stored = {tenant_key(x, ""): x for x in k + keys_of("ctl-kill-load", 4000)}  # stored key -> the caller's key
        held = {stored[x] for x in held if x in stored}
        expected = dict(zip(k, kvs))
        expected.update({key: kv_of("ctl-kill-load", i) for i, key in enumerate(keys_of("ctl-kill-load", 4000))
                         if key in held})
        assert set(k) <= held, "every block put before the kill is still in a shard or the cold store"
        keys = sorted(held & set(expected))
        got = [x for i in range(0, len(keys), 64) for x in kvtier.get(keys[i:i + 64])]
        bad = [key[:12] for key, x in zip(keys, got) if not same(x, expected[key])]
        assert bad == [], f"{len(bad)} of {len(keys)} held blocks not served after the restart: {bad[:5]}"
        assert kvtier.lookup(k) == 16
        report("controller_kill", restart_s=round(back, 2),
               first_get_after_restart_s=None if first_get is None else round(first_get, 2), before=before,
               held_after=len(keys), ops=len(load.ops), wrong=load.count("wrong"), misses=load.count("miss"),
               slowest_s=round(load.slowest(), 2), index_keys=settled_st["keys"])


# ---------------------------------------------------------------- a prefill worker dies mid-transfer
@ray.remote(num_cpus=0)
class PrefillLike:
    """What a prefill worker does with kvtier: put its chunks, publish a handoff, read cold blocks."""

    def run(self, gcs: str, namespace: str, keys: list, kvs: list) -> dict:
        import ray as r
        import torch as t

        import kvtier as kt
        from kvtier.runtime import api as kapi
        from kvtier.transport import ObjectStoreTransport

        kt.init(address=gcs, namespace=namespace)
        kvs = [t.from_numpy(x.copy()) for x in kvs]
        kt.put(keys, kvs)
        assert kt.flush(60), "the puts are stored (in the background) before the reads below"
        self.transport = ObjectStoreTransport()  # only its death frees what it published
        blocks = [kt.compress(x, "none", key=k) for k, x in zip(keys, kvs)]
        desc = self.transport.publish([(b.key, b.to_arrow()) for b in blocks])
        # a get in flight: the controller pins the cold-only blocks under a lease that this process never releases
        bound = kapi._get_client()._keys(keys)  # the tenant-bound keys the tiers store
        _, lease = r.get(kapi._get_client().controller.locate.remote(bound), timeout=30)
        return {"desc": desc, "lease": lease}

    def ping(self) -> bool:
        return True


def test_prefill_worker_dies_mid_transfer_leaks_no_block_or_pin(cluster, tmp_path):
    from kvtier.transport import ObjectStoreTransport, pull

    one = one_block_bytes()
    with tier(num_shards=1, warm_bytes=3 * one, rpc_timeout_s=1.0, cold_uri=str(tmp_path)) as info:
        k = keys_of("prefill-dies", 6)
        kvs = [kv_of("prefill-dies", i) for i in range(6)]
        actor = PrefillLike.remote()
        out = ray.get(actor.run.remote(cluster["gcs"], info["namespace"], k, [x.numpy() for x in kvs]), timeout=180)
        assert out["lease"], "the cold-only blocks were pinned by the dying reader"
        assert kvtier.stats()["leases"] >= 1
        t_kill = time.monotonic()
        ray.kill(actor, no_restart=True)  # dies holding a handoff lease and a pin

        def dead() -> bool:  # ray.kill is asynchronous: a call may still be answered just after it
            try:
                ray.get(actor.ping.remote(), timeout=10)
                return False
            except ray.exceptions.RayActorError:
                return True

        wait_for(dead, timeout=60, what="the prefill actor gone")

        sink = ObjectStoreTransport()
        t0 = time.monotonic()
        pulled = pull(sink, out["desc"], timeout_s=5.0)
        pull_s = time.monotonic() - t0
        assert pull_s < 5.0 + 1.0, "a pull from a dead source is bounded by its timeout"
        assert all(b is None or (b.key == key and same(kvtier.decompress(b), kv))
                   for b, key, kv in zip(pulled, k, kvs)), "a pulled block is a miss or the exact block"
        assert sink.stats()["transport"] == "object_store"  # the receiver holds nothing after a pull: no leases to leak

        # the blocks it put outlive it (the shard owns them; demoted ones are in the cold store)
        got = kvtier.get(k)
        assert all(same(x, y) for x, y in zip(got, kvs))
        # its pin lease expires (3 x rpc_timeout_s + 5 s = 8 s here) and the pinned blocks can move again
        released = wait_for(lambda: kvtier.stats()["leases"] == 0 and time.monotonic(), timeout=30,
                            what="the dead reader's lease expired") - t_kill
        assert released <= 8.0 + 3.0, f"the lease outlived its {8.0} s term by {released - 8.0:.1f} s"
        st = kvtier.stats()
        assert st["keys"] == 6 and st["warm"]["blocks"] + st["cold"]["blocks"] >= 6
        assert st["warm"]["bytes"] <= 3 * one
        report("prefill_dies", pull_s=round(pull_s, 2), pulled_blocks=sum(b is not None for b in pulled),
               lease_released_s=round(released, 2), blocks_gettable=sum(x is not None for x in got))


# ---------------------------------------------------------------- S3 goes away and comes back
def test_s3_endpoint_away_and_back_through_the_tier(cluster, caplog):
    s3 = cluster["s3"]
    one = one_block_bytes()
    caplog.set_level(logging.INFO, logger="kvtier")
    uri = f"s3://kvtier-rel/{uuid.uuid4().hex[:10]}"
    with tier(num_shards=1, warm_bytes=6 * one, rpc_timeout_s=RPC, cold_uri=uri, s3_endpoint=s3.endpoint):
        k = keys_of("s3-outage", 14)
        kvs = [kv_of("s3-outage", i) for i in range(14)]
        kvtier.put(k[:8], kvs[:8])  # 6 fit in warm: the 2 oldest are demoted to S3
        wait_for(lambda: kvtier.stats()["cold"]["blocks"] == 2, what="2 blocks demoted to S3")
        bound = api._get_client()._keys(k[:8])  # the tenant-bound keys the tiers store
        where = [loc and loc.tier for loc in ray.get(api._get_client().controller.locate.remote(bound, pin=False), timeout=30)[0]]
        cold_keys = [key for key, w in zip(k[:8], where) if w == "cold"]
        warm_keys = [key for key, w in zip(k[:8], where) if w == "warm"]
        assert len(cold_keys) == 2 and len(warm_keys) == 6, where

        s3.stop()
        t_down = time.monotonic()
        try:
            # puts continue into warm; gets of warm blocks are served; cold reads are misses, quickly
            t0 = time.monotonic()
            kvtier.put(k[8:10], kvs[8:10])
            put_s = time.monotonic() - t0
            for i in (8, 9):
                assert same(kvtier.get(k[i]), kvs[i])
            t0 = time.monotonic()
            cold_reads = [kvtier.get(key) for key in cold_keys for _ in range(3)]
            cold_read_s = (time.monotonic() - t0) / len(cold_reads)
            assert all(x is None for x in cold_reads), "S3 is down: a cold block is a miss"
            # the two demotions forced by those puts fail: counted, the blocks dropped (cache eviction, no copy)
            st = wait_for(lambda: (s := kvtier.stats())["cold"]["write_failures"] >= 2 and s,
                          what="failed demotions counted")
            assert put_s < BOUND_S and cold_read_s < BOUND_S
            errors_down = st["cold"].get("client_errors", 0) + sum(s.get("errors", 0) for s in st["shards"])
            assert st["cold"].get("client_errors", 0) >= len(cold_reads)
            assert all(s["alive"] for s in st["shards"]) and st["controller"]["errors"] >= 0
            dropped = st["cold"]["write_failures"]
        finally:
            s3.start()
        t_up = time.monotonic()
        down_s = t_up - t_down
        # errors are logged once per interval in this process (client + cold store), not once per failure
        lines = [r for r in caplog.records if r.name.startswith("kvtier") and r.levelno >= logging.WARNING]
        assert 1 <= len(lines) <= 4, [r.getMessage() for r in lines]
        assert errors_down > len(lines)

        # the objects that were on S3 before the outage are still there and served
        back = wait_for(lambda: all(same(x, kvs[k.index(key)]) for key, x in zip(cold_keys, kvtier.get(cold_keys)))
                        and time.monotonic(), timeout=30, what="cold blocks served again") - t_up
        # demotions resume: new puts push the oldest warm blocks down to S3 again
        before = kvtier.stats()["cold"]["blocks"]
        kvtier.put(k[10:14], kvs[10:14])
        st = wait_for(lambda: (s := kvtier.stats())["cold"]["blocks"] >= before + 2 and s, timeout=30,
                      what="demotions to S3 resumed")
        assert st["cold"]["write_failures"] == dropped, "no demotion failed after S3 came back"
        on_s3 = [key for key in k if api._get_client().cold.contains(key)]
        assert all(same(kvtier.get(key), kvs[k.index(key)]) for key in on_s3)
        assert all(same(x, kvs[i]) for i, x in zip(range(10, 14), kvtier.get(k[10:14])))
        report("s3_outage", outage_s=round(down_s, 1), put_during_outage_s=round(put_s, 2),
               cold_read_during_outage_s=round(cold_read_s, 3), errors_counted=errors_down, log_lines=len(lines),
               demotions_dropped=dropped, cold_served_again_s=round(back, 2), on_s3_after=len(on_s3),
               warm_before=len(warm_keys))


# ---------------------------------------------------------------- a corrupted cold object
def test_blocks_corrupted_at_rest_are_detected_on_get_counted_deleted(cluster, tmp_path):
    one = one_block_bytes()
    with tier(num_shards=1, warm_bytes=2 * one, rpc_timeout_s=RPC, cold_uri=str(tmp_path)):
        k = keys_of("corrupt", 8)
        kvs = [kv_of("corrupt", i) for i in range(8)]
        kvtier.put(k, kvs)
        wait_for(lambda: (s := kvtier.stats())["cold"]["blocks"] == 6 and s["warm"]["blocks"] == 2,
                 what="6 blocks in the cold dir")
        path = {key: next(tmp_path.rglob(f"{tenant_key(key, '')}~*.kvb")) for key in k[:6]}
        data = {key: p.read_bytes() for key, p in path.items()}
        victims = {"bit flips": k[0], "truncation": k[1], "swapped with another key's file": k[2]}
        flipped = bytearray(data[k[0]])
        for pos in (len(flipped) // 3, len(flipped) // 2, 2 * len(flipped) // 3):  # inside the KV payload
            flipped[pos] ^= 0x10
        path[k[0]].write_bytes(bytes(flipped))
        path[k[1]].write_bytes(data[k[1]][: len(data[k[1]]) // 2])
        path[k[2]].write_bytes(data[k[3]])
        before = kvtier.stats()["cold"].get("client_corrupt", 0)

        out = kvtier.get(k)
        for i, x in enumerate(out):
            if k[i] in victims.values():
                assert x is None, f"corrupt block {i} was returned"
            else:
                assert same(x, kvs[i])
        st = kvtier.stats()
        assert st["cold"]["client_corrupt"] - before == 3
        for what, key in victims.items():
            assert not path[key].exists(), f"{what}: the corrupt object was deleted"
        wait_for(lambda: not any(kvtier.contains(key) for key in victims.values()), what="index forgot them")
        assert kvtier.get(list(victims.values())) == [None] * 3  # and every later read is a miss too
        assert same(kvtier.get(k[3]), kvs[3]), "the file used for the swap is intact"
        report("corrupt_at_rest", detected=3, returned=0, deleted=3)


# ---------------------------------------------------------------- the cold directory fills up or turns read-only


def _can_mount() -> bool:
    import shutil

    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_cold_dir_full_then_read_only_warm_keeps_working(tmp_path):
    """A real ENOSPC and a real EROFS under an embedded tier (its own Ray inside a private mount namespace,
    so the tiny tmpfs is visible to the shard and vanishes with the process)."""
    if not _can_mount():
        pytest.skip("no private mount namespace here (`unshare -m` + mount refused): ENOSPC/EROFS need a tmpfs")
    env = subprocess_env()
    env.pop("RAY_ADDRESS", None)
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, os.path.join(here, "colddisk.py"),
                          str(tmp_path)], capture_output=True, text=True, timeout=240, env=env, cwd=REPO_DIR)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    full, ro = out["full"], out["ro"]
    assert full["cold_blocks"] == 2 and full["write_failures"] == 2, full  # 2 fit, 2 did not
    assert full["warm_ok"] and full["wt_get"] and full["shard_errors"] >= 2, full
    assert full["client_errors"] >= 1, "the failed write-through is counted in the client's stats"
    assert full["logged"] >= 1, "the shard logged 'No space left on device'"
    assert full["cold_served"] and all(full["cold_served"]), "blocks that fit on the disk are still served"
    assert "No space left on device" in full["last_error"], "the reason is in the shard's stats"
    assert ro["write_failures"] >= 1 and ro["warm_ok"] and ro["cold_served"] and ro["on_disk"] >= 1, ro
    assert "Read-only file system" in ro["last_error"], "the reason is in the shard's stats (its log is rate-limited)"
    report("cold_disk", **{k: v for k, v in full.items() if k != "last_error"},
           **{f"ro_{k}": v for k, v in ro.items() if k != "last_error"})
