"""Block transfer over the Ray object store between two real processes: a source Ray
actor publishes, the test process (the sink) pulls.

Every pulled block is compared byte for byte with what was published; a
corrupted, truncated or swapped block is a miss; a dead source is a miss within
the timeout; the objects are freed by the sink's pull, not by the source. (The
NIXL path is the arena: tests/kvtier/test_arena.py.)
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from kvtier.block import Block
from kvtier.transport import ObjectStoreTransport, pull

ray = pytest.importorskip("ray")
import ray.cloudpickle  # noqa: E402

# the Source actor calls this module's helpers; pytest imports it under a name
# Ray workers cannot import, so ship its functions by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_block(i: int, nbytes: int = 4096, seed: int = 0) -> Block:
    data = np.random.default_rng(seed * 1000 + i).integers(0, 256, size=nbytes, dtype=np.uint8)
    return Block.build(key=f"{i:040x}", model="test|L1|H1|D1|float32", codec="none", shape=(nbytes // 4,),
                       dtype="float32", params={}, buffers={"kv": data})


@ray.remote(num_cpus=0)
class Source:
    """A prefill-like process publishing over the object store."""

    def __init__(self):
        self.t = ObjectStoreTransport()

    def publish(self, items: list[tuple[str, np.ndarray]]) -> dict:
        return self.t.publish([(k, pa.py_buffer(v)) for k, v in items])

    def holds(self, ids: list[str]) -> int:
        """How many of these objects this process (their owner) still tracks: 0 once every borrower let go."""
        counts = ray._private.worker.global_worker.core_worker.get_all_reference_counts()
        known = {oid.decode() if isinstance(oid, bytes) else str(oid) for oid in counts}  # ascii hex ids
        return sum(i in known for i in ids)

    def ping(self) -> bool:
        return True


@pytest.fixture(scope="module")
def source(ray_session):
    """One long-lived source actor (an actor start is ~1-3 s on 2 busy cores)."""
    src = Source.remote()
    ray.get(src.ping.remote())
    yield src
    ray.kill(src)


@pytest.fixture(scope="module")
def sink(ray_session):
    return ObjectStoreTransport()


def wire(block: Block) -> np.ndarray:
    return np.frombuffer(block.to_arrow(), dtype=np.uint8)


def wait_for(fn, want, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while (got := fn()) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


@pytest.mark.ray
def test_pull_between_processes_is_byte_exact_and_frees_the_objects(source, sink):
    blocks = [make_block(i, nbytes=4096 * (i + 1)) for i in range(3)]
    desc = ray.get(source.publish.remote([(b.key, wire(b)) for b in blocks]))
    assert desc["transport"] == "object_store" and [e["key"] for e in desc["blocks"]] == [b.key for b in blocks]
    ids = [r.hex() for r in desc["refs"]]
    assert ray.get(source.holds.remote(ids)) == 3, "alive while the descriptor is held"
    got = pull(sink, desc)
    for want, have in zip(blocks, got):
        assert have is not None and have.key == want.key and have.checksum == want.checksum
        assert have.to_arrow().equals(want.to_arrow())
    # the descriptor's refs were the only ones, and pull dropped them
    assert desc["refs"] == [] and wait_for(lambda: ray.get(source.holds.remote(ids)), 0) == 0
    assert pull(sink, desc) == [None, None, None], "a descriptor is consumed by its pull"


@pytest.mark.ray
def test_corrupt_truncated_and_swapped_blocks_are_misses(source, sink):
    good, flipped, cut, other = (make_block(i, seed=1) for i in range(4))
    bad = wire(flipped).copy()
    bad[-100] ^= 0x40  # one bit in the payload
    items = [(good.key, wire(good)), (flipped.key, bad), (cut.key, wire(cut)[:-200]), (cut.key + "x", wire(other))]
    desc = ray.get(source.publish.remote(items))
    before = dict(sink.counters)
    got = pull(sink, desc)
    assert got[0] is not None and got[0].checksum == good.checksum
    assert got[1:] == [None, None, None]
    assert sink.counters["corrupt_blocks"] - before["corrupt_blocks"] == 3


@pytest.mark.ray
def test_dead_source_is_a_miss_within_the_timeout(sink):
    src = Source.remote()
    b = make_block(7, nbytes=1 << 20, seed=2)  # > 100 KiB: Ray inlines smaller objects into the ref itself
    desc = ray.get(src.publish.remote([(b.key, wire(b))]))
    ray.kill(src)
    time.sleep(0.5)  # let Ray notice the owner is gone
    t0 = time.monotonic()
    got = pull(sink, desc, timeout_s=5.0)
    assert time.monotonic() - t0 < 5.5
    # Ray may still hold a copy in plasma: then it is the right one, verified, or a miss
    assert got[0] is None or got[0].checksum == b.checksum


def test_a_descriptor_of_another_kind_is_all_misses(sink):
    other = {"transport": "nixl", "agent": "a", "blocks": [{"key": "k" * 40, "addr": 1, "len": 10}]}
    before = sink.counters["missed_blocks"]
    assert pull(sink, other) == [None] and sink.counters["missed_blocks"] == before + 1


def test_publish_rejects_bad_items():
    t = ObjectStoreTransport()
    with pytest.raises(ValueError, match="non-empty list"):
        t.publish([])
    with pytest.raises(ValueError, match=r"items\[0\]"):
        t.publish([("k", b"")])

