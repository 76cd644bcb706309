"""batch1–batch4: the existing gateway's chained workflows, as Prefect flows that resume instead of repeating.

    batch1  Encounter → ServiceRequest
    batch2  Observation → DiagnosticReport                (Encounter, ServiceRequest, ImagingStudy exist)
    batch3  Encounter → ServiceRequest → ImagingStudy → Observation → DiagnosticReport
    batch4  batch3 with the study routed from the PACS to the DICOM Router after the ServiceRequest

Orchestration only: every step is a task (tasks/), every id goes into the result and the run's artifact. A run
that fails names its step and what it had created; running it again with the same input adopts what exists.

The bodies (`run_batch1`..`run_batch4`) take their steps as a `Steps`: the flows pass the Prefect tasks (a task
run per step, results cached on identifiers); the poller's light mode (POLL_ORDER_RUNS=task, flows/poll.py) runs
a body inside one task run per order and passes `light_steps()`, the same functions without a task run each, which
is what lets a worker drain a backlog without the Prefect server becoming the bottleneck. Both are safe to run
again: every create is create-or-adopt on the platform, and the routing stays a cached task in both.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prefect import flow

from clients.errors import ImagingStudyNotReady
from flows.steps import StepRecorder
from models.fhir import StudyFacts
from models.inputs import Batch1Input, Batch2Input, Batch3Input, Batch4Input
from tasks import runtime
from tasks.artifacts import publish_summary
from tasks.dicom import check_router, locate_study, route_study
from tasks.fhir import (
    ImagingStudyAbsent,
    post_diagnostic_report,
    post_encounter,
    post_observation,
    post_service_request,
    resolve_people,
    wait_for_imaging_study,
)

DICOM_PROCESS_KEYS = (
    "status",
    "study_uid",
    "total_instance",
    "sent_instance",
    "patient_modified",
    "accession_modified",
    "router",
)
"""batch4's `dicom_process`: the seven keys the existing gateway's routing answered with."""


@dataclass(frozen=True)
class Steps:
    """The calls a batch body makes, and whether it publishes its summary artifact."""

    post_encounter: Callable[..., Awaitable[dict[str, Any]]]
    post_service_request: Callable[..., Awaitable[dict[str, Any]]]
    post_observation: Callable[..., Awaitable[dict[str, Any]]]
    post_diagnostic_report: Callable[..., Awaitable[dict[str, Any]]]
    wait_for_imaging_study: Callable[..., Awaitable[dict[str, Any]]]
    locate_study: Callable[..., Awaitable[dict[str, Any]]]
    check_router: Callable[..., Awaitable[dict[str, Any]]]
    resolve_people: Callable[..., Awaitable[Any]]
    route_study: Callable[..., Awaitable[dict[str, Any]]]
    route_study_again: Callable[..., Awaitable[dict[str, Any]]]
    publish: bool = True


def task_steps() -> Steps:
    """A task run per step (the flows): each step retried on its own, FHIR ids and the routing cached.

    Built at each call from this module's names, so a test that swaps a task here swaps it in the flows too."""
    return Steps(
        post_encounter=post_encounter,
        post_service_request=post_service_request,
        post_observation=post_observation,
        post_diagnostic_report=post_diagnostic_report,
        wait_for_imaging_study=wait_for_imaging_study,
        locate_study=locate_study,
        check_router=check_router,
        resolve_people=resolve_people,
        route_study=route_study,
        route_study_again=route_study.with_options(refresh_cache=True),
    )


def light_steps() -> Steps:
    """Inside one task run per order (the poller's light mode): the FHIR steps and the study lookup are plain
    calls, retried with the order (create-or-adopt makes that safe); the routing stays a cached task run, so a
    retried order never sends its study twice. No artifact: the ids go to the RIS table, counts to the poll's."""
    return Steps(
        post_encounter=post_encounter.fn,
        post_service_request=post_service_request.fn,
        post_observation=post_observation.fn,
        post_diagnostic_report=post_diagnostic_report.fn,
        wait_for_imaging_study=wait_for_imaging_study.fn,
        locate_study=locate_study.fn,
        check_router=check_router.fn,
        resolve_people=resolve_people.fn,
        route_study=route_study,
        route_study_again=route_study.with_options(refresh_cache=True),
        publish=False,
    )


