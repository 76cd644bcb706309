"""The ImagingStudy the official SATUSEHAT DICOM Router builds from one association's instances, as a pure function.

Mirrors the router v1.1.0 (heryanto87/dicom-router @ 9f5d3b3, the fork of the official v1.1.0:
`utils/dicom2fhir.py` createImagingStudy / addSeries / addInstance / process_dicom_2_fhir, and
`utils/fhirutils.py` gen_started_datetime), checked against its pinned libraries (fhir.resources 6.5.0,
pydantic 1.10.4, pydicom 2.3.1), and the body it was observed POSTing (shared/research/observed_contracts.md,
field_notes.md). The study-level fields come from the first instance, series and instances appear in the order
they arrived, `subject` and `basedOn` come from the ServiceRequest found by ACSN.

* `started` is `gen_started_datetime(date, time)`: YYYY-MM-DDThh:mm:ss+07:00 (the router's `tz_name`
  Asia/Jakarta); a time that is absent, empty or shorter than hhmmss (e.g. HHMM) gives `YYYY-MM-DDT00:00:00`
  with **no zone**, which the platform's date rules refuse, so that POST fails as it does in production.
* The router builds instance by instance with its FHIR library; the first instance the library refuses (see
  `_series_number`, `_modality`, `_instance`) stops the build there (`process_dicom_2_fhir` catches the exception
  and returns what it has), and the router POSTs that **partial** ImagingStudy. When the very first instance
  stops it there is nothing to post: `ImagingStudyBuildError`.

No I/O and no clock unless `now` is left out: the router emulation (simulator/router.py) and the tests call it.
Nothing here imports the gateway: the simulator judges the gateway's DICOM, it must not reuse its code.
"""

from __future__ import annotations

import datetime as dt
import re
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
ROUTER_HOST_ZONE = dt.UTC
"""The zone of the router's own clock: its container runs in UTC, and `datetime.now()` there is naive UTC. It is
read only for a series without SeriesTime, whose time of day is then the UTC one labelled +07:00 (field_notes)."""
_FHIR_CODE = re.compile(r"^[^\s]+(\s[^\s]+)*$")
"""fhir.resources' `Code` pattern: an empty or blank Modality fails it when the router assigns the coding."""

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
    """The router's library refused an instance; `tag` names the DICOM attribute at fault, if one is.

    Raised by `build_imaging_study` only when nothing was built (the first instance, or two studies in one
    build); a later instance's refusal is `RouterBuild.stopped` instead, beside the partial ImagingStudy.
    """

    def __init__(self, message: str, *, tag: str | None = None, sop_instance_uid: str | None = None) -> None:
        super().__init__(message)
        self.tag = tag
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The few attributes of one received instance that the router's builder reads, as plain values.

    None means the attribute was absent, "" that it was present but empty: the router's C-STORE handler fails on
    absent UIDs / AccessionNumber, while the builder treats absent and empty each as the router's library does.
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


