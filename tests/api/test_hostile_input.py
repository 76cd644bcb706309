"""What a careless or hostile HIS sends, answered with a 4xx that names the field, never a 5xx: dates that overflow,
ISO week dates, identifiers with control characters, deeply nested and oversized bodies, odd Authorization
headers, and a Basic user no one could log in as. No real part is needed: nothing here may reach a flow."""

from __future__ import annotations

import base64
import json
from typing import Any
from uuid import uuid4

import httpx
import pytest
from typer.testing import CliRunner

from api.app import create_app, redact_query
from api.auth import ApiConfigError
from api.runs import Finished, FlowBackend
from models.settings import ApiSettings
from tests.api.conftest import API_KEY, BASIC_PASSWORD, BASIC_USER, BATCH3, DATED, PATIENT_NAME, api_settings

pytestmark = pytest.mark.anyio

OVERFLOWING = ["0001-01-01T00:00:00", "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00"]


class NoFlows(FlowBackend):
    """Counts the flows the API would start; answers as a flow that did nothing."""

    def __init__(self) -> None:
        self.started: list[str] = []

    async def run(self, flow: str, **parameters: Any) -> Finished:
        self.started.append(flow)
        return Finished(uuid4(), result={})


@pytest.fixture
def flows() -> NoFlows:
    return NoFlows()


@pytest.fixture
async def client(flows: NoFlows) -> Any:
    app = create_app(api_settings(API_MAX_BODY_BYTES=8192), flows=flows)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test", headers={"X-API-Key": API_KEY}
    ) as client:
        yield client


def only_problem(answer: httpx.Response) -> dict[str, str]:
    assert answer.status_code == 422, answer.text
    problems = answer.json()["fields"]
    assert len(problems) == 1, problems
    return dict(problems[0])


@pytest.mark.parametrize("value", OVERFLOWING)
@pytest.mark.parametrize("path", sorted(DATED))
async def test_dates_that_overflow_in_conversion_are_a_422_naming_the_field(
    client: httpx.AsyncClient, flows: NoFlows, path: str, value: str
) -> None:
    answer = await client.post(path, json={**DATED[path], "period_start": value})

    problem = only_problem(answer)
    assert problem["field"] == "period_start" and "out of range" in problem["rule"], problem
    assert flows.started == []


async def test_an_overflowing_period_end_is_named_too(client: httpx.AsyncClient) -> None:
    answer = await client.post("/api/satset/encounter", json={**BATCH3, "period_end": "9999-12-31T23:59:59-12:00"})
    assert only_problem(answer)["field"] == "period_end"


@pytest.mark.parametrize(
    "value",
    ["2025-W31-5T10:00:00", "2025-W31-5T10:00:00+07:00", "20250801T100000", "2025-08-01T10", "2025-08-01T10:00:00 WIB"],
)
async def test_date_forms_satusehat_does_not_use_are_refused(client: httpx.AsyncClient, value: str) -> None:
    answer = await client.post("/api/satset/batch1", json={**BATCH3, "period_start": value})

    problem = only_problem(answer)
    assert problem["field"] == "period_start" and "YYYY-MM-DDThh:mm:ss+zz:zz" in problem["rule"], problem


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("RG\x00175", "control characters"),
        ("RG\n175", "line breaks"),
        ("RG\u2028175", "line breaks"),
        ("R" * 5000, "at most 64 characters"),
    ],
)
async def test_identifier_value_is_one_short_line(client: httpx.AsyncClient, value: str, rule: str) -> None:
    answer = await client.post("/api/satset/batch1", json={**BATCH3, "identifier_value": value})

    problem = only_problem(answer)
    assert problem["field"] == "identifier_value" and rule in problem["rule"], problem
    assert "R" * 100 not in answer.text


async def test_a_deeply_nested_body_is_a_json_422_naming_the_body(client: httpx.AsyncClient) -> None:
    nested = b"[" * 3000 + b"]" * 3000  # within the size limit, deeper than the JSON parser recurses

    answer = await client.post("/api/satset/batch1", content=nested, headers={"Content-Type": "application/json"})

    problem = only_problem(answer)
    assert problem == {"field": "body", "in": "body", "rule": problem["rule"]} and "nested" in problem["rule"]


async def test_a_nested_value_in_a_field_names_that_field(client: httpx.AsyncClient) -> None:
    value: Any = "x"
    for _ in range(60):
        value = {"a": [value]}
    answer = await client.post("/api/satset/batch1", json={**BATCH3, "noacsn": value})
    assert only_problem(answer)["field"] == "noacsn"


async def test_a_body_over_the_limit_is_413_in_json_before_it_is_parsed(
    client: httpx.AsyncClient, flows: NoFlows
) -> None:
    big = {**BATCH3, "performer_value": "x" * 9000}

    declared = await client.post("/api/satset/batch3", json=big)

    async def chunks() -> Any:  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    streamed = await client.post("/api/satset/batch3", content=chunks(), headers={"Content-Type": "application/json"})

    for answer in (declared, streamed):
        assert answer.status_code == 413, answer.text
        assert answer.json() == {
            "error": "request body too large",
            "fields": [{"field": "body", "in": "body", "rule": "must be at most 8192 bytes (API_MAX_BODY_BYTES)"}],
        }
    assert flows.started == []
    assert (await client.post("/api/satset/batch3", json=BATCH3)).status_code == 200  # under it: as before


