"""Moving serialized KV blocks from a prefill worker to a decode worker.

Two ways, both moving the blocks' Arrow IPC bytes (``Block.to_arrow()``) as made once:

* ``Arena`` (``arena``) — NIXL (UCX backend, DRAM; works between CPU processes,
  so it is tested here): one agent and one registered ring of recent handoff
  blocks per process, its endpoint handed to peers once; a pull is one READ of
  the peer's index and one of its blocks. What the vLLM connector's
  prefill/decode handoff uses (``kvtier.vllm.handoff``).
* ``ObjectStoreTransport`` (``object_store``) — ``ray.put`` of each block's
  bytes, a descriptor carrying the ObjectRefs (``base.Transport``); needs only
  Ray. ``pull`` fetches and verifies such a handoff: every block goes through
  ``Block.from_arrow(buf, expect_key=key)``, so a truncated, corrupted or
  swapped block, a dead source or a timeout is a miss (``None``), never data.

Nothing here knows of models, tiers, vLLM or HTTP, and nothing pickles a block.
Imports go one way: this file -> ``object_store`` -> ``base``; ``arena`` imports
only ``base``.
"""

from __future__ import annotations

import logging
from typing import Any

from kvtier.block import Block
from kvtier.errors import BlockFormatError
from kvtier.transport.base import MAX_HANDOFF_BLOCKS, Transport
from kvtier.transport.object_store import ObjectStoreTransport

log = logging.getLogger(__name__)

__all__ = ["Transport", "ObjectStoreTransport", "pull", "MAX_HANDOFF_BLOCKS"]


def pull(transport: Transport, desc: dict[str, Any], timeout_s: float = 10.0) -> list[Block | None]:
    """Fetch and verify every block of a handoff; a block that cannot be fetched
    or fails verification (checksum, truncation, wrong key) is ``None``.

    An object-store descriptor can be pulled with any transport (it needs only Ray); one of
    another kind is all misses. An object-store descriptor is consumed: its refs are dropped
    once fetched (pull it once)."""
    kind = desc.get("transport") if isinstance(desc, dict) else None
    blocks = desc.get("blocks") if isinstance(desc, dict) else None
    n = len(blocks) if isinstance(blocks, list) else 0
    sink = transport
    if kind == "object_store" and not isinstance(transport, ObjectStoreTransport):
        sink = ObjectStoreTransport()
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
    if kind == "object_store":
        # let go of the handoff now: the objects live on only as long as the blocks pulled from them
        desc["refs"] = []
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
