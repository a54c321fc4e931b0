"""What ``kvtier demo`` records, prints and writes: ``Row`` (one measured
request), the per-request table, the summary with tier statistics,
``report.md``, ``ttft.png`` and ``results.json``.

Every figure comes from a ``Row`` measured by ``ray_apps.demo`` or from the
tier's ``kvtier.stats()`` at the end of the run; nothing here measures or runs anything.
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
    engine: str                 # the kvtier engine that served it ("A" or "B")
    prompt_tokens: int
    tier_tokens: int            # prompt tokens whose KV came from kvtier (vLLM's own prefix cache is off)
    read_from: dict[str, int]   # shared-tier block reads during the request: {"warm": n, "cold": n}
    ttft_ms: float
    recompute_ms: float
    decode_tps: float
    tokens: list[int] = field(default_factory=list)
    recompute_tokens: list[int] = field(default_factory=list)
    text: str = ""
    phases: dict = field(default_factory=dict)  # per run ("kvtier", "recompute"): queue_ms, first_step_ms

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


COLUMNS = (("#", 2), ("request", 22), ("engine", 6), ("prompt", 6), ("from tier", 9), ("tier reads", 10),
           ("TTFT kvtier", 11), ("recompute", 9), ("speedup", 7), ("tok/s", 6), ("agree", 7))
NOTES = ("engine: the vLLM engine with kvtier's connector that served the request (A and B alternate, so a "
         "prefix computed on one is reused by the other through the tier); prompt: prompt tokens; from tier: "
         "prompt tokens whose KV vLLM loaded from kvtier instead of computing (vLLM's own prefix cache is off); "
         "tier reads: blocks read from the shared warm (w) and cold (c) tiers during the request (reads from an "
         "engine's own hot tier are not counted here); TTFT kvtier: vLLM's arrival-to-first-token time on that "
         "engine; recompute: the same request just before on the same engine with the connector off for it (no lookup, "
         "load or save), so vLLM computes the whole prompt; tok/s: decode tokens per second after the first; agree: greedy tokens identical to "
         "recompute's up to the first difference.")


def _src(d: dict[str, int]) -> str:
    return " ".join(f"{d[k]}{k[0]}" for k in ("hot", "warm", "cold") if d.get(k)) or "-"


def _cells(i: int, r) -> list[str]:
    same, n = r.agree
    return [str(i), r.name, r.engine, str(r.prompt_tokens), str(r.tier_tokens), _src(r.read_from),
            f"{r.ttft_ms:.0f} ms", f"{r.recompute_ms:.0f} ms", f"{r.recompute_ms / r.ttft_ms:.1f}x",
            "-" if math.isnan(r.decode_tps) else f"{r.decode_tps:.1f}", f"{same}/{n}"]


def header() -> str:
    line = "  ".join(f"{name:>{w}}" if k not in (1,) else f"{name:<{w}}" for k, (name, w) in enumerate(COLUMNS))
    return line + "\n" + "-" * len(line)


def row_line(i: int, r) -> str:
    return "  ".join(f"{c:>{w}}" if k != 1 else f"{c:<{w}}" for k, (c, (_, w)) in enumerate(zip(_cells(i, r), COLUMNS)))


TIER_COLUMNS = ("tier", "blocks", "bytes", "capacity", "hits", "misses", "evictions", "demotions")


def _tier_rows(st: dict) -> list[list[str]]:
    def size(n: Any) -> str:
        return "-" if not isinstance(n, (int, float)) else f"{n / 2**20:.1f} MiB"

    out = []
    for name in ("warm", "cold"):
        s = st[name]
        cap = s.get("capacity_bytes")
        out.append([name, str(s.get("blocks", "-")), size(s.get("bytes")),
                    "unbounded" if name == "cold" and not cap else size(cap), str(s.get("hits", "-")),
                    str(s.get("misses", "-")), str(s.get("evictions", "-")), str(s.get("demotions", "-"))])
    return out


def summarize(rows: list, stats: dict, codec: str, raw_block: int, times: dict[str, float]) -> str:
    """The summary under the table: hits, TTFT, agreement, the tier and codec, where the time went."""
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
        k, rc = (statistics.median(r.ttft_ms for r in misses), statistics.median(r.recompute_ms for r in misses))
        lines.append(f"misses (nothing cached yet): median {k:.0f} ms with kvtier vs {rc:.0f} ms recompute "
                     f"({100 * (k / rc - 1):+.0f}%: the kvtier engine also looks up, copies out and stores the chunks)")
        if all(r.phases for r in misses):
            def med(run, part):
                return statistics.median(r.phases[run][part] for r in misses)

            lines.append(f"  of which waiting to be scheduled (kvtier's lookup is here) {med('kvtier', 'queue_ms'):.0f} vs "
                         f"{med('recompute', 'queue_ms'):.0f} ms, the first step (forward, kvtier's page copy-out) "
                         f"{med('kvtier', 'first_step_ms'):.0f} vs {med('recompute', 'first_step_ms'):.0f} ms")
    kind = "exact codec: must be identical" if codec == "none" else "lossy codec; --codec none gives exact output"
    lines.append(f"greedy agreement with recompute (codec {codec}, {kind}): {exact}/{len(rows)} requests identical; "
                 f"{same}/{n} tokens identical before the first difference ({100 * same / max(n, 1):.0f}%)")
    w = stats["warm"]
    if w.get("blocks"):
        per = w["bytes"] / w["blocks"]
        lines.append(f"codec {codec}: {per / 2**20:.2f} MiB per stored block vs {raw_block / 2**20:.2f} MiB of fp32 KV "
                     f"({raw_block / per:.1f}x; every header and scale counted)")
    spent = ", ".join(f"{k} {v:.1f} s" for k, v in times.items() if k != "total")
    lines.append(f"where the time went: {spent}; total {times.get('total', 0):.0f} s")
    load = load_average()
    if load != "n/a" and float(load) > (os.cpu_count() or 1):
        lines.append(f"note: 1-minute load average {load} on {os.cpu_count()} cores: other processes shared the CPU, "
                     "so every time above is an upper bound")
    lines.append("shared tier statistics at the end (kvtier.stats(); counters include the warm-up requests):")
    table = [list(TIER_COLUMNS)] + _tier_rows(stats)
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


def write(out: Path, rows: list, stats: dict, summary: str, meta: dict[str, Any]) -> list[Path]:
    """report.md, ttft.png, results.json in ``out``; returns their paths."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    md = ["# kvtier demo", "", f"- date: {now}", f"- command: `{meta['command']}`", f"- machine: {_machine()}",
          f"- model: `{meta['model']}` on {meta['engine']} (CPU, fp32, vLLM prefix caching off)",
          f"- tier: codec `{meta['codec']}`, {meta['chunk_tokens']}-token chunks of {meta['block_bytes'] / 2**20:.2f} "
          f"MiB; hot {meta['tier']['hot_bytes'] / 2**20:.1f} MiB per engine process, warm "
          f"{meta['tier']['warm_bytes'] / 2**20:.1f} MiB over {meta['tier']['num_shards']} shards, cold "
          f"`{meta['tier']['cold_uri']}` (removed at the end)",
          f"- text: {meta['text']}",
          f"- whole run: {meta['wall_s']:.0f} s; 1-minute load average {meta['load_start']} at the start, "
          f"{load_average()} at the end ({os.cpu_count()} cores: above that, other processes shared the cores "
          "and every time is an upper bound)", "",
          "## Requests", "", "| " + " | ".join(n for n, _ in COLUMNS) + " |",
          "|" + "|".join("---" if i == 1 else "---:" for i in range(len(COLUMNS))) + "|"]
    md += ["| " + " | ".join(_cells(i, r)) + " |" for i, r in enumerate(rows, 1)]
    md += ["", NOTES, "", "## Summary", "", "```", summary.strip(), "```", "", "## Replies (kvtier engines)", ""]
    md += [f"- {r.name}: {r.text.strip()!r}" for r in rows]
    paths = [out / "report.md", out / "ttft.png", out / "results.json"]
    paths[0].write_text("\n".join(md) + "\n")
    plot(rows, paths[1], meta)
    paths[2].write_text(json.dumps({"meta": meta, "tier_stats": stats,
                                    "rows": [dict(r.__dict__, agree=list(r.agree)) for r in rows]},
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
               label="plain vLLM recompute (full prefill)")
    if hit:
        ax.scatter([r.prompt_tokens for r in hit], [r.ttft_ms for r in hit], color="tab:blue",
                   label="kvtier, prefix from the tier")
    if miss:
        ax.scatter([r.prompt_tokens for r in miss], [r.ttft_ms for r in miss], facecolors="none",
                   edgecolors="tab:blue", label="kvtier, miss (computes and stores)")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"kvtier demo on vLLM: {Path(meta['model']).name.split('.')[0]}, codec {meta['codec']}, "
                 f"{meta['chunk_tokens']}-token chunks")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
