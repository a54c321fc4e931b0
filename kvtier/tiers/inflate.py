"""Inflating a ``+zstd`` block's payload without holding the GIL, into memory the caller owns.

The load pipeline inflates ``+zstd`` blocks in its pool threads. python-zstandard
(0.25) holds the GIL while it decompresses, so 16 threads inflated one block at
a time: a warm 16K-token q1+zstd hit (63 blocks, 1 GB) spent 1.59 s in the
load on the H200, 25 ms per block back to back. Here ``ZSTD_decompress`` of
the system's libzstd is called through ctypes, which releases the GIL for the
call, straight into a fresh tensor (no ``bytes`` object, no second copy). Where
no libzstd can be loaded, ``kvtier.codecs``' own zstandard path is used.

The checks are those of ``kvtier.codecs._zstd_decompress``: the sizes the
header claims must match the buffers and stay within 2x the raw chunk (+1 MiB),
and every buffer must inflate to exactly its claimed size; anything else is a
``BlockFormatError`` (a corrupt block, a miss), never partial data.

Not here: compression (``kvtier.codecs``), checksums (``kvtier.block``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any, Mapping

import numpy as np
import torch

from kvtier.codecs import _zstd_decompress
from kvtier.errors import BlockFormatError

_lock = threading.Lock()
_lib: list = []  # [ctypes.CDLL | None] once looked up


def libzstd():
    """The system's libzstd through ctypes, or None if there is none (then zstandard is used)."""
    with _lock:
        if not _lib:
            lib = None
            for name in filter(None, (ctypes.util.find_library("zstd"), "libzstd.so.1")):
                try:
                    lib = ctypes.CDLL(name)
                    lib.ZSTD_decompress.restype = ctypes.c_size_t
                    lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
                    lib.ZSTD_isError.restype = ctypes.c_uint
                    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
                    lib.ZSTD_getErrorName.restype = ctypes.c_char_p
                    lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
                    break
                except (OSError, AttributeError):
                    lib = None
            _lib.append(lib)
        return _lib[0]


def inflate(buffers: Mapping[str, Any], sizes: Any, raw_nbytes: int) -> dict[str, torch.Tensor]:
    """Each compressed buffer inflated into a new uint8 CPU tensor of its claimed size."""
    lib = libzstd()
    if lib is None:
        return {n: _owned_bytes(b) for n, b in _zstd_decompress(buffers, sizes, raw_nbytes).items()}
    if not isinstance(sizes, dict) or set(sizes) != set(buffers):
        raise BlockFormatError(f"corrupt +zstd block: buffer sizes {sizes!r} do not match buffers {sorted(buffers)}")
    out = {}
    for name, b in buffers.items():
        n = sizes[name]
        # a codec never stores more than ~2x the raw chunk (fp32 scales of tiny groups); refuse more
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 2 * raw_nbytes + (1 << 20):
            raise BlockFormatError(f"corrupt +zstd block: buffer {name!r} claims {n!r} bytes for a {raw_nbytes}-byte chunk")
        src = np.frombuffer(b, dtype=np.uint8) if memoryview(b).nbytes else np.empty(0, dtype=np.uint8)
        dst = torch.empty(n, dtype=torch.uint8)
        if not src.nbytes:
            raise BlockFormatError(f"corrupt +zstd block: buffer {name!r} is empty, not a zstd frame")
        got = lib.ZSTD_decompress(dst.data_ptr() if n else None, n, src.ctypes.data, src.nbytes)  # GIL released
        if lib.ZSTD_isError(got):
            raise BlockFormatError(f"corrupt +zstd block: buffer {name!r}: {lib.ZSTD_getErrorName(got).decode()}")
        if got != n:
            raise BlockFormatError(f"corrupt +zstd block: buffer {name!r} inflated to {got} bytes, expected {n}")
        out[name] = dst
    return out


def _owned_bytes(b: bytes) -> torch.Tensor:
    t = torch.empty(len(b), dtype=torch.uint8)
    if len(b):
        np.copyto(t.numpy(), np.frombuffer(b, dtype=np.uint8))
    return t