FLOW_OPTIONS: dict[str, Any] = {"persist_result": True, "result_serializer": "json", "validate_parameters": True}


@flow(name="batch1", flow_run_name="batch1 {payload.noacsn}", **FLOW_OPTIONS)
async def batch1(payload: Batch1Input) -> dict[str, Any]:
    """Register the visit and the radiology order: Encounter, then the ServiceRequest carrying the ACSN."""
    return await run_batch1(payload)


async def run_batch1(payload: Batch1Input, steps: Steps | None = None) -> dict[str, Any]:
    steps = steps or task_steps()
    run = StepRecorder("batch1")
    payload = await run.step("people", steps.resolve_people(payload))
    await _order(run, payload, steps)
    if steps.publish:
        await publish_summary("batch1", payload.noacsn, run.created, run.durations_s)
    return dict(run.created)


@flow(name="batch2", flow_run_name="batch2 {payload.identifier_value}", **FLOW_OPTIONS)
async def batch2(payload: Batch2Input) -> dict[str, Any]:
    """File the reading and the report for an order whose ImagingStudy exists: Observation, DiagnosticReport."""
    return await run_batch2(payload)


async def run_batch2(payload: Batch2Input, steps: Steps | None = None) -> dict[str, Any]:
    steps = steps or task_steps()
    run = StepRecorder("batch2")
    payload = await run.step("people", steps.resolve_people(payload))
    links = {
        "encounter_id": payload.encounter_id,
        "service_request_id": payload.service_request_id,
        "imaging_study_id": payload.imaging_study_id,
    }
    await _report(run, payload, links, steps)
    if steps.publish:
        await publish_summary("batch2", payload.noacsn, run.created, run.durations_s)
    return dict(run.created)


@flow(name="batch3", flow_run_name="batch3 {payload.noacsn}", **FLOW_OPTIONS)
async def batch3(payload: Batch3Input) -> dict[str, Any]:
    """The whole exam when the modality sent the images to the router itself: the study is looked up by ACSN."""
    return await run_batch3(payload)


async def run_batch3(payload: Batch3Input, steps: Steps | None = None) -> dict[str, Any]:
    steps = steps or task_steps()
    run = StepRecorder("batch3")
    payload = await run.step("people", steps.resolve_people(payload))
    links = await _order(run, payload, steps)
    deadline = runtime.settings().imaging_study_deadline_s
    study = await run.step("imaging_study", steps.wait_for_imaging_study(payload.noacsn, 1, deadline))
    links["imaging_study_id"] = run.created["imaging_study_id"] = study["id"]
    await _report(run, payload, links, steps)
    if steps.publish:
        await publish_summary("batch3", payload.noacsn, run.created, run.durations_s)
    return dict(run.created)


@flow(name="batch4", flow_run_name="batch4 {payload.noacsn}", **FLOW_OPTIONS)
async def batch4(payload: Batch4Input) -> dict[str, Any]:
    """The whole exam with the images from the PACS: order, route the study, wait for its ImagingStudy, report."""
    return await run_batch4(payload)


