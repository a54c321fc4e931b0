"""The connector's worker side without vLLM: saves off the engine's way, loads that fail to recompute.

``WorkerSide`` over small ``cpu-vec`` paged tensors with the tier replaced by a dict: the
background save runs at the lowest OS priority, a full save queue drops (and counts) instead
of waiting, a saved chunk loads back bit-exact, and a chunk the tier lacks fails its blocks.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kvtier.vllm import pages
from kvtier.vllm.scheduler import LoadSpec, SaveSpec
from kvtier.vllm.worker import SAVE_NICE, WorkerSide

BS, CHUNK, H, D, L = 32, 64, 2, 8, 3


def make(put=None, save_queue=4):
    lay = pages.PageLayout("cpu-vec", 16, BS, H, D, torch.float32)
    layers = [torch.randn(lay.shape()) for _ in range(L)]
    store: dict[str, torch.Tensor] = {}

    def default_put(keys, kvs, codec):
        store.update(zip(keys, kvs))

    w = WorkerSide(layers, lay, CHUNK, "none", save_queue, 5.0, get=lambda keys: [store.get(k) for k in keys],
                   put=put or default_put, ready=lambda wait_s=0.0: True)
    return w, layers, lay, store


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="per-thread priorities are Linux's")
def test_the_save_thread_runs_at_the_lowest_priority():
    w, *_ = make()
    try:
        mine = os.nice(0)
        end = time.monotonic() + 5.0  # the thread lowers itself as it starts
        background, handoff = w._savers
        while os.getpriority(os.PRIO_PROCESS, background.native_id) != SAVE_NICE and time.monotonic() < end:
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, background.native_id) == SAVE_NICE
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the engine's thread is not
        assert os.getpriority(os.PRIO_PROCESS, handoff.native_id) == mine  # nor the remote decode's saves
    finally:
        w.close(2.0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux thread affinities and 2 usable cores")
def test_the_save_threads_leave_the_forwards_openmp_cores(monkeypatch):
    """vLLM binds its OpenMP team through the worker's environment; the save threads must not inherit the
    team master's one core (they ran there beside the forward while the reserved core idled)."""
    from kvtier.vllm import worker

    cpus = sorted(os.sched_getaffinity(os.getppid()))
    monkeypatch.setenv("GOMP_CPU_AFFINITY", str(cpus[0]))
    assert worker._omp_bound_cpus() == {cpus[0]}
    monkeypatch.setenv("GOMP_CPU_AFFINITY", f"{cpus[0]}-{cpus[1]}")
    assert worker._omp_bound_cpus() >= {cpus[0], cpus[1]}
    monkeypatch.delenv("GOMP_CPU_AFFINITY")
    monkeypatch.setenv("KMP_AFFINITY", f"granularity=fine,explicit,proclist=[{cpus[1]}]")
    assert worker._omp_bound_cpus() == {cpus[1]}
    monkeypatch.delenv("KMP_AFFINITY")
    monkeypatch.setenv("OMP_PLACES", "{%d}" % cpus[0])
    seen = {}

    def probe():
        worker._off_the_forwards_cores()
        seen["cpus"] = os.sched_getaffinity(0)

    t = threading.Thread(target=probe)
    os.sched_setaffinity(0, {cpus[0]})  # this thread plays the bound team master; the probe inherits it
    try:
        t.start()
        t.join(10)
    finally:
        os.sched_setaffinity(0, set(cpus))
    assert seen["cpus"] == set(cpus) - {cpus[0]}
    monkeypatch.setenv("OMP_PLACES", "{%s}" % ",".join(map(str, cpus)))  # no core left free: all of them
    t = threading.Thread(target=probe)
    t.start()
    t.join(10)
    assert seen["cpus"] == set(cpus)


def test_saved_chunks_load_back_exactly_and_a_missing_one_fails_its_blocks():
    w, layers, lay, store = make()
    try:
        w.save([SaveSpec("r", ["k0", "k1"], [[0, 1], [2, 3]])])
        assert w.flush(10.0) and set(store) == {"k0", "k1"}
        want = pages.gather(layers, lay, torch.tensor([[0, 1], [2, 3]]), CHUNK)
        w.load([LoadSpec("r2", ["k0", "k1", "gone"], [[4, 5], [6, 7], [8, 9]])])
        got = pages.gather(layers, lay, torch.tensor([[4, 5], [6, 7]]), CHUNK)
        assert torch.equal(got, want)
        assert w.take_errors() == {8, 9} and w.counters["loaded_chunks"] == 2
    finally:
        w.close(2.0)


