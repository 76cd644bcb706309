"""The simulator behaves like SATUSEHAT as the research documents it: examples accepted, rule breaks refused."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import httpx
import pytest

from simulator.config import SimulatorConfig
from simulator.server import start_simulator
from tests.plugins.simulator import CLIENT_ID, CLIENT_SECRET, ORG_ID, SimulatorSession
from tests.simulator.examples import VALID, example, load


def create(sim: SimulatorSession, resource: dict[str, Any]) -> dict[str, Any]:
    response = sim.fhir("POST", resource["resourceType"], json=resource)
    assert response.status_code == 201, response.text
    return response.json()


def rule_numbers(response: httpx.Response) -> set[int]:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    numbers = set()
    for issue in outcome["issue"]:  # some rules are answered without a number (simulator/catalogue.py)
        assert issue["severity"] and issue["code"] and issue["expression"], issue
        match = re.search(r"RuleNumber: (\d+)", issue["details"]["text"])
        if match:
            numbers.add(int(match.group(1)))
    return numbers


def radiology_chain(sim: SimulatorSession) -> dict[str, str]:
    """Every valid example, posted in workflow order with references to what was created before it."""
    ids: dict[str, str] = {}
    for kind in ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport"):
        ids[kind] = create(sim, example(VALID[kind], ORG_ID, ids))["id"]
    return ids


# --- OAuth2 -----------------------------------------------------------------------------------------------


def test_token_response_has_the_platform_shape(simulator: SimulatorSession) -> None:
    response = simulator.http.post(
        f"{simulator.running.auth_url}/accesstoken",
        params={"grant_type": "client_credentials"},
        data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
    )
    assert response.status_code == 200
    body = response.json()
    reference = load("token_response__satusehat-docs-accesstoken.json")
    assert set(body) == set(reference)
    scalars = {k: v for k, v in body.items() if k != "api_product_list_json"}
    assert all(isinstance(v, str) for v in scalars.values()), scalars
    assert body["expires_in"] == "3599" and body["token_type"] == "BearerToken"
    issued_ms = int(body["issued_at"])
    assert abs(issued_ms / 1000 - dt.datetime.now(dt.UTC).timestamp()) < 60


@pytest.mark.parametrize(
    ("data", "params"),
    [
        ({"client_id": CLIENT_ID, "client_secret": "wrong"}, {"grant_type": "client_credentials"}),
        ({"client_id": "someone-else", "client_secret": CLIENT_SECRET}, {"grant_type": "client_credentials"}),
    ],
)
def test_wrong_credentials_get_401_operation_outcome(
    simulator: SimulatorSession, data: dict[str, str], params: dict[str, str]
) -> None:
    response = simulator.http.post(f"{simulator.running.auth_url}/accesstoken", params=params, data=data)
    assert response.status_code == 401
    assert response.json() == load("operationoutcome__satusehat-docs-accesstoken-4xx.json")


def test_grant_type_must_be_in_the_query(simulator: SimulatorSession) -> None:
    response = simulator.http.post(
        f"{simulator.running.auth_url}/accesstoken", data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    )
    assert response.status_code == 400


def test_fhir_needs_a_valid_token(simulator: SimulatorSession) -> None:
    url = f"{simulator.running.fhir_url}/Encounter?identifier=x"
    assert simulator.http.get(url).status_code == 401
    assert simulator.http.get(url, headers={"Authorization": "Bearer made-up"}).status_code == 401
    token = simulator.token()
    assert simulator.http.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    simulator.http.post(f"{simulator.running.base_url}/admin/expire-tokens").raise_for_status()
    expired = simulator.http.get(url, headers={"Authorization": f"Bearer {token}"})
    assert expired.status_code == 401
    assert expired.json()["issue"][0]["code"] == "invalid-access-token"


def test_token_lifetime_is_configurable() -> None:
    config = SimulatorConfig(client_id="c", client_secret="s", token_ttl_s=1, router_enabled=False)
    with start_simulator(config) as running, httpx.Client() as http:
        body = http.post(
            f"{running.auth_url}/accesstoken",
            params={"grant_type": "client_credentials"},
            data={"client_id": "c", "client_secret": "s"},
        ).json()
        assert body["expires_in"] == "1"
        token = body["access_token"]
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=10)
        status = 200
        while status == 200 and dt.datetime.now(dt.UTC) < deadline:  # expires by itself, no admin call
            status = http.get(f"{running.fhir_url}/Encounter", headers={"Authorization": f"Bearer {token}"}).status_code
        assert status == 401


# --- FHIR: the valid examples, create, read, update, search --------------------------------------------------


def test_every_valid_example_is_accepted_in_workflow_order(simulator: SimulatorSession) -> None:
    ids = radiology_chain(simulator)
    for kind, resource_id in ids.items():
        read = simulator.fhir("GET", f"{kind}/{resource_id}")
        assert read.status_code == 200
        body = read.json()
        assert body["id"] == resource_id and body["resourceType"] == kind
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", resource_id)
        assert body["meta"]["versionId"] and dt.datetime.fromisoformat(body["meta"]["lastUpdated"]).tzinfo


def test_search_by_identifier_returns_a_searchset_bundle(simulator: SimulatorSession) -> None:
    ids = radiology_chain(simulator)
    system = f"http://sys-ids.kemkes.go.id/acsn/{ORG_ID}"
    for query in (f"identifier={system}|21120054", f"identifier={system}%7C21120054"):
        bundle = simulator.fhir("GET", f"ServiceRequest?{query}&_sort=-_lastUpdated&_count=1").json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
        assert bundle["total"] == 1
        (entry,) = bundle["entry"]
        assert entry["resource"]["id"] == ids["ServiceRequest"]
        assert entry["fullUrl"].endswith(f"/ServiceRequest/{ids['ServiceRequest']}")
        assert entry["search"]["mode"] == "match"
    empty = simulator.fhir("GET", f"ServiceRequest?identifier={system}|nope").json()
    assert empty["total"] == 0 and "entry" not in empty


def test_search_sorts_newest_first_and_count_limits_entries_not_total(simulator: SimulatorSession) -> None:
    encounter = create(simulator, example(VALID["Encounter"], ORG_ID))
    first = example(VALID["ServiceRequest"], ORG_ID, {"Encounter": encounter["id"]})
    older = create(simulator, first)
    second = {**first, "identifier": [{**first["identifier"][0], "value": "00002"}, first["identifier"][1]]}
    newer = create(simulator, second)  # same ACSN: the platform allows it, the router takes the newest
    query = f"ServiceRequest?identifier=http://sys-ids.kemkes.go.id/acsn/{ORG_ID}|21120054"
    bundle = simulator.fhir("GET", f"{query}&_sort=-_lastUpdated&_count=1").json()
    assert bundle["total"] == 2 and [e["resource"]["id"] for e in bundle["entry"]] == [newer["id"]]
    ascending = simulator.fhir("GET", f"{query}&_sort=_lastUpdated").json()
    assert [e["resource"]["id"] for e in ascending["entry"]] == [older["id"], newer["id"]]


def test_put_replaces_and_needs_the_id_in_the_body(simulator: SimulatorSession) -> None:
    ids = radiology_chain(simulator)
    study = simulator.fhir("GET", f"ImagingStudy/{ids['ImagingStudy']}").json()
    without_id = {k: v for k, v in study.items() if k != "id"}
    refused = simulator.fhir("PUT", f"ImagingStudy/{ids['ImagingStudy']}", json=without_id)
    assert refused.status_code == 400
    assert "id is required" in refused.json()["issue"][0]["details"]["text"]
    study["numberOfInstances"] = 7
    updated = simulator.fhir("PUT", f"ImagingStudy/{ids['ImagingStudy']}", json=study)
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] != study["meta"]["versionId"]
    assert simulator.fhir("GET", f"ImagingStudy/{ids['ImagingStudy']}").json()["numberOfInstances"] == 7
    missing = simulator.fhir("PUT", "ImagingStudy/00000000-0000-0000-0000-000000000000", json={**study, "id": "0" * 8})
    assert missing.status_code == 400  # the id in the body differs from the URL


def test_read_of_an_unknown_id_is_404(simulator: SimulatorSession) -> None:
    response = simulator.fhir("GET", "Encounter/does-not-exist")
    assert response.status_code == 404
    assert rule_numbers(response) == {20007}


def test_state_survives_a_restart_with_a_database_file(tmp_path: Any) -> None:
    config = SimulatorConfig(client_id="c", client_secret="s", router_enabled=False, db_path=tmp_path / "sim.db")
    with start_simulator(config) as running:
        stored = running.platform.create(example(VALID["Encounter"], config.org_id))
    with start_simulator(config) as running:
        assert running.platform.read("Encounter", stored["id"])["identifier"] == stored["identifier"]


# --- FHIR: rejections, each with its rule number ------------------------------------------------------------


def test_a_second_resource_with_the_same_identifier_is_a_duplicate(simulator: SimulatorSession) -> None:
    encounter = example(VALID["Encounter"], ORG_ID)
    create(simulator, encounter)
    again = simulator.fhir("POST", "Encounter", json=encounter)
    assert again.status_code == 400
    assert rule_numbers(again) == {20002}
    assert again.json()["issue"][0]["code"] == "duplicate"


def test_reference_to_a_missing_resource_is_refused(simulator: SimulatorSession) -> None:
    orphan = example(VALID["ServiceRequest"], ORG_ID, {"Encounter": "6d3f4a0e-0000-4000-8000-000000000000"})
    response = simulator.fhir("POST", "ServiceRequest", json=orphan)
    assert response.status_code == 400
    assert rule_numbers(response) == {20007}
    assert response.json()["issue"][0]["expression"] == ["ServiceRequest.encounter.reference"]


def test_identifier_system_of_another_org_is_rule_10117(simulator: SimulatorSession) -> None:
    wrong = example(VALID["Encounter"], ORG_ID)
    wrong["identifier"][0]["system"] = "http://sys-ids.kemkes.go.id/encounter/100025753"
    response = simulator.fhir("POST", "Encounter", json=wrong)
    assert response.status_code == 400
    issue = response.json()["issue"][0]
    reference = load("operationoutcome__ivanwilliammd-satusehat-integration-issue18-encounter-wrong-org.json")
    assert issue == reference["issue"][0]


def test_dates_just_inside_the_limits_are_accepted(simulator: SimulatorSession) -> None:
    encounter = example(VALID["Encounter"], ORG_ID)
    encounter["period"] = {"start": "2014-06-03T01:00:00+00:00", "end": "2014-06-03T02:00:00+00:00"}
    encounter["statusHistory"][0]["period"] = encounter["period"]
    create(simulator, encounter)


def test_older_example_variants_are_refused_for_their_known_faults(simulator: SimulatorSession) -> None:
    ids = radiology_chain(simulator)
    thorax_dr = example("diagnosticreport__sid-indonesia__TB-DIagnosticReport-Create-Thorax.json", ORG_ID, ids)
    refused = simulator.fhir("POST", "DiagnosticReport", json=thorax_dr)
    assert 10432 in rule_numbers(refused)
    assert any("earlier than 2014-06-03" in issue["details"]["text"] for issue in refused.json()["issue"])
    ct = example("diagnosticreport__sid-indonesia__Example-DiagnosticReport-CT-Head-Neck.json", ORG_ID, ids)
    assert 10071 in rule_numbers(simulator.fhir("POST", "DiagnosticReport", json=ct))
    # This one names org 1000004 (one zero short): a wrong organisation (10441), and the old RAD category (10009).
    thorax_obs = load("observation__sid-indonesia__TB-Observation-Create-Thorax.json")
    thorax_obs["encounter"]["reference"] = f"Encounter/{ids['Encounter']}"
    thorax_obs["performer"][1]["reference"] = f"Organization/{ORG_ID}"
    assert {10441, 10009} <= rule_numbers(simulator.fhir("POST", "Observation", json=thorax_obs))


def test_structure_errors_name_the_element(simulator: SimulatorSession) -> None:
    encounter = example(VALID["Encounter"], ORG_ID)
    encounter["colour"] = "blue"
    encounter["status"] = "wandering"
    response = simulator.fhir("POST", "Encounter", json=encounter)
    assert response.status_code == 400
    assert rule_numbers(response) == {20008}
    assert response.json()["issue"][0]["expression"] == ["Encounter.colour"]


def test_unreadable_json_and_wrong_resource_type(simulator: SimulatorSession) -> None:
    garbage = simulator.fhir("POST", "Encounter", content=b"{not json", headers={"Content-Type": "application/json"})
    assert garbage.status_code == 400 and rule_numbers(garbage) == {20005}
    mismatch = simulator.fhir("POST", "Encounter", json=example(VALID["ServiceRequest"], ORG_ID))
    assert mismatch.status_code == 400 and rule_numbers(mismatch) == {20006}


def test_admin_endpoint_is_off_unless_enabled() -> None:
    config = SimulatorConfig(client_id="c", client_secret="s", router_enabled=False)
    with start_simulator(config) as running, httpx.Client() as http:
        assert http.get(f"{running.base_url}/admin/state").status_code == 404
        assert http.post(f"{running.base_url}/admin/expire-tokens").status_code == 404
