"""Model identity: the weights digest in the fingerprint (kvtier.model.files_digest / model_id_for). No Ray."""

import json

import pytest
import torch

from kvtier import model as km


def tiny_folder(root, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    folder = root / "same-name"
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


def test_two_fine_tunes_in_folders_of_the_same_name_get_different_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_HOME", str(tmp_path / "home"))
    from transformers import AutoModelForCausalLM

    a, b = tiny_folder(tmp_path / "a", 0), tiny_folder(tmp_path / "b", 1)
    ma, mb = (AutoModelForCausalLM.from_pretrained(str(f)) for f in (a, b))
    ida, idb = km.model_id_for(ma), km.model_id_for(mb)
    assert ida.split("|W")[0] == idb.split("|W")[0] == "same-name|L2|H2|D8|float32"
    assert ida != idb, "same name and shape, other weights: other keys"
    assert km.model_id_for(AutoModelForCausalLM.from_pretrained(str(a))) == ida, "stable across loads"


def test_the_digest_is_remembered_and_follows_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_HOME", str(tmp_path / "home"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"\1" * 1000)
    d1 = km.files_digest(f)
    memo = json.loads((tmp_path / "home" / "digests.json").read_text())
    assert memo[str(f.resolve())]["digest"] == d1
    f.write_bytes(b"\2" * 1001)  # another size: the remembered digest no longer applies
    assert km.files_digest(f) != d1


def test_a_model_without_files_is_digested_from_its_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    m1 = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    m2 = LlamaForCausalLM(cfg)
    assert km.weights_digest(m1) != km.weights_digest(m2)
    assert km.model_id_for(m1) != km.model_id_for(m2)


def test_bad_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        km.files_digest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no weight files"):
        km.files_digest(tmp_path / "empty")
