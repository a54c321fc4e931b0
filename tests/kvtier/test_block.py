"""The Arrow block format: round trips, zero-copy reads, and rejection of bad input.

``Block.from_arrow`` reads untrusted bytes (cold objects, network). Every
malformed input must raise ``BlockFormatError`` with a message saying what is
wrong; a mutated block that still parses may only differ in padding, so its
tensor must be bit-identical to the original. The hypothesis test at the end
throws random mutations at serialized blocks, in-process, so a crash of the
interpreter would fail the suite.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import Block, BlockFormatError, compress, decompress
from kvtier.block import FORMAT_VERSION, MAX_HEADER_BYTES
from kvtier.keys import chunk_keys, model_fingerprint

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MODEL = model_fingerprint("test-model", 2, 3, 16, "bfloat16")
KEY = chunk_keys(list(range(8)), MODEL, chunk_tokens=8)[0]


def make_kv(dtype=torch.bfloat16, shape=(2, 2, 3, 8, 16), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view: bit-exact comparison (NaN payloads and -0.0 included)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def arrow_stream(schema: pa.Schema, batches: list[pa.RecordBatch]) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        for b in batches:
            w.write_batch(b)
    return sink.getvalue()


def rebuild(block: Block, **header_changes) -> pa.Buffer:
    """A block's wire bytes with header fields replaced, payload untouched (checksum not recomputed)."""
    header = block.header() | header_changes
    names = list(block.buffers)
    schema = pa.schema([pa.field(n, pa.large_binary(), nullable=False) for n in names],
                       metadata={b"kvtier": json.dumps(header).encode()})
    batch = pa.record_batch([pa.array([block.buffers[n].to_pybytes()], pa.large_binary()) for n in names], schema=schema)
    return arrow_stream(schema, [batch])


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("codec", ["none", "none+zstd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(dtype, codec):
    kv = make_kv(dtype, shape=(3, 2, 5, 7, 16))  # odd sizes
    block = compress(kv, codec, key=KEY, model_id=MODEL)
    wire = block.to_arrow()
    back = Block.from_arrow(wire, expect_key=KEY, expect_model=MODEL)
    for f in ("key", "model", "codec", "shape", "dtype", "checksum"):
        assert getattr(back, f) == getattr(block, f), f
    assert dict(back.params) == dict(block.params)
    assert {n: b.to_pybytes() for n, b in back.buffers.items()} == {n: b.to_pybytes() for n, b in block.buffers.items()}
    out = decompress(back)
    assert out.dtype == dtype and out.shape == kv.shape
    assert torch.equal(bits(out), bits(kv))
    # the same bytes again (what a cold read or a network hop yields) parse the same
    again = Block.from_arrow(wire.to_pybytes())
    assert torch.equal(bits(decompress(again)), bits(kv))


def test_special_values_survive_none_codec_bit_exact():
    kv = make_kv(torch.float16)
    kv.view(-1)[:4] = torch.tensor([-0.0, 65504.0, -65504.0, 6e-8], dtype=torch.float16)  # -0, max, min, subnormal
    back = decompress(Block.from_arrow(compress(kv, "none", key=KEY, model_id=MODEL).to_arrow()))
    assert torch.equal(bits(back), bits(kv))


def test_from_arrow_is_zero_copy():
    block = compress(make_kv(), "none", key=KEY, model_id=MODEL)
    for src in (block.to_arrow(), pa.py_buffer(block.to_arrow().to_pybytes())):
        back = Block.from_arrow(src)
        lo, hi = src.address, src.address + src.size
        for name, b in back.buffers.items():
            assert lo <= b.address and b.address + b.size <= hi, f"payload {name!r} was copied out of the input buffer"
        assert back.to_arrow() is src  # the wire bytes are kept, not re-serialized


def test_sizes_count_every_serialized_byte():
    kv = make_kv(torch.bfloat16)
    block = compress(kv, "none", key=KEY, model_id=MODEL)
    wire = block.to_arrow()
    assert block.to_arrow() is wire  # cached
    assert block.nbytes == wire.size == len(wire.to_pybytes())
    assert block.raw_nbytes == kv.numel() * 2
    assert sum(b.size for b in block.buffers.values()) == kv.numel() * 2
    assert block.nbytes > sum(b.size for b in block.buffers.values())  # header and schema are counted, not hidden
    assert block.ratio == pytest.approx(block.raw_nbytes / block.nbytes)
    assert Block.from_arrow(wire).nbytes == wire.size
    assert "ratio=" in repr(block) and KEY[:12] in repr(block)


# ---------------------------------------------------------------- rejections
@pytest.fixture(scope="module")
def wire() -> bytes:
    return compress(make_kv(), "none", key=KEY, model_id=MODEL).to_arrow().to_pybytes()


def test_every_truncation_is_rejected(wire):
    for n in range(len(wire)):
        with pytest.raises(BlockFormatError, match="truncated|not a block|corrupt"):
            Block.from_arrow(wire[:n])


def test_streams_of_the_wrong_message_count_are_rejected(wire):
    rd = pa.BufferReader(wire)
    pa.ipc.read_message(rd)
    schema_end = rd.tell()
    eos = wire[-8:]
    batch = wire[schema_end:-8]
    with pytest.raises(BlockFormatError, match="truncated"):  # the schema, then the end marker
        Block.from_arrow(wire[:schema_end] + eos)
    with pytest.raises(BlockFormatError, match="more than one record batch"):
        Block.from_arrow(wire[:schema_end] + batch + batch + eos)
    with pytest.raises(BlockFormatError, match="starts with a"):  # a record batch where the schema should be
        Block.from_arrow(batch + eos)
    with pytest.raises(BlockFormatError, match="truncated"):  # an end marker where the batch's length says more
        Block.from_arrow(wire[:schema_end] + eos + eos)


def test_appended_bytes_are_rejected(wire):
    with pytest.raises(BlockFormatError, match="end-of-stream"):
        Block.from_arrow(wire + b"\x00" * 8)


def test_payload_and_header_bit_flips_fail_the_checksum(wire):
    block = Block.from_arrow(wire)
    data = block.buffers["data"]
    start = wire.index(data.to_pybytes()[:64])  # where the payload sits in the stream
    for pos in (start, start + 1, start + data.size // 2, start + data.size - 1):
        m = bytearray(wire)
        m[pos] ^= 0x10
        with pytest.raises(BlockFormatError, match="checksum mismatch"):
            Block.from_arrow(bytes(m))
    # a flip in the key inside the JSON header: still valid JSON, fails the checksum
    pos = wire.index(KEY.encode()) + 3
    m = bytearray(wire)
    m[pos] = ord("0") if m[pos] != ord("0") else ord("1")
    with pytest.raises(BlockFormatError, match="checksum mismatch"):
        Block.from_arrow(bytes(m))


def test_every_single_bit_flip_is_rejected_or_harmless(wire):
    kv = decompress(Block.from_arrow(wire))
    harmless = 0
    for pos in range(len(wire)):
        m = bytearray(wire)
        m[pos] ^= 0x04
        try:
            back = Block.from_arrow(bytes(m))
        except BlockFormatError:
            continue
        harmless += 1
        assert (back.key, back.model) == (KEY, MODEL)
        assert torch.equal(bits(decompress(back)), bits(kv)), f"flip at byte {pos} returned different data"
    assert harmless < len(wire) // 20  # only padding/unused flatbuffer bytes may be harmless (~2% here)


def test_wrong_version_is_rejected(wire):
    block = Block.from_arrow(wire)
    with pytest.raises(BlockFormatError, match=f"version 2 is not supported.*reads version {FORMAT_VERSION}"):
        Block.from_arrow(rebuild(block, version=2))
    with pytest.raises(BlockFormatError, match="version '1' is not supported"):
        Block.from_arrow(rebuild(block, version="1"))
    # the rebuild itself is faithful: unchanged header parses
    assert Block.from_arrow(rebuild(block)).checksum == block.checksum


@pytest.mark.parametrize("data, msg", [
    (b"", "0 bytes that do not start an Arrow IPC stream"),
    (b"\x00" * 7, "7 bytes"),
    (b"hello, this is not an Arrow stream at all", "do not start an Arrow IPC stream"),
    (b"\xff\xff\xff\xff" + bytes(range(256)) * 4 + b"\xff\xff\xff\xff\x00\x00\x00\x00", "corrupt or truncated"),
    (b"PAR1" + b"\x00" * 100, "do not start an Arrow IPC stream"),
])
def test_non_arrow_bytes_are_rejected(data, msg):
    with pytest.raises(BlockFormatError, match=msg):
        Block.from_arrow(data)


def test_unviewable_input_is_rejected():
    with pytest.raises(BlockFormatError, match="cannot view int"):
        Block.from_arrow(12345)
    with pytest.raises(BlockFormatError, match="cannot view str"):
        Block.from_arrow("a string")


def test_valid_arrow_that_is_not_a_block_is_rejected(wire):
    block = Block.from_arrow(wire)
    ints = pa.schema([pa.field("x", pa.int64())])
    with pytest.raises(BlockFormatError, match="no 'kvtier' header"):
        Block.from_arrow(arrow_stream(ints, [pa.record_batch([pa.array([1, 2, 3])], schema=ints)]))
    other = ints.with_metadata({b"kvtier": b'{"format": "something-else"}'})
    with pytest.raises(BlockFormatError, match="names no kvtier-block format"):
        Block.from_arrow(arrow_stream(other, [pa.record_batch([pa.array([1])], schema=other)]))
    with pytest.raises(BlockFormatError, match="header is not JSON"):
        bad = ints.with_metadata({b"kvtier": b"{not json"})
        Block.from_arrow(arrow_stream(bad, [pa.record_batch([pa.array([1])], schema=bad)]))
    with pytest.raises(BlockFormatError, match="header is not JSON"):  # nesting deeper than json's recursion limit
        deep = ints.with_metadata({b"kvtier": b"[" * 30000})
        Block.from_arrow(arrow_stream(deep, [pa.record_batch([pa.array([1])], schema=deep)]))
    with pytest.raises(BlockFormatError, match=f"exceeds {MAX_HEADER_BYTES}"):
        big = ints.with_metadata({b"kvtier": b" " * (MAX_HEADER_BYTES + 1)})
        Block.from_arrow(arrow_stream(big, [pa.record_batch([pa.array([1])], schema=big)]))
    # a correct header over columns of the wrong type
    h = ints.with_metadata({b"kvtier": json.dumps(block.header()).encode()})
    with pytest.raises(BlockFormatError, match="binary columns"):
        Block.from_arrow(arrow_stream(h, [pa.record_batch([pa.array([1])], schema=h)]))
    # schema only, no record batch
    with pytest.raises(BlockFormatError, match="ends before its record batch"):
        Block.from_arrow(arrow_stream(h, []))
    # two record batches
    s = pa.schema([pa.field("data", pa.large_binary(), nullable=False)], metadata={b"kvtier": json.dumps(block.header()).encode()})
    one = pa.record_batch([pa.array([block.buffers["data"].to_pybytes()], pa.large_binary())], schema=s)
    with pytest.raises(BlockFormatError, match="more than one record batch"):
        Block.from_arrow(arrow_stream(s, [one, one]))


@pytest.mark.parametrize("change, msg", [
    (dict(dtype="int8"), "dtype 'int8' is not one of"),
    (dict(shape=[2, -2, 3]), "shape=.* is not a list of positive ints"),
    (dict(shape=[1 << 20, 1 << 20, 8]), "exceeds the maximum block size"),
    (dict(params=[1, 2]), "params=.* is not an object"),
    (dict(key=7), "key=7 is not a string"),
    (dict(checksum="abc"), "bad checksum field"),
])
def test_bad_header_fields_are_rejected(wire, change, msg):
    with pytest.raises(BlockFormatError, match=msg):
        Block.from_arrow(rebuild(Block.from_arrow(wire), **change))


def test_swapped_or_foreign_block_is_rejected_with_expectations(wire):
    other_key = chunk_keys(list(range(8, 16)), MODEL, chunk_tokens=8)[0]
    with pytest.raises(BlockFormatError, match=f"holds key '{KEY}', expected '{other_key}'"):
        Block.from_arrow(wire, expect_key=other_key)
    with pytest.raises(BlockFormatError, match="belongs to model 'test-model.*', expected 'other-model'"):
        Block.from_arrow(wire, expect_key=KEY, expect_model="other-model")
    assert Block.from_arrow(wire, expect_key=KEY, expect_model=MODEL).key == KEY


def test_build_rejects_bad_headers():
    with pytest.raises(BlockFormatError, match="dtype 'int8'"):
        Block.build(key=KEY, model=MODEL, codec="none", shape=(2,), dtype="int8", params={}, buffers={"data": b"ab"})
    with pytest.raises(BlockFormatError, match="shape="):
        Block.build(key=KEY, model=MODEL, codec="none", shape=(0, 2), dtype="float32", params={}, buffers={"data": b""})


# ---------------------------------------------------------------- random mutations
_BLOCKS = {
    "none": compress(make_kv(torch.bfloat16, seed=1), "none", key=KEY, model_id=MODEL),
    "none+zstd": compress(make_kv(torch.float16, seed=2), "none+zstd", key=KEY, model_id=MODEL),
}
_WIRES = {name: b.to_arrow().to_pybytes() for name, b in _BLOCKS.items()}
_TENSORS = {name: bits(decompress(b)) for name, b in _BLOCKS.items()}


@st.composite
def mutation(draw):
    name = draw(st.sampled_from(sorted(_WIRES)))
    data = bytearray(_WIRES[name])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "delete", "random"]))
        n = len(data)
        if kind == "flip" and n:
            data[draw(st.integers(0, n - 1))] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, n)):]
        elif kind == "insert":
            pos = draw(st.integers(0, n))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "overwrite" and n:
            pos = draw(st.integers(0, n - 1))
            chunk = draw(st.binary(min_size=1, max_size=32))
            data[pos:pos + len(chunk)] = chunk
        elif kind == "delete" and n:
            pos = draw(st.integers(0, n - 1))
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == "random":
            data = bytearray(draw(st.binary(min_size=0, max_size=256)))
    return name, bytes(data)


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation())
def test_random_mutations_raise_block_format_error_or_change_nothing(case):
    name, data = case
    try:
        back = Block.from_arrow(data)
    except BlockFormatError as e:
        assert str(e)  # a message, not a bare exception
        return
    # it parsed: the mutation may only have touched padding or unused flatbuffer bytes
    orig = _BLOCKS[name]
    assert (back.key, back.model, back.codec, back.shape, back.dtype) == (orig.key, orig.model, orig.codec, orig.shape, orig.dtype)
    assert torch.equal(bits(decompress(back)), _TENSORS[name])


