"""Prefect tasks for the DICOM side: find the study in the PACS, route it to the SATUSEHAT DICOM Router.

One task per study, not per instance: the instances stream through `clients.routing.route_study` inside one
task run, because the official router builds the ImagingStudy per association and datasets must never become
task results (they would be pickled to disk with the patient's data in them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from clients import routing
from clients.pacs import StudyRef
from models.dicom import StudyCheck, TimeEdits
from tasks import runtime
from tasks.fhir import call
from tasks.retry import (
    DICOM_RETRIES,
    DICOM_RETRY_DELAYS_S,
    FHIR_RETRIES,
    FHIR_RETRY_DELAYS_S,
    JITTER,
    retry_when_retryable,
)


@task(
    name="locate-study",
    retries=FHIR_RETRIES,
    retry_delay_seconds=FHIR_RETRY_DELAYS_S,
    retry_jitter_factor=JITTER,
    retry_condition_fn=retry_when_retryable,
)
async def locate_study(study_instance_uid: str | None = None, accession_number: str | None = None) -> dict[str, Any]:
    """The PACS study by Study Instance UID (preferred) or accession number, checked before anything is created.

    Returns the QIDO answer (uid, accession, counts, modalities) and what the pre-flight read from every instance's
    metadata: `instances`, `series`, `modalities`, `description` (StudyDescription), `started` (StudyDate +
    StudyTime in STUDY_TIMEZONE, ISO 8601 with its offset) and `times`, the StudyTime/SeriesTime edit that
    `route_study` makes. Raises StudyNotFound (no such study), AmbiguousStudy (an ACSN of several studies) and
    StudyNotRoutable (an instance the router would mangle: each named with the element and the rule).
    """
    found, check = await call(_find_and_check, accession_number=accession_number, study_instance_uid=study_instance_uid)
    return {**asdict(found), **study_facts(check)}


def study_facts(check: StudyCheck) -> dict[str, Any]:
    """What the FHIR steps may take from the PACS study (JSON: a task result)."""
    return {
        "instances": check.instances,
        "series": check.series,
        "modalities": list(check.modalities),
        "description": check.description,
        "started": check.started.isoformat() if check.started is not None else None,
        "times": check.times.as_json() if check.times is not None else None,
    }


def _find_and_check(**query: str | None) -> tuple[StudyRef, StudyCheck]:
    """Runs in an I/O thread and uses that thread's PACS client: a requests.Session must not be shared between the
    threads that several flow runs of one process call from (`runtime.pacs()` resolved in the event loop would be
    one client for all of them)."""
    pacs = runtime.pacs()
    found = pacs.find_study(**query)
    check = routing.preflight_study(
        pacs, found.study_instance_uid, zone=runtime.settings().study_zone, now=datetime.now(UTC)
    )
    return found, check


@task(
    name="check-router",
    retries=DICOM_RETRIES,
    retry_delay_seconds=DICOM_RETRY_DELAYS_S,
    retry_jitter_factor=JITTER,
    retry_condition_fn=retry_when_retryable,
)
async def check_router() -> dict[str, Any]:
    """C-ECHO the router (ROUTER_AET at ROUTER_IP:ROUTER_PORT) before the first FHIR resource is created."""
    outcome = await call(_verify_router)
    return {"router": outcome.router, "elapsed_s": round(outcome.elapsed_s, 3)}


def _verify_router() -> Any:
    return routing.verify_router(runtime.router())


def _routing_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The same study, edited the same way, to the same router: sent once, whatever re-runs the flow."""
    settings = runtime.settings()
    identity = "|".join(
        str(part)
        for part in (
            settings.router_ip,
            settings.router_port,
            settings.router_aet,
            parameters["study_instance_uid"],
            parameters["accession_number"],
            parameters.get("patient_id"),
        )
    )
    if parameters.get("times"):  # the time edit changes what is sent; without one, the key is what it always was
        identity += "|" + json.dumps(parameters["times"], sort_keys=True)
    return "route-study-" + hashlib.sha256(identity.encode()).hexdigest()[:32]


@task(
    name="route-study",
    retries=DICOM_RETRIES,
    retry_delay_seconds=DICOM_RETRY_DELAYS_S,
    retry_jitter_factor=JITTER,
    retry_condition_fn=retry_when_retryable,
    cache_key_fn=_routing_key,
    cache_expiration=timedelta(days=30),
    persist_result=True,
    result_serializer="json",
)
async def route_study(
    study_instance_uid: str,
    accession_number: str,
    patient_id: str | None = None,
    times: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream the study from the PACS, set ACSN (and IHS number), C-STORE it in one association to the router.

    `times` is `locate_study`'s: StudyTime and SeriesDate/SeriesTime written as the router reads them."""
    report = await call(
        _route_study,
        study_instance_uid=study_instance_uid,
        accession_number=accession_number,
        patient_id=patient_id,
        times=TimeEdits.from_json(times) if times else None,
    )
    return {**report.as_response(), "elapsed_s": round(report.elapsed_s, 3)}


def _route_study(
    *, study_instance_uid: str, accession_number: str, patient_id: str | None, times: TimeEdits | None
) -> routing.RoutingReport:
    """Runs in an I/O thread: that thread's PACS client (see `_find_and_check`), the process's router client (its
    association slots are process-wide on purpose)."""
    return routing.route_study(
        runtime.pacs(),
        runtime.router(),
        study_instance_uid=study_instance_uid,
        accession_number=accession_number,
        patient_id=patient_id,
        times=times,
    )
