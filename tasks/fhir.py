"""Prefect tasks for SATUSEHAT: one per FHIR resource posted, plus the ImagingStudy lookup and wait.

Each task is a thin wrapper: a pure builder (models/fhir.py) makes the resource, the shared client
(clients/satusehat.py) posts it, Prefect retries what is `Retryable`. What makes re-runs safe:

- Every create is create-or-adopt: search by the resource's own identifier first, post only if nothing is there,
  and adopt on a duplicate. A POST whose answer was lost (timeout, 504 after commit) is found on the next attempt.
- Results are cached on stable identifiers (platform, org, identifier), persisted as JSON, and hold only ids.
  A flow re-run after a failure at any step skips what already succeeded without asking the platform again.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from prefect import task
from prefect.context import TaskRunContext

from clients.errors import FhirRejected, ImagingStudyNotReady, Retryable
from models import fhir
from models.fhir import DICOM_UID_SYSTEM, IdentifierKind, identifier_system
from models.inputs import (
    DiagnosticReportInput,
    EncounterInput,
    ObservationInput,
    ServiceRequestInput,
)
from tasks import runtime
from tasks.retry import FHIR_RETRIES, FHIR_RETRY_DELAYS_S, JITTER, honour_retry_after, retry_when_retryable

T = TypeVar("T")

CACHE_FOR = timedelta(days=30)
"""How long a created resource's id is remembered locally; after that a re-run asks the platform again."""

IMAGING_STUDY_POLL_FIRST_S = 0.25
IMAGING_STUDY_POLL_MAX_S = 10.0


async def in_thread(operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`asyncio.to_thread` on the process's I/O pool (runtime.io_pool), with the caller's context."""
    context = contextvars.copy_context()
    call_ = functools.partial(context.run, operation, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(runtime.io_pool(), call_)


async def call(operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking client call in an I/O thread; on a Retryable error, wait its Retry-After first."""
    try:
        return await in_thread(operation, *args, **kwargs)
    except Retryable as error:
        await honour_retry_after(error)
        raise


def _identity_key(kind: str, value_of: Callable[[dict[str, Any]], str]) -> Callable[..., str]:
    """Cache key: the platform, the org and the identifier the resource is found by (never the patient).

    Hashed, because Prefect stores the result under the key as a file name.
    """

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        settings = runtime.settings()
        identity = f"{kind}|{settings.fhir_base}|{settings.ss_org_id}|{value_of(parameters)}"
        return f"{kind.lower()}-{hashlib.sha256(identity.encode()).hexdigest()[:32]}"

    return key


def _order_value(name: str) -> Callable[[dict[str, Any]], str]:
    return lambda parameters: fhir.resource_identifier_value(parameters[name])


FHIR_TASK: dict[str, Any] = {
    "retries": FHIR_RETRIES,
    "retry_delay_seconds": FHIR_RETRY_DELAYS_S,
    "retry_jitter_factor": JITTER,
    "retry_condition_fn": retry_when_retryable,
    "persist_result": True,
    "result_serializer": "json",
    "cache_expiration": CACHE_FOR,
}


async def _create_or_adopt(resource: dict[str, Any]) -> str:
    settings = runtime.settings()
    system, _ = fhir.lookup_identifier(resource, settings.ss_org_id)
    created = await call(runtime.satusehat().create_or_adopt, resource, system)
    return created.id


@task(
    name="post-encounter",
    cache_key_fn=_identity_key("Encounter", lambda p: p["visit"].identifier_value),
    **FHIR_TASK,
)
async def post_encounter(visit: EncounterInput) -> str:
    """Create (or adopt) the Encounter; returns its id."""
    return await _create_or_adopt(fhir.build_encounter(visit, runtime.settings().ss_org_id))


@task(name="post-service-request", cache_key_fn=_identity_key("ServiceRequest", _order_value("order")), **FHIR_TASK)
async def post_service_request(order: ServiceRequestInput, encounter_id: str | None = None) -> str:
    """Create (or adopt) the ServiceRequest carrying the ACSN; returns its id. It must exist before DICOM is sent."""
    resource = fhir.build_service_request(order, runtime.settings().ss_org_id, encounter_id=encounter_id)
    return await _create_or_adopt(resource)


@task(name="post-observation", cache_key_fn=_identity_key("Observation", _order_value("reading")), **FHIR_TASK)
async def post_observation(
    reading: ObservationInput,
    encounter_id: str | None = None,
    service_request_id: str | None = None,
    imaging_study_id: str | None = None,
) -> str:
    """Create (or adopt) the Observation holding the radiologist's reading; returns its id."""
    resource = fhir.build_observation(
        reading,
        runtime.settings().ss_org_id,
        encounter_id=encounter_id,
        service_request_id=service_request_id,
        imaging_study_id=imaging_study_id,
    )
    return await _create_or_adopt(resource)


@task(
    name="post-diagnostic-report", cache_key_fn=_identity_key("DiagnosticReport", _order_value("report")), **FHIR_TASK
)
async def post_diagnostic_report(
    report: DiagnosticReportInput,
    encounter_id: str | None = None,
    service_request_id: str | None = None,
    imaging_study_id: str | None = None,
    observation_id: str | None = None,
) -> str:
    """Create (or adopt) the DiagnosticReport (the conclusion); returns its id."""
    resource = fhir.build_diagnostic_report(
        report,
        runtime.settings().ss_org_id,
        encounter_id=encounter_id,
        service_request_id=service_request_id,
        imaging_study_id=imaging_study_id,
        observation_id=observation_id,
    )
    return await _create_or_adopt(resource)


def _acsn_system() -> str:
    return identifier_system(IdentifierKind.ACSN, runtime.settings().ss_org_id)


@task(
    name="find-imaging-study",
    retries=FHIR_RETRIES,
    retry_delay_seconds=FHIR_RETRY_DELAYS_S,
    retry_jitter_factor=JITTER,
    retry_condition_fn=retry_when_retryable,
)
async def find_imaging_study(accession_number: str) -> dict[str, Any] | None:
    """The newest ImagingStudy for the ACSN, as {id, series, instances}, or None if the router made none (yet)."""
    found = await call(runtime.satusehat().find_by_identifier, "ImagingStudy", _acsn_system(), accession_number)
    return _imaging_summary(found[0]) if found else None


class ImagingStudyAbsent(ImagingStudyNotReady):
    """At the deadline the platform had no ImagingStudy of the study at all: the router may still be building
    the first (a re-send now would make a second), or it dropped the study."""


@task(name="wait-for-imaging-study", retries=0)
async def wait_for_imaging_study(
    accession_number: str,
    expected_instances: int,
    deadline_s: float,
    study_instance_uid: str | None = None,
    accept_incomplete: bool = False,
) -> dict[str, Any]:
    """Poll until the router's ImagingStudy for the ACSN lists every instance sent; raise ImagingStudyNotReady,
    or ImagingStudyAbsent when there was none of the study at all.

    The router builds it only after the association's release, asynchronously: an empty search is "not yet",
    not an error, and so is a platform hiccup while polling. The polling is this task's own retry loop.
    With `study_instance_uid` (batch4 knows what it sent), an ImagingStudy the router built earlier for the same
    ACSN from another study (a study corrected at the modality, sent again) is "not yet" too, not the answer.

    Every ImagingStudy of the ACSN and study is looked at, not the newest only: a router slower than a re-send
    makes two (`choose_imaging_study`). The answer is {id, series, instances, duplicates}, `duplicates` being
    the ids of the others. `accept_incomplete` returns the first one seen even if it lists fewer instances (the
    router has finished a build: a re-send then replaces it instead of making a second).
    """
    client = runtime.satusehat()
    system = _acsn_system()
    delay = IMAGING_STUDY_POLL_FIRST_S
    deadline = time.monotonic() + deadline_s
    seen_any = False
    last_problem = "no ImagingStudy yet"
    while True:
        try:
            found = await in_thread(client.find_by_identifier, "ImagingStudy", system, accession_number)
        except Retryable as error:
            found, last_problem = [], f"the platform did not answer the search ({error.message})"
        except FhirRejected:
            raise
        ours = [resource for resource in found if _of_study(resource, study_instance_uid)]
        if found and not ours:
            last_problem = f"the ImagingStudy for the ACSN is of another study, not {study_instance_uid}"
        if ours:
            seen_any = True
            chosen = choose_imaging_study([_imaging_summary(resource) for resource in ours], expected_instances)
            if chosen["instances"] >= expected_instances or accept_incomplete:
                return chosen
            last_problem = f"the ImagingStudy lists {chosen['instances']} of {expected_instances} instances sent"
        if time.monotonic() + delay > deadline:
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, IMAGING_STUDY_POLL_MAX_S)
    error = ImagingStudyNotReady if seen_any else ImagingStudyAbsent
    raise error(f"no complete ImagingStudy for ACSN {accession_number} after {deadline_s:.0f} s: {last_problem}")


