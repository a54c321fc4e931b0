"""Hugging Face transformers integration: ``DynamicCache`` <-> kvtier chunks, and a drop-in cache.

A transformers ``DynamicCache`` holds, per layer, keys and values of shape
``[batch, kv_heads, seq, head_dim]`` (post-RoPE). kvtier stores chunks of shape
``[layers, 2, kv_heads, chunk_tokens, head_dim]``. This module converts between
the two (batch 1, full chunks only) and wires them to a store:

    cache, n_cached = kvtier.hf.load_prefix(store, token_ids, model_id, 256, device, config=model.config)
    out = model(input_ids[:, n_cached:], past_key_values=cache)       # compute only the rest
    kvtier.hf.store_chunks(store, token_ids, cache, model_id, 256, skip=n_cached)

or, as one object for ``model.generate``::

    cache = KVTierCache(store, model, input_ids)       # loads the cached prefix now
    model.generate(input_ids, past_key_values=cache)   # stores the prompt's new full chunks after prefill

A rebuilt cache holds every layer's keys and values in one buffer, filled by
one copy per chunk, optionally with room for the tokens still to prefill
(``chunks_to_cache(..., reserve=n)``). ``register_attention()`` gives an
attention implementation that computes what ``sdpa`` does without expanding the
KV heads for a tail over cached KV (on an H200, Llama-8B shape, 16K tokens: the
256-token tail 22.9 ms instead of 35.4 ms).

``store`` is anything with ``lookup(keys) -> int`` (leading keys present),
``get(keys) -> list[Tensor | None]`` and ``put(keys, kvs, codec=None)``: the
``kvtier`` module itself once its runtime is initialised, or a test double.

At least one prompt token is always recomputed, even when every full chunk is
cached: generation needs the logits of the last prompt token, and the cache
holds KV, not logits. A prompt of exactly 512 tokens with 256-token chunks
therefore loads one chunk and recomputes 256 tokens.

Only full-attention layers are supported (Llama, Qwen2, Mistral without a
sliding window...); sliding-window and linear-attention layers keep a
different state and are refused with a clear error. This module is pure
torch/transformers: no Ray, no tier logic, no codecs of its own.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvtier.keys import _token_array, chunk_keys


def kv_layout(config_or_model: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a model or its config."""
    config = getattr(config_or_model, "config", config_or_model)
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(c.num_hidden_layers), int(heads), int(head_dim)


def reusable_chunks(num_tokens: int, chunk_tokens: int) -> int:
    """How many leading full chunks of a ``num_tokens`` prompt may come from the
    cache: all full chunks except that at least one token is left to compute."""
    _check_chunk_tokens(chunk_tokens)
    return max(num_tokens - 1, 0) // chunk_tokens


# ---- DynamicCache <-> chunks ------------------------------------------------

def cache_to_chunks(cache: DynamicCache, chunk_tokens: int, start: int = 0) -> list[torch.Tensor]:
    """The full chunks of ``cache`` from token ``start`` on, each a new contiguous
    tensor ``[layers, 2, kv_heads, chunk_tokens, head_dim]`` in the cache's dtype
    and device. A trailing partial chunk is left out."""
    _check_chunk_tokens(chunk_tokens)
    layers = _full_attention_layers(cache)
    seq = layers[0].keys.shape[-2]
    if not isinstance(start, int) or not 0 <= start <= seq:
        raise ValueError(f"start={start!r} must be an int in [0, {seq}] (the cache holds {seq} tokens)")
    n = (seq - start) // chunk_tokens
    L, (b, H, _, D) = len(layers), layers[0].keys.shape
    out = []
    for i in range(n):
        s, e = start + i * chunk_tokens, start + (i + 1) * chunk_tokens
        chunk = torch.empty((L, 2, H, chunk_tokens, D), dtype=layers[0].keys.dtype, device=layers[0].keys.device)
        for li, layer in enumerate(layers):
            chunk[li, 0] = layer.keys[0, :, s:e]
            chunk[li, 1] = layer.values[0, :, s:e]
        out.append(chunk)
    return out


