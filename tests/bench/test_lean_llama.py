"""bench/lean_llama.py computes what transformers' Llama forward does: a full prefill, a tail over a rebuilt
cache (``kvtier.hf.chunks_to_cache`` with room for the tail), and the KV it leaves in the cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvtier import hf

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lean_mod():
    spec = importlib.util.spec_from_file_location("bench_lean_llama", REPO / "bench" / "lean_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=128, vocab_size=256, max_position_embeddings=512, rope_theta=10000.0,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_prefill_logits_and_kv_match_transformers(lean_mod, model):
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids, use_cache=True, logits_to_keep=8)
    got = lean_mod.LeanLlama(model)(ids, logits_to_keep=8)
    assert got.logits.shape == want.logits.shape == (1, 8, 256)
    assert rel(got.logits, want.logits) < 1e-5
    for a, b in zip(hf.cache_to_chunks(got.past_key_values, 8), hf.cache_to_chunks(want.past_key_values, 8)):
        assert rel(a, b) < 1e-5


def test_tail_over_a_rebuilt_cache_matches_transformers(lean_mod, model):
    ids = torch.randint(0, 256, (1, 45), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(ids, use_cache=True)
    chunks = hf.cache_to_chunks(full.past_key_values, 16)[:2]  # 32 tokens cached, a 13-token tail
    with torch.inference_mode():
        want = model(ids[:, 32:], past_key_values=hf.chunks_to_cache(chunks, model.config, reserve=13),
                     use_cache=True, logits_to_keep=13)
    cache = hf.chunks_to_cache(chunks, model.config, reserve=13)
    got = lean_mod.LeanLlama(model)(ids[:, 32:], past_key_values=cache, logits_to_keep=13)
    assert rel(got.logits, want.logits) < 1e-5
    assert got.past_key_values is cache and cache.get_seq_length() == 45  # the tail's KV went into the room
    # and the whole prompt's last logits agree with a full prefill's
    assert rel(got.logits[0, -1], full.logits[0, -1]) < 1e-4


def test_other_architectures_are_refused_by_name(lean_mod):
    from transformers import MistralConfig, MistralForCausalLM

    m = MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64, vocab_size=64))
    with pytest.raises(ValueError, match="'mistral'"):
        lean_mod.LeanLlama(m)
    with pytest.raises(ValueError, match=r"\[1, tokens\]"):
        lean_mod.LeanLlama(LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        num_key_value_heads=1, intermediate_size=64,
                                                        vocab_size=64)))(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 flash/efficient SDPA kernels)")
def test_bf16_on_cuda_matches_transformers(lean_mod):
    """The GPU run's numerics: bf16, SDPA's CUDA kernels, a tail over a rebuilt cache (what bench/e2e.py times)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                      head_dim=64, intermediate_size=2816, vocab_size=4096, max_position_embeddings=4096,
                      rope_theta=500000.0, attn_implementation=hf.register_attention())
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 4096, (1, 1100), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    with torch.inference_mode():
        full = model(ids, use_cache=True)
        chunks = hf.cache_to_chunks(full.past_key_values, 256)[:4]
        want = model(ids[:, 1024:], past_key_values=hf.chunks_to_cache(chunks, cfg, reserve=76), logits_to_keep=76)
    lean = lean_mod.LeanLlama(model)
    got = lean(ids[:, 1024:], past_key_values=hf.chunks_to_cache(chunks, cfg, reserve=76), logits_to_keep=76)
    assert rel(got.logits, want.logits) < 2e-2
    assert float((got.logits.argmax(-1) == want.logits.argmax(-1)).float().mean()) > 0.9
    assert rel(lean(ids, logits_to_keep=1).logits, full.logits[:, -1:]) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_graphed_tail_gives_the_eager_tail_logits_for_new_ids_and_kv(lean_mod):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, intermediate_size=1024, vocab_size=1024, max_position_embeddings=2048)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    eager, graphed = lean_mod.LeanLlama(model), lean_mod.LeanLlama(model, graphs=True)
    for seed in (1, 2, 3):  # the first call captures; the later ones replay over other ids and other cached KV
        ids = torch.randint(0, 1024, (1, 600), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        chunks = hf.cache_to_chunks(eager(ids[:, :512]).past_key_values, 256)
        want = eager(ids[:, 512:], past_key_values=hf.chunks_to_cache(chunks, cfg, reserve=88), logits_to_keep=4)
        cache = hf.chunks_to_cache(chunks, cfg, reserve=88, out=graphed.kv_pool(600))
        got = graphed(ids[:, 512:], past_key_values=cache, logits_to_keep=4)
        assert len(graphed._captured) == 1
        assert rel(got.logits, want.logits) < 1e-2
        assert cache.get_seq_length() == 600 and rel(cache.layers[2].keys, want.past_key_values.layers[2].keys) < 1e-2
    with pytest.raises(ValueError, match="CUDA"):
        lean_mod.LeanLlama(model.to("cpu"), graphs=True)
