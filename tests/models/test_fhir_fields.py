"""What the builders send for each input, and that nothing is made up (issue 16, "Resources SATUSEHAT would refuse,
or that carry made-up data"): the ServiceRequest's performer, identifiers and reasonCode, the exam code, the
Encounter's class and period, the report times; ids sent as JSON numbers; ACSN characters the router cannot search.

Every resource built here is also judged as the simulator judges a POST (`platform_violations`): FHIR R4B
structure by fhir.resources and the platform's rule catalogue.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from models.fhir import (
    DICOM_UID_SYSTEM,
    FhirBuildError,
    IncompleteOrder,
    SiteDefaults,
    StudyFacts,
    build_diagnostic_report,
    build_encounter,
    build_observation,
    build_service_request,
    lookup_identifier,
    resolve_exam,
    validate_resource,
)
from models.inputs import (
    ACSN_PATTERN,
    Batch1Input,
    Batch2Input,
    Batch3Input,
    Batch4Input,
    DiagnosticReportInput,
    EncounterInput,
    ObservationInput,
    ServiceRequestInput,
    check_acsn,
)
from models.settings import Settings
from models.timeutil import validation_context
from simulator import rules

ORG = "10000004"
NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
CONTEXT = validation_context(now=NOW)
POSTED = datetime(2026, 11, 28, 11, 59, 0, tzinfo=UTC)
"""The flow's clock when it posts a resource (passed in: the builders read no clock)."""
STUDY_STARTED = datetime(2025, 8, 1, 6, 30, 0, tzinfo=UTC)
STUDY = StudyFacts(
    study_instance_uid="1.2.840.113619.2.55.3.604688433.783.159975",
    modalities=("SR", "CT"),
    description="CT Kepala",
    started=STUDY_STARTED,
)
CT_HEAD = "24725-4"
CHEST_XRAY = "24648-8"
SITE = SiteDefaults(exam_code_by_modality={"CT": CT_HEAD}, default_exam_code="36643-5")

LINKS = {
    "encounter_id": "45e436ea-d6c7-4059-8cbe-e00fb2c665d8",
    "service_request_id": "ecc21a66-ad26-406a-95a4-d750649f5b19",
    "imaging_study_id": "c4f3bfe3-91cd-40c4-b986-000c2150f051",
}
OBSERVATION_ID = "236f79c3-b434-4af8-900a-1de3a43995a0"
VISIT = {
    "identifier_value": "RG2023I0000175",
    "subject_id": "P10443013727",
    "individual_id": "10016869420",
    "period_start": "2025-08-01T05:57:41+00:00",
}
BATCH1 = {**VISIT, "noacsn": "20250002"}
BATCH4 = {
    **BATCH1,
    "performer_id": "10000504193",
    "performer_value": "Tidak tampak kelainan",
    "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
    "study": STUDY.study_instance_uid,
}
SERVICE_REQUEST = {
    "noacsn": "20250002",
    "subject_id": "P10443013727",
    "encounter_id": LINKS["encounter_id"],
    "period_start": "2025-08-01T05:57:41+00:00",
    "requester_reference": "Practitioner/10016869420",
}
READING = {
    "identifier_value": "O111111",
    "subject_id": "P10443013727",
    "period_start": "2025-08-01T07:00:00+00:00",
    "performer_id": "10000504193",
    "performer_value": "Tidak tampak kelainan",
    **LINKS,
}
REPORT = {
    "identifier_value": "5234342",
    "subject_id": "P10443013727",
    "period_start": "2025-08-01T07:00:00+00:00",
    "performer_id": "10000504193",
    "observation_id": OBSERVATION_ID,
    "conclusion_text": "Tidak tampak bercak",
    **LINKS,
}


def platform_violations(resource: dict[str, Any]) -> list[str]:
    """What the simulator would refuse in a POST of `resource`: structure (fhir.resources R4B) and its rule
    catalogue. The one place this test calls the simulator's checks: it takes the rewritten catalogue's `check`
    when there is one (references are left out: whether an id exists is the platform's data, not the builder's
    shape), else the older `check_structure` + `check_rules`."""
    kind = resource["resourceType"]
    check = getattr(rules, "check", None)
    if check is not None:
        from simulator.registry import Registry  # the rewritten simulator's module

        context = rules.Context(  # type: ignore[attr-defined]
            org_id=ORG, now=NOW, clock_skew_s=300.0, registry=Registry.seeded(ORG), read=lambda kind, ident: None
        )
        not_found = rules.NOT_FOUND.key  # type: ignore[attr-defined]
        found = [item for item in check(kind, resource, context) if item.rule.key != not_found]
    else:
        found = [*rules.check_structure(kind, resource), *rules.check_rules(kind, resource, ORG, NOW, 300.0)]
    return [f"{item.expression}: {item.text} ({getattr(item.rule, 'number', '?')})" for item in found]