@dataclass(frozen=True, slots=True)
class RouterBuild:
    """What the router's `process_dicom_2_fhir` returns: the ImagingStudy built so far, and why it stopped early.

    `stopped` is None when every instance went in; otherwise the error of the instance the library refused, and
    `study` holds only what came before it (the router POSTs it all the same).
    """

    study: dict[str, Any]
    stopped: ImagingStudyBuildError | None = None


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
) -> RouterBuild:
    """The ImagingStudy JSON the router POSTs (or PUTs, with `id`) for one study received in one association.

    `instances` in arrival order, all of one StudyInstanceUID; `subject_reference` is "Patient/<id>" from the
    ServiceRequest. `now` stands in for the router's clock, which it reads only when SeriesTime is missing.
    As the router's `process_dicom_2_fhir`: a later instance its library refuses ends the build, and the result
    carries the partial study and `stopped`; raises ImagingStudyBuildError when the first instance is refused
    (the router then has no ImagingStudy: "'NoneType' object has no attribute 'json'") or the instances span
    studies.
    """
    headers = [item if isinstance(item, InstanceHeader) else InstanceHeader.from_dataset(item) for item in instances]
    if not headers:
        raise ImagingStudyBuildError("no instances to build an ImagingStudy from")
    clock = now or dt.datetime.now(JAKARTA)
    first = headers[0]
    study_uids = {header.study_instance_uid for header in headers}
    if len(study_uids) > 1:
        # The router raises this too ("Incorrect DICOM path, more than one study detected"), before the first
        # instance of the second study is added; the emulation groups by study, so this is a caller's error.
        raise ImagingStudyBuildError(f"more than one study in one build: {sorted(u or '' for u in study_uids)}")
    for keyword, value in (("AccessionNumber", first.accession_number), ("StudyInstanceUID", first.study_instance_uid)):
        if not value:  # createImagingStudy reads both; the emulation never gets here with them absent or empty
            raise _refused(first, keyword, "absent or empty")

    modalities: list[dict[str, str]] = []
    series_list: list[dict[str, Any]] = []
    instance_count = 0
    stopped: ImagingStudyBuildError | None = None
    for header in headers:
        try:
            instance_count += _add(header, series_list, modalities, clock)
        except ImagingStudyBuildError as error:
            if header is first:
                raise  # createImagingStudy itself failed: there is no ImagingStudy at all
            stopped = error
            break

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
    started = gen_started(first.study_date, first.study_time)
    if started is not None:
        study["started"] = started
    study["basedOn"] = [{"reference": f"ServiceRequest/{service_request_id}"}]
    study["numberOfSeries"] = len(series_list)
    study["numberOfInstances"] = instance_count
    study["description"] = first.study_description or NO_DESCRIPTION
    study["series"] = [{k: v for k, v in series.items() if k != "instance" or v} for series in series_list]
    return RouterBuild(study, stopped)


def _add(
    header: InstanceHeader, series_list: list[dict[str, Any]], modalities: list[dict[str, str]], clock: dt.datetime
) -> int:
    """The router's addSeries + addInstance for one instance; returns how many instances it added (0 or 1).

    The order of the steps is the router's, because where it raises decides what the partial study holds: a new
    series is appended (and its modality listed) *before* its first instance is added, so an instance refused
    in addInstance leaves its new series behind with no instance; SeriesNumber and Modality are read only when
    a series is new, so an instance lacking them in a series already seen goes in.
    """
    if not header.series_instance_uid:
        raise _refused(header, "SeriesInstanceUID", "absent or empty")
    series = next((item for item in series_list if item["uid"] == header.series_instance_uid), None)
    if series is None:
        series = {
            "uid": header.series_instance_uid,
            "number": _series_number(header),
            "modality": {"system": DCM_SYSTEM, "code": _modality(header)},
            "description": header.series_description or NO_DESCRIPTION,
            "numberOfInstances": 0,
        }
        if series["modality"] not in modalities:
            modalities.append(series["modality"])
        started = _series_started(header, clock)
        if started is not None:
            series["started"] = started
        series["instance"] = []
        series_list.append(series)
    if any(item["uid"] == header.sop_instance_uid for item in series["instance"]):
        return 0  # the router skips a SOP Instance UID it already has in the series ("not unique")
    series["instance"].append(_instance(header))
    series["numberOfInstances"] += 1
    return 1


def _refused(header: InstanceHeader, keyword: str, why: str) -> ImagingStudyBuildError:
    uid = header.sop_instance_uid or "?"
    return ImagingStudyBuildError(
        f"DICOM attribute {keyword} {REQUIRED_TAGS[keyword]} of instance {uid} is {why}: the router's FHIR library "
        "refuses it and stops building the ImagingStudy there",
        tag=keyword,
        sop_instance_uid=header.sop_instance_uid,
    )


