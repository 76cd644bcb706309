"""The simulator's HTTP face, with the platform's URL layout.

POST /oauth2/v1/accesstoken?grant_type=client_credentials      OAuth2 client credentials (form body)
GET|POST|PUT /fhir-r4/v1/{Type}[/{id}]                         FHIR R4 create, read, update, search
GET  /fhir-r4/v1/dcm_cfg                                       what the official router asks at start-up
POST /dicom/v1/dicomWeb/studies                                STOW as the official router sends it
/admin/...                                                     faults and inspection (only when enabled)
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import time
from typing import Any
from urllib.parse import parse_qs

import pydicom
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydicom.errors import InvalidDicomError

from simulator import rules
from simulator.faults import HttpFault, RouterFault
from simulator.platform import OutcomeError, Platform
from simulator.registry import NIK_SYSTEM, RegistryError
from simulator.search import SearchError

FHIR_PREFIX = "/fhir-r4/v1"
AUTH_PREFIX = "/oauth2/v1"
STOW_PATH = "/dicom/v1/dicomWeb/studies"
FHIR_JSON = "application/fhir+json"
REGISTRY_UPDATED = "2024-01-01T00:00:00+00:00"
"""meta.lastUpdated of registry entries: the seed is synthetic and has no history of its own."""

AUTH_FAILED_TEXT = (
    "The user or system was not able to be authenticated "
    "(either client_id or client_secret combination is unacceptable)"
)


def create_app(platform: Platform) -> FastAPI:
    """The platform's HTTP API over `platform`; one app per simulator."""
    config = platform.config
    store = platform.store
    faults = platform.faults
    app = FastAPI(title="SATUSEHAT simulator", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def misbehave(request: Request, call_next: Any) -> Response:
        """Added latency and armed faults, before anything else: the real gateway sits in front of it all."""
        path = request.url.path
        if path.startswith("/admin"):
            return await call_next(request)
        if faults.latency_s:
            await asyncio.sleep(faults.latency_s)
        fault = faults.take_http(request.method, path)
        if fault is None:
            return await call_next(request)
        store.log_event("fault.http", fault=fault.kind, method=request.method, path=path)
        if fault.kind == "lost-response":
            await call_next(request)  # the platform commits; the answer never reaches the client
            return PlainTextResponse("Gateway Timeout", status_code=504)
        return await _fault_response(fault)

    # --- OAuth2 -----------------------------------------------------------------------------------------

    @app.post(f"{AUTH_PREFIX}/accesstoken")
    async def access_token(request: Request) -> Response:
        if request.query_params.get("grant_type") != "client_credentials":
            return _outcome(400, "invalid", "value", "grant_type=client_credentials is required in the query string")
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        client_id, secret = form.get("client_id", [None])[0], form.get("client_secret", [None])[0]
        id_ok = hmac.compare_digest((client_id or "").encode(), config.client_id.encode())
        secret_ok = hmac.compare_digest((secret or "").encode(), config.client_secret.encode())
        if not (id_ok and secret_ok):  # both compared, in constant time, as the platform's gateway would
            return _outcome(401, "invalid", "value", AUTH_FAILED_TEXT)
        token, issued = store.issue_token(config.client_id, config.token_ttl_s)
        return JSONResponse(_token_body(token, issued, config.client_id, config.token_ttl_s))

    # --- FHIR -------------------------------------------------------------------------------------------

    @app.get(f"{FHIR_PREFIX}/dcm_cfg")
    async def router_config(request: Request) -> Response:
        if (denied := _check_token(request)) is not None:
            return denied
        return JSONResponse({})

    # --- the registries (Patient, Practitioner by NIK), before the generic routes so they take precedence ---

    for person_kind in ("Patient", "Practitioner"):
        _add_person_routes(app, platform, person_kind, lambda request: _check_token(request))

    @app.post(FHIR_PREFIX + "/{resource_type}")
    async def create(resource_type: str, request: Request) -> Response:
        if (denied := _check_token(request)) is not None:
            return denied
        body = await _json_body(request, resource_type)
        if isinstance(body, Response):
            return body
        return _run(lambda: platform.create(body, resource_type), 201)

    @app.put(FHIR_PREFIX + "/{resource_type}/{resource_id}")
    async def update(resource_type: str, resource_id: str, request: Request) -> Response:
        if (denied := _check_token(request)) is not None:
            return denied
        body = await _json_body(request, resource_type)
        if isinstance(body, Response):
            return body
        return _run(lambda: platform.update(resource_type, resource_id, body), 200)

    @app.get(FHIR_PREFIX + "/{resource_type}/{resource_id}")
    async def read(resource_type: str, resource_id: str, request: Request) -> Response:
        if (denied := _check_token(request)) is not None:
            return denied
        return _run(lambda: platform.read(resource_type, resource_id), 200)

    @app.get(FHIR_PREFIX + "/{resource_type}")
    async def search(resource_type: str, request: Request) -> Response:
        if (denied := _check_token(request)) is not None:
            return denied
        # Starlette decodes the query once (%7C → |, %2C → ,): FHIR's own escaping (\, \$ \|) is left for
        # simulator/search.py, so the router's raw `identifier=<system>%7C<ACSN>` reads as the platform reads it.
        params = list(request.query_params.multi_items())
        base = str(request.base_url).rstrip("/") + FHIR_PREFIX
        try:
            return _run(lambda: platform.search(resource_type, params, base), 200)
        except SearchError as error:
            return _outcome(400, "error", "invalid", f"{error}")

    # --- STOW, as the official router sends it -------------------------------------------------------------

    @app.post(STOW_PATH)
    async def stow(request: Request) -> Response:
        if (denied := _check_token(request)) is not None:
            return denied
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/dicom":
            return _outcome(415, "error", "not-supported", "Content-Type must be application/dicom")
        study_id = request.headers.get("x-imagingstudy-id", "")
        if not study_id or not store.exists("ImagingStudy", study_id):
            return _outcome(400, "error", "value", f"X-ImagingStudy-ID '{study_id}' does not name an ImagingStudy")
        try:
            ds = pydicom.dcmread(io.BytesIO(await request.body()), stop_before_pixels=True)
            sop_uid, study_uid = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
            sop_class, series_uid = str(ds.SOPClassUID), str(ds.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, ValueError, EOFError) as error:
            return _outcome(400, "error", "invalid", f"not a DICOM Part-10 instance: {type(error).__name__}")
        if any(e.detail.get("sop_instance_uid") == sop_uid for e in store.events(["stow"])):
            return PlainTextResponse("Instance already exists", status_code=409)
        store.log_event("stow", imaging_study_id=study_id, study_uid=study_uid, sop_instance_uid=sop_uid)
        retrieve = f"{str(request.base_url).rstrip('/')}{STOW_PATH}/{study_uid}"
        body = {
            "00081190": {"vr": "UR", "Value": [retrieve]},
            "00081199": {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": {"vr": "UI", "Value": [sop_class]},
                        "00081155": {"vr": "UI", "Value": [sop_uid]},
                        "00081190": {"vr": "UR", "Value": [f"{retrieve}/series/{series_uid}/instances/{sop_uid}"]},
                    }
                ],
            },
        }
        return JSONResponse(body, media_type="application/dicom+json")

    # --- admin: faults and inspection, only when enabled --------------------------------------------------

    if config.admin_enabled:
        _add_admin_routes(app, platform)

    def _check_token(request: Request) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token and store.token_valid(token.strip()):
            return None
        violation = rules.Violation(rules.INVALID_TOKEN, "Authorization", rules.INVALID_TOKEN.text)
        return _fhir_json(401, OutcomeError(401, [violation]).outcome())

    return app