async def run_batch4(payload: Batch4Input, steps: Steps | None = None) -> dict[str, Any]:
    steps = steps or task_steps()
    run = StepRecorder("batch4")
    # Before anything is created: a NIK the platform does not know, a study missing from the PACS, one the router
    # would mangle, or a router that does not answer to ROUTER_AET stops the run with nothing half-sent.
    payload = await run.step("people", steps.resolve_people(payload))
    acsn = payload.dicom_accession
    patient_id = payload.patientid or payload.subject_id
    study = await run.step("dicom_process", steps.locate_study(study_instance_uid=payload.study))
    facts = StudyFacts.from_located(study)  # the exam's modality, UID and time, from the PACS
    await run.step("router_echo", steps.check_router())
    links = await _order(run, payload, steps, facts)
    routed = await run.step("dicom_process", steps.route_study(payload.study, acsn, patient_id, study["times"]))
    run.created["dicom_process"] = {key: routed[key] for key in DICOM_PROCESS_KEYS}
    imaging = await run.step(
        "imaging_study",
        _imaging_study(steps, payload.study, acsn, patient_id, routed["sent_instance"], study["times"]),
    )
    links["imaging_study_id"] = run.created["imaging_study_id"] = imaging["id"]
    if imaging.get("duplicates"):
        run.created["imaging_study_duplicates"] = imaging["duplicates"]
    await _report(run, payload, links, steps, facts)
    summary = {
        **run.created,
        "instances_sent": routed["sent_instance"],
        "instances_in_imaging_study": imaging["instances"],
    }
    if steps.publish:
        await publish_summary("batch4", acsn, summary, run.durations_s)
    return dict(run.created)


async def _order(
    run: StepRecorder, payload: Batch1Input, steps: Steps, study: StudyFacts | None = None
) -> dict[str, str]:
    encounter_id = await run.post("encounter", steps.post_encounter(payload), result_key="encounter_id")
    service_request_id = await run.post(
        "service_request",
        steps.post_service_request(payload, encounter_id, **_with(study)),
        result_key="service_request_id",
    )
    return {"encounter_id": encounter_id, "service_request_id": service_request_id}


async def _report(
    run: StepRecorder,
    payload: Batch2Input | Batch3Input,
    links: dict[str, str],
    steps: Steps,
    study: StudyFacts | None = None,
) -> None:
    observation_id = await run.post(
        "observation", steps.post_observation(payload, **links, **_with(study)), result_key="observation_id"
    )
    await run.post(
        "diagnostic_report",
        steps.post_diagnostic_report(payload, **links, observation_id=observation_id, **_with(study)),
        result_key="diagnostic_report_id",
    )


def _with(study: StudyFacts | None) -> dict[str, StudyFacts]:
    """`study=` only when the flow knows the PACS study (batch4): the other batches' task inputs, and so their
    cache keys, stay as they were."""
    return {"study": study} if study is not None else {}


async def _imaging_study(
    steps: Steps,
    study_uid: str,
    acsn: str,
    patient_id: str | None,
    expected: int,
    times: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Wait for the router's ImagingStudy; if none complete comes by IMAGING_STUDY_DEADLINE_S, send once more, but
    never while the router may still be building the first (that would make a second ImagingStudy).

    The router gives no signal but the ImagingStudy appearing. So: when one of the study exists but lists fewer
    instances, the router has finished with that send, and a re-send replaces it (the router PUTs over what its
    search finds). When none exists at all, the first may still be in flight: wait IMAGING_STUDY_RESEND_GRACE_S
    longer, and re-send only if still none appeared. IMAGING_STUDY_RESEND=false fails instead of re-sending.
    Whatever is chosen at the end is the most complete ImagingStudy of the study; any other is reported.
    """
    settings = runtime.settings()
    deadline = settings.imaging_study_deadline_s
    try:
        return await steps.wait_for_imaging_study(acsn, expected, deadline, study_instance_uid=study_uid)
    except ImagingStudyAbsent:
        if not settings.imaging_study_resend:
            raise
        if settings.imaging_study_resend_grace_s > 0:
            try:
                late = await steps.wait_for_imaging_study(
                    acsn,
                    expected,
                    settings.imaging_study_resend_grace_s,
                    study_instance_uid=study_uid,
                    accept_incomplete=True,
                )
                if late["instances"] >= expected:
                    return late
            except ImagingStudyAbsent:
                pass
    except ImagingStudyNotReady:
        if not settings.imaging_study_resend:
            raise
    await steps.route_study_again(study_uid, acsn, patient_id, times)
    return await steps.wait_for_imaging_study(acsn, expected, deadline, study_instance_uid=study_uid)
