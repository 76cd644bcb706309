"""Prefect tasks for SATUSEHAT: one per FHIR resource posted, plus the ImagingStudy lookup and wait.

Each task is a thin wrapper: a pure builder (models/fhir.py) makes the resource, the shared client
(clients/satusehat.py) posts it, Prefect retries what is `Retryable`. What makes re-runs safe:

- Every create is create-or-adopt: search by the resource's own identifier first, post only if nothing is there,
  and adopt on a duplicate. A POST whose answer was lost (timeout, 504 after commit) is found on the next attempt.
  A match is adopted only when it is this order's (same patient, visit and ServiceRequest: models/revisions.py);
  another order's is a 409 naming the identifier. A match whose content differs is a correction and is revised
  (PUT, `amended`).
- Results are cached on the whole order (platform, org, every input and linked id), persisted as JSON, and hold
  only ids and element names. A flow re-run after a failure at any step skips what already succeeded without
  asking the platform again; a changed order never reuses another's cached id.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from prefect import task
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger
from pydantic import BaseModel

from clients.errors import FhirRejected, ImagingStudyNotReady, Rejected, Retryable
from models import fhir
from models.fhir import DICOM_UID_SYSTEM, IdentifierKind, IncompleteOrder, SiteDefaults, StudyFacts, identifier_system
from models.inputs import (
    DiagnosticReportInput,
    EncounterInput,
    GatewayInput,
    ObservationInput,
    ServiceRequestInput,
    UnresolvedNik,
    nik_lookups,
    with_people,
)
from models.timeutil import utc_now
from tasks import runtime
from tasks.events import HalfwayAlarm
from tasks.retry import FHIR_RETRIES, FHIR_RETRY_DELAYS_S, JITTER, honour_retry_after, retry_when_retryable

T = TypeVar("T")

Posted = dict[str, Any]
"""What a post task returns: {"id", "action": created | adopted | revised} and, for a revision, "changed" (the
elements replaced) and "previous_version". JSON, so Prefect persists it; ids and element names only."""

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


def _order_key(kind: str) -> Callable[..., str]:
    """Cache key: the platform, the org and the whole order as the task receives it (the patient, the visit, the
    linked Encounter, ServiceRequest and ImagingStudy ids, the codes and texts).

    A cached id is therefore only ever reused for the very same order: another patient's order with a reused
    visit number or ACSN misses the cache and meets create-or-adopt's identity check (a 409 naming the
    identifier), and a corrected reading misses it and is revised. Hashed, because Prefect stores the result
    under the key as a file name; no clinical value appears in it.
    """

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        settings = runtime.settings()
        order = json.dumps(
            {name: _jsonable(value) for name, value in parameters.items()}, sort_keys=True, ensure_ascii=False
        )
        identity = f"{kind}|{settings.fhir_base}|{settings.ss_org_id}|{order}"
        return f"{kind.lower()}-{hashlib.sha256(identity.encode()).hexdigest()[:40]}"

    return key


def _logger() -> Any:
    """The run's logger (its lines show in the Prefect UI), or the module's outside a run (a notebook, a test)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger(__name__)


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


FHIR_TASK: dict[str, Any] = {
    "retries": FHIR_RETRIES,
    "retry_delay_seconds": FHIR_RETRY_DELAYS_S,
    "retry_jitter_factor": JITTER,
    "retry_condition_fn": retry_when_retryable,
    "persist_result": True,
    "result_serializer": "json",
    "cache_expiration": CACHE_FOR,
}


def _site() -> SiteDefaults:
    """The hospital's configured defaults (ENCOUNTER_CLASS, SERVICE_REQUEST_PERFORMER, exam code settings)."""
    return SiteDefaults.from_settings(runtime.settings())


