"""The NIXL transport of ``kvtier.transport``: blocks pulled with a NIXL READ
from the prefill worker's own memory (UCX backend, DRAM; works between CPU
processes, so it is tested here without a GPU).

Source: ``publish`` registers the Arrow buffers of a handoff with this
process's agent (zero copies) and describes them (agent name, listener
host/port, addr, len, key). Sink: ``fetch_raw`` loads the source agent's
metadata through its listener thread when the regions are new to it, READs
every block of the handoff into one registered buffer of its own in a single
transfer, and the READ's notification (the lease id) tells the source to
deregister. A dead source (its listener refuses connections) or an expired
lease (regions absent after two metadata fetches) is a miss within ~0.2-2 s.

NIXL's listener thread binds 0.0.0.0 (its API takes only a port) and any
agent that loads our metadata may READ registered memory: run workers on a
network only the cluster reaches, as with Ray's own ports. Registrations are
just the published blocks and live only for their lease.

Verification (checksums, keys) is ``kvtier.transport.pull``'s job, not this
module's. Importing it imports ``nixl_cu13``'s Python API lazily (in the
constructor), never at module import.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from kvtier.errors import TierUnavailableError
from kvtier.transport.base import _ALIGN, DEFAULT_LEASE_S, Transport, _check_desc, _check_items

log = logging.getLogger(__name__)


def _listening(host: str, port: int, deadline: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=max(0.05, min(1.0, deadline - time.monotonic()))).close()
        return True
    except OSError:
        return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NixlTransport(Transport):
    """One NIXL agent per process (UCX backend, DRAM), acting as source and sink.

    The agent's progress thread is off: on 2 cores it spins at ~40% of a core
    while idle (measured 1.19 s CPU per 3 s); transfers progress because the
    sink polls ``check_xfer_state`` and the reaper polls notifications.
    """

    name = "nixl"
    # With the progress thread off, the source's UCX worker moves data only when
    # polled: at the 1 s idle period a 32 MiB READ took ~1 s; polling every
    # 0.5 ms while a handoff is open costs ~7% of a core (0.14 s CPU per 2 s)
    # and the READ takes 10-70 ms on this loaded 2-core machine.
    _busy_poll_s = 0.0005

    def __init__(self, host: str = "127.0.0.1", port: int = 0, lease_s: float = DEFAULT_LEASE_S,
                 agent_name: str | None = None) -> None:
        super().__init__(lease_s)
        try:
            from nixl_cu13 import nixl_agent, nixl_agent_config
        except ImportError as e:
            raise TierUnavailableError(f"NIXL is not installed (pip install nixl-cu13): {e}") from None
        self.host = host
        self.port = port or _free_port(host)
        self.agent_name = agent_name or f"kvtier-{uuid.uuid4().hex[:12]}"
        try:
            self.agent = nixl_agent(self.agent_name, nixl_agent_config(False, True, self.port, backends=["UCX"]))
        except Exception as e:  # nixl raises plain RuntimeError/binding errors when no plugin loads
            raise TierUnavailableError(f"NIXL agent failed to start on {host}:{self.port}: {e}") from None
        if "UCX" not in self.agent.backends:
            raise TierUnavailableError(f"NIXL UCX backend did not load (plugins: {self.agent.get_plugin_list()})")
        self.counters["metadata_wait_us"] = 0  # time the sink waited for sources' metadata (first contact, new regions)
        self._remote_lock = threading.Lock()
        self._remotes: set[str] = set()

    # source side
    def publish(self, items: Sequence[tuple[str, Any]], lease_s: float | None = None) -> dict[str, Any]:
        checked = _check_items(items)
        regions = [(b.address, b.size, 0, "") for _, b in checked]
        reg = self.agent.register_memory(regions, "DRAM")
        # the lease keeps the Arrow buffers alive: the registered addresses point into them
        try:
            lease = self._add_lease((reg, [b for _, b in checked]), lease_s)
        except ValueError:
            self.agent.deregister_memory(reg)
            raise
        self.counters["published_blocks"] += len(checked)
        self.counters["published_bytes"] += sum(b.size for _, b in checked)
        return {"transport": self.name, "lease": lease, "agent": self.agent_name, "host": self.host,
                "port": self.port, "blocks": [{"key": k, "addr": b.address, "len": b.size} for k, b in checked]}

    def _free(self, kept: Any) -> None:
        reg, _buffers = kept
        try:
            self.agent.deregister_memory(reg)
        except Exception as e:
            log.error("NIXL deregister_memory failed: %s", e)

    def _poll(self) -> None:
        for _agent, msgs in self.agent.get_new_notifs().items():
            for msg in msgs:
                lease = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
                self.release(lease)  # unknown ids (already expired) are ignored

    def stats(self) -> dict[str, Any]:
        self._poll()
        return super().stats()

    # sink side
    def _load_remote(self, remote: str, host: str, port: int, far, deadline: float) -> bool:
        """Make sure this agent knows ``remote``'s registrations in ``far``; fetch its
        metadata from its listener if not (first contact, or regions newer than our copy)."""
        with self._remote_lock:
            if self.agent.check_remote_metadata(remote, far):
                return True
            # NIXL only logs a refused connection and leaves us polling: probe the
            # source's listener ourselves (every 0.2 s), so a dead source is a miss at
            # once instead of after the whole timeout (10 s by default)
            if not _listening(host, port, deadline):
                return False
            self.agent.fetch_remote_metadata(remote, host, port)
            if remote not in self._remotes:
                self.agent.send_local_metadata(host, port)  # the source needs ours to accept our notification
                self._remotes.add(remote)
            next_probe = time.monotonic() + 0.2
            # metadata arrives in ~0.15 s here; if the regions are still unknown after
            # two fetches 1 s apart the source has released them (an expired lease)
            refetch, fetches = time.monotonic() + 1.0, 1
            while not self.agent.check_remote_metadata(remote, far):
                now = time.monotonic()
                if now > deadline:
                    return False
                if now > next_probe:
                    if not _listening(host, port, deadline):
                        return False
                    next_probe = now + 0.2
                if now > refetch:
                    if fetches == 2:
                        return False
                    self.agent.fetch_remote_metadata(remote, host, port)
                    refetch, fetches = now + 1.0, 2
                time.sleep(0.002)
            return True

    def _forget(self, remote: str) -> None:
        with self._remote_lock:
            if remote in self._remotes:
                self._remotes.discard(remote)
                try:
                    self.agent.remove_remote_agent(remote)
                except Exception:
                    pass

    def fetch_raw(self, desc: dict[str, Any], timeout_s: float) -> list[pa.Buffer | None]:
        blocks = _check_desc(desc, self.name)
        remote, host, port, lease = desc.get("agent"), desc.get("host"), desc.get("port"), desc.get("lease")
        if not (isinstance(remote, str) and isinstance(host, str) and isinstance(port, int) and isinstance(lease, str)
                and all(isinstance(b.get("addr"), int) and b["addr"] > 0 for b in blocks)):
            raise ValueError(f"bad nixl descriptor {str(desc)[:160]}")
        misses: list[pa.Buffer | None] = [None] * len(blocks)
        deadline = time.monotonic() + timeout_s
        far_descs = self.agent.get_xfer_descs([(b["addr"], b["len"], 0) for b in blocks], "DRAM")
        t_meta = time.monotonic()
        known = self._load_remote(remote, host, port, far_descs, deadline)
        # fetching a source's metadata for new registrations took ~102 ms of a 118-129 ms 5-chunk pull on the
        # 2-core box (bench/results/handoff-cpu.md): the part of a handoff a long-lived registration would save
        self.counters["metadata_wait_us"] += int((time.monotonic() - t_meta) * 1e6)
        if not known:
            # the source died, or it released the lease (its registration is gone)
            log.warning("NIXL: agent %s at %s:%d has not got the handoff's regions (waited %.1f s)",
                        remote, host, port, timeout_s)
            return misses
        offsets, total = [], 0
        for b in blocks:
            offsets.append(total)
            total += -(-b["len"] // _ALIGN) * _ALIGN
        recv = np.empty(total, dtype=np.uint8)
        base = recv.ctypes.data
        reg = self.agent.register_memory([(base, total, 0, "")], "DRAM")
        handles = []
        try:
            local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", [(base + o, b["len"], 0) for o, b in zip(offsets, blocks)], "DRAM")
            handles.append(local)
            far = self.agent.prep_xfer_dlist(remote, far_descs)
            handles.append(far)
            idx = list(range(len(blocks)))
            xfer = self.agent.make_prepped_xfer("READ", local, idx, far, idx, lease.encode())
            handles.append(xfer)
            state, polls = self.agent.transfer(xfer), 0
            while state == "PROC":
                if time.monotonic() > deadline:
                    log.warning("NIXL READ from %s timed out after %.1f s", remote, timeout_s)
                    return misses
                polls += 1
                if polls > 1000:  # spin ~1000 polls (small blocks finish here), then yield the core
                    time.sleep(0.0005)
                state = self.agent.check_xfer_state(xfer)
            if state != "DONE":
                log.warning("NIXL READ from %s failed (state %s)", remote, state)
                self._forget(remote)
                return misses
        except Exception as e:  # nixlRemoteDisconnectError when the source died, nixlNotFoundError for a stale lease
            log.warning("NIXL READ from %s failed: %s: %s", remote, type(e).__name__, e)
            self._forget(remote)
            return misses
        finally:
            for h in reversed(handles):
                try:
                    h.release()
                except Exception as e:  # an unfinished READ cannot always be cancelled; nixl keeps it on its leak list
                    log.error("NIXL handle release failed: %s", e)
            self.agent.deregister_memory(reg)
        whole = pa.py_buffer(recv)
        return [whole.slice(o, b["len"]) for o, b in zip(offsets, blocks)]
