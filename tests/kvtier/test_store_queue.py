"""The background store stage (kvtier.runtime.store_queue): backpressure, read-your-writes, no drops. No Ray."""

import threading
import time

import pytest

from kvtier.errors import KvtierError
from kvtier.runtime.store_queue import Pending, StoreQueue


def items(*names, size=40):
    return [Pending(n, f"bytes-of-{n}", size) for n in names]


def test_put_returns_at_once_reads_back_and_is_sent_in_order():
    sent, gate = [], threading.Event()

    def send(batch):
        gate.wait(5)
        sent.extend(p.key for p in batch)

    q = StoreQueue(send, max_bytes=1000, timeout_s=5)
    t0 = time.monotonic()
    q.submit(items("a", "b"))
    q.submit(items("c"))
    assert time.monotonic() - t0 < 0.5, "submit does not wait for the send"
    assert q.pending("a").wire == "bytes-of-a" and q.pending("c") is not None  # the putter reads back at once
    gate.set()
    assert q.flush(5)
    assert sent == ["a", "b", "c"] and q.pending("a") is None and q.queued_bytes() == 0
    q.close()


def test_a_full_queue_slows_put_down_and_never_overfills():
    gate, seen = threading.Event(), []
    q = None

    def send(batch):
        seen.append(q.queued_bytes())
        gate.wait(5)

    q = StoreQueue(send, max_bytes=100, timeout_s=5, max_batch=1)
    q.submit(items("a", size=60))
    threading.Timer(0.3, gate.set).start()
    t0 = time.monotonic()
    q.submit(items("b", size=60))  # 60 + 60 > 100: waits until "a" is sent
    assert time.monotonic() - t0 >= 0.25
    assert q.flush(5) and max(seen) <= 100 and q.counters["waits"] == 1 and q.counters["sent"] == 2
    q.close()


def test_a_queue_that_stays_full_raises_naming_the_wait_and_drops_nothing():
    gate = threading.Event()
    sent = []

    def send(batch):
        gate.wait(5)
        sent.extend(p.key for p in batch)

    q = StoreQueue(send, max_bytes=100, timeout_s=0.3)
    q.submit(items("a", size=80))
    with pytest.raises(KvtierError, match="stayed full for 0.3s"):
        q.submit(items("b", size=80))
    gate.set()
    assert q.flush(5) and sent == ["a"]
    q.close()


def test_a_batch_larger_than_the_bound_goes_alone_and_a_failed_send_is_counted():
    calls = []

    def send(batch):
        calls.append([p.key for p in batch])
        if batch[0].key == "bad":
            raise RuntimeError("shard gone")

    q = StoreQueue(send, max_bytes=10, timeout_s=5)
    q.submit(items("big", size=50))
    assert q.flush(5)
    q.submit(items("bad"))
    assert q.flush(5)
    q.submit(items("after"))
    assert q.flush(5)
    assert calls == [["big"], ["bad"], ["after"]] and q.counters["send_errors"] == 1
    q.close()


def test_offer_never_waits():
    gate = threading.Event()
    q = StoreQueue(lambda b: gate.wait(5), max_bytes=100, timeout_s=5)
    assert q.offer(items("a", size=80))
    t0 = time.monotonic()
    assert not q.offer(items("b", size=80)) and time.monotonic() - t0 < 0.2 and q.pending("b") is None
    gate.set()
    assert q.flush(5)
    q.close()


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="max_bytes=0"):
        StoreQueue(lambda b: None, max_bytes=0, timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s=-1"):
        StoreQueue(lambda b: None, max_bytes=1, timeout_s=-1)


def test_sends_stay_within_max_batch_bytes_and_split_a_large_put():
    gate, batches = threading.Event(), []

    def send(batch):
        gate.wait(5)
        batches.append([p.key for p in batch])

    q = StoreQueue(send, max_bytes=10_000, timeout_s=5, max_batch_bytes=100)
    q.submit(items("a", "b", "c", "d", "e", size=40))  # one put of 200 bytes: split into sends of <= 100
    q.submit(items("f", size=40))
    q.submit(items("g", size=150))  # a block larger than the limit still goes, alone
    gate.set()
    assert q.flush(5)
    assert [k for b in batches for k in b] == list("abcdefg"), "every block is sent once, in order"
    assert all(len(b) == 1 or 40 * len(b) <= 100 for b in batches), batches
    assert ["g"] in batches
    q.close()


def test_flush_waits_for_what_was_queued_before_it_not_for_later_puts():
    later = threading.Event()

    def send(batch):
        if any(p.key.startswith("later") for p in batch):
            later.wait(10)  # a later put whose store hangs (its shard or the controller is away)

    q = StoreQueue(send, max_bytes=10_000, timeout_s=5, max_batch=1)
    q.submit(items("early"))
    assert q.flush(5)
    q.submit(items("later-1"))
    time.sleep(0.2)  # later-1 is in flight now
    assert not q.flush(0.5), "later-1 was queued before this flush and is not sent yet"
    q.submit(items("later-2"))
    later.set()
    assert q.flush(5) and q.pending("later-2") is None
    # puts that keep coming from other threads do not hold a flush up: it returns once its own blocks are out
    stop = threading.Event()

    def keep_putting():
        i = 0
        while not stop.is_set():
            q.submit(items(f"bg-{i}"))
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=keep_putting, daemon=True)
    t.start()
    t0 = time.monotonic()
    assert q.flush(5) and time.monotonic() - t0 < 2.0
    stop.set()
    t.join(5)
    q.close()


def test_close_is_bounded_drops_what_is_left_and_stops_its_thread():
    """A close that cannot send everything in time drops the rest and leaves no thread in a send: one
    inside a Ray call at ray.shutdown() is the suspected cause of CI's silent exit 1 (twice)."""
    started, gate, sent, closed_seen = threading.Event(), threading.Event(), [], []

    def send(batch):
        started.set()
        gate.wait(5)
        closed_seen.append(q.closed)  # what a sender checks before retrying
        sent.extend(p.key for p in batch)

    q = StoreQueue(send, max_bytes=1000, timeout_s=5, max_batch=1)
    q.submit(items("a", "b", "c"))
    assert started.wait(5)
    threading.Timer(2.0, gate.set).start()  # "a" ends well after the close gave up (0.2 s flush + 0.2 s join)
    t0 = time.monotonic()
    assert q.close(timeout_s=0.2) is False, "the sender is still in its call: close says so"
    assert time.monotonic() - t0 < 1.5, "close is bounded by its timeout, not by the send"
    q._thread.join(5)
    assert not q._thread.is_alive()
    assert sent == ["a"] and closed_seen == [True], "the batch in flight ends; the queued ones are dropped"
    assert q.pending("b") is None and q.queued_bytes() == 0 and q.flush(0.1), "dropped blocks count as done"
    with pytest.raises(KvtierError, match="closed"):
        q.submit(items("d"))
