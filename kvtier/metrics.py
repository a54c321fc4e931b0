"""Prometheus metrics of a kvtier process, recorded through Ray's metrics system.

Each process that takes part in the tier (the controller actor, every warm shard
actor, every client in a prefill/decode worker) makes its own ``TierMetrics``
and calls it where the event happens; there is no module-level singleton. Ray's
metrics agent on every node collects what the processes record and serves it in
the Prometheus text format on the node's metrics export port (8080 on KubeRay,
``ray.init(_metrics_export_port=P)`` locally). Ray prefixes every name with
``ray_`` and appends ``_total`` to counters, so ``kvtier_hits`` is scraped as
``ray_kvtier_hits_total``; :func:`exported_names` lists the scraped names, and
the Grafana dashboard in ``helm/kvtier/dashboards/`` uses only those.

This module is not a store of statistics: it keeps no counts of its own (that is
``kvtier.stats()``), and reading a value back means scraping the exporter.
``ray.util.metrics`` is imported when a ``TierMetrics`` is made, never at
``import kvtier``; recording works in a process that is not connected to Ray
(the points go nowhere), so the tiers can be unit-tested with a real instance.

Label vocabulary (kept closed so that the series stay few):
    tier       "hot" | "warm" | "cold"; misses and get latencies also take
               "none" = the key was in no tier (``kvtier.get`` returned None)
    role       who records: "controller" | "shard" | "client" (a default tag)
    shard      the shard's name for a warm shard actor, "" elsewhere (a default tag)
    transport, codec, kind   short names: letters, digits, ``_ . + -``
Ray adds ``NodeAddress`` (the node's IP), ``WorkerId``, ``SessionName`` and
``Component`` to every series, so there is no separate node tag here.

Ray 2.60 exports a histogram's bucket counts exactly but its ``_sum`` as the sum
of bucket midpoints (an observation of 4 ms in the 2.5-5 ms bucket adds 3.75 ms),
so use ``histogram_quantile`` over ``_bucket`` for latencies, and the byte
counters, not the ratio histogram's ``_sum``, for the mean compression ratio.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

TIERS = ("hot", "warm", "cold")
NO_TIER = "none"  # a get that found the key in no tier
ROLES = ("controller", "shard", "client")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")

# Seconds. A hot hit is ~0.1-1 ms, a warm get of one 32 MiB chunk ~10-50 ms (the
# tier's aim: p99 <= 50 ms), a cold S3 read 50-500 ms, and recomputing a 16K
# prefix on an H100 ~600 ms: buckets from 0.25 ms to 10 s cover all of them
# with 2-2.5x steps, so p50/p99 stay within one step of the truth.
LATENCY_BOUNDARIES = [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                      0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
# raw bytes / stored bytes: fp8 ~2x, kivi4/rot4 ~3.5-4x, q codecs ~2-7x, +zstd adds 5-20%.
RATIO_BOUNDARIES = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as recorded; Ray exports "ray_" + name (+ "_total" for counters)
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


DEFAULT_TAGS = ("role", "shard")  # on every series: who records, and which warm shard

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("kvtier_hits", "counter", "Blocks served from this tier (verified and returned)", ("tier",)),
    MetricSpec("kvtier_hit_tokens", "counter", "Tokens of the blocks served from this tier", ("tier",)),
    MetricSpec("kvtier_misses", "counter",
               "Lookups that did not find the key in this tier; tier=none: in no tier", ("tier",)),
    MetricSpec("kvtier_tier_blocks", "gauge", "Blocks held in this tier", ("tier",)),
    MetricSpec("kvtier_tier_bytes", "gauge", "Stored (compressed) bytes held in this tier", ("tier",)),
    MetricSpec("kvtier_tier_capacity_bytes", "gauge", "Byte budget of this tier (0 = unbounded)", ("tier",)),
    MetricSpec("kvtier_get_latency_seconds", "histogram",
               "Latency of a get, by the tier that served it (none: a miss)", ("tier",), tuple(LATENCY_BOUNDARIES)),
    MetricSpec("kvtier_put_latency_seconds", "histogram",
               "Latency of a put as the caller sees it", (), tuple(LATENCY_BOUNDARIES)),
    MetricSpec("kvtier_demotions", "counter", "Blocks moved down from src to dst", ("src", "dst")),
    MetricSpec("kvtier_evictions", "counter", "Blocks dropped from this tier without a copy below", ("tier",)),
    MetricSpec("kvtier_corrupt_blocks", "counter", "Blocks that failed verification on read (never served)", ("tier",)),
    MetricSpec("kvtier_transfer_bytes", "counter", "Bytes moved between processes, by transport", ("transport",)),
    MetricSpec("kvtier_raw_bytes", "counter", "Raw (uncompressed) KV bytes of the blocks put", ("codec",)),
    MetricSpec("kvtier_stored_bytes", "counter", "Stored (compressed, all overheads counted) bytes of the blocks put",
               ("codec",)),
    MetricSpec("kvtier_compression_ratio", "histogram", "raw bytes / stored bytes of each block put",
               ("codec",), tuple(RATIO_BOUNDARIES)),
    MetricSpec("kvtier_errors", "counter", "Errors of a tier's backend, by kind", ("tier", "kind")),
)


def exported_names() -> frozenset[str]:
    """The series names a Prometheus scrape of Ray's exporter shows for ``METRICS``."""
    names = set()
    for m in METRICS:
        base = "ray_" + m.name
        if m.kind == "counter":
            names.add(base + "_total")
        elif m.kind == "gauge":
            names.add(base)
        else:
            names.update((base + "_bucket", base + "_sum", base + "_count"))
    return frozenset(names)


