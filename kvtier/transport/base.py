"""The per-handoff transport interface: a ``Transport`` base and descriptor checks.

A *handoff* moves serialized blocks (their Arrow IPC bytes, ``Block.to_arrow()``)
from a prefill process to a decode process. The source ``publish``es them and
gets a small descriptor (JSON-able, plus ObjectRefs for the object store) that
travels with the request; the sink ``fetch_raw``s the bytes it names.
Verification is not here (``kvtier.transport.pull``).

The NIXL path is not a ``Transport``: one long-lived registered ring per
process (``arena.py``) replaced the per-handoff registration, whose metadata
fetch cost ~102 ms of a 118-129 ms pull here (bench/results/handoff-cpu.md, the
previous run), and with it the leases that freed such registrations.

This module imports nothing of the package: ``object_store`` imports it, and
``kvtier.transport`` (``__init__``) imports that.
"""


from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import pyarrow as pa

from kvtier.block import MAX_BLOCK_BYTES

MAX_HANDOFF_BLOCKS = 4096  # 4096 chunks x 256 tokens = 1M tokens of context
_ALIGN = 64  # receive offsets aligned like Arrow buffers, so parsed payloads stay zero-copy


class Transport(ABC):
    """One way to move a handoff of blocks from a source process to a sink process.

    ``publish`` (source) returns a descriptor; ``fetch_raw`` (sink) returns the
    bytes of each block or ``None`` for each one it could not get. Verification
    lives in ``pull``, not here.
    """

    name: str = ""

    def __init__(self) -> None:
        self.counters = {"published_blocks": 0, "published_bytes": 0, "pulled_blocks": 0, "pulled_bytes": 0,
                         "missed_blocks": 0, "corrupt_blocks": 0}

    @abstractmethod
    def publish(self, items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
        """Make (key, Arrow bytes) pairs pullable; returns the descriptor."""

    @abstractmethod
    def fetch_raw(self, desc: dict[str, Any], timeout_s: float) -> list[pa.Buffer | None]:
        """The bytes of each block named in ``desc`` (None where unavailable)."""

    def stats(self) -> dict[str, Any]:
        return {"transport": self.name, **self.counters}


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


