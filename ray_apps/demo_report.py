"""What ``kvtier demo`` records, prints and writes: ``Row`` (one measured
request), the per-request table, the summary with tier statistics,
``report.md``, ``ttft.png`` and ``results.json``.

Every figure comes from a ``Row`` measured by ``ray_apps.demo`` or from the
workers' ``stats()`` at the end of the run; nothing here measures or runs anything.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

@dataclass
class Row:
    """One measured request."""

    name: str
    prompt_tokens: int
    tier_tokens: int
    prefill_from: dict[str, int]
    decode_from: dict[str, int]
    handoff_chunks: int
    ttft_ms: float
    recompute_ms: float
    decode_tps: float
    ratio: float | None
    tokens: list[int] = field(default_factory=list)
    recompute_tokens: list[int] = field(default_factory=list)
    text: str = ""
    transport: str | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)  # where the kvtier TTFT went (results.json)

    @property
    def agree(self) -> tuple[int, int]:
        """(greedy tokens identical to recompute's before the first difference, tokens generated):
        after a difference the two continue from different text, so later matches mean little."""
        same = 0
        for a, b in zip(self.tokens, self.recompute_tokens):
            if a != b:
                break
            same += 1
        return same, max(len(self.tokens), len(self.recompute_tokens))



COLUMNS = (("#", 2), ("request", 22), ("prompt", 6), ("from tier", 9), ("prefill read", 12), ("decode read", 12),
           ("handoff", 7), ("TTFT kvtier", 11), ("recompute", 9), ("speedup", 7), ("tok/s", 6), ("ratio", 6),
           ("agree", 7))
NOTES = ("prompt: prompt tokens; from tier: prompt tokens whose KV came from kvtier instead of being computed; "
         "prefill/decode read: chunks each worker read from the hot (h), warm (w) and cold (c) tier; "
         "handoff: new chunks the prefill worker computed and handed to the decode worker through the transfer; "
         "TTFT kvtier: prefill call + decode call until the first token, as the client sees it; recompute: a full "
         "prefill of the same tokens with no cache in the decode worker's process, then its first token; "
         "tok/s: decode tokens per second after the first; ratio: raw KV bytes (in the model's dtype: fp32 on CPU, "
         "so twice a bf16 ratio) / stored block bytes of the chunks put by this request, every header and scale "
         "counted; agree: greedy tokens identical to recompute's up to the first difference.")


def _src(d: dict[str, int]) -> str:
    return " ".join(f"{d[k]}{k[0]}" for k in ("hot", "warm", "cold") if d.get(k)) or "-"


def _cells(i: int, r) -> list[str]:
    same, n = r.agree
    return [str(i), r.name, str(r.prompt_tokens), str(r.tier_tokens), _src(r.prefill_from), _src(r.decode_from),
            str(r.handoff_chunks), f"{r.ttft_ms:.0f} ms", f"{r.recompute_ms:.0f} ms",
            f"{r.recompute_ms / r.ttft_ms:.1f}x", "-" if math.isnan(r.decode_tps) else f"{r.decode_tps:.1f}",
            "-" if r.ratio is None else f"{r.ratio:.1f}x", f"{same}/{n}"]


def header() -> str:
    line = "  ".join(f"{name:>{w}}" if k not in (1,) else f"{name:<{w}}" for k, (name, w) in enumerate(COLUMNS))
    return line + "\n" + "-" * len(line)


def row_line(i: int, r) -> str:
    return "  ".join(f"{c:>{w}}" if k != 1 else f"{c:<{w}}" for k, (c, (_, w)) in enumerate(zip(_cells(i, r), COLUMNS)))


def _tier_rows(p: dict, d: dict) -> list[list[str]]:
    def size(n: Any) -> str:
        return "-" if not isinstance(n, (int, float)) else f"{n / 2**20:.1f} MiB"

    out = []
    for name, s in (("hot (prefill)", p["tier"]["hot"]), ("hot (decode)", d["tier"]["hot"]),
                    ("warm", d["tier"]["warm"]), ("cold", d["tier"]["cold"])):
        cap = s.get("capacity_bytes")
        out.append([name, str(s.get("blocks", "-")), size(s.get("bytes")),
                    "unbounded" if name == "cold" and not cap else size(cap), str(s.get("hits", "-")),
                    str(s.get("misses", "-")), str(s.get("evictions", "-")), str(s.get("demotions", "-"))])
    return out


TIER_COLUMNS = ("tier", "blocks", "bytes", "capacity", "hits", "misses", "evictions", "demotions")


def summarize(rows: list, p: dict, d: dict, codec: str, base: tuple[dict, dict] | None = None) -> str:
    """The summary under the table; ``base``: the workers' stats before the workload (after the warm-up)."""
    hits = [r for r in rows if r.tier_tokens > 0]
    served, total = sum(r.tier_tokens for r in rows), sum(r.prompt_tokens for r in rows)
    same = sum(r.agree[0] for r in rows)
    n = sum(r.agree[1] for r in rows)
    exact = sum(r.agree[0] == r.agree[1] for r in rows)
    lines = ["", f"requests: {len(rows)}, with tier hits: {len(hits)}; prompt tokens served from the tier: "
             f"{served} of {total} ({100 * served / max(total, 1):.0f}%)"]
    if hits:
        k, rc = statistics.median(r.ttft_ms for r in hits), statistics.median(r.recompute_ms for r in hits)
        sp = statistics.median(r.recompute_ms / r.ttft_ms for r in hits)
        lines.append(f"time to first token on hits: median {k:.0f} ms with kvtier vs {rc:.0f} ms recompute "
                     f"(median speedup {sp:.1f}x)")
    misses = [r for r in rows if r.tier_tokens == 0]
    if misses:
        lines.append(f"misses (nothing cached yet): median {statistics.median(r.ttft_ms for r in misses):.0f} ms with "
                     f"kvtier vs {statistics.median(r.recompute_ms for r in misses):.0f} ms recompute "
                     "(the kvtier path also compresses, stores and hands over the new chunks)")
    kind = "exact codec: must be identical" if codec == "none" else "lossy codec; --codec none gives exact output"
    lines.append(f"greedy agreement with recompute (codec {codec}, {kind}): {exact}/{len(rows)} requests identical; "
                 f"{same}/{n} tokens identical before the first difference ({100 * same / max(n, 1):.0f}%)")
    def moved(who: int, key: str) -> int:
        now = (p, d)[who].get("transfer", {}).get(key, 0)
        return now - (base[who].get("transfer", {}).get(key, 0) if base else 0)

    lines.append(f"handoff: {p.get('transfer', {}).get('transport')}: {moved(0, 'published_blocks')} blocks, "
                 f"{moved(0, 'published_bytes') / 2**20:.1f} MiB published by prefill; "
                 f"{moved(1, 'pulled_blocks')} pulled by decode, {moved(1, 'missed_blocks')} missed")
    load = load_average()
    if load != "n/a" and float(load) > (os.cpu_count() or 1):
        lines.append(f"note: 1-minute load average {load} on {os.cpu_count()} cores: other processes shared the CPU, "
                     "so every time above is an upper bound")
    lines.append("tier statistics at the end (kvtier.stats() of each worker; warm and cold are shared; "
                 "counters include the warm-up request):")
    table = [list(TIER_COLUMNS)] + _tier_rows(p, d)
    widths = [max(len(r[i]) for r in table) for i in range(len(TIER_COLUMNS))]
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in table]
    return "\n".join(lines)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def load_average() -> str:
    """The 1-minute load average (on 2 cores, above ~2 other processes share the cores: times are upper bounds)."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def write(out: Path, rows: list, p: dict, d: dict, summary: str, meta: dict[str, Any]) -> list[Path]:
    """report.md, ttft.png, results.json in ``out``; returns their paths."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    md = ["# kvtier demo", "", f"- date: {now}", f"- command: `{meta['command']}`", f"- machine: {_machine()}",
          f"- model: `{meta['model_id']}`; {meta['threads']} torch threads per worker",
          f"- tier: codec `{meta['codec']}`, {meta['chunk_tokens']}-token chunks of {meta['block_bytes'] / 2**20:.2f} "
          f"MiB; hot {meta['tier']['hot_bytes'] / 2**20:.1f} MiB per worker, warm "
          f"{meta['tier']['warm_bytes'] / 2**20:.1f} MiB over {meta['tier']['num_shards']} shards, cold "
          f"`{meta['tier']['cold_uri']}` (removed at the end); handoff transport `{meta['transport']}`",
          f"- text: {meta['text']}",
          f"- whole run: {meta['wall_s']:.0f} s; 1-minute load average {meta['load_start']} at the start, "
          f"{load_average()} at the end ({os.cpu_count()} cores: above that, other processes shared the cores "
          "and every time is an upper bound)", "",
          "## Requests", "", "| " + " | ".join(n for n, _ in COLUMNS) + " |",
          "|" + "|".join("---" if i == 1 else "---:" for i in range(len(COLUMNS))) + "|"]
    md += ["| " + " | ".join(_cells(i, r)) + " |" for i, r in enumerate(rows, 1)]
    md += ["", NOTES, "", "## Summary", "", "```", summary.strip(), "```", "", "## Replies (kvtier path)", ""]
    md += [f"- {r.name}: {r.text.strip()!r}" for r in rows]
    paths = [out / "report.md", out / "ttft.png", out / "results.json"]
    paths[0].write_text("\n".join(md) + "\n")
    plot(rows, paths[1], meta)
    paths[2].write_text(json.dumps({"meta": meta, "rows": [dict(r.__dict__, agree=list(r.agree)) for r in rows]},
                                   indent=1, default=str) + "\n")
    return paths


def plot(rows: list, path: Path, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    hit = [r for r in rows if r.tier_tokens > 0]
    miss = [r for r in rows if r.tier_tokens == 0]
    for r in rows:  # each request's two measurements, joined
        ax.plot([r.prompt_tokens] * 2, [r.ttft_ms, r.recompute_ms], color="0.75", lw=1, zorder=0)
    ax.scatter([r.prompt_tokens for r in rows], [r.recompute_ms for r in rows], marker="x", color="tab:red",
               label="plain recompute (full prefill)")
    if hit:
        ax.scatter([r.prompt_tokens for r in hit], [r.ttft_ms for r in hit], color="tab:blue",
                   label="kvtier, prefix from the tier")
    if miss:
        ax.scatter([r.prompt_tokens for r in miss], [r.ttft_ms for r in miss], facecolors="none",
                   edgecolors="tab:blue", label="kvtier, miss (computes and stores)")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"kvtier demo: {meta['model_id'].split('|')[0]}, codec {meta['codec']}, "
                 f"{meta['chunk_tokens']}-token chunks")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
