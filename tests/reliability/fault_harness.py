"""What the fault matrix needs around the poller: drive it as its schedule would, then judge every order from the
simulator's own store and the RIS table.

* `drive()` runs the real `poll-ris` flow (on the test Prefect server) whenever an order is due (pending, failed
  past its backoff, or in_progress past its lease), until every order is done or dead or a bound is hit. Between
  polls it sleeps, as the 60 s schedule would, only shorter.
* `judge()` reads one order back: its RIS row, and from the platform's store the resources carrying its
  identifiers (the Encounter by visit number, the others by ACSN). An order is *done* when its row is done with the
  ids of the one resource of each kind the platform holds and the ImagingStudy lists every instance of the study;
  *failed* when its row is failed or dead with a reason; *lost* otherwise (missing, stuck, or done but wrong);
  *duplicated* when the platform holds two of any kind for it.
* `table_row()` makes the row docs/reliability.md shows, with the reasons the failed orders recorded.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clients.ris import OrderNotFound, RisStore
from flows.poll import poll_ris
from models.orders import DEAD, DONE, FAILED, IN_PROGRESS, PENDING, utcnow
from simulator.store import Store

RESOURCE_IDS = {
    "Encounter": "encounter_id",
    "ServiceRequest": "service_request_id",
    "ImagingStudy": "imaging_study_id",
    "Observation": "observation_id",
    "DiagnosticReport": "diagnostic_report_id",
}
FINAL = (DONE, DEAD)

AfterPoll = Callable[[int, dict[str, int]], Awaitable[None] | None]


@dataclass
class Drive:
    """What driving the poller took: the polls' summaries, in order."""

    summaries: list[dict[str, int]] = field(default_factory=list)

    @property
    def polls(self) -> int:
        return len(self.summaries)


def is_due(ris: RisStore, accession: str) -> bool:
    """Would a poll claim this order now?"""
    order = ris.get(accession)
    now = utcnow()
    if order.status == PENDING:
        return True
    if order.status == FAILED:
        return order.next_attempt_at is not None and order.next_attempt_at <= now
    return order.status == IN_PROGRESS and order.lease_expires_at is not None and order.lease_expires_at <= now


async def drive(
    ris: RisStore,
    accessions: Iterable[str],
    *,
    max_polls: int = 8,
    bound_s: float = 120.0,
    after_poll: AfterPoll | None = None,
    pause_s: float = 0.2,
) -> Drive:
    """Poll until every order is done or dead, or `max_polls` / `bound_s` is reached; `after_poll(n, summary)`
    runs after poll n (a fault that ends, a service that comes back).

    A poll starts once every unfinished order is due, so orders that failed together are retried together and
    the drive takes as many polls as attempts (each poll is a flow run with its subflows: seconds on 2 cores)."""
    accessions = list(accessions)
    driven = Drive()
    deadline = time.monotonic() + bound_s
    while driven.polls < max_polls and time.monotonic() < deadline:
        if all(ris.get(accession).status in FINAL for accession in accessions):
            break
        waiting = [accession for accession in accessions if ris.get(accession).status not in FINAL]
        if not all(is_due(ris, accession) for accession in waiting):
            await asyncio.sleep(pause_s)  # as a schedule would, poll again later: once every order is due
            continue
        summary = await poll_ris()
        driven.summaries.append(summary)
        if after_poll is not None:
            pending = after_poll(driven.polls, summary)
            if pending is not None:
                await pending
    return driven


@dataclass
class Verdict:
    """One order after the fault: its row and what the platform holds for it."""

    accession: str
    status: str
    attempts: int
    last_error: str | None
    found: dict[str, int]
    problems: list[str]

    @property
    def done(self) -> bool:
        return self.status == DONE and not self.problems

    @property
    def failed(self) -> bool:
        return self.status in (FAILED, DEAD) and bool((self.last_error or "").strip())

    @property
    def lost(self) -> bool:
        return not self.done and not self.failed

    @property
    def duplicated(self) -> bool:
        return any(count > 1 for count in self.found.values())

    def describe(self) -> str:
        return f"{self.accession} {self.status} x{self.attempts} found={self.found} {self.problems} {self.last_error}"


