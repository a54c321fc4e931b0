"""The controller actor: a thin Ray shell around ``kvtier.placement.Placement``.

One named, detached controller per tier namespace owns the index (key -> size,
warm shard + ObjectRef, cold flag, pins). Clients ask it where keys are (one
call per batch) and shards tell it what they hold; it answers with metadata
only. Every data movement it decides (demote, drop, delete a cold object) is an
order sent to a shard, fire-and-forget; the shard reports back.

It creates the warm shards (named, detached, restarted by Ray, spread over the
cluster's nodes with soft node affinity) and, each time it starts, rebuilds the
index from what the shards hold (``inventory``) and what the cold store lists,
so ``ray.kill(controller, no_restart=False)`` loses no block that was in a warm
shard or the cold tier. A monitor thread pings the shards every second: a shard
that died (or came back as a new, empty incarnation) has its blocks forgotten,
so gets fall back to cold or miss instead of hanging; it also expires pin leases
and, while the cold store could not be listed (S3 down, a folder it may not
read), retries that listing every ``LIST_RETRY_S``: the controller starts,
restarts and rebuilds with any backend down.

Only shards register blocks: each shard gets a secret derived from the tier's
secret (an argument of this actor, so Ray's restarts of the controller keep it)
and every ``register``/``demoted`` call must carry it. A shard whose secret does
not match (left over from a controller that was replaced) is killed and made
again.

Not here: placement policy (``kvtier.placement``), data, decompression.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvtier.config import TierConfig
from kvtier.errors import KvtierError
from kvtier.metrics import TierMetrics
from kvtier.placement import Order, Placement
from kvtier.runtime.location import Location
from kvtier.runtime.names import open_cold_store, shard_name
from kvtier.runtime.shard import Shard, secret_id

log = logging.getLogger("kvtier.controller")

ShardActor = ray.remote(Shard)
STARTUP_TIMEOUT_S = 120.0  # a fresh shard starts a worker process: 1-3 s idle, tens of s on a loaded 2-core CI box
MONITOR_INTERVAL_S = 1.0
LIST_RETRY_S = 5.0  # a cold listing that failed is retried this often (a listing of 1M S3 objects takes ~1 min)


class _ShardInfo:
    def __init__(self, sid: str, handle) -> None:
        self.id, self.handle = sid, handle
        self.node_id: str | None = None
        self.incarnation: str | None = None  # None: its inventory is not in the index yet


class Controller:
    def __init__(self, config: dict, namespace: str, secret: str = "") -> None:
        self.metrics = TierMetrics("controller")  # first: every later step may count an error
        self.errors = 0
        self.cfg = TierConfig.from_any(config)
        self.namespace = namespace
        # without a secret from the creator (kvtier.runtime.api gives one), a fresh one: existing shards then
        # do not match and are made again (their warm blocks are lost, cold ones stay)
        self._secret = secret or secrets.token_hex(16)
        self.cold = open_cold_store(self.cfg)
        self.placement = Placement({shard_name(i): self.cfg.shard_bytes for i in range(self.cfg.num_shards)},
                                   cold_capacity=self.cfg.cold_bytes, cold_enabled=self.cold is not None)
        self.lease_s = 3 * self.cfg.rpc_timeout_s + 5.0  # a reader's fetch is bounded by rpc_timeout_s; 3x is slack
        # tombstones outlive any in-flight promotion or report: those are bounded by rpc_timeout_s, 10x is slack
        self.placement.tombstone_ttl = max(60.0, 10 * self.cfg.rpc_timeout_s)
        self._lock = threading.RLock()
        self._rr = 0
        self._listed_at = 0.0
        self.started = time.time()
        # a new one per start: change numbers of an earlier controller mean nothing to this one's index
        self.incarnation = secrets.token_hex(8)
        self.shards = {shard_name(i): _ShardInfo(shard_name(i), self._ensure_shard(i)) for i in range(self.cfg.num_shards)}
        self._reported = {"warm": 0, "cold": 0}  # drop counts already exported
        self._served = {t: {"hits": 0, "hit_tokens": 0, "misses": 0} for t in ("hot", "warm", "cold")}  # by clients
        self._stop = threading.Event()
        self._rebuild()
        threading.Thread(target=self._monitor, name="kvtier-monitor", daemon=True).start()

    def _shard_secret(self, sid: str) -> str:
        return hmac.new(self._secret.encode(), sid.encode(), hashlib.sha256).hexdigest()

    def _check_secret(self, shard: str, secret: str) -> None:
        if shard not in self.shards:
            raise ValueError(f"unknown shard {shard!r}")
        if not isinstance(secret, str) or not hmac.compare_digest(secret, self._shard_secret(shard)):
            self._error(f"refused a call claiming to be shard {shard}: wrong secret")
            raise PermissionError(f"only shard {shard!r} may register its blocks")

    # ---- shards ---------------------------------------------------------
    def _ensure_shard(self, i: int):
        # hard affinity to node i mod n: soft affinity is a hint only, and on a two-node Cluster here it put both
        # 0-CPU shards on one node; a shard whose node dies fails, and the monitor recreates it on a live node
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        strategy = NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False) if nodes else "DEFAULT"
        return ShardActor.options(
            name=shard_name(i), namespace=self.namespace, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=0, num_cpus=0, max_concurrency=8, scheduling_strategy=strategy,
        ).remote(shard_name(i), self.cfg.to_dict(), self.namespace, self._shard_secret(shard_name(i)))

    def _sync(self, info: _ShardInfo, inv: dict) -> list[Order]:
        """Put a shard's inventory into the index (after a restart of either side)."""
        if inv.get("secret_id") != secret_id(self._shard_secret(info.id)):
            self._replace_shard(info, "its secret is not this tier's (left by a replaced controller)")
            return []
        orders: list[Order] = []
        with self._lock:
            if info.incarnation is not None and info.incarnation != inv["incarnation"]:
                lost = self.placement.remove_shard(info.id)  # the shard restarted: its objects died with it
                self.placement.add_shard(info.id, self.cfg.shard_bytes)
                log.warning("kvtier: shard %s restarted; forgot %d blocks it held", info.id, len(lost))
            info.incarnation, info.node_id = inv["incarnation"], inv["node_id"]
            for key, size, gen, ref, version in inv.get("items", []):
                if version:  # a copy of a known version: taken only if no newer write or delete is known
                    orders += self.placement.put_warm(key, size, info.id, gen, ref, version=version, adopt=True)
                else:  # its register never completed, so its put raised: taking it now could undo a later write
                    orders.append(Order("drop", info.id, (key,), (gen,)))
        return orders

    def _replace_shard(self, info: _ShardInfo, why: str) -> None:
        self._error(f"shard {info.id}: {why}; making it again")
        try:
            ray.kill(info.handle, no_restart=True)
        except ray.exceptions.RayActorError:
            pass
        with self._lock:
            self.placement.remove_shard(info.id)
            self.placement.add_shard(info.id, self.cfg.shard_bytes)
            info.incarnation = None
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # the name is free only once the kill went through
            try:
                ray.get_actor(info.id, namespace=self.namespace)
                time.sleep(0.1)
            except ValueError:
                break
        info.handle = self._ensure_shard(int(info.id.rsplit("-", 1)[1]))

    def _rebuild(self) -> None:
        pending = {info.id: info.handle.inventory.remote() for info in self.shards.values()}
        orders = []
        for sid, ref in pending.items():
            try:
                orders += self._sync(self.shards[sid], ray.get(ref, timeout=STARTUP_TIMEOUT_S))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
                self._error(f"shard {sid} did not report its inventory ({type(e).__name__}); the monitor retries")
        self._dispatch(orders)
        self._list_cold()

    def _list_cold(self) -> None:
        """Put the cold store's listing into the index; on failure retry from the monitor."""
        if self.cold is None:
            return
        self._listed_at = time.monotonic()
        with self._lock:
            self.placement.listing_pending = True  # deleted keys keep their tombstones until the listing is in
        try:
            listed = list(self.cold.list_versions())
        except (KvtierError, OSError) as e:
            self._error(f"listing the cold store failed ({type(e).__name__}: {e}); retrying every {LIST_RETRY_S:.0f} s")
            return
        orders: list[Order] = []
        with self._lock:
            for key, size, version in sorted(listed, key=lambda x: x[2]):  # oldest first: newer ones replace them
                orders += self.placement.put_cold(key, size, version, adopt=True)
            self.placement.listing_pending = False
        self._dispatch(orders)

    def _monitor(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_S):
            try:
                self._check_shards()
                if (self.placement.listing_pending and self.cold is not None
                        and time.monotonic() - self._listed_at >= LIST_RETRY_S):
                    self._list_cold()
                with self._lock:
                    orders = self.placement.expire()
                    st = self.placement.stats()
                self._dispatch(orders)
                self._export(st)
            except Exception as e:  # the monitor must survive anything one round throws
                self._error(f"monitor round failed: {type(e).__name__}: {e}")

    def _check_shards(self) -> None:
        pings = {sid: info.handle.ping.remote() for sid, info in self.shards.items()}
        ray.wait(list(pings.values()), num_returns=len(pings), timeout=self.cfg.rpc_timeout_s)
        for sid, ref in pings.items():
            info = self.shards[sid]
            try:
                pong = ray.get(ref, timeout=0)
            except ray.exceptions.GetTimeoutError:
                continue  # slow, not dead: keep its blocks; readers time out on their own
            except ray.exceptions.RayActorError:
                with self._lock:
                    lost = self.placement.remove_shard(sid)
                    self.placement.add_shard(sid, self.cfg.shard_bytes)
                    info.incarnation = None
                self._error(f"shard {sid} is dead; forgot {len(lost)} blocks; recreating it")
                info.handle = self._ensure_shard(int(sid.rsplit("-", 1)[1]))
                continue
            if pong.get("secret_id") != secret_id(self._shard_secret(sid)):
                self._replace_shard(info, "its secret is not this tier's")
                continue
            if pong["incarnation"] != info.incarnation:
                try:
                    inv = ray.get(info.handle.inventory.remote(), timeout=self.cfg.rpc_timeout_s)
                except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                    continue
                self._dispatch(self._sync(info, inv))

    def _export(self, st: dict) -> None:
        """Cold occupancy (reported here only: shards report warm, clients hot) and drops since last round."""
        c = st["cold"]
        self.metrics.tier_usage("cold", c["blocks"], c["bytes"], c["capacity_bytes"])
        for tier in ("warm", "cold"):
            n = st[tier]["dropped"] - self._reported[tier]
            if n > 0:
                self.metrics.eviction(tier, n)
                self._reported[tier] += n

    def _dispatch(self, orders: list[Order]) -> None:
        for o in orders:
            if o.kind == "delete_cold":
                live = [i for i in self.shards.values() if i.incarnation is not None] or list(self.shards.values())
                self._rr = (self._rr + 1) % len(live)
                live[self._rr].handle.delete_cold.remote(list(o.keys), list(o.gens))
            else:
                getattr(self.shards[o.shard].handle, o.kind).remote(list(o.keys), list(o.gens))

    def _error(self, msg: str) -> None:
        self.errors += 1
        self.metrics.error("warm", "controller")
        log.warning("kvtier controller: %s", msg)

    # ---- called by shards -----------------------------------------------
    def register(self, shard: str, incarnation: str, secret: str, entries: list) -> list[int]:
        """A shard holds these copies: ``(key, size, gen, [ref], version)``, version 0 for a put, else a
        promotion of that version. Returns each copy's version; 0 = refused (the shard drops it)."""
        self._check_secret(shard, secret)
        orders: list[Order] = []
        out = []
        with self._lock:
            info = self.shards[shard]
            if info.incarnation is not None and incarnation != info.incarnation:
                # the shard restarted (empty) before the monitor noticed: its old blocks died with it
                lost = self.placement.remove_shard(shard)
                self.placement.add_shard(shard, self.cfg.shard_bytes)
                info.incarnation = incarnation
                self._error(f"shard {shard} restarted; forgot {len(lost)} blocks it held")
            for key, size, gen, ref, version in entries:
                if version:
                    orders += self.placement.put_warm(key, size, shard, gen, ref, version=version)
                    e = self.placement.entries.get(key)
                    out.append(version if e is not None and e.shard == shard and e.gen == gen else 0)
                else:
                    v, more = self.placement.write(key, size, shard, gen, ref)
                    orders += more
                    out.append(v)
        self._dispatch(orders)  # a refused copy's drop order is a no-op: the shard has dropped it on the 0
        return out

    def demoted(self, shard: str, secret: str, done: list) -> None:
        self._check_secret(shard, secret)
        orders: list[Order] = []
        with self._lock:
            for key, gen, ok, version in done:
                orders += self.placement.demoted(key, shard, gen, ok, version)
        self._dispatch(orders)

    # ---- called by clients ----------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "namespace": self.namespace, "lease_s": self.lease_s,
                "shards": [{"id": i.id, "node_id": i.node_id, "handle": i.handle} for i in self.shards.values()]}

    def locate(self, keys: list[str], pin: bool = True, seq: bool = False):
        """Per key: None, or where it is (``Location``: size, shard, warm ObjectRef, in cold, version).
        One call per batch. Keys served from cold are pinned under the returned lease. Warm ones need no
        pin: the ObjectRef the reader holds keeps the bytes alive in the object store even if the shard
        drops them meanwhile (Ray reference counting), so the common path needs no unpin call.
        Returns (locations, lease); with ``seq``, (locations, lease, (incarnation, change number)) of the
        same moment, for a client's location cache (``changes``)."""
        with self._lock:
            entries, lease = self.placement.locate(keys, self.lease_s if pin else None, pin_warm=False)
            at = (self.incarnation, self.placement.change_seq)
        locs = [None if e is None else Location(k, e.size, e.shard, e.ref[0] if e.ref else None, e.cold, e.version)
                for k, e in zip(keys, entries)]
        return (locs, lease, at) if seq else (locs, lease)

    def changes(self, since: int, incarnation: str | None) -> tuple[str, int, list[str] | None]:
        """(incarnation, change number now, keys whose warm copy changed after ``since``): None instead of
        the keys when ``since`` is from another incarnation or older than the log reaches (distrust all)."""
        with self._lock:
            keys = self.placement.changes(since) if incarnation == self.incarnation else None
            return self.incarnation, self.placement.change_seq, keys

    def served(self, counts: dict) -> None:
        """A client's hits since its last report, per tier (blocks, tokens, misses): the hits ``stats()``
        shows are the blocks clients were served, the same events their Prometheus counters count."""
        with self._lock:
            for tier, d in counts.items():
                if tier in self._served and isinstance(d, dict):
                    for k in self._served[tier]:
                        n = d.get(k, 0)
                        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                            self._served[tier][k] += n

    def lookup(self, keys: list[str], have: list[bool]) -> int:
        with self._lock:
            return self.placement.lookup(keys, have)

    def present(self, keys: list[str]) -> list[bool]:
        with self._lock:
            return self.placement.present(keys)

    def unpin(self, lease: int) -> None:
        with self._lock:
            orders = self.placement.unpin(lease)
        self._dispatch(orders)

    def put_cold(self, keys: list[str], sizes: list[int], versions: list[int]) -> None:
        """A writer wrote these versions to the cold tier (write-through): taken if still current."""
        if self.cold is None:
            return
        orders: list[Order] = []
        with self._lock:
            for k, n, v in zip(keys, sizes, versions):
                orders += self.placement.put_cold(k, n, int(v), adopt=False)
        self._dispatch(orders)

    def forget(self, keys: list[str], cold_keys: list[str], cold_versions: list[int] | None = None) -> None:
        """A reader found these warm copies lost or corrupt, and these cold objects missing or corrupt."""
        with self._lock:
            orders = self.placement.forget(keys)
            self.placement.forget_cold(cold_keys, cold_versions or ())
        self._dispatch(orders)

    def delete(self, keys: list[str]) -> int:
        with self._lock:
            n, orders = self.placement.delete(keys)
        self._dispatch(orders)
        return n

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = self.placement.stats()
            for tier in ("warm", "cold"):  # the index's answers are "located"; hits are blocks clients were served
                out[tier]["located"], out[tier]["not_located"] = out[tier].pop("hits"), out[tier].pop("misses")
                out[tier].update(self._served[tier])
            out["served_hot"] = dict(self._served["hot"])
        refs = {sid: info.handle.stats.remote() for sid, info in self.shards.items()}
        shards = []
        for sid, ref in refs.items():
            index = out["shards"].get(sid, {})
            try:
                s = ray.get(ref, timeout=self.cfg.rpc_timeout_s)
                s["alive"] = True
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
                s = {"id": sid, "alive": False, "error": type(e).__name__, "node_id": self.shards[sid].node_id}
            s["index_blocks"], s["index_bytes"] = index.get("blocks", 0), index.get("bytes", 0)
            s.setdefault("capacity_bytes", self.cfg.shard_bytes)
            shards.append(s)
        out["shards"] = shards
        if self.cold is not None:
            out["cold"]["uri"] = self.cfg.cold_uri
        out["controller"] = {"errors": self.errors, "uptime_s": time.time() - self.started, "namespace": self.namespace,
                             "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
        return out

    def stop(self) -> int:
        """Kill this tier's shards (the caller then kills the controller). Cold data stays."""
        self._stop.set()
        for info in self.shards.values():
            try:
                ray.kill(info.handle, no_restart=True)
            except ray.exceptions.RayActorError:
                pass
        return len(self.shards)
