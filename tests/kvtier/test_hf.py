"""kvtier.hf: DynamicCache <-> chunks, load_prefix/store_chunks and KVTierCache.

A tiny randomly initialised Llama (2 layers, 2 KV heads, head_dim 16) with
16-token chunks keeps this module to a few seconds; the same code on the real
SmolLM2 runs in test_model.py. The store is an in-memory dict of real blocks:
``kvtier.compress`` -> ``to_arrow()`` bytes -> ``Block.from_arrow`` ->
``kvtier.decompress``, so the real block format and codecs sit in the loop.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvtier
from kvtier import hf
from kvtier.block import Block

CT = 16  # chunk tokens for the tiny model
NEW = 12  # greedy tokens generated per prompt


class DictStore:
    """The kvtier client's duck-typed store: lookup/get/put over Arrow bytes."""

    def __init__(self, codec: str = "none"):
        self.blobs: dict[str, bytes] = {}
        self.codec = codec
        self.puts: list[str] = []

    def lookup(self, keys):
        n = 0
        for k in keys:
            if k not in self.blobs:
                break
            n += 1
        return n

    def get(self, keys):
        return [kvtier.decompress(Block.from_arrow(self.blobs[k], expect_key=k)) if k in self.blobs else None
                for k in keys]

    def put(self, keys, kvs, codec=None):
        for k, kv in zip(keys, kvs, strict=True):
            self.blobs[k] = kvtier.compress(kv, codec or self.codec, key=k).to_arrow()
            self.puts.append(k)


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second OpenMP thread only adds sync cost on a busy 2-core box
    yield _tiny_llama()
    torch.set_num_threads(threads)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(1))


def prefill(model, ids) -> DynamicCache:
    with torch.no_grad():
        return model(ids, use_cache=True).past_key_values


