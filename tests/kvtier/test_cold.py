"""The cold store against real backends: a local directory and a real S3 server on loopback.

Nothing here is mocked. S3 is SeaweedFS (or moto) started once for the module by
``tests/s3server.py`` and stopped/paused for the outage tests. "Disk full" and
"read-only" are real kernel errors: a tiny tmpfs (ENOSPC) and a read-only
remount (EROFS) inside a private mount namespace (``unshare -m``), and a
file-size rlimit (EFBIG) that works without privileges; a root under a regular
file fails even for root (ENOTDIR). A writer is killed mid-write for real.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import torch

import kvtier.tiers.cold as cold_mod
from kvtier import Block, BlockFormatError, TierUnavailableError, chunk_keys, compress, decompress
from kvtier.config import TierConfig
from kvtier.keys import model_fingerprint
from kvtier.tiers.cold import ColdStore
from tests.s3server import s3_server

MODEL = model_fingerprint("test-model", 2, 2, 16, "float16")
KEYS = chunk_keys(list(range(16 * 8)), MODEL, chunk_tokens=16)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_block(key: str, seed: int = 0, model: str = MODEL, tokens: int = 16) -> Block:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn((2, 2, 2, tokens, 16), generator=g).to(torch.float16)
    return compress(kv, "none", key=key, model_id=model)


BLOCKS = {k: make_block(k, i) for i, k in enumerate(KEYS[:4])}


def same(a: Block, b: Block) -> bool:
    return a.to_arrow().equals(b.to_arrow()) and torch.equal(decompress(a).view(torch.int16), decompress(b).view(torch.int16))


def object_path(store: ColdStore, key: str) -> str:
    return f"{store.root}/{key[:2]}/{key}.kvb"


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture
def s3store(s3, monkeypatch):
    if not s3.running:
        s3.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    # one bucket, a prefix per test: SeaweedFS grows ~7 volumes for every new bucket
    return ColdStore(f"s3://kvtier-tests/{uuid.uuid4().hex[:10]}/cold", 1 << 30, s3_endpoint=s3.endpoint)


@pytest.fixture
def local(tmp_path):
    return ColdStore(str(tmp_path / "cold"), 1 << 20)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    return request.getfixturevalue("local" if request.param == "local" else "s3store")


def corrupt(store: ColdStore, key: str, data: bytes) -> None:
    """Replace ``key``'s object behind the store's back (what a bad disk or an operator does)."""
    path = object_path(store, key)
    if store.s3:
        with store.fs.open_output_stream(path) as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


# ---------------------------------------------------------------- round trips
def test_round_trip_list_delete_and_counts(store):
    for k, b in BLOCKS.items():
        assert store.put(k, b.to_arrow()) == b.nbytes
    for k, b in BLOCKS.items():
        got = store.get(k, expect_model=MODEL)
        assert got is not None and same(got, b)
        assert store.get(k).to_arrow().equals(b.to_arrow())  # a second read: the verified bytes, as stored
        assert store.contains(k)
    assert sorted(store.list()) == sorted((k, b.nbytes) for k, b in BLOCKS.items())
    assert store.get(KEYS[5]) is None and not store.contains(KEYS[5])
    st = store.stats()
    assert (st["blocks"], st["bytes"]) == (4, sum(b.nbytes for b in BLOCKS.values()))
    assert (st["hits"], st["misses"], st["corrupt"], st["errors"]) == (8, 1, 0, 0)
    assert st["capacity_bytes"] == store.capacity_bytes and st["uri"] == store.uri
    # overwrite: still one object, bytes follow the new size
    bigger = make_block(KEYS[0], seed=9, tokens=32)
    store.put(KEYS[0], bigger)  # a Block is accepted as well as its bytes
    assert same(store.get(KEYS[0]), bigger)
    assert store.stats()["blocks"] == 4
    assert store.stats()["bytes"] == sum(b.nbytes for b in BLOCKS.values()) - BLOCKS[KEYS[0]].nbytes + bigger.nbytes
    assert store.delete(KEYS[0]) is True and store.delete(KEYS[0]) is False
    assert store.get(KEYS[0]) is None and store.stats()["blocks"] == 3


def test_reopen_sees_what_was_stored(store, s3):
    for k, b in BLOCKS.items():
        store.put(k, b)
    again = ColdStore(store.uri, 7, s3_endpoint=s3.endpoint if store.s3 else "")
    assert (again.stats()["blocks"], again.stats()["bytes"]) == (4, sum(b.nbytes for b in BLOCKS.values()))
    assert dict(again.list()) == {k: b.nbytes for k, b in BLOCKS.items()}
    assert same(again.get(KEYS[3]), BLOCKS[KEYS[3]])


def test_layout_is_sharded_by_key_prefix(local, tmp_path):
    local.put(KEYS[0], BLOCKS[KEYS[0]].to_arrow())
    assert os.path.isfile(tmp_path / "cold" / KEYS[0][:2] / f"{KEYS[0]}.kvb")
    assert ColdStore(f"file://{tmp_path}/cold").contains(KEYS[0])  # file:// names the same directory


def test_s3_objects_are_where_the_layout_says(s3store, s3):
    s3store.put(KEYS[1], BLOCKS[KEYS[1]].to_arrow())
    bucket, prefix = s3store.uri[len("s3://"):].split("/", 1)
    with s3.filesystem().open_input_stream(f"{bucket}/{prefix}/{KEYS[1][:2]}/{KEYS[1]}.kvb") as f:
        assert f.read() == BLOCKS[KEYS[1]].to_arrow().to_pybytes()


def test_put_accepts_ray_style_numpy_bytes(local):
    wire = np.frombuffer(BLOCKS[KEYS[0]].to_arrow(), dtype=np.uint8)  # what ray.get of a stored block returns
    wire.flags.writeable = False
    assert local.put(KEYS[0], wire) == wire.size
    assert same(local.get(KEYS[0]), BLOCKS[KEYS[0]])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("key", ["../escape", "a/b", ".hidden", "", "x" * 201, "a..b", "tab\tkey"])
def test_keys_that_could_escape_are_rejected(local, key, tmp_path):
    with pytest.raises(ValueError, match="cannot name a cold object"):
        local.put(key, BLOCKS[KEYS[0]].to_arrow())
    assert local.get(key) is None
    assert local.contains(key) is False and local.delete(key) is False
    assert not (tmp_path / "escape").exists() and list(local.list()) == []


def test_put_refuses_what_a_read_would_reject(local):
    with pytest.raises(BlockFormatError, match="holds key"):
        local.put(KEYS[1], BLOCKS[KEYS[0]].to_arrow())
    with pytest.raises(BlockFormatError, match="not a block"):
        local.put(KEYS[1], b"definitely not a block")
    assert list(local.list()) == [] and local.stats()["blocks"] == 0


@pytest.mark.parametrize("uri, msg", [
    ("ftp://host/dir", "unknown scheme 'ftp'"),
    ("s3://", "names no bucket"),
    ("", "must be a local path"),
])
def test_bad_uris_are_rejected(uri, msg):
    with pytest.raises(ValueError, match=msg):
        ColdStore(uri)


def test_credentials_in_the_uri_are_rejected_without_echoing_them():
    with pytest.raises(ValueError) as e:
        ColdStore("s3://AKIDSECRETID:VerySecretValue@bucket/prefix")
    assert "VerySecretValue" not in str(e.value) and "AKIDSECRETID" not in str(e.value)
    with pytest.raises(ValueError, match="capacity_bytes=-1"):
        ColdStore("/tmp/x", -1)
    with pytest.raises(ValueError, match="s3_endpoint='ftp://h'"):
        ColdStore("s3://bucket/p", s3_endpoint="ftp://h")


# ---------------------------------------------------------------- atomicity
def test_unfinished_writes_are_invisible_and_cleaned_up(local, tmp_path):
    local.put(KEYS[0], BLOCKS[KEYS[0]].to_arrow())
    shard = tmp_path / "cold" / KEYS[1][:2]
    shard.mkdir(exist_ok=True)
    wire = BLOCKS[KEYS[1]].to_arrow().to_pybytes()
    stale = shard / f".{KEYS[1]}.kvb.4242.deadbeef.tmp"  # a writer killed 2 minutes ago
    fresh = shard / f".{KEYS[1]}.kvb.4343.feedface.tmp"  # a writer still at work
    stale.write_bytes(wire[: len(wire) // 2])
    fresh.write_bytes(wire[:100])
    os.utime(stale, (time.time() - 120, time.time() - 120))
    assert local.get(KEYS[1]) is None and not local.contains(KEYS[1])
    assert list(local.list()) == [(KEYS[0], BLOCKS[KEYS[0]].nbytes)]
    assert not stale.exists() and fresh.exists()  # only temp files older than TEMP_MAX_AGE_S go
    assert local.stats()["corrupt"] == 0 and local.stats()["blocks"] == 1


_WRITER = """
import sys
from kvtier.tiers.cold import ColdStore
store, data, key = ColdStore(sys.argv[1]), open(sys.argv[2], "rb").read(), sys.argv[3]
while True:
    store.put(key, data)
    print("put", flush=True)
