"""How an API call becomes a Prefect flow run: here and now (the default), or queued on a served deployment.

* Synchronous (what the old gateway did): the flow is called in this process. Calling a Prefect flow creates a
  flow run in the configured Prefect API, so every call is visible in the UI; the response carries the run's id
  in `X-Flow-Run-Id` (and its UI page in `X-Flow-Run-Url`).
* Asynchronous (`?async=true` or `Prefer: respond-async`): `run_deployment("<flow>/gateway", timeout=0)` queues
  a run for whoever serves the deployment (`satset serve`, or a worker) and the API answers 202 at once. The run
  is created with an idempotency key, the `Idempotency-Key` header or else "<flow>:<ACSN>", so a HIS that sends
  the same order twice (a retry after a timeout) gets the same run back, not a second one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final
from uuid import UUID

import httpx
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments.flow_runs import arun_deployment
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.utilities.urls import url_for
from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

from flows import FLOWS

DEPLOYMENT_NAME = "gateway"
"""Every flow has one deployment of this name: "<flow>/gateway" (e.g. "batch4/gateway")."""

log = logging.getLogger("satset.api")

RETRY_AFTER_S = 30
"""What a 503 for an unreachable Prefect API suggests the HIS wait before asking again."""

_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _check_key(value: str) -> str:
    if not _KEY.match(value):
        raise PydanticCustomError(
            "idempotency_key", "must be 1-255 printable ASCII characters without spaces, e.g. batch4:ACC20250002"
        )
    return value


IdempotencyKey = Annotated[str, AfterValidator(_check_key)]


def deployment_name(flow: str) -> str:
    return f"{flow}/{DEPLOYMENT_NAME}"


@dataclass(frozen=True)
class RunMode:
    """How the caller wants the flow run: now (False) or queued (True), and under which idempotency key."""

    respond_async: bool
    idempotency_key: str | None
    prefer_async: bool
    """The caller asked through `Prefer: respond-async` (answered with Preference-Applied)."""


def _prefers_async(prefer: str | None) -> bool:
    """RFC 7240: `Prefer: respond-async, wait=10` holds the preference `respond-async`."""
    if not prefer:
        return False
    return any(part.split(";")[0].strip().lower() == "respond-async" for part in prefer.split(","))


async def run_mode(
    async_: Annotated[
        bool,
        Query(
            alias="async",
            description="true: queue the flow run on its deployment '<flow>/gateway' and answer 202 at once",
        ),
    ] = False,
    prefer: Annotated[str | None, Header(description="`respond-async` does what ?async=true does (RFC 7240)")] = None,
    idempotency_key: Annotated[
        IdempotencyKey | None,
        Header(
            alias="Idempotency-Key",
            description="Async only: the same key gives the same flow run. Default: '<flow>:<ACSN>'",
        ),
    ] = None,
) -> RunMode:
    """The `async` query parameter, the `Prefer` header and the `Idempotency-Key` header, read once per call."""
    prefer_async = _prefers_async(prefer)
    return RunMode(async_ or prefer_async, idempotency_key, prefer_async)


# --- synchronous ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """A flow run that ran here: its id, and its result or the exception it raised."""

    flow_run_id: UUID | None
    result: Any = None
    error: BaseException | None = None


async def run_inline(flow: str, **parameters: Any) -> Finished:
    """Run the flow in this process (a flow run in the Prefect API); never raises, the error is in the answer."""
    try:
        state = await FLOWS[flow].flow(**parameters, return_state=True)
    except Exception as error:  # the run could not even start (e.g. the Prefect API is unreachable)
        log.error("%s could not run: %s: %s", flow, type(error).__name__, error)
        return Finished(None, error=error)
    flow_run_id = state.state_details.flow_run_id
    try:
        return Finished(flow_run_id, result=await state.result())
    except Exception as error:
        return Finished(flow_run_id, error=error)


class FlowBackend:
    """The three Prefect calls behind the API, in one place: run a flow here, queue a deployment's run, read a run.

    One object so that `create_app(flows=...)` replaces them together: a test of what the API decides on its own
    (authentication, validation, routing, the shape of every answer) then runs no flow and needs no Prefect
    server, while every other line of the request path stays the production one.
    """

    async def run(self, flow: str, **parameters: Any) -> Finished:
        """Run the flow in this process (`run_inline`); never raises."""
        return await run_inline(flow, **parameters)

    async def queue(self, name: str, parameters: dict[str, Any], idempotency_key: str | None) -> FlowRun:
        """Create a run of deployment `name` and return at once (the same key gives the same run)."""
        return await arun_deployment(
            name=name, parameters=parameters, timeout=0, idempotency_key=idempotency_key, as_subflow=False
        )

    async def read(self, flow_run_id: UUID) -> tuple[FlowRun, str] | None:
        """The run and its flow's name; None when Prefect has no run with that id."""
        async with get_client() as client:
            try:
                run = await client.read_flow_run(flow_run_id)
                flow = await client.read_flow(run.flow_id)
            except ObjectNotFound:
                return None
        return run, flow.name


