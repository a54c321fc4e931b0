"""``KVTierConnector``: kvtier as vLLM 0.32's v1 KV connector (both roles).

    LLM(model=..., kv_transfer_config={"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"codec": "none", "namespace": "kvtier"}})

The class is the thin shell DESIGN.md asks for: it validates the engine it sits
in (one full-attention KV group; sliding-window and hybrid models are refused),
names the model (``identity.py``), connects to the tier (``tier.py``) and hands
the work to ``scheduler.SchedulerSide`` (EngineCore process) and
``worker.WorkerSide`` (worker process). The one vLLM-specific piece of page
handling is here: the page format is detected once in ``register_kv_caches``
and checked against a pattern written by vLLM's own cache-write kernel, so a
layout vLLM changed is refused by name instead of read wrong.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import kvtier
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorHandshakeMetadata, KVConnectorMetadata, KVConnectorRole)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.vllm import handoff, pages, tier
from kvtier.vllm.identity import ConnectorSettings, model_identity, tier_model_id, weights_digest
from kvtier.vllm.scheduler import LoadSpec, SaveSpec, SchedulerSide
from kvtier.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("kvtier.vllm")


@dataclass
class KVTierMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class KVTierHandshake(KVConnectorHandshakeMetadata):
    """A worker's arena endpoint, sent once to its own scheduler (vLLM's handshake hook): a prefill's
    scheduler puts it in its handoffs' params."""

    endpoint: dict[str, Any]


def _cpu_isa(dtype: torch.dtype, block_size: int, head_dim: int, cache_dtype: str) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_dim, cache_dtype)


def expected_format(vllm_config: "VllmConfig") -> str:
    """The page format this engine's attention writes, from its config (both roles agree on it)."""
    from vllm.platforms import current_platform

    mc, cc = vllm_config.model_config, vllm_config.cache_config
    if cc.cache_dtype not in ("auto", None) and "fp8" in str(cc.cache_dtype):
        raise ValueError(f"kvtier: kv_cache_dtype={cc.cache_dtype!r} is not supported (fp8 pages); "
                         "use kvtier's fp8 codec with an unquantized cache instead")
    if current_platform.is_cpu():
        return f"cpu-{_cpu_isa(mc.dtype, cc.block_size, mc.get_head_size(), cc.cache_dtype)}"
    if current_platform.is_cuda():
        return "flash"
    raise ValueError(f"kvtier: platform {current_platform.device_name!r} has no supported page format")


def _check_full_attention(kv_cache_config: "KVCacheConfig | None", vllm_config: "VllmConfig") -> None:
    hf = vllm_config.model_config.hf_text_config
    if getattr(hf, "sliding_window", None) or any(t != "full_attention" for t in (getattr(hf, "layer_types", None) or ())):
        raise ValueError("kvtier: sliding-window and hybrid-attention models are not supported (model "
                         f"{vllm_config.model_config.model!r} has sliding_window="
                         f"{getattr(hf, 'sliding_window', None)!r}); only full-attention models are")
    if kv_cache_config is None:
        return
    groups = kv_cache_config.kv_cache_groups
    kinds = [type(g.kv_cache_spec).__name__ for g in groups]
    if len(groups) != 1 or kinds[0] != "FullAttentionSpec":
        raise ValueError(f"kvtier: KV cache groups {kinds} are not one full-attention group; "
                         "sliding-window, hybrid and MLA models are not supported")


class KVTierConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _check_full_attention(kv_cache_config, vllm_config)
        self.settings = ConnectorSettings.parse(self._kv_transfer_config.kv_connector_extra_config)
        mc, cc = vllm_config.model_config, vllm_config.cache_config
        self.block_size = cc.block_size
        self.tier_cfg = self.settings.tier_config(self.block_size)
        self.page_format = expected_format(vllm_config)
        self.kv_dtype = str(mc.dtype).removeprefix("torch.")
        if not self.tier_cfg.model_id:  # every block names its model, every get checks it; profiles apply
            self.tier_cfg = dataclasses.replace(self.tier_cfg, model_id=tier_model_id(
                str(mc.model), mc.get_num_layers(vllm_config.parallel_config),
                mc.get_num_kv_heads(vllm_config.parallel_config), mc.get_head_size(), self.kv_dtype))
        tier.start(self.settings.address, self.settings.namespace, self.tier_cfg, self.settings.connect_timeout_s)
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._handoff: handoff.Handoff | None = None
        self._probe_arena = None  # scheduler role: asks remote prefills' arenas (see _probe)
        if role == KVConnectorRole.SCHEDULER:
            # the folder (or hub) name, not served_model_name: an alias must not split one model's cache
            ident = model_identity(str(mc.model).rstrip("/").rsplit("/", 1)[-1], mc.get_num_layers(vllm_config.parallel_config),
                                   mc.get_num_kv_heads(vllm_config.parallel_config), mc.get_head_size(), self.kv_dtype,
                                   weights_digest(mc.model, mc.revision or ""), self.page_format)
            self.identity = ident
            self._sched = SchedulerSide(ident, self.tier_cfg.chunk_tokens, self.block_size, self.tier_cfg.tenant,
                                        lookup=self._lookup, block_ids_of=self._block_ids_of,
                                        handoff_wait_s=self.settings.handoff_wait_s, ready=tier.ready,
                                        direct=self.settings.transport != "tier",
                                        probe=self._probe if self.settings.transport != "tier" else None)
            log.info("kvtier connector (scheduler): %s, %d-token chunks, codec %s", ident,
                     self.tier_cfg.chunk_tokens, self.tier_cfg.codec)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a later miss

    # ---- scheduler side -----------------------------------------------------
    def _probe(self, source: dict[str, Any], keys: list[str]) -> int | None:
        """How many leading ``keys`` a remote prefill's arena holds, read by a small agent of this process's
        own, made at the first handoff (an engine that never decodes one runs no agent here)."""
        if self._probe_arena is None:
            self._probe_arena = handoff.make_arena(self.settings.transport, 1 << 20)
            if self._probe_arena is None:  # "auto" without NIXL: the tier alone answers
                self._sched.probe = None
                return 0
        # on vLLM's scheduling loop: one ~0.2 ms index READ (a new peer's first one wires UCX up, 66-200 ms)
        return self._probe_arena.holds(source, keys, handoff.PROBE_TIMEOUT_S)

    def _lookup(self, keys: list[str]) -> int:
        return kvtier.lookup(keys) if tier.ready() else 0

    def _block_ids_of(self, req_id: str) -> list[int]:
        return list(self._kv_cache_manager.get_block_ids(req_id)[0])

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched.matched(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._sched.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVTierMetadata:
        sched = scheduler_output.num_scheduled_tokens
        before = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        before.update(zip(cached.req_ids, cached.num_computed_tokens))
        loads, saves = self._sched.build(dict(sched), before)
        return KVTierMetadata(loads=loads, saves=saves)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # saves copied their blocks out in the step that completed them: nothing to hold; a prefill's params
        # tell decode which chunks to wait for
        return False, self._sched.finished(request)

    # ---- worker side --------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = list(kv_caches)
        idx = [re.findall(r"\d+", n) for n in names]
        if all(idx):
            names.sort(key=lambda n: int(re.findall(r"\d+", n)[0]))
        layers = [kv_caches[n] for n in names]
        isa = self.page_format.removeprefix("cpu-") if self.page_format.startswith("cpu-") else None
        lay = pages.detect(layers[0], isa)
        if lay.format != self.page_format:
            raise ValueError(f"kvtier: pages are in format {lay.format!r}, the engine's config says "
                             f"{self.page_format!r}; refused")
        _check_pattern(lay, layers[0].device)
        arena = handoff.make_arena(self.settings.transport, self.settings.handoff_arena_bytes)
        if arena is not None:
            self._handoff = handoff.Handoff(arena, kvtier.get, kvtier.put, self.tier_cfg.codec,
                                            self.tier_cfg.model_id, layers[0].device)
        self._worker = WorkerSide(layers, lay, self.tier_cfg.chunk_tokens, self.tier_cfg.codec,
                                  self.settings.save_queue, self.settings.load_timeout_s,
                                  get=kvtier.get, put=kvtier.put, ready=tier.ready, handoff=self._handoff)
        log.info("kvtier connector (worker): %d layers, page format %s checked; handoffs %s", len(layers),
                 lay.format, f"over NIXL (arena {arena.name})" if arena is not None else "through the tier")

    def get_handshake_metadata(self) -> KVTierHandshake | None:
        return KVTierHandshake(self._handoff.endpoint()) if self._handoff is not None else None

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        # one worker (tp 1) holds every page: its arena is the source of this engine's handoffs. With more
        # workers each holds a shard of the heads that kvtier's chunks do not split: handoffs use the tier
        eps = [m.endpoint for m in metadata.values() if isinstance(m, KVTierHandshake)]
        if self._sched is not None and len(metadata) == 1 and len(eps) == 1:
            self._sched.source = eps[0]
            log.info("kvtier connector (scheduler): handoffs name arena %s", eps[0]["agent"])

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, KVTierMetadata):
            self._worker.load(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # whole chunks are copied out in wait_for_save, once every layer is written

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, KVTierMetadata):
            self._worker.save(meta.saves)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._handoff is not None:
            self._handoff.close()
        if self._probe_arena is not None:
            self._probe_arena.close()


def _check_pattern(lay: pages.PageLayout, device: torch.device) -> None:
    """Write a known K/V pattern with vLLM's own cache kernel into two scratch blocks and read it back
    with ``pages.gather``; a mismatch means vLLM lays pages out differently than kvtier reads them."""
    bs, h, d = lay.block_size, lay.kv_heads, lay.head_dim
    g = torch.Generator().manual_seed(11)
    key = torch.randn(2 * bs, h, d, generator=g).to(device, lay.dtype)
    value = torch.randn(2 * bs, h, d, generator=g).to(device, lay.dtype)
    slots = torch.arange(2 * bs, dtype=torch.long, device=device)
    scratch = torch.zeros(pages.PageLayout(lay.format, 2, bs, h, d, lay.dtype).shape(), dtype=lay.dtype, device=device)
    from vllm import _custom_ops as ops

    if lay.format == "cpu-vec":
        kc, vc = scratch.view(2, h, 2 * bs, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, "vec")
    else:
        one = torch.ones((), dtype=torch.float32, device=device)
        ops.reshape_and_cache_flash(key, value, scratch[0], scratch[1], slots, "auto", one, one)
    small = pages.PageLayout(lay.format, 2, bs, h, d, lay.dtype)
    got = pages.gather([scratch], small, torch.tensor([[0, 1]]), 2 * bs)[0, 0]
    want = torch.stack([key.permute(1, 0, 2), value.permute(1, 0, 2)])
    err = (got.float() - want.float()).abs().max().item()
    if err > 0:
        raise ValueError(f"kvtier: page format {lay.format!r} check failed: vLLM's cache kernel wrote a known "
                         f"pattern that kvtier reads back off by {err:.3g}; this vLLM's layout is not supported")
