"""What every gateway flow does around its steps: keep the ids made so far, time each step, and on failure say
which step stopped the run and what had already been created, so nothing half-sent is forgotten."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from clients.errors import FhirRejected, GatewayError, Rejected, StudyNotFound

T = TypeVar("T")


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
        study the PACS does not have, 502 for anything else upstream (a refusal by the router, an outage)."""
        if isinstance(self.cause, FhirRejected):
            return self.cause.status_code
        if isinstance(self.cause, StudyNotFound):
            return 404
        return 502

    def response(self) -> dict[str, Any]:
        """The existing gateway's failure body: which step failed, the ids so far, and the upstream detail."""
        detail: Any = _describe(self.cause)
        if isinstance(self.cause, FhirRejected) and self.cause.issues:
            detail = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": i.severity,
                        "code": i.code,
                        "details": {"text": i.text},
                        "expression": list(i.expression),
                    }
                    for i in self.cause.issues
                ],
            }
        return {"error": self.step, **self.created, "detail": detail}


@dataclass
class StepRecorder:
    """Runs a flow's steps in order, recording ids and durations for the result and the run's artifact."""

    flow: str
    created: dict[str, Any] = field(default_factory=dict)
    durations_s: dict[str, float] = field(default_factory=dict)

    async def step(self, name: str, work: Awaitable[T], *, result_key: str | None = None) -> T:
        started = time.monotonic()
        try:
            result = await work
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


def _describe(error: BaseException) -> str:
    if isinstance(error, GatewayError | BatchFailed):
        return str(error)
    return f"{type(error).__name__}: {error}"
