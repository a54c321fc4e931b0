"""Moving serialized KV blocks from a prefill worker to a decode worker.

The prefill side *publishes* a handoff of blocks (their Arrow IPC bytes,
``Block.to_arrow()``) and gets back a small descriptor: a dict that travels to
the decode side with the request (through a Ray call). The decode side *pulls*
the bytes named by the descriptor and verifies every block with
``Block.from_arrow(buf, expect_key=key)``: a truncated, corrupted or swapped
block, a dead source or a timeout is a miss (``None``), never data.

Two transports behind one interface (``Transport``):

* ``ObjectStoreTransport`` — ``ray.put`` of each block's bytes; the descriptor
  carries the ObjectRefs. Always available inside Ray; one copy into plasma on
  the source, zero-copy ``ray.get`` on the same node.
* ``NixlTransport`` (``ray_apps.nixl_transport``) — the source registers the Arrow buffers themselves with a
  NIXL agent (UCX backend, DRAM) and publishes (agent name, listener host/port,
  addr, len, key); the sink loads the source agent's metadata through the
  NIXL listener thread, READs all blocks of the handoff into one registered
  buffer of its own in a single transfer, and the READ's notification tells the
  source to deregister. Zero copies on the source.

Every handoff is a *lease*: the source holds the buffers (and, for NIXL, the
registration) until the sink reports it pulled them or ``lease_s`` passes, so
a decode worker that dies never leaks memory on the prefill worker. The choice
of transport is a config value: ``"nixl"``, ``"object_store"`` or ``"auto"``
(NIXL if it imports and an agent starts, else the object store).

This module knows nothing of models, tiers or HTTP. It never pickles a block:
the bytes are Arrow IPC, and the descriptor is plain JSON-able data (plus
ObjectRefs for the object-store path).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from kvtier.block import MAX_BLOCK_BYTES, Block
from kvtier.errors import BlockFormatError, TierUnavailableError

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "nixl", "object_store")
DEFAULT_LEASE_S = 30.0  # a handoff is pulled within ~1 s of prefill; 30 s covers a queued decode
MAX_HANDOFF_BLOCKS = 4096  # 4096 chunks x 256 tokens = 1M tokens of context
_ALIGN = 64  # receive offsets aligned like Arrow buffers, so parsed payloads stay zero-copy


class Transport(ABC):
    """One way to move a handoff of blocks from a source process to a sink process.

    ``publish`` (source) returns a descriptor; ``fetch_raw`` (sink) returns the
    bytes of each block or ``None`` for each one it could not get; ``release``
    (source) frees a lease early. Verification lives in ``pull``, not here.
    """

    name: str = ""

    def __init__(self, lease_s: float = DEFAULT_LEASE_S) -> None:
        if not (isinstance(lease_s, (int, float)) and lease_s > 0):
            raise ValueError(f"lease_s={lease_s!r} must be a positive number of seconds")
        self.lease_s = float(lease_s)
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[float, Any]] = {}  # lease id -> (deadline, what it keeps alive)
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()  # set by publish: the reaper switches to busy polling at once
        self.counters = {"published_blocks": 0, "published_bytes": 0, "pulled_blocks": 0, "pulled_bytes": 0,
                         "missed_blocks": 0, "corrupt_blocks": 0, "expired_leases": 0, "released_leases": 0}

    @abstractmethod
    def publish(self, items: Sequence[tuple[str, Any]], lease_s: float | None = None) -> dict[str, Any]:
        """Make (key, Arrow bytes) pairs pullable for ``lease_s`` (default: the
        transport's); returns the descriptor."""

    @abstractmethod
    def fetch_raw(self, desc: dict[str, Any], timeout_s: float) -> list[pa.Buffer | None]:
        """The bytes of each block named in ``desc`` (None where unavailable)."""

    def release(self, lease: str) -> bool:
        """Free a lease now; False if it was unknown (already released or expired)."""
        with self._lock:
            item = self._leases.pop(lease, None)
        if item is None:
            return False
        self._free(item[1])
        self.counters["released_leases"] += 1
        return True

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        with self._lock:
            items, self._leases = list(self._leases.values()), {}
        for _, kept in items:
            self._free(kept)

    def stats(self) -> dict[str, Any]:
        self.reap()
        return {"transport": self.name, "open_leases": self.open_leases(), **self.counters}

    def open_leases(self) -> int:
        with self._lock:
            return len(self._leases)

    # ---- lease bookkeeping shared by both transports -------------------
    def _free(self, kept: Any) -> None:
        """Hook: release what a lease kept alive (a NIXL registration)."""

    def _add_lease(self, kept: Any, lease_s: float | None = None) -> str:
        lease_s = self.lease_s if lease_s is None else lease_s
        if not (isinstance(lease_s, (int, float)) and lease_s > 0):
            raise ValueError(f"lease_s={lease_s!r} must be a positive number of seconds")
        lease = uuid.uuid4().hex
        with self._lock:
            self._leases[lease] = (time.monotonic() + lease_s, kept)
        self._start_reaper()
        self._wake.set()
        return lease

    def reap(self) -> int:
        """Free expired leases; returns how many."""
        now = time.monotonic()
        with self._lock:
            dead = [k for k, (deadline, _) in self._leases.items() if deadline <= now]
            items = [self._leases.pop(k)[1] for k in dead]
        for kept in items:
            self._free(kept)
        self.counters["expired_leases"] += len(items)
        return len(items)

    def _start_reaper(self) -> None:
        # A daemon thread, so an idle prefill worker still frees leases the decode side never pulled.
        if self._reaper is not None:
            return
        period = min(1.0, self.lease_s / 4)

        def loop() -> None:
            while not self._closed.is_set():
                self._wake.wait(self._busy_poll_s if self._leases else period)
                self._wake.clear()
                try:
                    self._poll()
                    self.reap()
                except Exception:  # never let the reaper die silently
                    log.exception("kvtier transfer reaper failed; retrying in %.1f s", period)

        self._reaper = threading.Thread(target=loop, name=f"kvtier-{self.name}-reaper", daemon=True)
        self._reaper.start()

    _busy_poll_s = 1.0  # poll period while leases are open (NIXL needs its source to make progress)

    def _poll(self) -> None:
        """Hook: learn about finished pulls (NIXL notifications)."""


def _check_items(items: Sequence[tuple[str, Any]]) -> list[tuple[str, pa.Buffer]]:
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"items must be a non-empty list of (key, bytes) pairs, got {type(items).__name__}")
    if len(items) > MAX_HANDOFF_BLOCKS:
        raise ValueError(f"a handoff of {len(items)} blocks exceeds the maximum of {MAX_HANDOFF_BLOCKS}")
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"items[{i}] must be a (key, bytes) pair, got {item!r:.80}")
        buf = item[1] if isinstance(item[1], pa.Buffer) else pa.py_buffer(item[1])
        if not 0 < buf.size <= MAX_BLOCK_BYTES + (1 << 20):
            raise ValueError(f"items[{i}] ({item[0]!r}) has {buf.size} bytes; expected 1..{MAX_BLOCK_BYTES} plus header")
        out.append((item[0], buf))
    return out


