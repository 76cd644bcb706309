"""The fault matrix's judge, on hand-made stores: it must see a lost order, a duplicate, a done order whose ids or
ImagingStudy are wrong, and a resource no order accounts for. If the judge could not fail, neither could the
matrix (tests/reliability/test_faults.py). Also the table: rows only when asked for, rendered between the markers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.ris import RisStore
from simulator.store import Store
from tests.reliability import table
from tests.reliability.fault_harness import RESOURCE_IDS, check_totals, judge, reason, table_row

ORG = "10000004"
STUDY = "1.2.826.0.1.3680043.8.498.1"
INSTANCES = {f"{STUDY}.1.{n}" for n in (1, 2)}
WORKER = "judge-test"


@pytest.fixture
def ris(tmp_path: Path) -> Iterator[RisStore]:
    store = RisStore(f"sqlite:///{tmp_path / 'ris.db'}", max_attempts=2, backoff_s=60)
    store.create_schema()
    yield store
    store.close()


@pytest.fixture
def platform() -> Iterator[Store]:
    store = Store()
    yield store
    store.close()


def order_body() -> dict[str, Any]:
    return {
        "identifier_value": "RG" + uuid.uuid4().hex[:12].upper(),
        "subject_id": "P10443013727",
        "individual_id": "10016869420",
        "period_start": "2025-08-01T05:57:41+00:00",
        "noacsn": "T" + uuid.uuid4().hex[:15].upper(),
        "performer_id": "10000504193",
        "performer_value": "Tidak tampak kelainan",
        "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
        "study": STUDY,
    }


def create(platform: Store, kind: str, value: str, instances: set[str] | None = None) -> str:
    """One resource of `kind` carrying `value` as its identifier, as the platform would hold it."""
    identifier = {"system": f"urn:test/{kind}/{ORG}", "value": value}
    resource: dict[str, Any] = {"resourceType": kind, "identifier": [identifier]}
    if kind == "ImagingStudy":
        uids = sorted(INSTANCES if instances is None else instances)
        resource["series"] = [{"uid": f"{STUDY}.1", "instance": [{"uid": uid} for uid in uids]}]
    return str(platform.create(resource)["id"])


def create_all(platform: Store, body: dict[str, Any], instances: set[str] | None = None) -> dict[str, str]:
    """One of each kind for the order: {result key: id}, as a done order's row holds them."""
    return {
        key: create(platform, kind, body["identifier_value"] if kind == "Encounter" else body["noacsn"], instances)
        for kind, key in RESOURCE_IDS.items()
    }


def claimed(ris: RisStore, body: dict[str, Any]) -> int:
    ris.add_order(4, body)
    (order,) = ris.claim(WORKER, 1)
    assert order.id is not None
    return order.id


def done(ris: RisStore, body: dict[str, Any], result: dict[str, str]) -> None:
    assert ris.complete(claimed(ris, body), WORKER, result)


def test_an_order_done_with_one_of_each_is_done(ris: RisStore, platform: Store) -> None:
    body = order_body()
    done(ris, body, create_all(platform, body))

    verdict = judge(ris, platform, body, INSTANCES)

    assert verdict.done and not verdict.failed and not verdict.lost and not verdict.duplicated, verdict.describe()
    assert verdict.found == dict.fromkeys(RESOURCE_IDS, 1)
    assert check_totals(platform, [verdict]) == []


def test_a_resource_created_twice_is_duplicated_and_not_done(ris: RisStore, platform: Store) -> None:
    body = order_body()
    done(ris, body, create_all(platform, body))
    create(platform, "Observation", body["noacsn"])  # a retry that posted again instead of adopting

    verdict = judge(ris, platform, body, INSTANCES)

    assert verdict.duplicated and not verdict.done, verdict.describe()
    assert verdict.found["Observation"] == 2
    assert "2 Observation" in verdict.problems
    assert table_row("x", [verdict])["duplicated"] == 1


def test_a_duplicate_of_a_failed_order_is_still_duplicated(ris: RisStore, platform: Store) -> None:
    body = order_body()
    order_id = claimed(ris, body)
    create(platform, "Encounter", body["identifier_value"])
    create(platform, "Encounter", body["identifier_value"])
    ris.fail(order_id, WORKER, "batch4 stopped at encounter: HTTP 500. Created so far: nothing", retryable=False)

    verdict = judge(ris, platform, body, INSTANCES)

    assert verdict.failed and verdict.duplicated, verdict.describe()


@pytest.mark.parametrize("state", ["pending", "in_progress", "missing from the RIS"])
def test_an_order_that_never_ended_is_lost(ris: RisStore, platform: Store, state: str) -> None:
    body = order_body()
    if state == "pending":
        ris.add_order(4, body)
    elif state == "in_progress":
        claimed(ris, body)

    verdict = judge(ris, platform, body, INSTANCES)

    assert verdict.lost and not verdict.done and not verdict.failed, verdict.describe()
    assert table_row("x", [verdict])["lost"] == 1


def test_a_failure_without_a_reason_is_lost(ris: RisStore, platform: Store) -> None:
    body = order_body()
    ris.fail(claimed(ris, body), WORKER, "   ", retryable=False)

    verdict = judge(ris, platform, body, INSTANCES)

    assert verdict.status == "dead" and verdict.lost, verdict.describe()


