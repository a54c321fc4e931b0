"""The client: what one process uses to put and get KV chunks through the tiers.

put: each chunk is compressed and checksummed once (``kvtier.compress``, or a
``Block`` the caller built) and serialized once (``Block.to_arrow``); those
bytes are what the hot tier keeps (on CPU it adopts them; on CUDA it copies the
payload to the GPU), what the background store (``store_queue``) sends to a
warm shard (one ``store`` call per shard per batch, a shard on this node when
there is one) and what ``write_through`` writes to the cold tier, as the version
the controller gave the write. ``put`` returns once the blocks are queued (and
returns them); a full queue makes it wait (backpressure). This process reads its
own puts back at once (hot tier, or the queue); other processes see a block once
its shard has registered it. A store that fails is retried once with a fresh
shard list; if it fails again its blocks leave this process's hot tier (nothing
serves what was not stored) and ``flush()`` raises ``KvtierError`` naming them.

get: this process's hot tier (decoded from its device copy), then its store
queue, then one ``locate`` call to the controller for the whole batch (answers
are ``Location``s), one ``ray.get`` of every warm copy (zero-copy from the
object store on the same node), and one batched, pipelined load
(``kvtier.tiers.pipeline``) of all of them plus the cold reads (the object of the
version the index names): checksums in threads, pinned staging and a copy stream
on CUDA, decode. Every block is verified against its key and this client's
``model_id``: a corrupt, foreign, other model's or missing block, or a warm value
that is not a 1-D uint8 buffer, is a miss (``None``), counted, never wrong data.
A cold hit is offered to the store queue as a promotion of that version for the
next reader (never waited for; skipped when the queue is full).

Device rule: every tensor a get returns is on ``device``; ``None`` means
``kvtier.tiers.hot.default_device()`` (the GPU if there is one, else the CPU).

One definition of a hit: a block served to the caller from a tier. The same
counts feed this process's Prometheus metrics and, reported to the controller
without waiting, ``stats()`` (in blocks and in tokens).

Every remote call has a timeout (``rpc_timeout_s``). A controller that does not
answer makes gets fall back to the cold store directly (its newest version); a
controller that died is looked up again by name (and made again if none runs); a
shard that died makes its blocks misses (or cold hits) and is reported to the
controller.

Not here: placement decisions (the controller), storage of blocks (tiers/).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import ray
import torch

from kvtier.block import Block
from kvtier.codecs import compress
from kvtier.config import TierConfig
from kvtier.errors import BlockFormatError, KvtierError
from kvtier.keys import check_keys, tenant_key
from kvtier.metrics import TierMetrics
from kvtier.runtime.location import Location
from kvtier.runtime.names import open_cold_store
from kvtier.runtime.store_queue import Pending, StoreQueue
from kvtier.tiers.hot import HotTier, as_device, wire_buffers
from kvtier.tiers.pipeline import Loaded, Loader

log = logging.getLogger("kvtier.client")
_RPC_ERRORS = (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError)
MAX_BATCH_KEYS = 4096  # 1M tokens in 256-token chunks; one locate answer stays well under Ray's inline limits
STORE_QUEUE_BYTES = 1 << 30  # blocks on their way to the shards: 2 GiB of Llama-8B KV (16K tokens) at kivi4 ~4x
TIERS = ("hot", "warm", "cold")


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
        self.loader = Loader()
        self.store = StoreQueue(self._store_batch, STORE_QUEUE_BYTES, timeout_s=max(60.0, 4 * self.timeout),
                                max_batch_bytes=max(1, self.cfg.shard_bytes // 8))
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtier-prefetch")
        self._lock = threading.Lock()
        self._reconnected = 0.0
        self._failed: list[str] = []  # keys whose store failed since the last flush (flush raises naming them)
        self.counters = {"puts": 0, "gets": 0, "errors": 0, "corrupt": 0, "lost": 0, "promotions": 0,
                         "foreign_model": 0, "put_bytes": 0, "raw_put_bytes": 0}
        # per tier: blocks served, their tokens, misses; ``_unreported`` is what the controller has not been told
        self.served = {t: {"hits": 0, "hit_tokens": 0, "misses": 0} for t in TIERS}
        self._unreported = {t: {"hits": 0, "hit_tokens": 0, "misses": 0} for t in TIERS}
        self._reported_at = 0.0
        self.last_get: dict[str, float] = {}  # phases of the last get that left the hot tier (seconds)
        self._last_log = 0.0
        self.metrics = TierMetrics("client")
        self._cold_transport = "s3" if self.cfg.cold_uri.startswith("s3://") else "file"

    def _keys(self, keys: Sequence[str]) -> list[str]:
        """Validated keys, bound to this client's tenant: every call below sees only tenant-bound keys,
        so no tier can hand one tenant a block another tenant put under the same key."""
        return [tenant_key(k, self.cfg.tenant) for k in _keys(keys)]

    # ---- put ------------------------------------------------------------
    def put(self, keys: Sequence[str], kvs: Sequence[torch.Tensor | Block], codec: str | None = None) -> list[Block]:
        """Compress (or take as they are) and queue for storing; returns the blocks, whose ``to_arrow()`` bytes
        are the ones stored (a prefill worker publishes those same bytes)."""
        keys = self._keys(keys)
        if len(keys) != len(kvs):
            raise ValueError(f"put got {len(keys)} keys and {len(kvs)} tensors; they must pair up")
        codec = codec or self.cfg.codec
        t0 = time.perf_counter()
        blocks = [self._block(k, kv, codec) for k, kv in zip(keys, kvs)]
        items = []
        for block in blocks:
            wire = block.to_arrow()  # the one serialization: hot tier, shard, cold and handoff share it
            if self.hot.capacity:
                on_cpu = self.hot.device.type == "cpu" and not block.codec.endswith("+zstd")
                # CPU: the tier adopts views of the fresh wire bytes (nobody else writes them), no copy
                self.hot.put(block, wire_buffers(wire) if on_cpu else None)
            items.append(Pending(block.key, wire, wire.size, write_through=self.cfg.write_through))
        self.store.submit(items)  # waits only while the queue is full
        self.counters["puts"] += len(keys)
        self.counters["put_bytes"] += sum(p.nbytes for p in items)
        self.counters["raw_put_bytes"] += sum(b.raw_nbytes for b in blocks)
        m = self.metrics
        m.put_latency(time.perf_counter() - t0)
        for b, p in zip(blocks, items):
            m.compression(b.codec, b.raw_nbytes, p.nbytes)
        self._hot_usage()
        return blocks

    def _block(self, key: str, kv: torch.Tensor | Block, codec: str) -> Block:
        if not isinstance(kv, Block):
            return compress(kv, codec, key=key, model_id=self.model)
        if kv.model != self.model:
            raise ValueError(f"block {kv.key[:16]!r} is of model {kv.model!r}; this client stores model_id={self.model!r}")
        if kv.key == key:
            return kv  # stored as it is: its bytes were made once, by the caller
        # a tenant-bound key differs from the caller's: the header names the key, so it is rebuilt (payload shared)
        return Block.build(key=key, model=kv.model, codec=kv.codec, shape=kv.shape, dtype=kv.dtype, params=kv.params,
                           buffers=kv.buffers)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every block put so far is stored in its shard (True) or ``timeout_s`` passed (False).
        Raises ``KvtierError`` naming the blocks whose store failed since the last flush."""
        done = self.store.flush(timeout_s)
        with self._lock:
            failed, self._failed = self._failed, []
        if failed:
            raise KvtierError(f"{len(failed)} blocks put were not stored (first: {failed[0][:16]}); see the log")
        return done

    def _pick_shard(self, key: str) -> dict:
        shards = self._shards
        local = [s for s in shards if s["node_id"] == self.node_id]
        pool = local or shards
        return pool[zlib.crc32(key.encode()) % len(pool)]

    def _store_batch(self, batch: list[Pending]) -> None:
        """The background store's sender: puts (retried once with a fresh shard list), their write-through
        as the versions the controller gave them, and promotions of cold hits (never retried)."""
        puts = [p for p in batch if not p.version]
        promos = [p for p in batch if p.version]
        if promos:
            for sid, (ref, idx) in self._store([p.key for p in promos], [p.wire for p in promos],
                                               [p.version for p in promos]).items():
                try:
                    ray.get(ref, timeout=self.timeout)
                except ray.exceptions.RayError as e:
                    self._error(f"promotion of {len(idx)} blocks to warm shard {sid} failed ({type(e).__name__})")
        if not puts:
            return
        versions = [0] * len(puts)
        todo, why = list(range(len(puts))), ""
        for attempt in range(2):
            failed = []
            for sid, (ref, idx) in self._store([puts[i].key for i in todo], [puts[i].wire for i in todo], None).items():
                try:
                    for j, v in zip(idx, ray.get(ref, timeout=self.timeout)):
                        versions[todo[j]] = v
                    self.metrics.transfer("object_store", sum(puts[todo[j]].nbytes for j in idx))
                except ray.exceptions.RayError as e:  # dead, slow, or failing (object store full)
                    failed += [todo[j] for j in idx]
                    why = f"warm shard {sid}: {type(e).__name__}: {str(e)[:200]}"
            if not failed:
                break
            self._error(f"{why}; {len(failed)} blocks not stored (attempt {attempt + 1} of 2)")
            self._refresh_shards()
            todo = failed
        else:
            lost = [puts[i] for i in todo]
            for p in lost:  # not stored: this process must not serve it (unless a newer put of the key is queued)
                if self.store.pending(p.key) is p or self.store.pending(p.key) is None:
                    self.hot.delete(p.key)
            with self._lock:
                self._failed += [p.key for p in lost]
        if self.cold is not None:
            wt = [(p, v) for p, v in zip(puts, versions) if v and p.write_through]
            if wt:
                self._write_through([p for p, _ in wt], [v for _, v in wt])

    def _store(self, keys: list[str], wires: list, versions: list[int] | None) -> dict[str, tuple]:
        """One ``store`` call per shard: {shard id: (ObjectRef of the answer, indices into keys)}."""
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, key in enumerate(keys):
            s = self._pick_shard(key)
            groups.setdefault(s["id"], (s["handle"], []))[1].append(i)
        return {sid: (h.store.remote([keys[i] for i in idx], *[np.frombuffer(wires[i], dtype=np.uint8) for i in idx],
                                     versions=None if versions is None else [versions[i] for i in idx]), idx)
                for sid, (h, idx) in groups.items()}

    def _write_through(self, puts: list[Pending], versions: list[int]) -> None:
        done = []
        for p, v in zip(puts, versions):
            try:
                self.cold.put(p.key, p.wire, v)
                done.append((p.key, p.nbytes, v))
            except (KvtierError, OSError, ValueError) as e:
                self._error(f"write-through of {p.key[:16]} to the cold tier failed: {type(e).__name__}: {e}")
        if done:
            k, n, v = map(list, zip(*done))
            try:
                self._call("put_cold", k, n, v, timeout=self.timeout)
            except _RPC_ERRORS as e:
                self._error(f"controller did not take the write-through of {len(k)} blocks ({type(e).__name__})")

    # ---- get ------------------------------------------------------------
    def get(self, keys: Sequence[str], device: str | torch.device | None = None) -> list[torch.Tensor | None]:
        keys = self._keys(keys)
        device = as_device(device)
        t0 = time.perf_counter()
        self.last_get = {}  # a get served by the hot tier alone has no phases
        out: list[torch.Tensor | None] = [None] * len(keys)
        need = []
        for i, key in enumerate(keys):
            try:
                out[i] = self.hot.get_kv(key, device, expect_model=self.model)
            except BlockFormatError as e:
                self._corrupt(key, "hot", e)
                self.hot.delete(key)
            if out[i] is None:
                need.append(i)
        self._count("hot", [out[i] for i in range(len(keys)) if out[i] is not None], len(need))
        served = "hot"
        if need:
            loaded, served = self._load([keys[i] for i in need], device, decode=True)
            for i in need:
                r = loaded.get(keys[i])
                if r is not None:
                    out[i] = r.kv
        self.counters["gets"] += len(keys)
        misses = sum(x is None for x in out)
        self.metrics.miss("none", misses)
        self.metrics.get_latency(time.perf_counter() - t0, "none" if misses == len(out) else served)
        self._hot_usage()
        self._report(force=bool(need))
        return out

    def _load(self, keys: list[str], device: torch.device, decode: bool) -> tuple[dict[str, Loaded], str]:
        """Blocks of ``keys`` from this process's store queue, the warm shards, then cold (absent keys are
        misses), loaded in one pipelined batch and kept in the hot tier; the lowest tier that served one."""
        t0 = time.perf_counter()
        src: dict[str, tuple[str, Any]] = {}  # key -> (tier, source)
        for k in keys:
            p = self.store.pending(k)
            if p is not None:  # put by this process, not stored yet: read back at once
                src[k] = ("hot", p.wire)
        rest = [k for k in keys if k not in src]
        locs, lease = self._locate(rest) if rest else ({}, 0)
        t1 = time.perf_counter()
        warm = [(k, locs[k]) for k in rest if locs.get(k) is not None and locs[k].tier == "warm"]
        lost: list[str] = []
        for k, data in zip([k for k, _ in warm], self._warm_bytes([loc.ref for _, loc in warm], lost, warm)):
            if data is None:
                continue
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1):
                self._corrupt(k, "warm", BlockFormatError(f"warm value is a {type(data).__name__}, not a 1-D uint8 "
                                                          "block buffer"))
                lost.append(k)
                continue
            src[k] = ("warm", data)
        t2 = time.perf_counter()
        cold_lost: list[str] = []
        for k in rest:
            if k not in src and self._cold_candidate(locs.get(k)):
                src[k] = ("cold", self._cold_read(k, locs[k]))
        found = self._run_load(src, locs, device, decode, lost, cold_lost, lease)
        retry = {k: ("cold", self._cold_read(k, locs[k])) for k in lost
                 if k not in found and self._cold_candidate(locs.get(k))}  # a warm copy was bad: its cold copy
        if retry:
            found.update(self._run_load(retry, locs, device, decode, [], cold_lost, lease))
        self.last_get = {"locate": t1 - t0, "fetch": t2 - t1, "load": time.perf_counter() - t2}
        try:
            if lease:
                self.controller.unpin.remote(lease)
            if lost or cold_lost:
                self.controller.forget.remote(lost, cold_lost, [locs[k].version for k in cold_lost])
        except ray.exceptions.RayActorError:
            pass
        tiers = {(retry.get(k) or src[k])[0] for k in found}
        return found, "cold" if "cold" in tiers else "warm" if "warm" in tiers else "hot"

    def _cold_candidate(self, loc: Location | None) -> bool:
        return self.cold is not None and loc is not None and loc.cold

    def _cold_read(self, key: str, loc: Location):
        """A read of the version the index names (None: the newest stored), run in the load's pool."""
        # no expect_model here: the cold store deletes what fails its checks, and another model's valid block is
        # its owner's, not corrupt; the load checks the model and makes it a counted miss
        return functools.partial(self.cold.get, key, version=loc.version)

    def _locate(self, keys: list[str]) -> tuple[dict[str, Location | None], int]:
        try:
            locs, lease = self._call("locate", keys, timeout=self.timeout)
        except _RPC_ERRORS as e:
            self._error(f"controller did not answer locate ({type(e).__name__}); reading the cold tier directly")
            return {k: Location(k, 0, None, None, True, None) for k in keys}, 0  # version None: the newest
        return dict(zip(keys, locs)), lease

    def _warm_bytes(self, refs: list, lost: list[str], warm: list) -> list:
        """The warm copies' bytes (zero-copy arrays), None where not had; dead shards' keys go to ``lost``."""
        if not refs:
            return []
        try:  # the common case in one call; any failure sorts them out one by one below
            return ray.get(refs, timeout=self.timeout)
        except ray.exceptions.RayError as e:  # the budget is spent on a timeout, not on a dead owner
            wait_s = 0 if isinstance(e, ray.exceptions.GetTimeoutError) else self.timeout
            ray.wait(refs, num_returns=len(refs), timeout=wait_s, fetch_local=True)
        out = []
        for (key, _), ref in zip(warm, refs):
            try:
                out.append(ray.get(ref, timeout=0.001))
            except ray.exceptions.GetTimeoutError:
                self._error(f"warm copy of {key[:16]} did not arrive within {self.timeout}s")
                out.append(None)
            except ray.exceptions.RayError:  # its shard died: the object went with it
                self.counters["lost"] += 1
                lost.append(key)
                out.append(None)
        return out

    def _run_load(self, src: dict[str, tuple[str, Any]], locs: dict, device: torch.device, decode: bool,
                  lost: list[str], cold_lost: list[str], lease: int) -> dict[str, Loaded]:
        order = list(src)
        keep = bool(self.hot.capacity) and device == self.hot.device
        results = self.loader.load(order, [src[k][1] for k in order], device, expect_model=self.model,
                                   keep_buffers=keep, decode=decode, timeout_s=self.timeout)
        found: dict[str, Loaded] = {}
        served: dict[str, list] = {t: [] for t in TIERS}
        for key, r in zip(order, results):
            tier = src[key][0]
            if r.status == "ok":
                found[key] = r
                served[tier].append(r)
                if self.hot.capacity:
                    self.hot.put(r.block, r.buffers if keep else None)
                if tier == "cold":
                    self.metrics.transfer(self._cold_transport, r.nbytes)
                    loc = locs.get(key)
                    if loc is not None and loc.shard is None and loc.version:  # a warm copy of that version
                        wire = r.block.to_arrow()  # for the next reader: offered, never waited for
                        if self.store.offer([Pending(key, wire, wire.size, version=loc.version)]):
                            self.counters["promotions"] += 1
                elif tier == "warm":
                    self.metrics.transfer("object_store", r.nbytes)
            elif r.status == "model":
                self.counters["foreign_model"] += 1
                self._error(f"{tier} block {key[:16]} is of another model, treated as a miss: {r.error}")
            elif r.status == "corrupt":
                self._corrupt(key, tier, BlockFormatError(r.error))
                (lost if tier == "warm" else cold_lost if tier == "cold" else []).append(key)
            elif r.status == "missing" and tier == "cold":
                # the index said cold: forget it only if the store answers (a corrupt object was deleted, or it is
                # gone), never because S3 is down for a while (it comes back with its objects)
                loc = locs.get(key)
                if loc is not None and loc.shard is None and lease and self.cold.available():
                    cold_lost.append(key)
            elif r.status in ("error", "timeout"):
                self._error(f"{tier} read of {key[:16]} failed: {r.status}: {r.error}")
        if decode:  # a get, not a prefetch: what the caller was served
            wanted = {t: sum(1 for k in order if src[k][0] == t) for t in TIERS}
            for t in ("warm", "cold"):
                if wanted[t] or served[t]:
                    self._count(t, [r.kv for r in served[t]], wanted[t] - len(served[t]))
            if served["hot"]:  # read back from this process's store queue
                self._count("hot", [r.kv for r in served["hot"]], 0)
        return found

    def _count(self, tier: str, hits: list, misses: int) -> None:
        """One definition of a hit: a block served from ``tier``; counted in blocks and tokens, for
        Prometheus now and for the controller's ``stats()`` (``_report``)."""
        tokens = sum(int(h.shape[3]) for h in hits)  # [layers, 2, kv_heads, tokens, head_dim]
        with self._lock:
            for d in (self.served[tier], self._unreported[tier]):
                d["hits"] += len(hits)
                d["hit_tokens"] += tokens
                d["misses"] += misses
        self.metrics.hit(tier, len(hits), tokens=tokens)
        self.metrics.miss(tier, misses)

    def _report(self, force: bool = False) -> None:
        """Tell the controller this process's new hit counts, without waiting: with a get that called it
        anyway, else at most once a second (hot hits alone never wait for, nor cost, a remote call each)."""
        now = time.monotonic()
        if not force and now - self._reported_at < 1.0:
            return
        with self._lock:
            counts = {t: d for t, d in self._unreported.items() if any(d.values())}
            if not counts:
                return
            self._unreported = {t: {"hits": 0, "hit_tokens": 0, "misses": 0} for t in TIERS}
            self._reported_at = now
        try:
            self.controller.served.remote(counts)
        except ray.exceptions.RayActorError:
            pass

    # ---- metadata -------------------------------------------------------
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

    def prefetch(self, keys: Sequence[str]) -> Future:
        """Pull ``keys`` into this process's hot tier in the background; the future gives how many arrived."""
        keys = self._keys(keys)

        def pull() -> int:
            missing = [k for k in keys if k not in self.hot]
            loaded = self._load(missing, self.hot.device, decode=False)[0] if missing and self.hot.capacity else {}
            return len(keys) - len(missing) + len(loaded)

        return self._pool.submit(pull)

    def delete(self, keys: Sequence[str]) -> int:
        keys = self._keys(keys)
        self.store.flush()  # a store still in flight must not land after the delete and bring a key back
        n_hot = sum(self.hot.delete(k) for k in keys)
        try:
            return max(n_hot, int(self._call("delete", keys, timeout=self.timeout)))
        except _RPC_ERRORS as e:
            raise KvtierError(f"delete of {len(keys)} keys: the controller did not answer within {self.timeout}s "
                              f"({type(e).__name__}); lower tiers may still hold them") from None

    def stats(self) -> dict[str, Any]:
        self.store.flush()  # this process's puts are in the figures (bounded by the queue's timeout)
        self._report(force=True)
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
        self.store.close(timeout_s=self.timeout)
        self._report(force=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.loader.close()
        self.hot.clear()
