"""Pure builders of the four FHIR R4 resources the gateway POSTs, shaped the way SATUSEHAT accepts them.

Each builder takes a validated input model, the organisation id (and the server ids of resources created
earlier in the flow) and returns a plain JSON dict: no I/O, no clock, no randomness, so the same input gives
the same resource and a re-run finds what the first run created by its identifier. Shapes follow the shared
research (satusehat.md §2) and the public SATUSEHAT examples; every builder validates its output with the
fhir.resources R4B model before returning, so a builder bug fails here and not as a 400 from the platform.

Every date-time goes out in UTC as `YYYY-MM-DDThh:mm:ss+00:00` (`models.timeutil.to_fhir_datetime`).

Identifier values: the order's ACSN, else the input's `identifier_value` (`resource_identifier_value`); the
ServiceRequest's own `servicerequest` identifier is the other way round, as the existing gateway sent it
(`service_request_identifier_value`); it is always found again by its ACSN identifier (`LOOKUP_IDENTIFIER`).

Nothing clinical is made up: the exam code comes from the input, the study's modality or the hospital's settings
(`resolve_exam`, refused when none applies); times come from the input, the PACS study or the flow's clock, which
the caller passes in (`SiteDefaults` and `StudyFacts` carry what the settings and the PACS say).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel, ConfigDict, ValidationError

from models.inputs import (
    DEFAULT_REASON_TEXT,
    ENCOUNTER_CLASSES,
    EXAM_DISPLAYS,
    Batch1Input,
    Batch2Input,
    Batch3Input,
    DiagnosticReportInput,
    EncounterInput,
    ObservationInput,
    ServiceRequestInput,
    acquisition_modalities,
    check_fhir_id,
)
from models.settings import Settings
from models.timeutil import require_aware, to_fhir_datetime

JsonObject = dict[str, Any]

# --- identifier systems ------------------------------------------------------------------------------------

SYS_IDS_BASE = "http://sys-ids.kemkes.go.id"
"""SATUSEHAT's namespace for business identifiers; every system below carries the organisation id."""


DICOM_UID_SYSTEM = "urn:dicom:uid"
"""The identifier system of an ImagingStudy's StudyInstanceUID (value `urn:oid:<UID>`), as the DICOM Router writes
it (research §3)."""


class IdentifierKind(StrEnum):
    """The identifier systems the radiology flow uses (satusehat.md §2, table of identifier systems)."""

    ENCOUNTER = "encounter"
    SERVICE_REQUEST = "servicerequest"
    ACSN = "acsn"
    """Accession number, on ServiceRequest and ImagingStudy; the DICOM Router searches by it."""
    OBSERVATION = "observation"
    DIAGNOSTIC_REPORT_RAD = "diagnostic-rad"
    """Radiology DiagnosticReport: `diagnostic/{org}/rad` (laboratory would be `/lab`; rule 10432)."""
    MRN = "mrn"
    """Medical record number of a contained Patient (the router's worklist service)."""


IDENTIFIER_SYSTEM_TEMPLATES: Mapping[IdentifierKind, str] = {
    IdentifierKind.ENCOUNTER: SYS_IDS_BASE + "/encounter/{org}",
    IdentifierKind.SERVICE_REQUEST: SYS_IDS_BASE + "/servicerequest/{org}",
    IdentifierKind.ACSN: SYS_IDS_BASE + "/acsn/{org}",
    IdentifierKind.OBSERVATION: SYS_IDS_BASE + "/observation/{org}",
    IdentifierKind.DIAGNOSTIC_REPORT_RAD: SYS_IDS_BASE + "/diagnostic/{org}/rad",
    IdentifierKind.MRN: SYS_IDS_BASE + "/mrn/{org}",
}
"""The one place the sys-ids URLs are written. (Docs also show `accessionno/{org}`; the router uses `acsn`.)"""

AE_TITLE_SYSTEM = SYS_IDS_BASE + "/ae-title"
"""`ServiceRequest.orderDetail` coding system for the modality's AE title (rule 10427)."""

LOOKUP_IDENTIFIER: Mapping[str, IdentifierKind] = {
    "Encounter": IdentifierKind.ENCOUNTER,
    "ServiceRequest": IdentifierKind.ACSN,
    "ImagingStudy": IdentifierKind.ACSN,
    "Observation": IdentifierKind.OBSERVATION,
    "DiagnosticReport": IdentifierKind.DIAGNOSTIC_REPORT_RAD,
}
"""Which identifier finds an already-created resource again. A ServiceRequest is found by its ACSN: unique per
order, and what the router itself searches by (the servicerequest identifier may repeat the visit number)."""

