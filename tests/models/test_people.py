"""People named by NIK instead of IHS number (issue 16): the input fields, the lookup on the platform's Patient /
Practitioner search by NIK (client, cache, never logged), and the `resolve-people` step that fills in the IHS ids
before anything is created. The client runs on httpx.MockTransport; end-to-end runs use the simulator's NIK search.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from pydantic import ValidationError

from clients.errors import FhirRejected, Rejected
from clients.satusehat import NIK_CACHE_TTL_S, NIK_SYSTEM, SatusehatClient
from models.fhir import SiteDefaults, build_encounter, build_observation, build_service_request
from models.inputs import (
    Batch1Input,
    Batch3Input,
    DiagnosticReportInput,
    EncounterInput,
    ServiceRequestInput,
    UnresolvedNik,
    nik_lookups,
    with_people,
)
from models.timeutil import validation_context
from tasks import fhir as fhir_tasks

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
CONTEXT = validation_context(now=NOW)
ORG = "10000004"
PATIENT_NIK = "3171012345678901"
DOCTOR_NIK = "3171019876543210"
RADIOLOGIST_NIK = "3273010101800001"
KNOWN = {("Patient", PATIENT_NIK): "P02478375538", ("Practitioner", DOCTOR_NIK): "10009880728",
         ("Practitioner", RADIOLOGIST_NIK): "10012572188"}  # fmt: skip

VISIT_BY_NIK = {
    "identifier_value": "RG1",
    "subject_nik": PATIENT_NIK,
    "individual_nik": DOCTOR_NIK,
    "period_start": "2025-08-01T05:57:41+00:00",
}
BATCH3_BY_NIK = {
    **VISIT_BY_NIK,
    "noacsn": "20250002",
    "codind_code": "24648-8",
    "performer_nik": RADIOLOGIST_NIK,
    "performer_value": "Tidak tampak kelainan",
    "conclusion_text": "Normal",
}


def model(kind: type[Any], data: dict[str, Any]) -> Any:
    return kind.model_validate(data, context=CONTEXT)


# --- the input fields ----------------------------------------------------------------------------------------


def test_a_nik_stands_for_each_ihs_id() -> None:
    batch = model(Batch3Input, BATCH3_BY_NIK)
    assert (batch.subject_id, batch.individual_id, batch.performer_id) == (None, None, None)
    assert [(item.nik_field, item.resource_type) for item in nik_lookups(batch)] == [
        ("subject_nik", "Patient"),
        ("individual_nik", "Practitioner"),
        ("performer_nik", "Practitioner"),
    ]
    report = model(
        DiagnosticReportInput,
        {
            "identifier_value": "R1",
            "subject_nik": int(PATIENT_NIK),  # a NIK sent as a JSON number, like the ids
            "period_start": "2025-08-01T05:57:41+00:00",
            "performer_nik": RADIOLOGIST_NIK,
            "encounter_id": "e",
            "imaging_study_id": "i",
            "observation_id": "o",
            "service_request_id": "s",
            "conclusion_text": "x",
        },
    )
    assert report.subject_nik == PATIENT_NIK


@pytest.mark.parametrize(
    ("kind", "body", "missing", "alternatives"),
    [
        (EncounterInput, VISIT_BY_NIK, "subject_nik", "subject_id"),
        (EncounterInput, VISIT_BY_NIK, "individual_nik", "individual_id"),
        (Batch3Input, BATCH3_BY_NIK, "performer_nik", "performer_id"),
    ],
)
def test_a_person_named_no_way_is_refused_naming_every_way(
    kind: type[Any], body: dict[str, Any], missing: str, alternatives: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        model(kind, {key: value for key, value in body.items() if key != missing})
    assert alternatives in str(caught.value) and missing in str(caught.value)


def test_service_request_requester_may_be_a_nik() -> None:
    body = {
        "noacsn": "A1",
        "subject_id": "P1",
        "encounter_id": "e",
        "period_start": "2025-08-01T05:57:41+00:00",
    }
    assert model(ServiceRequestInput, {**body, "requester_nik": DOCTOR_NIK}).requester_nik == DOCTOR_NIK
    with pytest.raises(ValidationError, match=r"requester_reference\n.*requester_nik"):
        model(ServiceRequestInput, body)


@pytest.mark.parametrize("nik", ["317101234567890", "31710123456789012", "3171O12345678901", "-1"])
def test_a_malformed_nik_is_refused_without_echoing_it(nik: str) -> None:
    with pytest.raises(ValidationError) as caught:
        model(EncounterInput, {**VISIT_BY_NIK, "subject_nik": nik})
    [error] = [error for error in caught.value.errors() if error["loc"] == ("subject_nik",)]
    assert "16 digits" in error["msg"]
    assert nik not in error["msg"]  # the message the HIS gets back (the API drops pydantic's `input`)


def test_a_nik_is_not_in_the_repr() -> None:
    assert PATIENT_NIK not in repr(model(Batch3Input, BATCH3_BY_NIK))


def test_an_unresolved_nik_cannot_be_built_into_a_resource() -> None:
    with pytest.raises(UnresolvedNik, match="subject_nik"):
        build_encounter(model(EncounterInput, VISIT_BY_NIK), ORG)


# --- filling in the ids (pure) ---------------------------------------------------------------------------------


def test_with_people_fills_the_ids_and_drops_the_niks() -> None:
    batch = model(Batch3Input, BATCH3_BY_NIK)
    ids = {"subject_nik": "P02478375538", "individual_nik": "10009880728", "performer_nik": "10012572188"}
    resolved = with_people(batch, ids)
    assert (resolved.subject_id, resolved.individual_id, resolved.performer_id) == tuple(ids.values())
    assert (resolved.subject_nik, resolved.individual_nik, resolved.performer_nik) == (None, None, None)
    assert PATIENT_NIK not in resolved.model_dump_json()
    order = build_service_request(resolved, ORG, encounter_id="e", site=SiteDefaults())
    assert order["subject"] == {"reference": "Patient/P02478375538"}
    assert order["requester"] == {"reference": "Practitioner/10009880728"}
    assert order["performer"] == [{"reference": "Practitioner/10012572188"}]
    reading = build_observation(
        resolved, ORG, encounter_id="e", service_request_id="s", imaging_study_id="i", issued=NOW
    )
    assert reading["performer"][0] == {"reference": "Practitioner/10012572188"}


def test_an_id_given_beside_a_nik_wins_and_that_nik_is_not_looked_up() -> None:
    batch = model(Batch1Input, {**VISIT_BY_NIK, "subject_id": "P1", "noacsn": "A1", "performer_nik": DOCTOR_NIK})
    assert [item.nik_field for item in nik_lookups(batch)] == ["individual_nik", "performer_nik"]
    resolved = with_people(batch, {"individual_nik": "N1", "performer_nik": "N2"})
    assert resolved.subject_id == "P1"
    assert resolved.performer_reference == "Practitioner/N2"  # batch1 has no radiologist id: the order's performer


# --- the client's lookup -------------------------------------------------------------------------------------------


class Platform:
    """The token endpoint and a Patient / Practitioner search by NIK, counting the searches."""

    def __init__(self) -> None:
        self.searches: list[httpx.Request] = []
        self.bundle_for: dict[tuple[str, str], list[str]] = {key: [value] for key, value in KNOWN.items()}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/accesstoken"):
            return httpx.Response(200, json={"access_token": "tok", "expires_in": "3599"})
        self.searches.append(request)
        kind = request.url.path.rsplit("/", 1)[-1]
        system, _, nik = request.url.params["identifier"].partition("|")
        assert system == NIK_SYSTEM
        ids = self.bundle_for.get((kind, nik), [])
        entries = [{"resource": {"resourceType": kind, "id": ihs}} for ihs in ids]
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "searchset", "total": len(ids), "entry": entries}
        )


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_client(platform: Platform, clock: Clock | None = None) -> SatusehatClient:
    return SatusehatClient(
        auth_base="https://ss.test/oauth2/v1",
        fhir_base="https://ss.test/fhir-r4/v1",
        org_id=ORG,
        client_id="id",
        client_secret="secret",
        transport=httpx.MockTransport(platform),
        clock=clock or Clock(),
    )


def test_the_lookup_asks_the_platform_search_by_nik_and_caches_the_answer() -> None:
    platform, clock = Platform(), Clock()
    with make_client(platform, clock) as client:
        assert client.ihs_id_by_nik("Patient", PATIENT_NIK) == "P02478375538"
        assert client.ihs_id_by_nik("Patient", PATIENT_NIK) == "P02478375538"
        assert len(platform.searches) == 1
        assert unquote(str(platform.searches[0].url)).endswith(f"/Patient?identifier={NIK_SYSTEM}|{PATIENT_NIK}")
        assert client.ihs_id_by_nik("Practitioner", DOCTOR_NIK) == "10009880728"
        clock.now += NIK_CACHE_TTL_S + 1
        client.ihs_id_by_nik("Patient", PATIENT_NIK)
        assert len(platform.searches) == 3  # the cached answer expired and was asked again


def test_an_unknown_nik_is_none_and_asked_again_next_time() -> None:
    platform = Platform()
    with make_client(platform) as client:
        assert client.ihs_id_by_nik("Patient", "3171000000000000") is None
        platform.bundle_for[("Patient", "3171000000000000")] = ["P00000000009"]
        assert client.ihs_id_by_nik("Patient", "3171000000000000") == "P00000000009"


def test_a_nik_with_several_people_is_refused_not_guessed() -> None:
    platform = Platform()
    platform.bundle_for[("Patient", PATIENT_NIK)] = ["P1", "P2"]
    with make_client(platform) as client, pytest.raises(FhirRejected, match="2 Patient resources for one NIK"):
        client.ihs_id_by_nik("Patient", PATIENT_NIK)


def test_the_nik_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with make_client(Platform()) as client:
        client.ihs_id_by_nik("Patient", PATIENT_NIK)
        client.ihs_id_by_nik("Practitioner", "3171000000000000")
    requests = [record for record in caplog.records if "Patient" in record.getMessage()]
    assert requests, "the request line is logged (without the NIK)"
    assert all(PATIENT_NIK not in record.getMessage() for record in caplog.records)
    assert all("3171000000000000" not in record.getMessage() for record in caplog.records)


# --- the resolve-people step ----------------------------------------------------------------------------------------


@pytest.fixture
def platform(monkeypatch: pytest.MonkeyPatch) -> Platform:
    platform = Platform()
    client = make_client(platform)
    monkeypatch.setattr(fhir_tasks.runtime, "satusehat", lambda: client)
    return platform


def test_resolve_people_names_everyone_by_ihs_id(platform: Platform) -> None:
    resolved = asyncio.run(fhir_tasks.resolve_people.fn(model(Batch3Input, BATCH3_BY_NIK)))
    assert (resolved.subject_ref, resolved.attender_ref, resolved.order_performer_ref) == (
        "Patient/P02478375538",
        "Practitioner/10009880728",
        "Practitioner/10012572188",
    )
    assert len(platform.searches) == 3


def test_resolve_people_without_niks_asks_nothing(platform: Platform) -> None:
    batch = model(Batch3Input, {**BATCH3_BY_NIK, "subject_id": "P1", "individual_id": "N1", "performer_id": "N2"})
    assert asyncio.run(fhir_tasks.resolve_people.fn(batch)).subject_id == "P1"
    assert platform.searches == []


def test_an_unknown_nik_is_rejected_naming_its_field_not_the_nik(platform: Platform) -> None:
    batch = model(Batch3Input, {**BATCH3_BY_NIK, "individual_nik": "3171000000000000"})
    with pytest.raises(Rejected, match=r"^individual_nik: SATUSEHAT knows no Practitioner with this NIK") as caught:
        asyncio.run(fhir_tasks.resolve_people.fn(batch))
    assert "3171000000000000" not in str(caught.value)
