"""The public functions behind ``kvtier.init/put/get/...``: one client per process.

``init`` decides where the tier is:
  * no address, Ray not initialized, no ``$RAY_ADDRESS``: an *embedded* tier —
    a local Ray of its own (``address="local"``, its own temp dir and so its own
    ports and sockets, even when another Ray runs on the machine; ``num_cpus=2``,
    no dashboard), the controller, the warm shards, a cold store in a local
    directory. ``shutdown()`` stops all of it. To use another Ray running on the
    machine instead, pass ``address="auto"``.
  * ``address="auto"`` / ``"ray://..."`` / ``"host:port"``, or Ray already
    initialized in this process (a Ray worker, a test fixture): *join* that
    cluster and use the tier in ``namespace``, creating its actors if absent.
    The controller is named and detached and created with ``get_if_exists``,
    so two clients starting at once share one controller (which alone creates
    the shards). ``shutdown()`` leaves a shared tier running.

When a tier already runs, its warm/cold settings win; a config given to
``init`` still sets this process's ``hot_bytes``, default ``codec``, ``tenant``
and ``model_id``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
from typing import Any, Mapping, Sequence

from kvtier.config import TierConfig
from kvtier.errors import KvtierError
from kvtier.runtime.names import CONTROLLER, DEFAULT_NAMESPACE

INIT_TIMEOUT_S = 180.0  # the first init creates the controller and shards: worker processes on a busy 2-core box

_lock = threading.RLock()
_client = None
_embedded = False       # this process started Ray and the tier: shutdown stops both
_connected_ray = False  # this process called ray.init(address=...): shutdown disconnects
_temp_dir: str | None = None  # the embedded Ray's own temp dir, removed at shutdown


def controller_handle(cfg: TierConfig, namespace: str):
    """The tier's controller in ``namespace``, created (with its shards) if absent."""
    import ray

    from kvtier.runtime.controller import Controller

    actor = ray.remote(Controller)
    return actor.options(
        name=CONTROLLER, namespace=namespace, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=16,
    ).remote(cfg.to_dict(), namespace, secrets.token_hex(16))  # the shards' secrets derive from it


