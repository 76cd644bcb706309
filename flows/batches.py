"""batch1–batch4: the existing gateway's chained workflows, as Prefect flows that resume instead of repeating.

    batch1  Encounter → ServiceRequest
    batch2  Observation → DiagnosticReport                (Encounter, ServiceRequest, ImagingStudy exist)
    batch3  Encounter → ServiceRequest → ImagingStudy → Observation → DiagnosticReport
    batch4  batch3 with the study routed from the PACS to the DICOM Router after the ServiceRequest

Orchestration only: every step is a task (tasks/), every id goes into the result and the run's artifact. A run
that fails names its step and what it had created; running it again with the same input adopts what exists.
"""

from typing import Any

from prefect import flow

from clients.errors import ImagingStudyNotReady
from flows.steps import StepRecorder
from models.inputs import Batch1Input, Batch2Input, Batch3Input, Batch4Input
from tasks import runtime
from tasks.artifacts import publish_summary
from tasks.dicom import locate_study, route_study
from tasks.fhir import (
    post_diagnostic_report,
    post_encounter,
    post_observation,
    post_service_request,
    wait_for_imaging_study,
)

FLOW_OPTIONS: dict[str, Any] = {"persist_result": True, "result_serializer": "json", "validate_parameters": True}


@flow(name="batch1", flow_run_name="batch1 {payload.noacsn}", **FLOW_OPTIONS)
async def batch1(payload: Batch1Input) -> dict[str, Any]:
    """Register the visit and the radiology order: Encounter, then the ServiceRequest carrying the ACSN."""
    run = StepRecorder("batch1")
    await _order(run, payload)
    await publish_summary("batch1", payload.noacsn, run.created, run.durations_s)
    return dict(run.created)


@flow(name="batch2", flow_run_name="batch2 {payload.identifier_value}", **FLOW_OPTIONS)
async def batch2(payload: Batch2Input) -> dict[str, Any]:
    """File the reading and the report for an order whose ImagingStudy exists: Observation, DiagnosticReport."""
    run = StepRecorder("batch2")
    links = {
        "encounter_id": payload.encounter_id,
        "service_request_id": payload.service_request_id,
        "imaging_study_id": payload.imaging_study_id,
    }
    await _report(run, payload, links)
    await publish_summary("batch2", payload.noacsn, run.created, run.durations_s)
    return dict(run.created)


@flow(name="batch3", flow_run_name="batch3 {payload.noacsn}", **FLOW_OPTIONS)
async def batch3(payload: Batch3Input) -> dict[str, Any]:
    """The whole exam when the modality sent the images to the router itself: the study is looked up by ACSN."""
    run = StepRecorder("batch3")
    links = await _order(run, payload)
    deadline = runtime.settings().imaging_study_deadline_s
    study = await run.step("imaging_study", wait_for_imaging_study(payload.noacsn, 1, deadline))
    links["imaging_study_id"] = run.created["imaging_study_id"] = study["id"]
    await _report(run, payload, links)
    await publish_summary("batch3", payload.noacsn, run.created, run.durations_s)
    return dict(run.created)


@flow(name="batch4", flow_run_name="batch4 {payload.noacsn}", **FLOW_OPTIONS)
async def batch4(payload: Batch4Input) -> dict[str, Any]:
    """The whole exam with the images from the PACS: order, route the study, wait for its ImagingStudy, report."""
    run = StepRecorder("batch4")
    acsn = payload.dicom_accession
    patient_id = payload.patientid or payload.subject_id
    # Before anything is created: a study missing from the PACS stops the run with nothing half-sent.
    await run.step("dicom_process", locate_study(study_instance_uid=payload.study))
    links = await _order(run, payload)
    routed = await run.step("dicom_process", route_study(payload.study, acsn, patient_id))
    run.created["dicom_process"] = {
        "status": routed["status"],
        "study_uid": routed["study_uid"],
        "router": routed["router"],
    }
    study = await run.step(
        "imaging_study", _imaging_study_with_one_resend(payload.study, acsn, patient_id, routed["sent_instance"])
    )
    links["imaging_study_id"] = run.created["imaging_study_id"] = study["id"]
    await _report(run, payload, links)
    summary = {
        **run.created,
        "instances_sent": routed["sent_instance"],
        "instances_in_imaging_study": study["instances"],
    }
    await publish_summary("batch4", acsn, summary, run.durations_s)
    return dict(run.created)


async def _order(run: StepRecorder, payload: Batch1Input) -> dict[str, str]:
    encounter_id = await run.step("encounter", post_encounter(payload), result_key="encounter_id")
    service_request_id = await run.step(
        "service_request", post_service_request(payload, encounter_id), result_key="service_request_id"
    )
    return {"encounter_id": encounter_id, "service_request_id": service_request_id}


async def _report(run: StepRecorder, payload: Batch2Input | Batch3Input, links: dict[str, str]) -> None:
    observation_id = await run.step("observation", post_observation(payload, **links), result_key="observation_id")
    await run.step(
        "diagnostic_report",
        post_diagnostic_report(payload, **links, observation_id=observation_id),
        result_key="diagnostic_report_id",
    )


async def _imaging_study_with_one_resend(
    study_uid: str, acsn: str, patient_id: str | None, expected: int
) -> dict[str, Any]:
    """Wait for the router's ImagingStudy; if it never comes (the router drops failed studies), send once more."""
    deadline = runtime.settings().imaging_study_deadline_s
    try:
        return await wait_for_imaging_study(acsn, expected, deadline)
    except ImagingStudyNotReady:
        await route_study.with_options(refresh_cache=True)(study_uid, acsn, patient_id)
        return await wait_for_imaging_study(acsn, expected, deadline)
