"""Ray Serve LLM's side of the kvtier connector: the per-replica setup of ``KVTierConnector``.

Ray Serve LLM builds one ``BaseConnectorBackend`` per engine replica from the
``kv_connector`` name in ``engine_kwargs.kv_transfer_config`` and calls its
``setup()`` in the replica before the vLLM engine starts
(``ray/llm/_internal/serve/engines/vllm/vllm_engine.py``: ``VLLMEngine.__init__``).
This backend uses that hook to

  * start or join the tier (``kvtier.init`` in the replica, a Ray worker: it
    joins the cluster and creates the tier's controller and shards with the
    app's TierConfig if they are not there yet), and
  * write the cluster's address and the tier's namespace into
    ``kv_connector_extra_config``: vLLM's scheduler and workers run in spawned
    subprocesses that are not Ray workers (``../shared/VLLM.md``), so the
    connector must ``ray.init(address=...)`` itself and needs the real address.

Prefill/decode request shaping is Ray's default protocol (prefill runs with
``max_tokens=1`` and ``do_remote_decode``; decode gets prefill's
``kv_transfer_params``): prefill's params say how many chunks it saved (and
the last one's key), so decode's connector waits, bounded, until the tier has
them (``kvtier.vllm.scheduler``); where NIXL is installed they also carry the
prefill worker's arena endpoint and decode pulls the blocks from there, the
tier serving what the arena does not (``kvtier.vllm.handoff``).

This module is not the connector (``kvtier.vllm``) and holds no KV.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ray.llm._internal.serve.engines.vllm.kv_transfer.base import BaseConnectorBackend, DefaultPDProtocolMixin

log = logging.getLogger(__name__)

CONNECTOR = "KVTierConnector"
CONNECTOR_MODULE = "kvtier.vllm"
TIER_JOIN_TIMEOUT_S = 180.0  # kvtier.runtime.api.INIT_TIMEOUT_S: the first replica creates controller + shards


class KVTierBackend(DefaultPDProtocolMixin, BaseConnectorBackend):
    """Starts or joins the tier in the replica and tells the engine's processes where it is."""

    def setup(self) -> None:
        import ray

        import kvtier
        from kvtier.config import TierConfig

        extra: dict[str, Any] = self.kv_transfer_config.setdefault("kv_connector_extra_config", {})
        namespace = extra.get("namespace") or "kvtier"
        address = extra.get("address")
        if not address or address == "auto":
            # the GCS address of the cluster this replica runs in; "auto" would mean "whatever
            # RAY_ADDRESS says" in the engine's subprocess, which is not set under Serve
            extra["address"] = ray.get_runtime_context().gcs_address
        extra["namespace"] = namespace
        fields = {f.name for f in dataclasses.fields(TierConfig)}
        tier = {k: v for k, v in extra.items() if k in fields}  # the rest is the connector's own settings
        info = kvtier.init(namespace=namespace, config=tier or None)  # Ray is initialized here: this joins
        log.info("kvtier: replica joined tier %r at %s (%d shards)", namespace, extra["address"], len(info["shards"]))


def register() -> None:
    """Register the backend under the connector's name (once per cluster; safe to call again).

    The registry lives in Ray's internal KV (``ray/llm/_internal/serve/utils/registry.py``):
    registered on the driver before Ray starts, it is flushed when Ray connects, so
    every replica's ``KVConnectorBackendFactory`` finds it.
    """
    from ray.llm._internal.serve.engines.vllm.kv_transfer.factory import KVConnectorBackendFactory

    # ``is_registered`` also answers True from this process's own cache of an earlier registration, made for
    # another Ray cluster (a driver that ran ray.shutdown() and ray.init() again; the test suite's app
    # modules): that cluster's KV has it, this one's not, and its replicas silently get Ray's default backend
    # (no tier joined, every request a miss). Unregistering first makes the registration this cluster's.
    if KVConnectorBackendFactory.is_registered(CONNECTOR):
        KVConnectorBackendFactory.unregister_backend(CONNECTOR)
    KVConnectorBackendFactory.register_backend(CONNECTOR, f"{__name__}:KVTierBackend")
