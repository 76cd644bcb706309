"""Authentication, documentation and input validation: everything the API decides before any flow runs.

No real part is needed: a refused or invalid call must never reach Prefect, SATUSEHAT or the PACS.
"""

from __future__ import annotations

import httpx
import pytest

from api.app import create_app
from api.auth import ApiConfigError
from tests.api.conftest import API_KEY, BASIC_PASSWORD, BASIC_USER, PATIENT_NAME, api_settings, basic

pytestmark = pytest.mark.anyio

BATCH1 = {
    "identifier_value": "RG2023I0000175",
    "subject_id": "P10443013727",
    "subject_display": PATIENT_NAME,
    "individual_id": "10016869420",
    "period_start": "2025-08-01T05:57:41+00:00",
    "noacsn": "ACC20250002",
}


def test_no_credential_configured_refuses_to_start_naming_the_variables() -> None:
    with pytest.raises(ApiConfigError) as refused:
        create_app(api_settings(API_KEY=None, API_BASIC_USER=None, API_BASIC_PASSWORD=None))
    for variable in ("API_KEY", "API_BASIC_USER", "API_BASIC_PASSWORD", "API_AUTH_DISABLED"):
        assert variable in str(refused.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"API_BASIC_PASSWORD": None}, "API_BASIC_PASSWORD"),
        ({"API_BASIC_USER": None}, "API_BASIC_USER"),
        ({"API_KEY": "short"}, "API_KEY"),
        ({"API_KEY": "short", "API_AUTH_DISABLED": True}, "API_KEY"),  # a half-made configuration is never ignored
    ],
)
def test_a_half_configured_credential_is_refused(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ApiConfigError, match=named):
        create_app(api_settings(**overrides))