_ORG_ID = re.compile(r"^[A-Za-z0-9-]+$")


def identifier_system(kind: IdentifierKind | str, org_id: str) -> str:
    """`http://sys-ids.kemkes.go.id/<kind>/<org>`: the org must be the client's own (rule 10117)."""
    if not _ORG_ID.match(org_id or ""):
        raise ValueError(f"org_id must be the SATUSEHAT organisation id (letters, digits, '-'); got {org_id!r}")
    return IDENTIFIER_SYSTEM_TEMPLATES[IdentifierKind(kind)].format(org=org_id)


def lookup_identifier(resource: Mapping[str, Any], org_id: str) -> tuple[str, str]:
    """(system, value) by which a built resource is searched for (`?identifier=system|value`)."""
    resource_type = resource.get("resourceType", "")
    system = identifier_system(LOOKUP_IDENTIFIER[resource_type], org_id)
    for item in resource.get("identifier", []):
        if item.get("system") == system and item.get("value"):
            return system, item["value"]
    raise ValueError(f"{resource_type} carries no identifier of system {system}")


# --- code systems and codes --------------------------------------------------------------------------------

LOINC = "http://loinc.org"
SNOMED_CT = "http://snomed.info/sct"
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074_DIAGNOSTIC_SECTION = "http://terminology.hl7.org/CodeSystem/v2-0074"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


@dataclass(frozen=True)
class Coding:
    """A fixed FHIR Coding; `as_json` gives a fresh dict each time (no shared mutable state)."""

    system: str
    code: str
    display: str | None = None

    def as_json(self) -> JsonObject:
        coding: JsonObject = {"system": self.system, "code": self.code}
        if self.display is not None:
            coding["display"] = self.display
        return coding


ENCOUNTER_CLASS_AMBULATORY = Coding(V3_ACT_CODE, "AMB", "ambulatory")
DICOM_UID_PREFIX = "urn:oid:"
PARTICIPANT_ATTENDER = Coding(V3_PARTICIPATION_TYPE, "ATND", "attender")
IDENTIFIER_TYPE_ACSN = Coding(V2_0203_IDENTIFIER_TYPE, "ACSN")
SERVICE_REQUEST_CATEGORY_IMAGING = Coding(SNOMED_CT, "363679005", "Imaging")
OBSERVATION_CATEGORY_IMAGING = Coding(OBSERVATION_CATEGORY, "imaging", "Imaging")
DIAGNOSTIC_SECTION_RADIOLOGY = Coding(V2_0074_DIAGNOSTIC_SECTION, "RAD", "Radiology")

ENCOUNTER_STATUS = "arrived"
"""The Encounter is registered on arrival and not finished by the gateway (as the existing gateway did)."""
SERVICE_REQUEST_STATUS = "active"
SERVICE_REQUEST_INTENT = "original-order"
SERVICE_REQUEST_PRIORITY = "routine"
OBSERVATION_STATUS = "final"
DIAGNOSTIC_REPORT_STATUS = "final"
IDENTIFIER_USE_USUAL = "usual"
IDENTIFIER_USE_OFFICIAL = "official"


class FhirBuildError(ValueError):
    """A builder produced something that is not valid FHIR R4, or lacked an id it needs: a gateway bug."""


class IncompleteOrder(ValueError):
    """The input lacks something the resource needs and no setting supplies it: the message names the field and
    the setting. An input problem (sending it again cannot help), unlike FhirBuildError."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# --- what the hospital configured, and what the PACS says about the study -----------------------------------


@dataclass(frozen=True)
class SiteDefaults:
    """The hospital's choices for gaps in an order (models/settings.py; docs/his-integration.md). The builders take
    them as a value so they stay pure: the tasks pass `SiteDefaults.from_settings(settings)`."""

    encounter_class: str = "AMB"
    """Encounter.class when the input has no `encounter_class` (ENCOUNTER_CLASS)."""
    service_request_performer: str | None = None
    """ServiceRequest.performer when the input names none (SERVICE_REQUEST_PERFORMER); None = Organization/{org}."""
    default_exam_code: str | None = None
    """LOINC exam code when neither the input nor the modality table gives one (DEFAULT_EXAM_CODE)."""
    exam_code_by_modality: Mapping[str, str] = field(default_factory=dict)
    """DICOM modality → LOINC exam code (EXAM_CODE_BY_MODALITY)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> SiteDefaults:
        return cls(
            encounter_class=settings.encounter_class,
            service_request_performer=settings.service_request_performer,
            default_exam_code=settings.default_exam_code,
            exam_code_by_modality=dict(settings.exam_code_by_modality),
        )


NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "REG", "SEG", "RWV", "FID", "PLAN", "RTPLAN", "OT"})
"""ModalitiesInStudy values that describe objects stored beside the images, not how the study was acquired."""


class StudyFacts(BaseModel):
    """What the PACS says about the order's study, for the resources built around it (batch4, dicom-process).
    A frozen pydantic model, so a task's cache key can include it (`tasks.fhir._order_key`)."""

    model_config = ConfigDict(frozen=True)

    study_instance_uid: str | None = None
    """Sent as the ServiceRequest's `urn:dicom:uid` identifier (`urn:oid:<UID>`), as the router writes it."""
    modalities: tuple[str, ...] = ()
    """ModalitiesInStudy, in the PACS's order: the first acquisition modality is the study's."""
    description: str | None = None
    """StudyDescription: the exam's text when the code came from a setting and has no known display."""
    started: datetime | None = None
    """StudyDate + StudyTime (aware): Observation/DiagnosticReport `effectiveDateTime`."""

    @property
    def modality(self) -> str | None:
        """The study's acquisition modality: the first of ModalitiesInStudy that is not SR/KO/PR and the like."""
        known = acquisition_modalities()
        for code in self.modalities:
            if code and code.upper() not in NON_IMAGE_MODALITIES and code.upper() in known:
                return code.upper()
        return None

    @classmethod
    def from_located(cls, study: Mapping[str, Any], *, started: datetime | None = None) -> StudyFacts:
        """From `tasks.dicom.locate_study`'s answer: `study_instance_uid`, `modalities`, `description`
        (StudyDescription) and `started` (StudyDate + StudyTime, ISO 8601 with its offset), each when present."""
        return cls.model_validate(
            {
                "study_instance_uid": study.get("study_instance_uid"),
                "modalities": tuple(study.get("modalities") or ()),
                "description": study.get("description") or study.get("study_description") or None,
                "started": started if started is not None else study.get("started"),
            }
        )


@dataclass(frozen=True)
class Exam:
    """The exam an order is for, and where that came from (for the run's record and error messages)."""

    code: str
    display: str | None
    source: str


def resolve_exam(source: object, site: SiteDefaults, study: StudyFacts | None = None) -> Exam:
    """The exam's LOINC code: the input's `codind_code`; else the modality (the input's `modality`, else the PACS
    study's) through EXAM_CODE_BY_MODALITY; else DEFAULT_EXAM_CODE; else IncompleteOrder. Never a fixed exam."""
    code = getattr(source, "codind_code", None)
    if code:
        return Exam(code, getattr(source, "coding_display", None) or EXAM_DISPLAYS.get(code), "codind_code")
    modality = getattr(source, "modality", None) or (study.modality if study is not None else None)
    if modality is not None and modality in site.exam_code_by_modality:
        code = site.exam_code_by_modality[modality]
        return Exam(code, EXAM_DISPLAYS.get(code), f"EXAM_CODE_BY_MODALITY[{modality}]")
    if site.default_exam_code:
        code = site.default_exam_code
        return Exam(code, EXAM_DISPLAYS.get(code), "DEFAULT_EXAM_CODE")
    where = f"the study's modality {modality} is not in EXAM_CODE_BY_MODALITY" if modality else "no modality known"
    raise IncompleteOrder(
        "codind_code",
        f"no exam code: the body has no codind_code (or coding_code), {where}, and DEFAULT_EXAM_CODE is not set. "
        "Send the exam's LOINC code, or configure EXAM_CODE_BY_MODALITY / DEFAULT_EXAM_CODE (the gateway does "
        "not assume an exam)",
    )


# --- shared pieces -----------------------------------------------------------------------------------------


def _reference(reference: str, display: str | None = None) -> JsonObject:
    ref: JsonObject = {"reference": reference}
    if display is not None:
        ref["display"] = display
    return ref


def _concept(coding: Coding, text: str | None = None) -> JsonObject:
    concept: JsonObject = {"coding": [coding.as_json()]}
    if text is not None:
        concept["text"] = text
    return concept


def _exam_concept(exam: Exam, *, text: str | None = None) -> JsonObject:
    return _concept(Coding(LOINC, exam.code, exam.display), text)


