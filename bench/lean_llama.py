"""A Llama forward with few kernel launches, over a transformers ``LlamaForCausalLM``'s own weights.

bench/e2e.py times a hit's tail (256 tokens over 16K cached ones) against a
full prefill. Through transformers' eager forward that tail is bound by Python
and kernel launches, not by the GPU: on the H200 (Llama-8B shape) the tail over
KV already in the cache took 42-50 ms, its kernels all launched 0.1 ms before
the end; this forward, replayed as a CUDA graph, does the same tail in 16.9 ms
(bench/results/e2e-h200.md, -hf-forward.md). A serving engine does not pay that: vLLM runs such batches through compiled, CUDA-graph-captured
model code. This forward computes what transformers' does (same weights, the
same RMSNorm in fp32, rotary embedding from the model's own ``rotary_emb``,
SDPA with grouped-query heads not expanded, causal from the lower right for a
tail over a cache) with the projections fused (q/k/v in one GEMM, gate/up in
one), fewer launches per layer than transformers' forward, and no mask tensor.

It reads and writes the same ``DynamicCache`` transformers uses (``update`` per
layer), so ``kvtier.hf.chunks_to_cache(reserve=...)`` and ``hf.cache_to_chunks``
work unchanged. Llama-architecture models without biases only (Llama, SmolLM2);
anything else is refused by name. Numerics: tests/bench/test_lean_llama.py
checks it against transformers' forward on a tiny random Llama.

``graphs=True`` (CUDA) also replays a tail over a cache as a captured CUDA
graph, as an engine's decode and short prefills run: the cache must have been
rebuilt into this object's ``kv_pool(tokens)`` (``hf.chunks_to_cache(out=...)``,
the fixed KV buffer a graph can read), and each (cached tokens, tail tokens,
logits kept) is captured once, at its first call, which is then slower (an eager
warm-up and the capture). Replays read the ids from a static buffer the call
copies them into; the returned logits are a copy.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import DynamicCache

from kvtier.hf import ReservedLayer


class LeanLlama:
    """Callable like the model for what bench/e2e.py asks of it:
    ``lean(ids, past_key_values=cache, use_cache=True, logits_to_keep=k).logits / .past_key_values``."""

    def __init__(self, model, graphs: bool = False) -> None:
        c = model.config
        if getattr(c, "model_type", None) not in ("llama",):
            raise ValueError(f"LeanLlama runs Llama-architecture models; this one is {c.model_type!r}")
        if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            raise ValueError("LeanLlama does not do attention or MLP biases")
        self.model, self.config = model, c
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.graphs = bool(graphs)
        if self.graphs and next(model.parameters()).device.type != "cuda":
            raise ValueError("LeanLlama(graphs=True) needs the model on a CUDA device")
        self._pool: torch.Tensor | None = None
        self._captured: dict[tuple[int, int, int], tuple] = {}
        self.layers = []
        with torch.no_grad():
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append(SimpleNamespace(
                    ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                    qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), o=a.o_proj.weight,
                    gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]), down=m.down_proj.weight,
                    scale=a.scaling))

    def parameters(self):
        return self.model.parameters()

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # as LlamaRMSNorm: in fp32, back to the input's dtype, then the weight
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def kv_pool(self, tokens: int) -> torch.Tensor | None:
        """With ``graphs``: the KV buffer [layers, 2, 1, kv_heads, tokens, head_dim] a graphed tail reads (one at a
        time: asking for another size drops this one and its graphs). Without: None."""
        if not self.graphs:
            return None
        if self._pool is None or self._pool.shape[4] != tokens:
            self._captured.clear()
            self._pool = None
            p = next(self.model.parameters())
            self._pool = torch.empty((len(self.layers), 2, 1, self.kv_heads, tokens, self.head_dim), dtype=p.dtype,
                                     device=p.device)
        return self._pool

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True,
                 logits_to_keep: int = 1) -> SimpleNamespace:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"LeanLlama takes input_ids of shape [1, tokens], got {tuple(input_ids.shape)}")
        if self.graphs and past_key_values is not None and self._in_pool(past_key_values):
            return self._replay(input_ids, past_key_values, int(logits_to_keep), use_cache)
        return self._forward(input_ids, past_key_values, use_cache, logits_to_keep)

    def _in_pool(self, cache) -> bool:
        pool = self._pool
        return (pool is not None and len(cache.layers) == len(self.layers)
                and all(isinstance(l, ReservedLayer) and l._room[0].data_ptr() == pool[i, 0].data_ptr()
                        for i, l in enumerate(cache.layers)))

    def _pool_cache(self, length: int) -> DynamicCache:
        cache = DynamicCache(config=self.config)
        cache.layers[:] = [ReservedLayer(self._pool[i, 0], self._pool[i, 1], length) for i in range(len(self.layers))]
        return cache

    def _replay(self, ids: torch.Tensor, cache, keep: int, use_cache: bool) -> SimpleNamespace:
        start, t = cache.get_seq_length(), ids.shape[1]
        if start + t > self._pool.shape[4]:
            raise ValueError(f"a {t}-token tail after {start} cached tokens does not fit the pool of "
                             f"{self._pool.shape[4]} tokens")
        key = (start, t, keep)
        if key not in self._captured:
            static = ids.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up before capture (lazy inits, kernel selection)
                self._forward(static, self._pool_cache(start), False, keep)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward(static, self._pool_cache(start), False, keep).logits
            self._captured[key] = (graph, static, logits)
        graph, static, logits = self._captured[key]
        static.copy_(ids)
        graph.replay()
        for layer in cache.layers:  # what update() would have left: the tail's KV is in the room now
            kbuf, vbuf = layer._room
            layer.keys, layer.values = kbuf[:, :, :start + t], vbuf[:, :, :start + t]
        return SimpleNamespace(logits=logits.clone(), past_key_values=cache if use_cache else None)

    def _forward(self, input_ids: torch.Tensor, past_key_values, use_cache: bool,
                 logits_to_keep: int) -> SimpleNamespace:
        cache = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
        start, t = cache.get_seq_length(), input_ids.shape[1]
        m = self.model.model
        x = m.embed_tokens(input_ids)
        pos = torch.arange(start, start + t, device=x.device).unsqueeze(0)
        cos, sin = m.rotary_emb(x, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, t, head_dim]: broadcast over heads
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        bias = causal_lower_right(t, start + t) if start else None
        for i, w in enumerate(self.layers):
            y = self._norm(x, w.ln1)
            q, k, v = F.linear(y, w.qkv).view(1, t, h + 2 * kvh, d).transpose(1, 2).split((h, kvh, kvh), dim=1)
            k, v = cache.update(self._rope(k, cos, sin), v, i)
            a = F.scaled_dot_product_attention(self._rope(q, cos, sin), k, v, attn_mask=bias, is_causal=bias is None,
                                               scale=w.scale, enable_gqa=True)
            x = x + F.linear(a.transpose(1, 2).reshape(1, t, h * d), w.o)
            gate, up = F.linear(self._norm(x, w.ln2), w.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down)
        keep = t if not logits_to_keep else min(int(logits_to_keep), t)
        logits = self.model.lm_head(m.norm(x[:, t - keep:]))
        return SimpleNamespace(logits=logits, past_key_values=cache if use_cache else None)
