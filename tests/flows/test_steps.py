"""BatchFailed: the existing gateway's failure body and statuses, and a round trip through pickle (Prefect stores a
failed run's exception; the HIS API reads it back)."""

from __future__ import annotations

import pickle

import pytest

from clients.errors import (
    AssociationRejected,
    FhirRejected,
    OutcomeIssue,
    StudyNotFound,
    UpstreamUnavailable,
)
from flows.steps import BatchFailed, StepRecorder

REJECTION = FhirRejected(
    "SATUSEHAT rejected POST Encounter (HTTP 400): RuleNumber 10117",
    status_code=400,
    issues=(OutcomeIssue("error", "value", "Wrong organization ID (RuleNumber: 10117)", 10117, ("Encounter.x",)),),
)


@pytest.mark.parametrize(
    ("cause", "status"),
    [
        (REJECTION, 400),
        (StudyNotFound("the PACS has no study 1.2.3"), 404),
        (AssociationRejected("the router refused AE X"), 502),
        (UpstreamUnavailable("HTTP 503", service="satusehat", status_code=503), 502),
    ],
)
def test_status_codes(cause: Exception, status: int) -> None:
    assert BatchFailed("batch4", "encounter", {}, cause).status_code == status


def test_response_keeps_the_ids_made_and_the_outcome() -> None:
    failed = BatchFailed("batch1", "service_request", {"encounter_id": "e-1"}, REJECTION)
    body = failed.response()
    assert body["error"] == "service_request" and body["encounter_id"] == "e-1"
    assert body["detail"]["issue"][0]["expression"] == ["Encounter.x"]
    assert "e-1" in str(failed) and "fix the input" in str(failed)


def test_retryable_causes_say_to_run_again() -> None:
    assert "run it again to resume" in str(BatchFailed("b", "s", {}, UpstreamUnavailable("HTTP 503")))


def test_round_trip_through_pickle() -> None:
    failed = BatchFailed("batch4", "encounter", {"a": "1"}, REJECTION)
    again = pickle.loads(pickle.dumps(failed))
    assert (again.flow, again.step, again.created, str(again)) == (
        failed.flow,
        failed.step,
        failed.created,
        str(failed),
    )
    assert isinstance(again.cause, FhirRejected) and again.cause.rule_numbers == (10117,)
    assert again.status_code == 400


@pytest.mark.anyio
async def test_recorder_keeps_ids_and_wraps_failures() -> None:
    run = StepRecorder("batch1")

    async def made() -> str:
        return "id-1"

    async def broken() -> str:
        raise StudyNotFound("none")

    assert await run.step("encounter", made(), result_key="encounter_id") == "id-1"
    with pytest.raises(BatchFailed) as failed:
        await run.step("service_request", broken())
    assert failed.value.created == {"encounter_id": "id-1"} and set(run.durations_s) == {"encounter", "service_request"}
