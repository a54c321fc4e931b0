"""The client: what one process uses to put and get KV chunks through the tiers.

``Client`` holds one process's state (its config, hot tier, cold store handle,
load pipeline, store queue, counters) and joins its two paths: ``PutPath``
(``put_path``: one compression and serialization per chunk, stored in the
background) and ``GetPath`` (``get_path``: hot tier, cached locations or one locate, one ray.get,
one pipelined load). Here: the metadata calls (``lookup``, ``contains``,
``delete``, ``stats``), tenant binding of keys, and the controller connection.

Every remote call has a timeout (``rpc_timeout_s``). A controller that died is
looked up again by name (and made again if none runs).

Not here: placement decisions (the controller), storage of blocks (tiers/).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Sequence

import ray

from kvtier.config import TierConfig
from kvtier.errors import KvtierError
from kvtier.keys import check_keys, tenant_key
from kvtier.metrics import TierMetrics
from kvtier.runtime.get_path import TIERS, GetPath
from kvtier.runtime.location_cache import LocationCache
from kvtier.runtime.names import RPC_ERRORS as _RPC_ERRORS
from kvtier.runtime.names import open_cold_store
from kvtier.runtime.put_path import PutPath
from kvtier.runtime.store_queue import StoreQueue
from kvtier.tiers.hot import HotTier
from kvtier.tiers.pipeline import Loader

log = logging.getLogger("kvtier.client")
MAX_BATCH_KEYS = 4096  # 1M tokens in 256-token chunks; one locate answer stays well under Ray's inline limits
SYNC_S = 1.0  # the location cache's sync with the controller while it holds entries
STORE_QUEUE_BYTES = 1 << 30  # blocks on their way to the shards: 2 GiB of Llama-8B KV (16K tokens) at kivi4 ~4x


def _keys(keys: Sequence[str]) -> list[str]:
    if len(keys) > MAX_BATCH_KEYS:
        raise ValueError(f"a batch of {len(keys)} keys exceeds the maximum batch size MAX_BATCH_KEYS={MAX_BATCH_KEYS}")
    return check_keys(keys)


class Client(PutPath, GetPath):
    def __init__(self, controller, namespace: str, info: dict, hot_bytes: int | None = None,
                 codec: str | None = None, tenant: str | None = None, model_id: str | None = None) -> None:
        self.controller = controller
        self.namespace = namespace
        self.cfg = TierConfig.from_any(info["config"])
        if hot_bytes is not None or codec is not None or tenant is not None or model_id is not None:
            self.cfg = self.cfg.replace(hot_bytes=self.cfg.hot_bytes if hot_bytes is None else hot_bytes,
                                        codec=codec or self.cfg.codec, tenant=self.cfg.tenant if tenant is None else tenant,
                                        model_id=self.cfg.model_id if model_id is None else model_id)
        self.model = self.cfg.model_id  # written into every block put, expected in every block read
        self.timeout = self.cfg.rpc_timeout_s
        self.node_id = ray.get_runtime_context().get_node_id()
        self.hot = HotTier(self.cfg.hot_bytes)
        self.cold = open_cold_store(self.cfg)
        self._shards: list[dict] = info["shards"]
        self.loader = Loader()
        self.locations = LocationCache()
        self.store = StoreQueue(self._store_batch, STORE_QUEUE_BYTES, timeout_s=max(60.0, 4 * self.timeout),
                                max_batch_bytes=max(1, self.cfg.shard_bytes // 8))
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtier-prefetch")
        self._prefetching: set[Future] = set()
        self._lock = threading.Lock()
        self._reconnected = 0.0
        self._failed: list[str] = []  # keys whose store failed since the last flush (flush raises naming them)
        self.counters = {"puts": 0, "gets": 0, "errors": 0, "corrupt": 0, "lost": 0, "promotions": 0,
                         "foreign_model": 0, "put_bytes": 0, "raw_put_bytes": 0}
        # per tier: blocks served, their tokens, misses; ``_unreported`` is what the controller has not been told
        self.served = {t: {"hits": 0, "hit_tokens": 0, "misses": 0} for t in TIERS}
        self._unreported = {t: {"hits": 0, "hit_tokens": 0, "misses": 0} for t in TIERS}
        self._reported_at = 0.0
        self._report_ref = None  # ObjectRef of the last hit report sent (stats() waits for it)
        # one report taken and submitted at a time (not the get path's _lock: a submit never holds up a get); without
        # it stats() could find the counts just taken by the sync thread, not yet sent, and wait on an older report
        self._report_lock = threading.Lock()
        self.last_get: dict[str, float] = {}  # phases of the last get that left the hot tier (seconds)
        self._last_log = 0.0
        self.metrics = TierMetrics("client")
        self._cold_transport = "s3" if self.cfg.cold_uri.startswith("s3://") else "file"
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="kvtier-client-sync", daemon=True)
        self._syncer.start()

    def _sync_loop(self) -> None:
        """Off every request path: report new hit counts when a get sets ``_wake`` (a report per get cost
        the caller a remote call's submit, ~0.4 ms of a 6 ms warm get here), and about once a second, while
        the location cache is not empty, apply the controller's changes to it (so an ObjectRef it holds
        keeps a block its shard dropped alive for about a second at most)."""
        while not self._closing.is_set():
            woken = self._wake.wait(SYNC_S)
            self._wake.clear()
            if self._closing.is_set() or not ray.is_initialized():
                return  # never call into a Ray that is shut down or shutting down
            self._report(force=woken)  # unforced: at most once a second (hot hits alone)
            if self.locations.sync_due(SYNC_S):
                _, since, inc = self.locations.take(())
                try:  # never ``_call``: a background thread must not make a stopped tier's controller again
                    self.locations.apply(*ray.get(self.controller.changes.remote(since, inc), timeout=self.timeout))
                except _RPC_ERRORS:
                    self.locations.apply(None, 0, None)  # unknown: nothing cached is trusted

    def _keys(self, keys: Sequence[str]) -> list[str]:
        """Validated keys, bound to this client's tenant: every call below sees only tenant-bound keys,
        so no tier can hand one tenant a block another tenant put under the same key."""
        return [tenant_key(k, self.cfg.tenant) for k in _keys(keys)]

    def _mine(self, key: str) -> bool:
        return key in self.hot or self.store.pending(key) is not None

    def lookup(self, keys: Sequence[str]) -> int:
        keys = self._keys(keys)
        have = [self._mine(k) for k in keys]
        lead = next((i for i, h in enumerate(have) if not h), len(keys))
        if lead == len(keys):
            return lead
        try:
            return self._call("lookup", keys, have, timeout=self.timeout)
        except _RPC_ERRORS as e:
            self._error(f"controller did not answer lookup ({type(e).__name__}); counting this process's hot tier only")
            return lead

    def contains(self, key: str) -> bool:
        (key,) = self._keys(check_keys([key]))
        if self._mine(key):
            return True
        try:
            return bool(self._call("present", [key], timeout=self.timeout)[0])
        except _RPC_ERRORS as e:
            self._error(f"controller did not answer contains ({type(e).__name__})")
            return False

    def delete(self, keys: Sequence[str]) -> int:
        keys = self._keys(keys)
        self.store.flush()  # a store still in flight must not land after the delete and bring a key back
        n_hot = sum(self.hot.delete(k) for k in keys)
        self.locations.drop(keys)
        try:
            return max(n_hot, int(self._call("delete", keys, timeout=self.timeout)))
        except _RPC_ERRORS as e:
            raise KvtierError(f"delete of {len(keys)} keys: the controller did not answer within {self.timeout}s "
                              f"({type(e).__name__}); lower tiers may still hold them") from None

    def stats(self) -> dict[str, Any]:
        # this process's earlier puts are in the figures; bounded by the rpc timeout, not the queue's (60 s): with
        # the controller away a stats() call waited the whole 60 s (tests/reliability/test_faults.py's restart)
        self.store.flush(self.timeout)
        self._report(force=True, wait_s=self.timeout)
        try:
            out = self._call("stats", timeout=3 * self.timeout)
        except _RPC_ERRORS as e:
            self._error(f"controller did not answer stats ({type(e).__name__})")
            out = {"warm": {}, "cold": {}, "shards": [], "controller": {"error": type(e).__name__}}
        hot_all = out.pop("served_hot", None)
        out["hot"] = self.hot.stats()
        out["hot"].update(self.served["hot"])  # this process's hot tier: its own serves
        if hot_all is not None:
            out["hot"]["all_clients"] = hot_all  # every client's hot-tier serves, as reported to the controller
        if self.cold is not None:
            cs = self.cold.stats()
            out["cold"].update({f"client_{k}": cs[k] for k in ("corrupt", "errors") if k in cs})
        out["client"] = dict(self.counters, node_id=self.node_id, namespace=self.namespace, tenant=self.cfg.tenant,
                             served=self.served, store_queue=dict(self.store.counters,
                                                                  queued_bytes=self.store.queued_bytes()))
        return {k: out[k] for k in ("hot", "warm", "cold", "shards", "controller", "client", "keys", "leases") if k in out}

    def _call(self, method: str, *args, timeout: float):
        """``controller.<method>(*args)`` within ``timeout``; a dead handle is replaced by the controller of
        that name (made again if none runs: shards and the cold store rebuild its index), called once more."""
        for attempt in range(2):
            try:
                return ray.get(getattr(self.controller, method).remote(*args), timeout=timeout)
            except ray.exceptions.RayActorError:
                if attempt:
                    raise
                self._reconnect()

    def _reconnect(self) -> None:
        from kvtier.runtime.api import controller_handle  # late: api imports this module

        with self._lock:
            if self.store.closed:  # closed: a late call of its store thread must not make a stopped tier again
                return
            if time.monotonic() - self._reconnected < 1.0:
                return  # another thread just did
            self._reconnected = time.monotonic()
            self.controller = controller_handle(self.cfg, self.namespace)

    def _refresh_shards(self) -> None:
        for _ in range(2):
            try:
                self._shards = self._call("info", timeout=self.timeout)["shards"]
                return
            except ray.exceptions.RayActorError:
                self._reconnect()  # the controller died since: the one of that name now
            except ray.exceptions.RayError:  # slow or unavailable (ActorUnavailableError while it restarts):
                return  # keep the shard list we have; raising here killed the store thread (test_faults)

    def _hot_usage(self) -> None:
        h = self.hot.stats()
        self.metrics.tier_usage("hot", h["blocks"], h["bytes"], h["capacity_bytes"])

    def _corrupt(self, key: str, where: str, e: Exception) -> None:
        self.counters["corrupt"] += 1
        self.metrics.corrupt(where if where in TIERS else "hot")
        self._error(f"corrupt {where} block {key[:16]} treated as a miss: {e}")

    def _error(self, msg: str) -> None:
        with self._lock:
            self.counters["errors"] += 1
            now = time.monotonic()
            if now - self._last_log > 10.0:  # one line per 10 s: a dead backend must not flood the log
                self._last_log = now
                log.warning("kvtier: %s (errors so far: %d)", msg, self.counters["errors"])

    def close(self) -> None:
        """Stop this client's threads (each joined, bounded by the RPC timeout) and send what it holds.
        Call it before ``ray.shutdown()``: a thread of this client still inside a Ray call while Ray shuts
        down is the suspected cause of a test process that ended with exit 1 and nothing printed (CI, twice)."""
        self._closing.set()
        self._wake.set()
        self._syncer.join(self.timeout + 1.0)
        if not self.store.close(timeout_s=self.timeout):
            log.warning("kvtier: the store thread is still in a call %.0f s after close; Ray must not be shut "
                        "down under it", self.timeout)
        self._report(force=True)
        self.locations.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)  # no new prefetch after this
        with self._lock:
            running = list(self._prefetching)
        wait(running, timeout=self.timeout + 1.0)
        self.loader.close()
        self.hot.clear()
