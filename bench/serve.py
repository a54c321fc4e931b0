"""Serving benchmark: the Ray Serve LLM app with kvtier against the same app without it, in one run.

    python bench/serve.py [--levels 1,4,8] [--doc-tokens 768] [--questions 8] [--chats 2] [--turns 3]
                          [--model PATH] [--out bench/results/serve-cpu.md]

Deploys two apps of ``ray_apps.serve`` side by side on one local Ray (8 logical
CPUs): ``kvtier`` (vLLM engines with kvtier's connector) and ``baseline`` (the same
app, ``kvtier=false``). Both run one engine with vLLM's own prefix cache off, so
the baseline reuses nothing and every cached token of the kvtier arm came from the
tier; on CPU vLLM's in-engine cache is small, and in a fleet a prefix's next request
usually lands on another engine, which is the case measured here.

Workloads, each at every client count in ``--levels`` (clients are threads with
the ``openai`` client, streaming, 8 tokens per answer, greedy):

  * shared prefix: ``--questions`` questions over one ``--doc-tokens`` document,
    and ``--chats`` chats of ``--turns`` turns whose history grows (each turn's
    prompt holds the whole chat). Each level's document and chats are new to both
    arms (their own ``cache_salt``), so a level's first document request and every
    first chat turn miss in both.
  * no reuse: as many requests as the shared-prefix workload has, each a distinct
    prompt of the same length: kvtier can only add its lookups and saves.

Per (workload, level, arm): TTFT p50/p99 (time to the first streamed token, as the
client sees it), requests/s over the workload's wall time, and the hit rate in
tokens (``usage.prompt_tokens_details.cached_tokens`` / prompt tokens). The two
arms run alternately and take turns going first, each after the tier has settled
(the kvtier engine's background saves done), so a change in the machine's load
hits both. With ~14 requests per cell, p99 is the slowest request.
Writes the table to ``--out`` with the date, machine, load and command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import queue
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EVAL_TEXT = ROOT.parent / "shared" / "data" / "eval-text"
MAX_TOKENS = 8
ARMS = ("kvtier", "baseline")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus() -> str:
    files = sorted(EVAL_TEXT.rglob("*.txt")) if EVAL_TEXT.is_dir() else []
    if files:
        return "\n\n".join(f.read_text() for f in files[:40])
    import argparse as a, textwrap as t, inspect  # noqa: E401 - a checkout without ../shared

    return inspect.getsource(a) + inspect.getsource(t)


def texts(tok, text: str, n_tokens: int, count: int, offset: int) -> list[str]:
    """``count`` distinct passages of ``n_tokens`` tokens from ``text``, starting at token ``offset``."""
    ids = tok(text)["input_ids"]
    need = offset + count * n_tokens
    while len(ids) < need:
        ids = ids + ids
    return [tok.decode(ids[offset + i * n_tokens: offset + (i + 1) * n_tokens]) for i in range(count)]


def shared_streams(doc: str, chats: list[str], questions: int, turns: int) -> list[list[dict]]:
    """Request streams (each runs in order on one client): a question each, and one stream per chat."""
    qs = [[{"kind": "completion", "prompt": f"Read this document.\n\n{doc}\n\nQuestion {i + 1}: what does part "
            f"{i + 1} of the document say? Answer:"}] for i in range(questions)]
    cs = []
    for c, text in enumerate(chats):
        step = max(1, len(text) // turns)
        cs.append([{"kind": "chat", "parts": [text[k * step:(k + 1) * step] for k in range(t + 1)], "chat": c}
                   for t in range(turns)])
    return qs[:1] + cs + qs[1:]  # the first question goes first: the document's first (missing) request


def noreuse_streams(prompts: list[str]) -> list[list[dict]]:
    return [[{"kind": "completion", "prompt": p}] for p in prompts]


def one_request(client, model: str, req: dict, salt: str) -> dict:
    t0 = time.perf_counter()
    first = None
    usage = None
    extra = {"cache_salt": salt}
    if req["kind"] == "completion":
        stream = client.completions.create(model=model, prompt=req["prompt"], max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True}, extra_body=extra)
    else:
        msgs = []
        for k, part in enumerate(req["parts"]):
            msgs.append({"role": "user", "content": f"Part {k + 1} of my notes:\n{part}"})
            if k < len(req["parts"]) - 1:
                msgs.append({"role": "assistant", "content": f"Noted part {k + 1}."})
        stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True}, extra_body=extra)
    for ev in stream:
        if first is None and ev.choices:
            c = ev.choices[0]
            if getattr(c, "text", None) or getattr(getattr(c, "delta", None), "content", None):
                first = time.perf_counter()
        if ev.usage is not None:
            usage = ev.usage
    if first is None or usage is None:
        raise RuntimeError(f"a streamed {req['kind']} ended without a token or usage")
    details = usage.prompt_tokens_details
    return {"ttft": first - t0, "prompt": usage.prompt_tokens, "cached": details.cached_tokens if details else 0}


def settle(timeout_s: float = 10.0) -> None:
    """Wait (bounded) until the tier's index stops growing: the kvtier engine stores chunks in a background
    thread after each request, and that CPU work must not land inside the next arm's measurement."""
    import kvtier

    end, last = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        s = kvtier.stats()
        now = (s.get("keys"), s["warm"].get("blocks"), s["cold"].get("blocks"))
        if now == last:
            return
        last = now
        time.sleep(0.2)