"""


def test_a_writer_killed_mid_write_leaves_the_old_object_or_none(tmp_path):
    key = KEYS[6]
    kv = torch.randn((8, 2, 4, 256, 128)).to(torch.bfloat16)  # 4 MiB: each put spends ms in write+fsync
    wire = compress(kv, "none", key=key, model_id=MODEL).to_arrow()
    (tmp_path / "blk").write_bytes(wire.to_pybytes())
    cold = tmp_path / "cold"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(cold), str(tmp_path / "blk"), key],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for _ in range(3):  # several complete puts, then a kill at a random point of the next one
            assert child.stdout.readline() == "put\n", child.stderr.read()
        time.sleep(np.random.default_rng().uniform(0, 0.05))
    finally:
        child.kill()
        child.wait(10)
    store = ColdStore(str(cold))
    assert list(store.list()) == [(key, wire.size)]
    got = store.get(key, expect_model=MODEL)
    assert got is not None and got.to_arrow().equals(wire)
    assert store.stats()["corrupt"] == 0


# ---------------------------------------------------------------- corruption at rest
def _flip(data: bytes, pos: int) -> bytes:
    m = bytearray(data)
    m[pos] ^= 0x20
    return bytes(m)


CORRUPTIONS = {
    "bit flip in payload": lambda w, other, foreign: _flip(w, len(w) - 200),
    "bit flip in header": lambda w, other, foreign: _flip(w, w.index(b'"codec"') + 2),
    "truncated": lambda w, other, foreign: w[: len(w) * 2 // 3],
    "truncated by 8 bytes": lambda w, other, foreign: w[:-8],
    "empty": lambda w, other, foreign: b"",
    "swapped with another key's object": lambda w, other, foreign: other,
    "a foreign model's block": lambda w, other, foreign: foreign,
    "random bytes": lambda w, other, foreign: os.urandom(len(w)),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_objects_are_misses_counted_and_deleted(store, kind, caplog):
    key, other = KEYS[0], KEYS[1]
    store.put(key, BLOCKS[key])
    store.put(other, BLOCKS[other])
    foreign = make_block(key, seed=3, model="another-model|L2|H2|D16|float16").to_arrow().to_pybytes()
    corrupt(store, key, CORRUPTIONS[kind](BLOCKS[key].to_arrow().to_pybytes(), BLOCKS[other].to_arrow().to_pybytes(), foreign))
    caplog.set_level(logging.WARNING, logger="kvtier.cold")
    assert store.get(key, expect_model=MODEL) is None
    st = store.stats()
    assert (st["corrupt"], st["misses"], st["hits"]) == (1, 1, 0)
    assert not store.contains(key), "a corrupt object must be deleted"
    assert [k for k, _ in store.list()] == [other]
    assert any("corrupt" in r.getMessage() and key in r.getMessage() for r in caplog.records)
    assert same(store.get(other, expect_model=MODEL), BLOCKS[other])  # the neighbour is untouched
    assert store.get(key) is None and store.stats()["corrupt"] == 1  # gone: a plain miss now


def test_oversized_object_is_not_read_into_memory(local, monkeypatch):
    local.put(KEYS[0], BLOCKS[KEYS[0]])
    monkeypatch.setattr(cold_mod, "MAX_OBJECT_BYTES", 1000)  # instead of writing a 4 GiB file
    assert local.get(KEYS[0]) is None
    assert local.stats()["corrupt"] == 1 and not local.contains(KEYS[0])


# ---------------------------------------------------------------- failing local disks
def test_root_under_a_regular_file_fails_cleanly_even_as_root(tmp_path, caplog, monkeypatch):
    (tmp_path / "afile").write_text("not a directory")
    uri = str(tmp_path / "afile" / "cold")
    store = ColdStore(uri)
    monkeypatch.setattr(cold_mod, "LOG_INTERVAL_S", 0.3)
    caplog.set_level(logging.ERROR, logger="kvtier.cold")
    for k in KEYS[:5]:
        with pytest.raises(TierUnavailableError, match=f"cold tier {uri} is unavailable: put of {k[:16]}"):
            store.put(k, BLOCKS.get(k) or make_block(k))
    assert store.get(KEYS[0]) is None and store.available() is False
    st = store.stats()
    assert st["errors"] >= 5 and st["blocks"] == 0 and st["uri"] == uri
    assert len([r for r in caplog.records if r.name == "kvtier.cold"]) == 1  # once per interval, not per call
    time.sleep(0.35)
    with pytest.raises(TierUnavailableError):
        store.put(KEYS[0], BLOCKS[KEYS[0]])
    logged = [r.getMessage() for r in caplog.records if r.name == "kvtier.cold"]
    assert len(logged) == 2 and "failures since the last report" in logged[1]


_DISKS = r"""
import json, os, resource, signal, subprocess, sys
import torch
from kvtier import TierUnavailableError, chunk_keys, compress
from kvtier.tiers.cold import ColdStore