def test_chunks_go_straight_into_scattered_blocks_as_scatter_puts_them():
    lay = pages.PageLayout("cpu-vec", 16, BS, H, D, torch.float32)
    kvs = [torch.randn(L, 2, H, CHUNK, D) for _ in range(3)]
    rows = [[3, 4], [9, 1], [-1, 12]]  # consecutive, out of order, one block vLLM already holds
    want = [torch.randn(lay.shape()) for _ in range(L)]
    got = [t.clone() for t in want]
    pages.scatter(want, lay, torch.tensor(rows), torch.stack(kvs))
    pages.write_chunks(got, lay, rows, kvs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="does not fit"):
        pages.write_chunks(got, lay, [[0, 1]], [torch.randn(L, 2, H, CHUNK + BS, D)])


def test_a_full_save_queue_drops_the_save_and_counts_it():
    gate = threading.Event()
    w, *_ = make(put=lambda keys, kvs, codec: gate.wait(10.0), save_queue=1)
    try:
        for i in range(4):  # one in the saver's hands, one queued, the rest dropped
            w.save([SaveSpec(f"r{i}", [f"k{i}"], [[0, 1]])])
        assert w.counters["dropped_saves"] >= 2
    finally:
        gate.set()
        w.close(5.0)


def test_the_backlog_is_bounded_in_bytes_and_a_dropped_save_copies_nothing(monkeypatch):
    from kvtier.vllm import worker

    gate = threading.Event()
    copies = []
    real = pages.copy_pages
    monkeypatch.setattr(pages, "copy_pages", lambda *a: copies.append(1) or real(*a))
    w, *_ = make(put=lambda keys, kvs, codec: gate.wait(10.0), save_queue=8)
    monkeypatch.setattr(worker, "SAVE_QUEUE_BYTES", w._chunk_bytes)  # room for one chunk of raw pages
    try:
        w.save([SaveSpec("big", ["a", "b"], [[0, 1], [2, 3]])])  # larger than the bound: taken when empty
        w.save([SaveSpec("r1", ["c"], [[4, 5]])])
        w.save([SaveSpec("r2", ["d"], [[6, 7]])])
        assert w.counters["dropped_saves"] == 2 and len(copies) == 1
    finally:
        gate.set()
        w.close(5.0)
    assert w.counters["saved_chunks"] == 2 and w._queued_bytes == 0


def test_the_save_waits_for_the_engine_to_pause_and_declines_after_its_bound(monkeypatch):
    from kvtier.vllm import worker

    puts = []
    w, *_ = make(put=lambda keys, kvs, codec: puts.extend(keys))
    try:
        w.load([])  # a forward starts (vLLM calls start_load_kv before every forward)
        w.save([SaveSpec("r", ["k0"], [[0, 1]])])  # wait_for_save ends a forward; a new one starts at once:
        w.load([])
        time.sleep(0.3)
        assert puts == []  # nothing is compressed or put while a forward runs
        w.save([])  # that forward ends: the engine pauses
        assert w.flush(5.0) and puts == ["k0"]
        monkeypatch.setattr(worker, "SAVE_IDLE_WAIT_S", 0.2)
        w.save([SaveSpec("r2", ["k1", "k2"], [[2, 3], [4, 5]])])
        w.load([])  # and a forward that never ends
        assert w.flush(5.0) and puts == ["k0"] and w.counters["dropped_saves"] == 2
    finally:
        w.save([])
        w.close(2.0)


def test_a_prefills_saves_for_a_remote_decode_do_not_wait_for_the_engine_to_pause():
    """A remote decode waits for these chunks (handoff_wait_s): they are put while forwards keep running."""
    puts = []
    w, *_ = make(put=lambda keys, kvs, codec: puts.extend(keys))
    try:
        w.load([])  # a forward starts and never ends: a background save would wait (and be declined after 30 s)
        w.save([SaveSpec("bg", ["k0"], [[0, 1]])])
        w.load([])
        w.save([SaveSpec("prefill", ["h0", "h1"], [[2, 3], [4, 5]], handoff=True)])
        w.load([])
        end = time.monotonic() + 5.0
        while len(puts) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        assert puts == ["h0", "h1"], "the handoff's chunks are stored at once, the background one still waits"
    finally:
        w.save([])  # the engine pauses: the background save goes too
        assert w.flush(5.0) and sorted(puts) == ["h0", "h1", "k0"]
        w.close(2.0)