def flow_backend(request: Request) -> FlowBackend:
    """The app's FlowBackend (create_app sets it; an app built otherwise gets the Prefect one)."""
    backend = getattr(request.app.state, "flow_backend", None)
    return backend if isinstance(backend, FlowBackend) else FlowBackend()


def run_headers(flow_run_id: UUID | None) -> dict[str, str]:
    """Where to find the run behind a synchronous answer."""
    if flow_run_id is None:
        return {}
    headers = {"X-Flow-Run-Id": str(flow_run_id)}
    ui = url_for("flow-run", obj_id=flow_run_id)
    if ui:
        headers["X-Flow-Run-Url"] = ui
    return headers


# --- asynchronous --------------------------------------------------------------------------------------------


class Accepted(BaseModel):
    """The 202 body: the queued flow run and where to follow it."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    flow_run_id: str
    flow_run_name: str
    state: str
    """The run's state now: SCHEDULED for a new run; for a key sent before, whatever that run reached (a FAILED or
    CRASHED run is followed by a new attempt, and the answer is that attempt)."""
    idempotency_key: str
    """The key of the run answered: the one sent (or "<flow>:<ACSN>"), with "#2", "#3"… for later attempts."""
    ui_url: str | None
    """The run's page in the Prefect UI (null when PREFECT_UI_URL is not known)."""
    status_url: str
    """GET it for the state and, once COMPLETED, the result."""


RESUMABLE: Final = frozenset({StateType.FAILED, StateType.CRASHED})
"""States of a queued run that an idempotent resend follows with a new attempt: it failed (an outage outlasted its
retries) or its process died (`satset serve` killed; Prefect marks the run Crashed, see deployments/). A
cancelled run is an operator's decision and is answered as it is; a completed one is the answer."""

MAX_ATTEMPTS: Final = 100
"""Attempts per order key before the API stops making new ones (a HIS resending a hopeless order all day)."""


def attempt_key(key: str, attempt: int) -> str:
    """The idempotency key of attempt `attempt` (1-based) of an order: the key itself, then "<key>#2", "<key>#3"…"""
    return key if attempt == 1 else f"{key}#{attempt}"


async def _queue_attempt(
    backend: FlowBackend, name: str, parameters: dict[str, Any], key: str | None
) -> tuple[FlowRun, str | None]:
    """The run answering this send, and its key: the order's latest attempt, or a new attempt after one that
    FAILED or CRASHED. Each attempt has its own idempotency key, so concurrent resends meet on the same new run;
    the new run resumes, as every step adopts what the earlier attempt created (create-or-adopt)."""
    run = await backend.queue(name, parameters, key)
    if key is None:
        return run, key
    attempt = 1
    while run.state_type in RESUMABLE and attempt < MAX_ATTEMPTS:
        attempt += 1
        run = await backend.queue(name, parameters, attempt_key(key, attempt))
    return run, attempt_key(key, attempt)


