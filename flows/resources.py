"""One flow per resource, for the existing gateway's single-resource endpoints and for manual fixes in the UI:
encounter, service request, observation, conclusion (DiagnosticReport), and the ImagingStudy lookup by ACSN."""

from typing import Any

from prefect import flow

from clients.errors import ImagingStudyNotReady
from flows.batches import FLOW_OPTIONS
from flows.steps import StepRecorder
from models.inputs import DiagnosticReportInput, EncounterInput, ObservationInput, ServiceRequestInput
from tasks.artifacts import publish_summary
from tasks.fhir import (
    find_imaging_study,
    post_diagnostic_report,
    post_encounter,
    post_observation,
    post_service_request,
    read_resource,
)


@flow(name="encounter", flow_run_name="encounter {payload.identifier_value}", **FLOW_OPTIONS)
async def encounter(payload: EncounterInput) -> dict[str, Any]:
    """Create (or adopt) one Encounter; returns the resource as the platform holds it."""
    run = StepRecorder("encounter")
    resource_id = await run.post("encounter", post_encounter(payload), result_key="encounter_id")
    return await _finish(run, "Encounter", resource_id, None)


@flow(name="service-request", flow_run_name="service-request {payload.noacsn}", **FLOW_OPTIONS)
async def service_request(payload: ServiceRequestInput) -> dict[str, Any]:
    """Create (or adopt) one ServiceRequest (the order with its ACSN) for an existing Encounter."""
    run = StepRecorder("service-request")
    resource_id = await run.post("service_request", post_service_request(payload), result_key="service_request_id")
    return await _finish(run, "ServiceRequest", resource_id, payload.noacsn)


@flow(name="observation", flow_run_name="observation {payload.identifier_value}", **FLOW_OPTIONS)
async def observation(payload: ObservationInput) -> dict[str, Any]:
    """Create (or adopt) one Observation (the reading) for an existing order and ImagingStudy."""
    run = StepRecorder("observation")
    resource_id = await run.post("observation", post_observation(payload), result_key="observation_id")
    return await _finish(run, "Observation", resource_id, payload.noacsn)


@flow(name="conclusion", flow_run_name="conclusion {payload.identifier_value}", **FLOW_OPTIONS)
async def conclusion(payload: DiagnosticReportInput) -> dict[str, Any]:
    """Create (or adopt) one DiagnosticReport (the conclusion) for an existing order, study and reading."""
    run = StepRecorder("conclusion")
    resource_id = await run.post(
        "diagnostic_report", post_diagnostic_report(payload), result_key="diagnostic_report_id"
    )
    return await _finish(run, "DiagnosticReport", resource_id, payload.noacsn)


@flow(name="imaging-lookup", flow_run_name="imaging-lookup {acsn}", **FLOW_OPTIONS)
async def imaging_lookup(acsn: str) -> dict[str, Any]:
    """The ImagingStudy the DICOM Router made for an accession number: {"imagingStudy_id"} or a failure."""
    run = StepRecorder("imaging-lookup")
    found = await run.step("imaging_study", find_imaging_study(acsn))
    if found is None:
        raise ImagingStudyNotReady(f"no ImagingStudy found for ACSN {acsn}")
    run.created.update(imagingStudy_id=found["id"], series=found["series"], instances=found["instances"])
    await publish_summary("imaging-lookup", acsn, run.created, run.durations_s)
    return {"imagingStudy_id": found["id"]}


async def _finish(run: StepRecorder, resource_type: str, resource_id: str, acsn: str | None) -> dict[str, Any]:
    resource = await run.step("read_back", read_resource(resource_type, resource_id))
    await publish_summary(run.flow, acsn, run.created, run.durations_s)
    return resource
