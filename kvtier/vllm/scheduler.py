"""The scheduler side of the kvtier connector: what to load and what to save, step by step.

It runs in vLLM's EngineCore process and never touches KV data. Per request it
keys the prompt once (``identity.request_keys``), asks the tier in one batched
lookup how many leading chunks it holds, and offers those tokens to vLLM,
capped below the prompt length (vLLM must compute at least one token). A chunk
is found only once its put has completed: the tier indexes a key when its shard
has the block, so a chunk still being saved is never advertised.

Prefill/decode handoff: a request that finishes with vLLM's ``do_remote_decode``
(Ray Serve LLM's prefill leg) returns ``{"kvtier": {"chunks": n, "key": ...}}`` as
its ``kv_transfer_params`` (``handoff_params``): how many leading chunks it saved
or found, and the last one's key. Decode gets those params; its saves may still
be in flight (the worker compresses and puts them in the background after the
one-token response), so until the tier holds ``n`` chunks, or ``handoff_wait_s``
passes, ``matched`` returns ``None`` ("ask again later": vLLM skips the request
this step and asks on the next). It never waits inside the call; re-lookups are
spaced ``HANDOFF_POLL_S`` apart. When the bound passes it offers what is there
and vLLM recomputes the rest. Where prefill's worker has a NIXL arena its params
also carry its endpoint (``"source"``): decode then also asks that arena (one
index READ, ``probe``) and stops waiting once the arena or the tier holds the
chunks, and its load plan passes the source on to its worker, which pulls the
chunks from the arena while the tier serves what the arena does not
(``handoff.py``).

After vLLM allocates blocks for an offered hit it plans one synchronous load
(done by the worker before the step's forward). Each step it plans saves of the
prompt chunks whose tokens the step completes (the worker copies them out after
the forward and stores them in the background). The plans are plain lists,
turned into vLLM's metadata object by ``connector.py``; this module imports
nothing from vLLM, so it is tested with small fakes as well as with vLLM's own
scheduler.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kvtier.vllm import handoff
from kvtier.vllm.identity import request_keys

log = logging.getLogger("kvtier.vllm")

# A lookup runs on vLLM's scheduling loop: one that fails, or takes longer than SLOW_LOOKUP_S (the client
# waits up to rpc_timeout_s, 10 s by default, for a controller that is down), makes every lookup a miss for
# BACKOFF_S. Without this a tier that was down stalled a benchmark request for 217 s (one 10 s wait per call).
SLOW_LOOKUP_S = 5.0  # lookups take 2-30 ms; 5 s is a controller that is not answering, not a busy box
BACKOFF_S = 30.0
# While decode waits for prefill's saves vLLM's loop calls ``matched`` every step (a spin: ~0.1 ms a step when
# idle); a re-lookup every 20 ms keeps it to <= 50 controller calls a second per waiting request.
HANDOFF_POLL_S = 0.02
HANDOFF_KEY = "kvtier"


@dataclass
class LoadSpec:
    """Chunks ``keys`` go into ``block_ids`` (one row per chunk; -1 = a block vLLM already holds)."""

    req_id: str
    keys: list[str]
    block_ids: list[list[int]]
    source: dict[str, Any] | None = None  # the prefill's arena endpoint (a direct handoff), else the tier


@dataclass
class SaveSpec:
    req_id: str
    keys: list[str]
    block_ids: list[list[int]]
    handoff: bool = False  # a prefill for a remote decode: that decode waits for these chunks (saved at once)


@dataclass
class _Req:
    keys: list[str]
    prompt_len: int
    stored: int = 0               # leading chunks known to be in the tier (found or saved)
    offer: tuple[int, int] = (0, 0)  # (local computed tokens, external tokens) of the last offer
    load: LoadSpec | None = None
    expect: int = 0               # chunks a remote prefill saved that decode waits for (0: not waiting)
    wait_until: float = 0.0       # when the wait for them ends
    next_poll: float = 0.0
    handoff: bool = False         # a prefill whose decode runs elsewhere (vLLM's do_remote_decode)
    source: dict[str, Any] | None = None  # the remote prefill's arena endpoint, from its params


def handoff_params(keys: Sequence[str], stored: int, source: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``kv_transfer_params`` a prefill returns: the count and last key of the chunks it saved or found,
    and where its worker's arena is (``source``, when it has one: decode may pull them from there)."""
    if stored <= 0 or stored > len(keys):
        return None
    h: dict[str, Any] = {"chunks": int(stored), "key": keys[stored - 1]}
    if source is not None:
        h["source"] = source
    return {HANDOFF_KEY: h}


