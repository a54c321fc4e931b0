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


# The tier API: thin wrappers that import the Ray runtime on first call, so that
# ``import kvtier`` never imports Ray (see kvtier/runtime/api.py for the details).
def init(address=None, namespace="kvtier", config=None):
    """Start an embedded tier (no address, no Ray running) or join the one on a Ray cluster."""
    from kvtier.runtime import api

    return api.init(address, namespace, config)


def put(keys, kvs, codec=None):
    """Compress and store one KV chunk (``put(key, kv)``) or a batch of them (a ``Block`` is stored as is);
    returns the stored block(s)."""
    from kvtier.runtime import api

    return api.put(keys, kvs, codec)


def get(keys, device=None):
    """The KV chunk of a key (or None on a miss), or a list of them, every one on ``device``
    (None: the first GPU if there is one, else the CPU)."""
    from kvtier.runtime import api

    return api.get(keys, device)


def lookup(keys):
    """How many leading keys are present in any tier (one round trip)."""
    from kvtier.runtime import api

    return api.lookup(keys)


def contains(key):
    from kvtier.runtime import api

    return api.contains(key)


def prefetch(keys):
    """Pull keys toward this process's hot tier in the background; returns a Future."""
    from kvtier.runtime import api

    return api.prefetch(keys)


def delete(keys):
    from kvtier.runtime import api

    return api.delete(keys)


def flush(timeout_s=None):
    """Wait until this process's puts are stored (``put`` returns once they are queued); False on timeout."""
    from kvtier.runtime import api

    return api.flush(timeout_s)


def stats():
    from kvtier.runtime import api

    return api.stats()


def shutdown(stop=None):
    """Close this process's client; stops an embedded tier (a shared one only with ``stop=True``)."""
    import sys

    if "kvtier.runtime.api" in sys.modules:  # never initialized: nothing to do, and no Ray import
        sys.modules["kvtier.runtime.api"].shutdown(stop)

__all__ = [
    "Block", "TierConfig", "KvtierError", "BlockFormatError", "CodecError", "TierUnavailableError",
    "chunk_keys", "model_fingerprint", "compress", "decompress", "get_codec", "list_codecs",
    "init", "put", "get", "lookup", "contains", "prefetch", "delete", "flush", "stats", "shutdown",
]