# ---------------------------------------------------------------- payload sums (a GPU reader's check)
def sums_block(seed=0):
    from kernels.wsum import hex_sums

    kv = make_kv(seed=seed)
    return Block.build(key=KEY, model=MODEL, codec="none", shape=tuple(kv.shape), dtype="bfloat16", params={},
                       buffers={"data": kv.view(-1).view(torch.uint8).numpy()},
                       sums=hex_sums({"data": kv})), kv


def test_a_block_with_payload_sums_round_trips_and_its_header_check_gives_the_lanes():
    from kernels.wsum import sums_torch

    block, kv = sums_block()
    back = Block.from_arrow(block.to_arrow(), expect_key=KEY)
    assert back.sums == block.sums and back.header_checksum == block.header_checksum
    assert back.check_header() == {"data": sums_torch(kv.reshape(-1).view(torch.uint8))}
    assert torch.equal(bits(decompress(back)), bits(kv))
    assert compress(kv, "none", key=KEY, model_id=MODEL).sums is None, "a block made on the CPU carries none"
    with pytest.raises(BlockFormatError, match="carries no payload sums"):
        compress(kv, "none", key=KEY, model_id=MODEL).check_header()
    with pytest.raises(ValueError, match="sums name buffers"):
        Block.build(key=KEY, model=MODEL, codec="none", shape=(2,), dtype="bfloat16", params={},
                    buffers={"data": b"abcd"}, sums={"other": "0" * 32})


def test_a_changed_header_fails_the_header_check_and_bad_sums_fields_are_rejected():
    block, _ = sums_block(1)
    forged = rebuild(block, params={"x": 1})  # header changed, both checksums left as they were
    with pytest.raises(BlockFormatError, match="checksum mismatch"):
        Block.from_arrow(forged)
    with pytest.raises(BlockFormatError, match="header checksum mismatch"):
        Block.from_arrow(forged, verify=False).check_header()
    size, hexd = block.sums["data"]
    cs = block.header()["checksum"]
    for sums, msg in [({"data": [size + 1, hexd]}, "its sum covers"), ({"data": [size, "xyz"]}, "32 hex digits"),
                      ({"nope": [size, hexd]}, "payload sums name"), ([1], "payload sums name")]:
        with pytest.raises(BlockFormatError, match=msg):
            Block.from_arrow(rebuild(block, sums=sums), verify=False)
    with pytest.raises(BlockFormatError, match="without a header checksum"):
        Block.from_arrow(rebuild(block, checksum={"algo": "xxh3_128", "hex": cs["hex"]}), verify=False)