base, use_mounts = sys.argv[1], sys.argv[2] == "1"
keys = chunk_keys(list(range(64 * 8)), "m", 64)
wires = [compress(torch.randn(2, 2, 2, 64, 64), "none", key=k, model_id="m").to_arrow() for k in keys]  # 128 KiB each
temps = lambda d: [f for _, _, fs in os.walk(d) for f in fs if f.endswith(".tmp")]
out = {}

def fill(store):
    stored, err = [], None
    for k, w in zip(keys, wires):
        try:
            store.put(k, w)
            stored.append(k)
        except TierUnavailableError as e:
            err = str(e)
            break
    return stored, err

# EFBIG: a file-size limit applies to root too; no privileges needed
d = os.path.join(base, "rlimit")
store = ColdStore(d)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
stored, err = fill(store)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
out["rlimit"] = dict(stored=len(stored), error=err, temps=temps(d), stats=store.stats(), put_after=store.put(keys[0], wires[0]))

if use_mounts:
    # ENOSPC: a 512 KiB tmpfs holds three 128 KiB blocks
    d = os.path.join(base, "full")
    os.makedirs(d)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", d], check=True)
    store = ColdStore(d)
    stored, err = fill(store)
    readable = all(store.get(k) is not None for k in stored)
    freed = store.delete(stored[0])
    out["full"] = dict(stored=len(stored), error=err, temps=temps(d), readable=readable, freed=freed,
                       put_after=store.put(keys[len(stored)], wires[len(stored)]), stats=store.stats())
    # EROFS: blocks written, one corrupted, then the filesystem remounted read-only
    d = os.path.join(base, "ro")
    os.makedirs(d)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", d], check=True)
    store = ColdStore(d)
    for k, w in zip(keys[:3], wires[:3]):
        store.put(k, w)
    bad = os.path.join(d, keys[2][:2], keys[2] + ".kvb")
    with open(bad, "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\0" * 8)
    subprocess.run(["mount", "-o", "remount,ro", d], check=True)
    try:
        store.put(keys[3], wires[3])
        err = None
    except TierUnavailableError as e:
        err = str(e)
    out["ro"] = dict(error=err, read_ok=store.get(keys[0]) is not None, corrupt_read=store.get(keys[2]),
                     corrupt_still_there=os.path.exists(bad), available=store.available(), stats=store.stats(),
                     listed=sorted(k for k, _ in store.list()) == sorted(keys[:3]))