def _linked_id(element: str, explicit: str | None, source: object, field: str) -> str:
    """The server id of an earlier resource: the caller's (just created) wins over the input's field."""
    value = explicit if explicit is not None else getattr(source, field, None)
    if not value:
        raise FhirBuildError(f"{element} needs {field}: pass it to the builder or give it in the input")
    try:
        return check_fhir_id(value)
    except ValueError as error:
        raise FhirBuildError(f"{element}: {field} {error}") from None


def _issued(given: datetime | None, now: datetime | None, field: str, element: str) -> str:
    """The HIS's time if it gave one, else the time the flow posts the resource (passed in: no clock here)."""
    if given is not None:
        return to_fhir_datetime(given)
    if now is None:
        raise FhirBuildError(f"{element} needs {field} from the input or `issued` (the flow's clock) from the caller")
    return to_fhir_datetime(require_aware(now, "issued"))


def _effective(source: object, study: StudyFacts | None) -> str | None:
    """When the finding refers to: the study's time from the PACS; else, for the standalone Observation and
    DiagnosticReport bodies (and batch2), their own `period_start`, which the HIS sends for that resource. A
    batch's `period_start` is the visit's start, not the study's: then nothing is sent rather than that."""
    if study is not None and study.started is not None:
        return to_fhir_datetime(require_aware(study.started, "study started"))
    if isinstance(source, EncounterInput):
        return None
    return to_fhir_datetime(source.period_start)  # type: ignore[attr-defined]


def resource_identifier_value(source: object) -> str:
    """The order's ACSN (`noacsn`), else the input's `identifier_value`: deterministic, so a re-run finds it.

    The ACSN comes first because it is unique per exam, while `identifier_value` is the visit number the
    Encounter carries: two exams in one visit would otherwise share one ServiceRequest identifier, and the
    second would be refused as a duplicate (or matched to the first exam's resource on a re-run).
    """
    value = getattr(source, "noacsn", None) or getattr(source, "identifier_value", None)
    if not value:
        raise FhirBuildError(f"{type(source).__name__} has neither noacsn nor identifier_value")
    return value


def service_request_identifier_value(order: object) -> str:
    """The ServiceRequest's `servicerequest/{org}` identifier: `identifier_value`, else the ACSN, as the existing
    gateway sent it. (Lookups use the ACSN identifier, unique per order: see LOOKUP_IDENTIFIER.)"""
    value = getattr(order, "identifier_value", None) or getattr(order, "noacsn", None)
    if not value:
        raise FhirBuildError(f"{type(order).__name__} has neither identifier_value nor noacsn")
    return value


def validate_resource(resource: Mapping[str, Any]) -> None:
    """Check a resource against the fhir.resources R4B model; FhirBuildError names every bad element."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise FhirBuildError("resource has no resourceType")
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        raise FhirBuildError(f"unknown FHIR R4 resource type {resource_type!r}") from None
    try:
        model.model_validate(dict(resource))
    except ValidationError as error:
        problems = "; ".join(f"{_fhir_path(resource_type, item['loc'])}: {item['msg']}" for item in error.errors())
        raise FhirBuildError(f"built {resource_type} is not valid FHIR R4 ({problems})") from None


def _fhir_path(resource_type: str, loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as a FHIRPath-like element path: `Encounter.statusHistory[0].status`."""
    path = resource_type
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _checked(resource: JsonObject) -> JsonObject:
    validate_resource(resource)
    return resource


# --- the builders ------------------------------------------------------------------------------------------


def build_encounter(visit: EncounterInput, org_id: str, *, site: SiteDefaults | None = None) -> JsonObject:
    """An Encounter in status `arrived` (Batch1/3/4 inputs are EncounterInputs too).

    The class is the input's `encounter_class`, else the site's (ENCOUNTER_CLASS, default AMB). The period ends
    only when the input says so: an arrived visit has not ended (SATUSEHAT wants an end once finished, rule
    10121). statusHistory repeats the period (rule 10122). Location only when the input names one.
    """
    site = site or SiteDefaults()
    period: JsonObject = {"start": to_fhir_datetime(visit.period_start)}
    if visit.period_end is not None:
        period["end"] = to_fhir_datetime(visit.period_end)
    class_code = visit.encounter_class or site.encounter_class
    encounter: JsonObject = {
        "resourceType": "Encounter",
        "identifier": [
            {"system": identifier_system(IdentifierKind.ENCOUNTER, org_id), "value": visit.identifier_value}
        ],
        "status": ENCOUNTER_STATUS,
        "class": Coding(V3_ACT_CODE, class_code, ENCOUNTER_CLASSES.get(class_code)).as_json(),
        "subject": _reference(visit.subject_ref),
        "participant": [
            {
                "type": [_concept(PARTICIPANT_ATTENDER)],
                "individual": _reference(visit.attender_ref, visit.individual_display),
            }
        ],
        "period": period,
    }
    location_ref = visit.location_ref
    if location_ref is not None:
        encounter["location"] = [{"location": _reference(location_ref, visit.location_display)}]
    encounter["statusHistory"] = [{"status": ENCOUNTER_STATUS, "period": dict(period)}]
    encounter["serviceProvider"] = _reference(f"Organization/{org_id}")
    return _checked(encounter)


