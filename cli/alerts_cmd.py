"""`satset alerts install / list / remove`: the gateway's Prefect automations (deployments/automations.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, NoReturn

import typer

from deployments.automations import (
    DEFAULT_BLOCK_NAME,
    DEFAULT_POLL_SILENCE,
    AlertsError,
    find_notification_block,
    gateway_automations,
    install_alerts,
    installed_alerts,
    parse_block_reference,
    remove_alerts,
    save_webhook_block,
)

app = typer.Typer(
    help="Alerts as Prefect automations: dead orders, failed batches, a silent poller, a late ImagingStudy."
)


@app.command("install")
def install(
    webhook_url: Annotated[
        str | None,
        typer.Option(
            "--webhook-url",
            envvar="SATSET_ALERT_WEBHOOK_URL",
            help=f"Make (or update) a Custom Webhook block '{DEFAULT_BLOCK_NAME}' POSTing JSON {{subject, body}} here.",
        ),
    ] = None,
    block: Annotated[
        str | None,
        typer.Option(
            "--block",
            metavar="SLUG/NAME",
            help="Notify through an existing notification block instead, e.g. slack-webhook/radiology.",
        ),
    ] = None,
    poll_silence_minutes: Annotated[
        int,
        typer.Option("--poll-silence-minutes", min=1, help="Alert when no poll-ris run completed for this long."),
    ] = int(DEFAULT_POLL_SILENCE.total_seconds() // 60),
) -> None:
    """Create the four automations, or update them in place if they exist (running it again adds nothing).

    Needs PREFECT_API_URL. Give exactly one of --webhook-url and --block.
    """
    from prefect.client.orchestration import get_client

    if (webhook_url is None) == (block is None):
        _fail("give exactly one of --webhook-url URL and --block SLUG/NAME")
    try:
        if block is not None:
            parse_block_reference(block)
    except AlertsError as error:
        _fail(str(error))
    _require_api_url()
    try:
        with get_client(sync_client=True) as client:
            if webhook_url is not None:
                block_id = save_webhook_block(webhook_url)
                typer.echo(f"notification block custom-webhook/{DEFAULT_BLOCK_NAME} saved")
            else:
                assert block is not None
                block_id = find_notification_block(client, block)
            automations = gateway_automations(block_id, timedelta(minutes=poll_silence_minutes))
            for item in install_alerts(automations, client):
                typer.echo(f"{item.action:<8} {item.name}  ({item.id})")
    except AlertsError as error:
        _fail(str(error))
    except Exception as error:  # the Prefect API down or unset: one sentence, not a traceback
        _fail(f"the Prefect API at PREFECT_API_URL could not be used: {type(error).__name__}: {error}")


@app.command("list")
def list_() -> None:
    """The gateway's automations on this Prefect server."""
    from prefect.client.orchestration import get_client

    _require_api_url()
    try:
        with get_client(sync_client=True) as client:
            found = installed_alerts(client)
    except Exception as error:
        _fail(f"the Prefect API at PREFECT_API_URL could not be used: {type(error).__name__}: {error}")
    for name, automation_id, enabled in found:
        typer.echo(f"{'on' if enabled else 'off':<4} {name}  ({automation_id})")
    if not found:
        typer.echo("no satset alerts installed: satset alerts install --webhook-url URL")


@app.command("remove")
def remove() -> None:
    """Delete the gateway's automations (the notification block stays)."""
    from prefect.client.orchestration import get_client

    _require_api_url()
    try:
        with get_client(sync_client=True) as client:
            removed = remove_alerts(client)
    except Exception as error:
        _fail(f"the Prefect API at PREFECT_API_URL could not be used: {type(error).__name__}: {error}")
    for name in removed:
        typer.echo(f"removed  {name}")


def _require_api_url() -> None:
    """Automations live on the server the gateway runs against: never on a temporary one Prefect would start."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail("PREFECT_API_URL is not set: the alerts are installed on the Prefect server the gateway uses")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
