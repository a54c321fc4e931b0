"""Block: one compressed KV chunk, and its Arrow IPC wire format.

A block is a header (format version, key, model fingerprint, codec and its
parameters, shape, dtype, raw size, checksum) plus named payload buffers
(codes, scales, ...). It is serialized as an Arrow IPC stream holding one
record batch of one row: one binary column per payload buffer, the header as
JSON in the schema metadata. The same bytes travel over the network, sit in
warm shards and are written as cold objects.

``Block.from_arrow`` treats its input as untrusted: anything that is not a
well-formed block of this format version whose XXH3-128 checksum (over the
header and every payload byte) matches raises ``BlockFormatError``. It never
returns partial data. Payload buffers of a parsed block are zero-copy slices of
the input buffer.

A block built from tensors on a GPU also carries ``sums``: per payload buffer
its size and ``kernels.wsum`` lanes (a checksum the GPU computes at memory
bandwidth), inside the header (so the XXH3 covers them), and the checksum
field then holds a second XXH3-128 of the header alone. A reader that copies
the payload straight to a GPU verifies the header on the host
(``check_header``: microseconds) and the payload there, against ``sums``,
instead of hashing every byte on the host first. Older readers see a header
field they do not know: the XXH3 then fails and the block is a miss, never
wrong data.

This module knows nothing of codecs beyond their names, nor of tiers or Ray.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import xxhash

from kvtier.errors import BlockFormatError

FORMAT_NAME = "kvtier-block"
FORMAT_VERSION = 1
MAX_BLOCK_BYTES = 4 << 30  # raw bytes of one chunk; a 256-token chunk of a 405B model is ~130 MiB
MAX_HEADER_BYTES = 64 << 10
_META_KEY = b"kvtier"
_ARROW_CONTINUATION = b"\xff\xff\xff\xff"
_ARROW_EOS = _ARROW_CONTINUATION + b"\0\0\0\0"  # what ``ipc.new_stream(...).close()`` writes last
_HEX32 = re.compile(r"[0-9a-f]{32}")

DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}

BufferLike = Any  # pa.Buffer | bytes | bytearray | memoryview | numpy array


def _as_arrow_buffer(b: BufferLike) -> pa.Buffer:
    if isinstance(b, pa.Buffer):
        return b
    if hasattr(b, "detach") and hasattr(b, "numpy"):  # a CPU torch tensor
        b = b.detach().contiguous().view(-1).numpy().view("u1")
    return pa.py_buffer(b)


@dataclass(frozen=True, eq=False)
class Block:
    """One compressed chunk. Build with ``Block.build`` (computes the checksum)
    or ``Block.from_arrow`` (verifies it)."""

    key: str
    model: str
    codec: str
    shape: tuple[int, ...]
    dtype: str
    params: Mapping[str, Any]
    buffers: Mapping[str, pa.Buffer]
    checksum: str
    sums: Mapping[str, tuple[int, str]] | None = None  # buffer name -> (bytes, wsum lanes in hex)
    header_checksum: str | None = None  # XXH3-128 of the header alone, when ``sums`` is set
    version: int = FORMAT_VERSION
    _wire: list = field(default_factory=list, repr=False, compare=False)  # cache of to_arrow()

    # ---- construction -------------------------------------------------
    @classmethod
    def build(
        cls,
        *,
        key: str | None,
        model: str | None,
        codec: str,
        shape: tuple[int, ...],
        dtype: str,
        params: Mapping[str, Any] | None,
        buffers: Mapping[str, BufferLike],
        sums: Mapping[str, str] | None = None,
    ) -> "Block":
        """``sums``: each buffer's ``kernels.wsum`` lanes in hex, computed where the bytes were made (a GPU)."""
        bufs = {str(name): _as_arrow_buffer(b) for name, b in buffers.items()}
        sized = None
        if sums is not None:
            if set(sums) != set(bufs):
                raise ValueError(f"sums name buffers {sorted(sums)}, the block has {sorted(bufs)}")
            sized = {n: (bufs[n].size, str(sums[n])) for n in sorted(bufs)}
        header = _header_dict(key or "", model or "", codec, tuple(int(s) for s in shape), dtype, dict(params or {}),
                              sized)
        _check_header(header)
        return cls(
            key=header["key"], model=header["model"], codec=codec, shape=tuple(header["shape"]), dtype=dtype,
            params=header["params"], buffers=bufs, checksum=_checksum(header, bufs), sums=sized,
            header_checksum=_header_digest(header) if sized else None,
        )

    # ---- sizes --------------------------------------------------------
    @property
    def raw_nbytes(self) -> int:
        """Bytes of the uncompressed chunk this block stands for."""
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        """Serialized size: header, schema, padding and every payload byte."""
        return self.to_arrow().size

    @property
    def ratio(self) -> float:
        return self.raw_nbytes / self.nbytes

    # ---- wire format --------------------------------------------------
    def header(self) -> dict[str, Any]:
        h = self._header_dict()
        h["checksum"] = {"algo": "xxh3_128", "hex": self.checksum}
        if self.header_checksum is not None:
            h["checksum"]["header"] = self.header_checksum
        return h

    def _header_dict(self) -> dict[str, Any]:
        return _header_dict(self.key, self.model, self.codec, self.shape, self.dtype, dict(self.params), self.sums)

    def to_arrow(self) -> pa.Buffer:
        """The block as one Arrow IPC stream in a ``pyarrow.Buffer`` (cached)."""
        if self._wire:
            return self._wire[0]
        names = list(self.buffers)
        meta = {_META_KEY: json.dumps(self.header(), sort_keys=True, separators=(",", ":")).encode()}
        schema = pa.schema([pa.field(n, pa.large_binary(), nullable=False) for n in names], metadata=meta)
        # zero-copy: each column is one value whose data buffer is the payload buffer itself
        arrays = [pa.Array.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(np.array([0, self.buffers[n].size], dtype="<i8")),
                                                              self.buffers[n]]) for n in names]
        batch = pa.record_batch(arrays, schema=schema)
        # size first (a mock stream copies nothing), then write once into a buffer of that size:
        # a growing BufferOutputStream re-allocated and copied 32 MiB blocks (~120 ms here vs ~4 ms)
        mock = pa.MockOutputStream()
        with pa.ipc.new_stream(mock, schema) as writer:
            writer.write_batch(batch)
        buf = pa.allocate_buffer(mock.size())
        with pa.ipc.new_stream(pa.FixedSizeBufferWriter(buf), schema) as writer:
            writer.write_batch(batch)
        self._wire.append(buf)
        return buf

    @classmethod
    def from_arrow(cls, buf: BufferLike, expect_key: str | None = None, expect_model: str | None = None, *,
                   verify: bool = True) -> "Block":
        """Parse and verify a serialized block. Raises ``BlockFormatError`` for
        anything else, including a valid block of another key or model when
        ``expect_key``/``expect_model`` are given (a swapped or foreign object).
        ``verify=False`` checks everything but the payload checksum: the caller
        must hash the payload itself (``hasher``, ``buffer_prefix``) and compare
        with ``checksum`` before using any byte (the load pipeline does, while
        copying: one pass over the bytes instead of two)."""
        try:
            buf = _as_arrow_buffer(buf)
        except (TypeError, ValueError, BufferError) as e:
            raise BlockFormatError(f"not a block: cannot view {type(buf).__name__} as bytes ({e})") from None
        if buf.size < 8 or buf[:4].to_pybytes() != _ARROW_CONTINUATION:
            raise BlockFormatError(f"not a block: {buf.size} bytes that do not start an Arrow IPC stream")
        if buf[buf.size - 8:].to_pybytes() != _ARROW_EOS:
            # without this, a stream cut exactly before its 8-byte end marker (or with bytes appended) still parses
            raise BlockFormatError(f"truncated block: {buf.size} bytes that do not end with the Arrow end-of-stream marker")
        try:
            # the stream's two messages read directly (11 us; a stream reader took 25 on the same bytes):
            # a schema, one record batch, then nothing but the end-of-stream marker checked above
            rd = pa.BufferReader(buf)
            first = pa.ipc.read_message(rd)
            if first.type != "schema":
                raise BlockFormatError(f"not a block: the Arrow stream starts with a {first.type} message")
            schema = pa.ipc.read_schema(first)
            names = schema.names  # decodes field names as UTF-8: a flipped byte there raises UnicodeDecodeError
            if rd.tell() >= buf.size - 8:
                raise BlockFormatError("truncated block: the Arrow stream ends before its record batch")
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(rd), schema)
            if rd.tell() != buf.size - 8:
                raise BlockFormatError("not a block: the Arrow stream holds more than one record batch")
            batch.validate(full=True)
        except BlockFormatError:
            raise
        except EOFError:  # read_message met the end-of-stream marker where a message should be
            raise BlockFormatError("truncated block: the Arrow stream ends before its record batch") from None
        except (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError, OverflowError,
                UnicodeDecodeError) as e:
            raise BlockFormatError(f"corrupt or truncated block: {type(e).__name__}: {str(e)[:200]}") from None

        meta = schema.metadata or {}
        raw = meta.get(_META_KEY)
        if raw is None:
            raise BlockFormatError("not a kvtier block: the Arrow schema has no 'kvtier' header")
        if len(raw) > MAX_HEADER_BYTES:
            raise BlockFormatError(f"corrupt block: header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            header = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: '[' * 30000 in 64 KiB
            raise BlockFormatError(f"corrupt block: header is not JSON ({type(e).__name__}: {str(e)[:100]})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise BlockFormatError("not a kvtier block: header names no kvtier-block format")
        version = header.get("version")
        if version != FORMAT_VERSION:
            raise BlockFormatError(f"block format version {version!r} is not supported (this kvtier reads version {FORMAT_VERSION})")
        _check_header(header)
        cs = header.get("checksum")
        if not isinstance(cs, dict) or cs.get("algo") != "xxh3_128" or not isinstance(cs.get("hex"), str):
            raise BlockFormatError(f"corrupt block: bad checksum field {cs!r}")
        sums, hcs = header.get("sums"), cs.get("header")
        if (sums is None) != (hcs is None) or not (hcs is None or isinstance(hcs, str)):
            raise BlockFormatError(f"corrupt block: payload sums {sums!r} without a header checksum, or the reverse")

        if batch.num_rows != 1 or any(f.type != pa.large_binary() for f in schema):
            raise BlockFormatError(f"corrupt block: expected one row of binary columns, got {batch.num_rows} rows of {schema.types}")
        buffers: dict[str, pa.Buffer] = {}
        for name, col in zip(names, batch.columns):
            if col.null_count:
                raise BlockFormatError(f"corrupt block: payload buffer {name!r} is null")
            # slice the column's data buffer by its (validated) offsets: a zero-copy view of ``buf``;
            # ``col[0].as_buffer()`` would copy the payload (measured: a new allocation in pyarrow 26)
            _, offsets, data = col.buffers()
            start, end = struct.unpack_from("<qq", offsets, 8 * col.offset)
            buffers[name] = data.slice(start, end - start) if data is not None else pa.py_buffer(b"")
        if len(buffers) != len(names):
            raise BlockFormatError("corrupt block: duplicate payload buffer names")
        if sums is not None:
            sums = _check_sums(sums, buffers)

        try:
            want = _checksum(_header_dict(header["key"], header["model"], header["codec"], tuple(header["shape"]),
                                          header["dtype"], header["params"], sums), buffers) if verify else cs["hex"]
        except RecursionError:  # params nested just below json.loads' depth limit can exceed json.dumps' limit
            raise BlockFormatError("corrupt block: header params nested too deeply") from None
        if want != cs["hex"]:
            raise BlockFormatError(f"corrupt block {header['key']!r}: payload checksum mismatch (stored {cs['hex'][:16]}…, computed {want[:16]}…)")
        if expect_key is not None and header["key"] != expect_key:
            raise BlockFormatError(f"block holds key {header['key']!r}, expected {expect_key!r}")
        if expect_model is not None and header["model"] != expect_model:
            raise BlockFormatError(f"block {header['key']!r} belongs to model {header['model']!r}, expected {expect_model!r}")
        block = cls(key=header["key"], model=header["model"], codec=header["codec"], shape=tuple(header["shape"]),
                    dtype=header["dtype"], params=header["params"], buffers=buffers, checksum=cs["hex"], sums=sums,
                    header_checksum=hcs)
        block._wire.append(buf)
        return block

    def check_header(self) -> dict[str, tuple[int, int]]:
        """For a reader that verifies the payload on a GPU: the header checked against its own checksum
        (``BlockFormatError`` if it does not match, or if the block has no ``sums``), then each buffer's
        expected ``kernels.wsum`` lanes as ints. The payload is not read here."""
        if self.sums is None:
            raise BlockFormatError(f"block {self.key[:16]!r} carries no payload sums: verify it on the host")
        try:
            got = _header_digest(self._header_dict())
        except RecursionError:
            raise BlockFormatError("corrupt block: header params nested too deeply") from None
        if got != self.header_checksum:
            raise BlockFormatError(f"corrupt block {self.key!r}: header checksum mismatch (stored "
                                   f"{str(self.header_checksum)[:16]}…, computed {got[:16]}…)")
        return {n: (int(h[:16], 16), int(h[16:], 16)) for n, (_, h) in self.sums.items()}

    def hasher(self):
        """An XXH3-128 state fed with this block's header: feed it, per payload buffer in sorted name order,
        ``buffer_prefix(name, size)`` then the buffer's bytes (in slices, any size); its ``hexdigest()`` then
        equals ``checksum`` for an intact block."""
        h = xxhash.xxh3_128()
        h.update(_header_json(self._header_dict()))
        return h

    @staticmethod
    def buffer_prefix(name: str, size: int) -> bytes:
        return name.encode() + b"\0" + size.to_bytes(8, "little")

    def __repr__(self) -> str:
        return (f"Block(key={self.key[:12]!r}…, model={self.model!r}, codec={self.codec!r}, shape={self.shape}, "
                f"dtype={self.dtype}, nbytes={self.nbytes}, ratio={self.ratio:.2f})")


def _header_dict(key: str, model: str, codec: str, shape: tuple[int, ...], dtype: str, params: dict,
                 sums: Mapping[str, tuple[int, str]] | None = None) -> dict[str, Any]:
    h = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "key": key, "model": model, "codec": codec,
         "shape": list(shape), "dtype": dtype, "params": params}
    if sums is not None:
        h["sums"] = {n: [int(size), hexd] for n, (size, hexd) in sums.items()}
    return h


def _check_sums(sums: Any, buffers: Mapping[str, pa.Buffer]) -> dict[str, tuple[int, str]]:
    """The header's ``sums`` field, checked against the parsed buffers (names, sizes, 32 hex digits)."""
    if not isinstance(sums, dict) or set(sums) != set(buffers):
        raise BlockFormatError(f"corrupt block: payload sums name {sorted(sums) if isinstance(sums, dict) else sums!r}, "
                               f"the block holds {sorted(buffers)}")
    out = {}
    for n in sorted(sums):
        v = sums[n]
        if not (isinstance(v, list) and len(v) == 2 and type(v[0]) is int and isinstance(v[1], str)
                and _HEX32.fullmatch(v[1])):
            raise BlockFormatError(f"corrupt block: payload sum {n!r}={v!r} is not [bytes, 32 hex digits]")
        if v[0] != buffers[n].size:
            raise BlockFormatError(f"corrupt block: payload buffer {n!r} holds {buffers[n].size} bytes, "
                                   f"its sum covers {v[0]}")
        out[n] = (v[0], v[1])
    return out


def _header_digest(header: Mapping[str, Any]) -> str:
    return xxhash.xxh3_128(_header_json(header)).hexdigest()


def _check_header(h: Mapping[str, Any]) -> None:
    for name in ("key", "model", "codec", "dtype"):
        if not isinstance(h.get(name), str):
            raise BlockFormatError(f"corrupt block header: {name}={h.get(name)!r} is not a string")
    if h["dtype"] not in DTYPE_SIZES:
        raise BlockFormatError(f"block dtype {h['dtype']!r} is not one of {sorted(DTYPE_SIZES)}")
    shape = h.get("shape")
    if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < 2**31 for s in shape)):
        raise BlockFormatError(f"corrupt block header: shape={shape!r} is not a list of positive ints")
    raw = math.prod(shape) * DTYPE_SIZES[h["dtype"]]
    if raw > MAX_BLOCK_BYTES:
        raise BlockFormatError(f"block of {raw} raw bytes exceeds the maximum block size {MAX_BLOCK_BYTES}")
    if not isinstance(h.get("params"), dict):
        raise BlockFormatError(f"corrupt block header: params={h.get('params')!r} is not an object")


def _header_json(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _checksum(header: Mapping[str, Any], buffers: Mapping[str, pa.Buffer]) -> str:
    h = xxhash.xxh3_128()
    h.update(_header_json(header))
    for name in sorted(buffers):
        b = buffers[name]
        h.update(Block.buffer_prefix(name, b.size))
        h.update(memoryview(b))
    return h.hexdigest()
