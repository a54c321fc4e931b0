"""kvtier: a Ray-distributed, tiered, compressed KV-cache store for LLM serving.

This module is the public API and nothing else; see DESIGN.md. Importing it
does not import Ray (the runtime imports Ray lazily on ``init``), so the block
format and codecs work on machines without Ray.
"""

from kvtier.block import Block
from kvtier.codecs import compress, decompress, get_codec, list_codecs
from kvtier.config import TierConfig
from kvtier.errors import BlockFormatError, CodecError, KvtierError, TierUnavailableError
from kvtier.keys import chunk_keys, model_fingerprint

__version__ = "0.1.0"

__all__ = [
    "Block", "TierConfig", "KvtierError", "BlockFormatError", "CodecError", "TierUnavailableError",
    "chunk_keys", "model_fingerprint", "compress", "decompress", "get_codec", "list_codecs",
]
