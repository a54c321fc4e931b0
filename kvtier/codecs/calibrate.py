"""Calibration: measure a model's per-slab sensitivity and write the profile the ``q*`` codecs use.

    python -m kvtier.codecs.calibrate [--model DIR] [--text PATH] [--windows 2] [--out profile.json]

On ``--windows`` windows of the text (prefix + continuation, the
bench/quality.py protocol; the windows sit midway between the ones
bench/quality.py scores, so calibration and evaluation never share a token):
0. the key weights (``mix``'s query-weighted keys): E[q_c^2] of the post-RoPE
   queries of each KV head's query group and E[k_c^2] of its cached keys over
   the calibration prefixes, w = (E[q^2] / E[k^2])^(1/4) normalized to a
   geometric mean of 1 per head (``--no-key-weights`` skips them; a model
   whose attention does not expose ``q_proj`` and RoPE embeddings gets none);
1. every slab (the K or the V of one layer) at 4 bits is the base; each slab in
   turn drops to 2 bits and the rise in KL(fp32 reference || codec) over the
   continuation is its sensitivity ``S`` (2 * layers forward passes per window);
2. a slab at ``b`` bits (2, 3, 4, 5, 6, 8) is predicted to cost
   ``S * r(b) / (r(2) - r(4))`` with ``r(b) = (3 / (2**b - 1))**2`` (the
   per-row quantization error power relative to 2 bits); a greedy allocation
   spends an average-bit budget, counted in bits after the +zstd stage
   (``ZSTD_BITS``: 2-bit codes cost 1.47, 8-bit 7.65), on the slab whose
   predicted cost falls most per bit;
3. the allocations on a ladder of average bits are measured for real; Δppl
   over 1000 tokens is noisy and not monotone in the bits (measured, with key
   weights: 3.5 bits +0.56 %, 4.5 +0.72 %, 5 +0.83 %, 6 +0.29 %), so it is
   replaced by its best monotone fit (``monotone``: pool-adjacent-violators,
   Δppl never falling with fewer bits; top-1 likewise never rising), and for
   each quality budget (``q0.5``, ``q1``, ``q2``, ``q5``) the smallest ladder
   point is kept whose fitted Δppl is within ``MARGIN`` x the budget (and,
   for ``q0.5``, whose fitted top-1 is >= 97 %). A lucky single point cannot
   set a budget: it is pooled with its neighbours.
The profile (``profile.Profile``) records the tables, the sensitivities and
what was measured; register it, ship it in ``kvtier/codecs/profiles/`` or store
it in the tier (``profile.store``).

This module is offline tooling: it runs a model, and nothing in kvtier's
serving path imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvtier import hf
from kvtier.codecs import compress, decompress
from kvtier.codecs import profile as P
from kvtier.codecs.profile import ZSTD_BITS, allocate  # the allocation is the serving path's (ratio targets)
from kvtier.codecs.mix import FALLBACK
from kvtier.model import load_model, model_id_for

# Δppl measured on the calibration windows must stay within MARGIN x the budget: the held-out text
# and a different window sample move Δppl by a few tenths of a point (bench/results/quality.md)
MARGIN = 0.6
TOP1_MIN = 97.0  # q0.5: the near-lossless default must keep >= 97 % greedy agreement
BUDGETS = {"q0.5": 0.5, "q1": 1.0, "q2": 2.0, "q5": 5.0}
# average code bits per element after zstd tried for the budgets (every point measured: 15 passes per window)
LADDER = [1.75, 1.875, 2.0, 2.125, 2.25, 2.375, 2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 4.5, 5.0, 6.0]


def monotone(values: list[float], increasing: bool) -> list[float]:
    """The least-squares fit of ``values`` that never falls (``increasing``) or never rises along the list:
    pool adjacent violators, each pool at its mean."""
    sign = 1.0 if increasing else -1.0
    pools: list[list[float]] = []  # [sum, count]
    for v in values:
        pools.append([sign * v, 1.0])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            s_, n_ = pools.pop()
            pools[-1][0] += s_
            pools[-1][1] += n_
    return [sign * s_ / n_ for s_, n_ in pools for _ in range(int(n_))]


class QueryEnergy:
    """Sums E[q_c^2] of the post-RoPE queries per (layer, KV head, channel) during forwards, through a
    pre-hook on each attention module (HF Llama-style: ``q_proj`` and the ``position_embeddings`` kwarg;
    the RoPE function of the module's own file). ``energy`` stays None for any other attention."""

    def __init__(self, model):
        self.energy, self.tokens, self.handles = None, 0, []
        cfg = model.config
        self.nq, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nq
        layers = getattr(getattr(model, "model", None), "layers", None) or []
        attns = [getattr(layer, "self_attn", None) for layer in layers]
        rope = [getattr(sys.modules.get(type(a).__module__), "apply_rotary_pos_emb", None) for a in attns]
        if not attns or not all(a is not None and hasattr(a, "q_proj") and f for a, f in zip(attns, rope)):
            return
        self.energy = torch.zeros(len(attns), self.nkv, self.d, dtype=torch.float64)
        for i, (a, f) in enumerate(zip(attns, rope)):
            self.handles.append(a.register_forward_pre_hook(self._hook(i, f), with_kwargs=True))

    def _hook(self, i: int, rope):
        def pre(mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            pe = kwargs.get("position_embeddings")
            if h is None or pe is None:
                return
            B, T, _ = h.shape
            q = mod.q_proj(h).view(B, T, self.nq, self.d).transpose(1, 2)
            q, _ = rope(q, q, *pe)
            q = q.reshape(B, self.nkv, self.nq // self.nkv, T, self.d).double()
            self.energy[i] += q.square().sum((0, 2, 3)) / (self.nq // self.nkv)
            if i == 0:
                self.tokens += B * T
        return pre

    def close(self) -> None:
        for hd in self.handles:
            hd.remove()
        if self.energy is not None and self.tokens == 0:
            self.energy = None


def weights_from(q2: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """w = (E[q^2] / E[k^2])^(1/4) per channel, geometric mean 1 per (layer, head), within the profile's
    bounds, as fp16 [L, H, D]: the diagonal weighting minimizing E[(q . dk)^2] when the quantizer's error
    power is proportional to the weighted key's energy (sum_c w_c^2 E[k_c^2])."""
    w = (q2.clamp_min(1e-12) / k2.clamp_min(1e-12)).pow(0.25)
    w = w / w.log().mean(-1, keepdim=True).exp()
    return w.clamp(P.KW_MIN, P.KW_MAX).to(torch.float16)


class Bench:
    """Prefilled windows and their fp32 reference; measures a bit table's KL, Δppl and top-1."""

    def __init__(self, model, ids: torch.Tensor, windows: int, prefix: int, cont: int, chunk: int, model_id: str,
                 key_weights: bool = True):
        self.model, self.prefix, self.cont, self.chunk, self.model_id = model, prefix, cont, chunk, model_id
        self.key_weights: torch.Tensor | None = None  # fp16 [L, H, D] once measured
        span = prefix + cont + 1
        if len(ids) < 2 * span:
            raise SystemExit(f"the calibration text has {len(ids)} tokens; it needs at least {2 * span}")
        # bench/quality.py scores 8 windows at linspace(0, n - span, 8); calibrate midway between them
        ev = np.linspace(0, len(ids) - span, 8).astype(int)
        mids = (ev[:-1] + ev[1:]) // 2
        self.starts = mids[np.linspace(0, len(mids) - 1, windows).round().astype(int)].tolist()
        self.data = []
        q2 = QueryEnergy(model) if key_weights else None
        k2 = 0.0
        for s in self.starts:
            w = ids[s:s + span]
            with torch.no_grad():
                chunks = hf.cache_to_chunks(model(w[None, :prefix], use_cache=True).past_key_values, chunk)
            k2 = k2 + sum(c[:, 0].double().square().sum(-2) for c in chunks)  # [L, H, D]
            ref = self._logp([c for c in chunks], w)
            self.data.append((w, [c.to(torch.bfloat16) for c in chunks], ref))
        if q2 is not None:
            q2.close()
            if q2.energy is not None:
                self.key_weights = weights_from(q2.energy / q2.tokens, k2 / (len(self.starts) * prefix))

    def _logp(self, chunks, w):
        with torch.no_grad():
            cache = hf.chunks_to_cache(chunks, self.model, dtype=torch.float32)
            logits = self.model(w[None, self.prefix:self.prefix + self.cont], past_key_values=cache).logits[0]
        return torch.log_softmax(logits.double(), -1)

    def measure(self, bits: list[int], windows: int | None = None) -> dict[str, float]:
        """KL, Δppl, top-1 of bit table ``bits`` (with the measured key weights, if any)."""
        from kvtier.codecs import mix

        codec = mix.MixCodec("q1")
        nll = nll0 = kl = agree = n = 0.0
        for w, chunks, ref in self.data[:windows]:
            back = []
            for c in chunks:  # the codec's own encode + decode (torch path), sinks included
                bufs, params = codec.encode(c, bits=bits, key_weights=self.key_weights)
                u8 = {k: v.contiguous().view(-1).view(torch.uint8) for k, v in bufs.items()}
                back.append(codec.decode(u8, params, tuple(c.shape), c.dtype, torch.device("cpu")))
            logp = self._logp(back, w)
            t = w[self.prefix + 1:]
            nll += -logp.gather(1, t[:, None]).sum().item()
            nll0 += -ref.gather(1, t[:, None]).sum().item()
            agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())
            kl += (ref.exp() * (ref - logp)).sum().item()
            n += len(t)
        return {"kl": kl / n, "dppl": 100 * (math.exp((nll - nll0) / n) - 1), "top1": 100 * agree / n,
                "avg_bits": sum(bits) / len(bits), "zstd_bits": sum(ZSTD_BITS[b] for b in bits) / len(bits)}


def calibrate(model, ids: torch.Tensor, windows: int = 2, prefix: int = 1024, cont: int = 256, chunk: int = 256,
              sens_windows: int = 1, sens: list[float] | None = None, key_weights: bool = True,
              per_head: bool = False, say=print) -> P.Profile:
    """``sens_windows`` of the ``windows`` measure the sensitivities (2 * layers passes each, times kv_heads
    with ``per_head``: one slab per head of a layer's K or V); all of them measure the budgets (one by
    default: 60 passes of SmolLM2 took ~9 min on the shared 2 cores).
    ``sens``: sensitivities from an earlier profile of the same model (step 1 skipped; recorded)."""
    mid = model_id_for(model, torch.bfloat16)
    t0 = time.perf_counter()
    bench = Bench(model, ids, windows, prefix, cont, chunk, mid, key_weights)
    say(f"calibrate: key weights {'none' if bench.key_weights is None else 'measured, range %.2f-%.2f' % (bench.key_weights.min(), bench.key_weights.max())}")
    L, H = bench.data[0][1][0].shape[0], bench.data[0][1][0].shape[2]
    hs = H if per_head else 1  # slabs per (layer, K/V); slab index (layer * 2 + kv) * hs + head
    n = 2 * L * hs
    base = bench.measure([4] * n, sens_windows)
    reused = sens is not None
    if reused and len(sens) != n:
        raise SystemExit(f"--sensitivity-from gives {len(sens)} sensitivities; this model has {n} slabs "
                         f"({'per head' if per_head else 'per layer'})")
    sens = list(sens) if reused else []
    for s in ([] if reused else range(n)):
        bits = [4] * n
        bits[s] = 2
        sens.append(max(bench.measure(bits, sens_windows)["kl"] - base["kl"], 0.0))
        say(f"calibrate: slab {s + 1}/{n} (layer {s // (2 * hs)} {'KV'[s // hs % 2]}"
            f"{f' head {s % hs}' if per_head else ''}) S = {sens[-1]:.5f}  [{time.perf_counter() - t0:.0f} s]")
    budgets, measured = {}, {}
    cache: dict[float, dict] = {}

    def at(i: int) -> dict:
        if LADDER[i] not in cache:
            m = bench.measure(allocate(sens, LADDER[i]))
            cache[LADDER[i]] = m
            say(f"calibrate: avg {LADDER[i]:.3f} bits after zstd ({m['avg_bits']:.3f} code bits) -> Δppl {m['dppl']:+.3f} %, top-1 {m['top1']:.2f} %, KL {m['kl']:.5f}")
        return cache[LADDER[i]]

    ladder = [at(i) for i in range(len(LADDER))]
    fit_dppl = monotone([m["dppl"] for m in ladder], increasing=False)  # LADDER ascends in bits
    fit_top1 = monotone([m["top1"] for m in ladder], increasing=True)
    for name, target in BUDGETS.items():
        ok = [d <= MARGIN * target and (name != "q0.5" or t >= TOP1_MIN) for d, t in zip(fit_dppl, fit_top1)]
        pick = next((i for i, good in enumerate(ok) if good), len(LADDER) - 1)
        if not ok[pick]:
            say(f"calibrate: {name}: even {LADDER[pick]} bits miss the budget; using them anyway")
        budgets[name] = allocate(sens, LADDER[pick])
        measured[name] = dict(ladder[pick], fit_dppl=fit_dppl[pick], fit_top1=fit_top1[pick])
    info = {"text_tokens": int(len(ids)), "windows": bench.starts, "per_head": per_head, "zstd_bits": ZSTD_BITS, "prefix": prefix, "cont": cont, "chunk": chunk,
            "sens_windows": sens_windows, "sens_reused": reused, "base_4bit": base, "sensitivity_kl": [round(s, 7) for s in sens], "measured": measured,
            "margin": MARGIN, "fallback": FALLBACK,
            "ladder": {str(b): m for b, m in zip(LADDER, ladder)}, "seconds": round(time.perf_counter() - t0)}
    first = bench.data[0][1][0]
    kw = None if bench.key_weights is None else bench.key_weights.float().tolist()  # fp16 values: exact in JSON
    return P.Profile(model=mid, layers=int(first.shape[0]), kv_heads=int(first.shape[2]),
                     head_dim=int(first.shape[4]), budgets=budgets, info=info, key_weights=kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data" / "eval-text")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="profile JSON (default: kvtier/codecs/profiles/<model>.json)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-key-weights", action="store_true", help="keys unweighted (no query statistics)")
    p.add_argument("--per-head", action="store_true", help="a bit width per head of each layer's K and V "
                   "(2 x layers x kv_heads sensitivity passes)")
    p.add_argument("--sensitivity-from", type=Path, default=None,
                   help="reuse the slab sensitivities of an earlier profile of this model (skips 2 x layers passes)")
    a = p.parse_args(argv)
    if a.windows < 1:
        p.error(f"--windows must be >= 1, got {a.windows}")
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype=torch.float32)
    sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))  # last: bench/kernels.py is not kernels
    from quality import read_text  # one text reader for calibration and evaluation

    text, _ = read_text(a.text)
    ids = torch.tensor(tok(text).input_ids, dtype=torch.long)
    sens = None
    if a.sensitivity_from:
        sens = P.Profile.from_json(a.sensitivity_from.read_bytes()).info["sensitivity_kl"]
    prof = calibrate(model, ids, a.windows, sens=sens, key_weights=not a.no_key_weights, per_head=a.per_head)
    out = a.out or P.PROFILE_DIR / (P.model_layout_key(prof.model).split("|")[0] + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(prof.to_json())
    print(f"wrote {out} (profile {prof.digest}); budgets: "
          + json.dumps({k: v for k, v in prof.info["measured"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
