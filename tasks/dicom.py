"""Prefect tasks for the DICOM side: find the study in the PACS, route it to the SATUSEHAT DICOM Router.

One task per study, not per instance: the instances stream through `clients.routing.route_study` inside one
task run, because the official router builds the ImagingStudy per association and datasets must never become
task results (they would be pickled to disk with the patient's data in them).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from clients import routing
from clients.pacs import StudyRef
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
    """The PACS study by Study Instance UID (preferred) or accession number: uid, accession, counts, modalities."""
    found = await call(_find_study, accession_number=accession_number, study_instance_uid=study_instance_uid)
    return asdict(found)


def _find_study(**query: str | None) -> StudyRef:
    """Runs in an I/O thread and uses that thread's PACS client: a requests.Session must not be shared between the
    threads that several flow runs of one process call from (`runtime.pacs()` resolved in the event loop would be
    one client for all of them)."""
    return runtime.pacs().find_study(**query)


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
async def route_study(study_instance_uid: str, accession_number: str, patient_id: str | None = None) -> dict[str, Any]:
    """Stream the study from the PACS, set ACSN (and IHS number), C-STORE it in one association to the router."""
    report = await call(
        _route_study, study_instance_uid=study_instance_uid, accession_number=accession_number, patient_id=patient_id
    )
    return {**report.as_response(), "elapsed_s": round(report.elapsed_s, 3)}


def _route_study(*, study_instance_uid: str, accession_number: str, patient_id: str | None) -> routing.RoutingReport:
    """Runs in an I/O thread: that thread's PACS client (see `_find_study`), the process's router client (its
    association slots are process-wide on purpose)."""
    return routing.route_study(
        runtime.pacs(),
        runtime.router(),
        study_instance_uid=study_instance_uid,
        accession_number=accession_number,
        patient_id=patient_id,
    )
