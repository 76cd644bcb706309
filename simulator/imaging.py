"""The ImagingStudy the official SATUSEHAT DICOM Router builds from one association's instances, as a pure function.

Mirrors the router v1.1.0 (`utils/dicom2fhir.py`, `utils/fhirutils.py`) and the body it was observed POSTing
(shared/research/observed_contracts.md): the study-level fields come from the first instance, series and instances
appear in the order they arrived, `subject` and `basedOn` come from the ServiceRequest found by ACSN, times carry the
router's `tz_name` Asia/Jakarta (+07:00). Where the router reads a tag without a fallback, a missing or empty value
is an `ImagingStudyBuildError` naming the tag: the router then fails to create the ImagingStudy and posts nothing.

No I/O and no clock unless `now` is left out: the router emulation (simulator/router.py) and the tests call it.
Nothing here imports the gateway: the simulator judges the gateway's DICOM, it must not reuse its code.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

ACSN_SYSTEM_PREFIX = "http://sys-ids.kemkes.go.id/acsn/"
ACSN_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"
NO_DESCRIPTION = "No Description"
"""What the router writes when StudyDescription / SeriesDescription is missing."""
DEFAULT_TITLE = "ORIGINAL\\PRIMARY"
"""What the router writes as instance title when ImageType is missing."""
JAKARTA = dt.timezone(dt.timedelta(hours=7), "Asia/Jakarta")
"""The router's `tz_name = Asia/Jakarta` (WIB, no daylight saving): every `started` carries +07:00."""

# The tags the router dereferences without a fallback while building (keyword → tag as written in errors).
REQUIRED_TAGS: dict[str, str] = {
    "AccessionNumber": "(0008,0050)",
    "StudyInstanceUID": "(0020,000D)",
    "SeriesInstanceUID": "(0020,000E)",
    "SOPInstanceUID": "(0008,0018)",
    "SOPClassUID": "(0008,0016)",
    "Modality": "(0008,0060)",
    "SeriesNumber": "(0020,0011)",
    "InstanceNumber": "(0020,0013)",
}

# Every tag the builder reads; the router emulation decodes only these (and stops before the pixel data).
HEADER_KEYWORDS: tuple[str, ...] = (
    *REQUIRED_TAGS,
    "StudyDescription",
    "SeriesDescription",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "ImageType",
)


