"""What the HIS posts: the existing gateway's request bodies, under its field names, checked before any I/O.

The names are the existing Flask gateway's, typos included (`codind_code`, `accesionnum`), so a HIS that
called it keeps working (shared research, observed_contracts.md, "The existing gateway's HTTP interface").
Every model is frozen, strips surrounding whitespace, ignores fields it does not know (the HIS may send more)
and validates the ones it does. A blank string in an *optional* field counts as absent, because the old
gateway read every field with `data.get(...) or default` and HIS clients send `""` for fields they do not use.

Rules enforced here (each error names the field and the rule):

* date-times: ISO 8601 with an offset, or naive = Asia/Jakarta local time; not before 2014-06-03; not in the
  future beyond 5 min of clock skew (see `models.timeutil`);
* `period_end` after `period_start`; absent, it is `period_start` + 10 min like the existing gateway, but never
  later than now (a default must not produce a future date the platform refuses; see `default_period_end`);
* ACSN (`noacsn`, `accesionnum`): 1-16 printable ASCII characters (DICOM SH), no backslash, and none of the
  characters the DICOM Router would put unencoded into its search URL (see `ACSN_FORBIDDEN`);
* identifier values non-empty; `*_id` fields are FHIR logical ids; `*_reference` fields are relative
  references to the expected resource type (`Patient/<id>`, never an absolute URL: the router splits on `/`).

Defaults for fields the builders need that the old bodies lacked or left optional (each is documented at its
field): `codind_code` 24648-8 "XR Chest PA upright", `modality` DX, `requester_reference` = the encounter's
attending practitioner (batches), the ServiceRequest's performer = `performer_id` (batches 3/4), identifier
values = the ACSN when `identifier_value` is absent (ServiceRequest, Observation, DiagnosticReport).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
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
from models.timeutil import SatusehatDateTime, context_now, to_fhir_datetime

# --- defaults ----------------------------------------------------------------------------------------------

DEFAULT_ENCOUNTER_DURATION = timedelta(minutes=10)
"""The existing gateway's `period_end` when none is given: start + 10 minutes."""

MIN_ENCOUNTER_DURATION = timedelta(seconds=1)
"""The shortest default period: `end > start` (rule 10173) at the second precision that is sent."""

DEFAULT_EXAM_CODE = "24648-8"
"""LOINC 'XR Chest PA upright', the exam in every example of the existing gateway's API docs. (Its code fell
back to 79103-8 'CT Abdomen W contrast IV', which contradicted its hard-coded DX modality; not kept.)"""

EXAM_DISPLAYS: Mapping[str, str] = {
    "24648-8": "XR Chest PA upright",
    "79103-8": "CT Abdomen W contrast IV",
}
"""Display names for the LOINC codes the research saw in SATUSEHAT radiology payloads. A `codind_code`
without `coding_display` takes its display from here; an unknown code is sent without a display rather
than with a wrong one."""

DEFAULT_MODALITY = "DX"
"""DICOM modality of the order (`ServiceRequest.orderDetail`): the existing gateway always sent DX."""

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
}
"""Characters an ACSN must not contain, and why. The router inserts the accession raw into
`ServiceRequest?identifier=…acsn/{org}|<ACSN>` (observed_contracts.md); only `|` is encoded."""

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


ACSN_PATTERN = r"""^[!"$'-*,-\[\]-{}~]([ -"$'-*,-\[\]-{}~]*[!"$'-*,-\[\]-{}~])?$"""
"""`check_acsn` as a regular expression: printable ASCII without `\\ | & # % +`, no padding spaces."""

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
    AfterValidator(check_identifier_value),
    Documented(IDENTIFIER_PATTERN),
]
"""A business identifier value (visit number, order number): one line of text, at most 64 characters."""

FhirId = Annotated[
    str, StringConstraints(min_length=1, max_length=64), AfterValidator(check_fhir_id), Documented(_FHIR_ID.pattern)
]
"""A FHIR logical id: an IHS number (P10443013727, 10016869420) or a server id (a UUID)."""