def build_service_request(
    order: ServiceRequestInput | Batch1Input,
    org_id: str,
    *,
    encounter_id: str | None = None,
    site: SiteDefaults | None = None,
    study: StudyFacts | None = None,
) -> JsonObject:
    """The radiology order, carrying the ACSN the DICOM Router links the study by.

    `encounter_id` is the Encounter just created (batches); standalone input carries its own. Occurrence and
    authoredOn are `period_start`, as the existing gateway sent them. The exam is `resolve_exam`'s; the modality
    the input's, else the PACS study's (none known: no modality orderDetail). The performer is the input's, else
    the site's SERVICE_REQUEST_PERFORMER, else the organisation (rule 10377 wants one). `study` (batch4) adds the
    StudyInstanceUID identifier.
    """
    site = site or SiteDefaults()
    encounter = _linked_id("ServiceRequest.encounter", encounter_id, order, "encounter_id")
    when = to_fhir_datetime(order.period_start)
    requester = order.requester_ref
    if requester is None:
        raise FhirBuildError("ServiceRequest.requester needs requester_reference (rule 10376)")
    exam = resolve_exam(order, site, study)
    modality = order.modality or (study.modality if study is not None else None)
    order_detail: list[JsonObject] = []
    if modality is not None:
        order_detail.append(
            _concept(Coding(DICOM_DCM, modality, acquisition_modalities().get(modality)), f"Modality Code: {modality}")
        )
    if order.ae_title is not None:
        order_detail.append({"coding": [{"system": AE_TITLE_SYSTEM, "display": order.ae_title}]})
    identifiers: list[JsonObject] = [
        {
            "system": identifier_system(IdentifierKind.SERVICE_REQUEST, org_id),
            "value": service_request_identifier_value(order),
        },
        {
            "use": IDENTIFIER_USE_USUAL,
            "type": _concept(IDENTIFIER_TYPE_ACSN),
            "system": identifier_system(IdentifierKind.ACSN, org_id),
            "value": order.noacsn,
        },
    ]
    if study is not None and study.study_instance_uid:
        identifiers.append({"system": DICOM_UID_SYSTEM, "value": DICOM_UID_PREFIX + study.study_instance_uid})
    performer = order.order_performer_ref
    performer_display = order.order_performer_name
    if performer is None:
        performer, performer_display = site.service_request_performer or f"Organization/{org_id}", None
    exam_text = exam.display or (study.description if study is not None else None)
    service_request: JsonObject = {
        "resourceType": "ServiceRequest",
        "identifier": identifiers,
        "status": SERVICE_REQUEST_STATUS,
        "intent": SERVICE_REQUEST_INTENT,
        "priority": SERVICE_REQUEST_PRIORITY,
        "category": [_concept(SERVICE_REQUEST_CATEGORY_IMAGING)],
        "code": _exam_concept(exam, text=exam_text),
    }
    if order_detail:
        service_request["orderDetail"] = order_detail
    service_request |= {
        "subject": _reference(order.subject_ref),
        "encounter": _reference(f"Encounter/{encounter}"),
        "occurrenceDateTime": when,
        "authoredOn": when,
        "requester": _reference(requester, order.requester_name),
        "performer": [_reference(performer, performer_display)],
        "reasonCode": [{"text": order.reason_text or DEFAULT_REASON_TEXT}],
    }
    return _checked(service_request)