def chunks_to_cache(chunks: Sequence[torch.Tensor], config_or_model: Any = None, *,
                    dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                    reserve: int = 0, out: torch.Tensor | None = None) -> DynamicCache:
    """A new ``DynamicCache`` holding ``chunks`` in order (token 0 first). With a
    model or config the cache gets its layer types and the chunks are checked
    against its KV shape; ``dtype``/``device`` convert the chunks on the way
    (default: a model's own dtype and device, else the chunks'). ``reserve``
    tokens of room follow the chunks: a prefill of up to that many tokens writes
    its KV in place instead of re-concatenating the whole cache. ``out``: the
    buffer to hold them, ``[layers, 2, 1, kv_heads, >= tokens + reserve, head_dim]``
    (an engine's own KV memory, e.g. one a captured CUDA graph reads); default a
    new one."""
    config = getattr(config_or_model, "config", config_or_model)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    dtype, device = _model_dtype_device(config_or_model, dtype, device)
    return append_chunks(cache, chunks, dtype=dtype, device=device, reserve=reserve,
                         layout=kv_layout(config) if config is not None else None, out=out)


class ReservedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views of one buffer with room after them:
    ``update`` copies new tokens into the room (the whole cache is not re-concatenated: at 16K tokens of
    Llama-8B that cat was 6.9 ms of a 41.7 ms tail on the H200) and falls back to DynamicLayer's cat
    once the room is spent. When the room is exactly filled the views are contiguous."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self._room = (keys, values)  # [1, kv_heads, capacity, head_dim] each
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        kbuf, vbuf = self._room
        n, t = self.keys.shape[-2], key_states.shape[-2]
        fits = (n + t <= kbuf.shape[-2] and self.keys.data_ptr() == kbuf.data_ptr()  # not cropped/replaced since
                and key_states.shape[:2] == kbuf.shape[:2] and key_states.dtype == kbuf.dtype)
        if not fits:
            return super().update(key_states, value_states, *args, **kwargs)
        kbuf[:, :, n:n + t].copy_(key_states)
        vbuf[:, :, n:n + t].copy_(value_states)
        self.keys, self.values = kbuf[:, :, :n + t], vbuf[:, :, :n + t]
        return self.keys, self.values


def append_chunks(cache: DynamicCache, chunks: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, layout: tuple[int, int, int] | None = None,
                  reserve: int = 0, out: torch.Tensor | None = None) -> DynamicCache:
    """Append ``chunks`` after what ``cache`` already holds (in place; returns it). Into an empty cache
    the chunks are copied once, one copy per chunk, into one buffer per cache holding every layer's keys
    and values (``ReservedLayer``s with ``reserve`` tokens of room); 63 chunks of [32, 2, 8, 256, 128]
    bf16 took 9.8 ms on the H200 as cat + per-layer update, a single pass over the bytes ~1.2 ms."""
    chunks = list(chunks)
    if not isinstance(reserve, int) or isinstance(reserve, bool) or reserve < 0:
        raise ValueError(f"reserve={reserve!r} must be a non-negative int (tokens of room after the chunks)")
    if not chunks:
        return cache
    first = chunks[0]
    for i, c in enumerate(chunks):
        if not isinstance(c, torch.Tensor) or c.dim() != 5 or c.shape[1] != 2:
            raise ValueError(f"chunk #{i} has shape {tuple(getattr(c, 'shape', ()))}, expected "
                             "[layers, 2, kv_heads, tokens, head_dim]")
        if c.shape[:3] != first.shape[:3] or c.shape[4] != first.shape[4]:
            raise ValueError(f"chunk #{i} has shape {tuple(c.shape)}, chunk #0 has {tuple(first.shape)}")
    if layout is not None and (first.shape[0], first.shape[2], first.shape[4]) != layout:
        raise ValueError(f"chunks of shape {tuple(first.shape)} do not fit this model: it has {layout[0]} layers, "
                         f"{layout[1]} KV heads, head_dim {layout[2]}")
    if cache.layers and len(cache.layers) != first.shape[0]:
        raise ValueError(f"chunks have {first.shape[0]} layers, the cache has {len(cache.layers)}")
    dtype, device = dtype or first.dtype, torch.device(device) if device is not None else first.device
    if not any(getattr(l, "is_initialized", False) for l in cache.layers):
        for i, l in enumerate(cache.layers):
            if getattr(l, "is_sliding", False) or not isinstance(l, DynamicLayer):
                raise ValueError(f"cache layer {i} is a {type(l).__name__}: kvtier.hf supports full-attention "
                                 "layers only")
        L, _, H, _, D = first.shape
        n = sum(c.shape[3] for c in chunks)
        if out is None:
            room = torch.empty((L, 2, 1, H, n + reserve, D), dtype=dtype, device=device)
        elif (not isinstance(out, torch.Tensor) or out.dim() != 6 or (out.shape[0], out.shape[1], out.shape[2],
              out.shape[3], out.shape[5]) != (L, 2, 1, H, D) or out.shape[4] < n + reserve):
            raise ValueError(f"out has shape {tuple(getattr(out, 'shape', ()))}; these chunks need "
                             f"[{L}, 2, 1, {H}, >= {n + reserve}, {D}] ({n} tokens + {reserve} reserved)")
        elif out.dtype != dtype or out.device.type != device.type or device.index not in (None, out.device.index):
            raise ValueError(f"out is {out.dtype} on {out.device}; the cache is {dtype} on {device}")
        else:
            room = out
        at = 0
        for c in chunks:  # one strided copy per chunk: [L, 2, H, t, D] into every layer's keys and values
            t = c.shape[3]
            room[:, :, 0, :, at:at + t].copy_(c)
            at += t
        cache.layers[:] = [ReservedLayer(room[li, 0], room[li, 1], n) for li in range(L)]
    elif out is not None:
        raise ValueError("out= needs an empty cache (its chunks go into out; this cache already holds tokens)")
    else:
        kv = torch.cat(chunks, dim=3) if len(chunks) > 1 else first
        kv = kv.to(device=device, dtype=dtype)
        for li in range(kv.shape[0]):
            cache.update(kv[li, 0].unsqueeze(0), kv[li, 1].unsqueeze(0), li)
    _full_attention_layers(cache)
    return cache