class ImagingStudyBuildError(ValueError):
    """The router could not build the ImagingStudy; `tag` names the DICOM attribute at fault, if one is."""

    def __init__(self, message: str, *, tag: str | None = None, sop_instance_uid: str | None = None) -> None:
        super().__init__(message)
        self.tag = tag
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The few attributes of one received instance that the router's builder reads, as plain values.

    None means the attribute was absent, "" that it was present but empty: the router's C-STORE handler fails on
    absent UIDs / AccessionNumber, while the builder fails on absent or empty required attributes.
    `image_type` keeps pydicom's shape (a tuple for VM > 1, a str for VM 1) because the router joins it as is.
    """

    accession_number: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    series_number: str | None
    instance_number: str | None
    study_description: str | None = None
    series_description: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    series_date: str | None = None
    series_time: str | None = None
    image_type: tuple[str, ...] | str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceHeader:
        """Copy the builder's attributes out of a (header-only) dataset, so the dataset itself can be dropped."""
        return cls(
            accession_number=_text(ds, "AccessionNumber"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            modality=_text(ds, "Modality"),
            series_number=_text(ds, "SeriesNumber"),
            instance_number=_text(ds, "InstanceNumber"),
            study_description=_text(ds, "StudyDescription"),
            series_description=_text(ds, "SeriesDescription"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            series_date=_text(ds, "SeriesDate"),
            series_time=_text(ds, "SeriesTime"),
            image_type=_image_type(ds),
        )

    def missing(self) -> list[str]:
        """Keywords of the required attributes that are absent or empty (or not an integer where one is needed)."""
        found: list[str] = []
        for keyword, value in (
            ("AccessionNumber", self.accession_number),
            ("StudyInstanceUID", self.study_instance_uid),
            ("SeriesInstanceUID", self.series_instance_uid),
            ("SOPInstanceUID", self.sop_instance_uid),
            ("SOPClassUID", self.sop_class_uid),
            ("Modality", self.modality),
        ):
            if not value:
                found.append(keyword)
        if _integer(self.series_number) is None:
            found.append("SeriesNumber")
        if _integer(self.instance_number) is None:
            found.append("InstanceNumber")
        return found


def acsn_system(org_id: str) -> str:
    """The ACSN identifier system the router searches and writes: acsn/{its organization_id}."""
    return f"{ACSN_SYSTEM_PREFIX}{org_id}"


def patient_reference(service_request: dict[str, Any]) -> str | None:
    """`Patient/<id>` as the router derives it from ServiceRequest.subject, or None where the router fails.

    The router splits `subject.reference` on "/" into exactly two parts and re-prefixes the second with
    "Patient/": an absolute URL or a missing subject makes it give up ("ServiceRequest not found" path).
    """
    subject = service_request.get("subject")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    if not isinstance(reference, str):
        return None
    parts = reference.split("/")
    if len(parts) != 2:
        return None
    return f"Patient/{parts[1]}"


def build_imaging_study(
    instances: Iterable[InstanceHeader | Dataset],
    *,
    service_request_id: str,
    subject_reference: str,
    imaging_study_id: str | None,
    org_id: str,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The ImagingStudy JSON the router POSTs (or PUTs, with `id`) for one study received in one association.

    `instances` in arrival order, all of one StudyInstanceUID; `subject_reference` is "Patient/<id>" from the
    ServiceRequest. `now` stands in for the router's clock, which it reads only when SeriesTime is missing.
    Raises ImagingStudyBuildError when a required attribute is missing or empty, or the instances span studies.
    """
    headers = [item if isinstance(item, InstanceHeader) else InstanceHeader.from_dataset(item) for item in instances]
    if not headers:
        raise ImagingStudyBuildError("no instances to build an ImagingStudy from")
    for header in headers:
        missing = header.missing()
        if missing:
            keyword = missing[0]
            uid = header.sop_instance_uid or "?"
            raise ImagingStudyBuildError(
                f"missing required DICOM attribute {keyword} {REQUIRED_TAGS[keyword]} in instance {uid}",
                tag=keyword,
                sop_instance_uid=header.sop_instance_uid,
            )
    first = headers[0]
    study_uids = {header.study_instance_uid for header in headers}
    if len(study_uids) > 1:
        # The router raises this too ("Incorrect DICOM path, more than one study detected").
        raise ImagingStudyBuildError(f"more than one study in one build: {sorted(u or '' for u in study_uids)}")
    clock = now or dt.datetime.now(JAKARTA)

    modalities: list[dict[str, str]] = []
    series_by_uid: dict[str, dict[str, Any]] = {}
    instance_count = 0
    for header in headers:
        series = series_by_uid.get(header.series_instance_uid or "")
        if series is None:
            series = _new_series(header, clock)
            series_by_uid[header.series_instance_uid or ""] = series
            if series["modality"] not in modalities:
                modalities.append(series["modality"])
        if any(item["uid"] == header.sop_instance_uid for item in series["instance"]):
            continue  # the router skips a SOP Instance UID it already has in the series ("not unique")
        series["instance"].append(_instance(header))
        series["numberOfInstances"] += 1
        instance_count += 1

    study: dict[str, Any] = {"resourceType": "ImagingStudy"}
    if imaging_study_id is not None:
        study["id"] = imaging_study_id
    study["identifier"] = [
        {
            "use": "usual",
            "type": {"coding": [{"system": ACSN_TYPE_SYSTEM, "code": "ACSN"}]},
            "system": acsn_system(org_id),
            "value": first.accession_number,
        },
        {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{first.study_instance_uid}"},
    ]
    study["status"] = "available"
    study["modality"] = modalities
    study["subject"] = {"reference": subject_reference}
    started = _started(first.study_date, first.study_time)
    if started is not None:
        study["started"] = started
    study["basedOn"] = [{"reference": f"ServiceRequest/{service_request_id}"}]
    study["numberOfSeries"] = len(series_by_uid)
    study["numberOfInstances"] = instance_count
    study["description"] = first.study_description or NO_DESCRIPTION
    study["series"] = list(series_by_uid.values())
    return study


def _new_series(header: InstanceHeader, clock: dt.datetime) -> dict[str, Any]:
    series: dict[str, Any] = {
        "uid": header.series_instance_uid,
        "number": _integer(header.series_number),
        "modality": {"system": DCM_SYSTEM, "code": header.modality},
        "description": header.series_description or NO_DESCRIPTION,
        "numberOfInstances": 0,
    }
    # The router uses its clock's time of day when SeriesTime is absent, and no `started` without SeriesDate.
    series_time = header.series_time if header.series_time is not None else clock.astimezone(JAKARTA).strftime("%H%M%S")
    started = _started(header.series_date, series_time)
    if started is not None:
        series["started"] = started
    series["instance"] = []
    return series


def _instance(header: InstanceHeader) -> dict[str, Any]:
    return {
        "uid": header.sop_instance_uid,
        "sopClass": {"system": SOP_CLASS_SYSTEM, "code": f"urn:oid:{header.sop_class_uid}"},
        "number": _integer(header.instance_number),
        "title": _title(header.image_type),
    }


def _title(image_type: tuple[str, ...] | str | None) -> str:
    """ImageType joined by backslash, as the router does: `'\\\\'.join(ds.ImageType)`.

    Faithful to a quirk: pydicom gives a single-valued ImageType as a str, which the router's join splits into
    characters ("DERIVED" → "D\\E\\R\\I\\V\\E\\D"). Absent or empty → "ORIGINAL\\PRIMARY" (an empty title would
    be an invalid FHIR string, so the simulator takes the router's fallback there).
    """
    if not image_type:
        return DEFAULT_TITLE
    return "\\".join(image_type)


def _started(date: str | None, time: str | None) -> str | None:
    """YYYY-MM-DDThh:mm:ss+07:00 from DICOM DA/TM, as the router's `gen_started_datetime`.

    No date (or one that is not YYYYMMDD) → no `started`, as the router's try/except leaves it unset.
    A time shorter than hhmmss → the date alone (the router builds a date-only value there). Fractions are cut.
    """
    if not date:
        return None
    try:
        day = dt.datetime.strptime(date.strip(), "%Y%m%d").date()
    except ValueError:
        return None
    if time is None or len(time.strip()) < 6:
        return day.isoformat()
    try:
        clock = dt.datetime.strptime(time.strip()[:6], "%H%M%S").time()
    except ValueError:
        return None
    return dt.datetime.combine(day, clock, tzinfo=JAKARTA).isoformat()


def _text(ds: Dataset, keyword: str) -> str | None:
    if keyword not in ds:
        return None
    try:
        value = ds[keyword].value
    except Exception:  # a value pydicom cannot convert counts as unusable, like an empty one
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _image_type(ds: Dataset) -> tuple[str, ...] | str | None:
    if "ImageType" not in ds:
        return None
    value = ds["ImageType"].value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return tuple(str(v) for v in value)
    return str(value)


def _integer(value: str | None) -> int | None:
    """An IS value as int, or None when absent, empty or not an integer."""
    if value is None:
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        try:
            number = float(str(value).strip())
        except ValueError:
            return None
        return int(number) if number.is_integer() else None


def absent_at_store(header: InstanceHeader) -> Sequence[str]:
    """Keywords the router's C-STORE handler dereferences and that are absent (it then answers 0xC211)."""
    return [
        keyword
        for keyword, value in (
            ("StudyInstanceUID", header.study_instance_uid),
            ("SeriesInstanceUID", header.series_instance_uid),
            ("SOPInstanceUID", header.sop_instance_uid),
            ("AccessionNumber", header.accession_number),
        )
        if value is None
    ]
