"""Where the Triton tests run: the CPU interpreter in CI (tests/conftest.py sets TRITON_INTERPRET=1), the GPU
with compiled kernels when a CUDA machine runs them with TRITON_INTERPRET=0 (the H200 check).

The tests build their inputs and torch references on the CPU; ``tri(fn, *args)`` moves the tensor arguments
of a Triton entry point to ``DEV``, calls it, and brings the result back, so every comparison is the same
on both machines. Not a fixture: a plain helper the test modules import (tests/kernels is on sys.path).
"""

import os

import torch

DEV = torch.device("cuda" if os.environ.get("TRITON_INTERPRET", "1") == "0" and torch.cuda.is_available() else "cpu")


def _move(x, dev):
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, dict):
        return {k: _move(v, dev) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, dev) for v in x)
    return x


def tri(fn, *args):
    """``fn(*args)`` with tensors (also inside dicts, lists, tuples) on ``DEV``; the result on the CPU."""
    return _move(fn(*_move(args, DEV)), torch.device("cpu"))
