"""Helpers of the vLLM engine tests and bench/vllm_ttft.py: SmolLM2's HF folder, engines, prompts, keys.

An engine is a real ``vllm.LLM`` on CPU (its EngineCore and worker are spawned
processes), prefix caching off so that every hit is kvtier's. Start-up is
20-110 s on a 2-core box: callers share engines and stop each with ``stop``
before the next (one engine's KV cache and threads at a time).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from pathlib import Path

BLOCK = 32          # vLLM CPU wants a multiple of 32 (the vec ISA)
CHUNK = 256         # the connector's default for block 32: 8 blocks a chunk
MAX_LEN = 8192      # SmolLM2's context
DTYPE = "float32"


def model_folder() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (written once by kvtier.model from the GGUF package)."""
    from kvtier.model import hf_folder

    return hf_folder(None, progress=None)


def connector_config(namespace: str, **extra) -> dict:
    cfg = {"codec": "none", "namespace": namespace, "hot_bytes": 0}
    cfg.update(extra)
    return {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": cfg}


def start_engine(kv_transfer_config: dict | None = None, prefix_caching: bool = False,
                 kv_bytes: int = 1 << 30, max_num_seqs: int = 8):
    from vllm import LLM

    return LLM(model=str(model_folder()), dtype=DTYPE, max_model_len=MAX_LEN, enable_prefix_caching=prefix_caching,
               enforce_eager=True, block_size=BLOCK, kv_cache_memory_bytes=kv_bytes, max_num_seqs=max_num_seqs,
               kv_transfer_config=kv_transfer_config, disable_log_stats=True)


def stop_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def eval_tokens(n: int, offset: int = 0) -> list[int]:
    """``n`` token ids of real English text (Python docs, ../shared/data/eval-text), starting ``offset`` tokens in."""
    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval-text"
    if not root.is_dir():
        root = Path("/work/shared/data/eval-text")
    text = "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("*.txt"))[:40])
    tok = AutoTokenizer.from_pretrained(str(model_folder()))
    ids = tok(text)["input_ids"]
    if len(ids) < offset + n:
        raise ValueError(f"eval text has {len(ids)} tokens, need {offset + n}")
    return ids[offset:offset + n]


def generate(llm, prompts: list[list[int]], max_tokens: int = 12, salts: list[str | None] | None = None,
             kvtier_on: bool = True):
    """Greedy texts, num_cached_tokens and the wall time of one batch of token-id prompts. ``kvtier_on=False``:
    the connector neither looks up, loads nor saves for these requests (``kv_transfer_params``)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                        extra_args=None if kvtier_on else {"kv_transfer_params": {"kvtier": "off"}})
    reqs = []
    for i, ids in enumerate(prompts):
        r = {"prompt_token_ids": list(ids)}
        if salts and salts[i] is not None:
            r["cache_salt"] = salts[i]
        reqs.append(r)
    t0 = time.perf_counter()
    outs = llm.generate(reqs, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    return [o.outputs[0].text for o in outs], [o.num_cached_tokens or 0 for o in outs], dt


def keys_for(ids: list[int], salt: str | None = None, tenant: str = "", chunk: int = CHUNK) -> list[str]:
    """The keys the connector gives ``ids`` for SmolLM2 fp32 on CPU pages (computed outside vLLM)."""
    from kvtier.vllm.identity import model_identity, request_keys, weights_digest

    folder, layers, heads, head_dim = _model_shape()
    ident = model_identity(folder.name, layers, heads, head_dim, DTYPE, weights_digest(str(folder)), "cpu-vec")
    return request_keys(ids, ident, chunk, tenant, salt)


def _model_shape() -> tuple[Path, int, int, int]:
    """(folder, layers, KV heads, head_dim) of the test model, from its config.json."""
    import json

    folder = model_folder()
    c = json.loads((folder / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return folder, c["num_hidden_layers"], c["num_key_value_heads"], head_dim


def engine_model_id() -> str:
    """The model id the connector stamps on SmolLM2's blocks (a test process reading them must expect it)."""
    from kvtier.vllm.identity import tier_model_id

    folder, layers, heads, head_dim = _model_shape()
    return tier_model_id(str(folder), layers, heads, head_dim, DTYPE)


@contextlib.contextmanager
def env_for_engines(gcs_address: str):
    """Engine processes inherit the environment: they join the test's Ray (address "auto"). The old
    value comes back afterwards, so later test modules' ``ray.init(num_cpus=...)`` start their own Ray."""
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = gcs_address
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
