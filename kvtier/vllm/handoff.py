"""The prefill/decode handoff's direct path: decode pulls prefill's blocks from prefill's NIXL arena.

A prefill worker with an ``Arena`` (``kvtier.transport.arena``) saves each chunk
of a handoff once: compressed to a ``Block`` here, its bytes written into the
arena, then that same Block put into the tier (``Handoff.save``). Its arena's
endpoint reaches the prefill's scheduler through vLLM's handshake metadata
(``connector.py``) and rides in the request's ``kv_transfer_params``
(``scheduler.handoff_params``); decode's scheduler puts it on the request's
``LoadSpec.source``. Decode's worker then loads a spec with a source from that
arena first (``Handoff.get``: one index read and one block read, bounded by
``PULL_TIMEOUT_S``), verifies and decodes the blocks in the tier's own load
pipeline (``kvtier.tiers.pipeline.Loader``: checksum, key and model checked, a
corrupt, torn or foreign block is a miss), and gets whatever the
arena did not give from the tier; what the tier misses too the worker reports
as a load error, and vLLM recomputes it.

Decode's scheduler waits (bounded, ``handoff_wait_s``) until prefill's chunks
are in the tier or in the source's arena (its own small agent reads the peer's
index: ``Arena.holds``), so with an arena neither the tier's put nor its get is
on the handoff's path: the bytes come straight from the prefill's memory. The
tier's copy lands behind it and is the fallback.

``transport`` (a connector setting): ``"tier"`` never makes an arena; ``"nixl"``
needs one (start-up fails, naming why, if NIXL cannot start); ``"auto"`` makes
one where NIXL imports and starts, and a handoff goes over NIXL only where both
sides have one. No vLLM import here.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch

from kvtier.block import Block
from kvtier.codecs import compress
from kvtier.errors import TierUnavailableError
from kvtier.tiers.pipeline import Loader
from kvtier.transport.arena import DEFAULT_BYTES, Arena, check_endpoint
from kvtier.vllm.identity import TRANSPORTS

log = logging.getLogger("kvtier.vllm")

# a pull of 32 q1+zstd SmolLM2 chunks reads ~6 MiB: a few ms over shared memory here, ~1 ms at 100 Gb/s; a
# peer's first read wires its UCX connection up (66-200 ms here). 2 s is a dead or stalled source, after
# which the tier (bounded by the worker's load_timeout_s) serves the load
PULL_TIMEOUT_S = 2.0
# decode's scheduler asks the source's arena whether the chunks are there on vLLM's loop: bounded well below a
# step's worth of patience; a source that does not answer within it is left to the tier
PROBE_TIMEOUT_S = 0.5


def make_arena(transport: str, capacity_bytes: int = DEFAULT_BYTES) -> Arena | None:
    """This worker's arena for ``transport`` (see the module docstring); None for "tier" or where "auto"
    finds no NIXL."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r} is not one of {list(TRANSPORTS)}")
    if transport == "tier":
        return None
    try:
        return Arena(capacity_bytes)
    except TierUnavailableError as e:
        if transport == "nixl":
            raise TierUnavailableError(f"kvtier: transport='nixl' but {e}") from None
        log.info("kvtier: transport=auto: handoffs go through the tier (%s)", e)
        return None


def source_of(params: Any) -> dict[str, Any] | None:
    """The arena endpoint in a handoff's params (``{"kvtier": {..., "source": {...}}}``), or None; a malformed
    one is logged and ignored (the handoff then goes through the tier)."""
    h = params.get("kvtier") if isinstance(params, dict) else None
    src = h.get("source") if isinstance(h, dict) else None
    if src is None:
        return None
    try:
        return check_endpoint(src)
    except ValueError as e:
        log.warning("kvtier: ignoring the handoff's source (%s); loading through the tier", e)
        return None


