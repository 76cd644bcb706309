"""`satset orders …`: the RIS order table from a terminal. List, add, show, redrive; never delete.

Reads RIS_DATABASE_URL (and the poller's settings) like the poller does, and creates the table if it is missing,
so `satset orders add` works on a fresh database. Every failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from sqlalchemy.exc import SQLAlchemyError

from clients.ris import RisError, RisStore
from models.orders import STATUSES, InvalidOrder, RadiologyOrder, order_summary
from models.settings import RisSettings, SettingsError, load_settings

app = typer.Typer(
    name="orders",
    help="The RIS order table the poll-ris flow works: list, add, show and redrive orders.",
    no_args_is_help=True,
    add_completion=False,
)

ERROR_COLUMN_WIDTH = 60
STATUS_HELP = f"Only orders of this status: {', '.join(STATUSES)}."


@app.command("list")
def list_orders(
    status: Annotated[str | None, typer.Option("--status", "-s", help=STATUS_HELP)] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show the newest N orders.")] = 100,
) -> None:
    """A table of the newest orders: accession, batch, status, attempts, next attempt (UTC), last error.

    The last line counts every order by status.
    """
    if status is not None and status not in STATUSES:
        _fail(f"--status: must be one of {', '.join(STATUSES)}; got {status!r}")
    with _store() as store:
        orders = store.list_orders(status, limit=limit, newest=True)
        counts = store.counts()
    if not orders:
        typer.echo("no orders" + (f" with status {status}" if status else ""))
    else:
        typer.echo(_table(orders))
    typer.echo(", ".join(f"{name} {count}" for name, count in counts.items()))


@app.command("add")
def add(
    batch: Annotated[int, typer.Option("--batch", "-b", min=1, max=4, help="Which batch body: 1, 2, 3 or 4.")],
    params: Annotated[Path, typer.Option("--params", help="JSON file with the batch body ('-' reads stdin).")],
) -> None:
    """Add a pending order: the body is checked as that batch's input first; patient names are not stored."""
    body = _read_json(params)
    with _store() as store:
        order = store.add_order(batch, body)
    typer.echo(f"added order {order.accession_number} (batch {order.batch}), {order.status}")


@app.command("show")
def show(accession: Annotated[str, typer.Argument(metavar="ACCESSION", help="The order's accession number.")]) -> None:
    """Everything stored for one order, as JSON: identity, payload, status, attempts, last error, FHIR ids."""
    with _store() as store:
        order = store.get(accession)
    typer.echo(json.dumps(order_summary(order), indent=2, default=str))


@app.command("redrive")
def redrive(
    accession: Annotated[str | None, typer.Argument(metavar="[ACCESSION]", help="One order to redrive.")] = None,
    status: Annotated[str | None, typer.Option("--status", "-s", help="Redrive every order of: dead, failed.")] = None,
) -> None:
    """Send failed or dead orders back to pending, due now, with their attempts reset (last error kept)."""
    if (accession is None) == (status is None):
        _fail("give an ACCESSION or --status dead|failed (one of them)")
    with _store() as store:
        redriven = store.redrive(accession, status=status)
    typer.echo(f"redriven: {', '.join(redriven)}" if redriven else "nothing to redrive")


@contextmanager
def _store() -> Iterator[RisStore]:
    """The store from the environment, its table created if missing; every refusal becomes a one-line error."""
    try:
        settings = load_settings(RisSettings)
    except SettingsError as error:
        _fail(str(error))
    store = RisStore.from_settings(settings)
    try:
        store.create_schema()
        yield store
    except (InvalidOrder, RisError, ValueError) as error:
        _fail(str(error))
    except SQLAlchemyError as error:
        cause = getattr(error, "orig", None) or error
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        _fail(f"RIS database {store.engine.url.render_as_string(hide_password=True)}: {first_line}")
    finally:
        store.close()


def _table(orders: list[RadiologyOrder]) -> str:
    header = ("ACCESSION", "BATCH", "STATUS", "ATTEMPTS", "NEXT ATTEMPT (UTC)", "LAST ERROR")
    rows = [header] + [
        (
            order.accession_number,
            str(order.batch),
            order.status,
            str(order.attempts),
            _when(order.next_attempt_at) if order.status in ("pending", "failed") else "",
            _cut(order.last_error or ""),
        )
        for order in orders
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ).rstrip()


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def _cut(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= ERROR_COLUMN_WIDTH else flat[: ERROR_COLUMN_WIDTH - 1] + "…"


def _read_json(params: Path) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if str(params) == "-" else params.read_text()
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as error:
        _fail(f"--params {params}: {error}")
    if not isinstance(data, dict):
        _fail(f"--params {params}: expected a JSON object")
    return data


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