def _series_number(header: InstanceHeader) -> int:
    """`series.number = ds.SeriesNumber`: absent → AttributeError; empty, not an integer or negative → the
    library's unsignedInt validation (probed on fhir.resources 6.5.0 / pydantic 1.10.4)."""
    if header.series_number is None:
        raise _refused(header, "SeriesNumber", "absent")
    number = _integer(header.series_number)
    if number is None or number < 0:
        raise _refused(header, "SeriesNumber", f"not an unsignedInt ({header.series_number!r})")
    return number


def _modality(header: InstanceHeader) -> str:
    """`gen_modality_coding(ds.Modality)`: absent → AttributeError; empty or blank → the Code pattern fails."""
    if header.modality is None:
        raise _refused(header, "Modality", "absent")
    if not _FHIR_CODE.match(header.modality):
        raise _refused(header, "Modality", f"not a FHIR code ({header.modality!r})")
    return header.modality


def _series_started(header: InstanceHeader, clock: dt.datetime) -> str | None:
    """The router's series `started` (dicom2fhir.addSeries @ 9f5d3b3):

        now = datetime.now()
        try: stime = ds.SeriesTime
        except: stime = now.strftime("%H%M%S")
        try: sdate = ds.SeriesDate; series.started = fhirutils.gen_started_datetime(sdate, stime)
        except: sdate = now.strftime("%Y%m%d")        # series.started stays unset

    So: no SeriesDate (or one strptime refuses) → no `started`; no SeriesTime → the router's clock's time of day
    (`ROUTER_HOST_ZONE`, UTC in its container) labelled +07:00; an empty or short SeriesTime → zone-less midnight.
    """
    if header.series_date is None:
        return None
    series_time = header.series_time
    if series_time is None:
        series_time = clock.astimezone(ROUTER_HOST_ZONE).strftime("%H%M%S")
    return gen_started(header.series_date, series_time)


def _instance(header: InstanceHeader) -> dict[str, Any]:
    """addInstance: `gen_instance_sopclass(ds.SOPClassUID)` (absent → TypeError; empty → "urn:oid:"), then
    `number = ds.InstanceNumber` (absent → AttributeError; empty, not an integer, negative → unsignedInt fails)."""
    if header.sop_class_uid is None:
        raise _refused(header, "SOPClassUID", "absent")
    if header.instance_number is None:
        raise _refused(header, "InstanceNumber", "absent")
    number = _integer(header.instance_number)
    if number is None or number < 0:
        raise _refused(header, "InstanceNumber", f"not an unsignedInt ({header.instance_number!r})")
    return {
        "uid": header.sop_instance_uid,
        "sopClass": {"system": SOP_CLASS_SYSTEM, "code": f"urn:oid:{header.sop_class_uid}"},
        "number": number,
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


def gen_started(date: str | None, time: str | None) -> str | None:
    """`started` from DICOM DA + TM exactly as the router's `fhirutils.gen_started_datetime` (v1.1.0 @ 9f5d3b3):

        if dt is None: return None
        dttm = datetime.strptime(dt, '%Y%m%d')
        fhirDtm = fhirtypes.DateTime(year=dttm.year, month=dttm.month, day=dttm.day)   # naive midnight
        if tm is None or len(tm) < 6: return fhirDtm
        fhirtime = datetime.strptime(tm[0:6], '%H%M%S')
        return fhirtypes.DateTime(..., hour, minute, second, tzinfo=<tz_name Asia/Jakarta>)

    serialised by fhir.resources as `isoformat()`. So `101500` → `…T10:15:00+07:00`; absent, empty or `1015`
    → `YYYY-MM-DDT00:00:00` with no zone (the platform refuses it); fractions are cut. The callers catch the
    strptime errors (an unparsable date or time): None, no `started` at all.
    """
    if date is None:
        return None
    try:
        day = dt.datetime.strptime(date, "%Y%m%d")
    except ValueError:
        return None
    if time is None or len(time) < 6:
        return day.isoformat()  # naive: "2024-01-01T00:00:00"
    try:
        clock = dt.datetime.strptime(time[0:6], "%H%M%S").time()
    except ValueError:
        return None
    return dt.datetime.combine(day.date(), clock, tzinfo=JAKARTA).isoformat()


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
