"""Codec registry, the Codec interface, and ``compress``/``decompress``.

A codec turns a KV chunk ``[layers, 2, kv_heads, tokens, head_dim]`` into named
payload buffers plus JSON-able parameters, and back. ``compress`` wraps that in
a ``Block`` (header + checksum); ``decompress`` verifies the block's shape/dtype
against the codec and rebuilds the tensor on the requested device.

A ``+zstd`` suffix on any codec name (``"kivi4+zstd"``) adds a lossless zstd
stage over every payload buffer; the raw length of each buffer is recorded in
the block's parameters and enforced on decompression (no zip bombs).

The registry is a plain dict; registering a name twice is an error. Codec
modules register themselves at import; this package imports them all below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

import torch

from kernels.wsum import hex_sums
from kvtier.block import DTYPE_SIZES, MAX_BLOCK_BYTES, Block
from kvtier.errors import BlockFormatError, CodecError

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
ZSTD_SUFFIX = "+zstd"
ZSTD_LEVEL = 3  # level 3: ~400 MB/s on one core here; level 9 gained <2% on quantized codes


class Codec(ABC):
    """One compression scheme. Subclasses set ``name`` and implement two methods.

    ``encode`` returns (buffers, params): buffers are tensors of any dtype on
    the input's device (serialized as their raw bytes), params a JSON-able dict
    that ``decode`` needs (group sizes, seeds). Every byte a codec needs to
    decode must be in one of the two: nothing may come from code defaults.
    ``decode`` gets the buffers back as contiguous uint8 tensors on ``device``.
    A codec may define ``zstd_layout(buffers, params, dtype) -> (buffers, params)``: a lossless
    rearrangement that ``compress`` applies before a ``+zstd`` stage, recorded in the params it
    returns, which ``decode`` must undo.
    """

    name: str = ""
    lossless: bool = False

    def check(self, kv: torch.Tensor) -> None:
        """Codec-specific input constraints (e.g. a power-of-two head_dim). Raise CodecError."""

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        ...

    @abstractmethod
    def decode(self, buffers: Mapping[str, torch.Tensor], params: Mapping[str, Any],
               shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        ...


_REGISTRY: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    if not codec.name or ZSTD_SUFFIX in codec.name:
        raise ValueError(f"codec name {codec.name!r} must be non-empty and must not contain {ZSTD_SUFFIX!r}")
    if codec.name in _REGISTRY:
        raise ValueError(f"codec {codec.name!r} is already registered")
    _REGISTRY[codec.name] = codec
    return codec


def _split(name: str) -> tuple[Codec, bool]:
    if not isinstance(name, str):
        raise CodecError(f"codec={name!r} must be a string naming a codec, not {type(name).__name__}")
    base, zstd = (name[: -len(ZSTD_SUFFIX)], True) if name.endswith(ZSTD_SUFFIX) else (name, False)
    codec = _REGISTRY.get(base)
    if codec is None:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(list_codecs())} (any with a '+zstd' suffix)")
    return codec, zstd


def get_codec(name: str) -> Codec:
    """The codec object for ``name`` (a ``+zstd`` suffix is accepted and names the same base codec)."""
    return _split(name)[0]


def list_codecs() -> list[str]:
    return sorted(_REGISTRY)


def validate_kv(kv: Any) -> None:
    """Raise a clear error for anything that is not a finite 5-d float KV chunk."""
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"kv must be a torch.Tensor, not {type(kv).__name__}")
    if kv.layout != torch.strided:  # sparse/mkldnn: torch's own errors (aten::amax) would not name kv
        raise ValueError(f"kv has layout {kv.layout}; expected a dense tensor (call kv.to_dense())")
    if kv.is_meta:
        raise ValueError(f"kv is a meta tensor (shape {tuple(kv.shape)}, no data); pass a tensor that holds values")
    if kv.dim() != 5:
        raise ValueError(f"kv has {kv.dim()} dims, expected 5: [layers, 2, kv_heads, tokens, head_dim]; got shape {tuple(kv.shape)}")
    if kv.shape[1] != 2:
        raise ValueError(f"kv has {kv.shape[1]} at dim 1, expected 2 (K and V): shape {tuple(kv.shape)}")
    if kv.dtype not in DTYPE_NAMES:
        raise ValueError(f"kv has dtype {kv.dtype}; expected torch.bfloat16, torch.float16 or torch.float32")
    if kv.numel() == 0:
        raise ValueError(f"kv is empty: shape {tuple(kv.shape)}")
    raw = kv.numel() * kv.element_size()
    if raw > MAX_BLOCK_BYTES:  # before any work: isfinite alone would allocate numel bytes
        raise ValueError(f"kv of shape {tuple(kv.shape)} is {raw} raw bytes, over the maximum block size "
                         f"MAX_BLOCK_BYTES={MAX_BLOCK_BYTES}; use smaller chunks (chunk_tokens)")
    # aminmax propagates NaN and keeps ±inf: one reduction and no bool tensor (amax + amin, two passes, were
    # 1.2 ms for a SmolLM2 bf16 chunk on the 2-core box, aminmax 0.38 ms; isfinite().all() on a 32 MiB chunk
    # was 116 ms against 17 for the two). The slow path runs only to name the index.
    lo, hi = torch.aminmax(kv)
    if not bool(torch.isfinite(torch.stack([lo, hi]).float()).all()):
        bad = (~torch.isfinite(kv)).nonzero()[0].tolist()
        raise ValueError(f"kv contains NaN or Inf (first at index {bad}: {kv[tuple(bad)].item()})")


def compress(kv: torch.Tensor, codec: str = "kivi4", key: str | None = None, model_id: str | None = None) -> Block:
    """Compress one KV chunk into a ``Block``. The codec runs where ``kv`` lives
    (Triton kernels on CUDA, the torch path elsewhere)."""
    base, zstd = _split(codec)
    validate_kv(kv)
    base.check(kv)
    if getattr(base, "uses_model", False):  # calibrated codecs look their profile up by model fingerprint
        tensors, params = base.encode(kv.contiguous(), model_id=model_id, zstd=zstd)
    else:
        tensors, params = base.encode(kv.contiguous())
    if zstd and hasattr(base, "zstd_layout"):  # a byte layout the entropy coder gets closer to the codes' entropy in
        tensors, params = base.zstd_layout(tensors, params, kv.dtype)
    # a block made on a GPU carries its payload's wsum lanes, computed there (one launch): a GPU reader
    # verifies it where it lands instead of hashing every byte on the host (kvtier.block)
    sums = hex_sums(tensors) if kv.is_cuda and not zstd else None
    buffers = {name: _to_cpu_bytes(t) for name, t in tensors.items()}
    params = dict(params)
    if zstd:
        buffers, params["zstd"] = _zstd_compress(buffers)
    return Block.build(key=key, model=model_id, codec=codec, shape=tuple(kv.shape), dtype=DTYPE_NAMES[kv.dtype],
                       params=params, buffers=buffers, sums=sums)


def decompress(block: Block, device: str | torch.device | None = None) -> torch.Tensor:
    """Rebuild the KV chunk of ``block`` on ``device`` (default CPU)."""
    if not isinstance(block, Block):
        raise TypeError(f"decompress takes a kvtier.Block, not {type(block).__name__}; use Block.from_arrow(buf) first")
    base, zstd = _split(block.codec)
    device = torch.device(device) if device is not None else torch.device("cpu")
    buffers: Mapping[str, Any] = block.buffers
    if zstd:
        buffers = _zstd_decompress(buffers, block.params.get("zstd"), block.raw_nbytes)
    dev_bufs = {name: _to_device_u8(b, device) for name, b in buffers.items()}
    try:
        out = base.decode(dev_bufs, block.params, tuple(block.shape), TORCH_DTYPES[block.dtype], device)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise BlockFormatError(f"block {block.key[:16]!r} does not decode with codec {block.codec!r}: {type(e).__name__}: {e}") from None
    if tuple(out.shape) != tuple(block.shape) or out.dtype != TORCH_DTYPES[block.dtype]:
        raise BlockFormatError(f"codec {block.codec!r} decoded shape {tuple(out.shape)} {out.dtype}, block says {block.shape} {block.dtype}")
    return out


def _to_cpu_bytes(t: torch.Tensor):
    t = t.detach().contiguous().view(-1)
    if t.dtype != torch.uint8:
        t = t.view(torch.uint8)
    return t.cpu().numpy()


def _to_device_u8(b, device: torch.device) -> torch.Tensor:
    mv = memoryview(b)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    import warnings

    with warnings.catch_warnings():  # read-only Arrow memory: codecs never write into their inputs
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(mv, dtype=torch.uint8)
    return t if device.type == "cpu" else t.to(device, non_blocking=False)


def _zstd_compress(buffers: Mapping[str, Any]) -> tuple[dict[str, bytes], dict[str, int]]:
    import zstandard

    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    out, sizes = {}, {}
    for name, b in buffers.items():
        mv = memoryview(b).cast("B")
        out[name] = cctx.compress(mv)
        sizes[name] = mv.nbytes
    return out, sizes


def _zstd_decompress(buffers: Mapping[str, Any], sizes: Any, raw_nbytes: int) -> dict[str, bytes]:
    import zstandard

    if not isinstance(sizes, dict) or set(sizes) != set(buffers):
        raise BlockFormatError(f"corrupt +zstd block: buffer sizes {sizes!r} do not match buffers {sorted(buffers)}")
    dctx = zstandard.ZstdDecompressor()
    out = {}
    for name, b in buffers.items():
        n = sizes[name]
        # a codec never stores more than ~2x the raw chunk (fp32 scales of tiny groups); refuse more
        if not isinstance(n, int) or not 0 <= n <= 2 * raw_nbytes + (1 << 20):
            raise BlockFormatError(f"corrupt +zstd block: buffer {name!r} claims {n!r} bytes for a {raw_nbytes}-byte chunk")
        try:
            data = dctx.decompress(memoryview(b), max_output_size=n)
        except zstandard.ZstdError as e:
            raise BlockFormatError(f"corrupt +zstd block: buffer {name!r}: {e}") from None
        if len(data) != n:
            raise BlockFormatError(f"corrupt +zstd block: buffer {name!r} inflated to {len(data)} bytes, expected {n}")
        out[name] = data
    return out


# Codec modules register themselves on import.
from kvtier.codecs import none as _none  # noqa: E402,F401

for _mod in ("fp8", "kivi", "rot", "mix"):
    try:
        __import__(f"kvtier.codecs.{_mod}")
    except ModuleNotFoundError as _e:  # during bring-up a codec module may not exist yet
        if _e.name != f"kvtier.codecs.{_mod}":
            raise

__all__ = ["Codec", "register_codec", "get_codec", "list_codecs", "compress", "decompress", "validate_kv",
           "TORCH_DTYPES", "DTYPE_NAMES", "DTYPE_SIZES"]