async def submit(
    request: Request, flow: str, parameters: dict[str, Any], mode: RunMode, order_key: str | None
) -> JSONResponse:
    """Queue a run of "<flow>/gateway" and answer 202; 503 if the deployment does not exist or Prefect is down."""
    key = mode.idempotency_key or (f"{flow}:{order_key}" if order_key else None)
    name = deployment_name(flow)
    try:
        run, key = await _queue_attempt(flow_backend(request), name, parameters, key)
    except ObjectNotFound:
        return JSONResponse(
            {
                "error": f"deployment {name} not found",
                "detail": "asynchronous calls need the gateway's deployments served (`satset serve`, or a worker);"
                " call without ?async=true to run the flow here and now",
            },
            status_code=503,
        )
    except (httpx.HTTPError, PrefectHTTPStatusError, RuntimeError) as error:
        log.error("could not queue %s: %s: %s", name, type(error).__name__, error)
        return JSONResponse(
            {"error": "the Prefect API did not accept the flow run", "detail": f"{type(error).__name__}: {error}"},
            status_code=503,
        )
    status_url = str(request.url_for("flow_run_status", flow_run_id=str(run.id)))
    body = Accepted(
        flow_run_id=str(run.id),
        flow_run_name=run.name,
        state=run.state_type.value if run.state_type else "SCHEDULED",
        idempotency_key=key or "",
        ui_url=url_for("flow-run", obj_id=run.id),
        status_url=status_url,
    )
    headers = {"Location": status_url}
    if mode.prefer_async:
        headers["Preference-Applied"] = "respond-async"
    return JSONResponse(body.model_dump(), status_code=202, headers=headers)


# --- following a run -----------------------------------------------------------------------------------------


class RunStatus(BaseModel):
    """GET /api/runs/{flow_run_id}."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    flow_run_id: str
    flow_name: str
    flow_run_name: str
    state: str
    """SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CRASHED, CANCELLED, PAUSED ..."""
    state_name: str
    done: bool
    """True once the state is final (COMPLETED, FAILED, CRASHED, CANCELLED)."""
    message: str | None
    """Why a run failed: the step that stopped it and the ids it had created."""
    ui_url: str | None
    result: Any = None
    """The flow's result once COMPLETED (the same ids the synchronous call answers)."""


runs_router = APIRouter(prefix="/api/runs", tags=["runs"])


@runs_router.get(
    "/{flow_run_id}",
    name="flow_run_status",
    summary="State and result of a gateway flow run",
    response_model=RunStatus,
    responses={404: {"description": "No gateway flow run with that id"}},
)
async def flow_run_status(
    flow_run_id: Annotated[UUID, Path(description="as returned by a 202")], request: Request
) -> JSONResponse:
    """Follow a run queued with ?async=true (or any run of the gateway's flows, e.g. from X-Flow-Run-Id)."""
    try:
        found = await flow_backend(request).read(flow_run_id)
    except (httpx.HTTPError, PrefectHTTPStatusError, RuntimeError, OSError) as error:
        log.error("could not read flow run %s: %s", flow_run_id, type(error).__name__)
        return JSONResponse(
            {"error": "the Prefect API could not be reached", "detail": f"{type(error).__name__}; try again later"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if found is None or found[1] not in FLOWS:  # runs of other flows on the same Prefect server are not ours
        return JSONResponse({"error": "no such flow run", "field": "flow_run_id"}, status_code=404)
    run, flow_name = found
    state = run.state
    body = RunStatus(
        flow_run_id=str(run.id),
        flow_name=flow_name,
        flow_run_name=run.name,
        state=state.type.value if state else "UNKNOWN",
        state_name=state.name if state else "Unknown",
        done=bool(state and state.is_final()),
        message=state.message if state else None,
        ui_url=url_for("flow-run", obj_id=run.id),
    )
    if state is not None and state.is_completed():
        try:
            body.result = await state.result(raise_on_failure=False)
        except Exception as error:  # the result lives in storage this host cannot read
            body.message = f"completed; its result is not readable here ({type(error).__name__}: {error})"
    return JSONResponse(body.model_dump(mode="json"))
