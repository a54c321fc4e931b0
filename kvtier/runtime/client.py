"""The client: what one process uses to put and get KV chunks through the tiers.

put: compress where the tensor lives (the configured codec, the configured
``model_id`` in every block), keep the block in this process's hot tier, send its
Arrow bytes to a warm shard (one call per shard per batch; a shard on this node
when there is one), and return when the shard has registered it with the
controller, which gives the write its version. A put either stores or raises: a
shard that fails is looked up again (by the controller's shard list) and tried
once more, then ``KvtierError``. ``write_through`` then also writes each block to
the cold store as its version.

get: this process's hot tier, then one ``locate`` call to the controller for
the whole batch, then the warm copies (``ray.get`` of the shards' ObjectRefs:
zero-copy from the object store on the same node), then the cold store (the
object of the version the index names; read, verify, promote that version to a
warm shard in the background, at most one promotion batch in flight). Every
block read from warm or cold is parsed with ``Block.from_arrow(..., expect_key=key,
expect_model=model_id)``: a corrupt, foreign, other model's or missing block, or
a warm value that is not a 1-D uint8 buffer, is a miss (``None``, counted), never
wrong data.

Every remote call has a timeout (``rpc_timeout_s``). A controller that does not
answer makes gets fall back to the cold store directly (its newest version); a
controller that died is looked up again by name (and made again if none runs);
a shard that died makes its blocks misses (or cold hits) and is reported to the
controller.

Not here: placement decisions (the controller), storage of blocks (tiers/).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from kvtier.block import Block
from kvtier.codecs import compress
from kvtier.config import TierConfig
from kvtier.errors import BlockFormatError, KvtierError
from kvtier.keys import check_keys, tenant_key
from kvtier.metrics import TierMetrics
from kvtier.runtime.names import open_cold_store
from kvtier.tiers.hot import HotTier, decode_block

log = logging.getLogger("kvtier.client")
_RPC_ERRORS = (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError)
MAX_BATCH_KEYS = 4096  # 1M tokens in 256-token chunks; one locate answer stays well under Ray's inline limits


def _keys(keys: Sequence[str]) -> list[str]:
    if len(keys) > MAX_BATCH_KEYS:
        raise ValueError(f"a batch of {len(keys)} keys exceeds the maximum batch size MAX_BATCH_KEYS={MAX_BATCH_KEYS}")
    return check_keys(keys)


class Client:
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
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtier-prefetch")
        self._lock = threading.Lock()
        self._promoting: list = []  # the promotion batch in flight: at most one (admission, item 11 of issue 9)
        self._reconnected = 0.0
        self.counters = {"puts": 0, "gets": 0, "errors": 0, "corrupt": 0, "lost": 0, "promotions": 0,
                         "put_bytes": 0, "raw_put_bytes": 0}
        self._last_log = 0.0
        self.metrics = TierMetrics("client")
        self._cold_transport = "s3" if self.cfg.cold_uri.startswith("s3://") else "file"

    def _keys(self, keys: Sequence[str]) -> list[str]:
        """Validated keys, bound to this client's tenant: every call below sees only tenant-bound keys,
        so no tier can hand one tenant a block another tenant put under the same key."""
        return [tenant_key(k, self.cfg.tenant) for k in _keys(keys)]

    # ---- put ------------------------------------------------------------
    def put(self, keys: Sequence[str], kvs: Sequence[torch.Tensor], codec: str | None = None) -> None:
        keys = self._keys(keys)
        if len(keys) != len(kvs):
            raise ValueError(f"put got {len(keys)} keys and {len(kvs)} tensors; they must pair up")
        codec = codec or self.cfg.codec
        t0 = time.perf_counter()
        blocks = [compress(kv, codec, key=k, model_id=self.model) for k, kv in zip(keys, kvs)]
        wires = [b.to_arrow() for b in blocks]
        for key, wire in zip(keys, wires if self.hot.capacity else ()):
            # re-parse from the wire copy: a hot block must not alias the caller's tensor (``none`` codec)
            self.hot.put(Block.from_arrow(wire, expect_key=key))
        try:
            versions = self._send_warm(keys, wires)
        except KvtierError:
            for key in keys:  # not stored: this process must not serve what the put says it did not store
                self.hot.delete(key)
            raise
        if self.cfg.write_through and self.cold is not None:
            self._write_through(keys, wires, versions)
        self.counters["puts"] += len(keys)
        self.counters["put_bytes"] += sum(w.size for w in wires)
        self.counters["raw_put_bytes"] += sum(b.raw_nbytes for b in blocks)
        m = self.metrics
        m.put_latency(time.perf_counter() - t0)
        for b in blocks:
            m.compression(b.codec, b.raw_nbytes, b.nbytes)
        m.transfer("object_store", sum(w.size for w in wires))
        self._hot_usage()

    def _pick_shard(self, key: str) -> dict:
        shards = self._shards
        local = [s for s in shards if s["node_id"] == self.node_id]
        pool = local or shards
        return pool[zlib.crc32(key.encode()) % len(pool)]

    def _send_warm(self, keys: list[str], wires: list[pa.Buffer], versions: list[int] | None = None) -> list[int]:
        """Store these blocks in warm shards; returns their versions. ``versions``: a promotion of those
        versions, sent without waiting (dropped if the previous promotion is still in flight). A put
        retries a failed shard once with a fresh shard list, then raises KvtierError."""
        if versions is not None:
            if self._promoting and len(ray.wait(self._promoting, num_returns=len(self._promoting), timeout=0)[0]) \
                    < len(self._promoting):
                return [0] * len(keys)  # one promotion batch at a time: a reader must not flood the shards
            self._promoting = list(self._store(keys, wires, versions).values())
            self.counters["promotions"] += len(keys)
            return versions
        out = [0] * len(keys)
        todo = list(range(len(keys)))
        for attempt in range(2):
            refs = self._store([keys[i] for i in todo], [wires[i] for i in todo], None)
            failed, why = [], ""
            for sid, (ref, idx) in refs.items():
                try:
                    got = ray.get(ref, timeout=self.timeout)
                    for j, v in zip(idx, got):
                        out[todo[j]] = v
                except ray.exceptions.RayError as e:  # dead, slow, or failing (object store full)
                    failed += [todo[j] for j in idx]
                    why = f"warm shard {sid}: {type(e).__name__}: {str(e)[:200]}"
            if not failed:
                return out
            self._error(f"{why}; {len(failed)} blocks not stored (attempt {attempt + 1} of 2)")
            self._refresh_shards()
            todo = failed
        raise KvtierError(f"put of {len(todo)} of {len(keys)} blocks failed: {why}")

    def _store(self, keys: list[str], wires: list[pa.Buffer], versions: list[int] | None) -> dict[str, tuple]:
        """One ``store`` call per shard: {shard id: (ObjectRef of the answer, indices into keys)}."""
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, key in enumerate(keys):
            s = self._pick_shard(key)
            groups.setdefault(s["id"], (s["handle"], []))[1].append(i)
        return {sid: (h.store.remote([keys[i] for i in idx], *[np.frombuffer(wires[i], dtype=np.uint8) for i in idx],
                                     versions=None if versions is None else [versions[i] for i in idx]), idx)
                for sid, (h, idx) in groups.items()}

    def _write_through(self, keys: list[str], wires: list[pa.Buffer], versions: list[int]) -> None:
        done = []
        for key, wire, v in zip(keys, wires, versions):
            if not v:
                continue  # superseded by a concurrent write: nothing of this version to keep
            try:
                self.cold.put(key, wire, v)
                done.append((key, wire.size, v))
            except (KvtierError, OSError, ValueError) as e:
                self._error(f"write-through of {key[:16]} to the cold tier failed: {type(e).__name__}: {e}")
        if done:
            k, n, v = map(list, zip(*done))
            try:
                self._call("put_cold", k, n, v, timeout=self.timeout)
            except _RPC_ERRORS as e:
                self._error(f"controller did not take the write-through of {len(k)} blocks ({type(e).__name__})")

    # ---- get ------------------------------------------------------------
    def get(self, keys: Sequence[str], device: str | torch.device | None = None) -> list[torch.Tensor | None]:
        keys = self._keys(keys)
        t0 = time.perf_counter()
        out: list[torch.Tensor | None] = [None] * len(keys)
        need = []
        served = "hot"
        for i, key in enumerate(keys):
            try:
                out[i] = self.hot.get_kv(key, device)
            except BlockFormatError as e:
                self._corrupt(key, "hot", e)
                self.hot.delete(key)
            if out[i] is None:
                need.append(i)
        m = self.metrics
        m.hit("hot", len(keys) - len(need))
        m.miss("hot", len(need))
        if need:
            blocks, served = self._fetch([keys[i] for i in need])
            for i in need:
                block = blocks.get(keys[i])
                if block is None:
                    continue
                self.hot.put(block)
                try:
                    out[i] = decode_block(block, device)
                except BlockFormatError as e:
                    self._corrupt(keys[i], "decode", e)
                    self.hot.delete(keys[i])
        self.counters["gets"] += len(keys)
        misses = sum(x is None for x in out)
        m.miss("none", misses)
        m.get_latency(time.perf_counter() - t0, "none" if misses == len(out) else served)
        self._hot_usage()
        return out

    def _fetch(self, keys: list[str]) -> tuple[dict[str, Block], str]:
        """Blocks of ``keys`` from warm, then cold (absent keys are misses), and the
        lowest tier that served one. One controller call."""
        try:
            locs, lease = self._call("locate", keys, timeout=self.timeout)
        except _RPC_ERRORS as e:
            self._error(f"controller did not answer locate ({type(e).__name__}); reading the cold tier directly")
            locs, lease = [(0, None, None, True, None)] * len(keys), 0  # version None: the newest stored
        found: dict[str, Block] = {}
        lost, cold_lost, cold_lost_v = [], [], []
        warm = [(k, loc[2][0]) for k, loc in zip(keys, locs) if loc is not None and loc[2]]
        if warm:
            refs = [r for _, r in warm]
            try:  # the common case in one call; any failure sorts them out one by one below
                datas = ray.get(refs, timeout=self.timeout)
            except ray.exceptions.RayError as e:  # the budget is spent on a timeout, not on a dead owner
                wait_s = 0 if isinstance(e, ray.exceptions.GetTimeoutError) else self.timeout
                ray.wait(refs, num_returns=len(refs), timeout=wait_s, fetch_local=True)
                datas = None
            for j, (key, ref) in enumerate(warm):
                try:
                    data = datas[j] if datas is not None else ray.get(ref, timeout=0.001)
                    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1):
                        raise BlockFormatError(f"warm value is a {type(data).__name__}, not a 1-D uint8 block buffer")
                    found[key] = Block.from_arrow(pa.py_buffer(data), expect_key=key, expect_model=self.model)
                    self.metrics.transfer("object_store", data.nbytes)
                except ray.exceptions.GetTimeoutError:
                    self._error(f"warm copy of {key[:16]} did not arrive within {self.timeout}s")
                except BlockFormatError as e:
                    self._corrupt(key, "warm", e)
                    lost.append(key)
                except ray.exceptions.RayError as e:  # its shard died: the object went with it
                    self.counters["lost"] += 1
                    lost.append(key)
        promote = []
        if self.cold is not None:
            for key, loc in zip(keys, locs):
                if key in found or loc is None or not loc[3]:
                    continue
                try:
                    block = self.cold.get(key, expect_model=self.model, version=loc[4])
                except (KvtierError, OSError) as e:
                    self._error(f"cold read of {key[:16]} failed: {type(e).__name__}: {e}")
                    continue
                if block is None or block.key != key:
                    # the index said cold: forget it only if the store answers (a corrupt object was deleted,
                    # or it is gone), never because S3 is down for a while (it comes back with its objects)
                    if loc[2] is None and lease and self.cold.available():
                        cold_lost.append(key)
                        cold_lost_v.append(loc[4])
                    continue
                found[key] = block
                self.metrics.transfer(self._cold_transport, block.nbytes)
                if loc[1] is None and loc[4]:
                    promote.append((key, loc[4]))
        if promote:  # cold hit: a warm copy of that version for the next reader, without waiting for it
            self._send_warm([k for k, _ in promote], [found[k].to_arrow() for k, _ in promote], [v for _, v in promote])
        try:
            if lease:
                self.controller.unpin.remote(lease)
            if lost or cold_lost:
                self.controller.forget.remote(lost, cold_lost, cold_lost_v)
        except ray.exceptions.RayActorError:
            pass
        n_warm = sum(1 for k, _ in warm if k in found)
        self.metrics.hit("warm", n_warm)
        self.metrics.miss("warm", len(keys) - n_warm)
        n_cold = len(found) - n_warm
        self.metrics.hit("cold", max(n_cold, 0))
        return found, "cold" if n_cold > 0 else "warm"

    # ---- metadata -------------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> int:
        keys = self._keys(keys)
        have = [k in self.hot for k in keys]
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
        if key in self.hot:
            return True
        try:
            return bool(self._call("present", [key], timeout=self.timeout)[0])
        except _RPC_ERRORS as e:
            self._error(f"controller did not answer contains ({type(e).__name__})")
            return False

    def prefetch(self, keys: Sequence[str]) -> Future:
        """Pull ``keys`` into this process's hot tier in the background; the future gives how many arrived."""
        keys = self._keys(keys)

        def pull() -> int:
            missing = [k for k in keys if k not in self.hot]
            blocks = self._fetch(missing)[0] if missing else {}
            for b in blocks.values():
                self.hot.put(b)
            return len(keys) - len(missing) + len(blocks)

        return self._pool.submit(pull)

    def delete(self, keys: Sequence[str]) -> int:
        keys = self._keys(keys)
        n_hot = sum(self.hot.delete(k) for k in keys)
        try:
            return max(n_hot, int(self._call("delete", keys, timeout=self.timeout)))
        except _RPC_ERRORS as e:
            raise KvtierError(f"delete of {len(keys)} keys: the controller did not answer within {self.timeout}s "
                              f"({type(e).__name__}); lower tiers may still hold them") from None

    def stats(self) -> dict[str, Any]:
        try:
            out = self._call("stats", timeout=3 * self.timeout)
        except _RPC_ERRORS as e:
            self._error(f"controller did not answer stats ({type(e).__name__})")
            out = {"warm": {}, "cold": {}, "shards": [], "controller": {"error": type(e).__name__}}
        out["hot"] = self.hot.stats()
        if self.cold is not None:
            cs = self.cold.stats()
            out["cold"].update({f"client_{k}": cs[k] for k in ("corrupt", "errors") if k in cs})
        out["client"] = dict(self.counters, node_id=self.node_id, namespace=self.namespace, tenant=self.cfg.tenant)
        return {k: out[k] for k in ("hot", "warm", "cold", "shards", "controller", "client", "keys", "leases") if k in out}

    # ---- helpers --------------------------------------------------------
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
            except ray.exceptions.GetTimeoutError:
                return

    def _hot_usage(self) -> None:
        h = self.hot.stats()
        self.metrics.tier_usage("hot", h["blocks"], h["bytes"], h["capacity_bytes"])

    def _corrupt(self, key: str, where: str, e: Exception) -> None:
        self.counters["corrupt"] += 1
        self.metrics.corrupt(where if where in ("hot", "warm", "cold") else "hot")
        self._error(f"corrupt {where} block {key[:16]} treated as a miss: {e}")

    def _error(self, msg: str) -> None:
        with self._lock:
            self.counters["errors"] += 1
            now = time.monotonic()
            if now - self._last_log > 10.0:  # one line per 10 s: a dead backend must not flood the log
                self._last_log = now
                log.warning("kvtier: %s (errors so far: %d)", msg, self.counters["errors"])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.hot.clear()
