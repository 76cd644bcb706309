"""The HIS request bodies: required fields, SATUSEHAT's date rules, ACSN rules, defaults, and error messages.

Every rejection test checks that the error sits at the field (`loc`) and that the message names it, because
that is what the API hands back to the HIS.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from models.inputs import (
    Batch1Input,
    Batch2Input,
    Batch3Input,
    Batch4Input,
    DiagnosticReportInput,
    DicomProcessInput,
    EncounterInput,
    ObservationInput,
    ServiceRequestInput,
    acquisition_modalities,
    check_loinc,
)
from models.timeutil import WITA, validation_context

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
CONTEXT = validation_context(now=NOW)

ENCOUNTER = {
    "identifier_value": "RG2023I0000175",
    "subject_id": "P10443013727",
    "individual_id": "10016869420",
    "period_start": "2025-08-01T05:57:41+00:00",
}
SERVICE_REQUEST = {
    "noacsn": "20250002",
    "subject_id": "P10443013727",
    "encounter_id": "015aa41f-88d7-4b0b-b5f1-d511522bfa87",
    "period_start": "2025-08-31T15:25:00+00:00",
    "requester_reference": "Practitioner/10016869420",
}
BATCH1 = {**ENCOUNTER, "noacsn": "20250002"}
OBSERVATION = {
    "identifier_value": "RG2023I0000174",
    "subject_id": "P10443013727",
    "encounter_id": "6dc2dc13-0b5a-4105-996e-6403e43be60a",
    "period_start": "2025-08-31T15:25:00+00:00",
    "performer_id": "10000504193",
    "performer_value": "Hasil Bacaan adalah ...",
    "service_request_id": "a33163ec-ba77-4775-8d20-83035b76e668",
    "imaging_study_id": "75b7e9d0-c079-419c-84f8-8dba7b9cd585",
}
BATCH2 = {**OBSERVATION, "conclusion_text": "Tak tampak bercak pada kedua lapangan paru"}
DIAGNOSTIC_REPORT = {
    "identifier_value": "RG2023I0000174",
    "subject_id": "P10443013727",
    "encounter_id": "6dc2dc13-0b5a-4105-996e-6403e43be60a",
    "period_start": "2025-08-31T15:25:00+00:00",
    "performer_id": "10000504193",
    "imaging_study_id": "75b7e9d0-c079-419c-84f8-8dba7b9cd585",
    "observation_id": "82b9af58-c98d-4263-9a6f-9a04fdfec43a",
    "service_request_id": "a33163ec-ba77-4775-8d20-83035b76e668",
    "conclusion_text": "Tak tampak bercak pada kedua lapangan paru",
}
BATCH3 = {**BATCH1, "performer_id": "10000504193", "performer_value": "Tidak tampak kelainan", "conclusion_text": "x"}
BATCH4_EXAMPLE = {
    "identifier_value": "RG2023I0000175",
    "subject_id": "P10443013727",
    "individual_id": "10016869420",
    "period_start": "2025-08-01T05:57:41+00:00",
    "noacsn": "20250002",
    "performer_id": "10000504193",
    "performer_value": "Tidak tampak kelainan",
    "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
    "study": "1.2.840.113619.2.55.3.604688433.783.159975",
}
DICOM_PROCESS = {"study": "1.2.840.113619.2.55.3.604688433.783.159975"}

MINIMAL: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (EncounterInput, ENCOUNTER),
    (ServiceRequestInput, SERVICE_REQUEST),
    (Batch1Input, BATCH1),
    (ObservationInput, OBSERVATION),
    (Batch2Input, BATCH2),
    (DiagnosticReportInput, DIAGNOSTIC_REPORT),
    (Batch3Input, BATCH3),
    (Batch4Input, BATCH4_EXAMPLE),
    (DicomProcessInput, DICOM_PROCESS),
]

# (model, payload, field removed, field the error is reported at)
REQUIRED: list[tuple[type[BaseModel], dict[str, Any], str, str]] = [
    *[(EncounterInput, ENCOUNTER, field, field) for field in ENCOUNTER],
    *[(ServiceRequestInput, SERVICE_REQUEST, field, field) for field in SERVICE_REQUEST],
    *[(Batch1Input, BATCH1, field, field) for field in BATCH1],
    *[(ObservationInput, OBSERVATION, field, field) for field in OBSERVATION if field != "identifier_value"],
    (ObservationInput, OBSERVATION, "identifier_value", "noacsn"),
    (Batch2Input, BATCH2, "conclusion_text", "conclusion_text"),
    *[(DiagnosticReportInput, DIAGNOSTIC_REPORT, f, f) for f in DIAGNOSTIC_REPORT if f != "identifier_value"],
    (DiagnosticReportInput, DIAGNOSTIC_REPORT, "identifier_value", "noacsn"),
    *[(Batch3Input, BATCH3, field, field) for field in ("performer_id", "performer_value", "conclusion_text")],
    (Batch4Input, BATCH4_EXAMPLE, "study", "study"),
    (DicomProcessInput, DICOM_PROCESS, "study", "accesionnum"),
]


def validate(model: type[BaseModel], data: dict[str, Any], **context: Any) -> Any:
    return model.model_validate(data, context={**CONTEXT, **context})


def rejected(model: type[BaseModel], data: dict[str, Any], field: str, **context: Any) -> dict[str, Any]:
    """Assert the payload is refused with an error at `field` whose text names the field; return the error."""
    with pytest.raises(ValidationError) as caught:
        validate(model, data, **context)
    errors = [error for error in caught.value.errors() if error["loc"] and error["loc"][0] == field]
    assert errors, f"no error at {field}: {caught.value}"
    assert field in str(caught.value)
    return errors[0]


def without(data: dict[str, Any], field: str) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key != field}


# --- shape of the models -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "payload"), MINIMAL, ids=[model.__name__ for model, _ in MINIMAL])
def test_minimal_payload_validates(model: type[BaseModel], payload: dict[str, Any]) -> None:
    assert isinstance(validate(model, payload), model)


@pytest.mark.parametrize(
    ("model", "payload", "removed", "reported_at"),
    REQUIRED,
    ids=[f"{model.__name__}-{removed}" for model, _, removed, _ in REQUIRED],
)
def test_required_field_missing_is_named(
    model: type[BaseModel], payload: dict[str, Any], removed: str, reported_at: str
) -> None:
    rejected(model, without(payload, removed), reported_at)


def test_batch4_example_from_the_brief_validates_with_its_defaults() -> None:
    batch = validate(Batch4Input, BATCH4_EXAMPLE)

    assert batch.period_start == datetime(2025, 8, 1, 5, 57, 41, tzinfo=UTC)
    assert batch.period_end is None  # an `arrived` visit has no end yet: none is made up
    assert batch.codind_code is None  # no exam is assumed: the PACS study or the hospital's setting decides
    assert batch.coding_display is None
    assert batch.modality is None
    assert batch.requester_ref == "Practitioner/10016869420"  # the attending practitioner
    assert batch.order_performer_ref == "Practitioner/10000504193"  # the radiologist
    assert batch.subject_ref == "Patient/P10443013727"
    assert batch.location_ref is None
    assert batch.dicom_accession == "20250002"


def test_models_are_frozen() -> None:
    encounter = validate(EncounterInput, ENCOUNTER)
    with pytest.raises(ValidationError, match="frozen"):
        encounter.subject_id = "P00000000001"


def test_whitespace_is_stripped() -> None:
    encounter = validate(EncounterInput, {**ENCOUNTER, "subject_id": "  P10443013727\t", "identifier_value": " A1 "})
    assert encounter.subject_id == "P10443013727"
    assert encounter.identifier_value == "A1"


def test_unknown_fields_are_ignored() -> None:
    encounter = validate(EncounterInput, {**ENCOUNTER, "org_id": "x", "resourceType": "Encounter"})
    assert "org_id" not in encounter.model_dump()


def test_blank_optional_field_counts_as_absent_but_blank_required_field_is_refused() -> None:
    encounter = validate(EncounterInput, {**ENCOUNTER, "period_end": "", "location_id": "  ", "subject_display": ""})
    assert encounter.location_ref is None
    assert encounter.period_end is None

    rejected(EncounterInput, {**ENCOUNTER, "identifier_value": ""}, "identifier_value")
    rejected(EncounterInput, {**ENCOUNTER, "identifier_value": "   "}, "identifier_value")
    rejected(Batch1Input, {**BATCH1, "noacsn": ""}, "noacsn")


def test_references_override_ids() -> None:
    encounter = validate(
        EncounterInput,
        {
            **without(without(ENCOUNTER, "subject_id"), "individual_id"),
            "subject_reference": "Patient/P00000000009",
            "individual_reference": "Practitioner/N10000001",
            "location_id": "ef011065-38c9-46f8-9c35-d1fe68966a3e",
        },
    )
    assert encounter.subject_ref == "Patient/P00000000009"
    assert encounter.attender_ref == "Practitioner/N10000001"
    assert encounter.location_ref == "Location/ef011065-38c9-46f8-9c35-d1fe68966a3e"

    both = validate(EncounterInput, {**ENCOUNTER, "subject_reference": "Patient/P00000000009"})
    assert both.subject_ref == "Patient/P00000000009"


def test_missing_subject_names_both_ways_to_give_it() -> None:
    error = rejected(EncounterInput, without(ENCOUNTER, "subject_id"), "subject_id")
    assert error["type"] == "missing_one_of"
    assert "subject_reference" in error["msg"]


# --- date-times --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2023-08-23T17:35:00", datetime(2023, 8, 23, 10, 35, tzinfo=UTC)),  # the docs' example, naive = WIB
        ("2023-08-23T17:35:00+07:00", datetime(2023, 8, 23, 10, 35, tzinfo=UTC)),
        ("2023-08-23T10:35:00Z", datetime(2023, 8, 23, 10, 35, tzinfo=UTC)),
        ("2023-08-23 17:35:00.987654+07:00", datetime(2023, 8, 23, 10, 35, tzinfo=UTC)),  # to the second
        ("2023-08-23T18:35:00+08:00", datetime(2023, 8, 23, 10, 35, tzinfo=UTC)),
    ],
)
def test_date_times_become_utc_to_the_second(given: str, expected: datetime) -> None:
    encounter = validate(EncounterInput, {**ENCOUNTER, "period_start": given})
    assert encounter.period_start == expected
    assert encounter.period_start.utcoffset() == timedelta(0)


def test_naive_date_time_uses_the_context_zone() -> None:
    encounter = validate(EncounterInput, {**ENCOUNTER, "period_start": "2023-08-23T18:35:00"}, local_tz=WITA)
    assert encounter.period_start == datetime(2023, 8, 23, 10, 35, tzinfo=UTC)


def test_datetime_objects_are_accepted() -> None:
    naive = validate(EncounterInput, {**ENCOUNTER, "period_start": datetime(2023, 8, 23, 17, 35)})
    aware = validate(
        EncounterInput,
        {**ENCOUNTER, "period_start": datetime(2023, 8, 23, 17, 35, tzinfo=timezone(timedelta(hours=7)))},
    )
    assert naive.period_start == aware.period_start == datetime(2023, 8, 23, 10, 35, tzinfo=UTC)


@pytest.mark.parametrize(
    ("given", "error_type"),
    [
        ("2025-13-01T10:00:00", "datetime_format"),
        ("yesterday at noon", "datetime_format"),
        ("01/08/2025 10:00", "datetime_format"),
        ("2025-08-01", "datetime_no_time"),
        (1754027861, "datetime_type"),
    ],
)
def test_malformed_date_time_is_refused(given: object, error_type: str) -> None:
    error = rejected(EncounterInput, {**ENCOUNTER, "period_start": given}, "period_start")
    assert error["type"] == error_type


@pytest.mark.parametrize("given", ["2014-06-02T23:59:59+00:00", "2014-06-03T06:59:59+07:00", "2010-01-01T00:00:00"])
def test_date_before_2014_06_03_is_refused(given: str) -> None:
    error = rejected(ServiceRequestInput, {**SERVICE_REQUEST, "period_start": given}, "period_start")
    assert error["type"] == "datetime_too_early"
    assert "2014-06-03" in error["msg"]


def test_2014_06_03_itself_is_accepted() -> None:
    request = validate(ServiceRequestInput, {**SERVICE_REQUEST, "period_start": "2014-06-03T00:00:00+00:00"})
    assert request.period_start == datetime(2014, 6, 3, tzinfo=UTC)


def test_future_date_beyond_the_clock_skew_is_refused() -> None:
    late = (NOW + timedelta(minutes=5, seconds=1)).isoformat()
    error = rejected(ObservationInput, {**OBSERVATION, "period_start": late}, "period_start")
    assert error["type"] == "datetime_in_future"


def test_date_within_the_clock_skew_is_accepted() -> None:
    ahead = (NOW + timedelta(minutes=5)).isoformat()
    assert validate(ObservationInput, {**OBSERVATION, "period_start": ahead}).period_start == NOW + timedelta(minutes=5)


def test_future_is_judged_by_the_system_clock_without_a_context() -> None:
    with pytest.raises(ValidationError, match="period_start"):
        EncounterInput.model_validate({**ENCOUNTER, "period_start": "2999-01-01T00:00:00+00:00"})
    assert EncounterInput.model_validate(ENCOUNTER).period_start.year == 2025


@pytest.mark.parametrize("end", ["2025-08-01T05:57:40+00:00", "2025-08-01T05:57:41+00:00", "2025-08-01T12:57:41"])
def test_period_end_not_after_start_is_refused(end: str) -> None:
    error = rejected(EncounterInput, {**ENCOUNTER, "period_end": end}, "period_end")
    assert error["type"] == "period_order"
    assert "period_start" in error["msg"]


def test_period_end_after_start_is_kept() -> None:
    encounter = validate(EncounterInput, {**ENCOUNTER, "period_end": "2025-08-01T13:30:00+07:00"})
    assert encounter.period_end == datetime(2025, 8, 1, 6, 30, tzinfo=UTC)


def test_period_end_in_the_future_is_refused() -> None:
    error = rejected(EncounterInput, {**ENCOUNTER, "period_end": "2999-01-01T00:00:00+00:00"}, "period_end")
    assert error["type"] == "datetime_in_future"


def test_no_period_end_is_made_up_for_a_visit_that_is_still_arrived() -> None:
    assert validate(EncounterInput, ENCOUNTER).period_end is None


def test_json_dump_writes_plus_zero_and_parses_back_to_the_same_model() -> None:
    batch = validate(Batch4Input, {**BATCH4_EXAMPLE, "period_start": "2025-08-01T12:57:41"})
    dumped = batch.model_dump(mode="json")
    assert dumped["period_start"] == "2025-08-01T05:57:41+00:00"
    assert dumped["period_end"] is None
    assert validate(Batch4Input, dumped) == batch


# --- accession numbers, ids, references, codes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("acsn", "error_type"),
    [
        ("", "string_too_short"),
        ("   ", "string_too_short"),
        ("12345678901234567", "string_too_long"),
        ("ACC\\01", "acsn_character"),
        ("ACC|01", "acsn_character"),
        ("ACC&01", "acsn_character"),
        ("ACC#01", "acsn_character"),
        ("ACC%01", "acsn_character"),
        ("ACC+01", "acsn_character"),
        ("ACC,01", "acsn_character"),
        ("ACC$01", "acsn_character"),
        ("AKSÉS01", "not_printable_ascii"),
        ("ACC\x0001", "not_printable_ascii"),
    ],
)
def test_bad_acsn_is_refused(acsn: str, error_type: str) -> None:
    error = rejected(ServiceRequestInput, {**SERVICE_REQUEST, "noacsn": acsn}, "noacsn")
    assert error["type"] == error_type


def test_acsn_of_sixteen_characters_is_accepted() -> None:
    assert validate(Batch1Input, {**BATCH1, "noacsn": "CT20250801-00001"}).noacsn == "CT20250801-00001"


def test_accesionnum_follows_the_acsn_rules_too() -> None:
    rejected(DicomProcessInput, {"accesionnum": "12345678901234567"}, "accesionnum")
    assert validate(DicomProcessInput, {"accesionnum": "20250002"}).study is None


def test_batch4_accesionnum_must_be_the_order_acsn() -> None:
    error = rejected(Batch4Input, {**BATCH4_EXAMPLE, "accesionnum": "20250003"}, "accesionnum")
    assert error["type"] == "accession_mismatch"
    assert "noacsn" in error["msg"]
    assert validate(Batch4Input, {**BATCH4_EXAMPLE, "accesionnum": "20250002"}).accesionnum == "20250002"


@pytest.mark.parametrize("study", ["1.2.840.01", "1.2.abc", "12", "1." + "2" * 70])
def test_study_must_be_a_dicom_uid(study: str) -> None:
    rejected(Batch4Input, {**BATCH4_EXAMPLE, "study": study}, "study")


def test_patientid_must_be_a_dicom_lo_value() -> None:
    rejected(Batch4Input, {**BATCH4_EXAMPLE, "patientid": "P1\\P2"}, "patientid")
    rejected(DicomProcessInput, {**DICOM_PROCESS, "patientid": "P" * 65}, "patientid")
    assert validate(DicomProcessInput, {**DICOM_PROCESS, "patientid": "P10443013727"}).patientid == "P10443013727"


@pytest.mark.parametrize("subject_id", ["Patient/P10443013727", "P1 0443", "P10443013727/", "x" * 65])
def test_id_fields_take_a_fhir_id_not_a_reference(subject_id: str) -> None:
    rejected(EncounterInput, {**ENCOUNTER, "subject_id": subject_id}, "subject_id")


@pytest.mark.parametrize(
    ("field", "reference"),
    [
        ("subject_reference", "Practitioner/10016869420"),
        ("subject_reference", "https://api-satusehat.kemkes.go.id/fhir-r4/v1/Patient/P10443013727"),
        ("subject_reference", "P10443013727"),
        ("individual_reference", "Patient/P10443013727"),
        ("location_reference", "Location/"),
    ],
)
def test_reference_fields_take_a_relative_reference_of_the_right_type(field: str, reference: str) -> None:
    error = rejected(EncounterInput, {**ENCOUNTER, field: reference}, field)
    assert error["type"] == "reference"


def test_requester_may_be_a_practitioner_role_or_the_organisation() -> None:
    for reference in ("Practitioner/N10000001", "PractitionerRole/abc-1", "Organization/100025702"):
        assert validate(ServiceRequestInput, {**SERVICE_REQUEST, "requester_reference": reference}).requester_ref
    rejected(ServiceRequestInput, {**SERVICE_REQUEST, "requester_reference": "Patient/P1"}, "requester_reference")


@pytest.mark.parametrize("code", ["24648-8", "79103-8", "11525-3", "36643-5"])
def test_loinc_check_digit_of_real_codes(code: str) -> None:
    assert check_loinc(code) == code


@pytest.mark.parametrize("code", ["24648-7", "2464-88", "abc", "24648"])
def test_bad_loinc_code_is_refused(code: str) -> None:
    rejected(ObservationInput, {**OBSERVATION, "codind_code": code}, "codind_code")


def test_exam_code_display_comes_from_the_catalogue_or_is_left_out() -> None:
    known = validate(ObservationInput, {**OBSERVATION, "codind_code": "79103-8"})
    assert known.coding_display == "CT Abdomen W contrast IV"
    unknown = validate(ObservationInput, {**OBSERVATION, "codind_code": "36643-5"})
    assert unknown.coding_display is None
    given = validate(ObservationInput, {**OBSERVATION, "codind_code": "36643-5", "coding_display": "XR Chest 2V"})
    assert given.coding_display == "XR Chest 2V"


def test_coding_code_is_accepted_for_codind_code() -> None:
    """The old ServiceRequest builder read `coding_code`; a HIS may send that spelling."""
    request = validate(ServiceRequestInput, {**SERVICE_REQUEST, "coding_code": "79103-8"})
    assert request.codind_code == "79103-8"


def test_modality_is_a_dicom_acquisition_modality() -> None:
    assert validate(ServiceRequestInput, {**SERVICE_REQUEST, "modality": "ct"}).modality == "CT"
    rejected(ServiceRequestInput, {**SERVICE_REQUEST, "modality": "XX"}, "modality")
    assert {"CR", "CT", "DX", "MG", "MR", "US", "XA"} <= set(acquisition_modalities())


def test_identifier_value_may_be_derived_from_the_acsn_where_one_is_given() -> None:
    observation = validate(ObservationInput, {**without(OBSERVATION, "identifier_value"), "noacsn": "20250002"})
    assert observation.identifier_value is None
    assert observation.noacsn == "20250002"
    request = validate(ServiceRequestInput, SERVICE_REQUEST)
    assert request.identifier_value is None
