"""Names of the tier's Ray actors, the errors a call to one ends with, and the one place that opens the cold store.

Every actor of a tier is named and detached in the tier's namespace (default
``"kvtier"``), so any process that joins the cluster finds the same tier:

    kvtier-controller      the controller (one per namespace)
    kvtier-shard-<i>       warm shard i, 0 <= i < num_shards
"""

from __future__ import annotations

import ray

from kvtier.config import TierConfig

CONTROLLER = "kvtier-controller"
SHARD_PREFIX = "kvtier-shard-"
DEFAULT_NAMESPACE = "kvtier"
RPC_ERRORS = (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError)  # an actor slow or gone: retry or degrade


def shard_name(i: int) -> str:
    return f"{SHARD_PREFIX}{i}"


def open_cold_store(cfg: TierConfig):
    """The cold store of ``cfg`` (a ``kvtier.tiers.cold.ColdStore``), or None when ``cold_uri`` is ""."""
    if not cfg.cold_uri:
        return None
    from kvtier.tiers.cold import ColdStore

    return ColdStore(cfg.cold_uri, cfg.cold_bytes, s3_endpoint=cfg.s3_endpoint, s3_region=cfg.s3_region)