def test_the_body_limit_is_a_setting_with_a_default() -> None:
    assert ApiSettings(_env_file=None).api_max_body_bytes == 1_048_576  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic " + base64.b64encode("hïs:pässword".encode()).decode(),  # valid base64 of non-ASCII UTF-8: fine
        "Basic aGlzOnBhc3N3b3Jk\u00e9",  # a non-ASCII byte in the header itself
        "Basic \u00ff\u00fe",
        "Basic " + base64.b64encode(b"\xff\xfe:\x80").decode(),  # decodes to bytes that are not UTF-8
    ],
)
async def test_odd_basic_credentials_are_a_401_not_a_500(authorization: str) -> None:
    app = create_app(api_settings())
    raw = [(b"authorization", authorization.encode("latin-1"))]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        request = client.build_request("POST", "/api/satset/batch1", json=BATCH3)
        request.headers = httpx.Headers([*request.headers.raw, *raw])
        answer = await client.send(request)

    assert answer.status_code == 401, answer.text
    assert answer.json()["error"] in ("authentication required", "invalid credentials")


def test_a_basic_user_with_a_colon_is_refused_at_start_naming_the_variable() -> None:
    with pytest.raises(ApiConfigError, match="API_BASIC_USER must not contain ':'"):
        create_app(api_settings(API_BASIC_USER="his:ward"))


async def test_basic_user_and_password_still_log_in(client: httpx.AsyncClient) -> None:
    token = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
    answer = await client.post("/api/satset/batch1", json=BATCH3, headers={"Authorization": f"Basic {token}"})
    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject_id", PATIENT_NAME),
        ("individual_reference", f"Practitioner/{PATIENT_NAME}"),
        ("codind_code", "Budi-7"),
        ("period_end", "2025-08-01T05:57:40+00:00"),
    ],
)
async def test_a_422_never_echoes_the_value_sent(client: httpx.AsyncClient, field: str, value: str) -> None:
    answer = await client.post("/api/satset/batch3", json={**BATCH3, field: value})

    problem = only_problem(answer)
    assert problem["field"] == field and len(problem["rule"]) > 10
    assert "Budi" not in answer.text and "05:57:40" not in answer.text
    assert "got" not in problem["rule"], problem


async def test_accession_mismatch_names_neither_value(client: httpx.AsyncClient) -> None:
    body = {**DATED["/api/satset/batch4"], "accesionnum": "OTHERACSN9"}
    problem = only_problem(await client.post("/api/satset/batch4", json=body))
    assert problem["field"] == "accesionnum" and "must equal noacsn" in problem["rule"]
    assert "OTHERACSN9" not in problem["rule"] and BATCH3["noacsn"] not in problem["rule"]


def test_the_access_log_query_string_is_redacted_but_the_apis_own_parameter() -> None:
    assert (
        redact_query("/api/satset/batch1?async=true&api_key=s3cret") == "/api/satset/batch1?async=true&api_key=REDACTED"
    )
    assert redact_query("/api/satset/halo") == "/api/satset/halo"
    assert "s3cret" not in redact_query("/x?token=s3cret&token=s3cret2&=s3cret")


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00", "9999-12-31T23:59:59-12:00", "2025-W31-5T10:00:00"])
def test_satset_run_says_it_in_one_line(value: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`satset run` with such a date: one line naming the field, exit 1, no traceback (settings are checked first,
    so they are given)."""
    import typer

    from cli.run_cmd import run

    for name, setting in {
        "DCM4CHEE_URL": "http://127.0.0.1:9/dicom-web",
        "ROUTER_IP": "127.0.0.1",
        "SS_AUTH_URL": "http://127.0.0.1:9/oauth2/v1",
        "SS_BASE_URL": "http://127.0.0.1:9/fhir-r4/v1",
        "SS_ORG_ID": "10000004",
        "SS_CLIENT_ID": "c",
        "SS_CLIENT_SECRET": "s",
    }.items():
        monkeypatch.setenv(name, setting)
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "order.json"
    params.write_text(json.dumps({**BATCH3, "period_start": value}))
    command = typer.Typer()
    command.command()(run)

    result = CliRunner().invoke(command, ["batch1", "--params", str(params)])

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0] == "error: invalid input:" and len(lines) == 2 and lines[1].strip().startswith("period_start:")


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00", "9999-12-31T23:59:59-12:00"])
def test_satset_orders_add_says_it_in_one_line(value: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`satset orders add` with such a date: the order is refused in one line naming the field, no traceback."""
    from cli.orders_cmd import app as orders

    monkeypatch.setenv("RIS_DATABASE_URL", f"sqlite:///{tmp_path / 'ris.db'}")
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "order.json"
    params.write_text(json.dumps({**BATCH3, "period_start": value}))

    result = CliRunner().invoke(orders, ["add", "--batch", "1", "--params", str(params)])

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "OverflowError" not in result.output
    assert "period_start" in result.output and "out of range" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3, result.output