def greedy(model, ids, cache=None):
    with torch.no_grad():
        return model.generate(ids, past_key_values=cache, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def mid(model) -> str:
    return kvtier.model_fingerprint("tiny-llama", 2, 2, 16, "float32")


# ---- conversion ----------------------------------------------------------------

def test_cache_to_chunks_cuts_full_chunks_in_layout(model, tokens):
    cache = prefill(model, tokens[:, :40])  # 40 tokens: two full chunks, an 8-token tail
    chunks = hf.cache_to_chunks(cache, CT)
    assert [tuple(c.shape) for c in chunks] == [(2, 2, 2, CT, 16)] * 2
    k1, v1 = cache.layers[1].keys[0], cache.layers[1].values[0]
    assert torch.equal(chunks[1][1, 0], k1[:, CT:2 * CT]) and torch.equal(chunks[1][1, 1], v1[:, CT:2 * CT])
    later = hf.cache_to_chunks(cache, CT, start=8)  # from token 8: tokens 8..39 make two chunks
    assert len(later) == 2 and torch.equal(later[0][0, 0], cache.layers[0].keys[0, :, 8:24])
    chunks[0].zero_()  # chunks are copies: the cache is untouched
    assert cache.layers[0].keys.abs().sum() > 0


def test_chunks_to_cache_round_trip_gives_the_same_logits(model, tokens):
    ids = tokens[:, :40]
    full = prefill(model, ids)
    with torch.no_grad():
        ref = model(ids).logits[0, 32:]
        cache = hf.chunks_to_cache(hf.cache_to_chunks(full, CT), model)
        assert cache.get_seq_length() == 32
        out = model(ids[:, 32:], past_key_values=cache).logits[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # fp32: only summation order differs


def test_append_chunks_extends_a_cache(model, tokens):
    chunks = hf.cache_to_chunks(prefill(model, tokens[:, :48]), CT)
    cache = hf.chunks_to_cache(chunks[:1], model.config)
    hf.append_chunks(cache, chunks[1:], dtype=torch.bfloat16)
    assert cache.get_seq_length() == 48
    assert torch.equal(cache.layers[0].keys[0, :, CT:2 * CT], chunks[1][0, 0].to(torch.bfloat16))


def test_reserved_room_takes_the_tail_in_place_and_grows_past_it(model, tokens):
    ids = tokens[:, :40]
    with torch.no_grad():
        ref = model(ids).logits[0, 32:]
        chunks = hf.cache_to_chunks(prefill(model, ids), CT)
        cache = hf.chunks_to_cache(chunks, model, reserve=8)  # room for exactly the 8-token tail
        room = cache.layers[0]._room[0]
        out = model(ids[:, 32:], past_key_values=cache).logits[0]
        keys = cache.layers[0].keys
        assert keys.data_ptr() == room.data_ptr() and keys.is_contiguous()  # written into the room, no cat
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        more = model(tokens[:, 40:42], past_key_values=cache).logits[0]  # past the room: DynamicLayer's cat
        assert cache.get_seq_length() == 42 and cache.layers[0].keys.data_ptr() != room.data_ptr()
        torch.testing.assert_close(more, model(tokens[:, :42]).logits[0, 40:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reserve=-1"):
        hf.chunks_to_cache(chunks, model, reserve=-1)


def test_chunks_go_into_the_buffer_given_as_out(model, tokens):
    ids = tokens[:, :40]
    with torch.no_grad():
        ref = model(ids).logits[0, 32:]
        chunks = hf.cache_to_chunks(prefill(model, ids), CT)
        out = torch.full((2, 2, 1, 2, 48, 16), float("nan"))  # room for more than the 8-token tail
        cache = hf.chunks_to_cache(chunks, model, reserve=8, out=out)
        assert cache.layers[1]._room[1].data_ptr() == out[1, 1].data_ptr()  # views of out, not a copy of it
        assert torch.equal(out[1, 0, 0, :, CT:2 * CT], chunks[1][1, 0])
        got = model(ids[:, 32:], past_key_values=cache).logits[0]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[0, 0, :, :, 32:40], cache.layers[0].keys[:, :, 32:40])  # the tail went into out
        for bad, why in ((torch.empty(2, 2, 1, 2, 39, 16), r">= 40"), (torch.empty(2, 2, 2, 48, 16), r"shape \(2, 2, 2"),
                         (torch.empty(2, 2, 1, 2, 48, 16, dtype=torch.bfloat16), "bfloat16")):
            with pytest.raises(ValueError, match=why):
                hf.chunks_to_cache(chunks, model, reserve=8, out=bad)
        with pytest.raises(ValueError, match="empty cache"):
            hf.append_chunks(hf.chunks_to_cache(chunks[:1], model), chunks[1:], out=out)


def test_conversion_rejects_bad_input(model, tokens):
    two = prefill(model, tokens[:, :32].repeat(2, 1))
    with pytest.raises(ValueError, match="batch of 2"):
        hf.cache_to_chunks(two, CT)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        hf.cache_to_chunks(prefill(model, tokens[:, :32]), 0)
    with pytest.raises(ValueError, match="empty"):
        hf.cache_to_chunks(DynamicCache(), CT)
    with pytest.raises(ValueError, match="do not fit this model: it has 2 layers"):
        hf.chunks_to_cache([torch.zeros(3, 2, 2, CT, 16)], model)
    with pytest.raises(ValueError, match="expected \\[layers, 2"):
        hf.chunks_to_cache([torch.zeros(2, 3, 2, CT, 16)], model)


# ---- the store flow ---------------------------------------------------------------

def test_load_prefix_then_store_chunks_story(model, tokens):
    store, ids = DictStore(), tokens[0, :72]
    cache, n = hf.load_prefix(store, ids, mid(model), CT, config=model)
    assert n == 0 and cache.get_seq_length() == 0  # a miss: nothing cached yet
    with torch.no_grad():
        model(ids[None], past_key_values=cache)
    assert hf.store_chunks(store, ids, cache, mid(model), CT, skip=n) == 4  # 72 tokens: 4 full chunks
    keys = kvtier.chunk_keys(ids, mid(model), CT)
    assert store.lookup(keys) == 4

    longer = torch.cat([ids, tokens[0, 72:80]])  # 80 tokens: 5 chunks, the 5th is new
    cache, n = hf.load_prefix(store, longer, mid(model), CT, config=model)
    assert n == 64 and cache.get_seq_length() == 64
    with torch.no_grad():
        model(longer[None, n:], past_key_values=cache)
    assert hf.store_chunks(store, longer, cache, mid(model), CT, skip=n) == 1
    assert store.lookup(kvtier.chunk_keys(longer, mid(model), CT)) == 5


def test_exact_multiple_prompt_leaves_the_last_chunk_to_compute(model, tokens):
    store, ids = DictStore(), tokens[0, :64]
    hf.store_chunks(store, ids, prefill(model, ids[None]), mid(model), CT)
    assert store.lookup(kvtier.chunk_keys(ids, mid(model), CT)) == 4
    cache, n = hf.load_prefix(store, ids, mid(model), CT, config=model)
    assert n == 48  # all 4 chunks are stored, but the last prompt token's logits must be computed
    assert hf.reusable_chunks(64, CT) == 3 and hf.reusable_chunks(65, CT) == 4 and hf.reusable_chunks(0, CT) == 0


def test_block_evicted_between_lookup_and_get_ends_the_prefix(model, tokens):
    ids = tokens[0, :72]

    class Racy(DictStore):
        def get(self, keys):
            out = super().get(keys)
            out[1] = None  # chunk 1 vanished after lookup said it was there
            return out

    store = Racy()
    hf.store_chunks(store, ids, prefill(model, ids[None]), mid(model), CT)
    cache, n = hf.load_prefix(store, ids, mid(model), CT, config=model)
    assert n == CT and cache.get_seq_length() == CT  # chunk 0 only; never a gap


def test_store_of_another_shape_is_an_error_not_data(model, tokens):
    ids = tokens[0, :40]
    store = DictStore()
    keys = kvtier.chunk_keys(ids, mid(model), CT)
    store.put(keys, [torch.zeros(3, 2, 2, CT, 16)] * 2)  # blocks of a 3-layer model under our keys
    with pytest.raises(ValueError, match="does model_id"):
        hf.load_prefix(store, ids, mid(model), CT, config=model)
    with pytest.raises(ValueError, match="skip=5"):
        hf.store_chunks(store, ids, prefill(model, ids[None]), mid(model), CT, skip=5)


# ---- the correctness bar: greedy output identical to plain generate --------------------

@pytest.mark.parametrize("codec", ["none", "none+zstd"])
def test_kvtiercache_generate_is_identical_for_miss_hit_and_partial_hit(model, tokens, codec):
    store = DictStore(codec)
    other = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    cases = [  # (prompt, tokens expected from the store)
        (tokens[:, :40], 0),                                # miss: stores chunks 0, 1
        (tokens[:, :40], 32),                               # full hit: 2 chunks, 8-token tail computed
        (tokens[:, :70], 32),                               # partial hit: chunks 0-1 cached, 2-3 new
        (tokens[:, :64], 48),                               # exact multiple: chunk 3 recomputed
        (torch.cat([tokens[:, :20], other], dim=1), 16),    # diverges inside chunk 1
    ]
    for ids, want in cases:
        cache = hf.KVTierCache(store, model, ids, CT, model_id=mid(model))
        assert cache.cached_tokens == want, (ids.shape, want)
        out = greedy(model, ids, cache)
        assert torch.equal(out, greedy(model, ids)), f"prompt of {ids.shape[1]} tokens, {want} cached"
        full = ids.shape[1] // CT
        assert store.lookup(kvtier.chunk_keys(ids[0], mid(model), CT)) == full  # every full prompt chunk stored


def test_kvtiercache_save_stores_chunks_completed_by_generation(model, tokens):
    store, ids = DictStore(), tokens[:, :30]  # 30 tokens + 12 generated = 42: chunk 1 completes during decode
    cache = hf.KVTierCache(store, model, ids, CT, model_id=mid(model))
    out = greedy(model, ids, cache)
    assert cache.stored_chunks == 1
    assert cache.save(out[0]) == 1 and cache.stored_chunks == 2
    assert store.lookup(kvtier.chunk_keys(out[0], mid(model), CT)) == 2
    with pytest.raises(ValueError, match="start with the prompt"):
        cache.save(torch.flip(out[0], dims=[0]))
    # a follow-up turn that extends the answer loads both chunks and still decodes identically
    turn2 = torch.cat([out, tokens[:, 60:70]], dim=1)
    cache2 = hf.KVTierCache(store, model, turn2, CT, model_id=mid(model))
    assert cache2.cached_tokens == 32
    assert torch.equal(greedy(model, turn2, cache2), greedy(model, turn2))


def test_kvtiercache_stores_bf16_and_loads_into_an_fp32_model(model, tokens):
    store, ids = DictStore(), tokens[:, :40]
    bf16_id = kvtier.model_fingerprint("tiny-llama", 2, 2, 16, "bfloat16")
    hf.KVTierCache(store, model, ids, CT, model_id=bf16_id, kv_dtype=torch.bfloat16)
    greedy(model, ids, hf.KVTierCache(store, model, ids, CT, model_id=bf16_id, kv_dtype=torch.bfloat16))
    blocks = [Block.from_arrow(b) for b in store.blobs.values()]
    assert len(blocks) == 2 and {b.dtype for b in blocks} == {"bfloat16"}
    cache = hf.KVTierCache(store, model, ids, CT, model_id=bf16_id, kv_dtype=torch.bfloat16)
    assert cache.cached_tokens == 32 and cache.layers[0].keys.dtype == torch.float32
    loaded, n = hf.load_prefix(store, ids[0], bf16_id, CT, config=model)  # a model sets the cache's dtype
    assert n == 32 and loaded.layers[1].values.dtype == torch.float32
    assert torch.equal(loaded.layers[1].values, cache.layers[1].values)


def test_gqa_attention_gives_sdpa_logits_for_recompute_tail_and_decode(model, tokens):
    import copy

    name = hf.register_attention()
    fast = copy.deepcopy(model)
    fast.set_attn_implementation(name)
    ids = tokens[:, :40]
    with torch.no_grad():
        for m in (model, fast):
            m.ref = m(ids).logits[0]
        torch.testing.assert_close(fast.ref, model.ref, rtol=1e-5, atol=1e-5)  # recompute: q == kv
        chunks = hf.cache_to_chunks(prefill(model, ids), CT)
        cache = hf.chunks_to_cache(chunks, fast, reserve=9)
        tail = fast(ids[:, 32:], past_key_values=cache).logits[0]  # 8 queries over 40 keys: lower-right causal
        assert hf._checked_mask[0] is not None, "the tail took the enable_gqa path"
        torch.testing.assert_close(tail, model.ref[32:], rtol=1e-5, atol=1e-5)
        one = fast(tokens[:, 40:41], past_key_values=cache).logits[0]  # decode: no mask
        torch.testing.assert_close(one, model(tokens[:, :41]).logits[0, 40:], rtol=1e-5, atol=1e-5)
    padded = torch.ones(1, 40, dtype=torch.long)
    padded[0, :3] = 0  # a padding mask is not plain causal: transformers' sdpa computes it
    with torch.no_grad():
        a = fast(ids, attention_mask=padded).logits[0, 3:]
        b = model(ids, attention_mask=padded).logits[0, 3:]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