def accepted(resource: dict[str, Any]) -> dict[str, Any]:
    validate_resource(resource)
    assert platform_violations(resource) == []
    return resource


def model(kind: type[Any], data: dict[str, Any]) -> Any:
    return kind.model_validate(data, context=CONTEXT)


# --- ServiceRequest.performer (rule 10377) -------------------------------------------------------------------


def test_order_without_a_performer_gets_the_organisation() -> None:
    order = model(Batch1Input, {**BATCH1, "codind_code": CHEST_XRAY})
    built = accepted(build_service_request(order, ORG, encounter_id=LINKS["encounter_id"]))
    assert built["performer"] == [{"reference": f"Organization/{ORG}"}]


def test_order_without_a_performer_gets_the_configured_one() -> None:
    order = model(ServiceRequestInput, {**SERVICE_REQUEST, "codind_code": CHEST_XRAY})
    site = SiteDefaults(service_request_performer="Practitioner/10000504193")
    built = accepted(build_service_request(order, ORG, site=site))
    assert built["performer"] == [{"reference": "Practitioner/10000504193"}]


def test_the_his_performer_wins_over_the_configured_one() -> None:
    order = model(
        ServiceRequestInput,
        {
            **SERVICE_REQUEST,
            "codind_code": CHEST_XRAY,
            "performer_reference": "Practitioner/N1",
            "performer_display": "X",
        },
    )
    site = SiteDefaults(service_request_performer="Organization/other")
    assert build_service_request(order, ORG, site=site)["performer"] == [
        {"reference": "Practitioner/N1", "display": "X"}
    ]


# --- ServiceRequest identifiers and reasonCode, as the existing gateway sent them --------------------------------


def test_service_request_identifier_is_identifier_value_and_acsn_as_the_existing_gateway_sent() -> None:
    order = model(ServiceRequestInput, {**SERVICE_REQUEST, "identifier_value": "00001", "codind_code": CHEST_XRAY})
    built = accepted(build_service_request(order, ORG))
    assert [(item["system"], item["value"]) for item in built["identifier"]] == [
        (f"http://sys-ids.kemkes.go.id/servicerequest/{ORG}", "00001"),
        (f"http://sys-ids.kemkes.go.id/acsn/{ORG}", "20250002"),
    ]
    assert lookup_identifier(built, ORG) == (f"http://sys-ids.kemkes.go.id/acsn/{ORG}", "20250002")
    assert built["reasonCode"] == [{"text": "Periksa rutin"}]


def test_without_identifier_value_the_servicerequest_identifier_is_the_acsn() -> None:
    order = model(ServiceRequestInput, {**SERVICE_REQUEST, "codind_code": CHEST_XRAY, "reason_text": "Curiga TB"})
    built = build_service_request(order, ORG)
    assert built["identifier"][0]["value"] == "20250002"
    assert built["reasonCode"] == [{"text": "Curiga TB"}]


