"""kvtier.tiers.host_pages: which host ranges a GPU copy reads as pinned memory. The registration itself needs
CUDA (tests/kvtier/test_pipeline.py and test_device_rule.py on the GPU machine); here the mapping lookup and
the window arithmetic, on real mappings."""

import ctypes
import mmap
import os
import tempfile

import numpy as np

from kvtier.tiers import host_pages
from kvtier.tiers.host_pages import WINDOW, HostPages, split, windows


def test_a_shared_mapping_of_a_plasma_file_is_found_and_others_are_not():
    fd, path = tempfile.mkstemp(prefix="plasma-kvtier-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.ftruncate(fd, 1 << 20)
        m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        found = host_pages._plasma_mappings()
        assert any(lo <= addr < hi and hi - lo >= 1 << 20 for lo, hi in found)
        heap = np.ones(1 << 20, dtype=np.uint8)
        assert not any(lo <= heap.ctypes.data < hi for lo, hi in found), "ordinary memory is never registered"
        assert HostPages(enabled=True).pieces(heap.ctypes.data, heap.nbytes) is None
        assert HostPages(enabled=False).pieces(addr, 4096) is None
        del addr
        m.close()
    finally:
        os.close(fd)
        os.unlink(path)


def test_ranges_are_cut_at_window_boundaries_inside_the_mapping():
    lo, hi = 1 << 40, (1 << 40) + 2 * WINDOW + 4096
    assert windows((lo, hi), lo + 10, 100) == [(lo, lo + WINDOW)]
    ws = windows((lo, hi), lo + WINDOW - 8, WINDOW + 16)
    assert ws == [(lo, lo + WINDOW), (lo + WINDOW, lo + 2 * WINDOW), (lo + 2 * WINDOW, hi)]
    got = split((lo, hi), lo + WINDOW - 8, WINDOW + 16)
    assert got == [(lo + WINDOW - 8, 8, 0), (lo + WINDOW, WINDOW, 8), (lo + 2 * WINDOW, 8, WINDOW + 8)]
    assert sum(n for _, n, _ in got) == WINDOW + 16


def test_copy_async_declines_without_a_cuda_runtime_and_copies_with_one():
    import torch

    if not torch.cuda.is_available():
        assert host_pages.copy_async(0, 0, 16, 0) is False  # no libcudart loaded: the caller copies with torch
        return
    src = torch.arange(256, dtype=torch.uint8).pin_memory()
    dst = torch.zeros(256, dtype=torch.uint8, device="cuda")
    s = torch.cuda.current_stream()
    assert host_pages.copy_async(dst.data_ptr(), src.data_ptr(), 256, s.cuda_stream) is True
    s.synchronize()
    assert torch.equal(dst.cpu(), src)