def build_observation(
    reading: ObservationInput | Batch3Input,
    org_id: str,
    *,
    encounter_id: str | None = None,
    service_request_id: str | None = None,
    imaging_study_id: str | None = None,
    issued: datetime | None = None,
    site: SiteDefaults | None = None,
    study: StudyFacts | None = None,
) -> JsonObject:
    """The radiologist's reading: category imaging, based on the order, derived from the ImagingStudy.

    Ids passed here win over the input's (batches pass what they just created or found). `issued` is the input's
    `reading_time`, else the `issued` passed in (the flow's clock when it posts it; required then).
    `effectiveDateTime` is the study's time (`study.started`) when known (see `_effective`).
    """
    site = site or SiteDefaults()
    encounter = _linked_id("Observation.encounter", encounter_id, reading, "encounter_id")
    service_request = _linked_id("Observation.basedOn", service_request_id, reading, "service_request_id")
    imaging_study = _linked_id("Observation.derivedFrom", imaging_study_id, reading, "imaging_study_id")
    exam = resolve_exam(reading, site, study)
    observation: JsonObject = {
        "resourceType": "Observation",
        "identifier": [
            {
                "system": identifier_system(IdentifierKind.OBSERVATION, org_id),
                "value": resource_identifier_value(reading),
            }
        ],
        "status": OBSERVATION_STATUS,
        "category": [_concept(OBSERVATION_CATEGORY_IMAGING)],
        "code": _exam_concept(exam),
        "subject": _reference(reading.subject_ref),
        "encounter": _reference(f"Encounter/{encounter}"),
    }
    effective = _effective(reading, study)
    if effective is not None:
        observation["effectiveDateTime"] = effective
    observation |= {
        "issued": _issued(reading.reading_time, issued, "reading_time", "Observation.issued"),
        "performer": [
            _reference(f"Practitioner/{reading.radiologist_id}", reading.performer_display),
            _reference(f"Organization/{org_id}"),
        ],
        "basedOn": [_reference(f"ServiceRequest/{service_request}")],
        "derivedFrom": [_reference(f"ImagingStudy/{imaging_study}")],
        "valueString": reading.performer_value,
    }
    return _checked(observation)


def build_diagnostic_report(
    report: DiagnosticReportInput | Batch2Input | Batch3Input,
    org_id: str,
    *,
    encounter_id: str | None = None,
    service_request_id: str | None = None,
    imaging_study_id: str | None = None,
    observation_id: str | None = None,
    issued: datetime | None = None,
    site: SiteDefaults | None = None,
    study: StudyFacts | None = None,
) -> JsonObject:
    """The radiology report: section RAD, the reading as its result, the study, the order, the conclusion.

    Performer is the radiologist and the organisation (as in the SATUSEHAT example). Ids passed here win over
    the input's; `issued` is the input's `report_time`, else the `issued` passed in; `effectiveDateTime` as in
    `build_observation`.
    """
    site = site or SiteDefaults()
    encounter = _linked_id("DiagnosticReport.encounter", encounter_id, report, "encounter_id")
    service_request = _linked_id("DiagnosticReport.basedOn", service_request_id, report, "service_request_id")
    imaging_study = _linked_id("DiagnosticReport.imagingStudy", imaging_study_id, report, "imaging_study_id")
    observation = _linked_id("DiagnosticReport.result", observation_id, report, "observation_id")
    exam = resolve_exam(report, site, study)
    diagnostic_report: JsonObject = {
        "resourceType": "DiagnosticReport",
        "identifier": [
            {
                "system": identifier_system(IdentifierKind.DIAGNOSTIC_REPORT_RAD, org_id),
                "use": IDENTIFIER_USE_OFFICIAL,
                "value": resource_identifier_value(report),
            }
        ],
        "status": DIAGNOSTIC_REPORT_STATUS,
        "category": [_concept(DIAGNOSTIC_SECTION_RADIOLOGY)],
        "code": _exam_concept(exam),
        "subject": _reference(report.subject_ref),
        "encounter": _reference(f"Encounter/{encounter}"),
    }
    effective = _effective(report, study)
    if effective is not None:
        diagnostic_report["effectiveDateTime"] = effective
    diagnostic_report |= {
        "issued": _issued(report.report_time, issued, "report_time", "DiagnosticReport.issued"),
        "performer": [_reference(f"Practitioner/{report.radiologist_id}"), _reference(f"Organization/{org_id}")],
        "imagingStudy": [_reference(f"ImagingStudy/{imaging_study}")],
        "result": [_reference(f"Observation/{observation}", exam.display)],
        "basedOn": [_reference(f"ServiceRequest/{service_request}")],
        "conclusion": report.conclusion_text,
    }
    return _checked(diagnostic_report)