print(json.dumps(out))
"""


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    base = tmp_path_factory.mktemp("disks")
    mounts = _can_unshare()
    # a private mount namespace: the tmpfs mounts vanish with the process, nothing leaks to the host
    cmd = (["unshare", "-m", "--propagation", "private"] if mounts else []) + [sys.executable, "-c", _DISKS, str(base),
                                                                               "1" if mounts else "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), str(base)


def test_file_size_limit_fails_puts_cleanly(disks):
    out, base = disks
    r = out["rlimit"]
    assert r["stored"] == 0 and r["temps"] == []  # the failed temp file is removed, not left behind
    assert r["error"].startswith(f"cold tier {os.path.join(base, 'rlimit')} is unavailable") and "File too large" in r["error"]
    assert r["stats"]["errors"] == 1 and r["stats"]["blocks"] == 0
    assert r["put_after"] > 0  # the limit lifted: writes work again


def test_full_disk_fails_puts_keeps_blocks_and_recovers(disks):
    out, base = disks
    if "full" not in out:
        pytest.skip("no private mount namespace here (`unshare -m` refused): the ENOSPC case needs a tiny tmpfs")
    r = out["full"]
    assert r["stored"] == 3 and r["readable"] and r["temps"] == []
    assert r["error"].startswith(f"cold tier {os.path.join(base, 'full')} is unavailable") and "No space left" in r["error"]
    assert r["freed"] is True and r["put_after"] > 0
    assert r["stats"]["errors"] == 1 and r["stats"]["blocks"] == 3


def test_read_only_disk_fails_puts_but_still_serves_reads(disks):
    out, base = disks
    if "ro" not in out:
        pytest.skip("no private mount namespace here (`unshare -m` refused): the EROFS case needs a remount")
    r = out["ro"]
    assert r["error"].startswith(f"cold tier {os.path.join(base, 'ro')} is unavailable") and "Read-only file system" in r["error"]
    assert r["read_ok"] and r["corrupt_read"] is None and r["corrupt_still_there"]  # cannot delete it, never returned
    assert r["available"] is False and r["listed"]
    assert r["stats"]["corrupt"] == 1 and r["stats"]["hits"] == 1 and r["stats"]["errors"] >= 2  # the put and the delete


# ---------------------------------------------------------------- S3 outages and credentials
def _no_secrets(s3, *texts):
    for t in texts:
        assert s3.secret_key not in t and s3.access_key not in t, t


def test_s3_goes_away_and_comes_back(s3store, s3, caplog):
    caplog.set_level(logging.INFO, logger="kvtier.cold")
    for k in KEYS[:2]:
        s3store.put(k, BLOCKS[k])
    s3.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(TierUnavailableError, match=f"cold tier {s3store.uri} is unavailable: put of") as e:
            s3store.put(KEYS[2], BLOCKS[KEYS[2]])
        first = time.monotonic() - t0
        assert first < 5.0, f"a refused S3 connection took {first:.1f} s"
        t0 = time.monotonic()
        assert s3store.get(KEYS[0]) is None  # a miss, not an exception
        assert s3store.get(KEYS[1]) is None and s3store.contains(KEYS[0]) is False
        with pytest.raises(TierUnavailableError):
            s3store.delete(KEYS[0])
        with pytest.raises(TierUnavailableError):
            list(s3store.list())
        assert time.monotonic() - t0 < 0.5  # within the fail-fast window: no caller waits on the network again
        assert s3store.available() is False
        st = s3store.stats()
        assert st["errors"] >= 6 and st["misses"] == 2 and st["hits"] == 0
        _no_secrets(s3, str(e.value), json.dumps(st), repr(s3store), *(r.getMessage() for r in caplog.records))
    finally:
        s3.start()
    assert s3store.available() is True  # a real probe ends the fail-fast window
    assert same(s3store.get(KEYS[0]), BLOCKS[KEYS[0]])  # earlier objects survived the outage
    s3store.put(KEYS[2], BLOCKS[KEYS[2]])
    assert sorted(k for k, _ in s3store.list()) == sorted(KEYS[:3])


def test_a_hung_s3_costs_one_bounded_wait(s3store, s3):
    if s3.kind != "seaweedfs":
        pytest.skip(f"pausing needs a SeaweedFS process; this run uses {s3.kind}")
    s3store.put(KEYS[0], BLOCKS[KEYS[0]])
    s3.pause()  # accepts connections, answers nothing
    try:
        t0 = time.monotonic()
        assert s3store.get(KEYS[0]) is None
        first = time.monotonic() - t0
        t0 = time.monotonic()
        with pytest.raises(TierUnavailableError):
            s3store.put(KEYS[1], BLOCKS[KEYS[1]])
        assert time.monotonic() - t0 < 0.1
    finally:
        s3.resume()
    # 2 attempts x 2 s low-speed timeout (+ backoff); measured ~4.5 s here
    assert first < 8.0, f"a hung S3 held a get for {first:.1f} s"
    assert s3store.available() and same(s3store.get(KEYS[0]), BLOCKS[KEYS[0]])


def test_wrong_credentials_are_never_echoed(s3, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kvtier.cold")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3.secret_key[::-1])
    store = ColdStore(f"s3://kvtier-tests/{uuid.uuid4().hex[:10]}/p", s3_endpoint=s3.endpoint)
    with pytest.raises(TierUnavailableError, match="is unavailable") as e:
        store.put(KEYS[0], BLOCKS[KEYS[0]])
    assert store.get(KEYS[0]) is None
    texts = [str(e.value), json.dumps(store.stats()), repr(store), *(r.getMessage() for r in caplog.records)]
    for t in texts:
        assert s3.access_key not in t and s3.secret_key[::-1] not in t, t


# ---------------------------------------------------------------- issue 9: versions, squatters, URI parameters
def test_versions_are_separate_objects_and_the_newest_is_found(store):
    key = KEYS[0]
    a, b = BLOCKS[KEYS[0]], make_block(KEYS[0], 9)
    store.put(key, a, version=5)
    store.put(key, b, version=7)
    assert sorted(v for k, _, v in store.list_versions() if k == key) == [5, 7]
    assert store.get(key, version=5).to_arrow().equals(a.to_arrow()), "an old version is read as itself"
    assert store.get(key).to_arrow().equals(b.to_arrow()), "no version: the newest stored"
    assert store.delete(key, 5) and not store.contains(key, 5) and store.contains(key, 7)
    assert store.delete(key) and store.get(key) is None


def test_a_directory_at_an_object_path_never_fails_the_write(local):
    """Issue 9 item 10: a directory there made every later demotion of the key fail (the block dropped)."""
    key, block = KEYS[1], BLOCKS[KEYS[1]]
    os.makedirs(local._path(key), exist_ok=True)
    os.makedirs(local._path(key, 3), exist_ok=True)
    local.put(key, block)
    local.put(key, block, version=3)
    assert local.get(key, version=0) is not None and local.get(key, version=3) is not None


def test_a_fifo_at_an_object_path_is_a_miss_not_a_hang(local):
    """Issue 9 item 10: open() of a FIFO blocked get forever."""
    key = KEYS[2]
    os.makedirs(os.path.dirname(local._path(key)), exist_ok=True)
    os.mkfifo(local._path(key))
    out = []
    t = threading.Thread(target=lambda: out.append(local.get(key)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "get on a FIFO must not block"
    assert out == [None]
    local.put(key, make_block(key, 1))  # and a write moves it aside
    assert local.get(key) is not None


def test_s3_uri_parameters_are_honoured_or_rejected_by_name(s3, monkeypatch):
    """Issue 9 item 13: ?endpoint_override=...&scheme=http was dropped silently (requests went to AWS)."""
    with pytest.raises(ValueError, match="'foo'"):
        ColdStore("s3://bucket/p?foo=1")
    with pytest.raises(ValueError, match="'foo'"):
        TierConfig(cold_uri="s3://bucket/p?endpoint_override=h:1&foo=1")
    with pytest.raises(ValueError, match="s3_endpoint"):
        ColdStore("s3://bucket/p?endpoint_override=h:1", s3_endpoint="http://other:2")
    if not s3.running:
        s3.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    host = s3.endpoint.split("://", 1)[1]
    prefix = f"kvtier-tests/{uuid.uuid4().hex[:10]}/uri"
    uri = f"s3://{prefix}?endpoint_override={host}&scheme=http"
    TierConfig(cold_uri=uri)  # valid
    via_uri = ColdStore(uri)
    via_uri.put(KEYS[0], BLOCKS[KEYS[0]])
    # the object is on the local server, where a store configured the old way finds it
    assert ColdStore(f"s3://{prefix}", s3_endpoint=s3.endpoint).get(KEYS[0]) is not None
