"""SATUSEHAT's validation, applied from the rule catalogue (simulator/catalogue.py) to every resource type.

`check()` is the whole validation of a posted resource: the catalogue's required elements, FHIR structure
(fhir.resources), identifiers, dates, codes (simulator/terminology), references (the registry for Patient,
Practitioner, Location and Organization; the store for the rest) and subject consistency. Each violation names
its catalogue row, so the answer carries the row's RuleNumber, issue code and the element's path.

This module must not import the gateway: the simulator judges the gateway's builders, it must not mirror them.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from simulator import terminology
from simulator.catalogue import Rule, rule
from simulator.registry import KINDS as REGISTRY_KINDS
from simulator.registry import Registry

__all__ = ["Rule", "Violation", "check"]

SYS_IDS = "http://sys-ids.kemkes.go.id/"
EARLIEST_DATE = dt.date(2014, 6, 3)
"""'Standar format pengiriman Tanggal tidak bisa kurang dari 03 Juni 2014' (ImagingStudy / ServiceRequest docs)."""

SUPPORTED_TYPES = ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport")
REFERENCEABLE_TYPES = frozenset(SUPPORTED_TYPES)

# The dateTime forms the docs allow: YYYY, YYYY-MM, YYYY-MM-DD, YYYY-MM-DDThh:mm:ss+zz:zz.
_DATETIME_FORM = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d+)?[+-]\d{2}:\d{2})?)?)?$")
_DATE_KEYS = frozenset({"start", "end", "occurrenceDateTime", "authoredOn", "effectiveDateTime", "issued", "started"})
_REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")

# Request-level rows, by the names the platform and the HTTP app use.
DUPLICATE = rule("request.duplicate")
UNREADABLE_JSON = rule("request.unreadable")
INVALID_PAYLOAD = rule("request.invalid_json")
NOT_FHIR = rule("request.not_fhir")
NOT_FOUND = rule("any.reference.not_found")
ID_REQUIRED = rule("request.id_required")
ID_MISMATCH = rule("request.id_mismatch")
INVALID_TOKEN = rule("request.token")
UNSUPPORTED_TYPE = rule("request.unsupported")


@dataclass(frozen=True)
class Violation:
    rule: Rule
    expression: str
    text: str

    def issue(self) -> dict[str, Any]:
        number = f" (RuleNumber: {self.rule.number})" if self.rule.number is not None else ""
        return {
            "severity": "error",
            "code": self.rule.code,
            "details": {"text": f"{self.text}{number}"},
            "expression": [self.expression],
        }


def violation(key: str, expression: str, **fields: str) -> Violation:
    row = rule(key)
    return Violation(row, expression, row.text.format(**fields) if fields else row.text)


@dataclass(frozen=True)
class Context:
    """What validation needs besides the resource: the client's org, the clock, the registry and the store."""

    org_id: str
    now: dt.datetime
    clock_skew_s: float
    registry: Registry
    read: Callable[[str, str], dict[str, Any] | None]
    strict_undocumented: bool = False


# Required elements per resource: (catalogue key, path). `x[]` = in every item of x if present; `x[+]` = x must
# have at least one item, and every item the rest of the path.
_REQUIRED: dict[str, tuple[tuple[str, str], ...]] = {
    "Encounter": (
        ("encounter.subject", "subject"),
        ("encounter.participant", "participant[+].individual"),
        ("encounter.location", "location[].location"),
        ("encounter.period", "period"),
        ("encounter.period.start", "period.start"),
        ("encounter.statusHistory", "statusHistory"),
        ("encounter.serviceProvider", "serviceProvider"),
    ),
    "ServiceRequest": (
        ("servicerequest.status.required", "status"),
        ("servicerequest.subject", "subject"),
        ("servicerequest.encounter", "encounter"),
        ("servicerequest.requester", "requester"),
        ("servicerequest.performer", "performer"),
        ("servicerequest.code.required", "code"),
    ),
    "ImagingStudy": (
        ("imagingstudy.status", "status"),
        ("imagingstudy.modality", "modality"),
        ("imagingstudy.subject", "subject"),
        ("imagingstudy.basedOn", "basedOn"),
    ),
    "Observation": (
        ("observation.status.required", "status"),
        ("observation.category.required", "category"),
        ("observation.subject", "subject"),
        ("observation.encounter", "encounter"),
    ),
    "DiagnosticReport": (
        ("diagnosticreport.subject", "subject"),
        ("diagnosticreport.encounter", "encounter"),
        ("diagnosticreport.issued.required", "issued"),
        ("diagnosticreport.result", "result"),
        ("diagnosticreport.basedOn", "basedOn"),
    ),
}

