"""SATUSEHAT's validation rules for the five radiology resources, as a table the simulator applies.

Where the research (shared/research/satusehat.md, from the platform's "kamus validasi" as catalogued by
ivanwilliammd/satusehat-integration and the platform docs) gives a rule number, the simulator answers with that
number. Where it found none, the rule carries a simulator-local number in the 19xxx range, which the platform's
catalogue does not use (10xxx are payload rules, 20xxx platform rules); those are marked `local=True` below.

This module must not import the gateway: the simulator judges the gateway's builders, it must not mirror them.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

SYS_IDS = "http://sys-ids.kemkes.go.id/"
EARLIEST_DATE = dt.date(2014, 6, 3)
"""'Standar format pengiriman Tanggal tidak bisa kurang dari 03 Juni 2014' (ImagingStudy / ServiceRequest docs)."""

SUPPORTED_TYPES = ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport")
REFERENCEABLE_TYPES = frozenset(SUPPORTED_TYPES)

# The dateTime forms the docs allow: YYYY, YYYY-MM, YYYY-MM-DD, YYYY-MM-DDThh:mm:ss+zz:zz.
_DATETIME_FORM = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2})?)?)?$")
_DATE_KEYS = frozenset({"start", "end", "occurrenceDateTime", "authoredOn", "effectiveDateTime", "issued", "started"})


@dataclass(frozen=True)
class Rule:
    """One rule: its number, what it says, and the OperationOutcome issue code it is reported under."""

    number: int
    text: str
    code: str = "value"
    local: bool = False


@dataclass(frozen=True)
class Violation:
    rule: Rule
    expression: str
    text: str

    def issue(self) -> dict[str, Any]:
        return {
            "severity": "error",
            "code": self.rule.code,
            "details": {"text": f"{self.text} (RuleNumber: {self.rule.number})"},
            "expression": [self.expression],
        }


# --- the table ---------------------------------------------------------------------------------------------

WRONG_ORG = Rule(10117, "Wrong organization ID provided by system URL: {system}")
ENCOUNTER_IDENTIFIER = Rule(10117, "Encounter.identifier with system encounter/{org} is required", code="required")
ENCOUNTER_SUBJECT = Rule(10118, "Encounter.subject is required", code="required")
ENCOUNTER_PARTICIPANT = Rule(10119, "Encounter.participant.individual is required", code="required")
ENCOUNTER_LOCATION = Rule(10120, "Encounter.location.location is required", code="required")
ENCOUNTER_PERIOD = Rule(10121, "Encounter.period is required (start and end when finished)", code="required")
ENCOUNTER_STATUS_HISTORY = Rule(10122, "Encounter.statusHistory is required", code="required")
ENCOUNTER_PERIOD_START = Rule(10123, "Encounter.period.start is required", code="required")
ENCOUNTER_SERVICE_PROVIDER = Rule(10124, "Encounter.serviceProvider is required", code="required")
ENCOUNTER_PERIOD_ORDER = Rule(10173, "Encounter.period.end must be later than Encounter.period.start")

SR_CODE_SYSTEM = Rule(10060, "ServiceRequest.code must use ICD-9-CM, LOINC, SNOMED CT or a Kemkes code system")
SR_ENCOUNTER = Rule(10141, "ServiceRequest.encounter is required", code="required")
SR_REQUESTER = Rule(10376, "ServiceRequest.requester is required", code="required")
SR_ORDER_DETAIL_SYSTEM = Rule(10427, "ServiceRequest.orderDetail must use DICOM (DCM), ae-title or SNOMED CT codes")

IS_IDENTIFIER = Rule(10150, "ImagingStudy.identifier with system acsn/{org} is required", code="required")
IS_STATUS = Rule(10151, "ImagingStudy.status is required", code="required")
IS_MODALITY = Rule(10152, "ImagingStudy.modality is required", code="required")
IS_SUBJECT = Rule(10153, "ImagingStudy.subject is required", code="required")
IS_BASED_ON = Rule(10154, "ImagingStudy.basedOn is required", code="required")

DR_CODE_SYSTEM = Rule(10071, "DiagnosticReport.code must use LOINC or a Kemkes examination code")
DR_CATEGORY = Rule(10073, "DiagnosticReport.category must carry a v2-0074 diagnostic service section (RAD)")
DR_CONCLUSION = Rule(10074, "DiagnosticReport.conclusion or conclusionCode is required", code="required")
DR_ENCOUNTER = Rule(10144, "DiagnosticReport.encounter is required", code="required")
DR_ISSUED = Rule(10379, "DiagnosticReport.issued is required", code="required")
DR_PERFORMER = Rule(10384, "DiagnosticReport.performer is required", code="required")
DR_RESULT = Rule(10385, "DiagnosticReport.result is required", code="required")
DR_BASED_ON = Rule(10387, "DiagnosticReport.basedOn is required", code="required")
DR_IDENTIFIER_SYSTEM = Rule(10432, "DiagnosticReport.identifier system must be diagnostic/{org}/rad or /lab")

DUPLICATE = Rule(20002, "Found duplicate resource: {resource}", code="duplicate")
UNREADABLE_JSON = Rule(20005, "Request body is not readable JSON", code="invalid")
INVALID_PAYLOAD = Rule(20006, "Request body is not a {resource} resource", code="invalid")
NOT_FOUND = Rule(20007, "Resource not found {reference}", code="not-found")
NOT_FHIR = Rule(20008, "Invalid FHIR value: {detail}", code="structure")

# Rules the research names without a number: simulator-local numbers.
REQUIRED_ELEMENT = Rule(19001, "{path} is required", code="required", local=True)
INVALID_STATUS = Rule(19003, "{path} '{value}' is not a valid status for {resource}", code="code-invalid", local=True)
IDENTIFIER_SYSTEM = Rule(19004, "{resource}.identifier with system {system} is required", code="required", local=True)
DATETIME_FORM = Rule(
    19010, "{path} must be YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+zz:zz, got '{value}'", local=True
)
DATE_TOO_EARLY = Rule(19011, "{path} must not be earlier than 2014-06-03", local=True)
DATE_IN_FUTURE = Rule(19012, "{path} must not be in the future", local=True)
PERIOD_ORDER = Rule(19013, "{path}.end must be later than {path}.start", local=True)
FOREIGN_ORGANIZATION = Rule(
    19020,
    "resource cannot be accessed due to business rule: {reference} is not this client's organization",
    code="forbidden",
    local=True,
)
OBSERVATION_CATEGORY = Rule(19040, "Observation.category must use the observation-category code system", local=True)
ID_REQUIRED = Rule(19050, "id is required", local=True)
ID_MISMATCH = Rule(19051, "id in the body ({body_id}) differs from the id in the URL ({url_id})", local=True)
INVALID_TOKEN = Rule(19060, "Access token is invalid or expired", code="invalid-access-token", local=True)
UNSUPPORTED_TYPE = Rule(19070, "Resource type {resource} is not supported here", code="not-supported", local=True)

STATUSES: dict[str, frozenset[str]] = {
    "Encounter": frozenset(
        {
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    "ServiceRequest": frozenset({"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}),
    "ImagingStudy": frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"}),
    "Observation": frozenset(
        {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
    ),
    "DiagnosticReport": frozenset(
        {
            "registered",
            "partial",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "appended",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
}

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
SR_CODE_SYSTEMS = frozenset(
    {
        LOINC,
        SNOMED,
        "http://hl7.org/fhir/sid/icd-9-cm",
        "http://terminology.kemkes.go.id/CodeSystem/kptl",
        "http://terminology.kemkes.go.id/CodeSystem/examination",
    }
)
DR_CODE_SYSTEMS = frozenset({LOINC, "http://terminology.kemkes.go.id/CodeSystem/examination"})
ORDER_DETAIL_SYSTEMS = frozenset({"http://dicom.nema.org/resources/ontology/DCM", SYS_IDS + "ae-title", SNOMED})
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"

# Which identifier system each resource must carry (the org id is filled in).
_REQUIRED_IDENTIFIER: dict[str, tuple[str, Rule]] = {
    "Encounter": ("encounter/{org}", ENCOUNTER_IDENTIFIER),
    "ServiceRequest": ("servicerequest/{org}", IDENTIFIER_SYSTEM),
    "ImagingStudy": ("acsn/{org}", IS_IDENTIFIER),
    "Observation": ("observation/{org}", IDENTIFIER_SYSTEM),
}

# Required elements per resource: (dotted path, rule). A path with [] means "in every item of that list".
_REQUIRED: dict[str, tuple[tuple[str, Rule], ...]] = {
    "Encounter": (
        ("status", REQUIRED_ELEMENT),
        ("class", REQUIRED_ELEMENT),
        ("subject", ENCOUNTER_SUBJECT),
        ("participant[].individual", ENCOUNTER_PARTICIPANT),
        ("location[].location", ENCOUNTER_LOCATION),
        ("period", ENCOUNTER_PERIOD),
        ("period.start", ENCOUNTER_PERIOD_START),
        ("statusHistory", ENCOUNTER_STATUS_HISTORY),
        ("serviceProvider", ENCOUNTER_SERVICE_PROVIDER),
    ),
    "ServiceRequest": (
        ("status", REQUIRED_ELEMENT),
        ("intent", REQUIRED_ELEMENT),
        ("code", REQUIRED_ELEMENT),
        ("subject", REQUIRED_ELEMENT),
        ("encounter", SR_ENCOUNTER),
        ("requester", SR_REQUESTER),
    ),
    "ImagingStudy": (
        ("status", IS_STATUS),
        ("modality", IS_MODALITY),
        ("subject", IS_SUBJECT),
        ("basedOn", IS_BASED_ON),
    ),
    "Observation": (
        ("status", REQUIRED_ELEMENT),
        ("category", REQUIRED_ELEMENT),
        ("code", REQUIRED_ELEMENT),
        ("subject", REQUIRED_ELEMENT),
        ("encounter", REQUIRED_ELEMENT),
    ),
    "DiagnosticReport": (
        ("identifier", DR_IDENTIFIER_SYSTEM),
        ("status", REQUIRED_ELEMENT),
        ("category", DR_CATEGORY),
        ("code", REQUIRED_ELEMENT),
        ("subject", REQUIRED_ELEMENT),
        ("encounter", DR_ENCOUNTER),
        ("issued", DR_ISSUED),
        ("performer", DR_PERFORMER),
        ("result", DR_RESULT),
        ("basedOn", DR_BASED_ON),
    ),
}


# --- checks ------------------------------------------------------------------------------------------------


def check_structure(resource_type: str, resource: dict[str, Any]) -> list[Violation]:
    """FHIR R4 structure, by fhir.resources: unknown elements, wrong types, malformed primitives."""
    try:
        get_fhir_model_class(resource_type).model_validate(resource)
    except ValidationError as error:
        violations = []
        for item in error.errors():
            path = _fhirpath(resource_type, item["loc"])
            detail = f"{path}: {item['msg']}"
            violations.append(Violation(NOT_FHIR, path, NOT_FHIR.text.format(detail=detail)))
        return violations
    return []


def check_rules(
    resource_type: str, resource: dict[str, Any], org_id: str, now: dt.datetime, clock_skew_s: float
) -> list[Violation]:
    """SATUSEHAT's business rules that fhir.resources knows nothing of (no I/O: references are checked apart)."""
    violations: list[Violation] = []
    violations += _check_required(resource_type, resource)
    violations += _check_status(resource_type, resource)
    violations += _check_identifiers(resource_type, resource, org_id)
    violations += _check_dates(resource_type, resource, now, clock_skew_s)
    violations += _check_codes(resource_type, resource)
    violations += _check_organizations(resource_type, resource, org_id)
    return violations