def _check_tier(tier: str, *, allow_none: bool = False) -> str:
    allowed = TIERS + ((NO_TIER,) if allow_none else ())
    if tier not in allowed:
        raise ValueError(f"tier={tier!r} is not one of {list(allowed)}")
    return tier


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{what}={value!r} must be 1-64 characters of letters, digits, '_', '.', '+' or '-'")
    return value


def _check_count(what: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what}={n!r} must be an int >= 0")
    return n


def _check_number(what: str, x: float, *, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{what}={x!r} must be a finite number {'> 0' if positive else '>= 0'}")
    return float(x)


class TierMetrics:
    """The metrics one process records; make one per actor or client process.

    ``role`` says who records ("controller", "shard", "client"); ``shard`` names
    the warm shard for a shard actor. Both become default tags of every series.
    Every method validates its arguments and raises ``ValueError`` naming a bad
    one (an unknown tier, a negative count), so a caller's bug does not create
    stray series. Counts of 0 record nothing (Ray counters reject 0).
    """

    def __init__(self, role: str, shard: str = "") -> None:
        if role not in ROLES:
            raise ValueError(f"role={role!r} is not one of {list(ROLES)}")
        if shard:
            _check_name("shard", shard)
        self.role, self.shard = role, shard
        from ray.util import metrics as rm  # lazy: `import kvtier` must not import Ray

        defaults = {"role": role, "shard": shard}
        made = {}
        for spec in METRICS:
            keys = spec.tag_keys + DEFAULT_TAGS
            if spec.kind == "counter":
                m = rm.Counter(spec.name, spec.description, tag_keys=keys)
            elif spec.kind == "gauge":
                m = rm.Gauge(spec.name, spec.description, tag_keys=keys)
            else:
                m = rm.Histogram(spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=keys)
            made[spec.name] = m.set_default_tags(defaults)
        self._m = made

    # -- lookups ---------------------------------------------------------------
    def hit(self, tier: str, n: int = 1, tokens: int = 0) -> None:
        """``n`` blocks (``tokens`` tokens) were served from ``tier``."""
        _check_tier(tier)
        if _check_count("n", n):
            self._m["kvtier_hits"].inc(n, {"tier": tier})
        if _check_count("tokens", tokens):
            self._m["kvtier_hit_tokens"].inc(tokens, {"tier": tier})

    def miss(self, tier: str, n: int = 1) -> None:
        """``n`` keys were looked for in ``tier`` and not found there; ``tier="none"``:
        found in no tier at all (the get returned None). A get that falls through
        hot and warm to a cold hit records miss("hot"), miss("warm"), hit("cold")."""
        _check_tier(tier, allow_none=True)
        if _check_count("n", n):
            self._m["kvtier_misses"].inc(n, {"tier": tier})

    def get_latency(self, seconds: float, tier: str) -> None:
        """One get took ``seconds``; ``tier`` served it ("none" for a miss)."""
        self._m["kvtier_get_latency_seconds"].observe(
            _check_number("seconds", seconds), {"tier": _check_tier(tier, allow_none=True)})

    def put_latency(self, seconds: float) -> None:
        self._m["kvtier_put_latency_seconds"].observe(_check_number("seconds", seconds))

    # -- occupancy -------------------------------------------------------------
    def tier_usage(self, tier: str, blocks: int, nbytes: int, capacity: int) -> None:
        """This process holds ``blocks`` blocks of ``nbytes`` stored bytes in ``tier``,
        against a budget of ``capacity`` bytes (0 = unbounded). Report each tier
        from one place only — hot from each client, warm from each shard, cold from
        the controller — so that summing over processes does not count twice."""
        tags = {"tier": _check_tier(tier)}
        self._m["kvtier_tier_blocks"].set(_check_count("blocks", blocks), tags)
        self._m["kvtier_tier_bytes"].set(_check_count("nbytes", nbytes), tags)
        self._m["kvtier_tier_capacity_bytes"].set(_check_count("capacity", capacity), tags)

    # -- movement --------------------------------------------------------------
    def demotion(self, src: str, dst: str, n: int = 1) -> None:
        """``n`` blocks moved down from ``src`` to ``dst`` (hot->warm, warm->cold)."""
        if TIERS.index(_check_tier(src)) >= TIERS.index(_check_tier(dst)):
            raise ValueError(f"demotion src={src!r} dst={dst!r}: dst must be a lower tier than src")
        if _check_count("n", n):
            self._m["kvtier_demotions"].inc(n, {"src": src, "dst": dst})

    def eviction(self, tier: str, n: int = 1) -> None:
        """``n`` blocks were dropped from ``tier`` to make room, with no copy below."""
        _check_tier(tier)
        if _check_count("n", n):
            self._m["kvtier_evictions"].inc(n, {"tier": tier})

    def corrupt(self, tier: str, n: int = 1) -> None:
        """``n`` blocks read from ``tier`` failed their checksum or header check."""
        _check_tier(tier)
        if _check_count("n", n):
            self._m["kvtier_corrupt_blocks"].inc(n, {"tier": tier})

    def transfer(self, transport: str, nbytes: int) -> None:
        """``nbytes`` crossed a process boundary by ``transport`` (e.g. "object_store",
        "nixl", "s3", "file")."""
        _check_name("transport", transport)
        if _check_count("nbytes", nbytes):
            self._m["kvtier_transfer_bytes"].inc(nbytes, {"transport": transport})

    def compression(self, codec: str, raw_bytes: int, stored_bytes: int) -> None:
        """One block of ``raw_bytes`` was stored in ``stored_bytes`` by ``codec``
        (``Block.raw_nbytes``, ``Block.nbytes``). The byte counters give the exact
        bytes-weighted ratio (rate of raw / rate of stored); the histogram gives the
        spread of per-block ratios (its _sum is bucket midpoints in Ray, see above)."""
        tags = {"codec": _check_name("codec", codec)}
        if _check_count("stored_bytes", stored_bytes) == 0:
            raise ValueError(f"stored_bytes={stored_bytes!r} must be > 0 (every block has a header)")
        if _check_count("raw_bytes", raw_bytes):
            self._m["kvtier_raw_bytes"].inc(raw_bytes, tags)
        self._m["kvtier_stored_bytes"].inc(stored_bytes, tags)
        self._m["kvtier_compression_ratio"].observe(raw_bytes / stored_bytes, tags)

    def error(self, tier: str, kind: str, n: int = 1) -> None:
        """A backend of ``tier`` failed (``kind``: e.g. "timeout", "unreachable",
        "disk_full", "read_only"); the caller logs it at most once per interval."""
        _check_tier(tier)
        _check_name("kind", kind)
        if _check_count("n", n):
            self._m["kvtier_errors"].inc(n, {"tier": tier, "kind": kind})

    def __repr__(self) -> str:
        return f"TierMetrics(role={self.role!r}, shard={self.shard!r})"
