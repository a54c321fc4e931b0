"""Bad input through the public API of a running tier: clear errors, nothing stored lost.

Hypothesis throws wrong types, shapes, dtypes, NaN/Inf, empty and oversized
tensors, bad keys, mismatched batches and bad codec/device arguments at
``kvtier.put/get/lookup/contains/prefetch/delete``. Each call either raises a
``TypeError``/``ValueError``/``KvtierError`` whose message names the bad value,
or (when hypothesis happened to build a valid call) round-trips exactly. After
every example the blocks stored before the run are still there, byte for byte,
and a batch with one bad member stored nothing.

The explicit limits are checked by name: ``MAX_BATCH_KEYS`` (keys per call),
``MAX_BLOCK_BYTES`` (raw bytes of one chunk, rejected before any work), and
the transfer's ``MAX_HANDOFF_BLOCKS``. The HTTP limits (max_prompt_tokens,
max_batch, max_body_bytes, max_tokens_cap) are proven over live HTTP in
tests/ray_apps/test_serve.py; random block bytes in tests/kvtier/test_block.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvtier
from kvtier.block import MAX_BLOCK_BYTES
from kvtier.runtime.client import MAX_BATCH_KEYS
from tierkit import SHAPE, keys_of, kv_of, same, tier

pytestmark = pytest.mark.ray
ERRORS = (TypeError, ValueError, kvtier.KvtierError)
SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
KEEP = keys_of("kept", 4)


@pytest.fixture(scope="module")
def stored(ray_session):
    """A tier holding four blocks that no bad call may disturb."""
    with tier(hot_bytes="8MiB", num_shards=2):
        kvtier.put(KEEP, [kv_of("kept", i) for i in range(4)])
        yield
        assert_kept()


def assert_kept() -> None:
    assert kvtier.lookup(KEEP) == 4
    got = kvtier.get(KEEP)
    assert all(same(x, kv_of("kept", i)) for i, x in enumerate(got)), "a bad call changed a stored block"


def fresh_key(tag: str) -> str:
    return keys_of(f"fresh-{tag}", 1)[0]


def named(err: BaseException, *parts: str) -> bool:
    msg = str(err)
    return bool(msg) and all(p in msg for p in parts)


# ---------------------------------------------------------------- bad keys
bad_keys = st.one_of(
    st.none(), st.integers(), st.floats(), st.binary(max_size=8), st.just(""), st.just("a/b"), st.just("../up"),
    st.just(".hidden"), st.just("a..b"), st.just("tab\tkey"), st.just("x" * 201), st.just("\u00e9t\u00e9"),
    st.text(max_size=12), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@SETTINGS
@given(key=bad_keys, op=st.sampled_from(["put", "get", "lookup", "contains", "prefetch", "delete"]),
       as_list=st.booleans())
def test_bad_keys_are_named_or_round_trip(stored, key, op, as_list):
    arg = [fresh_key("list"), key] if as_list and op not in ("contains",) else key
    kv = kv_of("bad-key", 0)
    try:
        if op == "put":
            kvtier.put(arg, [kv, kv] if isinstance(arg, list) else kv)
        elif op == "prefetch":
            kvtier.prefetch(arg).result(timeout=30)
        else:
            getattr(kvtier, op)(arg)
    except ERRORS as e:
        assert named(e, repr(key)[:20]) or named(e, type(key).__name__), f"{op}({key!r}): {e}"
    else:  # a key the tier accepts: it must then behave like any key
        assert isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_=-][A-Za-z0-9._=-]{0,199}", key) and ".." not in key, \
            f"{op} accepted {key!r}, which the cold tier could not store"
        if op == "put":
            assert same(kvtier.get(key), kv)
            kvtier.delete(key)
    assert_kept()


# ---------------------------------------------------------------- bad tensors
def tensors():
    dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32,
                              torch.int64, torch.uint8, torch.bool, torch.complex64])
    shapes = st.lists(st.integers(0, 4), min_size=0, max_size=7).map(tuple)
    plain = st.builds(lambda s, d: torch.ones(s, dtype=d), shapes, dtypes)
    special = st.builds(lambda v, at: kv_of("base", 0).clone().index_put_((torch.tensor([at % 2]),), torch.tensor(v)),
                        st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.integers(0, 1))
    others = st.one_of(st.none(), st.integers(), st.text(max_size=4), st.just([[1.0, 2.0]]),
                       st.just(np.zeros(SHAPE, dtype=np.float32)))
    return st.one_of(plain, special, others)


def expected_words(kv) -> tuple[str, ...] | None:
    """What the error for ``kv`` must mention; None for a valid KV chunk."""
    if not isinstance(kv, torch.Tensor):
        return (type(kv).__name__,)
    if kv.dim() != 5 or kv.shape[1] != 2:
        return (str(tuple(kv.shape)),)
    if kv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return (str(kv.dtype),)
    if kv.numel() == 0:
        return ("empty",)
    if not bool(torch.isfinite(kv).all()):
        return ("NaN or Inf",)
    return None


@SETTINGS
@given(kv=tensors(), batch=st.booleans())
def test_bad_tensors_are_named_and_a_bad_batch_stores_nothing(stored, kv, batch):
    keys = [fresh_key("t0"), fresh_key("t1")]
    words = expected_words(kv)
    try:
        if batch:  # one good and one bad tensor: the batch is all or nothing
            kvtier.put(keys, [kv_of("good", 0), kv])
        else:
            kvtier.put(keys[1], kv)
    except ERRORS as e:
        assert words is not None, f"a valid chunk of shape {tuple(kv.shape)} {kv.dtype} was refused: {e}"
        assert named(e, *words), f"error for {type(kv).__name__} {getattr(kv, 'shape', '')}: {e}"
        assert kvtier.lookup(keys[:1]) == 0 and not kvtier.contains(keys[1]), "a failed put stored something"
    else:
        assert words is None, f"put accepted a bad tensor: {type(kv).__name__} {getattr(kv, 'shape', '')}"
        assert same(kvtier.get(keys[1]), kv)
        kvtier.delete(keys)
    assert_kept()


@SETTINGS
@given(n_keys=st.integers(0, 5), n_kvs=st.integers(0, 5),
       codec=st.one_of(st.none(), st.sampled_from(["none", "nope", "none+lz4", "", "kivi4+zstd+zstd"]), st.integers()),
       device=st.one_of(st.none(), st.sampled_from(["cpu", "tpu", "cuda:99x", "", "meta"]), st.integers(-2, 2)))
def test_mismatched_batches_codecs_and_devices(stored, n_keys, n_kvs, codec, device):
    keys = keys_of("batch", 5)[:n_keys]
    kvs = [kv_of("batch", i) for i in range(n_kvs)]
    try:
        kvtier.put(keys, kvs, codec=codec)
    except ERRORS as e:
        assert named(e, repr(codec)) or (n_keys != n_kvs and named(e, f"{n_keys} keys and {n_kvs} tensors")), e
        assert kvtier.lookup(keys) == 0 if keys else True
    else:
        assert n_keys == n_kvs and codec in (None, "none"), f"put accepted codec={codec!r} with {n_keys}/{n_kvs}"
    usable = device in (None, "cpu") or (torch.cuda.is_available() and isinstance(device, int) and device >= 0)
    try:
        got = kvtier.get(keys, device=device)
    except ERRORS as e:
        assert not usable and named(e, f"device={device!r}"), e
    else:
        assert usable, f"get accepted device={device!r}"
        if n_keys == n_kvs and codec in (None, "none"):
            assert all(same(x.cpu(), y) for x, y in zip(got, kvs))
    if keys:
        kvtier.delete(keys)
    assert_kept()


# ---------------------------------------------------------------- explicit limits
def test_batch_size_limit_is_named_on_every_call(stored):
    many = [KEEP[0]] * (MAX_BATCH_KEYS + 1)
    calls = {
        "put": lambda: kvtier.put(many, [kv_of("kept", 0)] * len(many)),
        "get": lambda: kvtier.get(many),
        "lookup": lambda: kvtier.lookup(many),
        "prefetch": lambda: kvtier.prefetch(many),
        "delete": lambda: kvtier.delete(many),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{MAX_BATCH_KEYS + 1} keys exceeds .*MAX_BATCH_KEYS={MAX_BATCH_KEYS}"):
            call()
    assert kvtier.lookup([KEEP[0]] * MAX_BATCH_KEYS) == MAX_BATCH_KEYS  # the limit itself is allowed
    assert_kept()


def test_block_size_limit_is_named_before_any_work(stored):
    # 64 x 2 x 64 x 4096 x 128 bf16 = 8 GiB raw; expand() allocates none of it, so the check must come first
    huge = torch.zeros(1, dtype=torch.bfloat16).expand(64, 2, 64, 4096, 128)
    with pytest.raises(ValueError, match=f"MAX_BLOCK_BYTES={MAX_BLOCK_BYTES}"):
        kvtier.put(fresh_key("huge"), huge)
    with pytest.raises(ValueError, match="MAX_BLOCK_BYTES"):
        kvtier.compress(huge, "kivi4")
    assert not kvtier.contains(fresh_key("huge"))
    assert_kept()


def test_handoff_size_limit_is_named():
    from kvtier.transport import MAX_HANDOFF_BLOCKS, ObjectStoreTransport

    with pytest.raises(ValueError, match=f"{MAX_HANDOFF_BLOCKS + 1} blocks exceeds the maximum of {MAX_HANDOFF_BLOCKS}"):
        ObjectStoreTransport().publish([("k", b"x")] * (MAX_HANDOFF_BLOCKS + 1))
