"""The scheduler side of the kvtier connector: what to load and what to save, step by step.

It runs in vLLM's EngineCore process and never touches KV data. Per request it
keys the prompt once (``identity.request_keys``), asks the tier in one batched
lookup how many leading chunks it holds, and offers those tokens to vLLM,
capped below the prompt length (vLLM must compute at least one token). A chunk
is found only once its put has completed: the tier indexes a key when its shard
has the block, so a chunk still being saved is never advertised.

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

from kvtier.vllm.identity import request_keys

log = logging.getLogger("kvtier.vllm")

# A lookup runs on vLLM's scheduling loop: one that fails, or takes longer than SLOW_LOOKUP_S (the client
# waits up to rpc_timeout_s, 10 s by default, for a controller that is down), makes every lookup a miss for
# BACKOFF_S. Without this a tier that was down stalled a benchmark request for 217 s (one 10 s wait per call).
SLOW_LOOKUP_S = 5.0  # lookups take 2-30 ms; 5 s is a controller that is not answering, not a busy box
BACKOFF_S = 30.0


@dataclass
class LoadSpec:
    """Chunks ``keys`` go into ``block_ids`` (one row per chunk; -1 = a block vLLM already holds)."""

    req_id: str
    keys: list[str]
    block_ids: list[list[int]]


@dataclass
class SaveSpec:
    req_id: str
    keys: list[str]
    block_ids: list[list[int]]


@dataclass
class _Req:
    keys: list[str]
    prompt_len: int
    stored: int = 0               # leading chunks known to be in the tier (found or saved)
    offer: tuple[int, int] = (0, 0)  # (local computed tokens, external tokens) of the last offer
    load: LoadSpec | None = None


@dataclass
class SchedulerSide:
    identity: str
    chunk_tokens: int
    block_size: int
    tenant: str
    lookup: Callable[[list[str]], int]     # leading keys present; raises or returns 0 when the tier is down
    block_ids_of: Callable[[str], Sequence[int]]
    reqs: dict[str, _Req] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: {"lookups": 0, "hit_tokens": 0, "saved_chunks": 0,
                                                             "lookup_errors": 0, "skipped_lookups": 0})
    clock: Callable[[], float] = time.monotonic
    _down_until: float = 0.0

    def _state(self, request: Any) -> _Req:
        st = self.reqs.get(request.request_id)
        if st is None:
            prompt = list(request.prompt_token_ids or [])
            # a request may opt out (SamplingParams(extra_args={"kv_transfer_params": {"kvtier": "off"}})):
            # no keys, so no lookup and no save; the demo's recompute baseline on the same engine
            off = (getattr(request, "kv_transfer_params", None) or {}).get("kvtier") == "off"
            keys = [] if off else request_keys(prompt, self.identity, self.chunk_tokens, self.tenant,
                                               getattr(request, "cache_salt", None))
            st = self.reqs[request.request_id] = _Req(keys, len(prompt))
        return st

    def matched(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """vLLM's ``get_num_new_matched_tokens``: tokens beyond ``num_computed_tokens`` the tier can load."""
        st = self._state(request)
        st.offer = (num_computed_tokens, 0)
        if not st.keys or getattr(request, "prompt_embeds", None) is not None:
            return 0, False
        if self.clock() < self._down_until:
            self.counters["skipped_lookups"] += 1
            return 0, False
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
        st.stored = max(st.stored, found)
        # vLLM computes at least the last prompt token itself: cap at prompt_len - 1, whole chunks
        usable = min(found * self.chunk_tokens, (st.prompt_len - 1) // self.chunk_tokens * self.chunk_tokens)
        ext = max(0, usable - num_computed_tokens)
        st.offer = (num_computed_tokens, ext)
        return ext, False

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
        st.load = LoadSpec(request.request_id, st.keys[c0:c1], rows)
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
            saves.append(SaveSpec(req_id, st.keys[st.stored:done], rows))
            self.counters["saved_chunks"] += done - st.stored
            st.stored = done
        return loads, saves

    def finished(self, req_id: str) -> None:
        self.reqs.pop(req_id, None)