def test_batch4_order_carries_the_study_instance_uid() -> None:
    order = model(Batch4Input, BATCH4)
    built = accepted(build_service_request(order, ORG, encounter_id=LINKS["encounter_id"], site=SITE, study=STUDY))
    assert built["identifier"][2] == {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{STUDY.study_instance_uid}"}
    assert built["identifier"][0]["value"] == "RG2023I0000175"
    assert lookup_identifier(built, ORG)[1] == "20250002"  # still found (and cached) by its ACSN


# --- the exam: never a fixed one ----------------------------------------------------------------------------------


def test_no_exam_code_anywhere_is_refused_naming_the_field_and_the_settings() -> None:
    order = model(Batch1Input, BATCH1)
    assert order.codind_code is None and order.modality is None
    with pytest.raises(IncompleteOrder, match=r"^codind_code: .*EXAM_CODE_BY_MODALITY.*DEFAULT_EXAM_CODE") as caught:
        build_service_request(order, ORG, encounter_id=LINKS["encounter_id"])
    assert caught.value.field == "codind_code"
    assert "24648-8" not in str(caught.value)


def test_the_exam_comes_from_the_pacs_modality_through_the_hospital_table() -> None:
    order = model(Batch4Input, BATCH4)
    built = accepted(build_service_request(order, ORG, encounter_id=LINKS["encounter_id"], site=SITE, study=STUDY))
    assert built["code"]["coding"] == [{"system": "http://loinc.org", "code": CT_HEAD}]
    assert built["code"]["text"] == "CT Kepala"  # the study's description: the code has no known display
    assert built["orderDetail"][0]["coding"][0]["code"] == "CT"  # SR (a report object) is not the modality
    reading = build_observation(order, ORG, **LINKS, issued=POSTED, site=SITE, study=STUDY)
    report = build_diagnostic_report(
        order, ORG, **LINKS, observation_id=OBSERVATION_ID, issued=POSTED, site=SITE, study=STUDY
    )
    assert reading["code"]["coding"][0]["code"] == report["code"]["coding"][0]["code"] == CT_HEAD


def test_a_modality_missing_from_the_table_takes_the_default_exam_code() -> None:
    order = model(Batch4Input, BATCH4)
    mr_study = StudyFacts(study_instance_uid=STUDY.study_instance_uid, modalities=("MR",))
    built = build_service_request(order, ORG, encounter_id="e", site=SITE, study=mr_study)
    assert built["code"]["coding"][0]["code"] == "36643-5"
    assert built["orderDetail"][0]["coding"][0]["code"] == "MR"
    with pytest.raises(IncompleteOrder, match="modality MR is not in EXAM_CODE_BY_MODALITY"):
        build_service_request(order, ORG, encounter_id="e", site=SiteDefaults(), study=mr_study)


def test_the_his_code_wins_and_no_modality_is_made_up() -> None:
    order = model(Batch1Input, {**BATCH1, "coding_code": CHEST_XRAY})
    built = accepted(build_service_request(order, ORG, encounter_id="e", site=SITE))
    assert built["code"] == {
        "coding": [{"system": "http://loinc.org", "code": CHEST_XRAY, "display": "XR Chest PA upright"}],
        "text": "XR Chest PA upright",
    }
    assert "orderDetail" not in built  # no modality given, no study: none is assumed (it used to be DX)
    assert resolve_exam(order, SITE).source == "codind_code"
    assert resolve_exam(model(Batch1Input, {**BATCH1, "modality": "ct"}), SITE).source == "EXAM_CODE_BY_MODALITY[CT]"


# --- Encounter class and period ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_class", "code", "display"), [("IMP", "IMP", "inpatient encounter"), ("emer", "EMER", "emergency")]
)
def test_encounter_class_is_an_input(given_class: str, code: str, display: str) -> None:
    visit = model(EncounterInput, {**VISIT, "encounter_class": given_class})
    built = accepted(build_encounter(visit, ORG))
    assert built["class"] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": code,
        "display": display,
    }


def test_encounter_class_default_is_the_configured_one_else_amb() -> None:
    visit = model(EncounterInput, VISIT)
    assert build_encounter(visit, ORG)["class"]["code"] == "AMB"
    assert build_encounter(visit, ORG, site=SiteDefaults(encounter_class="EMER"))["class"]["code"] == "EMER"


def test_unknown_encounter_class_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"encounter_class\n.*AMB, IMP, EMER"):
        model(EncounterInput, {**VISIT, "encounter_class": "HH"})


def test_an_arrived_visit_gets_no_made_up_end() -> None:
    built = accepted(build_encounter(model(EncounterInput, VISIT), ORG))
    assert built["period"] == {"start": "2025-08-01T05:57:41+00:00"}
    assert built["statusHistory"] == [{"status": "arrived", "period": {"start": "2025-08-01T05:57:41+00:00"}}]


def test_a_given_end_is_sent() -> None:
    visit = model(EncounterInput, {**VISIT, "period_end": "2025-08-01T06:30:00+00:00"})
    built = accepted(build_encounter(visit, ORG))
    assert built["period"] == {"start": "2025-08-01T05:57:41+00:00", "end": "2025-08-01T06:30:00+00:00"}


# --- report times ------------------------------------------------------------------------------------------------


def test_report_times_come_from_the_his() -> None:
    batch = model(
        Batch4Input,
        {**BATCH4, "reading_time": "2025-08-01T15:00:00+07:00", "report_time": "2025-08-01T15:30:00+07:00"},
    )
    reading = accepted(build_observation(batch, ORG, **LINKS, issued=POSTED, site=SITE, study=STUDY))
    report = accepted(
        build_diagnostic_report(
            batch, ORG, **LINKS, observation_id=OBSERVATION_ID, issued=POSTED, site=SITE, study=STUDY
        )
    )
    assert reading["issued"] == "2025-08-01T08:00:00+00:00"
    assert report["issued"] == "2025-08-01T08:30:00+00:00"
    assert reading["effectiveDateTime"] == report["effectiveDateTime"] == "2025-08-01T06:30:00+00:00"


