"""A payload checksum a GPU computes where the bytes already are: two lanes of a position-weighted word sum.

A buffer of ``n`` bytes is read as little-endian 32-bit words ``w_i`` (the
last one zero-padded). Each lane ``k`` is ``sum_i w_i * M_k(i) mod 2**64``,
where ``M_k(i)`` is an odd 64-bit multiplier drawn from the word's position by
a splitmix-style mixer with the lane's seed. Equivalently byte ``j``
contributes ``b_j * (M_k(j >> 2) << 8 * (j & 3))`` (the torch reference sums
it that way), so any chunk of a buffer can be summed on its own and the
partial sums added (mod 2**64); the kernel reads whole words (one mix per
word, not per byte) and the last 1-3 bytes one at a time. A single flipped bit changes a lane by an odd multiple
of a power of two below 2**32: never zero mod 2**64, so always detected;
other corruption (a zeroed or truncated range, swapped words, another
block's bytes) escapes both lanes with probability about 2**-128 for data
that is not built against the multipliers. It is not a cryptographic digest
(neither is the XXH3 every block also carries): it guards against faults,
not against someone who can write the store.

Why not XXH3 on the GPU: XXH3 is a serial stripe mix; this sum is one
multiply-add per byte in any order, i.e. a read at memory bandwidth on the
device after the host-to-device copy (the host then copies bytes once, from
the object store straight to the GPU, and hashes nothing).

Here: the torch reference (``sums_torch``, any device, used on the CPU and by
the tests), the Triton kernel over a table of (address, length, offset)
chunks of any number of buffers (``sums_triton``: one launch for a run of
blocks), and ``to_hex``. Bit-identical (tests/kernels/test_wsum.py, under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

ALGO = "wsum64x2"
SEEDS = (0x2545F4914F6CDD1D, 0x1B873593CC9E2D51)  # below 2**63: plain int64 constants everywhere
_C0, _C1, _C2 = 0x1E3779B97F4A7C15, 0x3F58476D1CE4E5B9, 0x14D049BB133111EB
CHUNK = 256 << 10  # bytes per program of the kernel (one row of the table)
_BLOCK = 4096
_M64 = (1 << 64) - 1


def to_hex(lanes: tuple[int, int]) -> str:
    return "".join(f"{int(v) & _M64:016x}" for v in lanes)


# ---- torch reference ------------------------------------------------------------------------------
def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _s64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _mult_torch(w: torch.Tensor, seed: int) -> torch.Tensor:
    z = w * _C0 + seed  # int64 arithmetic wraps mod 2**64
    z = (z ^ _srl(z, 31)) * _C1
    z = (z ^ _srl(z, 29)) * _C2
    return (z ^ _srl(z, 32)) | 1


def sums_torch(buf: torch.Tensor, start: int = 0, step: int = 1 << 22) -> tuple[int, int]:
    """The two lanes of a uint8 tensor's bytes (``start``: the byte offset of ``buf`` in its buffer, for a
    partial sum), as Python ints mod 2**64."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"sums_torch takes a 1-D uint8 tensor, got {buf.dtype} of shape {tuple(buf.shape)}")
    acc = [0, 0]
    for a in range(0, buf.numel(), step):
        b = buf[a:a + step].to(torch.int64)
        j = torch.arange(start + a, start + a + b.numel(), dtype=torch.int64, device=buf.device)
        shift = (j & 3) * 8
        for k, seed in enumerate(SEEDS):
            m = _mult_torch(j >> 2, seed) << shift
            acc[k] = (acc[k] + int((b * m).sum())) & _M64
    return acc[0], acc[1]


# ---- Triton ---------------------------------------------------------------------------------------
@triton.jit
def _mult(w, seed):
    z = w * 0x1E3779B97F4A7C15 + seed
    z = (z ^ (z >> 31)) * 0x3F58476D1CE4E5B9
    z = (z ^ (z >> 29)) * 0x14D049BB133111EB
    return (z ^ (z >> 32)) | 1


