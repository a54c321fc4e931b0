"""kvtier inside vLLM: ``KVTierConnector``, a KV connector for vLLM's v1 engine.

Load it with ``kv_transfer_config={"kv_connector": "KVTierConnector",
"kv_connector_module_path": "kvtier.vllm", ...}`` (see the README, "With vLLM").
Importing this package does not import vLLM: ``kvtier.vllm.pages`` (the page
formats, pure torch) works without it; the connector class is loaded on first
access.
"""

__all__ = ["KVTierConnector"]


def __getattr__(name):
    if name in ("KVTierConnector", "KVTierMetadata"):
        from kvtier.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'kvtier.vllm' has no attribute {name!r}")
