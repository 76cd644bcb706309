"""One test per catalogue row: a minimal valid resource is accepted, the same with that one thing broken is
refused with the row's HTTP status, RuleNumber, issue code and expression (simulator/catalogue.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulator.catalogue import BY_KEY, RULES, Rule, render_markdown
from tests.plugins.simulator import ORG_ID, SimulatorSession

REPO = Path(__file__).resolve().parents[2]
SYS = "http://sys-ids.kemkes.go.id"
T = "2025-08-01T05:57:41+00:00"
LATER = "2025-08-01T06:07:41+00:00"
PATIENT = "Patient/P10443013727"
OTHER_PATIENT = "Patient/P02478375538"
REQUESTER = "Practitioner/10016869420"
READER = "Practitioner/10000504193"
LOCATION = "Location/ef011065-38c9-46f8-9c35-d1fe68966a3e"
ORG = f"Organization/{ORG_ID}"


def uid() -> str:
    return uuid.uuid4().hex[:12]


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"system": system, "code": code, **({"display": display} if display else {})}


def concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [coding(system, code)]}


LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ACSN_TYPE = {"coding": [coding("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN")]}


def encounter() -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "identifier": [{"system": f"{SYS}/encounter/{ORG_ID}", "value": uid()}],
        "status": "arrived",
        "class": coding("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB", "ambulatory"),
        "subject": {"reference": PATIENT},
        "participant": [
            {
                "type": [concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "ATND")],
                "individual": {"reference": REQUESTER},
            }
        ],
        "period": {"start": T},
        "location": [{"location": {"reference": LOCATION}}],
        "statusHistory": [{"status": "arrived", "period": {"start": T}}],
        "serviceProvider": {"reference": ORG},
    }


def service_request(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "identifier": [
            {"system": f"{SYS}/servicerequest/{ORG_ID}", "value": uid()},
            {"use": "usual", "type": ACSN_TYPE, "system": f"{SYS}/acsn/{ORG_ID}", "value": uid()},
        ],
        "status": "active",
        "intent": "original-order",
        "category": [concept(SNOMED, "363679005")],
        "code": concept(LOINC, "24648-8"),
        "orderDetail": [concept("http://dicom.nema.org/resources/ontology/DCM", "DX")],
        "subject": {"reference": PATIENT},
        "encounter": {"reference": f"Encounter/{ids['Encounter']}"},
        "occurrenceDateTime": T,
        "authoredOn": T,
        "requester": {"reference": REQUESTER},
        "performer": [{"reference": READER}],
        "bodySite": [concept(SNOMED, "51185008")],
    }


def imaging_study(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "identifier": [{"use": "usual", "type": ACSN_TYPE, "system": f"{SYS}/acsn/{ORG_ID}", "value": uid()}],
        "status": "available",
        "modality": [coding("http://dicom.nema.org/resources/ontology/DCM", "DX")],
        "subject": {"reference": PATIENT},
        "basedOn": [{"reference": f"ServiceRequest/{ids['ServiceRequest']}"}],
        "started": T,
    }


def observation(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": f"{SYS}/observation/{ORG_ID}", "value": uid()}],
        "status": "final",
        "category": [concept("http://terminology.hl7.org/CodeSystem/observation-category", "imaging")],
        "code": concept(LOINC, "24648-8"),
        "subject": {"reference": PATIENT},
        "encounter": {"reference": f"Encounter/{ids['Encounter']}"},
        "effectiveDateTime": T,
        "issued": LATER,
        "performer": [{"reference": READER}],
        "basedOn": [{"reference": f"ServiceRequest/{ids['ServiceRequest']}"}],
        "derivedFrom": [{"reference": f"ImagingStudy/{ids['ImagingStudy']}"}],
        "bodySite": concept(SNOMED, "51185008"),
        "valueString": "Tidak tampak kelainan",
    }


def diagnostic_report(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": f"{SYS}/diagnostic/{ORG_ID}/rad", "use": "official", "value": uid()}],
        "status": "final",
        "category": [concept("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD")],
        "code": concept(LOINC, "24648-8"),
        "subject": {"reference": PATIENT},
        "encounter": {"reference": f"Encounter/{ids['Encounter']}"},
        "effectiveDateTime": T,
        "issued": LATER,
        "performer": [{"reference": READER}, {"reference": ORG}],
        "imagingStudy": [{"reference": f"ImagingStudy/{ids['ImagingStudy']}"}],
        "result": [{"reference": f"Observation/{ids['Observation']}"}],
        "basedOn": [{"reference": f"ServiceRequest/{ids['ServiceRequest']}"}],
        "conclusion": "Tidak tampak bercak pada kedua lapangan paru",
        "conclusionCode": [concept(SNOMED, "188340000")],
    }


BUILDERS: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
    "Encounter": lambda ids: encounter(),
    "ServiceRequest": service_request,
    "ImagingStudy": imaging_study,
    "Observation": observation,
    "DiagnosticReport": diagnostic_report,
}


def future() -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).replace(microsecond=0).isoformat()


def drop(*path: str | int) -> Callable[[dict[str, Any]], None]:
    def apply(resource: dict[str, Any]) -> None:
        node: Any = resource
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return apply


def put(value: Any, *path: str | int) -> Callable[[dict[str, Any]], None]:
    def apply(resource: dict[str, Any]) -> None:
        node: Any = resource
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value() if callable(value) else value

    return apply


# catalogue key -> (resource type, the one thing broken, the expression the refusal names)
CASES: dict[str, tuple[str, Callable[[dict[str, Any]], None], str]] = {
    "encounter.identifier": ("Encounter", drop("identifier"), "Encounter.identifier"),
    "encounter.identifier.org": (
        "Encounter",
        put(f"{SYS}/encounter/100025753", "identifier", 0, "system"),
        "Encounter.identifier[0].system",
    ),
    "encounter.subject": ("Encounter", drop("subject"), "Encounter.subject"),
    "encounter.participant": ("Encounter", drop("participant"), "Encounter.participant"),
    "encounter.location": ("Encounter", put({}, "location", 0), "Encounter.location[0].location"),
    "encounter.period": ("Encounter", drop("period"), "Encounter.period"),
    "encounter.period.finished": ("Encounter", put("finished", "status"), "Encounter.period.end"),
    "encounter.statusHistory": ("Encounter", drop("statusHistory"), "Encounter.statusHistory"),
    "encounter.period.start": ("Encounter", put({"end": T}, "period"), "Encounter.period.start"),
    "encounter.serviceProvider": ("Encounter", drop("serviceProvider"), "Encounter.serviceProvider"),
    "encounter.period.end": (
        "Encounter",
        put({"start": LATER, "end": T}, "period"),
        "Encounter.period.end",
    ),
    "servicerequest.bodySite": (
        "ServiceRequest",
        put([concept(LOINC, "24648-8")], "bodySite"),
        "ServiceRequest.bodySite[0].coding",
    ),
    "servicerequest.code": (
        "ServiceRequest",
        put("http://example.org/x", "code", "coding", 0, "system"),
        "ServiceRequest.code.coding",
    ),
    "servicerequest.intent": ("ServiceRequest", put("plan-x", "intent"), "ServiceRequest.intent"),
    "servicerequest.status": ("ServiceRequest", put("bogus", "status"), "ServiceRequest.status"),
    "servicerequest.status.required": ("ServiceRequest", drop("status"), "ServiceRequest.status"),
    "servicerequest.subject": ("ServiceRequest", drop("subject"), "ServiceRequest.subject"),
    "servicerequest.encounter": ("ServiceRequest", drop("encounter"), "ServiceRequest.encounter"),
    "servicerequest.requester": ("ServiceRequest", drop("requester"), "ServiceRequest.requester"),
    "servicerequest.performer": ("ServiceRequest", drop("performer"), "ServiceRequest.performer"),
    "servicerequest.identifier": (
        "ServiceRequest",
        put(f"{SYS}/servicerequest/100025753", "identifier", 0, "system"),
        "ServiceRequest.identifier[0].system",
    ),
    "servicerequest.orderDetail": (
        "ServiceRequest",
        put("http://example.org/modality", "orderDetail", 0, "coding", 0, "system"),
        "ServiceRequest.orderDetail[0].coding",
    ),
    "servicerequest.occurrenceDateTime": (
        "ServiceRequest",
        put("2025-08-01T05:57:41Z", "occurrenceDateTime"),
        "ServiceRequest.occurrenceDateTime",
    ),
    "servicerequest.authoredOn": (
        "ServiceRequest",
        put("2025-08-01T05:57", "authoredOn"),
        "ServiceRequest.authoredOn",
    ),
    "servicerequest.code.required": ("ServiceRequest", drop("code"), "ServiceRequest.code"),
    "servicerequest.identifier.own": ("ServiceRequest", drop("identifier", 0), "ServiceRequest.identifier"),
    "imagingstudy.identifier": (
        "ImagingStudy",
        put([{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}], "identifier"),
        "ImagingStudy.identifier",
    ),
    "imagingstudy.status": ("ImagingStudy", drop("status"), "ImagingStudy.status"),
    "imagingstudy.modality": ("ImagingStudy", drop("modality"), "ImagingStudy.modality"),
    "imagingstudy.subject": ("ImagingStudy", drop("subject"), "ImagingStudy.subject"),
    "imagingstudy.basedOn": ("ImagingStudy", drop("basedOn"), "ImagingStudy.basedOn"),
    "imagingstudy.started": ("ImagingStudy", put("2025-08-01T00:00:00", "started"), "ImagingStudy.started"),
    "observation.status": ("Observation", put("bogus", "status"), "Observation.status"),
    "observation.status.required": ("Observation", drop("status"), "Observation.status"),
    "observation.category": (
        "Observation",
        put("foo", "category", 0, "coding", 0, "code"),
        "Observation.category[0].coding[0].code",
    ),
    "observation.category.required": ("Observation", drop("category"), "Observation.category"),
    "observation.code": (
        "Observation",
        put("http://example.org/x", "code", "coding", 0, "system"),
        "Observation.code.coding",
    ),
    "observation.bodySite": ("Observation", put(concept(LOINC, "24648-8"), "bodySite"), "Observation.bodySite.coding"),
    "observation.subject": ("Observation", drop("subject"), "Observation.subject"),
    "observation.encounter": ("Observation", drop("encounter"), "Observation.encounter"),
    "observation.effectiveDateTime": (
        "Observation",
        put("2025-08-01 05:57:41+00:00", "effectiveDateTime"),
        "Observation.effectiveDateTime",
    ),
    "observation.issued": ("Observation", put("2025-08-01T06:07:41Z", "issued"), "Observation.issued"),
    "observation.performer": ("Observation", put([{"reference": ORG}], "performer"), "Observation.performer"),
    "observation.identifier": (
        "Observation",
        put(f"{SYS}/observation/100025753", "identifier", 0, "system"),
        "Observation.identifier[0].system",
    ),
    "diagnosticreport.code": (
        "DiagnosticReport",
        put(SNOMED, "code", "coding", 0, "system"),
        "DiagnosticReport.code.coding",
    ),
    "diagnosticreport.status": ("DiagnosticReport", put("bogus", "status"), "DiagnosticReport.status"),
    "diagnosticreport.category": (
        "DiagnosticReport",
        put("ZZZ", "category", 0, "coding", 0, "code"),
        "DiagnosticReport.category[0].coding[0].code",
    ),
    "diagnosticreport.conclusionCode": (
        "DiagnosticReport",
        put([concept("http://example.org/x", "x")], "conclusionCode"),
        "DiagnosticReport.conclusionCode[0].coding",
    ),
    "diagnosticreport.subject": ("DiagnosticReport", drop("subject"), "DiagnosticReport.subject"),
    "diagnosticreport.encounter": ("DiagnosticReport", drop("encounter"), "DiagnosticReport.encounter"),
    "diagnosticreport.issued.required": ("DiagnosticReport", drop("issued"), "DiagnosticReport.issued"),
    "diagnosticreport.issued": ("DiagnosticReport", put("2025-08-01T06:07:41Z", "issued"), "DiagnosticReport.issued"),
    "diagnosticreport.effectiveDateTime": (
        "DiagnosticReport",
        put("2025-08-01T05:57:41.5", "effectiveDateTime"),
        "DiagnosticReport.effectiveDateTime",
    ),
    "diagnosticreport.performer": (
        "DiagnosticReport",
        put([{"reference": ORG}], "performer"),
        "DiagnosticReport.performer",
    ),
    "diagnosticreport.result": ("DiagnosticReport", drop("result"), "DiagnosticReport.result"),
    "diagnosticreport.basedOn": ("DiagnosticReport", drop("basedOn"), "DiagnosticReport.basedOn"),
    "diagnosticreport.identifier": (
        "DiagnosticReport",
        put(f"{SYS}/diagnostic/{ORG_ID}/radiology", "identifier", 0, "system"),
        "DiagnosticReport.identifier",
    ),
    "any.code.unknown": ("Encounter", put("XYZ", "class", "code"), "Encounter.class.code"),
    "any.datetime.format": ("Encounter", put("2025-08-01T05:57:41Z", "period", "start"), "Encounter.period.start"),
    "any.datetime.early": (
        "Encounter",
        put("2014-06-02T23:00:00+00:00", "period", "start"),
        "Encounter.period.start",
    ),
    "any.datetime.future": ("Encounter", put(future, "period", "start"), "Encounter.period.start"),
    "any.period.order": (
        "Encounter",
        put({"start": LATER, "end": T}, "statusHistory", 0, "period"),
        "Encounter.statusHistory[0].period.end",
    ),
    "any.text.empty": ("Observation", put("", "valueString"), "Observation.valueString"),
    "any.reference.not_found": (
        "ServiceRequest",
        put({"reference": "Patient/abc-123"}, "subject"),
        "ServiceRequest.subject.reference",
    ),
    "any.reference.foreign_org": (
        "Encounter",
        put({"reference": "Organization/100025753"}, "serviceProvider"),
        "Encounter.serviceProvider.reference",
    ),
    "any.subject.mismatch": ("ServiceRequest", put({"reference": OTHER_PATIENT}, "subject"), "ServiceRequest.subject"),
}

REQUEST_LEVEL = {
    "request.duplicate": "test_a_second_resource_with_the_same_identifier_is_a_duplicate (test_fhir_api.py)",
    "request.unreadable": "test_request_level_rows",
    "request.invalid_json": "test_request_level_rows",
    "request.not_fhir": "test_request_level_rows",
    "request.id_required": "test_request_level_rows",
    "request.id_mismatch": "test_request_level_rows",
    "request.token": "test_request_level_rows",
    "request.unsupported": "test_request_level_rows",
}


@pytest.fixture
def chain(simulator: SimulatorSession) -> dict[str, str]:
    """One accepted resource of each type (the references the others need)."""
    ids: dict[str, str] = {}
    for kind in ("Encounter", "ServiceRequest", "ImagingStudy", "Observation"):
        response = simulator.fhir("POST", kind, json=BUILDERS[kind](ids))
        assert response.status_code == 201, response.text
        ids[kind] = response.json()["id"]
    return ids


@pytest.fixture
def strict(simulator: SimulatorSession) -> Iterator[None]:
    platform = simulator.running.platform
    config = platform.config
    platform.config = dataclasses.replace(config, strict_undocumented=True)
    yield
    platform.config = config


def issue_of(response: httpx.Response, row: Rule, expression: str) -> dict[str, Any]:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    for issue in outcome["issue"]:
        number = re.search(r"\(RuleNumber: (\d+)\)$", issue["details"]["text"])
        if issue["expression"] == [expression] and (int(number.group(1)) if number else None) == row.number:
            return issue
    raise AssertionError(f"no issue for {row.key} ({row.number}) at {expression}: {outcome['issue']}")


def test_every_row_has_a_case() -> None:
    assert set(CASES) | set(REQUEST_LEVEL) == set(BY_KEY)


@pytest.mark.parametrize("key", sorted(CASES))
def test_catalogue_row(simulator: SimulatorSession, chain: dict[str, str], strict: None, key: str) -> None:
    """The minimal valid resource is accepted; broken in the row's one way, refused as the row says.

    Run with --strict-undocumented on, so the undocumented rows are tested too (their default is below)."""
    row = BY_KEY[key]
    kind, breaks, expression = CASES[key]
    valid = BUILDERS[kind](chain)
    accepted = simulator.fhir("POST", kind, json=valid)
    assert accepted.status_code == 201, accepted.text

    broken = BUILDERS[kind](chain)
    breaks(broken)
    refused = simulator.fhir("POST", kind, json=broken)
    assert refused.status_code == row.status, refused.text
    issue = issue_of(refused, row, expression)
    assert issue["code"] == row.code and issue["severity"] == "error"
    if row.number is None:
        assert "RuleNumber" not in issue["details"]["text"]


@pytest.mark.parametrize("key", sorted(k for k, row in BY_KEY.items() if not row.default and k in CASES))
def test_undocumented_rows_are_off_by_default(simulator: SimulatorSession, chain: dict[str, str], key: str) -> None:
    kind, breaks, _ = CASES[key]
    broken = BUILDERS[kind](chain)
    breaks(broken)
    response = simulator.fhir("POST", kind, json=broken)
    assert response.status_code == 201, response.text


def test_request_level_rows(simulator: SimulatorSession, chain: dict[str, str]) -> None:
    def number(response: httpx.Response) -> int | None:
        found = re.search(r"RuleNumber: (\d+)", response.json()["issue"][0]["details"]["text"])
        return int(found.group(1)) if found else None

    garbage = simulator.fhir("POST", "Encounter", content=b"{not json", headers={"Content-Type": "application/json"})
    assert (garbage.status_code, number(garbage)) == (400, 20005)
    mismatch = simulator.fhir("POST", "Encounter", json={"resourceType": "Observation"})
    assert (mismatch.status_code, number(mismatch)) == (400, 20006)
    typed = encounter()
    typed["subject"] = PATIENT  # a string where a Reference belongs
    not_fhir = simulator.fhir("POST", "Encounter", json=typed)
    assert (not_fhir.status_code, number(not_fhir)) == (400, 20008)
    assert not_fhir.json()["issue"][0]["expression"] == ["Encounter.subject"]
    no_id = simulator.fhir("PUT", f"Encounter/{chain['Encounter']}", json=encounter())
    assert (no_id.status_code, no_id.json()["issue"][0]["details"]["text"]) == (400, "id is required")
    other_id = simulator.fhir("PUT", f"Encounter/{chain['Encounter']}", json={**encounter(), "id": "other"})
    assert other_id.status_code == 400 and number(other_id) is None
    token = simulator.http.get(f"{simulator.running.fhir_url}/Encounter/x", headers={"Authorization": "Bearer nope"})
    assert token.status_code == 401 and token.json()["issue"][0]["code"] == "invalid-access-token"
    unsupported = simulator.fhir("GET", "Condition?subject=x")
    assert unsupported.status_code == 400 and unsupported.json()["issue"][0]["code"] == "not-supported"


# --- the relaxed rules and the reference rules the issue lists -----------------------------------------------


def test_an_order_carrying_only_the_acsn_identifier_is_accepted(
    simulator: SimulatorSession, chain: dict[str, str]
) -> None:
    order = service_request(chain)
    order["identifier"] = order["identifier"][1:]
    assert simulator.fhir("POST", "ServiceRequest", json=order).status_code == 201


def test_a_report_without_conclusion_is_accepted(simulator: SimulatorSession, chain: dict[str, str]) -> None:
    report = diagnostic_report(chain)
    del report["conclusion"], report["conclusionCode"]
    assert simulator.fhir("POST", "DiagnosticReport", json=report).status_code == 201


@pytest.mark.parametrize(
    ("where", "reference"),
    [
        ("subject", "Patient/abc-123"),
        ("subject", "Patient/"),
        ("subject", "https://fhir.example/Patient/P10443013727"),
        ("subject", "Patient/P99999999999"),
        ("requester", "Practitioner/xyz"),
        ("requester", "Practitioner/99999999999"),
    ],
)
def test_malformed_or_unknown_references_are_not_found(
    simulator: SimulatorSession, chain: dict[str, str], where: str, reference: str
) -> None:
    order = service_request(chain)
    order[where] = {"reference": reference}
    response = simulator.fhir("POST", "ServiceRequest", json=order)
    assert response.status_code == 400
    issue_of(response, BY_KEY["any.reference.not_found"], f"ServiceRequest.{where}.reference")


def test_an_unknown_location_is_not_found(simulator: SimulatorSession) -> None:
    visit = encounter()
    visit["location"] = [{"location": {"reference": "Location/None"}}]
    response = simulator.fhir("POST", "Encounter", json=visit)
    issue_of(response, BY_KEY["any.reference.not_found"], "Encounter.location[0].location.reference")


@pytest.mark.parametrize("kind", ["Observation", "DiagnosticReport"])
def test_reading_and_report_subject_must_match_the_encounter_and_order(
    simulator: SimulatorSession, chain: dict[str, str], kind: str
) -> None:
    resource = BUILDERS[kind](chain)
    resource["subject"] = {"reference": OTHER_PATIENT}
    response = simulator.fhir("POST", kind, json=resource)
    assert response.status_code == 400
    issues = [i for i in response.json()["issue"] if i["expression"] == [f"{kind}.subject"]]
    assert len(issues) == 2 and all("differs from the subject" in i["details"]["text"] for i in issues)


@pytest.mark.parametrize(
    ("system", "code"),
    [
        (LOINC, "99999-9"),
        (SNOMED, "123"),
        ("http://terminology.hl7.org/CodeSystem/v2-0074", "ZZZ"),
        ("http://terminology.hl7.org/CodeSystem/observation-category", "foo"),
        ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "XYZ"),
        ("http://terminology.hl7.org/CodeSystem/v2-0203", "NOPE"),
        ("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "NOPE"),
        ("http://dicom.nema.org/resources/ontology/DCM", "XX"),
    ],
)
def test_unknown_codes_of_checked_systems_are_refused(simulator: SimulatorSession, system: str, code: str) -> None:
    visit = encounter()
    visit["type"] = [concept(system, code)]
    response = simulator.fhir("POST", "Encounter", json=visit)
    issue_of(response, BY_KEY["any.code.unknown"], "Encounter.type[0].coding[0].code")


# --- the generated page ---------------------------------------------------------------------------------------


def test_the_docs_page_is_what_the_generator_writes() -> None:
    page = (REPO / "docs" / "simulator-rules.md").read_text()
    assert page == render_markdown(), "regenerate: python -m simulator.catalogue > docs/simulator-rules.md"
    generated = subprocess.run(
        [sys.executable, "-m", "simulator.catalogue"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert generated.stdout == page
    assert all(f"`{row.path}`" in page for row in RULES)