def init(address: str | None = None, namespace: str = DEFAULT_NAMESPACE,
         config: TierConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Start or join a tier; returns its description (config, shards). Idempotent per namespace."""
    global _client, _embedded, _connected_ray, _temp_dir
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace={namespace!r} must be a non-empty string")
    if address is not None and not isinstance(address, str):
        raise ValueError(f"address={address!r} must be None, 'auto' or a Ray address string")
    cfg = TierConfig.from_any(config) if config is not None else TierConfig.from_env()
    import ray

    from kvtier.runtime.client import Client

    with _lock:
        if _client is not None:
            if _client.namespace == namespace:
                return _describe(_client)
            shutdown()
        if not ray.is_initialized():
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # address="local" + a temp dir of its own: never join (or trip over) another Ray on this machine,
                # whose default /tmp/ray would make ray.init connect to it and refuse num_cpus
                _temp_dir = tempfile.mkdtemp(prefix="kvtier-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
                _ray_init(address="local", num_cpus=2, include_dashboard=False, namespace=namespace,
                          log_to_driver=False, _temp_dir=_temp_dir)
                _embedded = True
            else:
                _ray_init(address=address or "auto", namespace=namespace)
                _connected_ray = True
        controller = controller_handle(cfg, namespace)
        try:
            info = ray.get(controller.info.remote(), timeout=INIT_TIMEOUT_S)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            raise KvtierError(f"the kvtier controller in namespace {namespace!r} did not start within "
                              f"{INIT_TIMEOUT_S:.0f}s ({type(e).__name__}: {e})") from None
        explicit = config is not None
        _client = Client(controller, namespace, info, hot_bytes=cfg.hot_bytes if explicit else None,
                         codec=cfg.codec if explicit else None, tenant=cfg.tenant if explicit else None,
                         model_id=cfg.model_id if explicit else None)
        return _describe(_client)


def _describe(client) -> dict[str, Any]:
    return {"namespace": client.namespace, "config": client.cfg.to_dict(), "embedded": _embedded,
            "shards": [{"id": s["id"], "node_id": s["node_id"]} for s in client._shards]}


def _get_client():
    if _client is None:
        raise KvtierError("kvtier is not initialized: call kvtier.init() first")
    return _client


def _as_list(keys, what: str = "keys") -> tuple[list, bool]:
    if isinstance(keys, str):
        return [keys], True
    if isinstance(keys, (list, tuple)):
        return list(keys), False
    raise TypeError(f"{what} must be a key string or a list of them, not {type(keys).__name__}")


def put(keys: str | Sequence[str], kvs, codec: str | None = None):
    """Store one chunk (``put(key, kv)``) or a batch (``put([k1, k2], [kv1, kv2])``); returns the block(s).

    A ``kvtier.Block`` in place of a tensor is stored as it is (its bytes, not encoded again). The
    returned blocks' ``to_arrow()`` bytes are the ones stored: a prefill worker's handoff publishes
    them (one compression per chunk). Returns once the blocks are queued for their shard; this process
    reads them back at once, other processes once stored (``flush()`` waits for that)."""
    keys, single = _as_list(keys)
    if codec is not None:  # named even for an empty batch; 0 or "" is an error, not "the default"
        from kvtier.codecs import get_codec

        get_codec(codec)
    if single:
        kvs = [kvs]
    elif not isinstance(kvs, (list, tuple)):
        raise TypeError(f"put with a list of keys takes a list of tensors, not {type(kvs).__name__}")
    blocks = _get_client().put(keys, list(kvs), codec)
    return blocks[0] if single else blocks


def get(keys: str | Sequence[str], device=None):
    """A tensor or None for one key; a list of them for a list of keys. Every tensor is on ``device``,
    whichever tier served it; ``None``: the first GPU if there is one, else the CPU."""
    keys, single = _as_list(keys)
    out = _get_client().get(keys, _check_device(device))
    return out[0] if single else out


def _check_device(device):
    """``device`` as a ``torch.device`` (None stays None), or a ValueError naming it, before any tier work."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:  # torch.device(0) raises RuntimeError without CUDA
        raise ValueError(f"device={device!r} is not a torch device: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: kvtier decodes on 'cpu' or 'cuda' devices")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available in this process")
    return dev


def lookup(keys: Sequence[str]) -> int:
    keys, _ = _as_list(keys)
    return _get_client().lookup(keys)


def contains(key: str) -> bool:
    return _get_client().contains(key)


def prefetch(keys: str | Sequence[str]):
    keys, _ = _as_list(keys)
    return _get_client().prefetch(keys)


def delete(keys: str | Sequence[str]) -> int:
    keys, _ = _as_list(keys)
    return _get_client().delete(keys)


def _ray_init(**kwargs: Any) -> None:
    """``ray.init`` with Python's ``random`` freshly seeded for it, then restored. Ray draws its GCS pubsub
    subscriber ids from ``random`` (ray/_private/gcs_pubsub.py), and a serving engine seeds ``random``
    before its KV connector connects (vLLM's workers: ``seed=0``), so two engines' workers subscribed under
    the same id and evicted each other's long polls: 2,000-3,600 polls a second at the GCS with both idle,
    which made one engine prefill 2-3x and decode ~4x slower on 2 cores (`kvtier demo`). The caller's
    random state is put back: its sampling stays reproducible."""
    import random

    import ray

    state = random.getstate()
    random.seed(secrets.token_bytes(16))
    try:
        ray.init(**kwargs)
    finally:
        random.setstate(state)


def flush(timeout_s: float | None = None) -> bool:
    """Wait until this process's puts are stored in their shards (visible to every process); False on
    timeout; ``KvtierError`` naming blocks whose store failed."""
    return _get_client().flush(timeout_s)


def stats() -> dict[str, Any]:
    return _get_client().stats()


def stop_tier(namespace: str = DEFAULT_NAMESPACE, timeout_s: float = 30.0) -> bool:
    """Stop a tier's controller and shards in ``namespace`` (cold data stays). True if one was running.
    This process's client of that tier is closed too."""
    global _client
    import ray

    with _lock:
        if _client is not None and _client.namespace == namespace:
            _client.close()
            _client = None

    try:
        controller = ray.get_actor(CONTROLLER, namespace=namespace)
    except ValueError:
        return False
    try:
        ray.get(controller.stop.remote(), timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        pass
    ray.kill(controller, no_restart=True)
    return True


def shutdown(stop: bool | None = None) -> None:
    """Close this process's client. An embedded tier is stopped (and its Ray);
    a shared tier keeps running unless ``stop=True``."""
    global _client, _embedded, _connected_ray, _temp_dir
    import ray

    with _lock:
        client, _client = _client, None
        if client is not None:
            client.close()
            if (stop if stop is not None else _embedded) and ray.is_initialized():
                stop_tier(client.namespace)
        if _embedded or _connected_ray:
            ray.shutdown()
        if _temp_dir is not None:
            shutil.rmtree(_temp_dir, ignore_errors=True)
            _temp_dir = None
        _embedded = _connected_ray = False
