"""The cold tier: serialized blocks as objects in a local directory (NVMe) or on S3.

One object per block and version, at ``<root>/<shard>/<key>~<version hex>.kvb``
(``<key>.kvb`` for version 0, a store used without the tier's index) where ``shard``
is the key's first two hex characters (256 folders: a million blocks make ~4,000 files
per folder, which every filesystem lists quickly; other keys go to ``__``). The version
is the tier index's version of the write (``kvtier.placement``): it travels in the name,
so a rebuild from a listing knows which object holds the newest write of a key, and
an old version can never be read as a newer one ('~' is not a key character). The
object holds exactly the block's Arrow IPC bytes (``Block.to_arrow()``), so a cold hit
can be promoted to warm without re-serializing.

Guarantees:
- Writes are atomic: a local write goes to a hidden temp file in the same
  folder, is fsynced and renamed over the final name; an S3 object appears only
  when its upload completes. A reader sees the old object, the new one, or none.
- Something else at an object's path (a directory, a FIFO) never blocks a read
  (local reads open with ``O_NONBLOCK`` and read regular files only: anything else
  is a miss) and never fails a write (it is moved aside to a hidden
  ``.<name>.blocked-<random>`` name, logged, and the object written).
- Every read is verified (``Block.from_arrow`` with the expected key and model):
  a corrupt, truncated, swapped or foreign object is a miss, counted in
  ``stats()["corrupt"]``, logged and deleted. It is never returned.
- A failing backend (disk full, read-only, S3 down) never crashes a caller:
  ``put``/``delete``/``list`` raise ``TierUnavailableError`` naming the URI,
  ``get``/``contains`` return a miss; each failure counts in ``stats()["errors"]``
  and is logged at most once per ``LOG_INTERVAL_S``. S3 calls time out after
  1 s (connect) / 2 s (no bytes moving), one retry; after a failed S3 call the
  store fails fast for ``RETRY_AFTER_S`` instead of making every caller wait
  out the timeouts again (``available()`` probes for real and ends that early).
- S3 credentials come from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
  (``AWS_SESSION_TOKEN``) or the SDK's default chain; they never appear in
  logs, errors or stats (backend messages are scrubbed of them).

It is not a policy: it never evicts. The controller's placement decides what
leaves the cold tier and calls ``delete``; ``capacity_bytes`` is only reported.
Block and byte counts come from a scan (the first ``stats()`` or a complete
``list()``) plus this process's own puts and deletes; other processes writing
the same store are seen at the next scan.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from typing import Any, Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from kvtier.block import MAX_BLOCK_BYTES, Block
from kvtier.config import s3_uri_options
from kvtier.errors import BlockFormatError, TierUnavailableError

log = logging.getLogger("kvtier.cold")

SUFFIX = ".kvb"
MAX_OBJECT_BYTES = MAX_BLOCK_BYTES + (1 << 20)  # a block of the largest raw size with the `none` codec + header
TEMP_MAX_AGE_S = 60.0  # a 130 MiB put takes ~1 s here; an older temp file belongs to a writer that died
LOG_INTERVAL_S = 30.0  # backend failures: one log line per interval, with the count since the last one
RETRY_AFTER_S = 2.0  # after a failed S3 call, fail fast this long (measured: a hung endpoint costs ~4.5 s a call)
S3_CONNECT_TIMEOUT_S = 1.0
S3_REQUEST_TIMEOUT_S = 2.0  # curl low-speed time: 2 s with no byte moving, not a cap on a whole transfer
S3_MAX_ATTEMPTS = 2  # one retry: absorbs a transient 5xx/throttle; measured: refused fails in 0.1-0.8 s, hung in ~4.5 s
_KEY_RE = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9._=-]{0,199}")  # no '/', no leading '.', fits a file name
_VERSION_SEP = "~"  # not a key character: <key>~<version>.kvb parses one way only
ALL_VERSIONS = -1
_HEX2 = re.compile(r"[0-9a-f]{2}")


class ColdStore:
    """Blocks as objects under ``uri``: a local path, ``file:///path`` or ``s3://bucket/prefix``."""

    def __init__(self, uri: str, capacity_bytes: int = 0, *, s3_endpoint: str = "", s3_region: str = "us-east-1") -> None:
        if not isinstance(uri, str) or not uri.strip():
            raise ValueError(f"cold uri={uri!r} must be a local path, file:///path or s3://bucket/prefix")
        if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes={capacity_bytes!r} must be an int >= 0 (0 = unbounded)")
        self.capacity_bytes = capacity_bytes
        self._secrets = [v for v in (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
                                     os.environ.get("AWS_SESSION_TOKEN")) if v and len(v) >= 4]
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme == "s3":
            parts = urlsplit(uri)
            if "@" in parts.netloc:  # never echo it: it would be the credentials
                raise ValueError("cold uri must not carry credentials (s3://KEY:SECRET@...); "
                                 "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
            bucket, prefix = parts.netloc, parts.path.strip("/")
            if not bucket:
                raise ValueError(f"cold uri={uri!r} names no bucket; expected s3://bucket/prefix")
            opts = s3_uri_options(uri)  # pyarrow's URI parameters, honoured; any other one is an error naming it
            if "endpoint_override" in opts:
                if s3_endpoint:
                    raise ValueError(f"cold uri names endpoint_override={opts['endpoint_override']!r} and "
                                     f"s3_endpoint={s3_endpoint!r} is set too; give one of them")
                s3_endpoint = f"{opts.get('scheme', 'https')}://{opts['endpoint_override']}"
            s3_region = opts.get("region", s3_region)
            self.s3 = True
            self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
            self._bucket = bucket
            self.root = f"{bucket}/{prefix}" if prefix else bucket
            self.fs: pafs.FileSystem = _s3_filesystem(s3_endpoint, s3_region, S3_MAX_ATTEMPTS)
            self._probe_fs = _s3_filesystem(s3_endpoint, s3_region, 1)  # available(): one attempt, ~2 s if hung
        elif scheme in ("", "file"):
            path = urlsplit(uri).path if scheme == "file" else uri
            self.s3 = False
            self.root = os.path.abspath(os.path.expanduser(path))
            self.uri = self.root
            self._bucket = ""
            self.fs = pafs.LocalFileSystem()
        else:
            raise ValueError(f"cold uri={uri!r} has unknown scheme {scheme!r}; expected a local path, file:// or s3://")
        self._lock = threading.Lock()
        self._n = {"blocks": 0, "bytes": 0, "hits": 0, "misses": 0, "corrupt": 0, "errors": 0}
        self._counted = False
        self._bucket_ok = False
        self._down_until = 0.0  # S3 only: fail fast until then (monotonic seconds)
        self._last_log = -LOG_INTERVAL_S
        self._unlogged = 0

    # ---- writes --------------------------------------------------------
    def put(self, key: str, data: Any, version: int = 0) -> int:
        """Store the serialized block ``data`` (``pa.Buffer``, bytes, a uint8 array or a ``Block``) as
        ``version`` of ``key``, replacing any object of that version. Returns the bytes written. Raises
        ``BlockFormatError`` if ``data`` is not a valid block of ``key`` and ``TierUnavailableError`` if
        the backend fails."""
        buf = data.to_arrow() if isinstance(data, Block) else data
        buf = buf if isinstance(buf, pa.Buffer) else pa.py_buffer(buf)
        Block.from_arrow(buf, expect_key=self._check_key(key))  # never store what a read would reject (~0.5 ms/8 MiB)
        path = self._path(key, _check_version(version))
        self._fail_fast("put", key)
        try:
            old = self._size(path)
            if self.s3:
                self._ensure_bucket()
                with self.fs.open_output_stream(path) as f:  # one PutObject; S3 shows it only once complete
                    f.write(buf)
            else:
                _atomic_write(path, buf)
        except (OSError, pa.ArrowException) as e:
            raise TierUnavailableError(self._failed("put", key, e)) from None
        with self._lock:
            self._n["blocks"] += old is None
            self._n["bytes"] += buf.size - (old or 0)
        return buf.size

    def delete(self, key: str, version: int | None = None) -> bool:
        """Remove ``version`` of ``key`` (None or ``ALL_VERSIONS``: every version). True if one existed;
        ``TierUnavailableError`` if the backend fails."""
        if not _KEY_RE.fullmatch(key if isinstance(key, str) else "") or ".." in key:
            return False  # put() never stores such a key
        self._fail_fast("delete", key)
        try:
            if version is None or version == ALL_VERSIONS:
                paths = [(p, n) for p, n, _ in self._versions(key)]
            else:
                path = self._path(key, version)
                size = self._size(path)
                paths = [] if size is None else [(path, size)]
            gone = 0
            for path, size in paths:
                try:
                    self.fs.delete_file(path)
                except FileNotFoundError:
                    continue  # removed by another process between the two calls
                gone += 1
                with self._lock:
                    self._n["blocks"] -= 1
                    self._n["bytes"] -= size
        except (OSError, pa.ArrowException) as e:
            raise TierUnavailableError(self._failed("delete", key, e)) from None
        return gone > 0

    # ---- reads ---------------------------------------------------------
    def get(self, key: str, expect_model: str | None = None, version: int | None = None) -> Block | None:
        """The verified block of ``version`` of ``key`` (None: the newest version stored, one folder
        listing more), or None (absent, corrupt, or backend down: see ``stats()``)."""
        return self._read(key, expect_model, version)

    def contains(self, key: str, version: int | None = None) -> bool:
        """Whether an object exists for ``key`` (of ``version``; None: any). Contents are verified by ``get``."""
        if not _KEY_RE.fullmatch(key if isinstance(key, str) else "") or ".." in key:
            return False
        if self._in_backoff():
            self._count_error()
            return False
        try:
            if version is None:
                return bool(self._versions(key))
            return self._size(self._path(key, version)) is not None
        except (OSError, pa.ArrowException) as e:
            self._failed("contains", key, e)
            return False

    def list(self) -> Iterator[tuple[str, int]]:
        """``(key, size)`` of every stored object (a key stored in two versions is listed twice)."""
        for key, size, _ in self.list_versions():
            yield key, size

    def list_versions(self) -> Iterator[tuple[str, int, int]]:
        """``(key, size, version)`` of every stored object (temp files of unfinished writes are skipped,
        and removed once older than ``TEMP_MAX_AGE_S``). Raises ``TierUnavailableError`` if the backend
        fails: an empty answer always means an empty store. A complete iteration resets the counts."""
        self._fail_fast("list", "")
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        except (OSError, pa.ArrowException) as e:
            raise TierUnavailableError(self._failed("list", "", e)) from None
        blocks = nbytes = 0
        now = time.time()
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(self.root):].strip("/")
            shard, _, name = rel.rpartition("/")
            if name.startswith(".") and name.endswith(".tmp"):
                mtime = info.mtime.timestamp() if info.mtime is not None else now
                if now - mtime > TEMP_MAX_AGE_S:
                    self._remove_quietly(info.path)
                continue
            key, version = _parse_name(name)
            if not key or "/" in shard or shard != _shard(key):
                continue  # not ours, or somewhere get() would never look
            blocks, nbytes = blocks + 1, nbytes + info.size
            yield key, info.size, version
        with self._lock:
            self._n["blocks"], self._n["bytes"] = blocks, nbytes
            self._counted = True

    def stats(self) -> dict[str, Any]:
        """Counts of this store (no credentials). The first call scans the store for blocks and bytes.
        ``misses`` counts every get that returned None, ``corrupt`` and ``errors`` the reasons."""
        if not self._counted:
            try:
                for _ in self.list():
                    pass
            except TierUnavailableError:
                pass  # counted in errors; blocks/bytes stay at what this process wrote
        with self._lock:
            return dict(self._n, capacity_bytes=self.capacity_bytes, uri=self.uri)

    def available(self) -> bool:
        """Whether the backend answers now: a real probe (local: writable dir with free space; S3: one
        HeadBucket, ~1 ms, at most ~2 s against a hung endpoint). A success ends the S3 fail-fast window."""
        if not self.s3:
            try:
                os.makedirs(self.root, exist_ok=True)
                return os.access(self.root, os.W_OK) and os.statvfs(self.root).f_bavail > 0
            except OSError:
                return False
        try:
            self._probe_fs.get_file_info(self._bucket)  # HeadBucket: a missing bucket still means "reachable"
        except (OSError, pa.ArrowException):
            self._down_until = time.monotonic() + RETRY_AFTER_S
            return False
        self._down_until = 0.0
        return True

    def __repr__(self) -> str:
        return f"ColdStore({self.uri!r}, capacity_bytes={self.capacity_bytes})"

    # ---- internals ---------------------------------------------------------
    def _read(self, key: str, expect_model: str | None, version: int | None) -> Block | None:
        if not _KEY_RE.fullmatch(key if isinstance(key, str) else "") or ".." in key:
            self._count("misses")
            return None  # put() never stores such a key
        if self._in_backoff():
            self._count("misses")
            self._count_error()
            return None
        try:
            if version is None:  # the newest version stored
                found = self._versions(key)
                if not found:
                    raise FileNotFoundError(key)
                version = max(v for _, _, v in found)
            path = self._path(key, version)
            buf = self._read_local(path) if not self.s3 else self._read_s3(path)
            block = Block.from_arrow(buf, expect_key=key, expect_model=expect_model)
        except FileNotFoundError:
            self._count("misses")
            return None
        except BlockFormatError as e:
            self._count("misses", "corrupt")
            log.warning("cold tier %s: object %s of version %s is corrupt, deleting it: %s", self.uri, key, version, e)
            try:
                self.delete(key, version)
            except TierUnavailableError:
                pass  # counted and logged by delete; the next read finds it corrupt again
            return None
        except (OSError, pa.ArrowException) as e:
            self._count("misses")
            self._failed("get", key, e)
            return None
        self._count("hits")
        return block

    def _check_key(self, key: Any) -> str:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or ".." in key:
            raise ValueError(f"key={key!r} cannot name a cold object: use 1-200 of [A-Za-z0-9._=-], "
                             "not starting with '.', without '..' (kvtier.chunk_keys gives such keys)")
        return key

    def _path(self, key: str, version: int = 0) -> str:
        name = f"{key}{_VERSION_SEP}{version:x}" if version else key
        return f"{self.root}/{_shard(key)}/{name}{SUFFIX}"

    def _versions(self, key: str) -> list[tuple[str, int, int]]:
        """(path, size, version) of every object of ``key``: one listing of its folder."""
        folder = f"{self.root}/{_shard(key)}"
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            name = info.path.rsplit("/", 1)[-1]
            if info.type == pafs.FileType.File and name.startswith(key):
                k, v = _parse_name(name)
                if k == key:
                    out.append((info.path, info.size, v))
        return out

    def _read_local(self, path: str) -> pa.Buffer:
        # O_NONBLOCK: a FIFO at the path would block open() forever; only a regular file is an object
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(f"{path} is not a regular file")
            if st.st_size > MAX_OBJECT_BYTES:
                raise BlockFormatError(f"object of {st.st_size} bytes exceeds the largest block ({MAX_OBJECT_BYTES})")
            data = bytearray(st.st_size)
            view, got = memoryview(data), 0
            while got < st.st_size:
                n = os.readv(fd, [view[got:]])
                if n == 0:
                    break  # truncated meanwhile: the block parse rejects it
                got += n
            return pa.py_buffer(bytes(data[:got]) if got < st.st_size else data)
        finally:
            os.close(fd)

    def _read_s3(self, path: str) -> pa.Buffer:
        with self.fs.open_input_file(path) as f:  # one ranged GET on S3: 2x faster than an 8 MiB-buffered stream
            size = f.size()
            if size > MAX_OBJECT_BYTES:
                raise BlockFormatError(f"object of {size} bytes exceeds the largest block ({MAX_OBJECT_BYTES})")
            return f.read_buffer(size)

    def _size(self, path: str) -> int | None:
        info = self.fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else None

    def _ensure_bucket(self) -> None:
        if not self._bucket_ok:
            self.fs.create_dir(self._bucket)  # HeadBucket, then CreateBucket if missing
            self._bucket_ok = True

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except (OSError, pa.ArrowException):
            pass  # a writer finished or removed it meanwhile, or the dir is read-only: next scan

    def _in_backoff(self) -> bool:
        return self.s3 and time.monotonic() < self._down_until

    def _fail_fast(self, op: str, key: str) -> None:
        if self._in_backoff():
            self._count_error()
            what = f"{op} of {key[:16]}" if key else op
            raise TierUnavailableError(f"cold tier {self.uri} is unavailable: {what} not attempted, the last S3 call "
                                       f"failed less than {RETRY_AFTER_S:.0f} s ago")

    def _failed(self, op: str, key: str, e: BaseException) -> str:
        """Count a backend failure, log it (rate-limited), start the S3 fail-fast window; the message."""
        what = f"{op} of {key[:16]}" if key else op
        msg = f"cold tier {self.uri} is unavailable: {what} failed: {type(e).__name__}: {self._scrub(str(e))[:300]}"
        if self.s3:
            self._down_until = time.monotonic() + RETRY_AFTER_S
        self._count_error(msg)
        return msg

    def _count_error(self, msg: str = "") -> None:
        now = time.monotonic()
        with self._lock:
            self._n["errors"] += 1
            self._unlogged += 1
            if not msg or now - self._last_log < LOG_INTERVAL_S:
                return
            n, self._unlogged, self._last_log = self._unlogged, 0, now
        log.error("%s (%d failure%s since the last report)", msg, n, "" if n == 1 else "s")

    def _count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self._n[name] += 1

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text


