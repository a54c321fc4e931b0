"""The client's get path: hot tier, store queue, cached locations or one locate, one pipelined load.

get: this process's hot tier (decoded from its device copy), then its store
queue, then the locations this client cached from earlier answers
(``location_cache``: fetched and loaded at once, used only once one
``changes`` call, overlapped with that work, confirms they are still current),
then one ``locate`` call to the controller for the rest of the batch (answers
are ``Location``s), and one batched, pipelined load (``kvtier.tiers.pipeline``)
of all of them plus the cold reads (the object of the version the index
names). The load fetches the warm copies run by run as it stages them
(``_Fetch``: one ``ray.get`` per run, zero-copy from the object store on the
same node; on CUDA the next run's fetch overlaps this run's device copies). On CUDA, blocks made on a GPU straight from the
object store's registered pages to the device and verified there; the rest
checksummed while copied, in threads, pinned staging and a copy stream on CUDA;
then decode. Every block is verified against its key and
this client's ``model_id``: a corrupt, foreign, other model's or missing block,
or a warm value that is not a 1-D uint8 buffer, is a miss (``None``), counted,
never wrong data. A cold hit is offered to the store queue as a promotion of
that version for the next reader (never waited for; skipped when the queue is
full).

Device rule: every tensor a get returns is on ``device``; ``None`` means
``kvtier.tiers.hot.default_device()`` (the GPU if there is one, else the CPU).

One definition of a hit: a block served to the caller from a tier. The same
counts feed this process's Prometheus metrics and, reported to the controller
without waiting, ``stats()`` (in blocks and in tokens).

A controller that does not answer makes gets fall back to the cold store
directly (its newest version); a shard that died makes its blocks misses (or
cold hits) and is reported to the controller.

``GetPath`` is one half of ``kvtier.runtime.client.Client`` (its state is set
up in ``Client.__init__``); not here: the put path (``put_path``).
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future
from typing import Any, Sequence

import numpy as np
import ray
import torch

from kvtier.errors import BlockFormatError
from kvtier.runtime.location import Location
from kvtier.runtime.names import RPC_ERRORS as _RPC_ERRORS
from kvtier.runtime.store_queue import Pending
from kvtier.tiers.hot import as_device
from kvtier.tiers.pipeline import Later, Loaded

TIERS = ("hot", "warm", "cold")


class GetPath:
    def get(self, keys: Sequence[str], device: str | torch.device | None = None) -> list[torch.Tensor | None]:
        keys = self._keys(keys)
        device = as_device(device)
        t0 = time.perf_counter()
        self.last_get = {}  # a get served by the hot tier alone has no phases
        out: list[torch.Tensor | None] = [None] * len(keys)
        need = []
        for i, (key, kv) in enumerate(zip(keys, self.hot.get_kvs(keys, device, expect_model=self.model))):
            if isinstance(kv, BlockFormatError):
                self._corrupt(key, "hot", kv)
                self.hot.delete(key)
                kv = None
            out[i] = kv
            if kv is None:
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
        if need:
            self._wake.set()  # the client's sync thread reports the new counts now, off this call's path
        return out

    def _load(self, keys: list[str], device: torch.device, decode: bool) -> tuple[dict[str, Loaded], str]:
        """Blocks of ``keys`` from this process's store queue, the warm shards, then cold (absent keys are
        misses), loaded in one pipelined batch and kept in the hot tier (``_adopt``: not a CPU copy of this
        node's object store); the lowest tier that served one."""
        t0 = time.perf_counter()
        src: dict[str, tuple[str, Any]] = {}  # key -> (tier, source)
        for k in keys:
            p = self.store.pending(k)
            if p is not None:  # put by this process, not stored yet: read back at once
                src[k] = ("hot", p.wire)
        rest = [k for k in keys if k not in src]
        cached, down, phases = self._load_cached(rest, device, decode) if rest else ({}, False, {})
        rest = [k for k in rest if k not in cached]
        t0 = time.perf_counter()
        locs, lease = self._locate(rest, down) if rest else ({}, 0)
        t1 = time.perf_counter()
        lost: list[str] = []  # warm copies that were lost or bad: read from cold if they are there
        fetched = _Fetch(self, locs, lost)
        for k in rest:
            loc = locs.get(k)
            if loc is not None and loc.tier == "warm":
                src[k] = ("warm", fetched.later(k))  # fetched run by run inside the load
            elif self._cold_candidate(loc):
                src[k] = ("cold", self._cold_read(k, loc))
        t2 = time.perf_counter()
        cold_lost: list[str] = []
        found = self._run_load(src, locs, device, decode, lost, cold_lost, lease, fetched) if src else {}
        retry = {k: ("cold", self._cold_read(k, locs[k])) for k in lost + fetched.unfetched
                 if k not in found and self._cold_candidate(locs.get(k))}  # no good warm copy: its cold copy
        if retry:
            found.update(self._run_load(retry, locs, device, decode, [], cold_lost, lease))
        self.last_get = {"locate": t1 - t0 + phases.get("check", 0.0), "fetch": fetched.spent + phases.get("fetch", 0.0),
                         "load": time.perf_counter() - t2 - fetched.spent + phases.get("load", 0.0)}
        try:
            if lease:
                self.controller.unpin.remote(lease)
            if lost or cold_lost:
                self.controller.forget.remote(lost, cold_lost, [locs[k].version for k in cold_lost])
        except ray.exceptions.RayActorError:
            pass
        tiers = {(retry.get(k) or src[k])[0] for k in found} | ({"warm"} if cached else set())
        found.update(cached)
        return found, "cold" if "cold" in tiers else "warm" if "warm" in tiers else "hot"

    def _load_cached(self, keys: list[str], device: torch.device,
                     decode: bool) -> tuple[dict[str, Loaded], bool, dict[str, float]]:
        """The keys whose warm location this client cached (``location_cache``): fetched and loaded at once,
        while one ``changes`` call (issued first) asks the controller whether those locations are still the
        current copies; only results it confirms are used (kept in the hot tier as ``_adopt`` says, counted
        as warm hits).
        Everything else goes the locate path. Returns (found, controller timed out, phase times)."""
        cached, since, inc = self.locations.take(keys)
        if not cached:
            return {}, False, {}
        t0 = time.perf_counter()
        check = self.controller.changes.remote(since, inc)
        order = list(cached)
        # fetched run by run inside the load; a shard that died or an object lost is a miss here, which the
        # locate path then sorts out
        fetched = _Fetch(self, cached, None)
        keep = self._keeps(device, decode)
        results = self.loader.load(order, [fetched.later(k) for k in order], device, expect_model=self.model,
                                   keep_buffers=keep, decode=decode, timeout_s=self.timeout, fetch=fetched)
        t2 = time.perf_counter()
        down = False
        try:
            stale = self.locations.apply(*ray.get(check, timeout=self.timeout))
        except _RPC_ERRORS as e:
            down = isinstance(e, ray.exceptions.GetTimeoutError)  # the locate path would wait as long again
            stale = self.locations.apply(None, 0, None)
        found = {k: r for k, r in zip(order, results) if r.status == "ok" and stale is not None and k not in stale}
        self.locations.drop([k for k in order if k not in found])
        self.locations.counters["hits"] += len(found)
        self.locations.counters["stale"] += len(order) - len(found)
        local = self._local_shards()
        for k, r in found.items():
            self._adopt(r, device, "warm", cached[k].shard in local)
        if found:  # one metrics update per get, not one per block (~15 us each)
            self.metrics.transfer("object_store", sum(r.nbytes for r in found.values()))
        if decode and found:
            self._count("warm", [r.kv for r in found.values()], 0)
        return found, down, {"check": time.perf_counter() - t2, "fetch": fetched.spent, "load": t2 - t0 - fetched.spent}

    def _cold_candidate(self, loc: Location | None) -> bool:
        return self.cold is not None and loc is not None and loc.cold

    def _cold_read(self, key: str, loc: Location):
        """A read of the version the index names (None: the newest stored), run in the load's pool."""
        # no expect_model here: the cold store deletes what fails its checks, and another model's valid block is
        # its owner's, not corrupt; the load checks the model and makes it a counted miss
        return functools.partial(self.cold.get, key, version=loc.version)

    def _locate(self, keys: list[str], down: bool = False) -> tuple[dict[str, Location | None], int]:
        """Where ``keys`` are (one controller call; its warm answers go into the location cache);
        ``down``: the controller just timed out on this get, so the cold tier is read directly at once."""
        try:
            if down:
                raise ray.exceptions.GetTimeoutError("the controller's changes call timed out in this get")
            locs, lease, (inc, seq) = self._call("locate", keys, True, True, timeout=self.timeout)
        except _RPC_ERRORS as e:
            self._error(f"controller did not answer locate ({type(e).__name__}); reading the cold tier directly")
            return {k: Location(k, 0, None, None, True, None) for k in keys}, 0  # version None: the newest
        out = dict(zip(keys, locs))
        self.locations.learn(out, inc, seq)
        return out, lease

    def _warm_bytes(self, refs: list, lost: list[str] | None, warm: list) -> list:
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
                if lost is not None:
                    self.counters["lost"] += 1
                    lost.append(key)
                out.append(None)
        return out

    def _run_load(self, src: dict[str, tuple[str, Any]], locs: dict, device: torch.device, decode: bool,
                  lost: list[str], cold_lost: list[str], lease: int, fetch=None) -> dict[str, Loaded]:
        order = list(src)
        keep = self._keeps(device, decode)
        local = self._local_shards()
        results = self.loader.load(order, [src[k][1] for k in order], device, expect_model=self.model,
                                   keep_buffers=keep, decode=decode, timeout_s=self.timeout, fetch=fetch)
        unfetched = set(fetch.unfetched) | set(lost) if fetch is not None else set()  # no copy reached the load
        found: dict[str, Loaded] = {}
        served: dict[str, list] = {t: [] for t in TIERS}
        for key, r in zip(order, results):
            tier = src[key][0]
            if r.status == "ok":
                found[key] = r
                served[tier].append(r)
                self._adopt(r, device, tier, getattr(locs.get(key), "shard", None) in local)
                if tier == "cold":
                    loc = locs.get(key)
                    if loc is not None and loc.shard is None and loc.version:  # a warm copy of that version
                        wire = r.block.to_arrow()  # for the next reader: offered, never waited for
                        if self.store.offer([Pending(key, wire, wire.size, version=loc.version)]):
                            self.counters["promotions"] += 1
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
        for tier, transport in (("warm", "object_store"), ("cold", self._cold_transport)):
            if served[tier]:  # one metrics update per tier and load, not one per block
                self.metrics.transfer(transport, sum(r.nbytes for r in served[tier]))
        if decode:  # a get, not a prefetch: what the caller was served
            wanted = {t: sum(1 for k in order if src[k][0] == t and k not in unfetched) for t in TIERS}
            for t in ("warm", "cold"):
                if wanted[t] or served[t]:
                    self._count(t, [r.kv for r in served[t]], wanted[t] - len(served[t]))
            if served["hot"]:  # read back from this process's store queue
                self._count("hot", [r.kv for r in served["hot"]], 0)
        return found

    def _keeps(self, device: torch.device, decode: bool) -> bool | str:
        """What a load hands over for the hot tier: its device copies (CUDA, or a CPU prefetch), or on a CPU
        get only what it owns anyway (``"owned"``: inflated ``+zstd`` payloads), never a copy made for it."""
        if not self.hot.capacity or device != self.hot.device:
            return False
        return "owned" if device.type == "cpu" and decode else True

    def _adopt(self, r: Loaded, device: torch.device, tier: str, local: bool) -> None:
        """Keep a served block in the hot tier. Not on a CPU get of a block from this node's object store
        that the load did not copy: it decoded those bytes in place, and a copy for a CPU hot tier would hold
        them twice in one memory (and cost a copy: ~3 ms of a 4.4 ms SmolLM2 warm get on the 2-core box).
        A block from another node's shard or the cold tier is copied in (``HotTier.put`` copies)."""
        if not self.hot.capacity:
            return
        if r.buffers is None and device.type == "cpu" and tier == "warm" and local:
            return
        self.hot.put(r.block, r.buffers)

    def _local_shards(self) -> set[str]:
        return {s["id"] for s in self._shards if s.get("node_id") == self.node_id}

    def prefetch(self, keys: Sequence[str]) -> Future:
        """Pull ``keys`` into this process's hot tier in the background; the future gives how many arrived."""
        keys = self._keys(keys)

        def pull() -> int:
            missing = [k for k in keys if k not in self.hot]
            loaded = self._load(missing, self.hot.device, decode=False)[0] if missing and self.hot.capacity else {}
            return len(keys) - len(missing) + len(loaded)

        fut = self._pool.submit(pull)
        with self._lock:  # close() waits for these (bounded): none may be inside Ray at its shutdown
            self._prefetching.add(fut)
        fut.add_done_callback(self._prefetch_done)
        return fut

    def _prefetch_done(self, fut: Future) -> None:
        with self._lock:
            self._prefetching.discard(fut)

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

    def _report(self, force: bool = False, wait_s: float = 0.0) -> None:
        """Tell the controller this process's new hit counts, without waiting. Called by the client's sync
        thread (at once after a get that left the hot tier, else at most once a second: hot hits alone never
        cost a remote call each), by ``stats()`` and by ``close()``.
        ``wait_s`` > 0 waits (bounded) until the controller has them: ``stats()`` asks next, and the
        controller is a threaded actor (no order between one caller's calls), so its answer could predate
        the report (a warm hit missing from the figures, seen under load in tests/kvtier/test_runtime.py)."""
        now = time.monotonic()
        if (not force and now - self._reported_at < 1.0) or not ray.is_initialized():
            return
        try:
            with self._report_lock:  # taken and sent as one step (a stats() call waits for a sync thread's send)
                with self._lock:  # every get's _count takes it: held only to take the counts, never over a submit
                    counts = {t: d for t, d in self._unreported.items() if any(d.values())}
                    if counts:
                        self._unreported = {t: {"hits": 0, "hit_tokens": 0, "misses": 0} for t in TIERS}
                        self._reported_at = now
                if counts:
                    self._report_ref = self.controller.served.remote(counts)
                ref = self._report_ref  # this one, or the last one sent (perhaps still in flight)
            if wait_s > 0 and ref is not None:
                ray.get(ref, timeout=wait_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # the counts are the controller's to lose: a late or lost report never blocks a caller


class _Fetch:
    """The warm copies of one load, fetched when the load stages their run (``Loader.load``'s ``fetch``): one
    ``ray.get`` per run (zero-copy views of this node's object store), so the next run's fetch overlaps this
    run's device copies. A copy not had is None (a miss in the load): a dead shard's or a bad value's key goes
    to ``lost`` (when given: the locate path's, retried from cold and reported), the rest to ``unfetched``.
    ``spent``: seconds inside ``ray.get``."""

    def __init__(self, client: "GetPath", locs: dict, lost: list[str] | None) -> None:
        self.client, self.locs, self.lost = client, locs, lost
        self.unfetched: list[str] = []
        self.spent = 0.0

    def later(self, key: str) -> Later:
        return Later(self.locs[key].size or 0)

    def __call__(self, keys: list[str]) -> list:
        t0 = time.perf_counter()
        warm = [(k, self.locs[k]) for k in keys]
        out = []
        for k, data in zip(keys, self.client._warm_bytes([loc.ref for _, loc in warm], self.lost, warm)):
            if data is not None and not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1):
                if self.lost is not None:  # a located copy: reported corrupt
                    self.client._corrupt(k, "warm", BlockFormatError(
                        f"warm value is a {type(data).__name__}, not a 1-D uint8 block buffer"))
                    self.lost.append(k)
                data = None
            elif data is None and (self.lost is None or k not in self.lost):
                self.unfetched.append(k)
            out.append(data)
        self.spent += time.perf_counter() - t0
        return out
