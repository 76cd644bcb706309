"""The soak command, at a size CI can afford, so that it cannot rot; and the judgements it makes, on made-up data.

The full run (1000 orders, 5 % faults) is a separate command with its last result in docs/soak.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from clients.ris import RisStore
from tests.deployments.prefect_server import clean_environment
from tests.orders.bodies import body
from tests.plugins.pacs import require_orthanc
from tests.reliability.soak import (
    FHIR_IDS,
    MIN_ORDERS_FOR_FLATNESS,
    ROOT,
    check_order,
    overlapping,
    per_kind,
    problems,
    settled,
    trend,
)

ORDERS = 16
FAULT_RATE = 0.10


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_soak_command_runs_small_orders_under_faults_and_loses_nothing(tmp_path: Path) -> None:
    require_orthanc()
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "tests.reliability.soak", "--orders", str(ORDERS), "--fault-rate", str(FAULT_RATE)]
    completed = subprocess.run(
        [*command, "--pollers", "2", "--expire-every-s", "15", "--out", str(out)],
        cwd=ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:] + completed.stdout[-4000:]
    result = json.loads(out.read_text())
    assert result["ok"] is True
    assert (result["orders"], result["lost"], result["duplicated"]) == (ORDERS, 0, 0)
    assert result["done"] + result["dead"] == ORDERS
    assert result["dead"] == sum(result["reasons"].values())  # every order that did not make it says why
    faults = result["faults"]
    assert sum(faults["http_injected"].values()) > 0  # the faults really fired
    assert faults["pacs_503"] > 0
    assert faults["token_expiries"] > 0
    for poller in result["pollers"].values():
        assert poller["samples"] >= 8
        assert poller["rss_kib"]["end"] > 0 and poller["fds"]["end"] > 0


def samples(rss: list[float], fds: list[float] | None = None) -> list[dict[str, float]]:
    fds = fds or [20.0] * len(rss)
    return [
        {"t_s": i, "rss_kib": r, "fds": f, "finished": i * 10} for i, (r, f) in enumerate(zip(rss, fds, strict=True))
    ]


def test_steady_memory_after_warm_up_is_flat() -> None:
    warm_up = [10_000.0, 90_000.0, 150_000.0, 180_000.0]
    steady = [180_000.0 + (i % 3) * 2_000 for i in range(36)]
    judged = trend(samples(warm_up + steady), judge=True)
    assert judged["flat"] is True
    assert judged["rss_kib"]["start"] == 90_000.0  # the first sample after an order finished


def test_memory_that_keeps_growing_is_not_flat() -> None:
    growing = [180_000.0 + 3_000 * i for i in range(40)]  # +3 MiB per 10 orders: a leak
    judged = trend(samples(growing), judge=True)
    assert judged["flat"] is False
    assert judged["rss_kib"]["slope_per_100_orders"] == pytest.approx(30_000.0)


def test_open_files_that_keep_growing_are_not_flat() -> None:
    judged = trend(samples([180_000.0] * 40, [20.0 + i for i in range(40)]), judge=True)
    assert judged["flat"] is False
    assert "fds" in judged["why"]


def test_a_short_run_reports_its_figures_without_judging_them() -> None:
    judged = trend(samples([180_000.0 + 3_000 * i for i in range(40)]), judge=False)
    assert judged["flat"] is None
    assert str(MIN_ORDERS_FOR_FLATNESS) in judged["why"]


def test_two_runs_of_one_order_at_once_are_caught() -> None:
    first = {"start": "2026-01-05T08:00:00", "end": "2026-01-05T08:00:10"}
    after = {"start": "2026-01-05T08:00:11", "end": "2026-01-05T08:00:20"}
    during = {"start": "2026-01-05T08:00:05", "end": "2026-01-05T08:00:12"}
    still_running = {"start": "2026-01-05T08:00:30", "end": None}
    assert not overlapping([first, after])
    assert overlapping([after, during, first])
    assert overlapping([first, still_running, {"start": "2026-01-05T08:00:40", "end": "2026-01-05T08:00:50"}])


def test_the_fault_rate_is_shared_between_the_kinds() -> None:
    each = per_kind(0.05, 5)
    assert 1 - (1 - each) ** 5 == pytest.approx(0.05)
    assert per_kind(0.0, 5) == 0.0


def test_the_table_is_settled_only_when_nothing_is_left_to_work() -> None:
    assert settled({"pending": 0, "in_progress": 0, "done": 3, "failed": 0, "dead": 1})
    assert not settled({"pending": 0, "in_progress": 0, "done": 3, "failed": 1, "dead": 0})
    assert not settled({"pending": 0, "in_progress": 1, "done": 3, "failed": 0, "dead": 0})


def test_lost_duplicated_unfinished_or_growing_each_fail_the_soak() -> None:
    clean = {"lost": 0, "duplicated": 0, "pollers": {"poller-0": {"flat": True}}}
    assert problems(clean, {"poller-0": 0}) == []
    assert problems({**clean, "lost": 1}, {"poller-0": 0}) == ["1 order(s) lost"]
    assert problems({**clean, "duplicated": 2}, {"poller-0": 0}) == ["2 order(s) duplicated"]
    assert problems(clean, {"poller-0": -9}) != []
    assert problems({**clean, "pollers": {"poller-0": {"flat": False, "why": "rss"}}}, {"poller-0": 0}) != []


class HandMadeStore:
    """What the soak reads of the simulator's store: resources found by (type, identifier value)."""

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def put(self, kind: str, value: str, resource: dict[str, Any] | None = None) -> dict[str, Any]:
        resource = resource or {"id": str(uuid.uuid4())}
        self.resources.setdefault((kind, value), []).append(resource)
        return resource

    def find_by_identifier(self, kind: str, system: str | None, value: str) -> list[dict[str, Any]]:
        return self.resources.get((kind, value), [])