def _build(builder: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a builder; an input it cannot complete (no exam code, an unresolved NIK) is Rejected, not retried."""
    try:
        return builder(*args, **kwargs)
    except (IncompleteOrder, UnresolvedNik) as error:
        raise Rejected(str(error)) from None


async def _create_or_revise(resource: dict[str, Any]) -> dict[str, Any]:
    """Create, adopt (same order, same content) or revise (same order, corrected content) the resource;
    returns `Posted`: its id, what was done, and for a revision the elements replaced and the previous version."""
    settings = runtime.settings()
    system, _ = fhir.lookup_identifier(resource, settings.ss_org_id)
    outcome = await call(runtime.satusehat().create_or_revise, resource, system)
    posted: dict[str, Any] = {"id": outcome.id, "action": outcome.action}
    if not outcome.changed:  # the run's Logs tab says what each step did; ids only, never clinical values
        _logger().info("%s/%s %s", outcome.resource_type, outcome.id, outcome.action)
    if outcome.changed:
        posted.update(changed=list(outcome.changed), previous_version=outcome.previous_version)
        _logger().info(
            "%s/%s revised: %s replaced (previous version %s)",
            outcome.resource_type,
            outcome.id,
            ", ".join(outcome.changed),
            outcome.previous_version,
        )
    return posted


@task(
    name="post-encounter",
    cache_key_fn=_order_key("Encounter"),
    **FHIR_TASK,
)
async def post_encounter(visit: EncounterInput) -> Posted:
    """Create, adopt or revise the Encounter; returns `Posted` (its id and what was done)."""
    return await _create_or_revise(_build(fhir.build_encounter, visit, runtime.settings().ss_org_id, site=_site()))


@task(name="post-service-request", cache_key_fn=_order_key("ServiceRequest"), **FHIR_TASK)
async def post_service_request(
    order: ServiceRequestInput, encounter_id: str | None = None, study: StudyFacts | None = None
) -> Posted:
    """Create, adopt or revise the ServiceRequest carrying the ACSN; it must exist before DICOM is sent.
    `study` (batch4: the PACS study) gives the modality, the exam through EXAM_CODE_BY_MODALITY, and the UID."""
    resource = _build(
        fhir.build_service_request,
        order,
        runtime.settings().ss_org_id,
        encounter_id=encounter_id,
        site=_site(),
        study=study,
    )
    return await _create_or_revise(resource)


@task(name="post-observation", cache_key_fn=_order_key("Observation"), **FHIR_TASK)
async def post_observation(
    reading: ObservationInput,
    encounter_id: str | None = None,
    service_request_id: str | None = None,
    imaging_study_id: str | None = None,
    study: StudyFacts | None = None,
) -> Posted:
    """Create, adopt or revise (a corrected reading: `amended`) the Observation holding the radiologist's reading.
    `issued` is the HIS's `reading_time`, else now; `effectiveDateTime` the study's time when `study` knows it."""
    resource = _build(
        fhir.build_observation,
        reading,
        runtime.settings().ss_org_id,
        encounter_id=encounter_id,
        service_request_id=service_request_id,
        imaging_study_id=imaging_study_id,
        issued=utc_now(),
        site=_site(),
        study=study,
    )
    return await _create_or_revise(resource)


@task(name="post-diagnostic-report", cache_key_fn=_order_key("DiagnosticReport"), **FHIR_TASK)
async def post_diagnostic_report(
    report: DiagnosticReportInput,
    encounter_id: str | None = None,
    service_request_id: str | None = None,
    imaging_study_id: str | None = None,
    observation_id: str | None = None,
    study: StudyFacts | None = None,
) -> Posted:
    """Create, adopt or revise (a corrected conclusion: `amended`) the DiagnosticReport. `issued` is the HIS's
    `report_time`, else now; `effectiveDateTime` the study's time when `study` knows it."""
    resource = _build(
        fhir.build_diagnostic_report,
        report,
        runtime.settings().ss_org_id,
        encounter_id=encounter_id,
        service_request_id=service_request_id,
        imaging_study_id=imaging_study_id,
        observation_id=observation_id,
        issued=utc_now(),
        site=_site(),
        study=study,
    )
    return await _create_or_revise(resource)


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
    halfway = HalfwayAlarm(accession_number, deadline_s)  # an alert (satset alerts) past half the wait
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
        halfway.check(last_problem)
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


P = TypeVar("P", bound=GatewayInput)


@task(
    name="resolve-people",
    retries=FHIR_RETRIES,
    retry_delay_seconds=FHIR_RETRY_DELAYS_S,
    retry_jitter_factor=JITTER,
    retry_condition_fn=retry_when_retryable,
    persist_result=False,
)
async def resolve_people(payload: P) -> P:
    """The payload with every person named only by NIK (`subject_nik`, `individual_nik`, `performer_nik`,
    `requester_nik`) named by IHS id, through the platform's Patient / Practitioner search by NIK; the NIK fields
    cleared. Call it before the Encounter: an unknown NIK is Rejected naming its field, before anything exists.
    Not persisted or cached by Prefect (the client caches the answers in-process; the NIK is never logged)."""
    lookups = nik_lookups(payload)
    if not lookups:
        return with_people(payload, {})
    client = runtime.satusehat()
    found: dict[str, str] = {}
    for lookup in lookups:
        ihs_id = await call(client.ihs_id_by_nik, lookup.resource_type, lookup.nik)
        if ihs_id is None:
            raise Rejected(
                f"{lookup.nik_field}: SATUSEHAT knows no {lookup.resource_type} with this NIK (the NIK is not "
                f"shown here); check it in the HIS, or send the IHS id instead"
            )
        found[lookup.nik_field] = ihs_id
    return with_people(payload, found)