def test_without_his_times_issued_is_when_the_flow_posts_and_effective_is_the_study_time() -> None:
    batch = model(Batch4Input, BATCH4)
    reading = build_observation(batch, ORG, **LINKS, issued=POSTED, site=SITE, study=STUDY)
    report = build_diagnostic_report(batch, ORG, **LINKS, observation_id="o", issued=POSTED, site=SITE, study=STUDY)
    for resource in (reading, report):
        assert resource["issued"] == "2026-11-28T11:59:00+00:00"
        assert resource["effectiveDateTime"] == "2025-08-01T06:30:00+00:00"  # not the visit's start (05:57:41)


def test_a_batch_without_a_study_time_sends_no_effective_time_rather_than_the_visit_start() -> None:
    batch = model(Batch3Input, {**BATCH4, "codind_code": CHEST_XRAY})
    reading = accepted(build_observation(batch, ORG, **LINKS, issued=POSTED))
    report = accepted(build_diagnostic_report(batch, ORG, **LINKS, observation_id="o", issued=POSTED))
    assert "effectiveDateTime" not in reading and "effectiveDateTime" not in report


def test_standalone_reading_and_report_keep_their_own_period_start_as_effective_time() -> None:
    reading = model(ObservationInput, {**READING, "codind_code": CHEST_XRAY})
    report = model(DiagnosticReportInput, {**REPORT, "codind_code": CHEST_XRAY})
    assert accepted(build_observation(reading, ORG, issued=POSTED))["effectiveDateTime"] == "2025-08-01T07:00:00+00:00"
    assert accepted(build_diagnostic_report(report, ORG, issued=POSTED))["effectiveDateTime"] == (
        "2025-08-01T07:00:00+00:00"
    )


def test_issued_is_never_the_visit_start_by_default() -> None:
    reading = model(ObservationInput, {**READING, "codind_code": CHEST_XRAY})
    with pytest.raises(FhirBuildError, match=r"Observation\.issued needs reading_time .* or `issued`"):
        build_observation(reading, ORG)
    report = model(DiagnosticReportInput, {**REPORT, "codind_code": CHEST_XRAY})
    with pytest.raises(FhirBuildError, match=r"DiagnosticReport\.issued needs report_time"):
        build_diagnostic_report(report, ORG)


# --- ids as JSON numbers -------------------------------------------------------------------------------------------


def test_ids_sent_as_json_numbers_are_accepted() -> None:
    batch = model(
        Batch4Input,
        {
            **BATCH4,
            "identifier_value": 2023175,
            "individual_id": 10016869420,
            "performer_id": 10000504193,
            "noacsn": 20250002,
            "patientid": 123456,
        },
    )
    assert (batch.identifier_value, batch.individual_id, batch.performer_id) == (
        "2023175",
        "10016869420",
        "10000504193",
    )
    assert (batch.noacsn, batch.patientid) == ("20250002", "123456")
    assert model(DiagnosticReportInput, {**REPORT, "encounter_id": 45}).encounter_id == "45"


@pytest.mark.parametrize(
    ("field", "value"),
    [("performer_value", 5), ("conclusion_text", 7), ("individual_id", True), ("individual_id", 1.5)],
)
def test_free_text_and_non_integers_stay_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        model(Batch4Input, {**BATCH4, field: value})


# --- ACSN characters the router searches raw ---------------------------------------------------------------------


@pytest.mark.parametrize("acsn", ["ACC,01", "ACC$01"])
def test_acsn_with_comma_or_dollar_is_refused_with_the_reason(acsn: str) -> None:
    with pytest.raises(ValidationError) as caught:
        model(Batch1Input, {**BATCH1, "noacsn": acsn})
    message = str(caught.value)
    assert "noacsn" in message and "DICOM Router" in message and "unescaped" in message


def test_acsn_pattern_agrees_with_the_check_for_every_printable_character() -> None:
    pattern = re.compile(ACSN_PATTERN)
    for char in map(chr, range(0x21, 0x7F)):
        try:
            check_acsn(char)
            allowed = True
        except ValueError:
            allowed = False
        assert allowed == bool(pattern.match(f"A{char}B")), char


