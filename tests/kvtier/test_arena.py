"""The NIXL arena between real agents: two in this process, and a source in a child process.

Blocks read back byte for byte in one index read and one block read; a peer is added
once, however many reads follow; the ring keeps its byte bound by releasing the oldest
blocks first; a block corrupted or overwritten in the ring, a key the source never held,
a malformed endpoint, a source that is stopped (SIGSTOP) or dead is a miss or an error
naming the bad value, within the read's bound; ``holds`` answers from the index alone. No Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kvtier.errors import TierUnavailableError

try:
    from kvtier.transport.arena import Arena

    _probe = Arena(1 << 16)
    _probe.close()
    NIXL_WHY = ""
except TierUnavailableError as e:
    NIXL_WHY = str(e)

pytestmark = pytest.mark.skipif(bool(NIXL_WHY), reason=f"NIXL unavailable: {NIXL_WHY}")


def payload(i: int, n: int = 20_000) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def sink():
    a = Arena(1 << 16)
    yield a
    a.close()


def test_blocks_read_back_exactly_and_a_peer_is_added_once(sink):
    src = Arena(1 << 20, slots=16)
    try:
        for i in range(5):
            assert src.write(f"k{i}", payload(i))
        ep = json.loads(json.dumps(src.endpoint()))  # it travels in a request's params
        before = sink.counters["peers_added"]
        for _ in range(3):
            got = sink.read(ep, ["k3", "nope", "k0", "k4"], 5.0)
            assert [bytes(g) if g is not None else None for g in got] == [payload(3), None, payload(0), payload(4)]
        assert sink.counters["peers_added"] == before + 1  # metadata added once, not per read
        assert sink.holds(ep, ["k0", "k1", "nope", "k3"]) == 2 and sink.holds(ep, ["nope"]) == 0  # index only
        src.write("k0", payload(99))  # a key written again: the newest entry wins
        assert bytes(sink.read(ep, ["k0"], 5.0)[0]) == payload(99)
    finally:
        src.close()


def test_the_ring_releases_the_oldest_blocks_first_and_stays_within_its_bytes(sink):
    src = Arena(64 << 10, slots=4)  # room for three 20 KB blocks, four slots
    try:
        for i in range(6):
            assert src.write(f"r{i}", payload(i))
            assert src.used_bytes() <= 64 << 10
        assert not src.write("huge", b"x" * (65 << 10)) and src.counters["too_big"] == 1
        got = sink.read(src.endpoint(), [f"r{i}" for i in range(6)], 5.0)
        assert [g is not None for g in got] == [False, False, False, True, True, True]
        assert bytes(got[5]) == payload(5) and src.counters["evicted_blocks"] == 3
        for i in range(6, 12):  # more blocks than slots: a reused slot releases its old entry
            src.write(f"s{i}", payload(i, 100))
        assert src.stats()["blocks"] == 4
    finally:
        src.close()


def test_a_corrupted_block_and_a_bad_endpoint_are_refused(sink):
    src = Arena(1 << 20, slots=16)
    try:
        src.write("c0", payload(0))
        src.write("c1", payload(1))
        off = src._live[0][0]  # slot 0 holds c0: flip one byte in the ring, as a racing overwrite would
        src._mem[src._data0 + off + 100] ^= 0xFF
        torn = sink.counters["torn_blocks"]
        got = sink.read(src.endpoint(), ["c0", "c1"], 5.0)
        assert got[0] is None and bytes(got[1]) == payload(1) and sink.counters["torn_blocks"] == torn + 1
        ep = src.endpoint()
        for field, bad in (("addr", -1), ("slots", "16"), ("agent", None), ("capacity", 1 << 41)):
            with pytest.raises(ValueError, match="arena endpoint"):
                sink.read({**ep, field: bad}, ["c1"], 1.0)
        with pytest.raises(ValueError, match="not base64"):
            sink.read({**ep, "meta": "not base64!"}, ["c1"], 1.0)
        errors = sink.counters["read_errors"]  # metadata NIXL cannot use: as a dead peer's, a miss
        assert sink.read({**ep, "agent": "someone-else", "meta": "bm90IG1ldGFkYXRh"}, ["c1"], 1.0) == [None]
        assert sink.holds({**ep, "agent": "someone-else", "meta": "bm90IG1ldGFkYXRh"}, ["c1"]) is None
        assert sink.counters["read_errors"] == errors + 2
        with pytest.raises(ValueError, match="its metadata is agent"):
            sink.read({**ep, "agent": "someone-else"}, ["c1"], 1.0)
    finally:
        src.close()


def _spawn_source() -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        line = p.stdout.readline()
        if line.startswith("ENDPOINT "):
            return p, json.loads(line[9:])
        if not line and p.poll() is not None:
            break
    p.kill()
    raise AssertionError("the source process did not start")


def test_a_stalled_or_dead_source_is_a_miss_within_the_bound(sink):
    p, ep = _spawn_source()
    try:
        # stopped before first contact: UCX cannot wire the connection up, the read times out
        os.kill(p.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert sink.read(ep, ["d0", "d1"], 1.0) == [None, None]
        assert time.monotonic() - t0 < 3.0 and sink.counters["read_timeouts"] >= 1
        os.kill(p.pid, signal.SIGCONT)
        got = sink.read(ep, ["d0", "d1"], 10.0)  # the peer was forgotten and is added again
        assert [bytes(g) for g in got] == [payload(0), payload(1)]
        p.kill()
        p.wait(10)
        t0 = time.monotonic()
        assert sink.read(ep, ["d0"], 2.0) == [None]
        assert sink.holds(ep, ["d0"], 0.5) is None  # dead: nothing to ask, not "holds none"
        assert time.monotonic() - t0 < 5.0
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait(10)


if __name__ == "__main__":  # the source process of the last test: two blocks, then wait to be killed
    arena = Arena(1 << 20, slots=16)
    arena.write("d0", payload(0))
    arena.write("d1", payload(1))
    print("ENDPOINT " + json.dumps(arena.endpoint()), flush=True)
    sys.stdin.read()
