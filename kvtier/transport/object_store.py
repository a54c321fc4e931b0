"""The Ray object-store transport: each block's bytes as one Ray object.

``publish`` ``ray.put``s each block (a uint8 array: out of band, no pickling of
the bytes; one copy into plasma) and returns a descriptor carrying the
ObjectRefs. The source keeps no reference of its own: the objects live exactly
as long as someone holds the descriptor (Ray's reference counting follows the
refs through the Ray calls that carry it), and ``pull`` drops the descriptor's
refs as soon as it has fetched them, so a handoff is freed the moment the sink
is done with the bytes it pulled (zero-copy views of plasma on the same node),
not after a timeout. A sink that dies drops its references with it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from kvtier.transport.base import Transport, _check_desc, _check_items

log = logging.getLogger(__name__)


class ObjectStoreTransport(Transport):
    """Blocks as Ray objects; needs a connected Ray (any worker or driver)."""

    name = "object_store"

    def publish(self, items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
        import ray

        checked = _check_items(items)
        # uint8 arrays travel out-of-band (no pickling of the bytes) and come back zero-copy
        refs = [ray.put(np.frombuffer(buf, dtype=np.uint8)) for _, buf in checked]
        # the descriptor's refs alone keep the objects alive (see the module docstring)
        self.counters["published_blocks"] += len(checked)
        self.counters["published_bytes"] += sum(b.size for _, b in checked)
        return {"transport": self.name, "refs": refs,
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