# --- settings --------------------------------------------------------------------------------------------------


def gateway_settings(**env: str) -> Settings:
    base = {
        "DCM4CHEE_URL": "http://pacs.test/dicom-web",
        "ROUTER_IP": "router.test",
        "SS_AUTH_URL": "http://ss.test/oauth2/v1",
        "SS_BASE_URL": "http://ss.test/fhir-r4/v1",
        "SS_ORG_ID": ORG,
        "SS_CLIENT_ID": "id",
        "SS_CLIENT_SECRET": "secret",
    }
    return Settings(_env_file=None, **{**base, **env})  # type: ignore[call-arg]


def test_site_defaults_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAM_CODE_BY_MODALITY", '{"ct": "24725-4", "DX": "36643-5"}')
    settings_ = gateway_settings(
        DEFAULT_EXAM_CODE="24648-8", SERVICE_REQUEST_PERFORMER="Organization/rad-1", ENCOUNTER_CLASS="IMP"
    )
    site = SiteDefaults.from_settings(settings_)
    assert site == SiteDefaults(
        encounter_class="IMP",
        service_request_performer="Organization/rad-1",
        default_exam_code="24648-8",
        exam_code_by_modality={"CT": "24725-4", "DX": "36643-5"},
    )
    monkeypatch.delenv("EXAM_CODE_BY_MODALITY")
    assert SiteDefaults.from_settings(gateway_settings()) == SiteDefaults()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DEFAULT_EXAM_CODE": "24648-9"}, "check digit"),
        ({"EXAM_CODE_BY_MODALITY": '{"XX": "24725-4"}'}, "modality"),
        ({"EXAM_CODE_BY_MODALITY": '{"CT": "123"}'}, "LOINC"),
        ({"SERVICE_REQUEST_PERFORMER": "Patient/P1"}, "relative reference"),
        ({"ENCOUNTER_CLASS": "HH"}, "AMB"),
    ],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=named):
        gateway_settings()


# --- every combination, and any input: valid FHIR the platform takes ----------------------------------------------

COMBINATIONS = [
    pytest.param(extra, site, study, id=f"{name}-{site_name}-{study_name}")
    for name, extra in {
        "bare": {},
        "his-exam": {"codind_code": CHEST_XRAY, "coding_display": "Thorax PA", "modality": "DX"},
        "full": {
            "encounter_class": "IMP",
            "period_end": "2025-08-01T06:30:00+00:00",
            "performer_reference": "Practitioner/10000504193",
            "requester_reference": "PractitionerRole/r1",
            "reason_text": "Batuk lama",
            "ae_title": "CT0001",
            "reading_time": "2025-08-01T08:00:00+00:00",
            "report_time": "2025-08-01T08:30:00+00:00",
            "location_id": "ef011065-38c9-46f8-9c35-d1fe68966a3e",
        },
    }.items()
    for site_name, site in {"default-exam": SiteDefaults(default_exam_code="36643-5"), "table": SITE}.items()
    for study_name, study in {"no-study": None, "study": STUDY}.items()
]


def build_all(batch: Any, site: SiteDefaults, study: StudyFacts | None) -> list[dict[str, Any]]:
    return [
        build_encounter(batch, ORG, site=site),
        build_service_request(batch, ORG, encounter_id=LINKS["encounter_id"], site=site, study=study),
        build_observation(batch, ORG, **LINKS, issued=POSTED, site=site, study=study),
        build_diagnostic_report(
            batch, ORG, **LINKS, observation_id=OBSERVATION_ID, issued=POSTED, site=site, study=study
        ),
    ]


@pytest.mark.parametrize(("extra", "site", "study"), COMBINATIONS)
def test_every_combination_is_valid_r4b_and_passes_the_platform_rules(
    extra: dict[str, Any], site: SiteDefaults, study: StudyFacts | None
) -> None:
    for resource in build_all(model(Batch4Input, {**BATCH4, **extra}), site, study):
        accepted(resource)
        assert "performer" not in resource or resource["performer"]


def test_batch2_and_standalone_bodies_pass_the_platform_rules() -> None:
    batch2 = model(Batch2Input, {**READING, "conclusion_text": "x"})
    accepted(build_observation(batch2, ORG, issued=POSTED, site=SITE))
    accepted(build_diagnostic_report(batch2, ORG, observation_id=OBSERVATION_ID, issued=POSTED, site=SITE))