def judge(ris: RisStore, store: Store, body: Mapping[str, Any], instances: set[str] | None = None) -> Verdict:
    """The verdict on one order; `instances` are the SOP Instance UIDs its done ImagingStudy must list."""
    accession = str(body["noacsn"])
    # The Encounter carries the visit number; the others the ACSN, each under its own system (acsn/{org} for the
    # ServiceRequest and the ImagingStudy, observation/{org}, diagnostic/{org}/rad): any system is matched, as
    # the values are unique to the test.
    held = {
        kind: store.find_by_identifier(kind, None, str(body["identifier_value"] if kind == "Encounter" else accession))
        for kind in RESOURCE_IDS
    }
    found = {kind: len(items) for kind, items in held.items()}
    try:
        order = ris.get(accession)
    except OrderNotFound:
        return Verdict(accession, "missing", 0, None, found, ["not in the RIS table"])
    problems = [f"{count} {kind}" for kind, count in found.items() if count > 1]
    if order.status == DONE:
        result = order.result or {}
        for kind, key in RESOURCE_IDS.items():
            ids = [item["id"] for item in held[kind]]
            if len(ids) != 1 or result.get(key) != ids[0]:
                problems.append(f"RIS {key}={result.get(key)}, the platform holds {kind} {ids}")
        studies = held["ImagingStudy"]
        listed = {i["uid"] for s in studies[:1] for series in s.get("series", []) for i in series.get("instance", [])}
        if instances is not None and listed != instances:
            problems.append(f"the ImagingStudy lists {len(listed)} instances, the study has {len(instances)}")
    return Verdict(accession, order.status, order.attempts, order.last_error, found, problems)


def check_totals(store: Store, verdicts: list[Verdict]) -> list[str]:
    """Resources the platform holds that no order accounts for (created without the order's identifiers)."""
    counts = store.counts()
    return [
        f"{kind}: the platform holds {counts.get(kind, 0)}, the orders account for {accounted}"
        for kind in RESOURCE_IDS
        if counts.get(kind, 0) != (accounted := sum(verdict.found[kind] for verdict in verdicts))
    ]


_CAUSE = re.compile(r"batch\d stopped at (?P<step>\w+): (?P<cause>.*?)\. Created so far", re.DOTALL)
_UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")
_ACSN = re.compile(r"\b[TR][0-9A-F]{15}\b")
_PORT = re.compile(r"(127\.0\.0\.1):\d+")
_ROUTER_STUDY = re.compile(r"router \S+: study <UID> \(ACSN <ACSN>\): ")
REASON_CHARS = 300


def reason(last_error: str | None) -> str:
    """The cause a failed order recorded, with its step, shortened and without UIDs, ACSNs or ports, so that the
    same cause reads the same for every order."""
    text = " ".join((last_error or "").split())
    matched = _CAUSE.search(text)
    if matched:
        text = f"{matched['step']}: {matched['cause']}"
    text = _ROUTER_STUDY.sub("the router: ", _PORT.sub(r"\1", _ACSN.sub("<ACSN>", _UID.sub("<UID>", text))))
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def table_row(fault: str, verdicts: list[Verdict]) -> dict[str, Any]:
    """The docs table row: fault, orders, done, failed (count, statuses and the distinct reasons), lost, duplicated."""
    failed = [verdict for verdict in verdicts if verdict.failed]
    described = "0"
    if failed:
        statuses = ", ".join(
            f"{sum(v.status == status for v in failed)} {status}"
            for status in (FAILED, DEAD)
            if any(v.status == status for v in failed)
        )
        reasons = " / ".join(dict.fromkeys(reason(verdict.last_error) for verdict in failed))
        described = f"{statuses}: {reasons}"
    return {
        "fault": fault,
        "orders": len(verdicts),
        "done": sum(verdict.done for verdict in verdicts),
        "failed": described,
        "lost": sum(verdict.lost for verdict in verdicts),
        "duplicated": sum(verdict.duplicated for verdict in verdicts),
    }
