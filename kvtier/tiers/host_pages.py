"""Object-store pages the GPU copies from directly: Ray's plasma mapping, registered with CUDA a window at a time.

A warm block is ``ray.get`` as a zero-copy view of the object store's shared
memory (Ray maps one ``/dev/shm/plasma*`` file into every worker). Copied to
a GPU from there, CUDA stages pageable memory through a driver buffer (8.9
GB/s on the H200 host, against 55 GB/s pinned), so the load used to copy each
block into pinned memory first (and hash it while there). Instead, this
registers the plasma mapping with ``cudaHostRegister`` in windows of
``WINDOW`` bytes as blocks in them are first read, so the host-to-device copy
reads the object's own pages at pinned speed: no host copy at all.

Ownership: registering pins pages that the object store already owns and
counts against the warm budget (``object_store_memory``): nothing new is
allocated, and a window stays registered for the life of the process (the
mapping does too; objects freed and re-allocated inside it are still in
registered pages). At most the whole mapping is ever registered; the first
read of a window pays for registering it (``registered_s``). A range outside
a plasma mapping (a block this process serialized, a fallback allocation),
or a registration CUDA refuses, is ``None``: the loader stages it as before.
``KVTIER_REGISTER_OBJECT_STORE=0`` turns this off.

Copies are split at window boundaries: two registrations side by side are
not promised to serve one copy as pinned memory.
"""

from __future__ import annotations

import os
import threading
import time

WINDOW = 256 << 20
_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered
_RESCAN_S = 1.0  # an address in no known mapping re-reads /proc/self/maps once per load, else this often


def _plasma_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's shared read-write mappings of a Ray plasma file."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or not parts[1].startswith("rw") or parts[1][3] != "s":
                    continue
                if os.path.basename(parts[5].split(" (deleted)")[0].strip()).startswith("plasma"):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return out


def windows(mapping: tuple[int, int], ptr: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the ``WINDOW``-sized windows of ``mapping`` (aligned to its start, the last one cut at
    its end) that ``[ptr, ptr + size)`` touches."""
    lo, hi = mapping
    first, last = (ptr - lo) // WINDOW, (ptr + size - 1 - lo) // WINDOW
    return [(lo + k * WINDOW, min(hi, lo + (k + 1) * WINDOW)) for k in range(first, last + 1)]


def split(mapping: tuple[int, int], ptr: int, size: int) -> list[tuple[int, int, int]]:
    """``[ptr, ptr + size)`` cut at window boundaries: (address, bytes, offset in the range) pieces."""
    return [(max(ptr, w), min(ptr + size, e) - max(ptr, w), max(ptr, w) - ptr) for w, e in windows(mapping, ptr, size)]


class HostPages:
    """Which host ranges a GPU copy can read as pinned memory (registering plasma windows on demand)."""

    def __init__(self, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = os.environ.get("KVTIER_REGISTER_OBJECT_STORE", "1") not in ("0", "false", "no")
        self.enabled = enabled
        self.registered_bytes = 0
        self.registered_s = 0.0
        self.refused = 0
        self._maps: list[tuple[int, int]] = []
        self._scanned = -_RESCAN_S
        self._may_scan = True
        self._windows: set[int] = set()  # start addresses of registered windows
        self._bad: set[tuple[int, int]] = set()  # mappings CUDA refused: never tried again
        self._lock = threading.Lock()

    def new_call(self) -> None:
        """A load begins: one re-read of the mappings is allowed (the object store maps segments as objects
        in them are first read, so a new block can lie in a mapping not seen yet)."""
        self._may_scan = True

    def pieces(self, ptr: int, size: int) -> list[tuple[int, int, int]] | None:
        """``[ptr, ptr + size)`` as (address, bytes, offset in the range) pieces, each inside one registered
        window; ``None`` if any of it is not in a registrable mapping (stage it instead)."""
        if not self.enabled or size <= 0:
            return None
        m = self._mapping(ptr, size)
        if m is None:
            return None
        for w, end in windows(m, ptr, size):
            if w not in self._windows and not self._register(m, w, end):
                return None
        return split(m, ptr, size)

    def _mapping(self, ptr: int, size: int) -> tuple[int, int] | None:
        for lo, hi in self._maps:
            if lo <= ptr and ptr + size <= hi:
                return None if (lo, hi) in self._bad else (lo, hi)
        now = time.monotonic()
        with self._lock:
            if not self._may_scan and now - self._scanned < _RESCAN_S:
                return None
            self._scanned, self._may_scan = now, False
            self._maps = _plasma_mappings()
        for lo, hi in self._maps:
            if lo <= ptr and ptr + size <= hi and (lo, hi) not in self._bad:
                return lo, hi
        return None

    def _register(self, mapping: tuple[int, int], lo: int, hi: int) -> bool:
        import torch

        with self._lock:
            if lo in self._windows:
                return True
            if mapping in self._bad:
                return False
            t0 = time.perf_counter()
            rt = torch.cuda.cudart()
            err = int(rt.cudaHostRegister(lo, hi - lo, 1))  # cudaHostRegisterPortable: pinned for every device
            if err:
                _clear_cuda_error()  # else the next kernel launch check reports it as its own failure
            if err == _ALREADY_REGISTERED:  # by someone else in this process: pinned already (a part of it
                self._windows.add(lo)      # that is not would still copy correctly, only slower)
                return True
            if err:
                self._bad.add(mapping)
                self.refused += 1
                return False
            self._windows.add(lo)
            self.registered_bytes += hi - lo
            self.registered_s += time.perf_counter() - t0
            return True


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error (torch binds no ``cudaGetLastError``)."""
    rt = _cudart()
    if rt is not None:
        rt.cudaGetLastError()


def copy_async(dst: int, src: int, size: int, stream: int) -> bool:
    """``cudaMemcpyAsync`` of ``size`` bytes from host address ``src`` (in registered pages) to device address
    ``dst`` on ``stream`` (a ``torch.cuda.Stream.cuda_stream``), on the current device; False if the runtime
    is not reachable or refused it (the caller copies with torch instead). One ctypes call: torch's
    ``copy_`` of a ``frombuffer`` view cost ~40 us of Python per block (2.8 ms of a 16K-token load, H200)."""
    rt = _cudart()
    if rt is None:
        return False
    if rt.cudaMemcpyAsync(dst, src, size, 1, stream):  # 1: cudaMemcpyHostToDevice
        rt.cudaGetLastError()
        return False
    return True


_RT: list = []


def _cudart():
    """The libcudart this process already loaded (torch's), through ctypes; None if there is none."""
    if not _RT:
        import ctypes

        lib = None
        try:
            with open("/proc/self/maps") as f:
                path = next((ln.split()[-1] for ln in f if "libcudart" in ln and ln.split()[-1].startswith("/")), None)
            if path is not None:
                lib = ctypes.CDLL(path)
                lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                ctypes.c_void_p]
                lib.cudaMemcpyAsync.restype = ctypes.c_int
        except (OSError, AttributeError):
            lib = None
        _RT.append(lib)
    return _RT[0]


_SHARED: HostPages | None = None
_SHARED_LOCK = threading.Lock()


def shared() -> HostPages:
    """This process's registry (registrations are the process's, so every loader shares one)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = HostPages()
        return _SHARED
