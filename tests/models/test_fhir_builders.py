"""The FHIR builders: valid R4, shaped like SATUSEHAT's public examples, UTC dates, org-bound identifiers,
deterministic output.

The examples are the verbatim public payloads in tests/data/satusehat_examples (INDEX.md says
which is which). Each built resource must carry every element
its example carries, except the ones listed in OMITTED with the reason.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
from fhir.resources.R4B import get_fhir_model_class

import models.fhir as fhir
from models.fhir import (
    IDENTIFIER_SYSTEM_TEMPLATES,
    FhirBuildError,
    IdentifierKind,
    build_diagnostic_report,
    build_encounter,
    build_observation,
    build_service_request,
    identifier_system,
    lookup_identifier,
    resource_identifier_value,
    validate_resource,
)
from models.inputs import (
    Batch1Input,
    Batch2Input,
    Batch3Input,
    Batch4Input,
    DiagnosticReportInput,
    EncounterInput,
    ObservationInput,
    ServiceRequestInput,
)
from models.timeutil import validation_context

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "satusehat_examples"
"""The public payloads; a missing directory fails these tests rather than skipping them."""
EXAMPLE_ORG = "10000004"
"""The sandbox organisation id the public examples use."""

ORG = "100025702"
NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
CONTEXT = validation_context(now=NOW)
FHIR_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00$")
DATE_KEYS = frozenset({"start", "end", "occurrenceDateTime", "authoredOn", "effectiveDateTime", "issued"})

ENCOUNTER_ID = "45e436ea-d6c7-4059-8cbe-e00fb2c665d8"
SERVICE_REQUEST_ID = "ecc21a66-ad26-406a-95a4-d750649f5b19"
IMAGING_STUDY_ID = "c4f3bfe3-91cd-40c4-b986-000c2150f051"
OBSERVATION_ID = "236f79c3-b434-4af8-900a-1de3a43995a0"

PATIENT = {"subject_id": "P10443013727", "subject_display": "Budi Santoso"}
WHEN = {"period_start": "2025-08-01T12:57:41+07:00"}

ENCOUNTER = EncounterInput.model_validate(
    {
        "identifier_value": "RG2023I0000175",
        **PATIENT,
        "individual_id": "10016869420",
        "individual_display": "dr. Ariawan Setiadi, Sp.A",
        **WHEN,
        "location_id": "ef011065-38c9-46f8-9c35-d1fe68966a3e",
        "location_display": "Ruang 1A, Poliklinik Rawat Jalan",
    },
    context=CONTEXT,
)
SERVICE_REQUEST = ServiceRequestInput.model_validate(
    {
        "identifier_value": "00001",
        "noacsn": "20250002",
        **PATIENT,
        "encounter_id": ENCOUNTER_ID,
        **WHEN,
        "requester_reference": "Practitioner/10016869420",
        "requester_display": "dr. Ariawan Setiadi, Sp.A",
        "performer_reference": "Practitioner/10000504193",
        "performer_display": "dr. Rini Susanti, Sp.Rad",
        "reason_text": "Periksa risiko adanya penyakit TB",
        "codind_code": "24648-8",
        "modality": "DX",
    },
    context=CONTEXT,
)
OBSERVATION = ObservationInput.model_validate(
    {
        "identifier_value": "O111111",
        **PATIENT,
        "encounter_id": ENCOUNTER_ID,
        **WHEN,
        "performer_id": "10000504193",
        "performer_display": "dr. Rini Susanti, Sp.Rad",
        "performer_value": "Tidak tampak kelainan",
        "service_request_id": SERVICE_REQUEST_ID,
        "imaging_study_id": IMAGING_STUDY_ID,
        "codind_code": "24648-8",
    },
    context=CONTEXT,
)
DIAGNOSTIC_REPORT = DiagnosticReportInput.model_validate(
    {
        "identifier_value": "5234342",
        **PATIENT,
        "encounter_id": ENCOUNTER_ID,
        **WHEN,
        "performer_id": "10000504193",
        "imaging_study_id": IMAGING_STUDY_ID,
        "observation_id": OBSERVATION_ID,
        "service_request_id": SERVICE_REQUEST_ID,
        "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
        "codind_code": "24648-8",
    },
    context=CONTEXT,
)
BATCH4 = Batch4Input.model_validate(
    {
        "identifier_value": "RG2023I0000175",
        "subject_id": "P10443013727",
        "individual_id": "10016869420",
        "period_start": "2025-08-01T05:57:41+00:00",
        "noacsn": "20250002",
        "performer_id": "10000504193",
        "performer_value": "Tidak tampak kelainan",
        "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
        "study": "1.2.840.113619.2.55.3.604688433.783.159975",
        "codind_code": "24648-8",
    },
    context=CONTEXT,
)
POSTED = datetime(2025, 8, 1, 5, 57, 41, tzinfo=UTC)
"""The flow's clock when it posts a reading or report (`issued`; the builders read no clock). The visit's start
here, so that every date of these resources is one value (test_every_date_time_is_utc_plus_zero_to_the_second)."""

Builder = Callable[[str], dict[str, Any]]
BUILDERS: dict[str, Builder] = {
    "Encounter": lambda org: build_encounter(ENCOUNTER, org),
    "ServiceRequest": lambda org: build_service_request(SERVICE_REQUEST, org),
    "Observation": lambda org: build_observation(OBSERVATION, org, issued=POSTED),
    "DiagnosticReport": lambda org: build_diagnostic_report(DIAGNOSTIC_REPORT, org, issued=POSTED),
}
EXAMPLE_FILES = {
    "Encounter": "encounter__sid-indonesia__Example-Encounter-Registration-Payload.json",
    "ServiceRequest": "servicerequest__sid-indonesia__TB-ServiceRequest-Create-Permintaan-Chest-Xray-1.json",
    "Observation": "observation__sid-indonesia__TB-Observation-Create-Hasil-Temuan-Radiologi-1.json",
    "DiagnosticReport": "diagnosticreport__sid-indonesia__TB-DiagnosticReport-Create-Report-Radiologi-1.json",
}
OMITTED: dict[str, dict[str, str]] = {
    "Encounter": {"id": "the IG example's own name; a POST carries no id, the server assigns it"},
    "ServiceRequest": {
        "bodySite": "no input field carries the body site; deriving it from the exam code would invent clinical data",
    },
    "Observation": {
        "bodySite": "no input field carries the body site",
        "interpretation": "a coded clinical judgement (POS/NEG) the HIS does not send",
        "referenceRange": "free text the HIS does not send",
    },
    "DiagnosticReport": {
        "conclusionCode": "the HIS sends no coded conclusion; `conclusion` (text) satisfies rule 10074 instead",
    },
}
OMITTED_PATHS: dict[str, str] = {
    "subject.display": "the patient's name: SATUSEHAT needs only the IHS number, and the gateway keeps no names",
    "statusHistory[].period.end": "the visit is still `arrived` and the input gives no period_end: none is made up",
}
"""Nested elements of the examples the builders leave out on purpose, with the reason."""
RESOURCE_TYPES = list(BUILDERS)


def example(resource_type: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / EXAMPLE_FILES[resource_type]).read_text())


def key_paths(node: Any, prefix: str = "") -> set[str]:
    """Every key path in a JSON tree, list positions folded into `[]`."""
    paths: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            paths |= key_paths(value, path)
    elif isinstance(node, list):
        for item in node:
            paths |= key_paths(item, f"{prefix}[]")
    return paths


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield f"{path}[{index}]", value
            yield from walk(value, f"{path}[{index}]")


# --- conformance -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_validates_with_fhir_resources_r4b(resource_type: str) -> None:
    built = BUILDERS[resource_type](ORG)
    assert built["resourceType"] == resource_type
    get_fhir_model_class(resource_type).model_validate(built)


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_carries_every_top_level_element_of_the_public_example(resource_type: str) -> None:
    built, reference = BUILDERS[resource_type](ORG), example(resource_type)
    omitted = OMITTED[resource_type]
    assert set(omitted) <= set(reference), "an omission that the example does not have is stale"
    assert set(reference) - set(omitted) <= set(built)


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_every_shared_element_has_the_example_structure(resource_type: str) -> None:
    built, reference = BUILDERS[resource_type](ORG), example(resource_type)
    for element in set(reference) & set(built):
        missing = key_paths(reference[element], element) - key_paths(built[element], element) - set(OMITTED_PATHS)
        assert not missing, f"{resource_type}.{element} lacks {sorted(missing)}"


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_identifier_systems_category_status_and_code_equal_the_example(resource_type: str) -> None:
    built, reference = BUILDERS[resource_type](ORG), example(resource_type)

    def systems(resource: dict[str, Any], org: str) -> list[str]:
        return [item["system"].replace(org, "{org}") for item in resource["identifier"]]

    assert systems(built, ORG) == systems(reference, EXAMPLE_ORG)
    assert [item.get("use") for item in built["identifier"]] == [item.get("use") for item in reference["identifier"]]
    assert [item.get("type") for item in built["identifier"]] == [item.get("type") for item in reference["identifier"]]
    for element in ("status", "intent", "priority", "category", "class"):
        assert built.get(element) == reference.get(element), element
    if "code" in reference:
        assert built["code"]["coding"] == reference["code"]["coding"]  # the default exam is the examples' exam


def test_encounter_participant_is_the_attender() -> None:
    built, reference = build_encounter(ENCOUNTER, ORG), example("Encounter")
    assert built["participant"][0]["type"] == reference["participant"][0]["type"]
    assert built["participant"][0]["individual"] == {
        "reference": "Practitioner/10016869420",
        "display": "dr. Ariawan Setiadi, Sp.A",
    }
    assert built["serviceProvider"] == {"reference": f"Organization/{ORG}"}
    assert built["statusHistory"] == [{"status": "arrived", "period": built["period"]}]


def test_encounter_without_a_location_leaves_location_out() -> None:
    visit = EncounterInput.model_validate(
        {"identifier_value": "RG1", "subject_id": "P1", "individual_id": "N1", **WHEN}, context=CONTEXT
    )
    built = build_encounter(visit, ORG)
    assert "location" not in built
    get_fhir_model_class("Encounter").model_validate(built)


def test_service_request_order_detail_and_acsn() -> None:
    built = build_service_request(SERVICE_REQUEST, ORG)
    assert built["orderDetail"] == [
        {
            "coding": [{"system": fhir.DICOM_DCM, "code": "DX", "display": "Digital Radiography"}],
            "text": "Modality Code: DX",
        }
    ]
    assert built["identifier"][1]["value"] == "20250002"
    assert built["code"]["text"] == "XR Chest PA upright"
    assert built["encounter"] == {"reference": f"Encounter/{ENCOUNTER_ID}"}
    assert built["requester"] == {"reference": "Practitioner/10016869420", "display": "dr. Ariawan Setiadi, Sp.A"}
    assert built["performer"] == [{"reference": "Practitioner/10000504193", "display": "dr. Rini Susanti, Sp.Rad"}]
    assert built["reasonCode"] == [{"text": "Periksa risiko adanya penyakit TB"}]


def test_service_request_modality_and_ae_title() -> None:
    order = SERVICE_REQUEST.model_copy(update={"modality": "CT", "ae_title": "CT0001"})
    built = build_service_request(order, ORG)
    assert built["orderDetail"][0]["coding"][0]["code"] == "CT"
    assert built["orderDetail"][0]["coding"][0]["display"] == "Computed Tomography"
    assert built["orderDetail"][1] == {"coding": [{"system": fhir.AE_TITLE_SYSTEM, "display": "CT0001"}]}


def test_observation_links_and_reading() -> None:
    built = build_observation(OBSERVATION, ORG, issued=POSTED)
    assert built["valueString"] == "Tidak tampak kelainan"
    assert built["basedOn"] == [{"reference": f"ServiceRequest/{SERVICE_REQUEST_ID}"}]
    assert built["derivedFrom"] == [{"reference": f"ImagingStudy/{IMAGING_STUDY_ID}"}]
    assert built["performer"] == [
        {"reference": "Practitioner/10000504193", "display": "dr. Rini Susanti, Sp.Rad"},
        {"reference": f"Organization/{ORG}"},
    ]


def test_diagnostic_report_links_and_conclusion() -> None:
    built = build_diagnostic_report(DIAGNOSTIC_REPORT, ORG, issued=POSTED)
    assert built["conclusion"] == "Tidak tampak bercak pada kedua lapangan paru"
    assert built["result"] == [{"reference": f"Observation/{OBSERVATION_ID}", "display": "XR Chest PA upright"}]
    assert built["imagingStudy"] == [{"reference": f"ImagingStudy/{IMAGING_STUDY_ID}"}]
    assert built["basedOn"] == [{"reference": f"ServiceRequest/{SERVICE_REQUEST_ID}"}]
    assert built["performer"] == [{"reference": "Practitioner/10000504193"}, {"reference": f"Organization/{ORG}"}]


# --- dates -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_every_date_time_is_utc_plus_zero_to_the_second(resource_type: str) -> None:
    dates = [(path, value) for path, value in walk(BUILDERS[resource_type](ORG)) if path.split(".")[-1] in DATE_KEYS]
    assert dates
    for path, value in dates:
        assert FHIR_DATETIME.match(value), f"{path} = {value}"
        assert value.startswith("2025-08-01T05:57:41") or path.endswith(".end"), f"{path} = {value}"


@pytest.mark.parametrize("start", ["2023-08-23T17:35:00", "2023-08-23T17:35:00+07:00", "2023-08-23T10:35:00Z"])
def test_the_docs_example_17_35_wib_goes_out_as_10_35_utc(start: str) -> None:
    visit = ENCOUNTER.model_validate({**ENCOUNTER.model_dump(), "period_start": start, "period_end": None})
    built = build_encounter(visit, ORG)
    assert built["period"] == {"start": "2023-08-23T10:35:00+00:00"}  # arrived: no end is made up


def test_issued_is_injected_not_read_from_a_clock() -> None:
    issued = datetime(2025, 8, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=7)))
    observation = build_observation(OBSERVATION, ORG, issued=issued)
    report = build_diagnostic_report(DIAGNOSTIC_REPORT, ORG, issued=issued)
    assert observation["issued"] == report["issued"] == "2025-08-01T07:00:00+00:00"
    assert observation["effectiveDateTime"] == "2025-08-01T05:57:41+00:00"
    with pytest.raises(FhirBuildError, match="issued"):  # never the visit's start by default
        build_observation(OBSERVATION, ORG)
    with pytest.raises(ValueError, match="issued"):
        build_observation(OBSERVATION, ORG, issued=datetime(2025, 8, 1, 14, 0))


# --- identifiers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("org", [ORG, "10000004", "ORG-2"])
@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_identifier_systems_and_organisation_references_carry_the_org_id(resource_type: str, org: str) -> None:
    built = BUILDERS[resource_type](org)
    for item in built["identifier"]:
        assert item["system"].startswith(fhir.SYS_IDS_BASE + "/")
        assert f"/{org}" in item["system"]
    organisations = [value for path, value in walk(built) if isinstance(value, str) and value.startswith("Organ")]
    assert all(value == f"Organization/{org}" for value in organisations)


def test_identifier_system_catalogue() -> None:
    assert identifier_system(IdentifierKind.ENCOUNTER, ORG) == f"http://sys-ids.kemkes.go.id/encounter/{ORG}"
    assert identifier_system("acsn", ORG) == f"http://sys-ids.kemkes.go.id/acsn/{ORG}"
    assert identifier_system(IdentifierKind.DIAGNOSTIC_REPORT_RAD, ORG) == (
        f"http://sys-ids.kemkes.go.id/diagnostic/{ORG}/rad"
    )
    assert set(IDENTIFIER_SYSTEM_TEMPLATES) == set(IdentifierKind)
    for kind in IdentifierKind:
        assert ORG in identifier_system(kind, ORG)


@pytest.mark.parametrize("org", ["", "100/25702", "1000 25702", "100025702?x=1"])
def test_identifier_system_refuses_a_malformed_org_id(org: str) -> None:
    with pytest.raises(ValueError, match="org_id"):
        identifier_system(IdentifierKind.OBSERVATION, org)


def test_lookup_identifier_finds_a_service_request_by_its_acsn() -> None:
    assert lookup_identifier(build_service_request(SERVICE_REQUEST, ORG), ORG) == (
        f"http://sys-ids.kemkes.go.id/acsn/{ORG}",
        "20250002",
    )
    assert lookup_identifier(build_encounter(ENCOUNTER, ORG), ORG) == (
        f"http://sys-ids.kemkes.go.id/encounter/{ORG}",
        "RG2023I0000175",
    )
    with pytest.raises(ValueError, match="acsn"):
        lookup_identifier(build_service_request(SERVICE_REQUEST, ORG), "OTHER")


def test_identifier_values_fall_back_to_the_acsn_deterministically() -> None:
    reading = ObservationInput.model_validate(
        {**OBSERVATION.model_dump(exclude={"identifier_value"}), "noacsn": "20250002"}, context=CONTEXT
    )
    report = DiagnosticReportInput.model_validate(
        {**DIAGNOSTIC_REPORT.model_dump(exclude={"identifier_value"}), "noacsn": "20250002"}, context=CONTEXT
    )
    order = SERVICE_REQUEST.model_copy(update={"identifier_value": None})
    assert build_observation(reading, ORG, issued=POSTED)["identifier"][0]["value"] == "20250002"
    assert build_diagnostic_report(report, ORG, issued=POSTED)["identifier"][0]["value"] == "20250002"
    assert build_service_request(order, ORG)["identifier"][0]["value"] == "20250002"
    assert build_observation(reading, ORG, issued=POSTED) == build_observation(reading, ORG, issued=POSTED)
    assert resource_identifier_value(OBSERVATION) == "O111111"


def test_one_visit_two_exams_get_distinct_order_identifiers() -> None:
    """Each exam's resources are named by its own ACSN; the ServiceRequest's servicerequest identifier is the
    visit number as the existing gateway sent it, and the order is found by its ACSN identifier (issue 16)."""
    second_exam = BATCH4.model_copy(update={"noacsn": "20250003"})
    links = {
        "encounter_id": ENCOUNTER_ID,
        "service_request_id": SERVICE_REQUEST_ID,
        "imaging_study_id": IMAGING_STUDY_ID,
    }
    builds = {
        "ServiceRequest": lambda order: build_service_request(order, ORG, encounter_id=ENCOUNTER_ID),
        "Observation": lambda order: build_observation(order, ORG, **links, issued=POSTED),
        "DiagnosticReport": lambda order: build_diagnostic_report(
            order, ORG, **links, observation_id=ENCOUNTER_ID, issued=POSTED
        ),
    }
    for kind, build in builds.items():
        values = tuple(lookup_identifier(build(order), ORG)[1] for order in (BATCH4, second_exam))
        assert values == ("20250002", "20250003"), kind
    assert build_service_request(second_exam, ORG, encounter_id=ENCOUNTER_ID)["identifier"][0]["value"] == (
        "RG2023I0000175"
    )
    assert build_encounter(BATCH4, ORG)["identifier"][0]["value"] == BATCH4.identifier_value == "RG2023I0000175"


# --- batches and linked ids --------------------------------------------------------------------------------


def test_batch4_example_builds_all_four_resources() -> None:
    encounter = build_encounter(BATCH4, ORG)
    order = build_service_request(BATCH4, ORG, encounter_id=ENCOUNTER_ID)
    reading = build_observation(
        BATCH4,
        ORG,
        encounter_id=ENCOUNTER_ID,
        service_request_id=SERVICE_REQUEST_ID,
        imaging_study_id=IMAGING_STUDY_ID,
        issued=POSTED,
    )
    report = build_diagnostic_report(
        BATCH4,
        ORG,
        encounter_id=ENCOUNTER_ID,
        service_request_id=SERVICE_REQUEST_ID,
        imaging_study_id=IMAGING_STUDY_ID,
        observation_id=OBSERVATION_ID,
        issued=POSTED,
    )
    for resource in (encounter, order, reading, report):
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    assert encounter["period"] == {"start": "2025-08-01T05:57:41+00:00"}
    assert order["requester"] == {"reference": "Practitioner/10016869420"}  # the attending practitioner
    assert order["performer"] == [{"reference": "Practitioner/10000504193"}]  # the radiologist
    assert order["identifier"][1]["value"] == "20250002"
    assert reading["valueString"] == "Tidak tampak kelainan"
    assert report["result"][0]["reference"] == f"Observation/{OBSERVATION_ID}"


def test_batch_builders_need_the_ids_of_what_the_flow_created() -> None:
    batch1 = Batch1Input.model_validate(BATCH4.model_dump(), context=CONTEXT)
    with pytest.raises(FhirBuildError, match=r"ServiceRequest\.encounter.*encounter_id"):
        build_service_request(batch1, ORG)
    with pytest.raises(FhirBuildError, match=r"Observation\.basedOn"):
        build_observation(Batch3Input.model_validate(BATCH4.model_dump(), context=CONTEXT), ORG, encounter_id="e")
    batch2 = Batch2Input.model_validate({**OBSERVATION.model_dump(), "conclusion_text": "x"}, context=CONTEXT)
    with pytest.raises(FhirBuildError, match=r"DiagnosticReport\.result.*observation_id"):
        build_diagnostic_report(batch2, ORG)
    assert build_diagnostic_report(batch2, ORG, observation_id=OBSERVATION_ID, issued=POSTED)["conclusion"] == "x"


def test_ids_passed_to_a_builder_win_over_the_input() -> None:
    built = build_service_request(SERVICE_REQUEST, ORG, encounter_id="fresh-encounter")
    assert built["encounter"] == {"reference": "Encounter/fresh-encounter"}
    with pytest.raises(FhirBuildError, match="encounter_id"):
        build_service_request(SERVICE_REQUEST, ORG, encounter_id="Encounter/fresh")


def test_explicit_requester_wins_over_the_attending_practitioner() -> None:
    batch = BATCH4.model_copy(update={"requester_reference": "Practitioner/N10000009", "requester_display": "dr. X"})
    built = build_service_request(batch, ORG, encounter_id=ENCOUNTER_ID)
    assert built["requester"] == {"reference": "Practitioner/N10000009", "display": "dr. X"}


# --- purity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_same_input_same_output_and_no_shared_state(resource_type: str) -> None:
    first, second = BUILDERS[resource_type](ORG), BUILDERS[resource_type](ORG)
    assert first == second
    assert json.dumps(first) == json.dumps(second)
    pristine = copy.deepcopy(second)
    first["identifier"][0]["value"] = "changed"
    first[next(key for key, value in first.items() if isinstance(value, dict))]["mutated"] = True
    assert second == pristine
    assert BUILDERS[resource_type](ORG) == pristine


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_output_is_plain_json_without_nulls_or_empties(resource_type: str) -> None:
    built = BUILDERS[resource_type](ORG)
    assert json.loads(json.dumps(built)) == built
    for path, value in walk(built):
        assert value not in (None, "", [], {}), path


# --- the output check itself -------------------------------------------------------------------------------


def test_a_builder_bug_is_caught_and_names_the_element(monkeypatch: pytest.MonkeyPatch) -> None:
    """fhir.resources checks primitives and structure (not value sets): a malformed code is caught."""
    monkeypatch.setattr(fhir, "ENCOUNTER_STATUS", "arrived ")
    with pytest.raises(FhirBuildError, match=r"Encounter\.status: .*Encounter\.statusHistory\[0\]\.status"):
        build_encounter(ENCOUNTER, ORG)


def test_validate_resource_names_each_bad_element() -> None:
    bad = {
        **build_observation(OBSERVATION, ORG, issued=POSTED),
        "valueText": "x",
        "effectiveDateTime": "2025-08-01T05:57:41",
    }
    with pytest.raises(FhirBuildError) as caught:
        validate_resource(bad)
    assert "Observation.valueText" in str(caught.value)
    assert "Observation.effectiveDateTime" in str(caught.value)
    with pytest.raises(FhirBuildError, match="resource type"):
        validate_resource({"resourceType": "NotAResource"})
    with pytest.raises(FhirBuildError, match="resourceType"):
        validate_resource({})


def test_the_patient_name_is_accepted_but_never_sent_nor_serialised() -> None:
    visit = EncounterInput.model_validate(
        {
            "identifier_value": "RG1",
            "subject_id": "P1",
            "subject_display": "Budi Santoso",
            "individual_id": "N1",
            **WHEN,
        },
        context=CONTEXT,
    )
    assert "Budi" not in json.dumps(build_encounter(visit, ORG))
    assert "Budi" not in visit.model_dump_json() and "Budi" not in repr(visit)


# --- the patient's name stays in the HIS -------------------------------------------------------------------
# README, "What a hospital can rely on": `subject_display` (the patient's name) is accepted for compatibility and
# dropped; SATUSEHAT needs only the IHS number. So no builder, from any input it accepts, may put that name (in any
# spelling) anywhere in what it builds. Practitioners' and locations' names are not promised away and may be sent.

HIS_PATIENT_NAME = "Kusumaningrum Prameswari"
EVERY_FIELD: dict[str, Any] = {
    "identifier_value": "RG2023I0000175",
    "noacsn": "20250002",
    "subject_id": "P10443013727",
    "subject_display": HIS_PATIENT_NAME,
    "individual_id": "10016869420",
    "individual_display": "dr. Ariawan Setiadi, Sp.A",
    **WHEN,
    "location_id": "ef011065-38c9-46f8-9c35-d1fe68966a3e",
    "location_display": "Ruang 1A, Poliklinik Rawat Jalan",
    "encounter_id": ENCOUNTER_ID,
    "requester_reference": "Practitioner/10016869420",
    "requester_display": "dr. Ariawan Setiadi, Sp.A",
    "performer_reference": "Practitioner/10000504193",
    "performer_id": "10000504193",
    "performer_display": "dr. Rini Susanti, Sp.Rad",
    "performer_value": "Tidak tampak kelainan",
    "reason_text": "Periksa risiko adanya penyakit TB",
    "ae_title": "CR01",
    "service_request_id": SERVICE_REQUEST_ID,
    "imaging_study_id": IMAGING_STUDY_ID,
    "observation_id": OBSERVATION_ID,
    "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
    "study": "1.2.840.113619.2.55.3.604688433.783.159975",
    "codind_code": "24648-8",
    "encounter_class": "AMB",
    "reading_time": "2025-08-01T07:10:00+00:00",
    "report_time": "2025-08-01T07:20:00+00:00",
}
"""Every field the inputs read, filled (so every optional branch of every builder runs), the patient named."""
LINKED_IDS = {
    "encounter_id": ENCOUNTER_ID,
    "service_request_id": SERVICE_REQUEST_ID,
    "imaging_study_id": IMAGING_STUDY_ID,
    "observation_id": OBSERVATION_ID,
}


def every_builder() -> list[Callable[..., dict[str, Any]]]:
    """Every `build_*` function of models/fhir.py, found rather than listed: a new builder is checked too."""
    return [
        value
        for name, value in vars(fhir).items()
        if name.startswith("build_") and inspect.isfunction(value) and value.__module__ == fhir.__name__
    ]


def with_subclasses(model: type[Any]) -> list[type[Any]]:
    return [model, *(sub for direct in model.__subclasses__() for sub in with_subclasses(direct))]


def builder_inputs() -> list[Any]:
    """(builder, input model) for every input type each builder's first parameter accepts, subclasses included
    (the batches' inputs are EncounterInputs too)."""
    cases = []
    for builder in every_builder():
        first = next(iter(inspect.signature(builder).parameters))
        accepted = get_type_hints(builder)[first]
        models = {sub for model in (get_args(accepted) or (accepted,)) for sub in with_subclasses(model)}
        for model in sorted(models, key=lambda model: model.__name__):
            cases.append(pytest.param(builder, model, id=f"{builder.__name__}-{model.__name__}"))
    return cases


def test_the_name_check_covers_the_four_builders_at_least() -> None:
    names = {builder.__name__ for builder in every_builder()}
    assert names >= {"build_encounter", "build_service_request", "build_observation", "build_diagnostic_report"}
    assert len(builder_inputs()) >= 8


@pytest.mark.parametrize(("builder", "model"), builder_inputs())
def test_no_builder_sends_the_patients_name_from_any_input(builder: Callable[..., Any], model: type[Any]) -> None:
    from tests.security.leaks import LeakScanner

    source = model.model_validate(EVERY_FIELD, context=CONTEXT)
    assert source.subject_display == HIS_PATIENT_NAME  # accepted: the builder could reach it
    keywords: dict[str, Any] = {}
    for name, parameter in list(inspect.signature(builder).parameters.items())[2:]:
        if name in LINKED_IDS:
            keywords[name] = LINKED_IDS[name]
        elif parameter.default is inspect.Parameter.empty:
            pytest.fail(f"{builder.__name__} needs {name}: give it here so its output is checked for the name")

    built = json.dumps(builder(source, ORG, **keywords))

    scanner = LeakScanner({"control: the IHS number": EVERY_FIELD["subject_id"]}, [HIS_PATIENT_NAME])
    found = scanner.scan_text(f"{builder.__name__}({model.__name__})", built)
    assert [str(f) for f in found if not f.needle.startswith("control")] == []
    assert [f.needle for f in found] == ["control: the IHS number"]  # the output was read: its patient is there
