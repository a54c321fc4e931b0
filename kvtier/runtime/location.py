"""``Location``: the controller's answer to "where is this block?", one per key of a ``locate`` call.

A plain frozen dataclass that travels from the controller actor to clients
(Ray pickles it; it holds the warm copy's ObjectRef, nothing else remote), so
readers name fields instead of indexing tuples. Not here: how the controller
decides (``kvtier.placement``), how a client reads (``runtime.client``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Location:
    key: str
    size: int               # serialized bytes of the block
    shard: str | None       # the warm shard holding it, or None
    ref: Any = None         # the warm copy's ObjectRef (Ray keeps its bytes alive while a reader holds it)
    cold: bool = False      # a copy is in the cold tier
    version: int | None = 0  # the write's version (the cold object to read); None: unknown, read the newest

    @property
    def tier(self) -> str | None:
        """The nearest tier holding it: "warm", "cold", or None (neither: being moved)."""
        if self.shard is not None and self.ref is not None:
            return "warm"
        return "cold" if self.cold else None
