"""kvtier.tiers.inflate: +zstd payloads inflated through libzstd with the GIL released, same checks as the codecs."""

import threading
import time

import pytest
import torch

import kvtier
from kvtier.tiers.hot import entry_buffers
from kvtier.tiers.inflate import inflate, libzstd

pytestmark = pytest.mark.skipif(libzstd() is None, reason="no system libzstd here: kvtier.codecs' zstandard path is used")


def block(codec="kivi4+zstd", seed=0):
    kv = torch.randn((2, 2, 2, 256, 64), generator=torch.Generator().manual_seed(seed))
    return kvtier.compress(kv, codec, key=kvtier.chunk_keys(list(range(256)), f"inf-{seed}")[0])


def test_inflate_gives_the_codecs_bytes_and_a_decodable_block():
    b = block()
    codec, params, bufs = entry_buffers(b, torch.device("cpu"))
    assert codec == "kivi4" and "zstd" not in params
    from kvtier.codecs import _zstd_decompress

    want = _zstd_decompress(b.buffers, b.params["zstd"], b.raw_nbytes)
    assert {n: t.numpy().tobytes() for n, t in bufs.items()} == want
    assert torch.equal(kvtier.get_codec("kivi4").decode(bufs, params, b.shape, torch.float32, torch.device("cpu")),
                       kvtier.decompress(b))


def test_bad_sizes_and_bad_frames_are_corrupt_blocks():
    b = block()
    sizes = dict(b.params["zstd"])
    name = sorted(sizes)[0]
    with pytest.raises(kvtier.BlockFormatError, match="do not match"):
        inflate(b.buffers, {name: sizes[name]}, b.raw_nbytes)
    with pytest.raises(kvtier.BlockFormatError, match="claims"):
        inflate(b.buffers, dict(sizes, **{name: 10 * b.raw_nbytes}), b.raw_nbytes)
    with pytest.raises(kvtier.BlockFormatError, match="inflated to|Destination"):
        inflate(b.buffers, dict(sizes, **{name: sizes[name] + 1}), b.raw_nbytes)
    with pytest.raises(kvtier.BlockFormatError, match="corrupt"):
        inflate(dict(b.buffers, **{name: b"\x00" * 64}), sizes, b.raw_nbytes)


def test_the_gil_is_released_while_inflating():
    import zstandard

    raw = torch.randint(0, 4, (64 << 20,), dtype=torch.uint8).numpy().tobytes()  # 64 MiB, compresses ~4x
    frame = zstandard.ZstdCompressor(level=1).compress(raw)
    done = threading.Event()
    ticks = [0]

    def work():
        out = inflate({"x": frame}, {"x": len(raw)}, len(raw))
        assert out["x"].numpy().tobytes()[:4096] == raw[:4096]
        done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():  # this thread runs Python meanwhile: only possible if the inflate let go of the GIL
        ticks[0] += 1
        time.sleep(0)
    t.join()
    assert ticks[0] > 100, f"the main thread ran {ticks[0]} times during a 64 MiB inflate"
