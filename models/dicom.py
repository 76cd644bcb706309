"""Pure DICOM tag edits for SATUSEHAT, and the pre-flight check of what the official DICOM Router reads.

The router links a study to its ServiceRequest by AccessionNumber (it must equal the ACSN) and takes the patient
from `ServiceRequest.subject`; PatientID = IHS number is what peers set as well, harmless and optional. Nothing
else may change: the ImagingStudy and the stored instances are keyed by the original UIDs.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, tzinfo
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from models.inputs import check_acsn
from models.timeutil import EARLIEST_DATETIME, MAX_CLOCK_SKEW

ACCESSION_NUMBER_MAX = 16
"""AccessionNumber is SH: at most 16 characters (PS3.5 §6.2)."""

PATIENT_ID_MAX = 64
"""PatientID is LO: at most 64 characters (PS3.5 §6.2)."""

ROUTER_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
ROUTER_TEXT_KEYWORDS = ("AccessionNumber", "Modality")
ROUTER_NUMBER_KEYWORDS = ("SeriesNumber", "InstanceNumber")
ROUTER_REQUIRED_KEYWORDS = ROUTER_UID_KEYWORDS + ROUTER_TEXT_KEYWORDS + ROUTER_NUMBER_KEYWORDS
"""Read without fallback by the router's ImagingStudy builder: missing or empty, the ImagingStudy is not made."""


def edit_for_satusehat(
    ds: Dataset, *, accession_number: str, patient_id: str | None, times: TimeEdits | None = None
) -> Dataset:
    """Set AccessionNumber to the ACSN and, when given, PatientID to the IHS number; return `ds` itself.

    With `times` (the pre-flight's `StudyCheck.times`), StudyTime and the series' SeriesDate/SeriesTime are also
    written where they differ from it: as HHMMSS, so the router builds a `started` the platform accepts.

    The edit is in place: the send path streams ~300 instances/s of ~512 KB, and a deep copy per instance would
    copy every pixel buffer only to drop the original. Callers that need the PACS original keep their own copy.
    Only the two elements change; UIDs, file meta, pixel data and every other element are left as they were.
    Both values are validated first, so a bad ACSN raises ValueError and leaves `ds` untouched.
    """
    validate_accession_number(accession_number)
    if patient_id is not None:
        validate_patient_id(patient_id)
    ds.AccessionNumber = accession_number
    if patient_id is not None:
        ds.PatientID = patient_id
    if times is not None:
        for keyword, value in times.values_for(str(ds.get("SeriesInstanceUID", "") or "")).items():
            if str(ds.get(keyword, "") or "").strip() != value:
                setattr(ds, keyword, value)
    return ds


def validate_accession_number(value: str) -> None:
    """Raise ValueError unless `value` is a usable ACSN: 1-16 printable ASCII characters, no backslash, and none
    of the characters the order's ACSN may not carry either (`models.inputs.check_acsn`: one rule for both).

    Leading or trailing spaces are refused rather than stripped: SH padding is insignificant, so the value read
    back would differ from the ServiceRequest's ACSN identifier the router searches for.
    """
    _validate_text("accession number", value, ACCESSION_NUMBER_MAX)
    check_acsn(value)


def validate_patient_id(value: str) -> None:
    """Raise ValueError unless `value` is a usable PatientID (LO): 1-64 printable ASCII characters, no backslash."""
    _validate_text("patient id", value, PATIENT_ID_MAX)


def _validate_text(what: str, value: str, max_length: int) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value or not value.strip():
        raise ValueError(f"{what} must not be empty")
    if len(value) > max_length:
        raise ValueError(f"{what} has {len(value)} characters; DICOM allows at most {max_length}")
    if "\\" in value:
        raise ValueError(f"{what} must not contain a backslash (the DICOM value separator)")
    bad = sorted({ch for ch in value if not " " <= ch <= "~"})
    if bad:
        raise ValueError(f"{what} must be printable ASCII; found {', '.join(repr(ch) for ch in bad)}")
    if value != value.strip(" "):
        raise ValueError(f"{what} must not start or end with a space (DICOM drops the padding)")


