"""Reaching the tier from vLLM's engine processes (the scheduler and each worker).

vLLM runs the scheduler (EngineCore) and the workers in spawned processes, not
Ray workers, so each joins the tier itself with ``kvtier.init``:

* ``address`` a Ray address, or "auto" with ``$RAY_ADDRESS`` set: join that cluster's
  tier in ``namespace``. Ray's own "auto" discovery (scanning this machine for a
  gcs_server) is not used: on a shared machine it joined another user's cluster, and
  its connect hung vLLM's start-up here.
* "local", or "auto" without ``$RAY_ADDRESS``: the engine's processes share one local
  tier, run by a helper process (``python -m kvtier.vllm.tier``) that owns Ray and the
  tier and exits when the engine process that started it exits. Under a file lock
  (``$KVTIER_HOME/vllm/<namespace>.lock``) the first engine process starts the helper
  and waits for the address file it writes (GCS address + helper pid); the others read
  it and join. A stale file (its pid gone) is replaced, so two processes never start
  two tiers and none joins a dead one. Ray is never started inside a vLLM process:
  a head started in vLLM's worker lost its GCS a minute later, and Ray then killed
  the worker. The cold tier stays on disk after the helper exits.

Connecting runs in a background thread: until it succeeds every lookup is a miss
and every save is dropped, so a tier that is down never blocks or fails the engine.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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


def _read_addr(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if _pid_alive(int(info["pid"])) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _local(namespace: str, cfg: TierConfig, timeout_s: float) -> None:
    folder = kvtier_home() / "vllm"
    folder.mkdir(parents=True, exist_ok=True)
    addr_file = folder / f"{namespace}.addr"
    end = time.monotonic() + timeout_s
    with open(folder / f"{namespace}.lock", "a+") as lock:
        while True:  # a bounded wait for the lock: flock itself has no timeout
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise TimeoutError(f"{lock.name} stayed locked for {timeout_s:.0f}s") from None
                time.sleep(0.1)
        try:
            info = _read_addr(addr_file)
            if info is None:
                addr_file.unlink(missing_ok=True)
                helper = subprocess.Popen(
                    [sys.executable, "-m", "kvtier.vllm.tier", namespace, json.dumps(cfg.to_dict()),
                     str(os.getpid()), str(addr_file)],
                    stdin=subprocess.DEVNULL, start_new_session=True)
                while info is None:
                    if helper.poll() is not None:
                        raise RuntimeError(f"the local tier helper exited with status {helper.returncode}")
                    if time.monotonic() > end:
                        helper.kill()
                        raise TimeoutError(f"the local tier did not start within {timeout_s:.0f}s")
                    time.sleep(0.2)
                    info = _read_addr(addr_file)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if info.get("auth_mode") == "token":
        # Ray 2.60 turns token auth on for a new local cluster when RAY_AUTH_MODE is unset, but a client
        # given an explicit address connects without a token unless told: joining the helper's Ray failed
        # with InvalidAuthToken (the token itself is in ~/.ray/auth_token, where the helper's Ray put it)
        if os.environ.get("RAY_AUTH_MODE") is None:
            from ray._raylet import Config

            os.environ["RAY_AUTH_MODE"] = "token"
            Config.initialize("")  # Ray caches its config: re-read it, as Ray's own _enable_token_auth does
    kvtier.init(address=info["address"], namespace=namespace, config=cfg)


def _connect(address: str, namespace: str, cfg: TierConfig, timeout_s: float) -> None:
    import ray

    if ray.is_initialized():
        kvtier.init(namespace=namespace, config=cfg)
    elif address not in ("auto", "local"):
        kvtier.init(address=address, namespace=namespace, config=cfg)
    elif address == "auto" and os.environ.get("RAY_ADDRESS"):
        kvtier.init(address=os.environ["RAY_ADDRESS"], namespace=namespace, config=cfg)
    else:
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


def _serve(namespace: str, cfg_json: str, watch_pid: int, addr_file: str) -> None:
    """The helper: Ray (loopback, a private temp dir) + the tier, until ``watch_pid`` exits."""
    import shutil

    import ray

    # a short temp dir: Ray's unix sockets must stay under 107 characters; private, so no other Ray finds it
    tmp = tempfile.mkdtemp(prefix="kvtvllm", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, namespace=namespace, _temp_dir=tmp, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        kvtier.init(namespace=namespace, config=json.loads(cfg_json))
        out = Path(addr_file)
        part = out.with_suffix(".tmp")
        part.write_text(json.dumps({"address": ray.get_runtime_context().gcs_address, "pid": os.getpid(),
                                    "auth_mode": os.environ.get("RAY_AUTH_MODE") or "disabled"}))
        os.replace(part, out)
        while _pid_alive(watch_pid):
            time.sleep(1.0)
        if _read_addr(out) and json.loads(out.read_text())["pid"] == os.getpid():
            out.unlink(missing_ok=True)
        kvtier.shutdown(stop=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