def expected_chunks(params: Any, keys: Sequence[str]) -> int:
    """How many of ``keys`` a prefill's ``kv_transfer_params`` say it saved; 0 if the params are absent,
    malformed, or name other keys (another tenant, salt or model: chained keys make the last key decide)."""
    h = params.get(HANDOFF_KEY) if isinstance(params, dict) else None
    if not isinstance(h, dict):
        return 0
    n, key = h.get("chunks"), h.get("key")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= len(keys) or keys[n - 1] != key:
        if h:
            log.warning("kvtier: handoff params %r do not name this request's chunks; not waiting", h)
        return 0
    return n


@dataclass
class SchedulerSide:
    identity: str
    chunk_tokens: int
    block_size: int
    tenant: str
    lookup: Callable[[list[str]], int]     # leading keys present; raises or returns 0 when the tier is down
    block_ids_of: Callable[[str], Sequence[int]]
    handoff_wait_s: float = 5.0
    ready: Callable[[], bool] = lambda: True  # this process reaches the tier (until then lookups are misses)
    # this engine's worker's arena endpoint (vLLM's handshake metadata; None: no arena, or transport "tier").
    # A prefill hands it to decode; decode loads from a request's source only when it has one itself
    source: dict[str, Any] | None = None
    direct: bool = True  # decode side: plan direct pulls from a source (False: transport "tier")
    # decode side: how many leading keys a source's arena holds now (one index READ, bounded), None if it
    # cannot be read. With it decode stops waiting once the arena has prefill's chunks, not the tier
    probe: Callable[[dict[str, Any], list[str]], int | None] | None = None
    reqs: dict[str, _Req] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: {"lookups": 0, "hit_tokens": 0, "saved_chunks": 0,
                                                             "lookup_errors": 0, "skipped_lookups": 0,
                                                             "handoff_waits": 0, "handoff_timeouts": 0,
                                                             "arena_probes": 0})
    clock: Callable[[], float] = time.monotonic
    _down_until: float = 0.0

    def _state(self, request: Any) -> _Req:
        st = self.reqs.get(request.request_id)
        if st is None:
            prompt = list(request.prompt_token_ids or [])
            # a request may opt out (SamplingParams(extra_args={"kv_transfer_params": {"kvtier": "off"}})):
            # no keys, so no lookup and no save; the demo's recompute baseline on the same engine
            params = getattr(request, "kv_transfer_params", None)
            params = params if isinstance(params, dict) else {}
            off = params.get("kvtier") == "off"
            keys = [] if off else request_keys(prompt, self.identity, self.chunk_tokens, self.tenant,
                                               getattr(request, "cache_salt", None))
            st = self.reqs[request.request_id] = _Req(keys, len(prompt))
            st.handoff = bool(params.get("do_remote_decode"))
            st.expect = expected_chunks(params, keys)
            st.source = handoff.source_of(params) if st.expect and self.direct else None
            st.wait_until = self.clock() + self.handoff_wait_s
        return st

    def matched(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """vLLM's ``get_num_new_matched_tokens``: tokens beyond ``num_computed_tokens`` the tier can load,
        or None while a remote prefill's chunks are not all in the tier yet (bounded by ``handoff_wait_s``)."""
        st = self._state(request)
        st.offer = (num_computed_tokens, 0)
        if not st.keys or getattr(request, "prompt_embeds", None) is not None:
            return 0, False
        if self.clock() < self._down_until:
            self.counters["skipped_lookups"] += 1
            st.expect = 0  # the tier is down: waiting for it would only delay the recompute
            return 0, False
        if st.expect and not self.ready():
            st.expect = 0  # not connected yet: every lookup would be a miss, waiting gains nothing
        if st.expect and self.clock() < st.next_poll:
            return None, False
        self.counters["lookups"] += 1
        t0 = self.clock()
        try:
            found = int(self.lookup(st.keys))
        except Exception as e:  # noqa: BLE001 - a tier that is down is a miss, never an engine error
            self.counters["lookup_errors"] += 1
            log.warning("kvtier: lookup failed (%s: %s); every lookup is a miss for %.0f s",
                        type(e).__name__, e, BACKOFF_S)
            self._down_until = self.clock() + BACKOFF_S
            found = 0
        if self.clock() - t0 > SLOW_LOOKUP_S:
            log.warning("kvtier: a lookup took %.1f s; every lookup is a miss for %.0f s", self.clock() - t0, BACKOFF_S)
            self._down_until = self.clock() + BACKOFF_S
        if st.expect and found < st.expect and st.source is not None and self.probe is not None:
            found += self._probe(request, st, st.keys[found:st.expect])
        if st.expect and found < st.expect:
            now = self.clock()
            # a lookup that failed or was slow is a sick tier: recompute now rather than wait on it
            if now < st.wait_until and now >= self._down_until:
                st.next_poll = now + HANDOFF_POLL_S
                self.counters["handoff_waits"] += 1
                return None, False
            if now >= st.wait_until:
                log.warning("kvtier: request %s: prefill saved %d chunks, %d in the tier after %.1f s; "
                            "loading those, recomputing the rest", request.request_id, st.expect, found,
                            self.handoff_wait_s)
                self.counters["handoff_timeouts"] += 1
        st.expect = 0  # settled: later calls (vLLM may ask again) look up once and answer
        st.stored = max(st.stored, found)
        # vLLM computes at least the last prompt token itself: cap at prompt_len - 1, whole chunks
        usable = min(found * self.chunk_tokens, (st.prompt_len - 1) // self.chunk_tokens * self.chunk_tokens)
        ext = max(0, usable - num_computed_tokens)
        st.offer = (num_computed_tokens, ext)
        return ext, False

    def _probe(self, request: Any, st: _Req, keys: list[str]) -> int:
        """Leading ``keys`` in the request's source arena; a source that cannot be read is dropped (its load
        goes through the tier) rather than asked again on every step of vLLM's loop."""
        try:
            n = self.probe(st.source, keys)
        except Exception as e:  # noqa: BLE001 - a bad source is the tier's job, never an engine error
            log.warning("kvtier: request %s: its source arena cannot be asked (%s: %s)", request.request_id,
                        type(e).__name__, e)
            n = None
        self.counters["arena_probes"] += 1
        if n is None:
            st.source = None
            return 0
        return int(n)

    def after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """vLLM's ``update_state_after_alloc``: plan the load of the offered tokens into ``block_ids``."""
        st = self._state(request)
        if num_external_tokens <= 0:
            return
        local, ext = st.offer
        if ext != num_external_tokens:  # vLLM took another count than offered: load nothing, recompute
            log.warning("kvtier: request %s was allocated %d external tokens, %d offered; not loading",
                        request.request_id, num_external_tokens, ext)
            return
        c0, c1 = local // self.chunk_tokens, (local + ext) // self.chunk_tokens
        per = self.chunk_tokens // self.block_size
        first_new_block = local // self.block_size
        rows = []
        for c in range(c0, c1):
            row = [int(b) if c * per + j >= first_new_block else -1
                   for j, b in enumerate(block_ids[c * per:(c + 1) * per])]
            if len(row) != per:
                log.warning("kvtier: request %s has %d blocks, chunk %d needs %d; not loading",
                            request.request_id, len(block_ids), c, (c + 1) * per)
                return
            rows.append(row)
        st.load = LoadSpec(request.request_id, st.keys[c0:c1], rows, st.source)
        st.stored = max(st.stored, c1)
        self.counters["hit_tokens"] += ext

    def build(self, scheduled: dict[str, int], computed_before: dict[str, int]) -> tuple[list[LoadSpec], list[SaveSpec]]:
        """Plans of one step. ``scheduled``: req_id -> tokens scheduled this step; ``computed_before``:
        req_id -> tokens computed before it. Loads planned since the last step, saves of every prompt chunk
        this step completes."""
        loads = []
        for st in self.reqs.values():
            if st.load is not None:
                loads.append(st.load)
                st.load = None
        saves = []
        per = self.chunk_tokens // self.block_size
        for req_id, n in scheduled.items():
            st = self.reqs.get(req_id)
            if st is None or not st.keys:
                continue
            done = min(computed_before.get(req_id, 0) + n, st.prompt_len) // self.chunk_tokens
            done = min(done, len(st.keys))
            if done <= st.stored:
                continue
            blocks = list(self.block_ids_of(req_id))
            if len(blocks) < done * per:
                continue
            rows = [[int(b) for b in blocks[c * per:(c + 1) * per]] for c in range(st.stored, done)]
            saves.append(SaveSpec(req_id, st.keys[st.stored:done], rows, st.handoff))
            self.counters["saved_chunks"] += done - st.stored
            st.stored = done
        return loads, saves

    def finished(self, request: Any) -> dict[str, Any] | None:
        """vLLM's ``request_finished``: forget the request; a prefill for a remote decode returns what it
        saved (``handoff_params``), so decode can wait for those chunks instead of racing their puts."""
        st = self.reqs.pop(request.request_id, None)
        params = getattr(request, "kv_transfer_params", None)
        if st is None or not (isinstance(params, dict) and params.get("do_remote_decode")) or not self.ready():
            return None  # not connected: the worker dropped this prefill's saves, decode must not wait for them
        return handoff_params(st.keys, st.stored, self.source)
