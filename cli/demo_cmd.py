"""`satset demo`: the whole stack on embedded defaults, one pending order, and where to look."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from stack.demo import Demo, demo_study


def demo(
    once: Annotated[
        bool, typer.Option("--once", help="Exit when the order is done (0) or dead (1); for scripts.")
    ] = False,
    state_dir: Annotated[Path, typer.Option(help="Where the demo keeps its databases and logs.")] = Path("var/demo"),
) -> None:
    """Start Orthanc, the SATUSEHAT simulator, a Prefect server, `satset serve` and the HIS API on 127.0.0.1, load a
    generated study and a pending batch4 order, let the poller take it, and print the FHIR ids and the links."""

    def say(line: str) -> None:
        typer.echo(line)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Demo(state_dir.resolve(), say) as stack:
        stack.start()
        outcome = stack.run_order(demo_study())
        typer.echo("\n" + stack.describe(outcome) + "\n")
        if once:
            raise typer.Exit(0 if outcome.status == "done" else 1)
        typer.echo("The stack stays up; Ctrl-C stops it.")
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