def test_failed_and_dead_orders_with_a_reason_are_failed(ris: RisStore, platform: Store) -> None:
    retried, refused = order_body(), order_body()
    ris.fail(claimed(ris, retried), WORKER, "batch4 stopped at observation: HTTP 500. Created so far: x", True)
    ris.fail(claimed(ris, refused), WORKER, "batch4 stopped at encounter: HTTP 401. Created so far: x", False)

    verdicts = [judge(ris, platform, body, INSTANCES) for body in (retried, refused)]

    assert [(v.status, v.failed, v.lost) for v in verdicts] == [("failed", True, False), ("dead", True, False)]
    row = table_row("x", verdicts)
    assert row == {
        "fault": "x",
        "orders": 2,
        "done": 0,
        "failed": "1 failed, 1 dead: observation: HTTP 500 / encounter: HTTP 401",
        "lost": 0,
        "duplicated": 0,
    }


def test_a_done_order_whose_ids_are_not_the_platforms_is_lost(ris: RisStore, platform: Store) -> None:
    body = order_body()
    result = create_all(platform, body)
    done(ris, body, {**result, "diagnostic_report_id": str(uuid.uuid4())})

    verdict = judge(ris, platform, body, INSTANCES)

    assert verdict.lost, verdict.describe()
    assert any("diagnostic_report_id" in problem for problem in verdict.problems)


def test_a_done_order_missing_a_resource_is_lost(ris: RisStore, platform: Store) -> None:
    body = order_body()
    result = create_all(platform, body)
    platform.reset()  # the platform holds nothing the row claims
    done(ris, body, result)

    verdict = judge(ris, platform, body, INSTANCES)

    assert verdict.lost, verdict.describe()
    assert len(verdict.problems) == len(RESOURCE_IDS) + 1  # each id, and the ImagingStudy's instances


def test_a_done_order_whose_imaging_study_lacks_an_instance_is_lost(ris: RisStore, platform: Store) -> None:
    body = order_body()
    done(ris, body, create_all(platform, body, instances=set(sorted(INSTANCES)[:1])))

    verdict = judge(ris, platform, body, INSTANCES)

    assert verdict.lost, verdict.describe()
    assert verdict.problems == ["the ImagingStudy lists 1 instances, the study has 2"]


def test_a_resource_no_order_accounts_for_is_reported(ris: RisStore, platform: Store) -> None:
    body = order_body()
    done(ris, body, create_all(platform, body))
    platform.create({"resourceType": "Observation", "status": "final"})  # posted without the order's identifier

    verdict = judge(ris, platform, body, INSTANCES)

    assert verdict.done
    assert check_totals(platform, [verdict]) == ["Observation: the platform holds 2, the orders account for 1"]


def test_reasons_read_the_same_for_every_order() -> None:
    first = (
        "batch4 stopped at dicom_process: router DCMROUTER@127.0.0.1:40111: study 1.2.826.0.1.3680043.8.498.123 "
        "(ACSN T0123456789ABCDE): association aborted. Created so far: Encounter e-1; run it again to resume."
    )
    second = first.replace("40111", "40222").replace(".123 ", ".456 ").replace("T0123456789ABCDE", "TFEDCBA987654321")

    assert reason(first) == reason(second) == "dicom_process: the router: association aborted"
    assert len(reason("x" * 1000)) == 300


def test_rows_are_written_only_when_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row = {"fault": "f", "orders": 1, "done": 1, "failed": "0", "lost": 0, "duplicated": 0}
    monkeypatch.delenv(table.OUT_ENV, raising=False)
    assert table.append_row("faults", row) is None

    monkeypatch.setenv(table.OUT_ENV, str(tmp_path / "out"))
    path = table.append_row("faults", row)
    assert path is not None and json.loads(path.read_text()) == row
    with pytest.raises(ValueError, match="lost"):
        table.append_row("faults", {k: v for k, v in row.items() if k != "lost"})


def test_render_replaces_only_the_table_and_keeps_the_last_row_of_a_fault(tmp_path: Path) -> None:
    rows = tmp_path / "rows"
    rows.mkdir()
    base = {"orders": 3, "done": 3, "failed": "0", "lost": 0, "duplicated": 0}
    lines = [{"fault": "a", **base}, {"fault": "b | c", **base}, {"fault": "a", **base, "done": 2, "lost": 1}]
    (rows / "faults.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (rows / "crashes.jsonl").write_text(json.dumps({"fault": "kill", **base}) + "\n")
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\n{table.START}\nold table\n{table.END}\n\nafter\n")

    assert table.render(rows, doc) == 3

    text = doc.read_text()
    assert text.startswith("# Title\n\n") and text.endswith(f"{table.END}\n\nafter\n") and "old table" not in text
    body = text.split(table.START)[1].split(table.END)[0].strip().splitlines()
    # The last column, "linked to another patient", is measured by tests/integrity only: a dash elsewhere.
    assert body[2:] == [
        "| a | 3 | 2 | 0 | 1 | 0 | – |",
        "| b \\| c | 3 | 3 | 0 | 0 | 0 | – |",
        "| kill | 3 | 3 | 0 | 0 | 0 | – |",
    ]