SOPS = {"2.25.1", "2.25.2"}


def done_order(tmp_path: Path, listed: set[str] = SOPS) -> tuple[RisStore, HandMadeStore, dict[str, Any]]:
    """A batch4 order done in the RIS table, its five resources on the platform and their ids in the row."""
    ris = RisStore(f"sqlite:///{tmp_path / 'ris.db'}")
    ris.create_schema()
    order = body(4)
    row = ris.add_order(4, order)
    assert row.id is not None and ris.claim("w", 1)
    store = HandMadeStore()
    ids = {}
    for kind, key in FHIR_IDS.items():
        value = order["identifier_value"] if kind == "Encounter" else order["noacsn"]
        resource = {"id": str(uuid.uuid4())}
        if kind == "ImagingStudy":
            resource["series"] = [{"instance": [{"uid": uid} for uid in sorted(listed)]}]
        ids[key] = store.put(kind, value, resource)["id"]
    assert ris.complete(row.id, "w", ids)
    return ris, store, order


def test_a_done_order_with_one_of_each_resource_is_done(tmp_path: Path) -> None:
    ris, store, order = done_order(tmp_path)
    check = check_order(ris, store, "org", order, SOPS)
    assert (check.done, check.duplicated, check.problems) == (True, False, [])


def test_a_resource_held_twice_is_a_duplicate(tmp_path: Path) -> None:
    ris, store, order = done_order(tmp_path)
    store.put("Observation", order["noacsn"])
    check = check_order(ris, store, "org", order, SOPS)
    assert check.duplicated and not check.done
    assert "2 Observation" in check.problems


def test_a_done_row_whose_ids_are_not_the_platforms_is_not_done(tmp_path: Path) -> None:
    ris, store, order = done_order(tmp_path)
    store.resources[("DiagnosticReport", order["noacsn"])] = [{"id": "someone-else"}]
    check = check_order(ris, store, "org", order, SOPS)
    assert not check.done
    assert check.problems == ["RIS diagnostic_report_id is not the platform's DiagnosticReport"]


def test_an_imaging_study_short_of_an_instance_is_not_done(tmp_path: Path) -> None:
    ris, store, order = done_order(tmp_path, listed={"2.25.1"})
    check = check_order(ris, store, "org", order, SOPS)
    assert check.problems == ["the ImagingStudy lists 1 of the 2 instances sent"]
