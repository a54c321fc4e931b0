"""kvtier's exception types.

One project exception for anything a block, a codec or the tier refuses, so that
callers can catch ``KvtierError`` and treat the block as a miss. Wrong arguments
from the caller raise ``ValueError``/``TypeError`` as usual (and subclass
``KvtierError`` too, so one ``except`` catches both where wanted).
"""


class KvtierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class BlockFormatError(KvtierError, ValueError):
    """A serialized block is corrupt, truncated, of another format version, or not Arrow at all."""


class CodecError(KvtierError, ValueError):
    """Unknown codec name, or input a codec cannot encode (named in the message)."""


class TierUnavailableError(KvtierError, RuntimeError):
    """A tier (shard, controller, cold store) did not answer within its timeout."""