# A Practitioner among the performers (an Organization alone does not do).
_PRACTITIONER_PERFORMER = {"Observation": "observation.performer", "DiagnosticReport": "diagnosticreport.performer"}

# Elements whose codes have their own rule (the allowed systems, when the rule restricts them).
_CODED: dict[str, tuple[tuple[str, str, frozenset[str] | None], ...]] = {
    "ServiceRequest": (
        ("code", "servicerequest.code", frozenset({
            "http://loinc.org", "http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-9-cm",
            "http://terminology.kemkes.go.id/CodeSystem/examination",
            "http://terminology.kemkes.go.id/CodeSystem/kptl",
        })),
        ("bodySite[]", "servicerequest.bodySite", frozenset({"http://snomed.info/sct"})),
        ("orderDetail[]", "servicerequest.orderDetail", frozenset({
            "http://dicom.nema.org/resources/ontology/DCM", SYS_IDS + "ae-title", "http://snomed.info/sct",
        })),
    ),
    "Observation": (
        ("category[]", "observation.category", frozenset({
            "http://terminology.hl7.org/CodeSystem/observation-category",
        })),
        ("code", "observation.code", frozenset({
            "http://loinc.org", "http://snomed.info/sct", "http://terminology.kemkes.go.id/CodeSystem/examination",
        })),
        ("bodySite", "observation.bodySite", frozenset({"http://snomed.info/sct"})),
    ),
    "DiagnosticReport": (
        ("code", "diagnosticreport.code", frozenset({
            "http://loinc.org", "http://terminology.kemkes.go.id/CodeSystem/examination",
        })),
        ("category[]", "diagnosticreport.category", frozenset({"http://terminology.hl7.org/CodeSystem/v2-0074"})),
        ("conclusionCode[]", "diagnosticreport.conclusionCode", frozenset({
            "http://loinc.org", "http://snomed.info/sct",
            "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            "http://terminology.kemkes.go.id/CodeSystem/examination",
        })),
    ),
}  # fmt: skip

