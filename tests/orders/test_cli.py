"""`satset orders`: list, add, show, redrive, through typer's test runner against a SQLite file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cli.orders_cmd import app
from clients.ris import RisStore
from models.orders import DEAD, PENDING
from tests.orders.bodies import PATIENT_NAME, body

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


@pytest.fixture
def ris(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RisStore]:
    """RIS_DATABASE_URL in the environment (no .env from the checkout: run from an empty directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RIS_DATABASE_URL", sqlite_url)
    store = RisStore(sqlite_url)
    yield store
    store.close()


def orders(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=stdin)


def params_file(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "order.json"
    path.write_text(json.dumps(data))
    return str(path)


def dead_order(ris: RisStore, error: str) -> str:
    ris.create_schema()
    order = ris.add_order(4, body(4), now=T0)
    assert order.id is not None
    ris.claim("w", 5, T0)
    ris.fail(order.id, "w", error, False, T0)
    return order.accession_number


def test_add_then_show_and_list(ris: RisStore, tmp_path: Path) -> None:
    sent = body(4)

    added = orders("add", "--batch", "4", "--params", params_file(tmp_path, sent))

    assert added.exit_code == 0, added.output
    assert f"added order {sent['noacsn']} (batch 4), pending" in added.stdout
    shown = orders("show", sent["noacsn"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert (data["accession_number"], data["status"], data["batch"]) == (sent["noacsn"], PENDING, 4)
    assert data["payload"]["study"] == sent["study"] and PATIENT_NAME not in shown.stdout
    listed = orders("list")
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:4] == ["ACCESSION", "BATCH", "STATUS", "ATTEMPTS"]
    assert row.split()[:4] == [sent["noacsn"], "4", PENDING, "0"]


def test_add_reads_stdin(ris: RisStore) -> None:
    sent = body(1)
    added = orders("add", "--batch", "1", "--params", "-", stdin=json.dumps(sent))
    assert added.exit_code == 0, added.output
    assert ris.get(sent["noacsn"]).batch == 1


def test_add_refuses_an_invalid_body_naming_the_field(ris: RisStore, tmp_path: Path) -> None:
    refused = orders("add", "--batch", "4", "--params", params_file(tmp_path, body(4, study="not-a-uid")))

    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: invalid batch4 order") and "study:" in refused.stderr
    assert PATIENT_NAME not in refused.output
    assert ris.list_orders() == []


@pytest.mark.parametrize(
    ("content", "message"), [("{not json", "Expecting property name"), ("[1, 2]", "expected a JSON object")]
)
def test_add_refuses_a_file_that_is_not_a_json_object(
    ris: RisStore, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "order.json"
    path.write_text(content)
    refused = orders("add", "--batch", "4", "--params", str(path))
    assert refused.exit_code == 1 and message in refused.stderr


def test_add_refuses_a_duplicate_and_keeps_the_first(ris: RisStore, tmp_path: Path) -> None:
    sent = body(4)
    assert orders("add", "--batch", "4", "--params", params_file(tmp_path, sent)).exit_code == 0

    again = orders("add", "--batch", "1", "--params", params_file(tmp_path, body(1, noacsn=sent["noacsn"])))

    assert again.exit_code == 1 and "exists already" in again.stderr
    assert ris.get(sent["noacsn"]).batch == 4


def test_list_filters_by_status_and_cuts_long_errors(ris: RisStore) -> None:
    dead = dead_order(ris, "batch4 stopped at dicom_process:\n" + "x" * 500)
    pending = ris.add_order(1, body(1), now=T0).accession_number

    listed = orders("list", "--status", DEAD)

    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert len(lines) == 3  # header, the dead order, the counts
    assert lines[1].startswith(dead) and pending not in listed.stdout
    assert "batch4 stopped at dicom_process: xxx" in lines[1] and lines[1].endswith("…")
    assert lines[2] == "pending 1, in_progress 0, done 0, failed 0, dead 1"
    assert orders("list", "--status", "finished").exit_code == 1


def test_list_shows_the_newest_orders_and_counts_them_all(ris: RisStore) -> None:
    ris.create_schema()
    added = [ris.add_order(1, body(1), now=T0).accession_number for _ in range(3)]

    listed = orders("list", "--limit", "2")

    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:3]] == added[1:]
    assert listed.stdout.splitlines()[-1].startswith("pending 3,")


def test_redrive_by_accession_and_by_status(ris: RisStore) -> None:
    first, second = dead_order(ris, "rejected"), dead_order(ris, "rejected")

    one = orders("redrive", first)
    rest = orders("redrive", "--status", DEAD)
    none = orders("redrive", "--status", DEAD)

    assert (one.exit_code, one.stdout.strip()) == (0, f"redriven: {first}")
    assert (rest.exit_code, rest.stdout.strip()) == (0, f"redriven: {second}")
    assert none.stdout.strip() == "nothing to redrive"
    assert [o.status for o in ris.list_orders()] == [PENDING, PENDING]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give an ACCESSION or --status"),
        (("ACSN1", "--status", "dead"), "give an ACCESSION or --status"),
        (("--status", "done"), "only failed or dead orders can be redriven"),
        (("NO-SUCH-ORDER",), "no order with accession number NO-SUCH-ORDER"),
    ],
)
def test_redrive_refusals(ris: RisStore, args: tuple[str, ...], message: str) -> None:
    refused = orders("redrive", *args)
    assert refused.exit_code == 1 and message in refused.stderr


def test_show_an_unknown_order(ris: RisStore) -> None:
    refused = orders("show", "NO-SUCH-ORDER")
    assert refused.exit_code == 1 and "no order with accession number NO-SUCH-ORDER" in refused.stderr


def test_a_malformed_setting_is_named(ris: RisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLL_BATCH_SIZE", "many")
    refused = orders("list")
    assert refused.exit_code == 1 and "POLL_BATCH_SIZE" in refused.stderr


def test_an_unreachable_database_is_one_line_without_the_password(
    ris: RisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RIS_DATABASE_URL", "postgresql+psycopg2://ris:s3cret-pw@127.0.0.1:1/ris")
    refused = orders("list")
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: RIS database postgresql+psycopg2://ris:***@127.0.0.1:1/ris:")
    assert "s3cret-pw" not in refused.output and len(refused.stderr.strip().splitlines()) == 1
