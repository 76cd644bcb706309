"""Malformed RIS rows as a careless HIS writes them straight into the table by SQL, beside good ones.

Each shape says which field its reason must name. Rows go in by plain SQL (`INSERT … VALUES`), never through
`RisStore.add_order`, which would refuse them at the door: the poller must survive what it did not write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from models.orders import RadiologyOrder
from tests.orders.bodies import accession, body


@dataclass(frozen=True)
class Poison:
    """One malformed row: its payload as raw SQL text, extra column values, and the field its reason names."""

    name: str
    payload: str
    names: str
    columns: dict[str, Any] | None = None
    backends: tuple[str, ...] = ("sqlite", "postgresql", "mysql", "mariadb")


def _batch1(**overrides: Any) -> str:
    return json.dumps({**body(1), "noacsn": "ignored", **overrides})


POISONS = [
    Poison("json string", json.dumps("a batch1 body, as text"), "payload"),
    Poison("json null", "null", "payload"),
    Poison("json array", "[1, 2, 3]", "payload"),
    Poison("wrong types", _batch1(subject_id=["P10443013727"], period_start=True), "subject_id"),
    Poison("nulls", _batch1(subject_id=None, period_start=None, individual_id=None), "period_start"),
    Poison("date before year 1 in UTC", _batch1(period_start="0001-01-01T00:00:00"), "period_start"),
    Poison("date after 9999 in UTC", _batch1(period_start="9999-12-31T23:59:59-12:00"), "period_start"),
    Poison("huge text", _batch1(identifier_value="R" * 1_000_000), "identifier_value"),
    Poison("huge number", _batch1()[:-1] + ', "individual_id": ' + "9" * 5000 + "}", "payload"),
    Poison("huge float", _batch1()[:-1] + ', "period_end": 1e400}', "period_end"),
    Poison("attempts past any limit", _batch1(), "attempts", {"attempts": 2_147_483_647}),
    Poison("invalid json", "{'noacsn': not json", "payload", backends=("sqlite",)),
    Poison("attempts as text", _batch1(), "attempts", {"attempts": "many"}, backends=("sqlite",)),
    Poison("created_at as text", _batch1(), "created_at", {"created_at": "yesterday"}, backends=("sqlite",)),
]
"""The shapes; `huge number` is a 5000-digit integer (Python refuses to read one), `huge float` a JSON number
past a double (read as infinity)."""


def poisons_for(engine: sa.Engine) -> list[Poison]:
    return [poison for poison in POISONS if engine.dialect.name in poison.backends]


def insert_by_sql(engine: sa.Engine, payload: str, *, batch: int = 1, **columns: Any) -> str:
    """A pending order written by plain SQL (no model, no validation); returns its accession number."""
    acsn = accession()
    values: dict[str, Any] = {
        "accession_number": acsn,
        "patient_ihs": "P10443013727",
        "exam_code": "24648-8",
        "batch": batch,
        "payload": payload,
        "status": "pending",
        "attempts": 0,
        **columns,
    }
    names = ", ".join(values)
    marks = ", ".join(f":{name}" for name in values)
    stamps = "created_at" not in values
    sql = (
        f"INSERT INTO {RadiologyOrder.__tablename__} ({names}, next_attempt_at, updated_at"
        f"{', created_at' if stamps else ''}) "
        f"VALUES ({marks}, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP{', CURRENT_TIMESTAMP' if stamps else ''})"
    )
    with engine.begin() as connection:
        connection.execute(sa.text(sql), values)
    return acsn


def state_of(engine: sa.Engine, acsn: str) -> sa.Row[Any]:
    """status, attempts, last_error, lease_expires_at, next_attempt_at, claimed_by of one order, read without
    the columns a poisoned row may hold unreadable (`RisStore.get` reads them all)."""
    table = RadiologyOrder.__table__  # type: ignore[attr-defined]
    columns = ("status", "attempts", "last_error", "lease_expires_at", "next_attempt_at", "claimed_by")
    with engine.connect() as connection:
        return connection.execute(
            sa.select(*(table.c[name] for name in columns)).where(table.c.accession_number == acsn)
        ).one()
