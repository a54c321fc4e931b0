"""``kvtier status``: print the tiers and shards of a running tier.

    kvtier status [--address auto] [--namespace kvtier] [--json]

Joins the cluster and asks the controller for its stats; never creates a
tier (exit status 1 when none runs in the namespace). ``--json`` prints the
same dict as ``kvtier.stats()`` minus this process's (empty) hot tier.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvtier.config import format_size
from kvtier.runtime.names import CONTROLLER, DEFAULT_NAMESPACE


def render(st: dict) -> str:
    lines = [f"{'tier':<6} {'blocks':>8} {'bytes':>12} {'capacity':>12} {'hits':>9} {'misses':>9} {'evictions':>9}"]
    for tier in ("warm", "cold"):
        t = st.get(tier, {})
        cap = t.get("capacity_bytes", 0)
        lines.append(f"{tier:<6} {t.get('blocks', 0):>8} {format_size(t.get('bytes', 0)):>12} "
                     f"{format_size(cap) if cap else 'unbounded':>12} {t.get('hits', 0):>9} {t.get('misses', 0):>9} "
                     f"{t.get('evictions', 0):>9}")
    lines.append("")
    lines.append(f"{'shard':<16} {'alive':<6} {'blocks':>8} {'bytes':>12} {'capacity':>12}  node")
    for s in st.get("shards", []):
        lines.append(f"{s.get('id', '?'):<16} {str(s.get('alive')):<6} {s.get('blocks', 0):>8} "
                     f"{format_size(s.get('bytes', 0)):>12} {format_size(s.get('capacity_bytes', 0)):>12}  "
                     f"{(s.get('node_id') or '?')[:16]}")
    c = st.get("controller", {})
    lines.append("")
    lines.append(f"controller: namespace {c.get('namespace')!r}, up {c.get('uptime_s', 0):.0f} s, errors {c.get('errors', 0)}, "
                 f"keys {st.get('keys', 0)}, leases {st.get('leases', 0)}")
    return "\n".join(lines)


def check_reachable(address: str) -> None:
    """Raise ConnectionError fast when ``host:port`` does not accept connections: ray.init waits
    minutes on a dead address (measured: >120 s for 127.0.0.1:1) before it gives up."""
    import socket

    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2.0).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"{address}: {e}") from None


def no_ray_message(cmd: str, address: str, e: Exception) -> str:
    """One line for a command run where no Ray cluster answers (instead of Ray's traceback)."""
    where = "no running Ray cluster found" if address == "auto" else f"no Ray cluster answers at {address!r}"
    return (f"kvtier {cmd}: {where} ({type(e).__name__}); start one (`ray start --head`), pass --address "
            "host:port, or use `kvtier demo` / kvtier.init() for an embedded tier")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvtier status", description="print the tiers and shards of a running tier")
    p.add_argument("--address", default="auto")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            check_reachable(args.address)
            ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
        except ConnectionError as e:
            print(no_ray_message("status", args.address, e), file=sys.stderr)
            return 1
    try:
        try:
            controller = ray.get_actor(CONTROLLER, namespace=args.namespace)
        except ValueError:
            print(f"kvtier status: no tier runs in namespace {args.namespace!r} (start one with `kvtier start`)",
                  file=sys.stderr)
            return 1
        try:
            st = ray.get(controller.stats.remote(), timeout=args.timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            print(f"kvtier status: the controller did not answer within {args.timeout}s ({type(e).__name__})",
                  file=sys.stderr)
            return 1
        print(json.dumps(st, indent=2, default=str) if args.json else render(st))
        return 0
    finally:
        if started:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