def choose_imaging_study(summaries: list[dict[str, Any]], expected_instances: int) -> dict[str, Any]:
    """Of several ImagingStudies of one study (newest first, as searched), the one to link: the most instances,
    and of equals the oldest, the one the first send made (a later duplicate may list the instances while the
    platform holds their images under the first). The others' ids go in `duplicates`."""
    ranked = sorted(
        enumerate(summaries), key=lambda item: (min(item[1]["instances"], expected_instances), item[0]), reverse=True
    )
    chosen = ranked[0][1]
    return {**chosen, "duplicates": [summary["id"] for summary in summaries if summary["id"] != chosen["id"]]}


def _of_study(resource: dict[str, Any], study_instance_uid: str | None) -> bool:
    """Whether the ImagingStudy is of that study: its `urn:dicom:uid` identifier (the router writes
    `urn:oid:<StudyInstanceUID>`) names it; one without that identifier cannot say otherwise."""
    if study_instance_uid is None:
        return True
    uids = [
        str(identifier.get("value", "")).removeprefix("urn:oid:")
        for identifier in resource.get("identifier", [])
        if identifier.get("system") == DICOM_UID_SYSTEM
    ]
    return not uids or study_instance_uid in uids


def _imaging_summary(resource: dict[str, Any]) -> dict[str, Any]:
    """Id and counts, from the instances actually listed (numberOfInstances could disagree with them)."""
    series = resource.get("series", [])
    return {
        "id": resource["id"],
        "series": len(series),
        "instances": sum(len(item.get("instance", [])) for item in series),
    }


@task(
    name="read-resource",
    retries=FHIR_RETRIES,
    retry_delay_seconds=FHIR_RETRY_DELAYS_S,
    retry_jitter_factor=JITTER,
    retry_condition_fn=retry_when_retryable,
)
async def read_resource(resource_type: str, resource_id: str) -> dict[str, Any]:
    """The resource as the platform holds it (what the single-resource endpoints answer with)."""
    return await call(runtime.satusehat().read, resource_type, resource_id)
