"""The warm shard actor: owns compressed blocks as Ray objects on its node.

A client sends a shard the Arrow bytes of new blocks (``store``); the shard
``ray.put``s each one, so the object is owned by the shard and outlives the
client, and a reader on the same node maps it zero-copy from the object store.
The shard registers (key, size, generation, ObjectRef) with the controller
before it answers, so a put is visible to every client when it returns; the
controller answers with the write's version (0: refused, a stale promotion), and
a put whose registration fails raises instead of answering (a put either stores
or raises). Ray removed ``ray.put(_owner=...)`` in 2.56, hence the shard's own
put: one memcpy per block (~5 ms for 32 MiB here).

Only a shard registers blocks: the controller hands each shard a secret at
creation and checks it on ``register``/``demoted``, so no other caller can make
the index name an object (a forged ObjectRef would run code in a reader that
unpickles it). Every array a shard takes must be a 1-D uint8 buffer that parses
as a block of its key (structure and header; the payload checksum is every
reader's to verify); anything else is refused with an error naming it.

Budgets hold under load: a promotion is taken only while the shard is within its
budget (not while demotions still drain it) and holds no copy of the key (one it holds may be newer), and a put waits
(at most ``ADMIT_WAIT_S``) for the demotions the controller ordered to bring the
shard back within budget before it answers, so writers slow down instead of
growing the shard past its budget.

The shard executes the controller's orders on its own bytes: ``demote`` (write
to the cold store, then drop), ``drop``, ``delete_cold``. It never decides what
to evict; ``kvtier.placement`` in the controller does. After a controller
restart the controller rebuilds its index from ``inventory()``.

Every remote call a shard makes has a timeout (``rpc_timeout_s``). Not here:
placement policy, decompression, anything about the hot tier.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from kvtier.block import Block
from kvtier.config import TierConfig
from kvtier.errors import BlockFormatError, KvtierError
from kvtier.metrics import TierMetrics
from kvtier.runtime.names import CONTROLLER, open_cold_store
from kvtier.tiers.warm import WarmStore

log = logging.getLogger("kvtier.shard")
ADMIT_WAIT_S = 2.0  # a put waits this long at most for demotions to make room (one 8 MiB demotion: ~10 ms to disk)
MAX_WAITERS = 4     # of the shard's 8 threads; the others stay free to run the demotions being waited for


def secret_id(secret: str) -> str:
    """A fingerprint of a shard secret, safe to report (the controller compares it, nobody can invert it)."""
    return hashlib.sha256(b"kvtier/shard-secret\0" + secret.encode()).hexdigest()[:16]


class Shard:
    def __init__(self, shard_id: str, config: dict, namespace: str, secret: str = "") -> None:
        self.id = shard_id
        self._secret = secret
        self.cfg = TierConfig.from_any(config)
        self.namespace = namespace
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts this actor: its objects are gone
        self.node_id = ray.get_runtime_context().get_node_id()
        self.store_ = WarmStore(self.cfg.shard_bytes)
        self.cold = open_cold_store(self.cfg)
        self._controller = None
        self._lock = threading.Lock()
        self._reg_lock = threading.Lock()  # add + register, one batch at a time: one shard's registers arrive in order
        self._waiters = 0
        self.refused = 0  # promotions refused (over budget, or a copy already held)
        self.errors = 0
        self.last_error = ""  # in stats(): the log says it once per 10 s, stats always say the latest
        self._last_log = 0.0
        self.metrics = TierMetrics("shard", shard=shard_id)
        self._usage()

    # ---- health ---------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"id": self.id, "incarnation": self.incarnation, "node_id": self.node_id,
                "secret_id": secret_id(self._secret)}

    def stats(self) -> dict[str, Any]:
        out = self.store_.stats()
        out.update(id=self.id, node_id=self.node_id, incarnation=self.incarnation, errors=self.errors,
                   last_error=self.last_error, promotions_refused=self.refused)
        return out

    def inventory(self) -> dict[str, Any]:
        """What this shard holds, for the controller's rebuild: refs travel nested (not resolved)."""
        items = self.store_.items()
        return {"id": self.id, "incarnation": self.incarnation, "node_id": self.node_id,
                "secret_id": secret_id(self._secret),
                "items": [(i.key, i.size, i.gen, [i.handle], i.version) for i in items]}

    # ---- writes ---------------------------------------------------------
    def store(self, keys: list[str], *arrays: np.ndarray, register: bool = True,
              versions: list[int] | None = None) -> list[int]:
        """Own one new object per array (the Arrow bytes of a block of that key) and register them.
        ``versions[i]``: block i is a promotion of that version from the cold tier (0 or absent: a put).
        Returns each block's version (0: not taken, a promotion refused or superseded)."""
        if len(keys) != len(arrays):
            raise ValueError(f"store got {len(keys)} keys and {len(arrays)} arrays")
        versions = list(versions or [0] * len(keys))
        for i, (key, arr) in enumerate(zip(keys, arrays)):
            if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 1):
                raise ValueError(f"store: value #{i} for key {str(key)[:40]!r} is not a 1-D uint8 buffer "
                                 f"({type(arr).__name__} {getattr(arr, 'dtype', '')}); a shard holds serialized blocks only")
            try:
                # structure, header and key; not the payload checksum: every reader verifies it before using a
                # byte (tiers/pipeline.py), so here it was a fourth pass per put (~0.5 ms per 8 MiB)
                Block.from_arrow(pa.py_buffer(arr), expect_key=key, verify=False)
            except BlockFormatError as e:
                raise ValueError(f"store: value #{i} is not a block of key {str(key)[:40]!r}: {e}") from None
        promotion = any(versions)
        if not promotion:
            self._admit()
        out = [0] * len(keys)
        with self._reg_lock:
            items, idx = [], []
            for i, (key, arr) in enumerate(zip(keys, arrays)):
                if versions[i] and (key in self.store_ or self.store_.bytes > self.store_.capacity > 0):
                    # a copy here may be newer; over budget (demotions still draining) a promotion only adds
                    # pressure: one within budget may go one batch over, which the controller's order undoes
                    self.refused += 1
                    continue
                ref = ray.put(np.asarray(arr))  # copy out of the caller's argument into an object this shard owns
                items.append(self.store_.add(key, arr.nbytes, ref, versions[i]))
                idx.append(i)
            self._usage()
            if register and items:
                got = self._register(items, [versions[i] for i in idx], raise_=not promotion)
                for i, item, v in zip(idx, items, got):
                    if v:
                        self.store_.set_version(item.key, item.gen, v)
                        out[i] = v
                    else:
                        self.store_.remove(item.key, item.gen)  # refused: a newer write or a delete won
                self._usage()
        if not promotion:
            self._backpressure()
        return out

    def _register(self, items: list, versions: list[int], raise_: bool) -> list[int]:
        """The versions the controller gives these copies; looks a restarted controller up again by name.
        Raises KvtierError (``raise_``) when it cannot register them: the put must not answer OK."""
        entries = [(i.key, i.size, i.gen, [i.handle], v) for i, v in zip(items, versions)]
        err: Exception | None = None
        for _ in range(2):
            try:
                return ray.get(self._ctl().register.remote(self.id, self.incarnation, self._secret, entries),
                               timeout=self.cfg.rpc_timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                err = e  # the controller may still take them: keep the blocks (a rebuild finds them too)
                break
            except (ray.exceptions.RayActorError, ValueError) as e:  # dead handle, or no controller by that name
                err = e
                self._controller = None
        self._error(f"register of {len(items)} blocks with the controller failed ({type(err).__name__})")
        if not isinstance(err, ray.exceptions.GetTimeoutError):
            for i in items:
                self.store_.remove(i.key, i.gen)
        if raise_:
            raise KvtierError(f"shard {self.id}: the controller did not register {len(items)} blocks "
                              f"({type(err).__name__}); the put did not store them") from None
        return [0] * len(items)

    def _admit(self) -> None:
        """Wait (bounded) while earlier demotions are still bringing this shard back within budget. Not for
        room for this put: the controller orders the demotions that make it only once the put registers."""
        cap = self.store_.capacity
        if cap and self.store_.bytes > cap:
            self._wait_for(lambda: self.store_.bytes <= cap)

    def _backpressure(self) -> None:
        """Answer a put only once the demotions it caused have made room (bounded)."""
        cap = self.store_.capacity
        if cap and self.store_.bytes > cap:
            self._wait_for(lambda: self.store_.bytes <= cap)

    def _wait_for(self, ok) -> None:
        with self._lock:
            if self._waiters >= MAX_WAITERS:
                return
            self._waiters += 1
        try:
            deadline = time.monotonic() + min(ADMIT_WAIT_S, self.cfg.rpc_timeout_s / 4)
            while not ok() and time.monotonic() < deadline:
                time.sleep(0.002)
        finally:
            with self._lock:
                self._waiters -= 1

    # ---- orders from the controller -------------------------------------
    def demote(self, keys: list[str], gens: list[int]) -> None:
        """Write these blocks to the cold store (as their version), drop them, and report each outcome."""
        done = []
        with self._reg_lock:  # an order for a block of a register still under way waits for its version
            held = [self.store_.get(k, g) for k, g in zip(keys, gens)]
        for key, gen, item in zip(keys, gens, held):
            if item is None or not item.version:  # re-put or dropped meanwhile: nothing of that generation
                done.append((key, gen, False, None))
                continue
            ok = False
            if self.cold is not None:
                try:
                    data = ray.get(item.handle, timeout=self.cfg.rpc_timeout_s)
                    self.cold.put(key, data, item.version)  # verifies the block first: a bad one is never written
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
            done.append((key, gen, ok, item.version))
        self.metrics.demotion("warm", "cold", sum(d[2] for d in done))
        self._usage()
        try:
            self._ctl().demoted.remote(self.id, self._secret, done)
        except (ray.exceptions.RayActorError, ValueError):
            self._controller = None  # looked up again by name next time
            self._error("could not report demotions: the controller is gone")

    def drop(self, keys: list[str], gens: list[int]) -> int:
        n = sum(self.store_.remove(k, g) is not None for k, g in zip(keys, gens or [0] * len(keys)))
        self._usage()
        return n

    def delete_cold(self, keys: list[str], versions: list[int] | None = None) -> int:
        """Delete these cold objects (``versions[i]``: that version only; -1 or absent: every version)."""
        if self.cold is None:
            return 0
        n = 0
        for k, v in zip(keys, versions or [-1] * len(keys)):
            try:
                n += bool(self.cold.delete(k, v))
            except (KvtierError, OSError) as e:
                self._error(f"cold delete of {k[:16]} failed: {type(e).__name__}: {e}")
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