def local_references(resource_type: str, resource: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(path, referenced type, id) for every reference to a resource kind this platform stores."""
    for path, value in _walk(resource, resource_type):
        if path.endswith(".reference") and isinstance(value, str) and "/" in value:
            kind, _, ident = value.partition("/")
            if kind in REFERENCEABLE_TYPES:
                yield path, kind, ident


def _check_required(resource_type: str, resource: dict[str, Any]) -> list[Violation]:
    violations = []
    for path, rule in _REQUIRED.get(resource_type, ()):
        for where in _missing(resource, path.split("."), resource_type):
            text = rule.text.format(path=where) if "{path}" in rule.text else rule.text
            violations.append(Violation(rule, where, text))
    if resource_type == "Encounter" and resource.get("status") == "finished":
        period = resource.get("period") or {}
        if not period.get("end"):
            violations.append(Violation(ENCOUNTER_PERIOD, "Encounter.period.end", ENCOUNTER_PERIOD.text))
    if resource_type == "DiagnosticReport" and not resource.get("conclusion") and not resource.get("conclusionCode"):
        violations.append(Violation(DR_CONCLUSION, "DiagnosticReport.conclusion", DR_CONCLUSION.text))
    return violations


def _missing(node: Any, parts: list[str], where: str) -> Iterator[str]:
    """Paths along `parts` whose value is absent or empty."""
    if not parts:
        return
    head, rest = parts[0], parts[1:]
    in_every_item = head.endswith("[]")
    key = head.removesuffix("[]")
    value = node.get(key) if isinstance(node, dict) else None
    if in_every_item:
        for index, item in enumerate(value or []):  # an absent list is fine: the rule is per item
            yield from _missing(item, rest, f"{where}.{key}[{index}]")
        return
    if value in (None, "", [], {}):
        yield f"{where}.{key}"
        return
    yield from _missing(value, rest, f"{where}.{key}")


def _check_status(resource_type: str, resource: dict[str, Any]) -> list[Violation]:
    status = resource.get("status")
    allowed = STATUSES.get(resource_type)
    if status is None or allowed is None or status in allowed:
        return []
    path = f"{resource_type}.status"
    return [
        Violation(INVALID_STATUS, path, INVALID_STATUS.text.format(path=path, value=status, resource=resource_type))
    ]


def _check_identifiers(resource_type: str, resource: dict[str, Any], org_id: str) -> list[Violation]:
    violations = []
    identifiers = resource.get("identifier") or []
    for index, ident in enumerate(identifiers):
        system = ident.get("system", "") if isinstance(ident, dict) else ""
        if not system.startswith(SYS_IDS):
            continue
        segments = system.removeprefix(SYS_IDS).split("/")
        if segments[0] in {"encounter", "servicerequest", "acsn", "observation", "diagnostic", "mrn"} and (
            len(segments) < 2 or segments[1] != org_id
        ):
            path = f"{resource_type}.identifier[{index}].system"
            violations.append(Violation(WRONG_ORG, path, WRONG_ORG.text.format(system=system)))
    systems = {ident.get("system") for ident in identifiers if isinstance(ident, dict)}
    required = _REQUIRED_IDENTIFIER.get(resource_type)
    if required is not None:
        pattern, rule = required
        system = SYS_IDS + pattern.format(org=org_id)
        if system not in systems:
            text = rule.text.format(org=org_id, resource=resource_type, system=system)
            violations.append(Violation(rule, f"{resource_type}.identifier", text))
    if resource_type == "DiagnosticReport" and identifiers:
        allowed = {SYS_IDS + f"diagnostic/{org_id}/rad", SYS_IDS + f"diagnostic/{org_id}/lab"}
        if not systems & allowed:
            violations.append(Violation(DR_IDENTIFIER_SYSTEM, "DiagnosticReport.identifier", DR_IDENTIFIER_SYSTEM.text))
    return violations


def _check_dates(resource_type: str, resource: dict[str, Any], now: dt.datetime, skew_s: float) -> list[Violation]:
    violations = []
    latest = now + dt.timedelta(seconds=skew_s)
    for path, value in _walk(resource, resource_type):
        key = path.rsplit(".", 1)[-1]
        if key not in _DATE_KEYS or not isinstance(value, str) or ".meta." in path:
            continue
        if not _DATETIME_FORM.match(value):
            violations.append(Violation(DATETIME_FORM, path, DATETIME_FORM.text.format(path=path, value=value)))
            continue
        earliest_moment, latest_moment = _bounds(value)
        if latest_moment.date() < EARLIEST_DATE:
            violations.append(Violation(DATE_TOO_EARLY, path, DATE_TOO_EARLY.text.format(path=path)))
        elif earliest_moment > latest:
            violations.append(Violation(DATE_IN_FUTURE, path, DATE_IN_FUTURE.text.format(path=path)))
    for path, period in _periods(resource, resource_type):
        start, end = period.get("start"), period.get("end")
        if not (isinstance(start, str) and isinstance(end, str)):
            continue
        if not (_DATETIME_FORM.match(start) and _DATETIME_FORM.match(end)):
            continue
        if _bounds(end)[1] <= _bounds(start)[0]:
            rule = ENCOUNTER_PERIOD_ORDER if path == "Encounter.period" else PERIOD_ORDER
            violations.append(Violation(rule, f"{path}.end", rule.text.format(path=path)))
    return violations


def _bounds(value: str) -> tuple[dt.datetime, dt.datetime]:
    """The earliest and latest instant a (possibly partial) FHIR dateTime can mean."""
    if "T" in value:
        moment = dt.datetime.fromisoformat(value)
        return moment, moment
    parts = [int(p) for p in value.split("-")]
    year, month, day = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None
    # Dates without a zone: widen by a day each way, the zone is unknown.
    start = dt.datetime(year, month or 1, day or 1, tzinfo=dt.UTC) - dt.timedelta(days=1)
    if day is not None:
        end = dt.datetime(year, month or 1, day, tzinfo=dt.UTC) + dt.timedelta(days=2)
    elif month is not None:
        end = dt.datetime(year + (month // 12), month % 12 + 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=1)
    else:
        end = dt.datetime(year + 1, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=1)
    return start, end


def _periods(resource: dict[str, Any], resource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, value in _walk(resource, resource_type):
        if path.endswith("eriod") and isinstance(value, dict):
            yield path, value


def _check_codes(resource_type: str, resource: dict[str, Any]) -> list[Violation]:
    violations = []

    def systems(concept: Any) -> set[str]:
        return {c.get("system", "") for c in (concept or {}).get("coding", []) if isinstance(c, dict)}

    if resource_type == "ServiceRequest":
        code_systems = systems(resource.get("code"))
        if code_systems and not code_systems & SR_CODE_SYSTEMS:
            violations.append(Violation(SR_CODE_SYSTEM, "ServiceRequest.code.coding", SR_CODE_SYSTEM.text))
        for index, detail in enumerate(resource.get("orderDetail") or []):
            if systems(detail) - ORDER_DETAIL_SYSTEMS:
                path = f"ServiceRequest.orderDetail[{index}].coding"
                violations.append(Violation(SR_ORDER_DETAIL_SYSTEM, path, SR_ORDER_DETAIL_SYSTEM.text))
    if resource_type == "DiagnosticReport":
        code_systems = systems(resource.get("code"))
        if code_systems and not code_systems & DR_CODE_SYSTEMS:
            violations.append(Violation(DR_CODE_SYSTEM, "DiagnosticReport.code.coding", DR_CODE_SYSTEM.text))
        categories = resource.get("category") or []
        if categories and not any(V2_0074 in systems(c) for c in categories):
            violations.append(Violation(DR_CATEGORY, "DiagnosticReport.category", DR_CATEGORY.text))
    if resource_type == "Observation":
        categories = resource.get("category") or []
        if categories and not any(OBSERVATION_CATEGORY_SYSTEM in systems(c) for c in categories):
            violations.append(Violation(OBSERVATION_CATEGORY, "Observation.category", OBSERVATION_CATEGORY.text))
    return violations


def _check_organizations(resource_type: str, resource: dict[str, Any], org_id: str) -> list[Violation]:
    violations = []
    for path, value in _walk(resource, resource_type):
        is_organization = isinstance(value, str) and value.startswith("Organization/")
        if path.endswith(".reference") and is_organization and value != f"Organization/{org_id}":
            text = FOREIGN_ORGANIZATION.text.format(reference=value)
            violations.append(Violation(FOREIGN_ORGANIZATION, path, text))
    return violations


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every (FHIRPath-like path, value) in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}"
            yield child, value
            yield from _walk(value, child)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            child = f"{path}[{index}]"
            yield from _walk(value, child)


def _fhirpath(resource_type: str, loc: tuple[Any, ...]) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "__root__":
            path += f".{part}"
    return path
