"""The existing gateway's endpoints, body for body and answer for answer, each call a Prefect flow run.

Routes are thin: FastAPI validates the body against the input model (models/inputs.py, the old field names), the
route runs the flow (api/runs.py) and shapes the answer the old gateway gave. No FHIR is built here and nothing
talks to SATUSEHAT except through the flows and, through the shared client, /token and the search Bundle that
imageid's 404 carries (as the old gateway's did).

A synchronous call gives the steps that wait for the DICOM Router's ImagingStudy (batch3, batch4) at most
API_SYNC_IMAGING_WAIT_S, then answers 404 with the ids so far (flows/steps.py, `waiting_at_most`): the old gateway
looked once and answered 404 at once; the background deadline (IMAGING_STUDY_DEADLINE_S) is for ?async=true.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from api import schemas
from api.runs import Accepted, Finished, RunMode, flow_backend, run_headers, run_mode, submit
from api.validation import InvalidInput
from clients.errors import FhirRejected, GatewayError, ImagingStudyNotReady
from clients.satusehat import _escape_search
from flows.batches import DICOM_PROCESS_KEYS
from flows.steps import BatchFailed, waiting_at_most
from models.fhir import IdentifierKind, identifier_system
from models.inputs import (
    Acsn,
    Batch1Input,
    Batch2Input,
    Batch3Input,
    Batch4Input,
    DiagnosticReportInput,
    DicomProcessInput,
    EncounterInput,
    ObservationInput,
    ServiceRequestInput,
)
from models.settings import SettingsError
from tasks import runtime

log = logging.getLogger("satset.api")

satset = APIRouter(prefix="/api/satset", tags=["satset"])
dicom = APIRouter(prefix="/api/dicom", tags=["dicom"])

Mode = Annotated[RunMode, Depends(run_mode)]

_INVALID = {422: {"model": InvalidInput, "description": "The body (or a parameter) breaks a rule; each field named"}}
_ACCEPTED = {202: {"model": Accepted, "description": "Queued (?async=true or Prefer: respond-async)"}}
_UNSERVED = {503: {"model": schemas.Error, "description": "Async: the flow's deployment is not served"}}


# --- shaping the answers -------------------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, GatewayError | BatchFailed) else f"{type(error).__name__}: {error}"


def _unexpected(flow: str, finished: Finished) -> JSONResponse:
    """A failure that is not a step of the flow (the run could not start, or Prefect itself failed)."""
    assert finished.error is not None
    status = 503 if finished.flow_run_id is None else 500
    return JSONResponse({"error": f"{flow} did not run", "detail": _describe(finished.error)}, status_code=status)


def _batch_answer(flow: str, finished: Finished) -> JSONResponse:
    """200 with the ids; on failure the step, the ids created so far and the upstream detail, with its status."""
    if finished.error is None:
        return JSONResponse(finished.result)
    if isinstance(finished.error, BatchFailed):
        return JSONResponse(finished.error.response(), status_code=finished.error.status_code)
    return _unexpected(flow, finished)


async def _resource_answer(flow: str, finished: Finished) -> JSONResponse:
    """201 with the resource as SATUSEHAT holds it; a refusal is SATUSEHAT's OperationOutcome with its status.

    The flow's result holds ids only (what Prefect keeps); the resource is read from the platform here."""
    if finished.error is None:
        kind, resource_id = finished.result["resourceType"], finished.result["id"]
        try:
            resource = await asyncio.to_thread(lambda: runtime.satusehat().read(kind, resource_id))
        except GatewayError as error:
            return JSONResponse(
                {"error": f"{kind}/{resource_id} was filed but could not be read back", "detail": error.message},
                status_code=502,
            )
        return JSONResponse(resource, status_code=201)
    failed = finished.error
    if isinstance(failed, BatchFailed):
        body = failed.response()
        if isinstance(failed.cause, FhirRejected) and isinstance(body.get("detail"), dict):
            return JSONResponse(body["detail"], status_code=failed.status_code)
        return JSONResponse(body, status_code=failed.status_code)
    return _unexpected(flow, finished)


def _lookup_answer(flow: str, finished: Finished) -> JSONResponse:
    """200 {"imagingStudy_id"}; 404 when the router has made none for the ACSN (yet)."""
    if finished.error is None:
        return JSONResponse({"imagingStudy_id": finished.result["imagingStudy_id"]})
    failed = finished.error
    cause = failed.cause if isinstance(failed, BatchFailed) else failed
    if isinstance(cause, ImagingStudyNotReady):
        return JSONResponse({"error": "No ImagingStudy found", "detail": str(cause)}, status_code=404)
    if isinstance(failed, BatchFailed):
        return JSONResponse(failed.response(), status_code=failed.status_code)
    return _unexpected(flow, finished)