def _add_person_routes(app: FastAPI, platform: Platform, kind: str, check_token: Any) -> None:
    """`GET /{kind}?identifier=https://fhir.kemkes.go.id/id/nik|<NIK>` and `GET /{kind}/{id}`, from the registry.

    The answer's shape is what public integrations read: a searchset Bundle with `total` and
    `entry[].resource.id` (the IHS number) and `name[].text` (satusehat.md 1.3; field_notes.md)."""
    registry = platform.registry

    @app.get(f"{FHIR_PREFIX}/{kind}")
    async def search_people(request: Request) -> Response:
        if (denied := check_token(request)) is not None:
            return denied
        found = []
        for name, value in request.query_params.multi_items():
            if name == "identifier":
                system, _, nik = value.rpartition("|")
                found = registry.by_nik(kind, nik) if system == NIK_SYSTEM else []
        base = str(request.base_url).rstrip("/") + FHIR_PREFIX
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "link": [{"relation": "self", "url": str(request.url)}],
        }
        if found:
            bundle["entry"] = [
                {"fullUrl": f"{base}/{kind}/{e.id}", "resource": _with_meta(e.resource()), "search": {"mode": "match"}}
                for e in found
            ]
        return _fhir_json(200, bundle)

    @app.get(FHIR_PREFIX + f"/{kind}/{{resource_id}}")
    async def read_person(resource_id: str, request: Request) -> Response:
        if (denied := check_token(request)) is not None:
            return denied
        entry = registry.get(kind, resource_id)
        if entry is None:
            error = OutcomeError.single(404, rules.NOT_FOUND, kind, reference=f"{kind}/{resource_id}")
            return _fhir_json(404, error.outcome())
        return _fhir_json(200, _with_meta(entry.resource()))


