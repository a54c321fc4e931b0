"""The transport interface: a lease-keeping ``Transport`` base and descriptor checks.

A *handoff* moves serialized blocks (their Arrow IPC bytes, ``Block.to_arrow()``)
from a prefill process to a decode process. The source ``publish``es them and
gets a small descriptor (JSON-able, plus ObjectRefs for the object store) that
travels with the request; the sink ``fetch_raw``s the bytes it names.
Verification is not here (``kvtier.transport.pull``).

A transport that must keep memory alive on the source for the sink (a NIXL
registration) does so under a *lease*: freed when the sink says it pulled, or
when ``lease_s`` passes, so a sink that dies never leaks memory on the source.

This module imports nothing of the package: ``object_store`` and ``nixl``
import it, and ``kvtier.transport`` (``__init__``) imports those.
"""


from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from typing import Any, Sequence

import pyarrow as pa

from kvtier.block import MAX_BLOCK_BYTES

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


