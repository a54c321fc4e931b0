"""``kvtier start``: start (or join) the tier on a Ray cluster and keep watching it.

    kvtier start [--address auto] [--namespace kvtier] [--config tier.json] [--once]

Creates the named, detached controller (which creates the warm shards) if it is
absent, prints the tier, and then stays in the foreground checking the
controller every ``--interval`` seconds, so a container can run it as its main
loop (the Helm chart restarts it when it exits). The actors are detached: when
this command exits, the tier keeps running. ``--once`` exits after the start.
The config comes from ``--config``, else ``$KVTIER_CONFIG``, else the defaults;
a running tier keeps its own config.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from kvtier.config import TierConfig, format_size
from kvtier.runtime.names import DEFAULT_NAMESPACE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier start", description="start or join a kvtier tier on a Ray cluster")
    p.add_argument("--address", default="auto", help="Ray address to join (default: auto = the local cluster)")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Ray namespace of the tier's actors")
    p.add_argument("--config", default=None, help="JSON file of TierConfig fields (default: $KVTIER_CONFIG)")
    p.add_argument("--once", action="store_true", help="exit after the tier is up instead of watching it")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between health checks (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = TierConfig.from_file(args.config) if args.config else TierConfig.from_env()
    except ValueError as e:
        print(f"kvtier start: bad config: {e}", file=sys.stderr)
        return 2
    from kvtier.runtime import api

    from kvtier.runtime.status import check_reachable, no_ray_message

    try:
        check_reachable(args.address)
        info = api.init(address=args.address, namespace=args.namespace, config=cfg)
    except ConnectionError as e:
        print(no_ray_message("start", args.address, e), file=sys.stderr)
        return 1
    c = info["config"]
    print(f"kvtier: tier up in namespace {info['namespace']!r}: {len(info['shards'])} warm shards of "
          f"{format_size(c['warm_bytes'] // c['num_shards'])}, cold {c['cold_uri'] or '(none)'}", flush=True)
    print(json.dumps(info["shards"]), flush=True)
    if args.once:
        api.shutdown(stop=False)
        return 0
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    failures = 0
    try:
        while not stopping:
            time.sleep(args.interval)
            st = api.stats()
            if "error" in st.get("controller", {}):
                failures += 1
                print(f"kvtier: controller did not answer ({failures} in a row)", file=sys.stderr, flush=True)
                if failures >= 6:  # a minute of silence: exit so the supervisor starts us again
                    return 1
            else:
                failures = 0
    except KeyboardInterrupt:
        pass
    finally:
        api.shutdown(stop=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