def _check_version(version: Any) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version={version!r} must be an int >= 0")
    return version


def _parse_name(name: str) -> tuple[str, int]:
    """``<key>~<hex>.kvb`` -> (key, version); ``<key>.kvb`` -> (key, 0); anything else -> ("", 0)."""
    if not name.endswith(SUFFIX):
        return "", 0
    stem = name[: -len(SUFFIX)]
    key, sep, ver = stem.partition(_VERSION_SEP)
    version = 0
    if sep:
        if not re.fullmatch(r"[0-9a-f]{1,16}", ver):
            return "", 0
        version = int(ver, 16)
    if not key or not _KEY_RE.fullmatch(key) or ".." in key:
        return "", 0
    return key, version


def _shard(key: str) -> str:
    # chunk keys are hex digests: their first two characters spread blocks evenly over 256 folders
    head = key[:2].lower()
    return head if _HEX2.fullmatch(head) else "__"


def _s3_filesystem(endpoint: str, region: str, attempts: int) -> pafs.S3FileSystem:
    kw: dict[str, Any] = {}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"s3_endpoint={endpoint!r} must look like http://host:port or https://host")
        kw.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                  session_token=os.environ.get("AWS_SESSION_TOKEN") or None)
    return pafs.S3FileSystem(
        region=region or "us-east-1", allow_bucket_creation=True, allow_delayed_open=True,
        connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kw)


def _atomic_write(path: str, buf: pa.Buffer) -> None:
    """Write to a hidden temp file beside ``path``, fsync, rename over it, fsync the folder."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        # a directory or FIFO squatting on the object's name would fail the rename on every later demotion
        # of this key (the block dropped each time): move it aside, keep it for whoever put it there
        aside = os.path.join(folder, f".{os.path.basename(path)}.blocked-{os.urandom(4).hex()}")
        os.rename(path, aside)
        log.warning("cold tier: %s was not a regular file (mode %o); moved aside to %s", path, mode, aside)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(buf).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # the rename itself survives a power cut only once the folder is synced
    finally:
        os.close(dfd)
