"""One command for the gateway's benchmarks: `python -m bench NAME`, NAME one of routing, memory, concurrency,
profile, backlog, overhead, receiver or all.

Each prints its tables (Markdown, as in bench/RESULTS.md) and writes raw figures to bench/results/<name>.json.
`--quick` is a smoke run (one round, base sizes only) to check that everything works; the figures in
RESULTS.md come from the full run (`python -m bench all`, about 35 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "benchmark", choices=["routing", "memory", "concurrency", "profile", "backlog", "overhead", "receiver", "all"]
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="rounds per method (default: 5 routing, 9 overhead, 5 receiver, 3 others)",
    )
    parser.add_argument("--quick", action="store_true", help="one round, base sizes only: a smoke run")
    args = parser.parse_args(argv)

    from bench import common
    from stack.prefect_server import PrefectServer

    everything = ["routing", "memory", "concurrency", "profile", "backlog", "overhead", "receiver"]
    chosen = everything if args.benchmark == "all" else [args.benchmark]
    with ExitStack() as exits, common._signals_unwind():
        started: list[PrefectServer] = []

        def shared_server() -> PrefectServer:
            """The SQLite Prefect server routing, memory and overhead share, started when the first needs it."""
            if not started:
                common.log("bench: starting a Prefect server on 127.0.0.1")
                started.append(exits.enter_context(PrefectServer()))
            return started[0]

        for name in chosen:
            if name == "routing":
                from bench import routing

                routing.run(
                    runs=1 if args.quick else (args.runs or 5),
                    sizes=(300,) if args.quick else (300, 600),
                    large_pdu=not args.quick,
                    prefect_server=shared_server(),
                )
            elif name == "memory":
                from bench import memory

                memory.run(
                    runs=1 if args.quick else (args.runs or 3),
                    sizes=(2000,) if args.quick else (2000, 4000),
                    prefect_server=shared_server(),
                )
            elif name == "concurrency":
                from bench import concurrency

                concurrency.run(
                    runs=1 if args.quick else (args.runs or 3),
                    sizes=(300,) if args.quick else (300, 600),
                    # On PostgreSQL it starts a server of its own; the shared one only if already running.
                    prefect_server=started[0] if started else None,
                )
            elif name == "profile":
                from bench import profiling

                profiling.run(rounds=2 if args.quick else 5)
            elif name == "backlog":
                from bench import backlog

                # Its own Prefect server, on PostgreSQL when there is one (see bench/backlog.py).
                backlog.run(
                    runs=1 if args.quick else (args.runs or 3),
                    sizes=(50,) if args.quick else (250, 500),
                    baseline_sample=3 if args.quick else backlog.BASELINE_SAMPLE,
                    flow_orders=20 if args.quick else backlog.BASELINE_FLOW_ORDERS,
                )
            elif name == "overhead":
                from bench import overhead

                overhead.run(runs=2 if args.quick else (args.runs or 9), prefect_server=shared_server())
            elif name == "receiver":
                from bench import receiver

                receiver.run(runs=2 if args.quick else (args.runs or 5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
