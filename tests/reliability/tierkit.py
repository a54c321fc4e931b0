"""Helpers of the reliability tests: a tier per test, known tensors, and a mixed client load.

``Load`` runs client threads in this process that put, get and lookup through
the public API until stopped, while a test injects a fault. It checks every
get against the exact tensor its key was put with (codec ``none``: byte for
byte), times every call, and records exceptions, so a test can assert "never
wrong data, never an exception, never longer than the bound" over the whole
run, and measure when service came back after the fault.

This is test tooling, not part of kvtier.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

import kvtier
from waiting import wait_for  # noqa: F401  (re-exported: the reliability tests import it from here)

SHAPE = (2, 2, 2, 256, 64)  # layers, K/V, kv heads, tokens, head_dim: 256 KiB raw in fp32
_ns = itertools.count()
_kv_cache: dict[tuple[str, int], torch.Tensor] = {}
_lock = threading.Lock()
_running: list["Load"] = []  # started and not stopped: ``stop_all`` ends them after every test


def kv_of(tag: str, i: int) -> torch.Tensor:
    """The tensor stored under ``keys_of(tag, ...)[i]``: the same in every process and every call."""
    with _lock:
        kv = _kv_cache.get((tag, i))
    if kv is None:
        kv = fresh_kv(tag, i)
        with _lock:
            _kv_cache[(tag, i)] = kv
    return kv


def fresh_kv(tag: str, i: int) -> torch.Tensor:
    """``kv_of``'s tensor, made anew and not kept (a load's puts: kept, 40K of them held 10 GB in the test
    process and thrashed the 24 GB box)."""
    g = torch.Generator().manual_seed(hash_seed(tag) + i)
    return torch.randn(SHAPE, generator=g)


def stop_all(join_s: float = 30.0) -> list[str]:
    """Stop every load a test left running (it failed before its ``stop``): left on, a failed test's three
    threads kept putting through every later module and made the rest of the suite ~10x slower and fail.
    Returns the threads still in a call after ``join_s``."""
    with _lock:
        loads = list(_running)
    return [name for load in loads for name in load.stop(join_s)]


def hash_seed(tag: str) -> int:
    import zlib

    return zlib.crc32(tag.encode()) * 100_003


def keys_of(tag: str, n: int) -> list[str]:
    return kvtier.chunk_keys(list(range(256 * n)), f"rel-{tag}", chunk_tokens=256)


def same(out: torch.Tensor | None, want: torch.Tensor) -> bool:
    """Byte-for-byte equality (not float equality: -0.0 vs 0.0 or NaN payloads would count as different)."""
    return (out is not None and out.dtype == want.dtype and tuple(out.shape) == tuple(want.shape)
            and torch.equal(out.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)))


def one_block_bytes() -> int:
    k = keys_of("size", 1)[0]
    return kvtier.compress(kv_of("size", 0), "none", key=k).nbytes


@contextlib.contextmanager
def tier(**cfg):
    """A tier of its own (controller + shards in a fresh namespace) on the running Ray; stopped after."""
    base = dict(codec="none", cold_uri="", hot_bytes=0, warm_bytes="64MiB", num_shards=2, rpc_timeout_s=3.0)
    base.update(cfg)
    info = kvtier.init(namespace=f"kvt-rel-{next(_ns)}-{uuid.uuid4().hex[:6]}", config=base)
    try:
        yield info
    finally:
        kvtier.shutdown(stop=True)


def controller(namespace: str):
    import ray

    return ray.get_actor("kvtier-controller", namespace=namespace)


@dataclass
class Op:
    kind: str        # "put" | "get" | "lookup"
    t0: float        # monotonic start
    dt: float        # seconds
    ok: int = 0      # gets: blocks returned and byte-exact
    miss: int = 0    # gets: None
    wrong: int = 0   # gets: returned but not the tensor that was put
    error: str = ""  # an exception the call raised


@dataclass
class Load:
    """Client threads doing put/get/lookup through kvtier until ``stop()``.

    Gets read ``read_keys`` (preloaded by the test) and the keys this load put
    itself; puts write fresh keys of ``tag``. ``put_frac``/``lookup_frac`` set the mix.
    """

    tag: str
    read_keys: list[str]
    read_kvs: list[torch.Tensor]
    threads: int = 3
    batch: int = 3
    put_frac: float = 0.3
    lookup_frac: float = 0.2
    ops: list[Op] = field(default_factory=list)
    put_keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._expected = dict(zip(self.read_keys, self.read_kvs))
        # fresh keys without end: puts are queued now (they return in ~1 ms), so a fixed pool of 4000 keys ran
        # out mid-test and the load's puts raised StopIteration (test_controller_killed_and_restarted_under_load)
        self._fresh = self._fresh_keys()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(w,), daemon=True, name=f"load-{w}")
                         for w in range(self.threads)]

    def start(self) -> "Load":
        with _lock:
            _running.append(self)
        for t in self._workers:
            t.start()
        return self

    def stop(self, join_s: float) -> list[str]:
        """Stop the threads; the names of any still inside a call after ``join_s`` (a hang)."""
        self._stop.set()
        with _lock:
            if self in _running:
                _running.remove(self)
        end = time.monotonic() + join_s
        for t in self._workers:
            t.join(max(0.0, end - time.monotonic()))
        return [t.name for t in self._workers if t.is_alive()]

    # ---- summaries ------------------------------------------------------------
    def count(self, attr: str, kind: str | None = None, after: float = 0.0) -> int:
        return sum(getattr(o, attr) if attr != "n" else 1 for o in self.ops
                   if (kind is None or o.kind == kind) and o.t0 >= after)

    def errors(self) -> list[str]:
        return [f"{o.kind}: {o.error}" for o in self.ops if o.error]

    def slowest(self) -> float:
        return max((o.dt for o in self.ops), default=0.0)

    def first_ok_after(self, t: float, kind: str = "get") -> float | None:
        """Seconds from ``t`` to the end of the first ``kind`` op that started after ``t`` and succeeded."""
        done = [o.t0 + o.dt for o in self.ops if o.kind == kind and o.t0 >= t and not o.error
                and (kind != "get" or (o.ok and not o.miss))]
        return min(done) - t if done else None

    def _want(self, key: str) -> torch.Tensor:
        want = self._expected[key]
        return fresh_kv(self.tag, want) if isinstance(want, int) else want

    def _fresh_keys(self):
        for block in itertools.count():
            for j, key in enumerate(keys_of(f"{self.tag}" if block == 0 else f"{self.tag}-{block}", 4000)):
                yield block * 4000 + j, key

    # ---- the loop -------------------------------------------------------------
    def _run(self, w: int) -> None:
        rng = random.Random(w)
        while not self._stop.is_set():
            r = rng.random()
            kind = "put" if r < self.put_frac else "lookup" if r < self.put_frac + self.lookup_frac else "get"
            op = Op(kind, time.monotonic(), 0.0)
            try:
                if kind == "put":
                    with self._lock:
                        i, key = next(self._fresh)
                    kvtier.put(key, fresh_kv(self.tag, i))
                    with self._lock:
                        self._expected[key] = i  # the tensor is made again to check a get: never kept
                        self.put_keys.append(key)
                else:
                    with self._lock:
                        pool = self.read_keys + self.put_keys[-20:]
                    keys = rng.sample(pool, min(self.batch, len(pool)))
                    if kind == "lookup":
                        n = kvtier.lookup(keys)
                        if not (isinstance(n, int) and 0 <= n <= len(keys)):
                            op.error = f"lookup returned {n!r} for {len(keys)} keys"
                    else:
                        for key, out in zip(keys, kvtier.get(keys)):
                            if out is None:
                                op.miss += 1
                            elif same(out, self._want(key)):
                                op.ok += 1
                            else:
                                op.wrong += 1
            except Exception as e:  # noqa: BLE001 - recorded: the tests assert there are none
                op.error = f"{type(e).__name__}: {e}"
            op.dt = time.monotonic() - op.t0
            with self._lock:
                self.ops.append(op)