Acsn = Annotated[
    str,
    StringConstraints(min_length=1, max_length=ACSN_MAX_LENGTH),
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
    AfterValidator(check_dicom_lo),
    Documented(DICOM_LO_PATTERN),
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


def default_period_end(start: datetime, now: datetime) -> datetime:
    """`start` + 10 min, but not later than `now` (and never before `start` + 1 s).

    The existing gateway always added 10 minutes; for a visit that started a moment ago that lands in the
    future, which SATUSEHAT refuses. Clamping to 'now' keeps the default inside the rules it enforces.
    """
    end = start + DEFAULT_ENCOUNTER_DURATION
    if end > now:
        end = max(now.replace(microsecond=0), start + MIN_ENCOUNTER_DURATION)
    return end


# --- the base ----------------------------------------------------------------------------------------------


class GatewayInput(BaseModel):
    """Frozen, whitespace-stripped, unknown fields ignored; blank optional fields count as absent."""

    model_config = ConfigDict(frozen=True, str_strip_whitespace=True, extra="ignore", use_attribute_docstrings=True)

    one_of_required: ClassVar[tuple[tuple[str, str], ...]] = ()
    """Pairs of optional fields of which one must be given (enforced by the field validators). The HIS API states
    them in its OpenAPI document (api/app.py); they stay out of the model's own JSON Schema, which is also the
    parameter schema of the flows, because the Prefect UI's run form cannot render `allOf` and falls back to raw
    JSON."""

    @classmethod
    def required_pairs(cls) -> list[tuple[str, str]]:
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
    """The patient: `subject_reference` ('Patient/<IHS>') wins over `subject_id` (the IHS number)."""

    one_of_required = (("subject_id", "subject_reference"),)

    subject_reference: PatientReference | None = None
    """Full reference 'Patient/<IHS>' (overrides subject_id)."""
    subject_id: FhirId | None = Field(default=None, validate_default=True)
    """The patient's IHS number, e.g. P10443013727 (sent as 'Patient/<id>')."""
    subject_display: NonEmptyText | None = Field(default=None, exclude=True, repr=False)
    """The patient's name. Accepted because existing HIS integrations send it, then dropped: SATUSEHAT identifies
    the patient by IHS number, and a name kept here would travel into Prefect's run records, the UI and logs."""

    @field_validator("subject_id")
    @classmethod
    def _subject_given(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("subject_reference") is None:
            raise _one_of_missing("subject_id", "subject_reference", "every resource names its patient")
        return value

    @property
    def subject_ref(self) -> str:
        return self.subject_reference or f"Patient/{self.subject_id}"


class AttenderFields(GatewayInput):
    """The encounter's attending practitioner: `individual_reference` wins over `individual_id`."""

    one_of_required = (("individual_id", "individual_reference"),)

    individual_reference: PractitionerReference | None = None
    """Full reference 'Practitioner/<IHS>' (overrides individual_id)."""
    individual_id: FhirId | None = Field(default=None, validate_default=True)
    """The attending practitioner's IHS number (sent as 'Practitioner/<id>')."""
    individual_display: NonEmptyText | None = None

    @field_validator("individual_id")
    @classmethod
    def _individual_given(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("individual_reference") is None:
            raise _one_of_missing(
                "individual_id", "individual_reference", "SATUSEHAT rule 10119: Encounter.participant.individual"
            )
        return value

    @property
    def attender_ref(self) -> str:
        return self.individual_reference or f"Practitioner/{self.individual_id}"


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


class StartFields(GatewayInput):
    period_start: SatusehatDateTime
    """When it happened. Encounter: period.start; ServiceRequest: occurrence and authoredOn (as the existing
    gateway did); Observation/DiagnosticReport: effectiveDateTime (and issued unless the caller gives one)."""


class PeriodFields(StartFields):
    period_end: SatusehatDateTime | None = Field(default=None, validate_default=True)
    """Encounter period end: must be after `period_start`; absent = `default_period_end(period_start, now)`."""

    @field_validator("period_end")
    @classmethod
    def _end_after_start(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("period_start")
        if start is None:  # period_start itself failed and says why
            return value
        if value is None:
            return default_period_end(start, context_now(info))
        if value <= start:
            raise _error(
                "period_order",
                "must be later than period_start ({start}); got {end} (SATUSEHAT rule 10173)",
                start=to_fhir_datetime(start),
                end=to_fhir_datetime(value),
            )
        return value

    @property
    def encounter_end(self) -> datetime:
        """The end that is sent (validation has filled in the default)."""
        return self.period_end if self.period_end is not None else self.period_start + DEFAULT_ENCOUNTER_DURATION


class ExamFields(GatewayInput):
    codind_code: LoincCode = Field(
        default=DEFAULT_EXAM_CODE, validation_alias=AliasChoices("codind_code", "coding_code")
    )
    """The exam's LOINC code (the old name's typo kept; `coding_code`, which the old ServiceRequest read, is
    accepted too). Default `DEFAULT_EXAM_CODE`."""

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
    requester_reference: AgentReference | None = None
    requester_display: NonEmptyText | None = None
    performer_reference: AgentReference | None = None
    performer_display: NonEmptyText | None = None
    modality: Modality = DEFAULT_MODALITY
    """DICOM modality code for `orderDetail` (new field; the existing gateway always sent DX)."""
    ae_title: AeTitle | None = None
    """New, optional: the modality's AE title, sent as an `orderDetail` coding of system ae-title. The old
    gateway hard-coded 'DX0001'; without a real value it is left out."""
    reason_text: NonEmptyText | None = None
    """New, optional: `reasonCode[0].text`. The old gateway always sent 'Periksa rutin'; a reason the HIS did
    not give is not invented."""

    @property
    def requester_ref(self) -> str | None:
        """Who ordered the exam (`ServiceRequest.requester`)."""
        return self.requester_reference

    @property
    def requester_name(self) -> str | None:
        return self.requester_display

    @property
    def order_performer_ref(self) -> str | None:
        """Who performs the exam (`ServiceRequest.performer`), if known."""
        return self.performer_reference

    @property
    def order_performer_name(self) -> str | None:
        return self.performer_display


class ReadingFields(ExamFields):
    """The radiologist's reading (Observation)."""

    performer_id: FhirId
    """The radiologist's IHS number: performer of the Observation and the DiagnosticReport."""
    performer_display: NonEmptyText | None = None
    performer_value: NonEmptyText
    """The reading text (`Observation.valueString`)."""


class ConclusionFields(GatewayInput):
    conclusion_text: NonEmptyText
    """`DiagnosticReport.conclusion`. Required: SATUSEHAT rule 10074 wants conclusion or conclusionCode, and
    the input has no coded conclusion (the old gateway sent an empty string, which is not valid FHIR)."""


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


class EncounterInput(IdentifierFields, SubjectFields, AttenderFields, PeriodFields, LocationFields):
    """POST /encounter. Required: identifier_value, subject (id or reference), individual (id or reference),
    period_start. The Encounter is registered as `arrived`, ambulatory."""

    identifier_value: IdentifierValue
    """The visit/registration number: the Encounter is found again by it, so it cannot be derived."""


class ServiceRequestInput(IdentifierFields, SubjectFields, StartFields, OrderFields):
    """POST /service-req. Required: noacsn, subject_id, encounter_id, period_start, requester_reference.
    identifier_value is optional: absent, the order's identifier value is the ACSN."""

    encounter_id: FhirId
    requester_reference: AgentReference
    """Required (SATUSEHAT rule 10376); batches fall back to the encounter's practitioner instead."""


class Batch1Input(EncounterInput, OrderFields):
    """POST /batch1: Encounter + ServiceRequest. `requester_reference` defaults to the encounter's attending
    practitioner (the clinician who sees the patient orders the exam)."""

    @property
    def requester_ref(self) -> str | None:
        return self.requester_reference or self.attender_ref

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


class DiagnosticReportInput(IdentifierFields, SubjectFields, StartFields, ExamFields, ConclusionFields):
    """POST /conclusion. Required: subject_id, encounter_id, period_start, performer_id, imaging_study_id,
    observation_id, service_request_id, conclusion_text, and identifier_value or noacsn."""

    one_of_required = (("noacsn", "identifier_value"),)

    encounter_id: FhirId
    performer_id: FhirId
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
        return self.performer_reference or f"Practitioner/{self.performer_id}"


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
