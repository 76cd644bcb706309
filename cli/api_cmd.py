"""`satset api [--host H] [--port P]`: serve the HIS API (the existing gateway's endpoints) with uvicorn.

It binds 127.0.0.1 unless API_HOST or --host say otherwise: exposing it to the hospital network is a decision,
taken with a credential configured (the API refuses to start without one unless API_AUTH_DISABLED=true).
Like `satset serve`, it refuses to start without PREFECT_API_URL: Prefect would otherwise run every call's flow
on a temporary server of its own, whose history dies with the process and which outlived it when stopped.
"""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from models.settings import ApiSettings, SettingsError, load_settings


def api(
    host: Annotated[
        str | None, typer.Option("--host", help="Address to bind (default API_HOST, else 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=0, max=65535, help="Port (default API_PORT, else 8080; 0: any free).")
    ] = None,
) -> None:
    """Serve the HIS API: /api/satset/..., /api/dicom/process, docs at /api/docs. Each call is a Prefect flow run."""
    import uvicorn

    from api.app import create_app
    from deployments.serve import ServeError, prefect_api_url

    try:
        settings = load_settings(ApiSettings)
        load_settings()  # the gateway's own settings: refuse now rather than at the HIS's first call
        prefect_api_url()
        app = create_app(settings)
    except (SettingsError, ServeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    host = host or settings.api_host
    try:
        listener = _bind(host, settings.api_port if port is None else port)
    except OSError as error:
        typer.echo(f"error: cannot listen on {host}:{port or settings.api_port}: {error.strerror}", err=True)
        raise typer.Exit(1) from None
    base = _base_url(listener)
    typer.echo(f"HIS API on {base}/api/satset/ (docs: {base}/api/docs)")
    config = uvicorn.Config(app, log_level="info", server_header=False, proxy_headers=True)
    uvicorn.Server(config).run(sockets=[listener])


def _bind(host: str, port: int) -> socket.socket:
    """Listen before uvicorn starts, so the URL printed carries the real port (also for --port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def _base_url(listener: socket.socket) -> str:
    address, port = listener.getsockname()[:2]
    shown = f"[{address}]" if ":" in address else address
    return f"http://{shown}:{port}"
