"""Reaching the tier from vLLM's engine processes (the scheduler and each worker).

vLLM runs the scheduler (EngineCore) and the workers in spawned processes, not
Ray workers, so each joins the tier itself with ``kvtier.init``:

* ``address`` a Ray address, or "auto" with ``$RAY_ADDRESS`` set or a Ray found by
  Ray's own discovery: join that cluster's tier in ``namespace``.
* "local", or "auto" with no Ray anywhere: the engine's processes share one local
  tier. Under a file lock (``$KVTIER_HOME/vllm/<namespace>.lock``) the first process
  starts Ray and the tier and writes the GCS address and its pid next to the lock;
  the others read it and join. A stale address (its pid gone) is replaced, so two
  processes never start two tiers and none joins a dead one. The tier lives as long
  as the process that started it (the engine); its cold tier stays on disk.

Connecting runs in a background thread: until it succeeds every lookup is a miss
and every save is dropped, so a tier that is down never blocks or fails the engine.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
import time

import kvtier
from kvtier.config import TierConfig
from kvtier.model import kvtier_home

log = logging.getLogger("kvtier.vllm")

_state = {"ready": threading.Event(), "error": None, "thread": None, "lock": threading.Lock()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local(namespace: str, cfg: TierConfig, timeout_s: float) -> None:
    import ray

    folder = kvtier_home() / "vllm"
    folder.mkdir(parents=True, exist_ok=True)
    addr_file = folder / f"{namespace}.addr"
    with open(folder / f"{namespace}.lock", "a+") as lock:
        end = time.monotonic() + timeout_s
        while True:  # a bounded wait for the lock: flock itself has no timeout
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise TimeoutError(f"{lock.name} stayed locked for {timeout_s:.0f}s") from None
                time.sleep(0.1)
        try:
            info = None
            if addr_file.is_file():
                try:
                    info = json.loads(addr_file.read_text())
                except ValueError:
                    info = None
            if info and _pid_alive(int(info["pid"])):
                kvtier.init(address=info["address"], namespace=namespace, config=cfg)
                return
            # a short temp dir: Ray's unix sockets must stay under 107 characters; private, so another
            # Ray on this machine never finds this one by "auto" discovery
            tmp = tempfile.mkdtemp(prefix="kvtvllm", dir="/tmp")
            ray.init(num_cpus=2, include_dashboard=False, namespace=namespace, _temp_dir=tmp,
                     log_to_driver=False, configure_logging=False)
            kvtier.init(namespace=namespace, config=cfg)
            tmpf = addr_file.with_suffix(".tmp")
            tmpf.write_text(json.dumps({"address": ray.get_runtime_context().gcs_address, "pid": os.getpid()}))
            os.replace(tmpf, addr_file)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _connect(address: str, namespace: str, cfg: TierConfig, timeout_s: float) -> None:
    import ray

    if ray.is_initialized():
        kvtier.init(namespace=namespace, config=cfg)
    elif address not in ("auto", "local"):
        kvtier.init(address=address, namespace=namespace, config=cfg)
    elif address == "auto" and os.environ.get("RAY_ADDRESS"):
        kvtier.init(address=os.environ["RAY_ADDRESS"], namespace=namespace, config=cfg)
    else:
        if address == "auto":
            try:
                ray.init(address="auto", namespace=namespace, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError):
                pass
            if ray.is_initialized():
                kvtier.init(namespace=namespace, config=cfg)
                return
        _local(namespace, cfg, timeout_s)


def start(address: str, namespace: str, cfg: TierConfig, timeout_s: float) -> None:
    """Connect this process to the tier in the background (once per process)."""
    with _state["lock"]:
        if _state["thread"] is not None:
            return

        def run() -> None:
            try:
                _connect(address, namespace, cfg, timeout_s)
                _state["ready"].set()
                log.info("kvtier: connected to the tier in namespace %r", namespace)
            except Exception as e:  # noqa: BLE001 - any failure leaves the engine running without a cache
                _state["error"] = f"{type(e).__name__}: {e}"
                log.error("kvtier: no tier (%s); every request recomputes", _state["error"])

        t = threading.Thread(target=run, name="kvtier-connect", daemon=True)
        _state["thread"] = t
        t.start()


def ready(wait_s: float = 0.0) -> bool:
    """Whether this process is connected (waiting up to ``wait_s`` for it)."""
    return _state["ready"].wait(wait_s) if wait_s > 0 else _state["ready"].is_set()


def error() -> str | None:
    return _state["error"]