def check_routable(ds: Dataset | Mapping[str, Any]) -> list[str]:
    """List what would make the official router fail to build an ImagingStudy from `ds` (empty list: routable).

    Checks that every element the router reads without fallback is present and non-empty, that the UIDs are
    valid UIDs (the router writes them into FHIR as urn:oid:...), and that SeriesNumber and InstanceNumber are
    non-negative integers. Pure: `ds` is not changed.
    """
    problems: list[str] = []
    for keyword in ROUTER_REQUIRED_KEYWORDS:
        try:
            value = ds.get(keyword)  # a malformed value read from a file fails here, on first access
        except (ValueError, TypeError, OverflowError) as error:
            problems.append(f"{keyword} cannot be read: {error}")
            continue
        rule = _element_rule(keyword, value, keyword in ds)
        if rule is not None:
            problems.append(f"{keyword} {rule}")
    return problems


def _is_empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str | bytes):
        return not value.strip()
    return str(value).strip() == ""


def _is_integer(value: object) -> bool:
    try:
        int(str(value).strip())
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# The study pre-flight: the PACS metadata checked before anything is created on the platform

STUDY_METADATA_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ContentDate",
    "ContentTime",
    "StudyDescription",
)
"""What the pre-flight reads of every instance (the PACS's WADO-RS metadata; no pixel data)."""

_PREFLIGHT_KEYWORDS = tuple(keyword for keyword in ROUTER_REQUIRED_KEYWORDS if keyword != "AccessionNumber")
"""The router's required elements, less AccessionNumber: the gateway writes that one itself."""

_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")
_DA = re.compile(r"\d{8}")


def normalise_time(value: str) -> str:
    """A DICOM TM written as HHMMSS[.FFFFFF], the only form the official router reads as a time.

    `1015` (HHMM) and `10` (HH) are valid DICOM times the router turns into a zone-less midnight the platform
    refuses; they mean 10:15:00 and 10:00:00, so writing the seconds out adds nothing that was not recorded.
    ACR-NEMA's `10:15:00` is read too. Raises ValueError naming the rule.
    """
    text = value.strip().replace(":", "")
    match = _TM.fullmatch(text)
    if match is None or (match.group(4) and match.group(3) is None):
        raise ValueError(f"{value.strip()!r} is not a DICOM time (HHMMSS, HHMM or HH, optionally .FFFFFF)")
    hours, minutes, seconds = match.group(1), match.group(2) or "00", match.group(3) or "00"
    if int(hours) > 23 or int(minutes) > 59 or int(seconds) > 59:
        raise ValueError(f"{value.strip()!r} is not a time of day (hours 00-23, minutes and seconds 00-59)")
    return hours + minutes + seconds + (match.group(4) or "")


def parse_date(value: str) -> date:
    """A DICOM DA (YYYYMMDD) as a date; raises ValueError naming the rule."""
    text = value.strip()
    try:
        if _DA.fullmatch(text) is None:
            raise ValueError
        return datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise ValueError(f"{text!r} is not a DICOM date (YYYYMMDD)") from None


def _checked_date(value: str) -> str:
    parse_date(value)
    return value.strip()


def _as_time(value: str) -> time:
    """A normalised TM as a `time` (fraction to microseconds)."""
    whole, _, fraction = value.partition(".")
    return time(int(whole[:2]), int(whole[2:4]), int(whole[4:6]), int((fraction + "000000")[:6]))


