"""Shared-memory pages the GPU may read directly: object-store memory registered with CUDA once.

A warm block's bytes arrive as a zero-copy view of the Ray object store (a
``/dev/shm`` file every process on the node maps). Copying them into pinned
staging before the host-to-device copy is what bounds the warm `none` load on
the H200: 16 threads copy pageable to pinned at 46.5 GB/s there, below the
55 GB/s of pinned H2D (request h10-s3-1). Registered pages need no staging copy:
the H2D copy reads the object itself.

``direct(array)`` says whether ``array``'s bytes lie in registered memory,
registering first what they touch: aligned 64 MiB windows (clamped to the
mapping) of a mapping whose file is under ``/dev/shm``, each registered once
per process (``cudaHostRegister``) and kept until the process ends; the mapping
of the object store lives as long as the process. Memory of any other kind
(the heap, a file elsewhere) is never registered: a registration outliving an
``munmap`` would keep the pages locked.

Who may rely on it: the load pipeline, and only while it holds a reference to
the object (an object in the store is immutable while referenced; once freed
its memory may hold another object), so it waits for such copies to finish
before it returns. Off unless ``KVTIER_LOAD_DIRECT=1`` (not yet measured on
the real tier). Not here: the copies themselves (``pipeline``).
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_right

import numpy as np

WINDOW = 64 << 20
ENABLED = os.environ.get("KVTIER_LOAD_DIRECT", "0") == "1"
_lock = threading.Lock()
_done: set[int] = set()  # window start addresses registered
_refused: set[int] = set()  # windows that may not or could not be registered
_maps: list[tuple[int, int, str]] = []  # (start, end, path) of this process's mappings, sorted


def direct(a: np.ndarray) -> bool:
    """True if the GPU can read all of ``a``'s bytes directly (registering them on first use)."""
    n = a.nbytes
    if not ENABLED or n == 0:
        return False
    ptr = a.__array_interface__["data"][0]
    first, last = ptr // WINDOW * WINDOW, (ptr + n - 1) // WINDOW * WINDOW
    wins = range(first, last + WINDOW, WINDOW)
    if all(w in _done for w in wins):
        return True
    with _lock:
        return all(_register(w, ptr, n) for w in wins)


def _register(w: int, ptr: int, n: int) -> bool:
    if w in _done:
        return True
    if w in _refused:
        return False
    m = _mapping(ptr) or _mapping(ptr, reread=True)
    if m is None or not m[2].startswith("/dev/shm/") or ptr + n > m[1]:
        _refused.add(w)
        return False
    lo, hi = max(w, m[0]), min(w + WINDOW, m[1])
    import torch

    err = torch.cuda.cudart().cudaHostRegister(lo, hi - lo, 0)
    if int(err) != 0:  # e.g. already registered by someone else, or no memory to lock: staged instead
        _refused.add(w)
        return False
    _done.add(w)
    return True


def _mapping(ptr: int, reread: bool = False) -> tuple[int, int, str] | None:
    global _maps
    if reread or not _maps:
        rows = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                rows.append((lo, hi, parts[5].strip() if len(parts) > 5 else ""))
        _maps = sorted(rows)
    i = bisect_right(_maps, (ptr, float("inf"), "")) - 1
    if i >= 0 and _maps[i][0] <= ptr < _maps[i][1]:
        return _maps[i]
    return None
