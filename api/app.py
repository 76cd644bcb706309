"""The HIS-facing HTTP API: the existing Flask gateway's interface, served by FastAPI, each call a flow run.

A HIS switches by changing the gateway's base URL (and adding a credential): paths, bodies, field names and
answers are the old gateway's (observed_contracts.md). What is new is stated in docs/his-integration.md: 422 with
the field and the rule for an invalid body, `?async=true` for a 202 and a queued flow run, GET /api/runs/{id}.

    uvicorn --factory api.app:create_app        # or: satset api
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import routes, validation
from api.auth import API_KEY_HEADER, AuthMiddleware, Guard
from api.runs import FlowBackend, runs_router
from models.inputs import GatewayInput
from models.settings import ApiSettings, load_settings

DOCS_URL = "/api/docs"
OPENAPI_URL = "/api/openapi.json"
OPEN_PATHS = ("/api/satset/halo", DOCS_URL, f"{DOCS_URL}/oauth2-redirect", OPENAPI_URL)
"""Reachable without credentials: the health check and the API's documentation."""

log = logging.getLogger("satset.api")

DESCRIPTION = """\
The existing gateway's endpoints, unchanged: a HIS switches by changing the base URL and adding a credential.
Each call runs as a Prefect flow run (its id in the `X-Flow-Run-Id` response header).

* **Authentication**: `X-API-Key: <key>` or HTTP Basic, as configured (API_KEY, API_BASIC_USER/PASSWORD).
  Open without: `GET /api/satset/halo` and this documentation.
* **Invalid input**: 422 `{"error": "invalid input", "fields": [{"field", "in", "rule"}]}`; a body larger than
  API_MAX_BODY_BYTES: 413 in the same shape.
* **Asynchronous**: `?async=true` or `Prefer: respond-async` answers 202 with the flow run; the same
  `Idempotency-Key` (default `<flow>:<ACSN>`) gives the same run. Follow it at `GET /api/runs/{flow_run_id}`.
"""


def create_app(settings: ApiSettings | None = None, *, flows: FlowBackend | None = None) -> FastAPI:
    """The app for these settings (default: from the environment). Raises ApiConfigError (a SettingsError naming
    the variables) when no credential is configured and API_AUTH_DISABLED is not set.

    `flows` replaces the Prefect calls behind the endpoints (default: run, queue and read real flow runs)."""
    settings = settings if settings is not None else load_settings(ApiSettings)
    guard = Guard.from_settings(settings, OPEN_PATHS)
    if guard is None:
        log.warning("HIS API authentication is disabled (API_AUTH_DISABLED): anyone who can connect may call it")

    app = FastAPI(
        title="SATUSEHAT radiology gateway — HIS API",
        description=DESCRIPTION,
        version="1.0",
        docs_url=DOCS_URL,
        redoc_url=None,
        openapi_url=OPENAPI_URL,
        swagger_ui_oauth2_redirect_url=f"{DOCS_URL}/oauth2-redirect",
    )
    app.state.flow_backend = flows if flows is not None else FlowBackend()
    app.include_router(routes.satset)
    app.include_router(routes.dicom)
    app.include_router(runs_router)
    app.add_exception_handler(RequestValidationError, _invalid_input)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    if guard is not None:
        app.add_middleware(AuthMiddleware, guard=guard)  # added last: it runs first, before any body is read
    app.state.sync_imaging_wait_s = settings.api_sync_imaging_wait_s
    redact_access_log()
    app.openapi = lambda: _openapi(app, guard)  # type: ignore[method-assign]
    return app