def _check_desc(desc: Any, transport: str) -> list[dict[str, Any]]:
    """The block entries of a descriptor, validated (it came from another process)."""
    if not isinstance(desc, dict) or desc.get("transport") != transport:
        raise ValueError(f"not a {transport} descriptor: {str(desc)[:120]}")
    blocks = desc.get("blocks")
    if not isinstance(blocks, list) or not 0 < len(blocks) <= MAX_HANDOFF_BLOCKS:
        raise ValueError(f"descriptor blocks must be a list of 1..{MAX_HANDOFF_BLOCKS} entries")
    for b in blocks:
        n = b.get("len") if isinstance(b, dict) else None
        if not (isinstance(b, dict) and isinstance(b.get("key"), str) and isinstance(n, int)
                and 0 < n <= MAX_BLOCK_BYTES + (1 << 20)):
            raise ValueError(f"bad descriptor block entry {str(b)[:120]}")
    return blocks


# ---- Ray object store -------------------------------------------------------
class ObjectStoreTransport(Transport):
    """Blocks as Ray objects; needs a connected Ray (any worker or driver)."""

    name = "object_store"

    def publish(self, items: Sequence[tuple[str, Any]], lease_s: float | None = None) -> dict[str, Any]:
        import ray

        checked = _check_items(items)
        # uint8 arrays travel out-of-band (no pickling of the bytes) and come back zero-copy
        refs = [ray.put(np.frombuffer(buf, dtype=np.uint8)) for _, buf in checked]
        lease = self._add_lease(refs, lease_s)  # hold the refs: the owner keeps the objects alive until then
        self.counters["published_blocks"] += len(checked)
        self.counters["published_bytes"] += sum(b.size for _, b in checked)
        return {"transport": self.name, "lease": lease, "refs": refs,
                "blocks": [{"key": k, "len": b.size} for k, b in checked]}

    def fetch_raw(self, desc: dict[str, Any], timeout_s: float) -> list[pa.Buffer | None]:
        import ray

        blocks = _check_desc(desc, self.name)
        refs = desc.get("refs")
        if not isinstance(refs, list) or len(refs) != len(blocks) or not all(isinstance(r, ray.ObjectRef) for r in refs):
            raise ValueError("object_store descriptor needs one ObjectRef per block")
        deadline = time.monotonic() + timeout_s
        try:
            arrays = ray.get(refs, timeout=timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:
            # some may still be gettable (one lost object, others fine): try each in the time left
            log.warning("object store pull of %d blocks failed (%s); retrying one by one", len(refs), type(e).__name__)
            arrays = []
            for r in refs:
                try:
                    arrays.append(ray.get(r, timeout=max(0.01, deadline - time.monotonic())))
                except (ray.exceptions.RayError, TimeoutError):
                    arrays.append(None)
        out: list[pa.Buffer | None] = []
        for b, a in zip(blocks, arrays):
            ok = isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 1
            out.append(pa.py_buffer(a) if ok else None)
        return out


# ---- choice and verification ------------------------------------------------
def make_transport(kind: str = "auto", *, host: str = "127.0.0.1", lease_s: float = DEFAULT_LEASE_S) -> Transport:
    """``"nixl"`` (raises TierUnavailableError if NIXL cannot start), ``"object_store"``,
    or ``"auto"``: NIXL if it imports and an agent starts, else the object store."""
    if kind not in TRANSPORTS:
        raise ValueError(f"transport={kind!r} is not one of {list(TRANSPORTS)}")
    if kind == "object_store":
        return ObjectStoreTransport(lease_s)
    from ray_apps import nixl_transport  # imports nixl_cu13 only when asked for

    try:
        return nixl_transport.NixlTransport(host=host, lease_s=lease_s)
    except TierUnavailableError as e:
        if kind == "nixl":
            raise
        log.info("transport=auto: using the Ray object store (%s)", e)
        return ObjectStoreTransport(lease_s)


def pull(transport: Transport, desc: dict[str, Any], timeout_s: float = 10.0) -> list[Block | None]:
    """Fetch and verify every block of a handoff; a block that cannot be fetched
    or fails verification (checksum, truncation, wrong key) is ``None``.

    An object-store descriptor can be pulled with any transport (it needs only
    Ray); a NIXL descriptor needs a ``NixlTransport`` sink, else all misses."""
    kind = desc.get("transport") if isinstance(desc, dict) else None
    blocks = desc.get("blocks") if isinstance(desc, dict) else None
    n = len(blocks) if isinstance(blocks, list) else 0
    sink = transport
    if kind == "object_store" and not isinstance(transport, ObjectStoreTransport):
        sink = ObjectStoreTransport(transport.lease_s)
    elif kind != transport.name:
        log.warning("cannot pull a %r handoff with a %s transport: %d misses", kind, transport.name, n)
        transport.counters["missed_blocks"] += n
        return [None] * n
    try:
        raw = sink.fetch_raw(desc, timeout_s)
    except ValueError as e:
        log.warning("rejected handoff descriptor: %s", e)
        transport.counters["missed_blocks"] += n
        return [None] * n
    out: list[Block | None] = []
    for entry, buf in zip(blocks, raw):
        if buf is None:
            transport.counters["missed_blocks"] += 1
            out.append(None)
            continue
        try:
            if buf.size != entry["len"]:
                raise BlockFormatError(f"got {buf.size} bytes, descriptor says {entry['len']}")
            block = Block.from_arrow(buf, expect_key=entry["key"])
        except BlockFormatError as e:
            log.warning("handoff block %s is corrupt, treated as a miss: %s", entry["key"][:16], e)
            transport.counters["corrupt_blocks"] += 1
            out.append(None)
            continue
        transport.counters["pulled_blocks"] += 1
        transport.counters["pulled_bytes"] += buf.size
        out.append(block)
    return out