# ---- attention for a hit's tail -------------------------------------------------

GQA_ATTENTION = "kvtier_gqa"
_checked_mask: list = [None]  # the last mask found to be plain lower-right causal (held: its id is not reused)


def register_attention() -> str:
    """Register (once) and return the name of an attention implementation for transformers models
    (``attn_implementation=kvtier.hf.GQA_ATTENTION``) that computes exactly what ``sdpa`` does, faster
    for a tail prefilled over cached KV: transformers' sdpa gets a mask there (256 queries over 16K keys
    are not "causal" in sdpa's top-left sense), so it expands the KV heads for grouped-query attention
    (``repeat_kv``: 9.2 ms of a 41.7 ms Llama-8B tail on the H200) and takes a masked kernel. Here a
    mask that is plain lower-right causal (batch 1, no padding: checked once per forward, one sync)
    becomes ``causal_lower_right`` with ``enable_gqa=True`` (flash attention, KV heads not expanded);
    any other mask, and a forward with no mask, go to transformers' own sdpa function unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if GQA_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(GQA_ATTENTION, _gqa_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_ATTENTION, sdpa_mask)  # the masks sdpa gets
    return GQA_ATTENTION


def _gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, kv = query.shape[2], key.shape[2]
    if attention_mask is None or dropout or not _lower_right_causal(attention_mask, q, kv):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=causal_lower_right(q, kv) if q != kv else None, is_causal=q == kv,
        scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _lower_right_causal(mask: torch.Tensor, q: int, kv: int) -> bool:
    """Whether a bool [1, 1, q, kv] mask lets query i see exactly keys 0 .. kv - q + i (checked once per
    mask object: transformers builds one per forward and hands it to every layer)."""
    if mask is _checked_mask[0]:
        return True
    if mask.dtype != torch.bool or tuple(mask.shape) != (1, 1, q, kv) or kv < q:
        return False
    want = (torch.arange(q, device=mask.device)[:, None] + (kv - q)) >= torch.arange(kv, device=mask.device)[None, :]
    if not torch.equal(mask[0, 0], want):
        return False
    _checked_mask[0] = mask
    return True


# ---- store <-> cache --------------------------------------------------------

def load_prefix(store: Any, token_ids: Any, model_id: str, chunk_tokens: int = 256,
                device: str | torch.device | None = None, *, config: Any = None,
                dtype: torch.dtype | None = None) -> tuple[DynamicCache, int]:
    """Load the longest cached prefix of ``token_ids`` from ``store``.

    Returns (cache, n_cached_tokens): a ``DynamicCache`` holding the KV of the
    first ``n_cached_tokens`` tokens (a multiple of ``chunk_tokens``, at most
    ``len(token_ids) - 1``), empty on a miss. A block that vanished between
    lookup and get ends the prefix there (a miss, never a gap). ``config``
    (a model or its config) checks the chunks' shape and gives the cache its
    layer types; a model also sets the default ``dtype``/``device``.
    """
    loaded, _ = _fetch(store, token_ids, model_id, chunk_tokens, config)
    if not loaded:
        return (DynamicCache(config=getattr(config, "config", config)) if config is not None else DynamicCache()), 0
    return chunks_to_cache(loaded, config, dtype=dtype, device=device), len(loaded) * chunk_tokens


def store_chunks(store: Any, token_ids: Any, cache: DynamicCache, model_id: str, chunk_tokens: int = 256,
                 skip: int = 0, codec: str | None = None, kv_dtype: torch.dtype | None = None) -> int:
    """Put the full chunks of ``cache`` that ``token_ids`` names, except the first
    ``skip`` tokens (already stored), into ``store``. The cache may hold fewer
    tokens than ``token_ids`` (after ``generate``, the last token has no KV) or
    more. ``kv_dtype`` casts the chunks before storing (``model_id`` should
    name that dtype). Returns the number of chunks put."""
    _check_chunk_tokens(chunk_tokens)
    ids = _token_array(token_ids)
    if not isinstance(skip, int) or skip < 0 or skip % chunk_tokens:
        raise ValueError(f"skip={skip!r} must be a non-negative multiple of chunk_tokens={chunk_tokens} (a token count)")
    usable = min(len(ids), cache.get_seq_length()) // chunk_tokens
    first = skip // chunk_tokens
    if first >= usable:
        return 0
    keys = chunk_keys(ids[: usable * chunk_tokens], model_id, chunk_tokens)
    chunks = cache_to_chunks(cache, chunk_tokens, start=first * chunk_tokens)[: usable - first]
    if kv_dtype is not None:
        chunks = [c.to(kv_dtype) for c in chunks]
    store.put(keys[first:usable], chunks, codec=codec)
    return len(chunks)


class KVTierCache(DynamicCache):
    """A ``DynamicCache`` for ``model.generate(input_ids, past_key_values=...)``
    that starts with the longest cached prefix of ``input_ids`` (loaded on
    construction) and puts the prompt's new full chunks into ``store`` as soon
    as the prefill has computed them.

    ``cached_tokens``: tokens loaded from the store; ``stored_chunks``: chunks
    this cache put. ``save(token_ids)`` also stores chunks completed by
    generated tokens (pass the prompt + output ids after ``generate``).
    Pass ``generate`` the same ``input_ids`` the cache was built for: it skips
    as many leading tokens as the cache holds. One cache per request.
    """

    def __init__(self, store: Any, model: Any, token_ids: Any, chunk_tokens: int = 256, *,
                 model_id: str | None = None, codec: str | None = None, kv_dtype: torch.dtype | None = None):
        config = getattr(model, "config", model)
        super().__init__(config=config)
        if model_id is None:
            from kvtier.model import model_id_for

            model_id = model_id_for(model, kv_dtype)
        self.store, self.model_id, self.chunk_tokens = store, model_id, chunk_tokens
        self.codec, self.kv_dtype = codec, kv_dtype
        self.token_ids = _token_array(token_ids).copy()
        self.num_layers = kv_layout(config)[0]
        self.stored_chunks = 0
        self._prompt_done = False
        loaded, n_hit = _fetch(store, self.token_ids, model_id, chunk_tokens, config)
        dtype, device = _model_dtype_device(model, None, None)
        # room for the rest of the prompt: its prefill writes in place instead of re-concatenating the cache
        append_chunks(self, loaded, layout=kv_layout(config), dtype=dtype, device=device,
                      reserve=len(self.token_ids) - len(loaded) * chunk_tokens if loaded else 0)
        self.cached_tokens = len(loaded) * chunk_tokens
        self._stored_upto = n_hit * chunk_tokens  # chunks the store already holds need no put

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        # the last layer's update of the prefill: every layer now holds the whole prompt
        if (not self._prompt_done and layer_idx == self.num_layers - 1
                and self.get_seq_length(layer_idx) >= len(self.token_ids)):
            self._prompt_done = True
            self.save(self.token_ids)
        return out

    def save(self, token_ids: Any) -> int:
        """Store the full chunks of ``token_ids`` (which must start with this
        cache's prompt) not stored yet; returns how many were put."""
        ids = _token_array(token_ids)
        n = min(len(ids), len(self.token_ids))
        if not np.array_equal(ids[:n], self.token_ids[:n]):
            raise ValueError("token_ids must start with the prompt this KVTierCache was built for")
        put = store_chunks(self.store, ids, self, self.model_id, self.chunk_tokens, skip=self._stored_upto,
                           codec=self.codec, kv_dtype=self.kv_dtype)
        self._stored_upto = max(self._stored_upto,
                                min(len(ids), self.get_seq_length()) // self.chunk_tokens * self.chunk_tokens)
        self.stored_chunks += put
        return put


# ---- internals ----------------------------------------------------------------

def _check_chunk_tokens(chunk_tokens: Any) -> None:
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive int")


def _model_dtype_device(obj: Any, dtype: torch.dtype | None, device: Any) -> tuple[torch.dtype | None, Any]:
    """Fill a missing dtype/device from a model's first parameter (a config has none)."""
    param = next(obj.parameters(), None) if hasattr(obj, "parameters") else None
    if param is not None:
        dtype = dtype or param.dtype
        device = device if device is not None else param.device
    return dtype, device


def _full_attention_layers(cache: Any) -> list:
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"expected a transformers DynamicCache, got {type(cache).__name__}")
    layers = cache.layers
    if not layers or not all(getattr(l, "is_initialized", False) for l in layers):
        raise ValueError("the cache is empty: run the model on the prompt first")
    for i, l in enumerate(layers):
        if getattr(l, "is_sliding", False) or not hasattr(l, "keys"):
            raise ValueError(f"cache layer {i} is a {type(l).__name__}: kvtier.hf supports full-attention layers only")
    b = layers[0].keys.shape[0]
    if b != 1:
        raise ValueError(f"the cache holds a batch of {b} sequences; kvtier.hf converts batch 1 only")
    return layers


def _fetch(store: Any, token_ids: Any, model_id: str, chunk_tokens: int, config: Any) -> tuple[list[torch.Tensor], int]:
    """(leading chunks fetched, chunks the store reported present)."""
    ids = _token_array(token_ids)
    keys = chunk_keys(ids, model_id, chunk_tokens)[: reusable_chunks(len(ids), chunk_tokens)]
    if not keys:
        return [], 0
    n = store.lookup(keys)
    if not isinstance(n, int) or not 0 <= n <= len(keys):
        raise ValueError(f"store.lookup returned {n!r} for {len(keys)} keys; expected an int in [0, {len(keys)}]")
    got = store.get(keys[:n]) if n else []
    want = (kv_layout(config) if config is not None else None)
    chunks: list[torch.Tensor] = []
    for key, kv in zip(keys, got):
        if kv is None:  # evicted between lookup and get: the prefix ends here
            break
        exp = (want[0], 2, want[1], chunk_tokens, want[2]) if want else None
        if not isinstance(kv, torch.Tensor) or (exp and tuple(kv.shape) != exp) or kv.shape[3] != chunk_tokens:
            raise ValueError(f"store returned shape {tuple(getattr(kv, 'shape', ()))} for key {key[:16]}…, expected "
                             f"{exp or f'[layers, 2, kv_heads, {chunk_tokens}, head_dim]'}: does model_id={model_id!r} "
                             "name this model?")
        chunks.append(kv)
    return chunks, n