def run_level(url: str, model: str, streams: list[list[dict]], clients: int, salt: str) -> dict:
    import openai

    todo: queue.Queue = queue.Queue()
    for s in streams:
        todo.put(s)
    results, errors = [], []

    def worker() -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        while True:
            try:
                stream = todo.get_nowait()
            except queue.Empty:
                return
            for req in stream:
                try:
                    results.append(one_request(c, model, req, salt))
                except Exception as e:  # noqa: BLE001 - counted and reported, never a silent figure
                    errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    wall = time.perf_counter() - t0
    if errors or not results:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:3]}")
    ttfts = sorted(r["ttft"] for r in results)
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {"n": len(results), "p50": statistics.median(ttfts), "p99": p99, "rps": len(results) / wall,
            "hit": sum(r["cached"] for r in results) / max(1, sum(r["prompt"] for r in results)), "wall": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,4,8")
    p.add_argument("--doc-tokens", type=int, default=768)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--chats", type=int, default=2)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--model", default=None)
    p.add_argument("--codec", default=None, help="the kvtier arm's codec (default: the library's, TierConfig().codec)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-cpu.md"))
    a = p.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]
    from kvtier.config import TierConfig

    a.codec = a.codec or TierConfig().codec
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from kvtier.model import hf_folder
    from ray_apps.serve import AppConfig, build_app

    load0 = os.getloadavg()[0]
    t_begin = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="kvtbench", dir="/tmp")
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"replicas": 1, "prefix_caching": False, "max_model_len": 4096, "model": a.model,
                  "tier": {"codec": a.codec, "cold_uri": str(Path(tmp) / "cold"), "warm_bytes": "1GiB",
                           "num_shards": 1, "hot_bytes": "256MiB"}, "namespace": "kvtier-bench"}
        t0 = time.perf_counter()
        for arm in ARMS:
            app = build_app({k: v for k, v in {**common, "kvtier": arm == "kvtier"}.items() if v is not None})
            serve.run(app, name=arm, route_prefix=f"/{arm}")
        started = time.perf_counter() - t0
        print(f"both apps up in {started:.0f} s", flush=True)
        import kvtier

        kvtier.init(namespace="kvtier-bench")  # joins the tier the kvtier app started (for settle())
        folder = str(hf_folder(a.model))
        tok = AutoTokenizer.from_pretrained(folder)
        model = AppConfig(model=a.model).served_name
        text = corpus()
        rows = []
        offset = 0
        for c in levels:
            n_chat_tokens = a.doc_tokens // 2
            doc, *rest = texts(tok, text, a.doc_tokens, 1, offset)
            chats = texts(tok, text, n_chat_tokens, a.chats, offset + a.doc_tokens)
            offset += a.doc_tokens + a.chats * n_chat_tokens
            shared = shared_streams(doc, chats, a.questions, a.turns)
            n = sum(len(s) for s in shared)
            unique = texts(tok, text, a.doc_tokens, n, offset)
            offset += n * a.doc_tokens
            for name, streams in (("shared prefix", shared), ("no reuse", noreuse_streams(unique))):
                # the arms take turns going first, and each starts on a settled tier
                for arm in (ARMS if (levels.index(c) + (name == "no reuse")) % 2 == 0 else ARMS[::-1]):
                    settle()
                    r = run_level(f"http://127.0.0.1:{port}/{arm}", model, streams, c, f"b{c}-{name[:2]}-{arm}")
                    rows.append({"workload": name, "clients": c, "arm": arm, **r})
                    print(f"{name:13s} clients={c} {arm:8s} n={r['n']:2d} TTFT p50 {1000 * r['p50']:7.0f} ms "
                          f"p99 {1000 * r['p99']:7.0f} ms  {r['rps']:.2f} req/s  hit {100 * r['hit']:.0f}%", flush=True)
        write(Path(a.out), rows, a, started, load0, " ".join(["python bench/serve.py", *(argv or sys.argv[1:])]),
              time.perf_counter() - t_begin)
        print(f"wrote {a.out}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def write(out: Path, rows: list[dict], a, started: float, load0: float, command: str, wall: float) -> None:
    def get(w, c, arm):
        return next(r for r in rows if (r["workload"], r["clients"], r["arm"]) == (w, c, arm))

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    md = ["# Serving benchmark (CPU): Ray Serve LLM + vLLM with kvtier vs without", "",
          f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
          f"- command: `{command}` ({wall:.0f} s in all)",
          f"- machine: {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores; 1-minute load "
          f"average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above {os.cpu_count()}, other "
          "processes shared the cores: every time is an upper bound, the ratios compare arms run alternately)",
          f"- apps: one vLLM engine each (SmolLM2-135M, fp32, CPU), vLLM prefix caching off in both; kvtier codec "
          f"`{a.codec}`; both apps up in {started:.0f} s", 
          f"- workload: shared prefix = {a.questions} questions over a {a.doc_tokens}-token document + {a.chats} chats "
          f"x {a.turns} turns; no reuse = as many distinct {a.doc_tokens}-token prompts; {MAX_TOKENS} tokens per "
          "answer, streamed; TTFT = time to the first streamed token at the client", "",
          "| workload | clients | arm | requests | TTFT p50 | TTFT p99 | req/s | hit rate (tokens) | p50 baseline / kvtier |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = get(r["workload"], r["clients"], "baseline")
        ratio = f"{base['p50'] / r['p50']:.2f}x" if r["arm"] == "kvtier" else ""
        md.append(f"| {r['workload']} | {r['clients']} | {r['arm']} | {r['n']} | {1000 * r['p50']:.0f} ms | "
                  f"{1000 * r['p99']:.0f} ms | {r['rps']:.2f} | {100 * r['hit']:.0f}% | {ratio} |")
    md += ["", "Aims: p50 TTFT with kvtier >= 3x better on the shared-prefix workload at 4 clients; no worse than "
           "1.1x (ratio >= 0.91) with no reuse."]
    for c in sorted({r["clients"] for r in rows}):
        s = get("shared prefix", c, "baseline")["p50"] / get("shared prefix", c, "kvtier")["p50"]
        n = get("no reuse", c, "baseline")["p50"] / get("no reuse", c, "kvtier")["p50"]
        md.append(f"- {c} client(s): shared prefix {s:.2f}x{' (aim met)' if c == 4 and s >= 3 else ''}; "
                  f"no reuse {n:.2f}x{' (within 1.1x)' if n >= 1 / 1.1 else ' (slower than 1.1x)'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
