"""The warm shard actor: owns compressed blocks as Ray objects on its node.

A client sends a shard the Arrow bytes of new blocks (``store``); the shard
``ray.put``s each one, so the object is owned by the shard and outlives the
client, and a reader on the same node maps it zero-copy from the object store.
The shard registers (key, size, generation, ObjectRef) with the controller
before it answers, so a put is visible to every client when it returns. Ray
removed ``ray.put(_owner=...)`` in 2.56, hence the shard's own put: one memcpy
per block (~5 ms for 32 MiB here).

The shard executes the controller's orders on its own bytes: ``demote`` (write
to the cold store, then drop), ``drop``, ``delete_cold``. It never decides what
to evict; ``kvtier.placement`` in the controller does. After a controller
restart the controller rebuilds its index from ``inventory()``.

Every remote call a shard makes has a timeout (``rpc_timeout_s``). Not here:
placement policy, decompression, anything about the hot tier.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import numpy as np
import ray

from kvtier.config import TierConfig
from kvtier.errors import BlockFormatError, KvtierError
from kvtier.metrics import TierMetrics
from kvtier.runtime.names import CONTROLLER, open_cold_store
from kvtier.tiers.warm import WarmStore

log = logging.getLogger("kvtier.shard")


class Shard:
    def __init__(self, shard_id: str, config: dict, namespace: str) -> None:
        self.id = shard_id
        self.cfg = TierConfig.from_any(config)
        self.namespace = namespace
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts this actor: its objects are gone
        self.node_id = ray.get_runtime_context().get_node_id()
        self.store_ = WarmStore(self.cfg.shard_bytes)
        self.cold = open_cold_store(self.cfg)
        self._controller = None
        self._lock = threading.Lock()
        self.errors = 0
        self.last_error = ""  # in stats(): the log says it once per 10 s, stats always say the latest
        self._last_log = 0.0
        self.metrics = TierMetrics("shard", shard=shard_id)
        self._usage()

    # ---- health ---------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"id": self.id, "incarnation": self.incarnation, "node_id": self.node_id}

    def stats(self) -> dict[str, Any]:
        out = self.store_.stats()
        out.update(id=self.id, node_id=self.node_id, incarnation=self.incarnation, errors=self.errors,
                   last_error=self.last_error)
        return out

    def inventory(self) -> dict[str, Any]:
        """What this shard holds, for the controller's rebuild: refs travel nested (not resolved)."""
        items = self.store_.items()
        return {"id": self.id, "incarnation": self.incarnation, "node_id": self.node_id,
                "items": [(i.key, i.size, i.gen, [i.handle]) for i in items]}

    # ---- writes ---------------------------------------------------------
    def store(self, keys: list[str], *arrays: np.ndarray, register: bool = True, cold: list[bool] | None = None) -> list[int]:
        """Own one new object per array (the Arrow bytes of a block) and register them.
        Returns the generations. ``cold[i]``: the caller already wrote block i to the cold tier."""
        if len(keys) != len(arrays):
            raise ValueError(f"store got {len(keys)} keys and {len(arrays)} arrays")
        items = []
        for key, arr in zip(keys, arrays):
            ref = ray.put(np.asarray(arr))  # copy out of the caller's argument into an object this shard owns
            items.append(self.store_.add(key, arr.nbytes, ref))
        self._usage()
        if register:
            entries = [(i.key, i.size, i.gen, [i.handle]) for i in items]
            try:
                ray.get(self._ctl().register.remote(self.id, self.incarnation, entries, cold or []),
                        timeout=self.cfg.rpc_timeout_s)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
                # the blocks stay here; a restarting controller picks them up from inventory()
                self._error(f"register with the controller failed ({type(e).__name__}); {len(items)} blocks kept for its rebuild")
        return [i.gen for i in items]

    # ---- orders from the controller -------------------------------------
    def demote(self, keys: list[str], gens: list[int]) -> None:
        """Write these blocks to the cold store, drop them, and report each outcome."""
        done = []
        for key, gen in zip(keys, gens):
            item = self.store_.get(key, gen)
            if item is None:  # re-put or dropped meanwhile: nothing of that generation to demote
                done.append((key, gen, False))
                continue
            ok = False
            if self.cold is not None:
                try:
                    data = ray.get(item.handle, timeout=self.cfg.rpc_timeout_s)
                    self.cold.put(key, data)  # verifies the block first: a bad one is never written down
                    ok = True
                except BlockFormatError as e:
                    self.metrics.corrupt("warm")
                    self._error(f"warm block {key[:16]} is corrupt, dropped instead of demoted: {e}")
                except Exception as e:  # noqa: BLE001 - one failed block must not stop the batch or its report
                    self.metrics.error("cold", "write")
                    self._error(f"demotion of {key[:16]} to the cold tier failed: {type(e).__name__}: {e}")
            self.store_.remove(key, gen)
            if ok:
                self.store_.demoted += 1
            else:
                self.store_.demote_failures += 1
            done.append((key, gen, ok))
        self.metrics.demotion("warm", "cold", sum(ok for _, _, ok in done))
        self._usage()
        try:
            self._ctl().demoted.remote(self.id, done)
        except ray.exceptions.RayActorError:
            self._error("could not report demotions: the controller is gone")

    def drop(self, keys: list[str], gens: list[int]) -> int:
        n = sum(self.store_.remove(k, g) is not None for k, g in zip(keys, gens or [0] * len(keys)))
        self._usage()
        return n

    def delete_cold(self, keys: list[str]) -> int:
        if self.cold is None:
            return 0
        n = 0
        for k in keys:
            try:
                n += bool(self.cold.delete(k))
            except (KvtierError, OSError) as e:
                self._error(f"cold delete of {k[:16]} failed: {type(e).__name__}: {e}")
        return n

    def clear(self) -> int:
        """Drop everything (used when the tier is stopped)."""
        n = 0
        for item in self.store_.items():
            n += self.store_.remove(item.key) is not None
        return n

    # ---- helpers --------------------------------------------------------
    def _usage(self) -> None:
        self.metrics.tier_usage("warm", len(self.store_), self.store_.bytes, self.store_.capacity)

    def _ctl(self):
        if self._controller is None:
            self._controller = ray.get_actor(CONTROLLER, namespace=self.namespace)
        return self._controller

    def _error(self, msg: str) -> None:
        self.errors += 1
        self.last_error = msg[:500]
        now = time.monotonic()
        if now - self._last_log > 10.0:  # at most one line per 10 s: an S3 outage would flood the log
            self._last_log = now
            log.warning("kvtier shard %s: %s (errors so far: %d)", self.id, msg, self.errors)
