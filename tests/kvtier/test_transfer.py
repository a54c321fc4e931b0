"""Block transfer between two real processes: a source Ray actor publishes, the
test process (the sink) pulls, over the Ray object store and over NIXL.

Every pulled block is compared byte for byte with what was published; a
corrupted, truncated or swapped block is a miss; a dead source is a miss within
the timeout; leases are freed by the pull (NIXL notification) or by expiry.
Throughput for a 32 MiB block is printed (run with ``-s``), not asserted.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from kvtier.block import Block
from kvtier.errors import TierUnavailableError
from kvtier.transport import nixl as nixl_transport
from kvtier.transport.nixl import NixlTransport
from kvtier.transport import ObjectStoreTransport, make_transport, pull

ray = pytest.importorskip("ray")
import ray.cloudpickle  # noqa: E402

# the Source actor calls this module's helpers; pytest imports it under a name
# Ray workers cannot import, so ship its functions by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

try:
    _probe = NixlTransport()
    _probe.close()
    NIXL_OK, NIXL_WHY = True, ""
except TierUnavailableError as e:
    NIXL_OK, NIXL_WHY = False, str(e)

KINDS = ["object_store", pytest.param("nixl", marks=pytest.mark.skipif(not NIXL_OK, reason=f"NIXL unavailable: {NIXL_WHY}"))]


def make_block(i: int, nbytes: int = 4096, seed: int = 0) -> Block:
    data = np.random.default_rng(seed * 1000 + i).integers(0, 256, size=nbytes, dtype=np.uint8)
    return Block.build(key=f"{i:040x}", model="test|L1|H1|D1|float32", codec="none", shape=(nbytes // 4,),
                       dtype="float32", params={}, buffers={"kv": data})


@ray.remote(num_cpus=0)
class Source:
    """A prefill-like process publishing over every available transport."""

    def __init__(self):
        self.t = {"object_store": ObjectStoreTransport()}
        if NIXL_OK:
            self.t["nixl"] = NixlTransport()

    def publish(self, kind: str, items: list[tuple[str, np.ndarray]], lease_s: float | None = None) -> dict:
        return self.t[kind].publish([(k, pa.py_buffer(v)) for k, v in items], lease_s=lease_s)

    def make(self, i: int, nbytes: int, seed: int) -> int:
        """Build a block here (fresh memory of this process, as a prefill worker's would be)."""
        self.made = make_block(i, nbytes, seed)
        return self.made.nbytes

    def publish_made(self, kind: str) -> dict:
        return self.t[kind].publish([(self.made.key, self.made.to_arrow())])

    def holds(self, ids: list[str]) -> int:
        """How many of these objects this process (their owner) still tracks: 0 once every borrower let go."""
        counts = ray._private.worker.global_worker.core_worker.get_all_reference_counts()
        known = {oid.decode() if isinstance(oid, bytes) else str(oid) for oid in counts}  # ascii hex ids
        return sum(i in known for i in ids)

    def open_leases(self, kind: str) -> int:
        return self.t[kind].stats()["open_leases"]

    def release(self, kind: str, lease: str) -> bool:
        return self.t[kind].release(lease)


@pytest.fixture(scope="module")
def source(ray_session):
    """One long-lived source actor (an actor start is ~1-3 s on 2 busy cores)."""
    src = Source.remote()
    ray.get(src.open_leases.remote("object_store"))
    yield src
    ray.kill(src)


@pytest.fixture(scope="module")
def sinks(ray_session):
    out = {"object_store": ObjectStoreTransport()}
    if NIXL_OK:
        out["nixl"] = NixlTransport()
    yield out
    for t in out.values():
        t.close()


def wire(block: Block) -> np.ndarray:
    return np.frombuffer(block.to_arrow(), dtype=np.uint8)


def wait_for(fn, want, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while (got := fn()) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


@pytest.mark.ray
@pytest.mark.parametrize("kind", KINDS)
def test_pull_between_processes_is_byte_exact_and_frees_the_lease(kind, source, sinks):
    src = source
    blocks = [make_block(i, nbytes=4096 * (i + 1)) for i in range(3)]
    desc = ray.get(src.publish.remote(kind, [(b.key, wire(b)) for b in blocks]))
    assert desc["transport"] == kind and [e["key"] for e in desc["blocks"]] == [b.key for b in blocks]
    ids = [r.hex() for r in desc.get("refs", [])]
    if kind == "object_store":
        assert ray.get(src.holds.remote(ids)) == 3, "alive while the descriptor is held"
    meta0 = sinks[kind].counters.get("metadata_wait_us", 0)
    got = pull(sinks[kind], desc)
    for want, have in zip(blocks, got):
        assert have is not None and have.key == want.key and have.checksum == want.checksum
        assert have.to_arrow().equals(want.to_arrow())
    if kind == "nixl":  # the READ's notification releases the source's registration
        assert sinks[kind].stats()["metadata_wait_us"] > meta0  # new regions: the sink fetched their metadata
        assert wait_for(lambda: ray.get(src.open_leases.remote(kind)), 0) == 0
    else:  # no lease: the descriptor's refs were the only ones, and pull dropped them
        assert ray.get(src.open_leases.remote(kind)) == 0 and desc["refs"] == []
        assert wait_for(lambda: ray.get(src.holds.remote(ids)), 0) == 0, "released by the sink's pull, not a lease"


@pytest.mark.ray
@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_truncated_and_swapped_blocks_are_misses(kind, source, sinks):
    src = source
    good, flipped, cut, other = (make_block(i, seed=1) for i in range(4))
    bad = wire(flipped).copy()
    bad[-100] ^= 0x40  # one bit in the payload
    items = [(good.key, wire(good)), (flipped.key, bad), (cut.key, wire(cut)[:-200]), (cut.key + "x", wire(other))]
    desc = ray.get(src.publish.remote(kind, items))
    before = dict(sinks[kind].counters)
    got = pull(sinks[kind], desc)
    assert got[0] is not None and got[0].checksum == good.checksum
    assert got[1:] == [None, None, None]
    assert sinks[kind].counters["corrupt_blocks"] - before["corrupt_blocks"] == 3


@pytest.mark.ray
def test_dead_source_is_a_miss_within_the_timeout(sinks):
    src = Source.remote()
    b = make_block(7, nbytes=1 << 20, seed=2)  # > 100 KiB: Ray inlines smaller objects into the ref itself
    descs = {kind: ray.get(src.publish.remote(kind, [(b.key, wire(b))])) for kind in sinks}
    ray.kill(src)
    time.sleep(0.5)  # let Ray notice the owner is gone
    for kind, desc in descs.items():
        t0 = time.monotonic()
        got = pull(sinks[kind], desc, timeout_s=5.0)
        assert time.monotonic() - t0 < 5.5
        if kind == "nixl":  # the registered memory died with the process; the listener probe says so at once
            assert got == [None] and time.monotonic() - t0 < 2.0
        else:  # Ray may still hold a copy in plasma: then it is the right one, verified, or a miss
            assert got[0] is None or got[0].checksum == b.checksum


@pytest.mark.ray
@pytest.mark.skipif(not NIXL_OK, reason=f"NIXL unavailable: {NIXL_WHY}")
def test_nixl_lease_expires_when_nobody_pulls(source, sinks):
    b = make_block(9, seed=3)
    desc = ray.get(source.publish.remote("nixl", [(b.key, wire(b))], lease_s=0.5))
    assert ray.get(source.open_leases.remote("nixl")) == 1
    assert wait_for(lambda: ray.get(source.open_leases.remote("nixl")), 0, timeout_s=3.0) == 0
    # the registration is gone: a late pull is a miss, not stale memory
    assert pull(sinks["nixl"], desc, timeout_s=1.0) == [None]


@pytest.mark.ray
def test_object_store_descriptor_pulls_with_a_nixl_sink_and_not_vice_versa(source, sinks):
    b = make_block(11, seed=4)
    for sink in sinks.values():
        desc = ray.get(source.publish.remote("object_store", [(b.key, wire(b))]))
        assert pull(sink, desc)[0].checksum == b.checksum
    assert pull(sinks["object_store"], desc) == [None], "a descriptor is consumed by its pull"
    fake_nixl = {"transport": "nixl", "lease": "x", "agent": "a", "host": "127.0.0.1", "port": 1,
                 "blocks": [{"key": b.key, "addr": 1, "len": 10}]}
    assert pull(sinks["object_store"], fake_nixl) == [None]


@pytest.mark.ray
@pytest.mark.parametrize("kind", KINDS)
def test_throughput_32mib_block(kind, source, sinks):
    """Prints pull (+verify) and publish+pull times of a block built in the source process;
    asserts only that the bytes arrive intact."""
    b = make_block(12, nbytes=32 << 20, seed=5)
    pulls, ends = [], []
    for _ in range(4):  # the first NIXL pull also loads metadata and connects
        ray.get(source.make.remote(12, 32 << 20, 5))
        t0 = time.perf_counter()
        desc = ray.get(source.publish_made.remote(kind))
        t1 = time.perf_counter()
        got = pull(sinks[kind], desc)
        t2 = time.perf_counter()
        pulls.append(t2 - t1)
        ends.append(t2 - t0)
        assert got[0] is not None and got[0].checksum == b.checksum
        assert ray.get(source.open_leases.remote(kind)) == 0 or kind == "nixl"  # NIXL: released by the READ's notice
    gb = b.nbytes / 1e9
    print(f"\n{kind:>12}: 32 MiB block, best of 4 after warm-up: pull+verify {min(pulls[1:]) * 1e3:.1f} ms "
          f"({gb / min(pulls[1:]):.2f} GB/s); publish+pull {min(ends[1:]) * 1e3:.1f} ms "
          f"({gb / min(ends[1:]):.2f} GB/s); all pulls {[round(t * 1e3, 1) for t in pulls]} ms")


def test_make_transport_names_a_bad_choice():
    with pytest.raises(ValueError, match="transport='rdma'"):
        make_transport("rdma")
    with pytest.raises(ValueError, match="lease_s=0"):
        ObjectStoreTransport(lease_s=0)
    with pytest.raises(ValueError, match="lease_s=-1"):
        ObjectStoreTransport()._add_lease([], lease_s=-1)


@pytest.mark.skipif(not NIXL_OK, reason=f"NIXL unavailable: {NIXL_WHY}")
def test_auto_prefers_nixl_when_it_starts():
    t = make_transport("auto")
    try:
        assert isinstance(t, NixlTransport)
    finally:
        t.close()


def test_auto_falls_back_to_object_store_when_nixl_cannot_start(monkeypatch):
    def broken(*a, **k):
        raise TierUnavailableError("no UCX here")

    monkeypatch.setattr(nixl_transport, "NixlTransport", broken)
    assert isinstance(make_transport("auto"), ObjectStoreTransport)
    with pytest.raises(TierUnavailableError, match="no UCX"):
        make_transport("nixl")


def test_publish_rejects_bad_items():
    t = ObjectStoreTransport()
    with pytest.raises(ValueError, match="non-empty list"):
        t.publish([])
    with pytest.raises(ValueError, match=r"items\[0\]"):
        t.publish([("k", b"")])
