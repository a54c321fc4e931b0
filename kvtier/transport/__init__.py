"""Moving serialized KV blocks from a prefill worker to a decode worker.

Two transports behind one interface (``base.Transport``):

* ``ObjectStoreTransport`` (``object_store``) — ``ray.put`` of each block's bytes;
  the descriptor carries the ObjectRefs. Always available inside Ray; one copy
  into plasma on the source, zero-copy ``ray.get`` on the same node; freed as
  soon as the sink has pulled and dropped the blocks.
* ``NixlTransport`` (``nixl``) — the source registers the Arrow buffers
  themselves with a NIXL agent (UCX backend, DRAM); the sink READs all blocks of
  a handoff in one transfer, whose notification tells the source to deregister.
  Zero copies on the source.

``make_transport`` picks one (``"nixl"``, ``"object_store"`` or ``"auto"``: NIXL if
it imports and an agent starts). ``pull`` fetches and verifies a handoff: every
block goes through ``Block.from_arrow(buf, expect_key=key)``, so a truncated,
corrupted or swapped block, a dead source or a timeout is a miss (``None``),
never data. Imports go one way: this file -> ``object_store``, ``nixl`` -> ``base``.

Nothing here knows of models, tiers or HTTP, and nothing pickles a block. It
lives in ``kvtier`` (it was ``ray_apps.transport``) because its user is to be the
vLLM connector's prefill/decode handoff (``kvtier.vllm``, issue 12: not wired yet),
and the library never imports the apps built on it.
"""

from __future__ import annotations

import logging
from typing import Any

from kvtier.block import Block
from kvtier.errors import BlockFormatError, TierUnavailableError
from kvtier.transport.base import DEFAULT_LEASE_S, MAX_HANDOFF_BLOCKS, TRANSPORTS, Transport
from kvtier.transport.object_store import ObjectStoreTransport

log = logging.getLogger(__name__)

__all__ = ["Transport", "ObjectStoreTransport", "make_transport", "pull", "TRANSPORTS", "DEFAULT_LEASE_S",
           "MAX_HANDOFF_BLOCKS"]


def make_transport(kind: str = "auto", *, host: str = "127.0.0.1", lease_s: float = DEFAULT_LEASE_S) -> Transport:
    """``"nixl"`` (raises TierUnavailableError if NIXL cannot start), ``"object_store"``,
    or ``"auto"``: NIXL if it imports and an agent starts, else the object store."""
    if kind not in TRANSPORTS:
        raise ValueError(f"transport={kind!r} is not one of {list(TRANSPORTS)}")
    if kind == "object_store":
        return ObjectStoreTransport(lease_s)
    from kvtier.transport import nixl  # imports nixl_cu13 only when asked for

    try:
        return nixl.NixlTransport(host=host, lease_s=lease_s)
    except TierUnavailableError as e:
        if kind == "nixl":
            raise
        log.info("transport=auto: using the Ray object store (%s)", e)
        return ObjectStoreTransport(lease_s)


def pull(transport: Transport, desc: dict[str, Any], timeout_s: float = 10.0) -> list[Block | None]:
    """Fetch and verify every block of a handoff; a block that cannot be fetched
    or fails verification (checksum, truncation, wrong key) is ``None``.

    An object-store descriptor can be pulled with any transport (it needs only
    Ray); a NIXL descriptor needs a ``NixlTransport`` sink, else all misses. An object-store
    descriptor is consumed: its refs are dropped once fetched (pull it once)."""
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
