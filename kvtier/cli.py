"""The ``kvtier`` command line: a thin dispatcher to each command's own module.

    kvtier demo     the main job: an embedded tier under two vLLM engines, against recompute (ray_apps.demo)
    kvtier serve    Ray Serve LLM with vLLM engines on kvtier's connector (ray_apps.serve)
    kvtier start    start (or join) a tier on a Ray cluster and keep it running (kvtier.runtime.start)
    kvtier status   print the tiers and shards of a running tier (kvtier.runtime.status)
    kvtier bench    run a benchmark from bench/ (the names of its scripts: quality, e2e, vllm_ttft, serve, ...)

Each command's module has ``main(argv: list[str]) -> int``; imports are lazy so
``kvtier --help`` starts in well under a second and never imports Ray or torch.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys

COMMANDS = {
    "demo": ("ray_apps.demo", "run the main job: two vLLM engines sharing an embedded tier, against recompute"),
    "serve": ("ray_apps.serve", "start the OpenAI API on Ray Serve LLM (vLLM engines with kvtier's connector)"),
    "start": ("kvtier.runtime.start", "start or join a tier on a Ray cluster and keep it running"),
    "status": ("kvtier.runtime.status", "print tiers and shards of a running tier (--json for scripts)"),
    "bench": (None, "run a benchmark from bench/: kvtier bench NAME [args] (NAME: a script there, e.g. quality, e2e, vllm_ttft, serve)"),
}


def _usage() -> str:
    lines = ["usage: kvtier <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _bench(argv: list[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = sorted(f[:-3] for f in os.listdir(os.path.join(root, "bench")) if f.endswith(".py") and not f.startswith("_")) \
        if os.path.isdir(os.path.join(root, "bench")) else []
    if not argv or argv[0] not in names:
        print(f"usage: kvtier bench {{{','.join(names)}}} [args]", file=sys.stderr)
        return 2
    sys.argv = [f"bench/{argv[0]}.py", *argv[1:]]
    runpy.run_path(os.path.join(root, "bench", f"{argv[0]}.py"), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"kvtier: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if cmd == "bench":
        return _bench(rest)
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