_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9.-]{0,20}\Z")
_acsn = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_./:-]{0,14}\Z")
_times = st.datetimes(min_value=datetime(2015, 1, 1), max_value=datetime(2026, 11, 1), timezones=st.just(UTC))
_maybe = st.none().__or__


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    identifier_value=_ids | st.integers(min_value=1, max_value=10**12),
    subject_id=_ids,
    individual_id=_ids | st.integers(min_value=1, max_value=10**12),
    performer_id=_ids,
    noacsn=_acsn,
    start=_times,
    duration=st.none() | st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(hours=20)),
    encounter_class=st.none() | st.sampled_from(["AMB", "IMP", "EMER", "amb"]),
    codind_code=st.none() | st.sampled_from([CHEST_XRAY, CT_HEAD, "79103-8", "36643-5"]),
    modality=st.none() | st.sampled_from(["DX", "CT", "MR", "US"]),
    performer_reference=st.none() | st.sampled_from(["Practitioner/N1", f"Organization/{ORG}", "PractitionerRole/x"]),
    reading_time=st.none() | _times,
    with_study=st.booleans(),
    study_modalities=st.lists(st.sampled_from(["CT", "MR", "SR", "KO", "DX"]), max_size=3),
    site=st.sampled_from([SITE, SiteDefaults(default_exam_code=CHEST_XRAY, encounter_class="EMER")]),
)
def test_any_valid_input_builds_resources_the_platform_takes(
    identifier_value: Any,
    subject_id: str,
    individual_id: Any,
    performer_id: str,
    noacsn: str,
    start: datetime,
    duration: timedelta | None,
    encounter_class: str | None,
    codind_code: str | None,
    modality: str | None,
    performer_reference: str | None,
    reading_time: datetime | None,
    with_study: bool,
    study_modalities: list[str],
    site: SiteDefaults,
) -> None:
    body: dict[str, Any] = {
        **BATCH4,
        "identifier_value": identifier_value,
        "subject_id": subject_id,
        "individual_id": individual_id,
        "performer_id": performer_id,
        "noacsn": noacsn,
        "period_start": start.isoformat(),
    }
    optional = {
        "period_end": None if duration is None else (start + duration).isoformat(),
        "encounter_class": encounter_class,
        "codind_code": codind_code,
        "modality": modality,
        "performer_reference": performer_reference,
        "reading_time": None if reading_time is None else reading_time.isoformat(),
    }
    body |= {key: value for key, value in optional.items() if value is not None}
    study = (
        StudyFacts(
            study_instance_uid=BATCH4["study"], modalities=tuple(study_modalities), started=start + timedelta(minutes=5)
        )
        if with_study
        else None
    )
    batch = model(Batch4Input, body)
    built = build_all(batch, site, study)
    for resource in built:
        accepted(resource)
    encounter, order, reading, report = built
    assert ("end" in encounter["period"]) == (duration is not None)
    assert order["performer"]
    assert order["identifier"][1]["value"] == noacsn
    expected_code = resolve_exam(batch, site, study).code
    assert {order["code"]["coding"][0]["code"], reading["code"]["coding"][0]["code"]} == {expected_code}
    assert ("effectiveDateTime" in reading) == (study is not None)
    assert report["issued"] == "2026-11-28T11:59:00+00:00"


def test_study_facts_from_the_pacs_lookup() -> None:
    """`tasks.dicom.locate_study`'s answer: the QIDO keys and the pre-flight's description and started (ISO)."""
    located = {
        "study_instance_uid": "1.2.3",
        "accession_number": "A1",
        "modalities": ["KO", "mr"],
        "description": "MRI Kepala",
        "started": "2025-08-01T13:30:00+07:00",
        "times": None,
    }
    facts = StudyFacts.from_located(located)
    assert (facts.study_instance_uid, facts.modality, facts.description, facts.started) == (
        "1.2.3",
        "MR",  # a key object (KO) describes the images, it is not how they were acquired
        "MRI Kepala",
        STUDY_STARTED,
    )
    assert StudyFacts.from_located({**located, "description": None, "started": None}).started is None
    assert StudyFacts(modalities=("SR", "PR")).modality is None
    # JSON-able, so the order's cache key (tasks.fhir._order_key) can include it
    assert StudyFacts.model_validate(facts.model_dump(mode="json")) == facts
    reading = build_observation(model(Batch4Input, BATCH4), ORG, **LINKS, issued=POSTED, site=SITE, study=facts)
    assert reading["effectiveDateTime"] == "2025-08-01T06:30:00+00:00"
