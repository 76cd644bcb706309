"""Schema-driven fuzzing of the HIS API from its own OpenAPI document (schemathesis on Hypothesis).

Every operation /api/openapi.json lists is called with bodies, paths, queries and headers generated from it: values
the schema allows (positive) and values it forbids (negative), with a valid credential (the API key or HTTP Basic)
and without one. The app is the real one from `create_app` (authentication middleware, validation, error handlers,
routes and their answers); only its FlowBackend, the Prefect calls behind the endpoints, is a recorder that answers
what a flow would, so that 1000+ calls run in seconds and a valid body shows up as a flow the API *would* start.
`/api/satset/token` talks to the SATUSEHAT simulator, as it would to the platform.

For every call: no 5xx; a 422 is `{"error": "invalid input", "fields": [{"field", "in", "rule"}]}` naming fields
the operation has and a rule in words, and started no flow; a 401 says what to send; a 2xx started exactly one
flow with a validated input; nothing else.

The schema cannot describe what a careless or hostile HIS sends around it, so Hypothesis strategies add those
shapes to valid bodies (`test_hostile_shapes_...`): date-times out of range or in forms SATUSEHAT does not use
(.NET's DateTime.MinValue, year 9999 at -12:00, ISO week dates), control characters and overlong text in any
string field, bodies nested deeper than the parser recurses or larger than API_MAX_BODY_BYTES, and odd
Authorization, X-API-Key, Prefer, Idempotency-Key and Content-Type headers. The same rule holds: no 5xx, and
every 4xx is JSON naming the field.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from prefect.client.schemas.objects import FlowRun
from prefect.states import Scheduled
from schemathesis import GenerationMode
from schemathesis.specs.openapi.formats import unregister_string_format

from api.app import OPEN_PATHS, create_app
from api.runs import Finished, FlowBackend
from models.inputs import (
    Batch1Input,
    Batch2Input,
    Batch3Input,
    Batch4Input,
    DiagnosticReportInput,
    DicomProcessInput,
    EncounterInput,
    GatewayInput,
    ObservationInput,
    ServiceRequestInput,
)
from tasks import runtime
from tests.api.conftest import API_KEY, BASIC_PASSWORD, BASIC_USER, DATED, api_settings
from tests.plugins.simulator import CLIENT_ID, CLIENT_SECRET, ORG_ID, SimulatorSession

POSITIVE_EXAMPLES = 50
"""Per operation, with a credential, values the schema allows."""
NEGATIVE_EXAMPLES = 40
"""Per operation, with a credential, values the schema forbids."""
ANONYMOUS_EXAMPLES = 8
"""Per operation and mode, without a credential."""
MINIMUM_CASES = 1000

LOCATIONS = {"body", "path", "query", "header"}


# --- the Prefect calls, recorded -----------------------------------------------------------------------------


def _result(flow: str) -> dict[str, Any]:
    """What the flow returns on success (the shapes of api/schemas.py), with fresh ids."""
    ids = {name: str(uuid4()) for name in ("encounter", "service_request", "imaging", "observation", "report")}
    batch1 = {"encounter_id": ids["encounter"], "service_request_id": ids["service_request"]}
    batch2 = {"observation_id": ids["observation"], "diagnostic_report_id": ids["report"]}
    batch3 = {**batch1, **batch2, "imaging_study_id": ids["imaging"]}
    routed = {"status": "success", "study_uid": "1.2.3", "router": "DCMROUTER@127.0.0.1:11112"}
    resource = {"encounter": "Encounter", "service-request": "ServiceRequest", "observation": "Observation"}
    results: dict[str, dict[str, Any]] = {
        "batch1": batch1,
        "batch2": batch2,
        "batch3": batch3,
        "batch4": {**batch3, "dicom_process": routed},
        "conclusion": {"resourceType": "DiagnosticReport", "id": ids["report"]},
        "imaging-lookup": {"imagingStudy_id": ids["imaging"]},
        "dicom-process": {
            **routed,
            "total_instance": 2,
            "sent_instance": 2,
            "patient_modified": False,
            "accession_modified": True,
        },
        **{flow: {"resourceType": kind, "id": str(uuid4())} for flow, kind in resource.items()},
    }
    return results[flow]


@dataclass
class RecordingFlows(FlowBackend):
    """Records each flow the API starts or queues, answers as the flow would, and knows the runs it queued."""

    store: Any = None
    ran: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    queued: dict[UUID, tuple[FlowRun, str]] = field(default_factory=dict)

    async def run(self, flow: str, **parameters: Any) -> Finished:
        self.ran.append((flow, parameters))
        result = _result(flow)
        if "resourceType" in result and self.store is not None:
            # A single-resource flow returns {resourceType, id}; the API reads the resource from the platform.
            made = self.store.create({"resourceType": result["resourceType"], "status": "final"})
            result = {"resourceType": result["resourceType"], "id": made["id"]}
        return Finished(uuid4(), result=result)

    async def queue(self, name: str, parameters: dict[str, Any], idempotency_key: str | None) -> FlowRun:
        flow = name.split("/")[0]
        run = FlowRun(
            flow_id=uuid4(),
            name=f"{flow}-fuzz",
            parameters=parameters,
            idempotency_key=idempotency_key,
            state=Scheduled(),
        )
        self.queued[run.id] = (run, flow)
        return run

    async def read(self, flow_run_id: UUID) -> tuple[FlowRun, str] | None:
        return self.queued.get(flow_run_id)

    @property
    def started(self) -> int:
        return len(self.ran) + len(self.queued)


# --- values the schema cannot say -----------------------------------------------------------------------------


def satusehat_datetimes() -> st.SearchStrategy[str]:
    """ISO 8601 date-times SATUSEHAT accepts (after 2014-06-03, not in the future), in the forms HIS send; and
    sometimes any RFC 3339 date-time, which the rules then refuse. JSON Schema has no way to bound a date-time, so
    without this nearly every body the schema allows would be refused for its date alone."""
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    offsets = st.sampled_from([UTC, timezone(timedelta(hours=7)), timezone(timedelta(hours=-3, minutes=-30))])
    plausible = st.builds(
        lambda day, moment, offset, zulu: (
            datetime.combine(day, moment, offset).isoformat().replace("+00:00", "Z" if zulu else "+00:00")
        ),
        st.dates(min_value=date(2014, 6, 4), max_value=yesterday),
        st.times().map(lambda t: t.replace(microsecond=0)),
        offsets,
        st.booleans(),
    )
    anything = st.datetimes(timezones=st.just(UTC)).map(lambda moment: moment.isoformat())
    return st.one_of(plausible, plausible, plausible, anything, hostile_datetimes())


OVERFLOWING_DATETIMES = ("0001-01-01T00:00:00", "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00")
"""Valid ISO 8601 that overflows when converted to UTC: .NET's DateTime.MinValue read as WIB, the last second of
year 9999 west of UTC."""


def hostile_datetimes() -> st.SearchStrategy[str]:
    """Date-times at the edges of what Python's datetime holds, and ISO 8601 forms SATUSEHAT does not use."""
    edges = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59))
    offsets = st.sampled_from(["", "Z", "+14:00", "-12:00", "+0700", "-00:01"])
    at_the_edges = st.builds(lambda moment, offset: moment.replace(microsecond=0).isoformat() + offset, edges, offsets)
    week_dates = st.builds(
        lambda year, week, day, offset: f"{year:04d}-W{week:02d}-{day}T10:00:00{offset}",
        st.integers(2015, 2025),
        st.integers(1, 52),
        st.integers(1, 7),
        offsets,
    )
    return st.one_of(st.sampled_from(OVERFLOWING_DATETIMES), at_the_edges, week_dates)


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture
def flows(simulator: SimulatorSession) -> RecordingFlows:
    return RecordingFlows(store=simulator.running.platform.store)


