"""Custom Prefect events the gateway's alerts react to (deployments/automations.py turns them into notifications).

Prefect already emits an event for every flow-run state (a batch run Failed, a poll Completed); what it cannot
know is that an order went dead in the RIS table, or that an ImagingStudy wait is running late. These functions
say so. They never raise: an alert that cannot be sent must not fail the order it is about. Only identifiers,
counts and the recorded reason go in an event (the same text the order row and the run logs carry): never a
patient name or a secret.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

ORDER_DEAD: Final = "satset.order.dead"
"""An order of the RIS table was marked dead: retrying cannot help, a person has to fix it and redrive it."""

IMAGING_STUDY_WAIT_SLOW: Final = "satset.imaging-study.wait-slow"
"""The wait for the router's ImagingStudy passed half of IMAGING_STUDY_DEADLINE_S without a complete study."""

MAX_REASON_CHARS: Final = 1000
"""An event stays small (Prefect refuses large ones); the full reason is on the order row and in the run logs."""

logger = logging.getLogger(__name__)


def order_dead(accession_number: str, batch: int, reason: str, attempts: int | None = None) -> bool:
    """Say that the order with this ACSN went dead, and why; True if the event was handed to Prefect."""
    return _emit(
        ORDER_DEAD,
        accession_number,
        {"batch": batch, "attempts": attempts, "reason": _short(reason)},
    )


def imaging_study_wait_slow(accession_number: str, waited_s: float, deadline_s: float, detail: str) -> bool:
    """Say that the ImagingStudy wait for this ACSN is past half its deadline, with what was last seen."""
    return _emit(
        IMAGING_STUDY_WAIT_SLOW,
        accession_number,
        {"waited_s": round(waited_s), "deadline_s": round(deadline_s), "detail": _short(detail)},
    )


class HalfwayAlarm:
    """Emits IMAGING_STUDY_WAIT_SLOW once, the first time `check` is called past half the deadline.

    Made when a wait starts, checked on each poll of the wait: the wait loop itself stays as it is.
    """

    def __init__(self, accession_number: str, deadline_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.accession_number = accession_number
        self.deadline_s = deadline_s
        self._clock = clock
        self._started = clock()
        self.fired = False

    def check(self, detail: str) -> bool:
        """Emit the event if half the deadline has passed and it was not emitted yet; True when it was just sent."""
        waited_s = self._clock() - self._started
        if self.fired or waited_s < self.deadline_s / 2:
            return False
        self.fired = True
        imaging_study_wait_slow(self.accession_number, waited_s, self.deadline_s, detail)
        return True


def _emit(event: str, accession_number: str, payload: dict[str, Any]) -> bool:
    """One event about one order, its resource named by the ACSN; the run's page linked when there is a run."""
    try:
        from prefect.events import emit_event
        from prefect.runtime import flow_run

        run_url = flow_run.ui_url if flow_run.id else None
        sent = emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"satset.order.{accession_number}",
                "prefect.resource.name": accession_number,
            },
            payload={**payload, "accession_number": accession_number, "run_url": run_url or ""},
        )
    except Exception as error:  # an alert never fails the order it is about
        logger.warning("event %s for %s not emitted: %s", event, accession_number, type(error).__name__)
        return False
    return sent is not None


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
