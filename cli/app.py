"""`satset`: the gateway's one command. Each subcommand wires a layer to the terminal and nothing more."""

from __future__ import annotations

import typer

from cli import alerts_cmd, api_cmd, check_cmd, demo_cmd, orders_cmd, run_cmd, serve_cmd, simulator_cmd
from clients.log_file import attach_log_file
from models.settings import LogSettings, SettingsError, load_settings

app = typer.Typer(
    name="satset",
    help="SATUSEHAT radiology gateway: PACS studies and radiology reports to SATUSEHAT, as Prefect flows.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """SATUSEHAT radiology gateway."""
    try:
        attach_log_file(load_settings(LogSettings).log_file)
    except SettingsError as error:
        typer.echo(f"satset: {error}", err=True)
        raise typer.Exit(2) from None


app.command("simulator")(simulator_cmd.simulator)
app.command("demo")(demo_cmd.demo)
app.command("run")(run_cmd.run)
app.command("api")(api_cmd.api)
app.command("serve")(serve_cmd.serve)
app.command("check")(check_cmd.check)
app.add_typer(orders_cmd.app, name="orders")
app.add_typer(alerts_cmd.app, name="alerts")


def main() -> None:
    app()