@pytest.fixture
def app(simulator: SimulatorSession, flows: RecordingFlows, monkeypatch: pytest.MonkeyPatch) -> Iterator[FastAPI]:
    """The HIS API with recorded flows; /token fetches real tokens from the simulator (no PACS, no router used)."""
    running = simulator.running
    environment = {
        "DCM4CHEE_URL": "http://127.0.0.1:9/dicom-web",
        "ROUTER_IP": "127.0.0.1",
        "SS_AUTH_URL": running.auth_url,
        "SS_BASE_URL": running.fhir_url,
        "SS_ORG_ID": ORG_ID,
        "SS_CLIENT_ID": CLIENT_ID,
        "SS_CLIENT_SECRET": CLIENT_SECRET,
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    schemathesis.openapi.format("date-time", satusehat_datetimes())
    yield create_app(api_settings(), flows=flows)
    unregister_string_format("date-time")
    runtime.reset()


# --- the checks ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    cases: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)


def _credentials(number: int) -> dict[str, str]:
    """The API key and HTTP Basic, taken in turn."""
    if number % 2:
        token = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    return {"X-API-Key": API_KEY}


def _parameter_names(operation: Any) -> dict[str, set[str]]:
    """What the operation takes, by location: body keys, and path, query and header parameter names."""
    names: dict[str, set[str]] = {location: set() for location in LOCATIONS}
    for parameter in operation.definition.raw.get("parameters", []):
        name = parameter["name"]
        names[parameter["in"]].add(name.lower() if parameter["in"] == "header" else name)
    body = operation.definition.raw.get("requestBody")
    if body is not None:
        reference = body["content"]["application/json"]["schema"]["$ref"]
        model = reference.rsplit("/", 1)[-1]
        names["body"] |= set(operation.schema.raw_schema["components"]["schemas"][model]["properties"])
    return names


def check_answer(operation: Any, case: Any, response: Any, *, authenticated: bool, started: int) -> None:
    """The rules every answer keeps, whatever was sent (see the module docstring)."""
    status = response.status_code
    where = f"{case.method} {case.formatted_path} -> {status}: {response.text[:500]}"
    assert status < 500, where
    body = json.loads(response.text)  # every answer is JSON, errors included
    if status == 401:
        assert not authenticated, where
        assert body["error"] in ("authentication required", "invalid credentials"), where
        assert "X-API-Key" in body["detail"] and "HTTP Basic" in body["detail"], where
        assert "Basic" in response.headers["www-authenticate"][0], where
        assert started == 0, "a refused call must not start a flow"
        return
    assert authenticated or case.path in OPEN_PATHS, where
    if status == 422:
        assert set(body) == {"error", "fields"} and body["error"] == "invalid input", where
        assert body["fields"], where
        known = _parameter_names(operation)
        for problem in body["fields"]:
            assert set(problem) == {"field", "in", "rule"}, where
            assert problem["in"] in LOCATIONS, where
            name = problem["field"]
            top = name.split(".")[0]
            if problem["in"] == "body":
                assert name == "body" or top in known["body"], f"unknown body field {name!r}: {where}"
            else:
                assert top.lower() in known[problem["in"]], f"unknown {problem['in']} field {name!r}: {where}"
            assert isinstance(problem["rule"], str) and len(problem["rule"]) >= 8, where
            assert not problem["rule"].startswith(("Value error", "Assertion failed")), where
        assert started == 0, "an invalid call must not start a flow"
        return
    if status == 404:
        assert case.path == "/api/runs/{flow_run_id}", where
        assert body == {"error": "no such flow run", "field": "flow_run_id"}, where
        return
    assert status in (200, 201, 202), where
    flow_endpoint = case.path not in ("/api/satset/halo", "/api/satset/token", "/api/runs/{flow_run_id}")
    assert started == (1 if flow_endpoint else 0), f"{started} flows started: {where}"
    if status == 202:
        assert set(body) == {"flow_run_id", "flow_run_name", "state", "idempotency_key", "ui_url", "status_url"}
        assert response.headers["location"] == [body["status_url"]], where


def check_flow_inputs(flows: RecordingFlows) -> None:
    """Each flow the API ran or queued got what validation made of the body, never the raw body."""
    for flow, parameters in flows.ran:
        if flow == "imaging-lookup":
            assert isinstance(parameters["acsn"], str) and 1 <= len(parameters["acsn"]) <= 16
        else:
            assert isinstance(parameters["payload"], GatewayInput), flow
    for run, _ in flows.queued.values():
        assert "subject_display" not in run.parameters["payload"]  # the patient's name is never queued


def fuzz(
    app: FastAPI, flows: RecordingFlows, tally: Tally, *, authenticated: bool, mode: GenerationMode, examples: int
) -> None:
    """Every operation of the app's OpenAPI document, `examples` generated calls each (fewer if the space is small)."""
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", app)
    for result in schema.get_all_operations():
        operation = result.ok()
        has_input = bool(operation.definition.raw.get("parameters") or operation.definition.raw.get("requestBody"))
        if mode is GenerationMode.NEGATIVE and not has_input:
            continue  # nothing to make invalid (GET /halo)
        fuzz_operation(operation, flows, tally, authenticated=authenticated, mode=mode, examples=examples)
    check_flow_inputs(flows)


def fuzz_operation(
    operation: Any, flows: RecordingFlows, tally: Tally, *, authenticated: bool, mode: GenerationMode, examples: int
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )
    def call(case: Any) -> None:
        before = flows.started
        response = case.call(headers=_credentials(tally.cases) if authenticated else {})
        tally.cases += 1
        tally.statuses[(operation.label, response.status_code)] += 1
        check_answer(operation, case, response, authenticated=authenticated, started=flows.started - before)

    call()


# --- the tests -------------------------------------------------------------------------------------------------


def test_the_his_api_answers_every_generated_call_within_its_contract(
    app: FastAPI, flows: RecordingFlows, record_property: Callable[[str, object], None]
) -> None:
    tally = Tally()

    fuzz(app, flows, tally, authenticated=True, mode=GenerationMode.POSITIVE, examples=POSITIVE_EXAMPLES)
    fuzz(app, flows, tally, authenticated=True, mode=GenerationMode.NEGATIVE, examples=NEGATIVE_EXAMPLES)
    authenticated = tally.cases
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        fuzz(app, flows, tally, authenticated=False, mode=mode, examples=ANONYMOUS_EXAMPLES)

    by_status = Counter(status for (_, status), count in tally.statuses.items() for _ in range(count))
    print(f"\n{tally.cases} calls ({authenticated} authenticated): {dict(sorted(by_status.items()))}")
    print(f"flows started: {len(flows.ran)} here, {len(flows.queued)} queued")
    record_property("cases", tally.cases)  # in the JUnit XML report, with the statuses
    record_property("statuses", dict(sorted(by_status.items())))
    assert tally.cases >= MINIMUM_CASES, f"only {tally.cases} calls were generated and checked"
    # The fuzz reached both sides of validation: valid bodies started flows on every flow endpoint, invalid ones
    # were refused; and the unauthenticated calls were refused.
    started = Counter(flow for flow, _ in flows.ran) + Counter(flow for _, flow in flows.queued.values())
    assert set(started) == {
        "batch1",
        "batch2",
        "batch3",
        "batch4",
        "encounter",
        "service-request",
        "observation",
        "conclusion",
        "imaging-lookup",
        "dicom-process",
    }, started
    assert by_status[422] > 0 and by_status[401] > 0 and by_status[202] > 0


def test_a_body_that_is_not_utf8_is_a_422_naming_the_body(app: FastAPI, flows: RecordingFlows) -> None:
    """FastAPI's own answer to undecodable bytes is a bare 400 "There was an error parsing the body"."""
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        answer = client.post(
            "/api/satset/batch1",
            content=b'{"noacsn": "\xa4\x96"}',
            headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
        )
        text = client.post(
            "/api/satset/batch1",
            content=b'{"noacsn": ',
            headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
        )

    assert answer.status_code == 422, answer.text
    assert answer.json() == {
        "error": "invalid input",
        "fields": [{"field": "body", "in": "body", "rule": "the body is not valid JSON (it must be UTF-8 text)"}],
    }
    assert text.status_code == 422 and text.json()["fields"][0]["field"] == "body"
    assert flows.started == 0


def test_the_openapi_document_states_the_value_rules(app: FastAPI) -> None:
    """The patterns the schema-driven fuzz generates from are the rules validation applies."""
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        document = client.get("/api/openapi.json").json()
    properties = document["components"]["schemas"]["Batch4Input"]["properties"]
    assert properties["noacsn"]["pattern"].startswith("^") and properties["noacsn"]["maxLength"] == 16
    assert properties["study"]["pattern"] == r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$"
    modality = properties["modality"]  # optional (no modality is assumed): the codes sit in its anyOf
    enums = [item.get("enum", []) for item in modality.get("anyOf", [modality])]
    assert any("DX" in codes and "CT" in codes for codes in enums)
    subject = next(branch for branch in properties["subject_id"]["anyOf"] if branch.get("type") == "string")
    assert subject["pattern"] == r"^[A-Za-z0-9\-.]{1,64}$"
    assert properties["performer_value"]["pattern"] == r"\S"  # not blank
    acsn = next(p for p in document["paths"]["/api/satset/imageid/{acsn}"]["get"]["parameters"] if p["name"] == "acsn")
    assert acsn["schema"]["pattern"] == properties["noacsn"]["pattern"]


# --- shapes the schema cannot describe ---------------------------------------------------------------------------

HOSTILE_BODY_LIMIT = 16384
"""API_MAX_BODY_BYTES for the hostile shapes: small, so that an oversized body is cheap to generate."""

ENDPOINT_BODIES: dict[str, dict[str, Any]] = {**DATED, "/api/dicom/process": {"study": "1.2.826.0.1.3680043.8.498.1"}}
"""Every endpoint with a body, each with a body that is valid as it stands."""

FIELDS: dict[str, set[str]] = {
    f"/api/{prefix}/{name}": set(model.model_fields)
    for prefix, name, model in (
        ("satset", "encounter", EncounterInput),
        ("satset", "service-req", ServiceRequestInput),
        ("satset", "observation", ObservationInput),
        ("satset", "conclusion", DiagnosticReportInput),
        ("satset", "batch1", Batch1Input),
        ("satset", "batch2", Batch2Input),
        ("satset", "batch3", Batch3Input),
        ("satset", "batch4", Batch4Input),
        ("dicom", "process", DicomProcessInput),
    )
}
"""The fields each endpoint reads (a body's other keys are ignored, whatever they hold)."""

DATE_FIELDS = ("period_start", "period_end")

control_characters = st.characters(codec="utf-8", categories=["Cc", "Zl", "Zp"])
"""NUL, newlines, escape, DEL, the C1 controls, U+2028 and U+2029."""

text_with_controls = st.builds(
    lambda before, bad, after: before + bad + after,
    st.text(max_size=8),
    st.text(control_characters, min_size=1, max_size=4),
    st.text(max_size=8),
)

long_text = st.text(st.characters(categories=["L", "N"]), min_size=65, max_size=6000)
"""Longer than any identifier may be, with nothing that stripping would remove."""

header_text = st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]), max_size=40)
"""What a header can carry (latin-1 bytes), control characters aside: the HTTP layer refuses those first."""