async def test_explicitly_disabled_auth_lets_anonymous_calls_through() -> None:
    app = create_app(api_settings(API_KEY=None, API_BASIC_USER=None, API_BASIC_PASSWORD=None, API_AUTH_DISABLED=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        answer = await client.post("/api/satset/batch1", json={})
    assert answer.status_code == 422  # past authentication, stopped by validation
    assert "securitySchemes" not in app.openapi().get("components", {})


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"X-API-Key": API_KEY[:-1] + "X"}, id="wrong-key"),
        pytest.param({"X-API-Key": ""}, id="empty-key"),
        pytest.param(basic(BASIC_USER, BASIC_PASSWORD + "x"), id="wrong-password"),
        pytest.param(basic("intruder", BASIC_PASSWORD), id="wrong-user"),
        pytest.param(basic(API_KEY, ""), id="key-as-basic-user"),
        pytest.param({"Authorization": "Basic not-base64!"}, id="malformed-basic"),
        pytest.param({"Authorization": f"Bearer {API_KEY}"}, id="key-as-bearer"),
    ],
)
async def test_calls_without_a_valid_credential_get_401_with_a_challenge(
    anonymous: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for method, path in [
        ("POST", "/api/satset/batch1"),
        ("GET", "/api/satset/token"),
        ("GET", "/api/satset/imageid/ACC1"),
        ("POST", "/api/dicom/process"),
        ("GET", "/api/runs/00000000-0000-0000-0000-000000000000"),
        ("GET", "/api/no-such-path"),  # no path enumeration without credentials
    ]:
        answer = await anonymous.request(method, path, json=BATCH1, headers=headers)
        assert answer.status_code == 401, (method, path)
        challenge = answer.headers["WWW-Authenticate"]
        assert challenge.startswith('Basic realm="satset-gateway"') and "X-API-Key" in challenge
        assert answer.json()["error"] in ("authentication required", "invalid credentials")
        assert API_KEY not in answer.text and BASIC_PASSWORD not in answer.text


async def test_malformed_json_without_credentials_is_401_not_422(anonymous: httpx.AsyncClient) -> None:
    answer = await anonymous.post(
        "/api/satset/batch1", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 401


@pytest.mark.parametrize(
    "headers",
    [pytest.param({"X-API-Key": API_KEY}, id="key"), pytest.param(basic(BASIC_USER, BASIC_PASSWORD), id="basic")],
)
async def test_either_credential_is_accepted(anonymous: httpx.AsyncClient, headers: dict[str, str]) -> None:
    answer = await anonymous.post("/api/satset/batch1", json={}, headers=headers)
    assert answer.status_code == 422  # authenticated; the empty body is what is wrong


async def test_only_the_configured_scheme_is_accepted() -> None:
    app = create_app(api_settings(API_BASIC_USER=None, API_BASIC_PASSWORD=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        by_basic = await client.post("/api/satset/batch1", json={}, headers=basic(BASIC_USER, BASIC_PASSWORD))
        by_key = await client.post("/api/satset/batch1", json={}, headers={"X-API-Key": API_KEY})
    assert by_basic.status_code == 401 and "Basic" not in by_basic.headers["WWW-Authenticate"]
    assert by_key.status_code == 422


async def test_health_and_docs_are_open(anonymous: httpx.AsyncClient) -> None:
    halo = await anonymous.get("/api/satset/halo")
    assert (halo.status_code, halo.json()) == (200, {"message": "Halo dari Satu Sehat!"})
    docs = await anonymous.get("/api/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/api/openapi.json" in docs.text


async def test_the_openapi_document_has_the_old_paths_and_field_names(anonymous: httpx.AsyncClient) -> None:
    document = (await anonymous.get("/api/openapi.json")).json()

    paths = set(document["paths"])
    for name in ("halo", "token", "encounter", "service-req", "observation", "conclusion", "imageid/{acsn}"):
        assert f"/api/satset/{name}" in paths
    assert {f"/api/satset/batch{n}" for n in range(1, 5)} <= paths and "/api/dicom/process" in paths
    schemas = document["components"]["schemas"]
    assert {"codind_code", "study", "accesionnum", "noacsn"} <= set(schemas["Batch4Input"]["properties"])
    assert {"study", "noacsn", "period_start"} <= set(schemas["Batch4Input"]["required"])
    assert set(schemas["DicomProcessInput"]["properties"]) == {"study", "patientid", "accesionnum"}
    batch4 = document["paths"]["/api/satset/batch4"]["post"]
    assert batch4["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Batch4Input")
    assert {"Idempotency-Key", "async"} <= {p["name"] for p in batch4["parameters"]}
    assert document["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    assert document["security"] == [{"ApiKey": []}, {"Basic": []}]
    assert document["paths"]["/api/satset/halo"]["get"]["security"] == []


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"subject_id": None}, "subject_id", "subject_id is required unless subject_reference"),
        ({"period_start": "01/08/2025 05:57"}, "period_start", "ISO 8601"),
        ({"noacsn": ""}, "noacsn", "must not be empty"),
        ({"noacsn": "A" * 17}, "noacsn", "at most 16 characters"),
        ({"period_end": "2025-08-01T05:00:00+00:00"}, "period_end", "later than period_start"),
        ({"subject_id": "Patient/P1"}, "subject_id", "FHIR id"),
    ],
)
async def test_invalid_bodies_get_422_naming_the_field_and_the_rule(
    his: httpx.AsyncClient, change: dict[str, object], field: str, rule: str
) -> None:
    body = {k: v for k, v in {**BATCH1, **change}.items() if v is not None}

    answer = await his.post("/api/satset/batch1", json=body)

    assert answer.status_code == 422
    problems = answer.json()["fields"]
    assert answer.json()["error"] == "invalid input"
    assert [p["field"] for p in problems] == [field], problems
    assert problems[0]["in"] == "body" and rule in problems[0]["rule"], problems
    assert PATIENT_NAME not in answer.text  # values are never echoed wholesale


async def test_422_for_bodies_that_are_not_objects_and_for_bad_parameters(his: httpx.AsyncClient) -> None:
    not_json = await his.post("/api/satset/batch1", content=b"{oops", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["fields"][0]["field"] == "body"
    a_list = await his.post("/api/dicom/process", json=[BATCH1])
    assert a_list.status_code == 422 and a_list.json()["fields"][0]["rule"] == "must be a JSON object"
    bad_acsn = await his.get("/api/satset/imageid/A%26B")
    assert bad_acsn.status_code == 422 and bad_acsn.json()["fields"][0] == {
        "field": "acsn",
        "in": "path",
        "rule": bad_acsn.json()["fields"][0]["rule"],
    }
    assert "'&'" in bad_acsn.json()["fields"][0]["rule"]
    bad_key = await his.post("/api/satset/batch1?async=true", json=BATCH1, headers={"Idempotency-Key": "has space"})
    assert bad_key.status_code == 422
    assert bad_key.json()["fields"] == [
        {"field": "Idempotency-Key", "in": "header", "rule": bad_key.json()["fields"][0]["rule"]}
    ]
    bad_run = await his.get("/api/runs/not-a-uuid")
    assert bad_run.status_code == 422 and bad_run.json()["fields"][0]["field"] == "flow_run_id"


async def test_dicom_process_needs_a_study_or_an_accession_number(his: httpx.AsyncClient) -> None:
    answer = await his.post("/api/dicom/process", json={"patientid": "P1"})
    assert answer.status_code == 422
    assert answer.json()["fields"][0]["field"] == "accesionnum" and "study" in answer.json()["fields"][0]["rule"]