# Status value sets (FHIR R4) and the rule an unknown value gets (None: 'Code not found', no number).
_STATUSES: dict[str, tuple[frozenset[str], str]] = {
    "Encounter": (
        frozenset({"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled",
                   "entered-in-error", "unknown"}),
        "any.code.unknown",
    ),
    "ServiceRequest": (
        frozenset({"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}),
        "servicerequest.status",
    ),
    "ImagingStudy": (
        frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"}),
        "any.code.unknown",
    ),
    "Observation": (
        frozenset({"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error",
                   "unknown"}),
        "observation.status",
    ),
    "DiagnosticReport": (
        frozenset({"registered", "partial", "preliminary", "final", "amended", "corrected", "appended", "cancelled",
                   "entered-in-error", "unknown"}),
        "diagnosticreport.status",
    ),
}  # fmt: skip
_INTENTS = frozenset(
    {"proposal", "plan", "directive", "order", "original-order", "reflex-order", "filler-order", "instance-order",
     "option"}
)  # fmt: skip

# Per-element date rules; other dateTimes get the generic 'Invalid date time format'.
_DATE_RULES = {
    "Encounter.period.end": "encounter.period.end",
    "ServiceRequest.occurrenceDateTime": "servicerequest.occurrenceDateTime",
    "ServiceRequest.authoredOn": "servicerequest.authoredOn",
    "ImagingStudy.started": "imagingstudy.started",
    "Observation.effectiveDateTime": "observation.effectiveDateTime",
    "Observation.issued": "observation.issued",
    "DiagnosticReport.issued": "diagnosticreport.issued",
    "DiagnosticReport.effectiveDateTime": "diagnosticreport.effectiveDateTime",
}

# The identifier system each resource's own identifier uses (the org id is filled in), and its rule.
_OWN_SYSTEM = {
    "Encounter": ("encounter/{org}", "encounter.identifier.org"),
    "ServiceRequest": ("servicerequest/{org}", "servicerequest.identifier"),
    "Observation": ("observation/{org}", "observation.identifier"),
}
_ORG_SCOPED = frozenset({"encounter", "servicerequest", "acsn", "observation", "diagnostic", "mrn"})

# Whose subject must agree with whose: (element holding the reference, referenced type).
_SUBJECT_LINKS = {
    "ServiceRequest": (("encounter", "Encounter"),),
    "Observation": (("encounter", "Encounter"), ("basedOn[]", "ServiceRequest")),
    "DiagnosticReport": (("encounter", "Encounter"), ("basedOn[]", "ServiceRequest")),
}


# --- the entry point ---------------------------------------------------------------------------------------


def check(resource_type: str, resource: dict[str, Any], context: Context) -> list[Violation]:
    """Every catalogue rule the resource breaks (empty: accepted)."""
    found = _check_required(resource_type, resource) + _check_empty_text(resource_type, resource)
    found += _check_date_forms(resource_type, resource)
    covered = {v.expression for v in found}
    structure = [
        v
        for v in check_structure(resource_type, resource)
        if not any(v.expression == path or v.expression.startswith(path + ".") for path in covered)
    ]
    if structure:  # the remaining rules assume a well-formed resource
        return _enforced(found + structure, context)
    found += _check_status(resource_type, resource)
    found += _check_identifiers(resource_type, resource, context.org_id)
    found += _check_dates(resource_type, resource, context.now, context.clock_skew_s)
    found += _check_codes(resource_type, resource)
    found += _check_references(resource_type, resource, context)
    if not any(v.rule.key == NOT_FOUND.key for v in found):
        found += _check_subjects(resource_type, resource, context)
    return _enforced(found, context)


def _enforced(found: list[Violation], context: Context) -> list[Violation]:
    return [v for v in found if v.rule.enforced(context.strict_undocumented)]


def check_structure(resource_type: str, resource: dict[str, Any]) -> list[Violation]:
    """FHIR R4 structure, by fhir.resources: unknown elements, wrong types, malformed primitives."""
    try:
        get_fhir_model_class(resource_type).model_validate(resource)
    except ValidationError as error:
        violations = []
        for item in error.errors():
            path = _fhirpath(resource_type, item["loc"])
            violations.append(violation("request.not_fhir", path, detail=f"{path}: {item['msg']}"))
        return violations
    return []


# --- required elements -------------------------------------------------------------------------------------


def _check_required(resource_type: str, resource: dict[str, Any]) -> list[Violation]:
    found = []
    for key, path in _REQUIRED.get(resource_type, ()):
        found += [violation(key, where) for where in _missing(resource, path.split("."), resource_type)]
    if resource_type == "Encounter" and resource.get("status") == "finished":
        period = resource.get("period") or {}
        if isinstance(period, dict) and period.get("start") and not period.get("end"):
            found.append(violation("encounter.period.finished", "Encounter.period.end"))
    performer_rule = _PRACTITIONER_PERFORMER.get(resource_type)
    if performer_rule is not None:
        performers = resource.get("performer") or []
        items = performers if isinstance(performers, list) else []
        references = [p.get("reference") for p in items if isinstance(p, dict)]
        if not any(isinstance(r, str) and r.startswith("Practitioner/") for r in references):
            found.append(violation(performer_rule, f"{resource_type}.performer"))
    return found


def _missing(node: Any, parts: list[str], where: str) -> Iterator[str]:
    """Paths along `parts` whose value is absent or empty."""
    if not parts:
        return
    head, rest = parts[0], parts[1:]
    per_item, at_least_one = head.endswith("[]"), head.endswith("[+]")
    key = head.removesuffix("[]").removesuffix("[+]")
    value = node.get(key) if isinstance(node, dict) else None
    if per_item or at_least_one:
        if at_least_one and not value:
            yield f"{where}.{key}"
            return
        for index, item in enumerate(value if isinstance(value, list) else []):
            yield from _missing(item, rest, f"{where}.{key}[{index}]")
        return
    if value in (None, [], {}):
        yield f"{where}.{key}"
        return
    yield from _missing(value, rest, f"{where}.{key}")


def _check_empty_text(resource_type: str, resource: dict[str, Any]) -> list[Violation]:
    """A string element sent empty (or only whitespace): 'Text is empty'."""
    return [
        violation("any.text.empty", path)
        for path, value in _walk(resource, resource_type)
        if isinstance(value, str) and not value.strip()
    ]


# --- statuses, identifiers, dates, codes ---------------------------------------------------------------------


def _check_status(resource_type: str, resource: dict[str, Any]) -> list[Violation]:
    found = []
    status = resource.get("status")
    allowed, key = _STATUSES.get(resource_type, (None, ""))
    if allowed is not None and isinstance(status, str) and status not in allowed:
        found.append(violation(key, f"{resource_type}.status", detail=f"status '{status}'"))
    intent = resource.get("intent")
    if resource_type == "ServiceRequest" and isinstance(intent, str) and intent not in _INTENTS:
        found.append(violation("servicerequest.intent", "ServiceRequest.intent", detail=f"intent '{intent}'"))
    return found


def _check_identifiers(resource_type: str, resource: dict[str, Any], org_id: str) -> list[Violation]:
    found = []
    identifiers = [i for i in resource.get("identifier") or [] if isinstance(i, dict)]
    systems = {i.get("system") for i in identifiers}
    wrong_org_key = _OWN_SYSTEM.get(resource_type, ("", "encounter.identifier.org"))[1]
    if resource_type == "DiagnosticReport":
        wrong_org_key = "diagnosticreport.identifier"
    for index, ident in enumerate(identifiers):
        system = ident.get("system") or ""
        if not system.startswith(SYS_IDS):
            continue
        segments = system.removeprefix(SYS_IDS).split("/")
        if segments[0] in _ORG_SCOPED and (len(segments) < 2 or segments[1] != org_id):
            found.append(
                violation(wrong_org_key, f"{resource_type}.identifier[{index}].system", system=system, org=org_id)
            )
    own = lambda pattern: SYS_IDS + pattern.format(org=org_id)  # noqa: E731
    if resource_type == "Encounter" and own("encounter/{org}") not in systems:
        found.append(violation("encounter.identifier", "Encounter.identifier"))
    if resource_type == "ImagingStudy" and own("acsn/{org}") not in systems:
        found.append(violation("imagingstudy.identifier", "ImagingStudy.identifier"))
    if resource_type == "ServiceRequest" and own("servicerequest/{org}") not in systems:
        found.append(violation("servicerequest.identifier.own", "ServiceRequest.identifier", org=org_id))
    if resource_type == "DiagnosticReport" and not systems & {own("diagnostic/{org}/rad"), own("diagnostic/{org}/lab")}:
        found.append(violation("diagnosticreport.identifier", "DiagnosticReport.identifier", org=org_id))
    return found


def _dates(resource_type: str, resource: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for path, value in _walk(resource, resource_type):
        key = path.rsplit(".", 1)[-1]
        if key in _DATE_KEYS and isinstance(value, str) and ".meta." not in path and value.strip():
            yield path, value


def _check_date_forms(resource_type: str, resource: dict[str, Any]) -> list[Violation]:
    """Before the structure check: a malformed date gets the platform's date rule, not 'Failed to unmarshal'."""
    found = []
    for path, value in _dates(resource_type, resource):
        if not _DATETIME_FORM.match(value):
            row = _DATE_RULES.get(re.sub(r"\[\d+\]", "", path), "any.datetime.format")
            found.append(violation(row, path, path=path, value=value))
    return found


def _check_dates(resource_type: str, resource: dict[str, Any], now: dt.datetime, skew_s: float) -> list[Violation]:
    found = []
    latest = now + dt.timedelta(seconds=skew_s)
    for path, value in _dates(resource_type, resource):
        if not _DATETIME_FORM.match(value):
            continue  # refused by _check_date_forms
        earliest_moment, latest_moment = _bounds(value)
        if latest_moment.date() < EARLIEST_DATE:
            found.append(violation("any.datetime.early", path, path=path))
        elif earliest_moment > latest:
            found.append(violation("any.datetime.future", path, path=path))
    for path, period in _periods(resource, resource_type):
        start, end = period.get("start"), period.get("end")
        if not (isinstance(start, str) and isinstance(end, str)):
            continue
        if not (_DATETIME_FORM.match(start) and _DATETIME_FORM.match(end)):
            continue
        if _bounds(end)[1] <= _bounds(start)[0]:
            if path == "Encounter.period":
                found.append(violation("encounter.period.end", f"{path}.end", value=end))
            else:
                found.append(violation("any.period.order", f"{path}.end", path=path))
    return found


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
    """Per-element code-system rules, then every coding of a checked system must carry a known code."""
    found = []
    ruled: dict[str, str] = {}  # coding path -> the element rule that covers it
    for element, key, allowed in _CODED.get(resource_type, ()):
        for where, concept in _concepts(resource, element, resource_type):
            codings = [c for c in (concept or {}).get("coding", []) if isinstance(c, dict)]
            for index, _coding in enumerate(codings):
                ruled[f"{where}.coding[{index}]"] = key
            used = {c.get("system") for c in codings}
            if allowed is not None and codings and not used & allowed:
                found.append(violation(key, f"{where}.coding", detail=f"system {', '.join(sorted(map(str, used)))}"))
    for path, value in _walk(resource, resource_type):
        if not (isinstance(value, dict) and isinstance(value.get("system"), str) and "code" in value):
            continue
        system, code = value["system"], value.get("code")
        if terminology.is_checked(system) and not (isinstance(code, str) and terminology.knows(system, code)):
            key = ruled.get(path, "any.code.unknown")
            found.append(violation(key, f"{path}.code", detail=f"{system}|{code}"))
    return found


def _concepts(resource: dict[str, Any], element: str, where: str) -> Iterator[tuple[str, Any]]:
    key = element.removesuffix("[]")
    value = resource.get(key)
    if element.endswith("[]"):
        for index, item in enumerate(value if isinstance(value, list) else []):
            yield f"{where}.{key}[{index}]", item
    elif isinstance(value, dict):
        yield f"{where}.{key}", value


# --- references ----------------------------------------------------------------------------------------------


def _check_references(resource_type: str, resource: dict[str, Any], context: Context) -> list[Violation]:
    """Every reference names something that exists: the registry's people/places/orgs, the store's resources."""
    found = []
    for path, value in _walk(resource, resource_type):
        if not path.endswith(".reference") or not isinstance(value, str):
            continue
        if ".contained[" in path or value.startswith(("#", "urn:uuid:")):
            continue  # contained and Bundle-internal references are resolved elsewhere (or not at all here)
        match = _REFERENCE.match(value)
        kind, ident = (match.group(1), match.group(2)) if match else ("", "")
        if kind == "Organization" and match and ident != context.org_id:
            found.append(violation("any.reference.foreign_org", path, reference=value))
        elif not _resolves(kind, ident, context):
            found.append(violation("any.reference.not_found", path, reference=value))
    return found


def _resolves(kind: str, ident: str, context: Context) -> bool:
    if kind in REGISTRY_KINDS:
        return context.registry.has(kind, ident)
    return kind in REFERENCEABLE_TYPES and context.read(kind, ident) is not None


def _check_subjects(resource_type: str, resource: dict[str, Any], context: Context) -> list[Violation]:
    """The subject agrees with the subject of the Encounter / ServiceRequest the resource is part of."""
    subject = (resource.get("subject") or {}).get("reference")
    if not isinstance(subject, str):
        return []
    found = []
    for element, kind in _SUBJECT_LINKS.get(resource_type, ()):
        key = element.removesuffix("[]")
        links = resource.get(key)
        for link in links if isinstance(links, list) else [links]:
            reference = (link or {}).get("reference") if isinstance(link, dict) else None
            match = _REFERENCE.match(reference) if isinstance(reference, str) else None
            if not match or match.group(1) != kind:
                continue
            other = context.read(kind, match.group(2))
            other_subject = ((other or {}).get("subject") or {}).get("reference")
            if isinstance(other_subject, str) and other_subject != subject:
                found.append(
                    violation(
                        "any.subject.mismatch",
                        f"{resource_type}.subject",
                        path=f"{resource_type}.subject",
                        subject=subject,
                        other=reference,
                        other_subject=other_subject,
                    )
                )
    return found


# --- helpers -------------------------------------------------------------------------------------------------


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
            yield child, value
            yield from _walk(value, child)


def _fhirpath(resource_type: str, loc: tuple[Any, ...]) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "__root__":
            path += f".{part}"
    return path