@dataclass(frozen=True)
class Shape:
    """One hostile request: which endpoint, what changed, and the field a refusal must name (None: any)."""

    path: str
    what: str
    body: bytes
    headers: dict[str, bytes]
    field: str | None
    must_refuse: bool = False


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


@st.composite
def hostile_shapes(draw: st.DrawFn) -> Shape:
    path = draw(st.sampled_from(sorted(ENDPOINT_BODIES)))
    base = ENDPOINT_BODIES[path]
    key = {"X-API-Key": API_KEY.encode()}
    strings = sorted(name for name, value in base.items() if isinstance(value, str) and name in FIELDS[path])
    kind = draw(st.sampled_from(["date", "control", "long", "nested", "nested-field", "huge", "header", "auth"]))
    if kind == "date" and path != "/api/dicom/process":
        name = draw(st.sampled_from([field for field in DATE_FIELDS if field in FIELDS[path]]))
        value = draw(hostile_datetimes())
        refused = value in OVERFLOWING_DATETIMES or "W" in value
        return Shape(path, f"{name}={value!r}", _json({**base, name: value}), key, name, must_refuse=refused)
    if kind in ("control", "long"):
        name = draw(st.sampled_from(strings))
        value = draw(text_with_controls if kind == "control" else long_text)
        refused = name == "identifier_value" and (kind == "long" or any(ord(c) < 0x20 for c in value.strip()))
        return Shape(path, f"{kind} {name}", _json({**base, name: value}), key, name, must_refuse=refused)
    if kind in ("nested", "nested-field"):
        depth = draw(st.one_of(st.integers(1, 50), st.integers(1000, 5000)))
        opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        nested = opening * depth + "0" + closing * depth
        if kind == "nested":
            return Shape(path, f"nested {depth}", nested.encode(), key, None, must_refuse=True)
        name = draw(st.sampled_from(strings))
        body = _json({**base, name: 0}).replace(b'"' + name.encode() + b'": 0', f'"{name}": {nested}'.encode())
        return Shape(path, f"nested {depth} in {name}", body, key, None, must_refuse=True)
    if kind == "huge":
        size = draw(st.integers(HOSTILE_BODY_LIMIT + 1, 4 * HOSTILE_BODY_LIMIT))
        body = _json({**base, "performer_value": "x" * size})
        return Shape(path, f"huge {len(body)} bytes", body, key, "body", must_refuse=True)
    if kind == "header":
        name = draw(st.sampled_from(["Prefer", "Idempotency-Key", "Content-Type", "Accept"]))
        value = draw(header_text).encode("latin-1")
        return Shape(
            path + draw(st.sampled_from(["", "?async=true"])),
            f"{name}: {value!r}",
            _json(base),
            {**key, name: value},
            None,
        )
    scheme = draw(st.sampled_from(["Basic ", "basic ", "Bearer ", ""]))
    credential = draw(st.one_of(header_text, st.binary(max_size=30).map(lambda raw: base64.b64encode(raw).decode())))
    value = (scheme + credential).encode("latin-1")
    name = draw(st.sampled_from(["Authorization", "X-API-Key"]))
    if name == "X-API-Key":
        value = credential.encode("latin-1")
    return Shape(path, f"{name}: {value!r}", _json(base), {name: value}, None, must_refuse=True)


