"""Chunk keys: chained hashes of token chunks, bound to a model and a tenant.

Key i is the hex digest of BLAKE2b-160 over (key i-1, model fingerprint, tenant,
chunk length, token ids of chunk i as little-endian int64). A key therefore names
a whole prefix, not just one chunk: change one token and that chunk's key and
every later key change. Keys never depend on Python's ``hash()`` or
``PYTHONHASHSEED``, so they are stable across processes, machines and versions.

Only full chunks get keys; a trailing partial chunk is recomputed by the caller.
This module does not know what a model is beyond its fingerprint string.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Sequence

import numpy as np

KEY_BYTES = 20  # 160 bits: collisions need ~2**80 chunks
_DOMAIN = b"kvtier/chunk/v1"


def model_fingerprint(model_id: str, num_layers: int, num_kv_heads: int, head_dim: int, dtype: str,
                      weights: str = "") -> str:
    """A model id bound to the KV shape and dtype it produces and to a digest of its weights, e.g.
    ``"SmolLM2-135M|L30|H3|D64|float32|W5f0c2a9d1e7b3c44"``. Pass this as ``model_id`` to
    ``chunk_keys``/``compress`` so two models (or one model in two dtypes) never share a block.

    ``weights``: a hex digest of the model's weights or files (``kvtier.model.files_digest`` for a
    folder); the first 16 hex digits go in. Without it, two fine-tunes loaded from folders of the
    same name, with the same shape, would get the same keys and be served each other's KV."""
    if not isinstance(model_id, str) or not model_id or "|" in model_id:
        raise ValueError(f"model_id={model_id!r} must be a non-empty string without '|'")
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if not isinstance(weights, str) or (weights and not re.fullmatch(r"[0-9a-f]{16,}", weights)):
        raise ValueError(f"weights={weights!r} must be '' or a hex digest of at least 16 lowercase hex digits")
    dtype = str(dtype).removeprefix("torch.")
    return f"{model_id}|L{num_layers}|H{num_kv_heads}|D{head_dim}|{dtype}" + (f"|W{weights[:16]}" if weights else "")


def _token_array(token_ids: Sequence[int] | np.ndarray | "torch.Tensor") -> np.ndarray:  # noqa: F821
    if hasattr(token_ids, "detach"):  # torch tensor, without importing torch here
        token_ids = token_ids.detach().cpu().numpy()
    arr = np.asarray(token_ids)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"token_ids has shape {tuple(arr.shape)}, expected one sequence of ints")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token_ids has dtype {arr.dtype}, expected integers")
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"token_ids contains a negative id ({int(arr.min())})")
    return arr.astype("<i8", copy=False)


def chunk_keys(
    token_ids: Sequence[int] | np.ndarray,
    model_id: str,
    chunk_tokens: int = 256,
    tenant: str = "",
) -> list[str]:
    """Keys of every full ``chunk_tokens`` chunk of ``token_ids``, chained.

    >>> a = chunk_keys(list(range(600)), "m", chunk_tokens=256)
    >>> len(a)      # 600 tokens: two full chunks, the 88-token tail gets no key
    2
    """
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id={model_id!r} must be a non-empty string")
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive int")
    if not isinstance(tenant, str):
        raise ValueError(f"tenant={tenant!r} must be a string")
    arr = _token_array(token_ids)
    head = _DOMAIN + b"\0" + model_id.encode() + b"\0" + tenant.encode() + b"\0" + chunk_tokens.to_bytes(4, "little")
    keys: list[str] = []
    prev = b""
    for i in range(len(arr) // chunk_tokens):
        h = hashlib.blake2b(digest_size=KEY_BYTES)
        h.update(head)
        h.update(prev)
        h.update(arr[i * chunk_tokens : (i + 1) * chunk_tokens].tobytes())
        prev = h.digest()
        keys.append(prev.hex())
    return keys


# what every tier can store: the cold tier names a file or an S3 object after the key, so a key it
# cannot name (a '/', a leading '.', '..', spaces, non-ASCII) would be accepted by put and then lost on demotion
_USER_KEY_RE = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9._=-]{0,199}")


def check_keys(keys: Iterable[object], what: str = "key") -> list[str]:
    """Validate user-supplied keys; raise ValueError naming the first bad one."""
    out = []
    for i, k in enumerate(keys):
        if not isinstance(k, str) or not _USER_KEY_RE.fullmatch(k) or ".." in k:
            raise ValueError(f"{what} #{i}={k!r} is not a valid key (1-200 of [A-Za-z0-9._=-], not starting with '.', "
                             "without '..'; kvtier.chunk_keys gives such keys)")
        out.append(k)
    return out


def tenant_key(key: str, tenant: str) -> str:
    """The key under which ``tenant``'s block of ``key`` is stored: a BLAKE2b-160 hex digest of (tenant, key)
    under a domain, for every tenant including the default one "". So no tenant's stored keys are another
    tenant's raw keys: the default tenant cannot name tenant B's blocks by computing them with this function
    (it gets H("", H("B", k)), not H("B", k)). The digest is a valid key of every tier (40 hex characters,
    whatever the lengths of tenant and key) and spreads evenly over cold folders."""
    if not isinstance(tenant, str):
        raise ValueError(f"tenant={tenant!r} must be a string")
    h = hashlib.blake2b(b"kvtier/tenant/v2\0" + tenant.encode() + b"\0" + key.encode(), digest_size=KEY_BYTES)
    return h.hexdigest()