def _dicom_answer(flow: str, finished: Finished) -> JSONResponse:
    """The old /api/dicom/process: 200 with the counts, or {"status": "error", "message"}: 404 for a study the
    PACS does not have (as the old gateway answered), 409 for an accession number that matches several studies
    (the old gateway took the first), 500 for any other failure."""
    if finished.error is None:
        return JSONResponse({key: finished.result.get(key) for key in DICOM_PROCESS_KEYS})
    failed = finished.error
    status = 500
    if isinstance(failed, BatchFailed) and 400 <= failed.status_code < 500:
        status = failed.status_code
    return JSONResponse({"status": "error", "message": _describe(failed)}, status_code=status)


Shape = Callable[[str, Finished], JSONResponse | Awaitable[JSONResponse]]


def _order_key(payload: BaseModel) -> str | None:
    """What identifies the order for the default idempotency key: the ACSN, else the study, else the HIS's id."""
    for name in ("noacsn", "accesionnum", "study", "identifier_value"):
        value = getattr(payload, name, None)
        if value:
            return str(value)
    return None


async def _call(request: Request, flow: str, payload: BaseModel, mode: RunMode, shape: Shape) -> Response:
    """Queue the flow (async mode) or run it here and shape its outcome."""
    if mode.respond_async:
        # The validated model, serialised: defaults filled in, and without the patient's name (never stored).
        parameters = {"payload": payload.model_dump(mode="json", exclude_none=True)}
        return await submit(request, flow, parameters, mode, _order_key(payload))
    with waiting_at_most(getattr(request.app.state, "sync_imaging_wait_s", None)):
        finished = await flow_backend(request).run(flow, payload=payload)
    shaped = shape(flow, finished)
    response = await shaped if inspect.isawaitable(shaped) else shaped
    response.headers.update(run_headers(finished.flow_run_id))
    return response


# --- /api/satset -----------------------------------------------------------------------------------------------


@satset.get(
    "/halo",
    summary="Health check (open, no credentials)",
    response_model=schemas.Halo,
    openapi_extra={"security": []},
)
async def halo() -> dict[str, str]:
    """The old gateway's greeting; answers without touching SATUSEHAT, the PACS or Prefect."""
    return {"message": "Halo dari Satu Sehat!"}


@satset.get(
    "/token",
    summary="A SATUSEHAT access token",
    response_model=schemas.Token,
    responses={502: {"model": schemas.Error, "description": "The token endpoint refused or failed"}},
)
async def token() -> JSONResponse:
    """The gateway's own SATUSEHAT bearer token (cached and shared with its flows), as the old gateway gave it."""
    try:
        access_token = await asyncio.to_thread(lambda: runtime.satusehat().token())
    except GatewayError as error:
        return JSONResponse({"error": "SATUSEHAT token request failed", "detail": error.message}, status_code=502)
    except SettingsError as error:
        return JSONResponse({"error": "gateway settings", "detail": str(error)}, status_code=500)
    return JSONResponse({"access_token": access_token})


_RESOURCE_RESPONSES: dict[int | str, dict[str, Any]] = {
    201: {"model": schemas.FhirResource, "description": "Created (or adopted: an identical resend returns it)"},
    400: {"model": schemas.OperationOutcome, "description": "SATUSEHAT refused it (its status and body)"},
    **_ACCEPTED,
    **_INVALID,
    **_UNSERVED,
}


@satset.post("/encounter", status_code=201, summary="Encounter", responses=_RESOURCE_RESPONSES)
async def post_encounter(payload: EncounterInput, request: Request, mode: Mode) -> Response:
    """Register the visit (flow `encounter`)."""
    return await _call(request, "encounter", payload, mode, _resource_answer)


@satset.post("/service-req", status_code=201, summary="ServiceRequest (the order)", responses=_RESOURCE_RESPONSES)
async def post_service_request(payload: ServiceRequestInput, request: Request, mode: Mode) -> Response:
    """Register the radiology order with its accession number (flow `service-request`)."""
    return await _call(request, "service-request", payload, mode, _resource_answer)


@satset.post("/observation", status_code=201, summary="Observation (the reading)", responses=_RESOURCE_RESPONSES)
async def post_observation(payload: ObservationInput, request: Request, mode: Mode) -> Response:
    """File the radiologist's reading (flow `observation`)."""
    return await _call(request, "observation", payload, mode, _resource_answer)


@satset.post("/conclusion", status_code=201, summary="DiagnosticReport (the conclusion)", responses=_RESOURCE_RESPONSES)
async def post_conclusion(payload: DiagnosticReportInput, request: Request, mode: Mode) -> Response:
    """File the report's conclusion (flow `conclusion`)."""
    return await _call(request, "conclusion", payload, mode, _resource_answer)


def _batch_responses(result: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"model": result, "description": "Every resource created (or adopted)"},
        400: {
            "model": schemas.BatchFailure,
            "description": "A step failed: the platform's own 4xx; 404 no such study or no ImagingStudy (yet); "
            "409 an ACSN of several studies; 502 an upstream failure",
        },
        **_ACCEPTED,
        **_INVALID,
        **_UNSERVED,
    }