def _body_fields(document: dict[str, Any], path: str) -> set[str]:
    reference = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return set(document["components"]["schemas"][reference.rsplit("/", 1)[-1]]["properties"])


def test_hostile_shapes_answer_4xx_naming_the_field_never_5xx(flows: RecordingFlows, app: FastAPI) -> None:
    """`app` sets the gateway's environment (a resource is read back from the simulator); this test makes its own
    app, with a small body limit."""
    from starlette.testclient import TestClient

    app = create_app(api_settings(API_MAX_BODY_BYTES=HOSTILE_BODY_LIMIT), flows=flows)
    seen: Counter[tuple[str, int]] = Counter()
    with TestClient(app, raise_server_exceptions=False) as client:
        document = client.get("/api/openapi.json").json()

        @given(shape=hostile_shapes())
        @hypothesis.settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call(shape: Shape) -> None:
            before = flows.started
            answer = client.post(
                shape.path, content=shape.body, headers={"Content-Type": b"application/json", **shape.headers}
            )
            where = f"{shape.path} {shape.what} -> {answer.status_code}: {answer.text[:300]}"
            seen[(shape.what.split(" ")[0].split("=")[0], answer.status_code)] += 1
            assert answer.status_code < 500, where
            body = answer.json()  # every answer is JSON
            if shape.must_refuse:
                assert 400 <= answer.status_code < 500, where
            if answer.status_code == 401:
                assert body["error"] in ("authentication required", "invalid credentials"), where
            elif 400 <= answer.status_code < 500:
                assert answer.status_code in (413, 422), where
                names = {problem["field"].split(".")[0] for problem in body["fields"]}
                assert all(len(problem["rule"]) >= 8 for problem in body["fields"]), where
                known = _body_fields(document, shape.path.split("?")[0]) | {"body", "Idempotency-Key", "prefer"}
                assert names <= known, where
                if shape.field is not None:
                    assert shape.field in names, where
            if answer.status_code >= 400:
                assert flows.started == before, where

        call()
    print(f"\nhostile shapes: {dict(sorted(seen.items()))}")
    refused = {status for (_, status) in seen if status >= 400}
    assert {401, 413, 422} <= refused, seen
