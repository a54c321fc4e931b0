"""The direct P/D handoff through the worker side, without vLLM: a prefill ``WorkerSide`` and a decode
``WorkerSide``, each with its own NIXL arena (real agents), over small ``cpu-vec`` pages, the tier
replaced by a dict of Blocks.

A prefill's handoff save encodes each chunk once: the same bytes go into its arena and into the
tier. Decode's load with the prefill's endpoint as its source fills its pages from the arena
bit-exact without asking the tier; a chunk the arena lacks, a corrupt or foreign block in it,
or an unusable source falls back to the tier, and a chunk neither has fails its blocks (vLLM
recomputes them).
"""

from __future__ import annotations

import pytest
import torch

from kvtier.block import Block
from kvtier.codecs import compress, decompress
from kvtier.errors import TierUnavailableError
from kvtier.vllm import pages
from kvtier.vllm.scheduler import LoadSpec, SaveSpec
from kvtier.vllm.worker import WorkerSide

try:
    from kvtier.vllm.handoff import Handoff, make_arena

    _probe = make_arena("nixl", 1 << 20)
    _probe.close()
    NIXL_WHY = ""
except TierUnavailableError as e:
    NIXL_WHY = str(e)

pytestmark = pytest.mark.skipif(bool(NIXL_WHY), reason=f"NIXL unavailable: {NIXL_WHY}")

BS, CHUNK, H, D, L = 32, 64, 2, 8, 3
MODEL = "m|L3|H2|D8|float32"


class FakeTier:
    def __init__(self):
        self.blocks = {}
        self.asked: list[str] = []

    def put(self, keys, kvs, codec):  # kvtier.put: Blocks stored as they are, tensors compressed
        self.blocks.update((k, kv if isinstance(kv, Block) else compress(kv, codec, key=k, model_id=MODEL))
                           for k, kv in zip(keys, kvs))

    def get(self, keys):
        self.asked += keys
        return [decompress(self.blocks[k]) if k in self.blocks else None for k in keys]


def side(tier: FakeTier):
    lay = pages.PageLayout("cpu-vec", 16, BS, H, D, torch.float32)
    layers = [torch.randn(lay.shape()) for _ in range(L)]
    ho = Handoff(make_arena("nixl", 1 << 20), tier.get, tier.put, "none", MODEL)
    w = WorkerSide(layers, lay, CHUNK, "none", 4, 10.0, get=tier.get, put=tier.put,
                   ready=lambda wait_s=0.0: True, handoff=ho)
    return w, ho, layers, lay


@pytest.fixture
def pd():
    tier = FakeTier()
    (pw, pho, pl, lay), (dw, dho, dl, _) = side(tier), side(tier)
    yield tier, pw, pho, pl, dw, dho, dl, lay
    for w, ho in ((pw, pho), (dw, dho)):
        w.close(2.0)
        ho.close()


def test_decode_fills_its_pages_from_the_prefills_arena_without_asking_the_tier(pd):
    tier, pw, pho, pl, dw, dho, dl, lay = pd
    pw.save([SaveSpec("p", ["k0", "k1"], [[1, 2], [3, 4]], handoff=True)])
    assert pw.flush(10.0) and set(tier.blocks) == {"k0", "k1"}
    # encoded once: the tier's Block is the bytes the arena holds
    raw = dho.arena.read(pho.endpoint(), ["k0", "k1"], 5.0)
    assert [bytes(r) for r in raw] == [bytes(tier.blocks[k].to_arrow()) for k in ("k0", "k1")]
    dw.load([LoadSpec("d", ["k0", "k1"], [[5, 6], [7, 8]], source=pho.endpoint())])
    want = pages.gather(pl, lay, torch.tensor([[1, 2], [3, 4]]), CHUNK)
    assert torch.equal(pages.gather(dl, lay, torch.tensor([[5, 6], [7, 8]]), CHUNK), want)
    assert tier.asked == [] and dw.take_errors() == set()
    assert dho.counters["arena_pulled_chunks"] == 2 and pho.counters["arena_saved_chunks"] == 2


def test_what_the_arena_cannot_give_comes_from_the_tier_and_the_rest_is_recomputed(pd):
    tier, pw, pho, pl, dw, dho, dl, lay = pd
    pw.save([SaveSpec("p", ["a0", "a1", "a2"], [[1, 2], [3, 4], [9, 10]], handoff=True)])
    pw.save([SaveSpec("q", ["t0"], [[11, 12]])])  # a plain save: in the tier only
    assert pw.flush(10.0)
    pho.arena.write("a1", tier.blocks["a0"].to_arrow())  # a block of another key under a1: foreign, a miss
    pho.arena._mem[pho.arena._data0 + pho.arena._live[2][0] + 200] ^= 0xFF  # slot 2 holds a2: corrupt it
    del tier.blocks["a2"]  # ... and the tier lost it too: recomputed
    dw.load([LoadSpec("d", ["a0", "a1", "a2", "t0"], [[5, 6], [7, 8], [13, 14], [15, 3]], source=pho.endpoint())])
    want = pages.gather(pl, lay, torch.tensor([[1, 2], [3, 4]]), CHUNK)
    assert torch.equal(pages.gather(dl, lay, torch.tensor([[5, 6], [7, 8]]), CHUNK), want)
    assert tier.asked == ["a1", "a2", "t0"]
    assert dho.counters["arena_bad_chunks"] == 1 and dho.arena.counters["torn_blocks"] == 1
    # vLLM truncates at a failed block: a2's and every later chunk's blocks are reported
    assert dw.take_errors() == {13, 14, 15, 3}


def test_an_unusable_source_loads_through_the_tier(pd):
    tier, pw, pho, pl, dw, dho, dl, lay = pd
    pw.save([SaveSpec("p", ["u0"], [[1, 2]], handoff=True)])
    assert pw.flush(10.0)
    bad = {**pho.endpoint(), "meta": "bm90IG1ldGFkYXRh", "agent": "ghost"}
    dw.load([LoadSpec("d", ["u0"], [[5, 6]], source=bad)])
    assert torch.equal(pages.gather(dl, lay, torch.tensor([[5, 6]]), CHUNK),
                       pages.gather(pl, lay, torch.tensor([[1, 2]]), CHUNK))
    assert tier.asked == ["u0"] and dw.take_errors() == set()


def test_transport_settings():
    assert make_arena("tier") is None
    with pytest.raises(ValueError, match="transport='rdma' is not one of"):
        make_arena("rdma")
