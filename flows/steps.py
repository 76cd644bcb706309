"""What every gateway flow does around its steps: keep the ids made so far, time each step, and on failure say
which step stopped the run and what had already been created, so nothing half-sent is forgotten."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from clients.errors import (
    AmbiguousStudy,
    FhirRejected,
    GatewayError,
    ImagingStudyNotReady,
    Rejected,
    StudyNotFound,
)

T = TypeVar("T")

WAITING_STEPS = frozenset({"imaging_study"})
"""Steps that wait for something outside the gateway (the DICOM Router's ImagingStudy): the steps a caller
waiting on the line may cut short with `waiting_at_most`."""

_wait_limit_s: ContextVar[float | None] = ContextVar("satset_wait_limit_s", default=None)


@contextmanager
def waiting_at_most(seconds: float | None) -> Iterator[None]:
    """Flows run inside this block give each of their WAITING_STEPS at most `seconds` (None: their own deadline).

    A synchronous HIS call holds its HTTP request while the flow runs; the background deadline
    (IMAGING_STUDY_DEADLINE_S, 300 s) is far longer than any HIS waits. The existing gateway looked once and
    answered 404: the HIS API waits this long, then fails the step as not ready, with the ids made so far."""
    token = _wait_limit_s.set(seconds)
    try:
        yield
    finally:
        _wait_limit_s.reset(token)


class BatchFailed(Exception):
    """A flow stopped at `step`; `created` holds the ids made before it (a re-run with the same input resumes)."""

    def __init__(self, flow: str, step: str, created: dict[str, Any], cause: BaseException) -> None:
        made = ", ".join(f"{key}={value}" for key, value in created.items()) or "nothing"
        hint = "fix the input and send it again" if isinstance(cause, Rejected) else "run it again to resume"
        super().__init__(f"{flow} stopped at {step}: {_describe(cause)}. Created so far: {made}; {hint}.")
        self.flow = flow
        self.step = step
        self.created = dict(created)
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable: Prefect keeps a failed run's exception, and the HIS API reads it back for /api/runs."""
        return (BatchFailed, (self.flow, self.step, self.created, self.cause))

    @property
    def status_code(self) -> int:
        """The HTTP status the existing gateway would answer: the platform's own 4xx passed through, 404 for a
        study the PACS does not have or an ImagingStudy the router has not made (yet), 409 for an accession
        number that matches several studies, 502 for anything else upstream (a refusal by the router, an
        outage)."""
        if isinstance(self.cause, FhirRejected):
            return self.cause.status_code
        if isinstance(self.cause, StudyNotFound | ImagingStudyNotReady):
            return 404
        if isinstance(self.cause, AmbiguousStudy):
            return 409
        return 502

    @property
    def sentence(self) -> str:
        """The existing gateway's `error` text for this step ("Encounter created but ServiceRequest failed")."""
        return failure_sentence(self.step, self.created)

    def response(self) -> dict[str, Any]:
        """The existing gateway's failure body, `error` its sentence, the ids so far and the upstream detail
        (SATUSEHAT's OperationOutcome as it answered it); plus `step`, the step's name, which it lacked."""
        detail: Any = _describe(self.cause)
        if isinstance(self.cause, FhirRejected):
            detail = _operation_outcome(self.cause) or detail
        return {"error": self.sentence, "step": self.step, **self.created, "detail": detail}


def failure_sentence(step: str, created: dict[str, Any]) -> str:
    """What the existing gateway said when that step failed, worded by what exists already (batch1 and batch3
    say "Encounter created but ServiceRequest failed", batch2 "Failed to create Observation", ...)."""
    if step == "encounter":
        return "Failed to create Encounter"
    if step == "service_request":
        return (
            "Encounter created but ServiceRequest failed"
            if "encounter_id" in created
            else "Failed to create ServiceRequest"
        )
    if step in ("dicom_process", "router_echo"):  # router_echo: batch4's C-ECHO of the router, before the order
        if "service_request_id" in created:
            return "ServiceRequest created but DICOM processing failed"
        return "DICOM processing failed"
    if step == "imaging_study":
        if "dicom_process" in created:
            return "DICOM processed but ImagingStudy lookup failed"
        if "service_request_id" in created:
            return "ServiceRequest created but ImagingStudy lookup failed"
        return "ImagingStudy lookup failed"
    if step == "observation":
        return (
            "ImagingStudy found but Observation failed"
            if "imaging_study_id" in created
            else "Failed to create Observation"
        )
    if step == "diagnostic_report":
        if "observation_id" in created:
            return "Observation created but DiagnosticReport failed"
        return "Failed to create DiagnosticReport"
    if step == "people":  # a NIK the platform's Patient / Practitioner search does not know
        return "Failed to resolve NIK"
    return f"Failed at {step.replace('_', ' ')}"


def _operation_outcome(rejected: FhirRejected) -> dict[str, Any] | None:
    """SATUSEHAT's OperationOutcome as it was answered (every key: `text`, `issue[].diagnostics`, ...), else one
    rebuilt from the parsed issues (an answer longer than the client keeps, or a refusal the gateway made)."""
    try:
        answered = json.loads(rejected.body_excerpt) if rejected.body_excerpt else None
    except ValueError:
        answered = None
    if isinstance(answered, dict) and answered.get("resourceType") == "OperationOutcome":
        return answered
    if not rejected.issues:
        return None
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": i.severity, "code": i.code, "details": {"text": i.text}, "expression": list(i.expression)}
            for i in rejected.issues
        ],
    }