def _with_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {**resource, "meta": {"lastUpdated": REGISTRY_UPDATED, "versionId": "1"}}


def _add_admin_routes(app: FastAPI, platform: Platform) -> None:
    store, faults = platform.store, platform.faults

    @app.get("/admin/registry")
    async def registry_entries() -> dict[str, Any]:
        return platform.registry.describe()

    @app.post("/admin/registry")
    async def registry_add(request: Request) -> Response:
        """Register Patients/Practitioners/Locations/Organizations (the --registry file format)."""
        try:
            added = platform.registry.add(json.loads(await request.body()))
        except (json.JSONDecodeError, UnicodeDecodeError, RegistryError) as error:
            return _outcome(400, "error", "value", f"registry: {error}")
        return JSONResponse({"added": added})

    @app.get("/admin/state")
    async def state() -> dict[str, Any]:
        return {"counts": store.counts(), "faults": faults.describe(), "tokens": store.token_count()}

    @app.post("/admin/faults/http")
    async def arm_http(fault: HttpFault) -> dict[str, Any]:
        faults.arm_http(fault)
        return faults.describe()

    @app.post("/admin/faults/router")
    async def arm_router(fault: RouterFault) -> dict[str, Any]:
        faults.arm_router(fault)
        return faults.describe()

    @app.post("/admin/latency")
    async def latency(seconds: float) -> dict[str, Any]:
        faults.latency_s = max(0.0, seconds)
        return faults.describe()

    @app.delete("/admin/faults")
    async def clear() -> dict[str, Any]:
        faults.clear()
        return faults.describe()

    @app.post("/admin/expire-tokens")
    async def expire_tokens() -> dict[str, int]:
        return {"expired": store.expire_tokens()}

    @app.post("/admin/reset")
    async def reset() -> dict[str, Any]:
        store.reset()
        faults.clear()
        return {"counts": store.counts()}

    @app.get("/admin/resources/{resource_type}")
    async def resources(resource_type: str) -> list[dict[str, Any]]:
        return store.all(resource_type)

    @app.get("/admin/events")
    async def events(after: int = 0, kind: str | None = None) -> list[dict[str, Any]]:
        kinds = [kind] if kind else None
        return [{"seq": e.seq, "at": e.at, "kind": e.kind, "detail": e.detail} for e in store.events(kinds, after)]


def _token_body(token: str, issued: float, client_id: str, ttl_s: int) -> dict[str, Any]:
    """The platform's (Apigee's) token response: every scalar a string, issued_at in milliseconds."""
    return {
        "refresh_token_expires_in": "0",
        "api_product_list": "[api-sandbox]",
        "api_product_list_json": ["api-sandbox"],
        "organization_name": "ihs-simulator",
        "developer.email": "simulator@localhost",
        "token_type": "BearerToken",
        "issued_at": str(int(issued * 1000)),
        "client_id": client_id,
        "access_token": token,
        "application_name": "satset-simulator",
        "scope": "",
        "expires_in": str(ttl_s),
        "refresh_count": "0",
        "status": "approved",
    }


async def _fault_response(fault: HttpFault) -> Response:
    if fault.kind == "429":
        body = {"fault": {"faultstring": "Rate limit quota violation", "detail": {"errorcode": "policies.ratelimit"}}}
        return JSONResponse(body, status_code=429, headers={"Retry-After": f"{fault.retry_after_s:g}"})
    if fault.kind == "500":
        return _outcome(500, "fatal", "exception", "Internal server error")
    if fault.kind == "504":
        return PlainTextResponse("Gateway Timeout", status_code=504)
    await asyncio.sleep(fault.hang_s)  # "hang": past any sane client timeout, then give up
    return PlainTextResponse("Gateway Timeout", status_code=504)


async def _json_body(request: Request, resource_type: str) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        violation = rules.Violation(rules.UNREADABLE_JSON, resource_type, rules.UNREADABLE_JSON.text)
        return _fhir_json(400, OutcomeError(400, [violation]).outcome())


def _run(operation: Any, success_status: int) -> Response:
    started = time.perf_counter()
    try:
        result = operation()
    except OutcomeError as error:
        return _fhir_json(error.status, error.outcome())
    response = _fhir_json(success_status, result)
    response.headers["X-Simulator-Time-Ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
    return response


def _outcome(status: int, severity: str, code: str, text: str) -> Response:
    issue = {"severity": severity, "code": code, "details": {"text": text}}
    return _fhir_json(status, {"resourceType": "OperationOutcome", "issue": [issue]})


def _fhir_json(status: int, body: dict[str, Any]) -> Response:
    return JSONResponse(body, status_code=status, media_type="application/json")