@dataclass(frozen=True)
class TimeEdits:
    """The StudyTime and each series' SeriesDate/SeriesTime the tag edit writes, where the stored value differs.

    Plain strings, so the plan travels as a task parameter (JSON) from the pre-flight to the routing.
    """

    study_time: str
    series: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """SeriesInstanceUID -> (SeriesDate, SeriesTime)."""

    def values_for(self, series_instance_uid: str) -> dict[str, str]:
        values = {"StudyTime": self.study_time}
        if series_instance_uid in self.series:
            values["SeriesDate"], values["SeriesTime"] = self.series[series_instance_uid]
        return values

    def as_json(self) -> dict[str, Any]:
        return {"study_time": self.study_time, "series": {uid: list(pair) for uid, pair in self.series.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TimeEdits:
        series = {str(uid): (str(pair[0]), str(pair[1])) for uid, pair in dict(data.get("series") or {}).items()}
        return cls(str(data["study_time"]), series)


@dataclass(frozen=True)
class StudyProblem:
    """One instance (or series) the router would mangle: which, which element, which rule."""

    where: str
    keyword: str
    rule: str


@dataclass(frozen=True)
class StudyCheck:
    """What the pre-flight found: the problems (none: routable), and what the FHIR steps may use of the study."""

    problems: tuple[StudyProblem, ...]
    instances: int
    series: int
    modalities: tuple[str, ...]
    description: str | None
    started: datetime | None
    """StudyDate + StudyTime in the PACS's zone; None when they are not usable."""
    times: TimeEdits | None
    """What the tag edit writes so the router builds a valid `started`; None when the study is refused."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self, limit: int = 5) -> str:
        """One message per (element, rule), naming the first instances it concerns: no patient data in it."""
        grouped: dict[tuple[str, str], list[str]] = {}
        for problem in self.problems:
            grouped.setdefault((problem.keyword, problem.rule), []).append(problem.where)
        lines = []
        for (keyword, rule), where in list(grouped.items())[:limit]:
            more = f" and {len(where) - 3} more" if len(where) > 3 else ""
            lines.append(f"{keyword} {rule} ({', '.join(where[:3])}{more})")
        if len(grouped) > limit:
            lines.append(f"and {len(grouped) - limit} more kinds of problem")
        return "; ".join(lines)


def check_study(instances: Sequence[Mapping[str, str | None]], *, zone: tzinfo, now: datetime) -> StudyCheck:
    """Check a whole study, from its PACS metadata, for what would stop the official router or the platform.

    `instances` holds, per instance, the STUDY_METADATA_KEYWORDS as text (absent: not in the mapping; present
    but empty: ""). Rules, each named in the problem with the instance:

    * every instance has valid Study/Series/SOP Instance UIDs and SOP Class UID, a Modality, and a SeriesNumber
      and InstanceNumber that are non-negative integers (the router's FHIR library stops building the
      ImagingStudy at the first instance without them and posts the part before it);
    * StudyDate is a date, and StudyTime a DICOM time (written HHMMSS by the tag edit). A missing or empty
      StudyTime is taken from the study itself when it can be: the earliest SeriesTime, AcquisitionTime or
      ContentTime of the study recorded on the StudyDate. Otherwise the study is refused: the gateway does not
      make up a time (the router would write a zone-less midnight the platform refuses);
    * each series' SeriesDate/SeriesTime is a date and a time; a missing one is taken from the series' earliest
      AcquisitionDate/Time, else ContentDate/Time; else refused (the router would use its own clock);
    * the study's and each series' start, in `zone`, is not before 2014-06-03 nor in the future (the platform's
      date rules).
    """
    problems: list[StudyProblem] = []
    by_series: dict[str, list[Mapping[str, str | None]]] = {}
    for number, values in enumerate(instances, 1):
        where = f"instance {_text(values, 'SOPInstanceUID') or f'#{number}'}"
        for keyword in _PREFLIGHT_KEYWORDS:
            rule = _element_rule(keyword, values.get(keyword), keyword in values)
            if rule is not None:
                problems.append(StudyProblem(where, keyword, rule))
        series_uid = _text(values, "SeriesInstanceUID")
        if series_uid:
            by_series.setdefault(series_uid, []).append(values)

    modalities = tuple(dict.fromkeys(m for m in (_text(v, "Modality") for v in instances) if m))
    description = next((d for d in (_text(v, "StudyDescription") for v in instances) if d), None)
    started, study_time = _study_start(instances, zone, problems)
    series_times: dict[str, tuple[str, str]] = {}
    for series_uid, members in by_series.items():
        pair = _series_start(series_uid, members, problems)
        if pair is not None:
            series_times[series_uid] = pair
            _check_range(combine(pair[0], pair[1], zone), now, f"series {series_uid}", "SeriesDate", problems)
    if started is not None:
        _check_range(started, now, "the study", "StudyDate", problems)
    times = TimeEdits(study_time, series_times) if study_time is not None and not problems else None
    return StudyCheck(
        problems=tuple(problems),
        instances=len(instances),
        series=len(by_series),
        modalities=modalities,
        description=description,
        started=started,
        times=times,
    )


def combine(da: str, tm: str, zone: tzinfo) -> datetime:
    """DA + normalised TM in `zone`, as an aware datetime."""
    return datetime.combine(parse_date(da), _as_time(tm), tzinfo=zone)


def _text(values: Mapping[str, str | None], keyword: str) -> str:
    return str(values.get(keyword) or "").strip()


def _element_rule(keyword: str, value: object, present: bool) -> str | None:
    """Why the router cannot take this element, or None (the rules of `check_routable`)."""
    if not present:
        return "is missing"
    if _is_empty(value):
        return "is empty"
    text = str(value).strip()
    if keyword in ROUTER_UID_KEYWORDS and not UID(text).is_valid:
        return f"{text!r} is not a valid UID"
    if keyword in ROUTER_NUMBER_KEYWORDS:
        if not _is_integer(text):
            return f"{text!r} is not an integer"
        if int(text) < 0:
            return f"{text} is negative (FHIR's unsignedInt)"
    return None


def _study_start(
    instances: Sequence[Mapping[str, str | None]], zone: tzinfo, problems: list[StudyProblem]
) -> tuple[datetime | None, str | None]:
    """The study's start and the StudyTime to write, from the first instance's StudyDate/StudyTime."""
    if not instances:
        return None, None
    first = instances[0]
    where = f"instance {_text(first, 'SOPInstanceUID') or '#1'}"
    study_date = _text(first, "StudyDate")
    if not study_date:
        problems.append(StudyProblem(where, "StudyDate", "is missing or empty: the study's start is unknown"))
        return None, None
    try:
        parse_date(study_date)
    except ValueError as error:
        problems.append(StudyProblem(where, "StudyDate", str(error)))
        return None, None
    stored = _text(first, "StudyTime")
    if stored:
        try:
            study_time = normalise_time(stored)
        except ValueError as error:
            problems.append(StudyProblem(where, "StudyTime", str(error)))
            return None, None
    else:
        found = _earliest(
            instances,
            (("SeriesDate", "SeriesTime"), ("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")),
            on_date=study_date,
        )
        if found is None:
            problems.append(
                StudyProblem(
                    where,
                    "StudyTime",
                    "is missing or empty, and no SeriesTime, AcquisitionTime or ContentTime of the study on its "
                    "StudyDate gives the study's time; the gateway does not make one up",
                )
            )
            return None, None
        study_time = found[1]
    return combine(study_date, study_time, zone), study_time


def _series_start(
    series_uid: str, members: Sequence[Mapping[str, str | None]], problems: list[StudyProblem]
) -> tuple[str, str] | None:
    """(SeriesDate, SeriesTime) to write for the series: as stored (the time as HHMMSS), else its earliest
    acquisition or content date and time."""
    first = members[0]
    where = f"series {series_uid}"
    stored_date, stored_time = _text(first, "SeriesDate"), _text(first, "SeriesTime")
    found = None
    if not stored_date or not stored_time:
        found = _earliest(members, (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")))
    result: list[str] = []
    for keyword, stored, position, check in (
        ("SeriesDate", stored_date, 0, _checked_date),
        ("SeriesTime", stored_time, 1, normalise_time),
    ):
        if stored:
            try:
                result.append(str(check(stored)))
            except ValueError as error:
                problems.append(StudyProblem(where, keyword, str(error)))
        elif found is not None:
            result.append(found[position])
        else:
            problems.append(
                StudyProblem(
                    where,
                    keyword,
                    "is missing or empty, and no acquisition or content date and time of the series gives it; the "
                    "gateway does not make one up (the router would use its own clock)",
                )
            )
    return (result[0], result[1]) if len(result) == 2 else None


def _earliest(
    instances: Sequence[Mapping[str, str | None]],
    pairs: Sequence[tuple[str, str]],
    on_date: str | None = None,
) -> tuple[str, str] | None:
    """The earliest valid (date, normalised time) among the instances' date/time element pairs, if any
    (only those on `on_date` when given)."""
    candidates: list[tuple[str, str]] = []
    for values in instances:
        for date_keyword, time_keyword in pairs:
            da, tm = _text(values, date_keyword), _text(values, time_keyword)
            if not da or not tm or (on_date is not None and da != on_date):
                continue
            try:
                parse_date(da)
                candidates.append((da, normalise_time(tm)))
            except ValueError:
                continue
    return min(candidates, key=lambda pair: (pair[0], _as_time(pair[1]))) if candidates else None


def _check_range(started: datetime, now: datetime, what: str, keyword: str, problems: list[StudyProblem]) -> None:
    if started < EARLIEST_DATETIME:
        problems.append(StudyProblem(what, keyword, f"puts the start at {started.isoformat()}, before 2014-06-03"))
    elif started > now + MAX_CLOCK_SKEW:
        problems.append(StudyProblem(what, keyword, f"puts the start at {started.isoformat()}, in the future"))


# --------------------------------------------------------------------------------------------------------------
# The same edit on the encoded instance: the send path's form


class RoutingSummary(Mapping[str, str]):
    """The elements of an encoded instance that the router pre-flight reads, as text by keyword.

    Enough for `check_routable` and the router client (`in`, `.get`, attribute access), without building a pydicom
    Dataset per instance: converting its elements cost more than the whole edit.
    """

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values

    def __getitem__(self, keyword: str) -> str:
        return self._values[keyword]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, keyword: str) -> str:
        try:
            return self._values[keyword]
        except KeyError:
            raise AttributeError(keyword) from None

    def __repr__(self) -> str:
        return f"RoutingSummary({self._values!r})"


@dataclass(frozen=True, eq=False)
class EncodedInstance:
    """One instance as a C-STORE carries it: the data set bytes (no preamble, no file meta), already edited, in the
    transfer syntax the PACS stored it in.

    Why this form: decoding a 512 KB CT slice with pydicom, editing it and letting pynetdicom encode it again cost
    more per instance than sending it (bench/RESULTS.md). Here the two short elements are replaced in the encoded
    bytes and the rest, pixel data included, is never copied: `parts` are slices of the PACS's buffer around the
    new elements, and their concatenation is the edited data set. `summary` holds what the router pre-flight
    reads, with AccessionNumber and PatientID as edited.
    """

    transfer_syntax_uid: UID
    parts: tuple[bytes | memoryview, ...]
    summary: RoutingSummary | Dataset

    @property
    def nbytes(self) -> int:
        return sum(len(part) for part in self.parts)

    @property
    def sop_class_uid(self) -> str:
        return str(self.summary.get("SOPClassUID", "") or "")

    @property
    def sop_instance_uid(self) -> str:
        return str(self.summary.get("SOPInstanceUID", "") or "")

    def data_set_bytes(self) -> bytes:
        """The edited data set in one buffer (a copy: for tests and transfer syntax conversion, not the hot path)."""
        return b"".join(self.parts)

    def to_dataset(self) -> Dataset:
        """Decode the whole edited instance, with file meta: what a transfer syntax conversion starts from."""
        ts = self.transfer_syntax_uid
        data = self.data_set_bytes()
        if ts.is_deflated:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        ds = read_dataset(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.sop_class_uid
        meta.MediaStorageSOPInstanceUID = self.sop_instance_uid
        meta.TransferSyntaxUID = ts
        ds.file_meta = meta
        ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
        return ds


def edit_encoded_for_satusehat(
    part10: bytes, *, accession_number: str, patient_id: str | None, times: TimeEdits | None = None
) -> EncodedInstance:
    """`edit_for_satusehat` on a Part-10 file as the PACS sent it; return the edited data set ready to send.

    The file is walked element by element only up to InstanceNumber (0020,0013); AccessionNumber and PatientID are
    replaced (or inserted in tag order), a retired group length covering them is corrected, and everything else
    stays byte for byte as stored. Files this walk does not handle (no Part-10 header, deflated, elements out of
    order, truncated) take the general path instead: decode with pydicom, edit, encode in the same transfer
    syntax; same result, slower. Bad values raise ValueError before anything is read.
    """
    validate_accession_number(accession_number)
    if patient_id is not None:
        validate_patient_id(patient_id)
    try:
        return _edit_encoding(part10, accession_number, patient_id, times)
    except _NotPlain:
        return _edit_by_reencoding(part10, accession_number, patient_id, times)


class _NotPlain(Exception):
    """The encoded edit does not handle this file; the general path does."""


_ACCESSION = 0x00080050
_PATIENT_ID = 0x00100020
_LAST_READ = 0x00200013  # InstanceNumber: the highest tag the edit and the router pre-flight need
_SUMMARY_KEYWORDS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080050: "AccessionNumber",
    0x00080060: "Modality",
    0x00100020: "PatientID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
    0x00200013: "InstanceNumber",
}
_TIME_TAGS = {"SeriesDate": 0x00080021, "StudyTime": 0x00080030, "SeriesTime": 0x00080031}
_GROUP_LENGTHS = (0x00080000, 0x00100000)
_EDIT_VR = {_ACCESSION: b"SH", _PATIENT_ID: b"LO", 0x00080021: b"DA", 0x00080030: b"TM", 0x00080031: b"TM"}
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_WANTED = frozenset(_SUMMARY_KEYWORDS) | frozenset(_GROUP_LENGTHS) | frozenset(_TIME_TAGS.values())
_EDIT_TAGS = tuple(sorted(_EDIT_VR))


class _Walker:
    """Element headers of one encoding, read with one struct call each; undefined-length values are skipped."""

    def __init__(self, buf: memoryview, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        order = "<" if little else ">"
        self.explicit_header = struct.Struct(order + "HH2sH")
        self.implicit_header = struct.Struct(order + "HHL")
        self.long = struct.Struct(order + "L")

    def element(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value offset, end offset) of the element at `pos`."""
        buf = self.buf
        if pos + 8 > len(buf):
            raise _NotPlain("truncated element header")
        vr: bytes | None
        if implicit:
            group, elem, length = self.implicit_header.unpack_from(buf, pos)
            vr, value = None, pos + 8
        else:
            group, elem, vr, length = self.explicit_header.unpack_from(buf, pos)
            if vr in _LONG_LENGTH_VRS:
                if pos + 12 > len(buf):
                    raise _NotPlain("truncated element header")
                (length,) = self.long.unpack_from(buf, pos + 8)
                value = pos + 12
            elif vr.isalpha() and vr.isupper():
                value = pos + 8
            else:
                raise _NotPlain(f"not an explicit VR at offset {pos}")
        if length == _UNDEFINED:
            # An undefined length is a sequence (or UN, whose content is implicit VR little endian: PS3.5 6.2.2).
            return group << 16 | elem, vr, value, self.skip_sequence(value, implicit or vr == b"UN")
        end = value + length
        if end > len(buf):
            raise _NotPlain("value runs past the end of the file")
        return group << 16 | elem, vr, value, end

    def skip_sequence(self, pos: int, implicit: bool) -> int:
        """Offset just past the delimiter of an undefined-length sequence whose first item starts at `pos`."""
        buf = self.buf
        while True:
            if pos + 8 > len(buf):
                raise _NotPlain("truncated sequence")
            group, elem, length = self.implicit_header.unpack_from(buf, pos)
            tag = group << 16 | elem
            if tag == _SEQUENCE_END:
                return pos + 8
            if tag != _ITEM:
                raise _NotPlain(f"unexpected tag {tag:08X} in a sequence")
            if length == _UNDEFINED:
                pos = self._skip_item(pos + 8, implicit)
            elif pos + 8 + length > len(buf):
                raise _NotPlain("item runs past the end of the file")
            else:
                pos += 8 + length

    def _skip_item(self, pos: int, implicit: bool) -> int:
        """Offset just past the delimiter of an undefined-length item whose first element starts at `pos`."""
        while True:
            if pos + 8 > len(self.buf):
                raise _NotPlain("truncated item")
            group, elem, _ = self.implicit_header.unpack_from(self.buf, pos)
            if group << 16 | elem == _ITEM_END:
                return pos + 8
            pos = self.element(pos, implicit)[3]


def _edit_encoding(
    part10: bytes, accession_number: str, patient_id: str | None, times: TimeEdits | None = None
) -> EncodedInstance:
    buf = memoryview(part10)
    start, ts = _after_file_meta(buf)
    try:
        deflated, implicit, little = ts.is_deflated, ts.is_implicit_VR, ts.is_little_endian
    except ValueError as error:  # a transfer syntax pydicom does not know: it cannot say how to walk it
        raise _NotPlain(str(error)) from None
    if deflated:
        raise _NotPlain("deflated data sets are edited after inflating")
    walker = _Walker(buf, implicit, little)

    # Top-level walk up to InstanceNumber: where the edited elements are (or would go) and what the pre-flight reads.
    found: dict[int, tuple[int, int, int]] = {}  # tag -> (header offset, value offset, end offset)
    insert_at: dict[int, int] = {}  # edited tag -> offset of the first element at or after it
    pending, next_insert = _EDIT_TAGS, 0
    previous, pos = -1, start
    while pos < len(buf):
        tag, _, value, end = walker.element(pos, implicit)
        if tag <= previous:
            raise _NotPlain("elements out of order")
        while next_insert < len(pending) and tag >= pending[next_insert]:
            insert_at[pending[next_insert]] = pos
            next_insert += 1
        if tag > _LAST_READ:
            break
        if tag in _WANTED:
            found[tag] = (pos, value, end)
        previous, pos = tag, end
    for tag in pending[next_insert:]:
        insert_at[tag] = pos

    def stored(tag: int) -> str:
        return bytes(buf[found[tag][1] : found[tag][2]]).decode("latin-1").strip(" \0") if tag in found else ""

    summary = {keyword: stored(tag) for tag, keyword in _SUMMARY_KEYWORDS.items() if tag in found}
    new_values = {_ACCESSION: accession_number}
    if patient_id is not None:
        new_values[_PATIENT_ID] = patient_id
    if times is not None:
        for keyword, text in times.values_for(summary.get("SeriesInstanceUID", "")).items():
            if stored(_TIME_TAGS[keyword]) != text:
                new_values[_TIME_TAGS[keyword]] = text
    edits: list[tuple[int, int, bytes]] = []
    growth: dict[int, int] = {}
    for tag, text in sorted(new_values.items()):
        encoded = _encode_element(tag, _EDIT_VR[tag], _padded(text), implicit, little)
        old = found.get(tag)
        begin, end = (old[0], old[2]) if old is not None else (insert_at[tag], insert_at[tag])
        edits.append((begin, end, encoded))
        growth[tag & 0xFFFF0000] = growth.get(tag & 0xFFFF0000, 0) + len(encoded) - (end - begin)
        if tag in _SUMMARY_KEYWORDS:
            summary[_SUMMARY_KEYWORDS[tag]] = text
    for group, delta in growth.items():
        group_length = found.get(group)
        if group_length is not None:
            edits.append(_group_length_edit(walker, group_length, delta))

    parts: list[bytes | memoryview] = []
    cursor = start
    for begin, end, replacement in _merged(edits):
        if begin > cursor:
            parts.append(buf[cursor:begin])
        parts.append(replacement)
        cursor = end
    if cursor < len(buf):
        parts.append(buf[cursor:])
    return EncodedInstance(ts, tuple(parts), RoutingSummary(summary))


def _after_file_meta(buf: memoryview) -> tuple[int, UID]:
    """Offset of the data set after the Part-10 preamble and file meta, and the meta's transfer syntax."""
    if len(buf) < 144 or bytes(buf[128:132]) != b"DICM":
        raise _NotPlain("no Part-10 header")
    walker = _Walker(buf, implicit=False, little=True)
    pos, syntax = 132, None
    while pos + 8 <= len(buf) and bytes(buf[pos : pos + 2]) == b"\x02\x00":
        tag, _, value, end = walker.element(pos, implicit=False)
        if tag == 0x00020010:
            syntax = bytes(buf[value:end]).rstrip(b"\0 ").decode("ascii", "replace")
        pos = end
    if not syntax:
        raise _NotPlain("no transfer syntax in the file meta")
    return pos, UID(syntax)


def _padded(text: str) -> bytes:
    value = text.encode("ascii")
    return value + b" " if len(value) % 2 else value


def _encode_element(tag: int, vr: bytes, value: bytes, implicit: bool, little: bool) -> bytes:
    order = "<" if little else ">"
    if implicit:
        return struct.pack(order + "HHL", tag >> 16, tag & 0xFFFF, len(value)) + value
    return struct.pack(order + "HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _group_length_edit(walker: _Walker, element: tuple[int, int, int], delta: int) -> tuple[int, int, bytes]:
    _, value, end = element
    if end - value != 4:
        raise _NotPlain("group length element of unexpected size")
    (old,) = walker.long.unpack_from(walker.buf, value)
    return value, end, walker.long.pack(old + delta)


def _merged(edits: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """The edits in file order; two insertions at one offset stay in tag order (AccessionNumber first)."""
    ordered = sorted(enumerate(edits), key=lambda item: (item[1][0], item[1][1], item[0]))
    result: list[tuple[int, int, bytes]] = []
    for _, (begin, end, replacement) in ordered:
        if result and begin < result[-1][1]:
            raise _NotPlain("overlapping edits")
        if result and begin == result[-1][0] == result[-1][1] == end:
            result[-1] = (begin, end, result[-1][2] + replacement)
        else:
            result.append((begin, end, replacement))
    return result


class NotDicom(ValueError):
    """What came as an instance is not a DICOM file the gateway can send: not Part-10, no transfer syntax, a
    transfer syntax nobody knows, or bytes pydicom cannot read (an HTML error page, a truncated file)."""


def _edit_by_reencoding(
    part10: bytes, accession_number: str, patient_id: str | None, times: TimeEdits | None = None
) -> EncodedInstance:
    """The general path: pydicom decodes the whole file, the edit is `edit_for_satusehat`, then encode again."""
    opening = bytes(part10[128:132] if bytes(part10[128:132]) == b"DICM" else part10[:16])
    try:
        ds = dcmread(BytesIO(part10), force=True)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    except Exception as error:  # pydicom fails in many ways on bytes that are not DICOM
        raise NotDicom(f"not a readable DICOM file ({type(error).__name__}: {error}; starts {opening!r})") from None
    if not syntax:
        raise NotDicom(f"not a DICOM Part-10 file: without a transfer syntax in a file meta (starts {opening!r})")
    ts = UID(str(syntax))
    try:
        ts.is_implicit_VR  # noqa: B018  (raises for a UID that is not a known transfer syntax)
    except ValueError:
        raise NotDicom(f"unknown transfer syntax {str(ts)!r} in the file meta: cannot read the data set") from None
    edit_for_satusehat(ds, accession_number=accession_number, patient_id=patient_id, times=times)
    return EncodedInstance(ts, (encode_data_set(ds, ts),), ds)


def encode_data_set(ds: Dataset, transfer_syntax: UID) -> bytes:
    """`ds` without file meta, encoded in `transfer_syntax` (deflated too), as a C-STORE carries it."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax.is_implicit_VR
    fp.is_little_endian = transfer_syntax.is_little_endian
    write_dataset(fp, ds)
    data = fp.getvalue()
    if transfer_syntax.is_deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data
