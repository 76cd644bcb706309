"""`satset serve`: every gateway deployment served from this process, for a gateway on one host."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from deployments.serve import DEFAULT_LIMIT, ServeError, serve_gateway
from models.settings import SettingsError, load_settings


def serve(
    limit: Annotated[
        int, typer.Option("--limit", min=1, envvar="SATSET_SERVE_LIMIT", help="Flow runs at once on this host.")
    ] = DEFAULT_LIMIT,
    poll_interval: Annotated[
        int | None,
        typer.Option("--poll-interval", min=1, metavar="SECONDS", help="The RIS poller's period (default 60 s)."),
    ] = None,
) -> None:
    """Serve all deployments (batch1-4, dicom-process, single resources, poll-ris) until Ctrl-C.

    Needs PREFECT_API_URL (a running Prefect server) and the gateway's settings, checked before anything starts.
    """
    try:
        load_settings()
    except SettingsError as error:
        _fail(str(error))
    try:
        serve_gateway(limit=limit, poll_interval_s=poll_interval, echo=typer.echo)
    except ServeError as error:
        _fail(str(error))


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