async def _invalid_input(request: Request, error: Exception) -> JSONResponse:
    """422 naming each field and its rule; the values sent are never echoed (they may hold patient data)."""
    assert isinstance(error, RequestValidationError)
    fields = validation.describe(error.errors())
    log.info("422 %s %s: %s", request.method, request.url.path, ", ".join(sorted({f["field"] for f in fields})))
    return JSONResponse({"error": "invalid input", "fields": fields}, status_code=422)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's own 404/405 in the gateway's {"error"} shape.

    FastAPI answers a JSON body it cannot even decode with a bare 400 "There was an error parsing the body":
    bytes that are not UTF-8 text, or JSON nested deeper than the parser recurses. A body that is text but not
    JSON gets a 422 `json_invalid`. All are the same mistake for a HIS, so all are the 422 naming the field
    `body` and the rule.
    """
    assert isinstance(error, StarletteHTTPException)
    if error.status_code == 400 and error.__cause__ is not None:
        rule = "the body is not valid JSON (it must be UTF-8 text)"
        if isinstance(error.__cause__, RecursionError):
            rule = "the body is nested too deeply: an order is one flat JSON object of strings"
        log.info("422 %s %s: body (%s)", request.method, request.url.path, type(error.__cause__).__name__)
        problem = {"field": "body", "in": "body", "rule": rule}
        return JSONResponse({"error": "invalid input", "fields": [problem]}, status_code=422)
    return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)


class BodyLimit:
    """413 for a request body over `max_bytes`, read before FastAPI parses it (an order is a few hundred bytes;
    without a limit one request could make the API hold any amount in memory). The body is counted as it
    arrives, so a chunked upload without Content-Length is held to the same limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        log.info("413 %s %s: body over %d bytes", scope.get("method"), scope.get("path"), self.max_bytes)
        rule = f"must be at most {self.max_bytes} bytes (API_MAX_BODY_BYTES)"
        body = {"error": "request body too large", "fields": [{"field": "body", "in": "body", "rule": rule}]}
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)


KEPT_QUERY_PARAMETERS = frozenset({"async"})
"""Query parameters whose values the access log may show: the API's own. Any other value (a key a HIS sent as
`?api_key=`, a token) is written as REDACTED."""


def redact_query(path: str) -> str:
    """`/x?async=true&api_key=s3cret` → `/x?async=true&api_key=REDACTED`."""
    base, separator, query = path.partition("?")
    if not separator:
        return path
    pairs = parse_qsl(query, keep_blank_values=True)
    shown = [(name, value if name in KEPT_QUERY_PARAMETERS else "REDACTED") for name, value in pairs]
    return base + "?" + "&".join(f"{quote(name)}={quote(value)}" for name, value in shown)


class _RedactQueryStrings(logging.Filter):
    """uvicorn's access log writes the path with its query string (`'%s - "%s %s HTTP/%s" %d'`, the path third)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Keep query-string values out of uvicorn's access log (once per process, whoever starts uvicorn)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, _RedactQueryStrings) for existing in access.filters):
        access.addFilter(_RedactQueryStrings())


def _state_required_pairs(schemas: dict[str, Any]) -> None:
    """Add each input model's "one of these two is required" rules to its schema as `allOf` of `anyOf` `required`,
    so /api/docs and schema-driven clients know them (see GatewayInput.one_of_required)."""
    for model in _subclasses(GatewayInput):
        schema = schemas.get(model.__name__)
        pairs = model.required_pairs()
        if schema is None or not pairs:
            continue
        schema["allOf"] = [
            {"anyOf": [{"required": [name], "properties": {name: {"type": "string"}}} for name in pair]}
            for pair in pairs
        ]


def _subclasses(cls: type[GatewayInput]) -> list[type[GatewayInput]]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _openapi(app: FastAPI, guard: Guard | None) -> dict[str, Any]:
    """FastAPI's document plus the security schemes the middleware enforces (so Swagger's Authorize works)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _state_required_pairs(document.get("components", {}).get("schemas", {}))
    if guard is not None:
        schemes = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
            "Basic": {"type": "http", "scheme": "basic"},
        }
        document.setdefault("components", {})["securitySchemes"] = {name: schemes[name] for name in guard.schemes}
        document["security"] = [{name: []} for name in guard.schemes]
    app.openapi_schema = document
    return document