@triton.jit
def _wsum_kernel(rows_ptr, out_ptr, S0: tl.constexpr, S1: tl.constexpr, CH: tl.constexpr, BLOCK: tl.constexpr):
    # one row: ``n`` bytes at ``addr`` (4-byte aligned), byte ``j0`` (a multiple of 4) of its buffer; whole
    # words as uint32 loads, the last 1-3 bytes (only a buffer's last row has them) one at a time
    pid = tl.program_id(0)
    addr = tl.load(rows_ptr + pid * 3)
    n = tl.load(rows_ptr + pid * 3 + 1)
    w0 = (tl.load(rows_ptr + pid * 3 + 2) // 4).to(tl.uint64)
    words = addr.to(tl.pointer_type(tl.uint32), bitcast=True)
    nw = n // 4
    acc0 = tl.zeros([BLOCK], dtype=tl.uint64)
    acc1 = tl.zeros([BLOCK], dtype=tl.uint64)
    for i in range(0, CH // 4, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        w = tl.load(words + offs, mask=offs < nw, other=0).to(tl.uint64)
        idx = w0 + offs.to(tl.uint64)
        acc0 += w * _mult(idx, S0)
        acc1 += w * _mult(idx, S1)
    k = tl.arange(0, 4)
    tb = tl.load(addr.to(tl.pointer_type(tl.uint8), bitcast=True) + nw * 4 + k, mask=k < n - nw * 4, other=0)
    tw = tl.sum(tb.to(tl.uint64) << (k.to(tl.uint64) * 8), 0)
    ti = w0 + nw.to(tl.uint64)
    tail0 = tw * _mult(ti, S0)
    tail1 = tw * _mult(ti, S1)
    tl.store(out_ptr + pid * 2, (tl.sum(acc0, 0) + tail0).to(tl.int64, bitcast=True))
    tl.store(out_ptr + pid * 2 + 1, (tl.sum(acc1, 0) + tail1).to(tl.int64, bitcast=True))


def plan(spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's table for buffers at (device address, bytes): rows of (address, length, offset in the
    buffer) of at most ``CHUNK`` bytes, and each row's buffer index (int64 arrays). Vectorized: a loop of
    numpy calls per buffer cost ~2 ms for the 189 buffers of a 16K-token rot4 get (H200 host)."""
    if not spans:
        return np.zeros((0, 3), np.int64), np.zeros(0, np.int64)
    addr, size = np.array(spans, dtype=np.int64).reshape(-1, 2).T
    n = -(-size // CHUNK)
    seg = np.repeat(np.arange(len(spans), dtype=np.int64), n)
    j0 = (np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)) * CHUNK
    return np.stack([addr[seg] + j0, np.minimum(CHUNK, size[seg] - j0), j0], axis=1), seg


def sums_triton(spans: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """[len(spans), 2] int64 lanes of the buffers at (address, bytes) in ``device`` memory, computed on the
    current stream with one kernel launch (the result stays on the device: nothing waits for it here).
    The caller keeps the buffers alive until that stream has run it."""
    if any(addr % 4 for addr, _ in spans):
        raise ValueError(f"sums_triton reads 32-bit words: buffer addresses must be 4-byte aligned, got "
                         f"{[hex(a) for a, _ in spans if a % 4][:3]}")
    rows, seg = plan(spans)
    out = torch.zeros((len(spans), 2), dtype=torch.int64, device=device)
    if len(rows):
        # one pinned, async copy of both: a pageable copy would wait for the whole stream's work
        both = torch.from_numpy(np.concatenate([rows.reshape(-1), seg]))
        if device.type == "cuda":
            both = both.pin_memory().to(device, non_blocking=True)
        table, seg_t = both[:rows.size].view(-1, 3), both[rows.size:]
        part = torch.empty((len(rows), 2), dtype=torch.int64, device=device)
        _wsum_kernel[(len(rows),)](table, part, S0=SEEDS[0], S1=SEEDS[1], CH=CHUNK, BLOCK=_BLOCK)
        out.index_add_(0, seg_t, part)
    return out


def hex_sums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each tensor's bytes' lanes in hex (what a block's ``sums`` holds): one launch on CUDA (the tensors
    on one device), the torch reference elsewhere."""
    flat = {n: t.detach().contiguous().reshape(-1).view(torch.uint8) for n, t in tensors.items()}
    flat = {n: t.clone() if t.data_ptr() % 16 else t for n, t in flat.items()}  # the kernel reads aligned words
    devs = {t.device for t in flat.values()}
    if len(devs) == 1 and next(iter(devs)).type == "cuda":
        names = list(flat)
        got = sums_triton([(flat[n].data_ptr(), flat[n].numel()) for n in names], next(iter(devs))).tolist()
        return {n: to_hex(tuple(g)) for n, g in zip(names, got)}
    return {n: to_hex(sums_torch(t.cpu())) for n, t in flat.items()}
