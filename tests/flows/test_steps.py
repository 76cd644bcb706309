"""BatchFailed: the existing gateway's failure body and statuses, and a round trip through pickle (Prefect stores a
failed run's exception; the HIS API reads it back)."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest

from clients.errors import (
    AmbiguousStudy,
    AssociationRejected,
    FhirRejected,
    ImagingStudyNotReady,
    OutcomeIssue,
    StudyNotFound,
    UpstreamUnavailable,
)
from flows.steps import BatchFailed, StepRecorder, failure_sentence, waiting_at_most

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
        (ImagingStudyNotReady("no ImagingStudy for ACSN A1 yet"), 404),
        (AmbiguousStudy("the PACS has 2 studies with AccessionNumber 'A1'"), 409),
        (AssociationRejected("the router refused AE X"), 502),
        (UpstreamUnavailable("HTTP 503", service="satusehat", status_code=503), 502),
    ],
)
def test_status_codes(cause: Exception, status: int) -> None:
    assert BatchFailed("batch4", "encounter", {}, cause).status_code == status


def test_response_keeps_the_ids_made_and_the_outcome() -> None:
    failed = BatchFailed("batch1", "service_request", {"encounter_id": "e-1"}, REJECTION)
    body = failed.response()
    assert body["error"] == "Encounter created but ServiceRequest failed" and body["step"] == "service_request"
    assert body["encounter_id"] == "e-1"
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


@pytest.mark.parametrize(
    ("step", "created", "sentence"),
    [
        ("encounter", {}, "Failed to create Encounter"),
        ("service_request", {"encounter_id": "e"}, "Encounter created but ServiceRequest failed"),
        ("service_request", {}, "Failed to create ServiceRequest"),
        (
            "dicom_process",
            {"encounter_id": "e", "service_request_id": "s"},
            "ServiceRequest created but DICOM processing failed",
        ),
        ("dicom_process", {}, "DICOM processing failed"),  # batch4's check of the study, before anything exists
        ("router_echo", {}, "DICOM processing failed"),
        ("imaging_study", {"service_request_id": "s"}, "ServiceRequest created but ImagingStudy lookup failed"),
        (
            "imaging_study",
            {"service_request_id": "s", "dicom_process": {}},
            "DICOM processed but ImagingStudy lookup failed",
        ),
        ("observation", {}, "Failed to create Observation"),  # batch2
        ("observation", {"imaging_study_id": "i"}, "ImagingStudy found but Observation failed"),
        ("diagnostic_report", {"observation_id": "o"}, "Observation created but DiagnosticReport failed"),
        ("diagnostic_report", {}, "Failed to create DiagnosticReport"),
    ],
)
def test_error_is_the_existing_gateways_sentence(step: str, created: dict[str, object], sentence: str) -> None:
    """The sentences of the existing gateway's service_batch1..4 (field_notes.md), by what exists already."""
    assert failure_sentence(step, created) == sentence
    assert BatchFailed("batch4", step, created, REJECTION).response()["error"] == sentence


def test_the_platforms_operation_outcome_is_passed_through_whole() -> None:
    answered = {
        "resourceType": "OperationOutcome",
        "text": {"status": "generated", "div": "<div>refused</div>"},
        "issue": [{"severity": "error", "code": "value", "details": {"text": "RuleNumber: 10117"}, "diagnostics": "d"}],
    }
    rejected = FhirRejected("refused", status_code=400, issues=REJECTION.issues, body_excerpt=json.dumps(answered))
    assert BatchFailed("batch1", "encounter", {}, rejected).response()["detail"] == answered
    cut_short = FhirRejected(
        "refused", status_code=400, issues=REJECTION.issues, body_excerpt=json.dumps(answered)[:50]
    )
    rebuilt = BatchFailed("batch1", "encounter", {}, cut_short).response()["detail"]
    assert rebuilt["resourceType"] == "OperationOutcome" and rebuilt["issue"][0]["expression"] == ["Encounter.x"]


@pytest.mark.anyio
async def test_waiting_at_most_cuts_only_the_waiting_steps_short() -> None:
    run = StepRecorder("batch3")
    run.created["service_request_id"] = "s-1"

    async def slow() -> str:
        await asyncio.sleep(3600)
        return "never"

    async def quick() -> str:
        return "o-1"

    with waiting_at_most(0.05):
        assert await run.step("observation", quick()) == "o-1"
        with pytest.raises(BatchFailed) as failed:
            await run.step("imaging_study", slow())
    assert isinstance(failed.value.cause, ImagingStudyNotReady) and failed.value.status_code == 404
    assert "API_SYNC_IMAGING_WAIT_S" in str(failed.value.cause) and "?async=true" in str(failed.value.cause)
    assert failed.value.response()["service_request_id"] == "s-1"