@dataclass
class StepRecorder:
    """Runs a flow's steps in order, recording ids and durations for the result and the run's artifact."""

    flow: str
    created: dict[str, Any] = field(default_factory=dict)
    durations_s: dict[str, float] = field(default_factory=dict)

    async def step(self, name: str, work: Awaitable[T], *, result_key: str | None = None) -> T:
        started = time.monotonic()
        try:
            result = await _within_limit(name, work)
        except Exception as error:
            self.durations_s[name] = round(time.monotonic() - started, 3)
            raise BatchFailed(self.flow, name, self.created, error) from error
        self.durations_s[name] = round(time.monotonic() - started, 3)
        if result_key is not None:
            self.created[result_key] = result
        return result

    async def post(self, name: str, work: Awaitable[dict[str, Any]], *, result_key: str) -> str:
        """A FHIR post step (tasks/fhir.py `Posted`): its id under `result_key`; a correction it made is added to
        `created["revised"]` (the resource, the elements replaced, the version before), so the answer and the
        run's artifact say what changed."""
        posted = await self.step(name, work)
        self.created[result_key] = posted["id"]
        if posted.get("changed"):
            resource = result_key.removesuffix("_id")
            self.created.setdefault("revised", []).append(
                {
                    "resource": resource,
                    "id": posted["id"],
                    "changed": posted["changed"],
                    "previous_version": posted.get("previous_version"),
                }
            )
        return str(posted["id"])


async def _within_limit(name: str, work: Awaitable[T]) -> T:
    """`work`, cut short after the `waiting_at_most` limit when the step is one of WAITING_STEPS."""
    limit = _wait_limit_s.get() if name in WAITING_STEPS else None
    if limit is None:
        return await work
    try:
        async with asyncio.timeout(limit) as scope:
            return await work
    except TimeoutError:
        if not scope.expired():
            raise
        raise ImagingStudyNotReady(
            f"the DICOM Router has made no complete ImagingStudy within the {limit:g} s a synchronous call waits "
            "(API_SYNC_IMAGING_WAIT_S); send the same body again later (nothing is created twice), or call with "
            "?async=true to let the gateway wait in the background"
        ) from None


def _describe(error: BaseException) -> str:
    if isinstance(error, GatewayError | BatchFailed):
        return str(error)
    return f"{type(error).__name__}: {error}"
