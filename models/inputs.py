"""What the HIS posts: the existing gateway's request bodies, under its field names, checked before any I/O.

The names are the existing Flask gateway's, typos included (`codind_code`, `accesionnum`), so a HIS that
called it keeps working (shared research, observed_contracts.md, "The existing gateway's HTTP interface").
Every model is frozen, strips surrounding whitespace, ignores fields it does not know (the HIS may send more)
and validates the ones it does. A blank string in an *optional* field counts as absent, because the old
gateway read every field with `data.get(...) or default` and HIS clients send `""` for fields they do not use.

Rules enforced here (each error names the field and the rule):

* date-times: ISO 8601 with an offset, or naive = Asia/Jakarta local time; not before 2014-06-03; not in the
  future beyond 5 min of clock skew (see `models.timeutil`);
* `period_end`, when given, after `period_start`; absent, the Encounter has no end (it is `arrived`, not
  finished: SATUSEHAT wants an end only for a finished visit, rule 10121);
* ACSN (`noacsn`, `accesionnum`): 1-16 printable ASCII characters (DICOM SH), no backslash, and none of the
  characters the DICOM Router would put unencoded into its search URL (see `ACSN_FORBIDDEN`);
* identifier values non-empty; `*_id` fields are FHIR logical ids; `*_reference` fields are relative
  references to the expected resource type (`Patient/<id>`, never an absolute URL: the router splits on `/`);
* id fields (`*_id`, `*_nik`, `identifier_value`, `noacsn`, ...) may come as JSON numbers, as the existing
  gateway accepted them (`"individual_id": 10016869420`); free text may not;
* each person may be named by IHS id, by reference, or by NIK (`subject_nik`, `individual_nik`,
  `performer_nik`): a NIK is resolved to the IHS id before anything is sent (`tasks.fhir.resolve_people`).

Nothing clinical is filled in that the HIS did not send: the exam code comes from the body, the PACS study's
modality (`EXAM_CODE_BY_MODALITY`) or the hospital's `DEFAULT_EXAM_CODE` (`models.fhir.resolve_exam`); the
modality from the body or the PACS study; report times from the body or the flow's clock. Defaults kept from
the existing gateway: `requester_reference` = the encounter's attending practitioner (batches), the
ServiceRequest's performer = `performer_reference`, else `performer_id` (batches 3/4), else the configured
`SERVICE_REQUEST_PERFORMER`; identifier values = the ACSN when `identifier_value` is absent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime
from functools import cache
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from models.settings import AeTitle
from models.timeutil import SatusehatDateTime, to_fhir_datetime

# --- defaults ----------------------------------------------------------------------------------------------

EXAM_DISPLAYS: Mapping[str, str] = {
    "24648-8": "XR Chest PA upright",
    "79103-8": "CT Abdomen W contrast IV",
}
"""Display names for the LOINC codes the research saw in SATUSEHAT radiology payloads. A `codind_code`
without `coding_display` takes its display from here; an unknown code is sent without a display rather
than with a wrong one. (No code is a default: see `models.fhir.resolve_exam`.)"""

ENCOUNTER_CLASSES: Mapping[str, str] = {
    "AMB": "ambulatory",
    "IMP": "inpatient encounter",
    "EMER": "emergency",
}
"""The v3-ActCode encounter classes SATUSEHAT uses for a hospital visit (satusehat.md §2.1: AMB, IMP for inpatients,
EMER for the emergency department), with the v3-ActCode display."""

DEFAULT_REASON_TEXT = "Periksa rutin"
"""`ServiceRequest.reasonCode[0].text` when the HIS gives no `reason_text`: the existing gateway sent exactly this
for every order, and HIS integrations built on it expect it back (field_notes.md)."""

# --- value rules -------------------------------------------------------------------------------------------

ACSN_MAX_LENGTH = 16
"""DICOM AccessionNumber is SH: at most 16 characters."""

ACSN_FORBIDDEN: Mapping[str, str] = {
    "\\": "a backslash separates values in DICOM",
    "|": "'|' separates system and value in a FHIR identifier search",
    "&": "the DICOM Router puts the ACSN into its search URL unencoded, where '&' ends the parameter",
    "#": "the DICOM Router puts the ACSN into its search URL unencoded, where '#' starts a fragment",
    "%": "the DICOM Router puts the ACSN into its search URL unencoded, where '%' starts an escape",
    "+": "the DICOM Router puts the ACSN into its search URL unencoded, where '+' means a space",
    ",": "the DICOM Router puts the ACSN into its search unescaped, where ',' means OR (it would never match)",
    "$": "the DICOM Router puts the ACSN into its search unescaped, where '$' separates a composite (no match)",
}
"""Characters an ACSN must not contain, and why. The router inserts the accession raw into
`ServiceRequest?identifier=…acsn/{org}|<ACSN>` (observed_contracts.md); only `|` is encoded. FHIR search reads a
raw `,` as OR and `$` as a composite separator, so the router searches for another value than the ACSN stored
(which the gateway's own searches escape, `\\,`): such an order could never be linked (field_notes.md)."""

DICOM_LO_MAX_LENGTH = 64
"""DICOM PatientID is LO: at most 64 characters."""

DICOM_UID_MAX_LENGTH = 64
_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_LOINC_CODE = re.compile(r"^([0-9]{1,7})-([0-9])$")
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")


def _error(kind: str, message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, context or None)


def _printable_ascii(value: str, what: str) -> None:
    if not _PRINTABLE_ASCII.match(value):
        bad = next(char for char in value if not 0x20 <= ord(char) <= 0x7E)
        raise _error(
            "not_printable_ascii",
            "{what} must be printable ASCII; found {char}",
            what=what,
            char=repr(bad),
        )


def check_acsn(value: str) -> str:
    """An ACSN the PACS, the DICOM Router and SATUSEHAT all read back unchanged."""
    _printable_ascii(value, "an accession number (DICOM SH)")
    for char, reason in ACSN_FORBIDDEN.items():
        if char in value:
            raise _error("acsn_character", "must not contain {char}: {reason}", char=repr(char), reason=reason)
    return value


def check_fhir_id(value: str) -> str:
    """A FHIR logical id; catches a whole reference ('Patient/P1…') put where only the id belongs."""
    if not _FHIR_ID.match(value):
        raise _error(
            "fhir_id",
            "must be a FHIR id: 1-64 letters, digits, '-' or '.', e.g. P10443013727; got '{value}'"
            " (a full reference such as 'Patient/<id>' belongs in the matching *_reference field)",
            value=value,
        )
    return value


def check_loinc(value: str) -> str:
    """A LOINC code with a correct mod-10 check digit, so a typo is caught here and not by the platform."""
    match = _LOINC_CODE.match(value)
    if match is None:
        raise _error("loinc_format", "must be a LOINC code such as 24648-8; got '{value}'", value=value)
    body, check = match.group(1), int(match.group(2))
    if _loinc_check_digit(body) != check:
        raise _error(
            "loinc_check_digit",
            "is not a valid LOINC code: the check digit of '{value}' should be {expected}",
            value=value,
            expected=_loinc_check_digit(body),
        )
    return value


def _loinc_check_digit(body: str) -> int:
    """LOINC's mod-10 (Luhn) check digit: double every other digit from the right, sum the digits."""
    total = 0
    for position, char in enumerate(reversed(body)):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            digit = digit - 9 if digit > 9 else digit
        total += digit
    return (10 - total % 10) % 10


@cache
def acquisition_modalities() -> Mapping[str, str]:
    """DICOM CID 29 'Acquisition Modality': code → meaning, from pydicom (loaded on first use: it is slow)."""
    from pydicom.sr.codedict import codes

    return {concept.value: concept.meaning for concept in codes.CID29.concepts.values()}


def check_modality(value: str) -> str:
    """A DICOM acquisition modality code (CID 29), upper-cased: 'dx' is DX."""
    code = value.upper()
    if code not in acquisition_modalities():
        raise _error(
            "modality",
            "must be a DICOM acquisition modality code (CID 29) such as DX, CR, CT, MR, US, MG; got '{value}'",
            value=value,
        )
    return code


def check_dicom_uid(value: str) -> str:
    """A DICOM UID: dot-separated numbers without leading zeros."""
    if not _DICOM_UID.match(value):
        raise _error(
            "dicom_uid",
            "must be a DICOM UID (digits and dots, no leading zeros), e.g. 1.2.840.113619.2.55.3; got '{value}'",
            value=value,
        )
    return value


def check_dicom_lo(value: str) -> str:
    """A DICOM LO value (PatientID): printable ASCII, no backslash."""
    _printable_ascii(value, "a DICOM LO value")
    if "\\" in value:
        raise _error("dicom_backslash", "must not contain a backslash: it separates values in DICOM")
    return value


@dataclass(frozen=True)
class Documented:
    """A rule stated in the API's OpenAPI document as a JSON Schema `pattern`, for the HIS developer reading
    /api/docs and for schema-driven tests. Documentation only: the validators enforce the rule, with messages
    that name it (pydantic's generic "should match pattern" would not)."""

    pattern: str

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        value = handler(schema)
        value["pattern"] = self.pattern
        return value


ACSN_PATTERN = r"""^[!"'-*\--\[\]-{}~]([ -"'-*\--\[\]-{}~]*[!"'-*\--\[\]-{}~])?$"""
"""`check_acsn` as a regular expression: printable ASCII without `\\ | & # % + , $`, no padding spaces."""

DICOM_LO_PATTERN = r"^[!-\[\]-~]([ -\[\]-~]*[!-\[\]-~])?$"
"""`check_dicom_lo` as a regular expression: printable ASCII without a backslash, no padding spaces."""

NON_BLANK_PATTERN = r"\S"
"""Text with at least one character that is not white space (surrounding white space is stripped)."""


class _ModalityCodes:
    """The CID 29 codes as the schema's `enum`, listed only when the schema is made (pydicom's tables load slowly).
    Lower case is accepted too (`check_modality` upper-cases it)."""

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        value = handler(schema)
        value["enum"] = sorted(acquisition_modalities())
        return value


def reference_to(*resource_types: str) -> Any:
    """A relative reference `<Type>/<id>` to one of `resource_types` (never absolute: the router splits it)."""
    pattern = re.compile(rf"^({'|'.join(resource_types)})/[A-Za-z0-9\-.]{{1,64}}$")
    expected = " or ".join(f"'{kind}/<id>'" for kind in resource_types)

    def check(value: str) -> str:
        if not pattern.match(value):
            raise _error(
                "reference", "must be a relative reference {expected}; got '{value}'", expected=expected, value=value
            )
        return value

    return Annotated[str, StringConstraints(min_length=1), AfterValidator(check), Documented(pattern.pattern)]


def _number_as_text(value: Any) -> Any:
    """A JSON integer in an id field is its digits: the existing gateway passed `"individual_id": 10016869420`
    through as it came, so HIS integrations send ids as numbers. Only integers (not booleans, not fractions)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


IdText = BeforeValidator(_number_as_text)
"""Accept an id sent as a JSON integer (ids only: free text must be text)."""


NonEmptyText = Annotated[str, StringConstraints(min_length=1), Documented(NON_BLANK_PATTERN)]
"""Free text (names, reading text): non-empty after stripping."""

IDENTIFIER_MAX_LENGTH = 64
"""A visit or order number is short (RG2023I0000175); a longer value is a HIS sending the wrong field."""

_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
IDENTIFIER_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
"""`check_identifier_value` as a regular expression: one line of text, not blank."""


def check_identifier_value(value: str) -> str:
    """One line of text: a NUL or a line break in an identifier SATUSEHAT stores and searches by is a HIS bug."""
    found = _CONTROL_CHARACTER.search(value)
    if found is not None:
        raise _error(
            "identifier_control_character",
            "must not contain control characters or line breaks (found {char}): it is one line of text",
            char=repr(found.group()),
        )
    return value


IdentifierValue = Annotated[
    str,
    StringConstraints(min_length=1, max_length=IDENTIFIER_MAX_LENGTH),
    IdText,
    AfterValidator(check_identifier_value),
    Documented(IDENTIFIER_PATTERN),
]
"""A business identifier value (visit number, order number): one line of text, at most 64 characters."""

FhirId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64),
    IdText,
    AfterValidator(check_fhir_id),
    Documented(_FHIR_ID.pattern),
]
"""A FHIR logical id: an IHS number (P10443013727, 10016869420) or a server id (a UUID)."""

Acsn = Annotated[
    str,
    StringConstraints(min_length=1, max_length=ACSN_MAX_LENGTH),
    IdText,
    AfterValidator(check_acsn),
    Documented(ACSN_PATTERN),
]
"""An accession number (ACSN), unique per order at the facility; the router links the study by it."""

LoincCode = Annotated[
    str, StringConstraints(min_length=1), AfterValidator(check_loinc), Documented(_LOINC_CODE.pattern)
]
Modality = Annotated[str, StringConstraints(min_length=1), AfterValidator(check_modality), _ModalityCodes()]
DicomUid = Annotated[
    str,
    StringConstraints(min_length=1, max_length=DICOM_UID_MAX_LENGTH),
    AfterValidator(check_dicom_uid),
    Documented(_DICOM_UID.pattern),
]
DicomPatientId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=DICOM_LO_MAX_LENGTH),
    IdText,
    AfterValidator(check_dicom_lo),
    Documented(DICOM_LO_PATTERN),
]

NIK_LENGTH = 16
_NIK = re.compile(r"^[0-9]{16}$")


def check_nik(value: str) -> str:
    """An Indonesian NIK: 16 digits. The value is never echoed (it identifies a person)."""
    if not _NIK.match(value):
        raise _error("nik", "must be a NIK: 16 digits (given {length} characters)", length=len(value))
    return value


Nik = Annotated[str, IdText, AfterValidator(check_nik), Documented(_NIK.pattern)]
"""A person's NIK (Nomor Induk Kependudukan), looked up on the platform for the IHS id; may come as a number."""


def check_encounter_class(value: str) -> str:
    """One of SATUSEHAT's encounter classes (`ENCOUNTER_CLASSES`), upper-cased: 'amb' is AMB."""
    code = value.upper()
    if code not in ENCOUNTER_CLASSES:
        raise _error(
            "encounter_class",
            "must be one of {allowed} (v3-ActCode, as SATUSEHAT uses them); got '{value}'",
            allowed=", ".join(ENCOUNTER_CLASSES),
            value=value,
        )
    return code


@dataclass(frozen=True)
class DocumentedValues:
    """The accepted values as the schema's `enum` (documentation; the validator enforces them, case-insensitively)."""

    values: tuple[str, ...]

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        value = handler(schema)
        value["enum"] = list(self.values)
        return value


EncounterClass = Annotated[
    str,
    StringConstraints(min_length=1),
    AfterValidator(check_encounter_class),
    DocumentedValues(tuple(ENCOUNTER_CLASSES)),
]

PatientReference = reference_to("Patient")
PractitionerReference = reference_to("Practitioner")
LocationReference = reference_to("Location")
AgentReference = reference_to("Practitioner", "PractitionerRole", "Organization")
"""Who orders or performs an order: a practitioner, a role, or the organisation itself."""


def _one_of_missing(field: str, alternative: str, why: str) -> PydanticCustomError:
    return _error(
        "missing_one_of",
        "{field} is required unless {alternative} is given ({why})",
        field=field,
        alternative=alternative,
        why=why,
    )


class UnresolvedNik(ValueError):
    """A person named only by NIK was used before `tasks.fhir.resolve_people` looked the NIK up."""


def _resolved(value: str | None, nik_field: str) -> str:
    if value is None:
        raise UnresolvedNik(f"{nik_field} has not been resolved to an IHS id yet (tasks.fhir.resolve_people)")
    return value


# --- the base ----------------------------------------------------------------------------------------------


class GatewayInput(BaseModel):
    """Frozen, whitespace-stripped, unknown fields ignored; blank optional fields count as absent."""

    model_config = ConfigDict(frozen=True, str_strip_whitespace=True, extra="ignore", use_attribute_docstrings=True)

    one_of_required: ClassVar[tuple[tuple[str, ...], ...]] = ()
    """Groups of optional fields of which one must be given (enforced by the field validators). The HIS API states
    them in its OpenAPI document (api/app.py); they stay out of the model's own JSON Schema, which is also the
    parameter schema of the flows, because the Prefect UI's run form cannot render `allOf` and falls back to raw
    JSON."""

    @classmethod
    def required_pairs(cls) -> list[tuple[str, ...]]:
        """`one_of_required` of this model and every base, each pair once, in definition order."""
        return list(dict.fromkeys(pair for base in cls.__mro__ for pair in vars(base).get("one_of_required", ())))

    @model_validator(mode="before")
    @classmethod
    def _blank_optional_is_absent(cls, data: Any) -> Any:
        """`""` in an optional field means 'not given', as it did for the existing gateway's `or` defaults."""
        if not isinstance(data, Mapping):
            return data
        optional = _optional_keys(cls)
        return {
            key: value
            for key, value in data.items()
            if not (key in optional and isinstance(value, str) and not value.strip())
        }


@cache
def _optional_keys(model: type[BaseModel]) -> frozenset[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        keys.add(name)
        alias = field.validation_alias
        if isinstance(alias, str):
            keys.add(alias)
        elif isinstance(alias, AliasChoices):
            keys.update(choice for choice in alias.choices if isinstance(choice, str))
    return frozenset(keys)


# --- field groups (one concept each) -----------------------------------------------------------------------


class IdentifierFields(GatewayInput):
    identifier_value: IdentifierValue | None = None
    """The HIS's own number for the resource (visit/registration number); the resource is found by it later."""


class SubjectFields(GatewayInput):
    """The patient: `subject_reference` ('Patient/<IHS>') wins over `subject_id` (the IHS number), which wins over
    `subject_nik` (looked up on the platform before anything is sent, `tasks.fhir.resolve_people`)."""

    one_of_required = (("subject_id", "subject_reference", "subject_nik"),)

    subject_reference: PatientReference | None = None
    """Full reference 'Patient/<IHS>' (overrides subject_id)."""
    subject_nik: Nik | None = Field(default=None, repr=False)
    """New, optional: the patient's NIK, when the HIS does not hold the IHS number; resolved by the platform's
    Patient search by NIK. Never logged."""
    subject_id: FhirId | None = Field(default=None, validate_default=True)
    """The patient's IHS number, e.g. P10443013727 (sent as 'Patient/<id>')."""
    subject_display: NonEmptyText | None = Field(default=None, exclude=True, repr=False)
    """The patient's name. Accepted because existing HIS integrations send it, then dropped: SATUSEHAT identifies
    the patient by IHS number, and a name kept here would travel into Prefect's run records, the UI and logs."""

    @field_validator("subject_id")
    @classmethod
    def _subject_given(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("subject_reference") is None and info.data.get("subject_nik") is None:
            raise _one_of_missing("subject_id", "subject_reference or subject_nik", "every resource names its patient")
        return value

    @property
    def subject_ref(self) -> str:
        if self.subject_reference is not None:
            return self.subject_reference
        return f"Patient/{_resolved(self.subject_id, 'subject_nik')}"


class AttenderFields(GatewayInput):
    """The encounter's attending practitioner: `individual_reference` wins over `individual_id`, which wins over
    `individual_nik` (resolved before anything is sent)."""

    one_of_required = (("individual_id", "individual_reference", "individual_nik"),)

    individual_reference: PractitionerReference | None = None
    """Full reference 'Practitioner/<IHS>' (overrides individual_id)."""
    individual_nik: Nik | None = Field(default=None, repr=False)
    """New, optional: the attending practitioner's NIK, resolved by the platform's Practitioner search by NIK."""
    individual_id: FhirId | None = Field(default=None, validate_default=True)
    """The attending practitioner's IHS number (sent as 'Practitioner/<id>')."""
    individual_display: NonEmptyText | None = None

    @field_validator("individual_id")
    @classmethod
    def _individual_given(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("individual_reference") is None and info.data.get("individual_nik") is None:
            raise _one_of_missing(
                "individual_id",
                "individual_reference or individual_nik",
                "SATUSEHAT rule 10119: Encounter.participant.individual",
            )
        return value

    @property
    def attender_ref(self) -> str:
        if self.individual_reference is not None:
            return self.individual_reference
        return f"Practitioner/{_resolved(self.individual_id, 'individual_nik')}"


class LocationFields(GatewayInput):
    """Where the visit happens; optional: `location_reference` wins over `location_id`."""

    location_reference: LocationReference | None = None
    """Full reference 'Location/<id>' (overrides location_id)."""
    location_id: FhirId | None = None
    """SATUSEHAT Location id (a UUID); without one the Encounter carries no location."""
    location_display: NonEmptyText | None = None

    @property
    def location_ref(self) -> str | None:
        if self.location_reference is not None:
            return self.location_reference
        return None if self.location_id is None else f"Location/{self.location_id}"


class EncounterClassFields(GatewayInput):
    encounter_class: EncounterClass | None = None
    """New, optional: the visit's class, one of SATUSEHAT's v3-ActCode codes AMB (outpatient), IMP (inpatient),
    EMER (emergency department); absent = the gateway's ENCOUNTER_CLASS setting (default AMB, what the existing
    gateway always sent)."""


class StartFields(GatewayInput):
    period_start: SatusehatDateTime
    """When it happened. Encounter: period.start; ServiceRequest: occurrence and authoredOn (as the existing
    gateway did); standalone Observation/DiagnosticReport (and batch2): effectiveDateTime when the PACS study's
    time is not known (see `models.fhir.build_observation`)."""


class PeriodFields(StartFields):
    period_end: SatusehatDateTime | None = Field(default=None, validate_default=True)
    """Encounter period end: must be after `period_start`. Absent, the Encounter has none: it is registered as
    `arrived`, and SATUSEHAT wants an end only once a visit is finished (rule 10121). (The existing gateway made
    up start + 10 min; not kept.)"""

    @field_validator("period_end")
    @classmethod
    def _end_after_start(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("period_start")
        if start is None or value is None:  # period_start itself failed and says why; no end is no end
            return value
        if value <= start:
            raise _error(
                "period_order",
                "must be later than period_start ({start}); got {end} (SATUSEHAT rule 10173)",
                start=to_fhir_datetime(start),
                end=to_fhir_datetime(value),
            )
        return value


class ExamFields(GatewayInput):
    codind_code: LoincCode | None = Field(default=None, validation_alias=AliasChoices("codind_code", "coding_code"))
    """The exam's LOINC code (the old name's typo kept; `coding_code`, which the old ServiceRequest read, is
    accepted too). Absent: the PACS study's modality through EXAM_CODE_BY_MODALITY, else DEFAULT_EXAM_CODE; with
    neither, the order is refused (`models.fhir.resolve_exam`). No exam is assumed."""

    coding_display: NonEmptyText | None = Field(default=None, validate_default=True)
    """Display of the exam code; absent = `EXAM_DISPLAYS[codind_code]` when the code is listed there."""

    @field_validator("coding_display")
    @classmethod
    def _display_from_catalogue(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            return value
        code = info.data.get("codind_code")
        return None if code is None else EXAM_DISPLAYS.get(code)


class OrderFields(ExamFields):
    """The radiology order (ServiceRequest): accession number, who asks, who performs, which modality."""

    noacsn: Acsn
    """The accession number (ACSN) of the order: the DICOM study must carry the same AccessionNumber."""
    requester_nik: Nik | None = Field(default=None, repr=False)
    """New, optional: the ordering practitioner's NIK (→ 'Practitioner/<IHS>'), when requester_reference is absent."""
    requester_reference: AgentReference | None = None
    requester_display: NonEmptyText | None = None
    performer_reference: AgentReference | None = None
    performer_nik: Nik | None = Field(default=None, repr=False)
    """New, optional: the performing practitioner's (radiologist's) NIK, when no reference or id names them."""
    performer_display: NonEmptyText | None = None
    modality: Modality | None = None
    """DICOM modality code for `orderDetail` (new field). Absent: the PACS study's modality when the flow has the
    study (batch4), else no modality orderDetail (the existing gateway always sent DX, whatever the study)."""
    ae_title: AeTitle | None = None
    """New, optional: the modality's AE title, sent as an `orderDetail` coding of system ae-title. The old
    gateway hard-coded 'DX0001'; without a real value it is left out."""
    reason_text: NonEmptyText | None = None
    """New, optional: `reasonCode[0].text`; absent = 'Periksa rutin', what the existing gateway sent for every
    order (`DEFAULT_REASON_TEXT`)."""

    @property
    def requester_ref(self) -> str | None:
        """Who ordered the exam (`ServiceRequest.requester`)."""
        if self.requester_reference is None and self.requester_nik is not None:
            _resolved(None, "requester_nik")
        return self.requester_reference

    @property
    def requester_name(self) -> str | None:
        return self.requester_display

    @property
    def order_performer_ref(self) -> str | None:
        """Who performs the exam (`ServiceRequest.performer`), if the HIS said; else the configured performer."""
        if self.performer_reference is None and self.performer_nik is not None:
            _resolved(None, "performer_nik")
        return self.performer_reference

    @property
    def order_performer_name(self) -> str | None:
        return self.performer_display


class RadiologistFields(GatewayInput):
    """The radiologist: `performer_id` (IHS number), or `performer_nik` resolved before anything is sent."""

    one_of_required = (("performer_id", "performer_nik"),)

    performer_nik: Nik | None = Field(default=None, repr=False)
    """New, optional: the radiologist's NIK, resolved by the platform's Practitioner search by NIK."""
    performer_id: FhirId | None = Field(default=None, validate_default=True)
    """The radiologist's IHS number: performer of the Observation and the DiagnosticReport."""

    @field_validator("performer_id")
    @classmethod
    def _radiologist_given(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("performer_nik") is None:
            raise _one_of_missing(
                "performer_id", "performer_nik", "SATUSEHAT rules 10383/10384: a Practitioner performs the reading"
            )
        return value

    @property
    def radiologist_id(self) -> str:
        """The radiologist's IHS number (after `resolve_people` when only the NIK was given)."""
        return _resolved(self.performer_id, "performer_nik")


class ReadingFields(ExamFields, RadiologistFields):
    """The radiologist's reading (Observation)."""

    performer_display: NonEmptyText | None = None
    performer_value: NonEmptyText
    """The reading text (`Observation.valueString`)."""
    reading_time: SatusehatDateTime | None = None
    """New, optional: when the radiologist's reading was made available, `Observation.issued`. Absent: the time
    the gateway posts it."""


class ConclusionFields(GatewayInput):
    conclusion_text: NonEmptyText
    """`DiagnosticReport.conclusion`. Required: SATUSEHAT rule 10074 wants conclusion or conclusionCode, and
    the input has no coded conclusion (the old gateway sent an empty string, which is not valid FHIR)."""
    report_time: SatusehatDateTime | None = None
    """New, optional: when the report was signed and released, `DiagnosticReport.issued`. Absent: the time the
    gateway posts it."""


class ResultLinkFields(GatewayInput):
    """Server ids of the resources a reading refers to (standalone Observation/DiagnosticReport)."""

    encounter_id: FhirId
    """SATUSEHAT id of the Encounter."""
    service_request_id: FhirId
    """SATUSEHAT id of the ServiceRequest (basedOn)."""
    imaging_study_id: FhirId
    """SATUSEHAT id of the ImagingStudy the DICOM Router created (derivedFrom / imagingStudy)."""


def _identifier_or_acsn(value: str | None, info: ValidationInfo) -> str | None:
    """The identifier value is `identifier_value`, else the ACSN: one of them must be there."""
    if value is None and info.data.get("identifier_value") is None:
        raise _one_of_missing(
            "noacsn", "identifier_value", "the identifier value is identifier_value, else the accession number"
        )
    return value


# --- the request bodies ------------------------------------------------------------------------------------


class EncounterInput(
    IdentifierFields, SubjectFields, AttenderFields, PeriodFields, LocationFields, EncounterClassFields
):
    """POST /encounter. Required: identifier_value, subject (id, reference or NIK), individual (id, reference or
    NIK), period_start. The Encounter is registered as `arrived`, of class `encounter_class` (default AMB)."""

    identifier_value: IdentifierValue
    """The visit/registration number: the Encounter is found again by it, so it cannot be derived."""


class ServiceRequestInput(IdentifierFields, SubjectFields, StartFields, OrderFields):
    """POST /service-req. Required: noacsn, subject_id, encounter_id, period_start, requester_reference.
    identifier_value is optional: absent, the order's identifier value is the ACSN."""

    one_of_required = (("requester_reference", "requester_nik"),)

    encounter_id: FhirId

    requester_reference: AgentReference | None = Field(default=None, validate_default=True)
    """Required unless requester_nik is given (SATUSEHAT rule 10376); batches fall back to the encounter's
    practitioner instead."""

    @field_validator("requester_reference")
    @classmethod
    def _requester_given(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("requester_nik") is None:
            raise _one_of_missing("requester_reference", "requester_nik", "SATUSEHAT rule 10376")
        return value


class Batch1Input(EncounterInput, OrderFields):
    """POST /batch1: Encounter + ServiceRequest. `requester_reference` defaults to the encounter's attending
    practitioner (the clinician who sees the patient orders the exam)."""

    @property
    def requester_ref(self) -> str | None:
        if self.requester_reference is None and self.requester_nik is None:
            return self.attender_ref
        return super().requester_ref

    @property
    def requester_name(self) -> str | None:
        return self.requester_display if self.requester_reference else self.individual_display


class ObservationInput(IdentifierFields, SubjectFields, StartFields, ReadingFields, ResultLinkFields):
    """POST /observation. Required: subject_id, encounter_id, period_start, performer_id, performer_value,
    service_request_id, imaging_study_id, and identifier_value or noacsn."""

    one_of_required = (("noacsn", "identifier_value"),)
    noacsn: Acsn | None = Field(default=None, validate_default=True)
    """New, optional: the order's ACSN, the identifier value when identifier_value is absent."""

    @field_validator("noacsn")
    @classmethod
    def _identifier_derivable(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _identifier_or_acsn(value, info)


class Batch2Input(ObservationInput, ConclusionFields):
    """POST /batch2: Observation + DiagnosticReport (the report's result is the Observation just created)."""


class DiagnosticReportInput(
    IdentifierFields, SubjectFields, StartFields, ExamFields, RadiologistFields, ConclusionFields
):
    """POST /conclusion. Required: subject_id, encounter_id, period_start, performer_id, imaging_study_id,
    observation_id, service_request_id, conclusion_text, and identifier_value or noacsn."""

    one_of_required = (("noacsn", "identifier_value"),)

    encounter_id: FhirId
    imaging_study_id: FhirId
    observation_id: FhirId
    service_request_id: FhirId
    noacsn: Acsn | None = Field(default=None, validate_default=True)
    """New, optional: the order's ACSN, the identifier value when identifier_value is absent."""

    @field_validator("noacsn")
    @classmethod
    def _identifier_derivable(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _identifier_or_acsn(value, info)


class Batch3Input(Batch1Input, ReadingFields, ConclusionFields):
    """POST /batch3: Encounter, ServiceRequest, ImagingStudy lookup by ACSN, Observation, DiagnosticReport.
    Required on top of Batch1Input: performer_id (the radiologist), performer_value, conclusion_text.
    The ServiceRequest's performer is `performer_reference`, else the radiologist."""

    @property
    def order_performer_ref(self) -> str | None:
        return self.performer_reference or f"Practitioner/{self.radiologist_id}"


class Batch4Input(Batch3Input):
    """POST /batch4: batch 3 with the DICOM step. `study` is required (as in the old schema); `accesionnum`,
    if given, must equal `noacsn`: the router links the study to the ServiceRequest by that number."""

    study: DicomUid
    """StudyInstanceUID of the study in the PACS."""
    patientid: DicomPatientId | None = None
    """New PatientID (0010,0020) for the copies sent to the router (the router itself ignores it)."""
    accesionnum: Acsn | None = Field(default=None, validate_default=True)
    """New AccessionNumber (0008,0050); if given it must equal noacsn."""

    @field_validator("accesionnum")
    @classmethod
    def _same_accession(cls, value: str | None, info: ValidationInfo) -> str | None:
        noacsn = info.data.get("noacsn")
        if value is not None and noacsn is not None and value != noacsn:
            raise _error(
                "accession_mismatch",
                "must equal noacsn ('{noacsn}'): the DICOM Router finds the ServiceRequest by the study's "
                "AccessionNumber, so a different one is never linked; got '{value}'",
                noacsn=noacsn,
                value=value,
            )
        return value

    @property
    def dicom_accession(self) -> str:
        """The AccessionNumber the study must carry when sent to the router: the order's ACSN."""
        return self.noacsn


class DicomProcessInput(GatewayInput):
    """POST /dicom/process: send one study to the router, rewriting PatientID and AccessionNumber if given.
    `study` or `accesionnum` is required (without `study` the study is looked up by accession number)."""

    one_of_required = (("study", "accesionnum"),)

    study: DicomUid | None = None
    """StudyInstanceUID; without it the study is looked up by accesionnum."""
    patientid: DicomPatientId | None = None
    """New PatientID (0010,0020) for the copies sent to the router."""
    accesionnum: Acsn | None = Field(default=None, validate_default=True)
    """New AccessionNumber (0008,0050), and the lookup key when study is absent."""

    @field_validator("accesionnum")
    @classmethod
    def _study_findable(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("study") is None:
            raise _one_of_missing(
                "accesionnum", "study", "without a Study Instance UID the study is looked up by accession number"
            )
        return value


G = TypeVar("G", bound="GatewayInput")

# --- people named by NIK -----------------------------------------------------------------------------------

NIK_FIELDS: Mapping[str, str] = {
    "subject_nik": "Patient",
    "individual_nik": "Practitioner",
    "performer_nik": "Practitioner",
    "requester_nik": "Practitioner",
}
"""Each NIK field and the platform resource its NIK is searched in."""


@dataclass(frozen=True)
class NikLookup:
    """One NIK to look up: the field it came in (for error messages) and where to search. `nik` is not printed."""

    nik_field: str
    resource_type: str
    nik: str = dataclass_field(repr=False)


def nik_lookups(payload: GatewayInput) -> list[NikLookup]:
    """The NIKs of `payload` that must be looked up: those of people it names by NIK only (an IHS id or a
    reference given beside a NIK wins, and that NIK is not looked up)."""
    lookups = []
    for nik_field, resource_type in NIK_FIELDS.items():
        nik = getattr(payload, nik_field, None)
        if nik is not None and _nik_target(payload, nik_field) is not None:
            lookups.append(NikLookup(nik_field, resource_type, nik))
    return lookups


def with_people(payload: G, ihs_ids: Mapping[str, str]) -> G:
    """`payload` with each looked-up NIK (`ihs_ids`: NIK field → IHS id) put where the IHS id goes, and every NIK
    field cleared, so the NIK goes no further than the lookup (no run record, artifact or log carries it)."""
    update: dict[str, Any] = {name: None for name in NIK_FIELDS if name in type(payload).model_fields}
    for nik_field, ihs_id in ihs_ids.items():
        target = _nik_target(payload, nik_field)
        if target is None:
            continue
        check_fhir_id(ihs_id)
        update[target] = ihs_id if target.endswith("_id") else f"{NIK_FIELDS[nik_field]}/{ihs_id}"
    return payload.model_copy(update=update)


def _nik_target(payload: GatewayInput, nik_field: str) -> str | None:
    """The field a NIK's IHS id fills, or None when the payload already names that person otherwise."""
    fields = type(payload).model_fields
    candidates = {
        "subject_nik": ("subject_id", ("subject_reference", "subject_id")),
        "individual_nik": ("individual_id", ("individual_reference", "individual_id")),
        "requester_nik": ("requester_reference", ("requester_reference",)),
        "performer_nik": (
            ("performer_id", ("performer_id",))
            if "performer_id" in fields
            else ("performer_reference", ("performer_reference",))
        ),
    }
    target, given = candidates[nik_field]
    if target not in fields or any(getattr(payload, name, None) is not None for name in given):
        return None
    return target