@satset.post("/batch1", summary="Encounter → ServiceRequest", responses=_batch_responses(schemas.Batch1Result))
async def post_batch1(payload: Batch1Input, request: Request, mode: Mode) -> Response:
    """Register the visit and the order (flow `batch1`)."""
    return await _call(request, "batch1", payload, mode, _batch_answer)


@satset.post("/batch2", summary="Observation → DiagnosticReport", responses=_batch_responses(schemas.Batch2Result))
async def post_batch2(payload: Batch2Input, request: Request, mode: Mode) -> Response:
    """File the reading and the report for an order whose ImagingStudy exists (flow `batch2`)."""
    return await _call(request, "batch2", payload, mode, _batch_answer)


@satset.post(
    "/batch3",
    summary="Encounter → ServiceRequest → ImagingStudy lookup → Observation → DiagnosticReport",
    responses=_batch_responses(schemas.Batch3Result),
)
async def post_batch3(payload: Batch3Input, request: Request, mode: Mode) -> Response:
    """The whole exam when the modality sent the images to the router itself (flow `batch3`). Synchronously, the
    router's ImagingStudy is awaited at most API_SYNC_IMAGING_WAIT_S: then 404 with the ids so far and a hint;
    the same body sent again later adopts them."""
    return await _call(request, "batch3", payload, mode, _batch_answer)


@satset.post(
    "/batch4",
    summary="batch3 with the study sent from the PACS to the DICOM Router",
    responses=_batch_responses(schemas.Batch4Result),
)
async def post_batch4(payload: Batch4Input, request: Request, mode: Mode) -> Response:
    """The whole exam, images included (flow `batch4`). Synchronously, the routing takes as long as the study
    needs, then the router's ImagingStudy is awaited at most API_SYNC_IMAGING_WAIT_S (404 with the ids so far;
    send the same body again, nothing is sent twice); ?async=true waits up to IMAGING_STUDY_DEADLINE_S."""
    return await _call(request, "batch4", payload, mode, _batch_answer)


@satset.get(
    "/imageid/{acsn}",
    summary="The ImagingStudy id for an accession number",
    response_model=schemas.ImageId,
    responses={404: {"model": schemas.Error, "description": "No ImagingStudy found (yet)"}, **_INVALID},
)
async def get_imageid(
    acsn: Annotated[Acsn, Path(description="The order's accession number (noacsn)")], request: Request
) -> Response:
    """The id of the ImagingStudy the DICOM Router made for the ACSN (flow `imaging-lookup`). A lookup is a
    question, not an order: it always runs here and now."""
    finished = await flow_backend(request).run("imaging-lookup", acsn=acsn)
    response = _lookup_answer("imaging-lookup", finished)
    if response.status_code == 404:
        bundle = await _imaging_search(acsn)
        if bundle is not None:
            response = JSONResponse({"error": "No ImagingStudy found", "detail": bundle}, status_code=404)
    response.headers.update(run_headers(finished.flow_run_id))
    return response


async def _imaging_search(acsn: str) -> dict[str, Any] | None:
    """The platform's searchset Bundle for the ACSN's ImagingStudy, the old gateway's 404 detail; None when the
    search fails, or when it now finds one (the router made it since the lookup: the message says "not yet")."""

    def search() -> dict[str, Any]:
        system = identifier_system(IdentifierKind.ACSN, runtime.settings().ss_org_id)
        identifier = f"{_escape_search(system)}|{_escape_search(acsn)}"
        return runtime.satusehat().search("ImagingStudy", [("identifier", identifier), ("_sort", "-_lastUpdated")])

    try:
        bundle = await asyncio.to_thread(search)
    except (GatewayError, SettingsError) as error:
        log.info("imageid %s: the search Bundle is not shown (%s)", acsn, type(error).__name__)
        return None
    entries = bundle.get("entry") or []
    if any(isinstance(e, dict) and (e.get("resource") or {}).get("resourceType") == "ImagingStudy" for e in entries):
        return None
    return bundle


# --- /api/dicom ------------------------------------------------------------------------------------------------


@dicom.post(
    "/process",
    summary="Send a study from the PACS to the SATUSEHAT DICOM Router",
    response_model=schemas.DicomProcessResult,
    responses={
        404: {"model": schemas.DicomProcessError, "description": "The PACS has no such study"},
        409: {"model": schemas.DicomProcessError, "description": "The accession number matches several studies"},
        500: {"model": schemas.DicomProcessError, "description": "Any other failure, as the old gateway answered"},
        **_ACCEPTED,
        **_INVALID,
        **_UNSERVED,
    },
)
async def post_dicom_process(payload: DicomProcessInput, request: Request, mode: Mode) -> Response:
    """Find the study (by UID, else by accession number), rewrite PatientID/AccessionNumber, send it in one
    association (flow `dicom-process`)."""
    return await _call(request, "dicom-process", payload, mode, _dicom_answer)