class Handoff:
    """One worker's side of direct handoffs: ``save`` (prefill) and ``get`` (decode), around the tier's
    ``put`` and ``get``."""

    def __init__(self, arena: Arena, get: Callable[[list[str]], list], put: Callable[..., Any],
                 codec: str, model_id: str, device: torch.device | str = "cpu",
                 pull_timeout_s: float = PULL_TIMEOUT_S) -> None:
        if not isinstance(codec, str) or not codec:
            raise ValueError(f"codec={codec!r} must be a codec name")
        self.arena, self._get, self._put = arena, get, put
        self.codec, self.model_id, self.device = codec, model_id, torch.device(device)
        self.pull_timeout_s = pull_timeout_s
        self.loader = Loader()
        self._seen: set[str] = set()  # peers pulled from so far
        self.counters = {"arena_saved_chunks": 0, "arena_pulled_chunks": 0, "arena_missed_chunks": 0,
                         "arena_bad_chunks": 0, "tier_chunks": 0, "arena_pull_us": 0}

    def endpoint(self) -> dict[str, Any]:
        return self.arena.endpoint()

    # ---- prefill ---------------------------------------------------------------
    def save(self, keys: Sequence[str], kvs: Sequence[torch.Tensor], codec: str | None = None) -> list[Block]:
        """``put``'s signature: each chunk compressed once, its bytes into the arena, the same Block into the tier."""
        blocks = [compress(kv, codec or self.codec, key=k, model_id=self.model_id) for k, kv in zip(keys, kvs)]
        for b in blocks:
            if self.arena.write(b.key, b.to_arrow()):
                self.counters["arena_saved_chunks"] += 1
        self._put(list(keys), blocks, codec or self.codec)
        return blocks

    # ---- decode ----------------------------------------------------------------
    def get(self, specs: Sequence[Any], keys: Sequence[str]) -> list[torch.Tensor | None]:
        """The chunks of ``keys`` (the specs' keys in order): from each spec's source arena where it has one,
        from the tier for the rest."""
        out: list[torch.Tensor | None] = [None] * len(keys)
        i = 0
        for spec in specs:
            n = len(spec.keys)
            src = getattr(spec, "source", None)
            if src is not None:
                for j, kv in enumerate(self._pull(src, list(spec.keys))):
                    out[i + j] = kv
            i += n
        rest = [j for j, kv in enumerate(out) if kv is None]
        if rest:
            got = list(self._get([keys[j] for j in rest]))
            if len(got) != len(rest):
                got = [None] * len(rest)
            for j, kv in zip(rest, got):
                out[j] = kv
            self.counters["tier_chunks"] += len(rest)
        return out

    def _pull(self, src: dict[str, Any], keys: list[str]) -> list[torch.Tensor | None]:
        t0 = time.perf_counter()
        try:
            raw = self.arena.read(src, keys, self.pull_timeout_s)
        except ValueError as e:
            log.warning("kvtier: handoff source unusable (%s); loading %d chunks through the tier", e, len(keys))
            raw = [None] * len(keys)
        # the tier's own load pipeline: verify (checksum, key, model) and inflate in its pool, decode; a corrupt,
        # torn or foreign block is a miss with its reason, never data
        out: list[torch.Tensor | None] = []
        for got in self.loader.load(keys, raw, self.device, expect_model=self.model_id,
                                    timeout_s=self.pull_timeout_s):
            if got.status == "ok":
                self.counters["arena_pulled_chunks"] += 1
            else:
                self.counters["arena_missed_chunks"] += 1
                if got.status != "missing":
                    self.counters["arena_bad_chunks"] += 1
                    log.warning("kvtier: handoff block %s from the arena is %s (%s); loading it from the tier",
                                got.key[:16], got.status, got.error)
            out.append(got.kv if got.status == "ok" else None)
        dt = time.perf_counter() - t0
        self.counters["arena_pull_us"] += int(dt * 1e6)
        got = sum(kv is not None for kv in out)
        if got < len(keys):  # released from its ring (a late decode), never written, or unreadable: worth knowing
            log.warning("kvtier: arena %s gave %d of %d chunks; the tier serves the rest", src["agent"], got, len(keys))
        if src["agent"] not in self._seen:  # once per peer: that direct handoffs work (or do not) is in the log
            self._seen.add(src["agent"])
            log.info("kvtier: first handoff from arena %s: %d of %d chunks pulled in %.1f ms", src["agent"], got,
                     len(keys), dt * 1e3)
        return out

    def close(self) -> None:
        self.loader.close()
        self.arena.close()
