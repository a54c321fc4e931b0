"""The client's put path: one compression and one serialization per chunk, stored off the request path.

Each chunk is compressed and checksummed once (``kvtier.compress``, or a
``Block`` the caller built) and serialized once (``Block.to_arrow``); those
bytes are what the hot tier keeps (on CUDA it copies the payload to the GPU; on
CPU it adopts them, unless a shard is on this node, whose object holds the same
bytes once stored: the queue serves them until then), what the background store (``store_queue``) sends to a
warm shard (one ``store`` call per shard per batch, a shard on this node when
there is one) and what ``write_through`` writes to the cold tier, as the version
the controller gave the write. ``put`` returns once the blocks are queued (and
returns them); a full queue makes it wait (backpressure). This process reads its
own puts back at once (hot tier, or the queue); other processes see a block once
its shard has registered it. A store that fails is retried once with a fresh
shard list; if it fails again its blocks leave this process's hot tier (nothing
serves what was not stored) and ``flush()`` raises ``KvtierError`` naming them.

``PutPath`` is one half of ``kvtier.runtime.client.Client`` (its state is set
up in ``Client.__init__``); not here: the get path (``get_path``), metadata
calls and the controller connection (``client``).
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Sequence

import numpy as np
import ray
import torch

from kvtier.block import Block
from kvtier.codecs import compress
from kvtier.errors import KvtierError
from kvtier.runtime.names import RPC_ERRORS as _RPC_ERRORS
from kvtier.runtime.store_queue import Pending
from kvtier.tiers.hot import wire_buffers


class PutPath:
    def put(self, keys: Sequence[str], kvs: Sequence[torch.Tensor | Block], codec: str | None = None) -> list[Block]:
        """Compress (or take as they are) and queue for storing; returns the blocks, whose ``to_arrow()`` bytes
        are the ones stored (a prefill worker publishes those same bytes)."""
        keys = self._keys(keys)
        if len(keys) != len(kvs):
            raise ValueError(f"put got {len(keys)} keys and {len(kvs)} tensors; they must pair up")
        codec = codec or self.cfg.codec
        t0 = time.perf_counter()
        blocks = [self._block(k, kv, codec) for k, kv in zip(keys, kvs)]
        self.locations.drop(keys)  # a cached location names the previous copy
        items = []
        cpu = self.hot.device.type == "cpu"
        shard_here = cpu and bool(self._local_shards())
        for block in blocks:
            wire = block.to_arrow()  # the one serialization: hot tier, shard, cold and handoff share it
            as_is = cpu and not block.codec.endswith("+zstd")  # a CPU entry would be views of these bytes
            if self.hot.capacity and not (as_is and shard_here):
                # CPU: the tier adopts views of the fresh wire bytes (nobody else writes them), no copy. Not when
                # a shard is on this node: its object will hold these same bytes in the same memory (a get reads
                # them there, as ``_adopt`` says); until it does, the store queue serves them. Keeping them too
                # cost memory twice and a put its time on this VM (first-touch faults of the memory kept)
                self.hot.put(block, wire_buffers(wire) if as_is else None)
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
            todo = failed
            if self.store.closed:  # the client is closing: no retry, no call that could outlive its close
                break
            self._refresh_shards()
        if failed:
            lost = [puts[i] for i in todo]
            for p in lost:  # not stored: this process must not serve it (unless a newer put of the key is queued)
                if self.store.pending(p.key) is p or self.store.pending(p.key) is None:
                    self.hot.delete(p.key)
            with self._lock:
                self._failed += [p.key for p in lost]
        if self.cold is not None and not self.store.closed:
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
