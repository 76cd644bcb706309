"""Pure DICOM tag edits for SATUSEHAT, and the pre-flight check of what the official DICOM Router reads.

The router links a study to its ServiceRequest by AccessionNumber (it must equal the ACSN) and takes the patient
from `ServiceRequest.subject`; PatientID = IHS number is what peers set as well, harmless and optional. Nothing
else may change: the ImagingStudy and the stored instances are keyed by the original UIDs.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

from models.inputs import check_acsn

ACCESSION_NUMBER_MAX = 16
"""AccessionNumber is SH: at most 16 characters (PS3.5 §6.2)."""

PATIENT_ID_MAX = 64
"""PatientID is LO: at most 64 characters (PS3.5 §6.2)."""

ROUTER_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
ROUTER_TEXT_KEYWORDS = ("AccessionNumber", "Modality")
ROUTER_NUMBER_KEYWORDS = ("SeriesNumber", "InstanceNumber")
ROUTER_REQUIRED_KEYWORDS = ROUTER_UID_KEYWORDS + ROUTER_TEXT_KEYWORDS + ROUTER_NUMBER_KEYWORDS
"""Read without fallback by the router's ImagingStudy builder: missing or empty, the ImagingStudy is not made."""


def edit_for_satusehat(ds: Dataset, *, accession_number: str, patient_id: str | None) -> Dataset:
    """Set AccessionNumber to the ACSN and, when given, PatientID to the IHS number; return `ds` itself.

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


def check_routable(ds: Dataset) -> list[str]:
    """List what would make the official router fail to build an ImagingStudy from `ds` (empty list: routable).

    Checks that every element the router reads without fallback is present and non-empty, that the UIDs are
    valid UIDs (the router writes them into FHIR as urn:oid:...), and that SeriesNumber and InstanceNumber are
    integers. Pure: `ds` is not changed.
    """
    problems: list[str] = []
    for keyword in ROUTER_REQUIRED_KEYWORDS:
        if keyword not in ds:
            problems.append(f"{keyword} is missing")
            continue
        try:
            value = ds.get(keyword)  # a malformed value read from a file fails here, on first access
        except (ValueError, TypeError, OverflowError) as error:
            problems.append(f"{keyword} cannot be read: {error}")
            continue
        if _is_empty(value):
            problems.append(f"{keyword} is empty")
        elif keyword in ROUTER_UID_KEYWORDS and not UID(str(value)).is_valid:
            problems.append(f"{keyword} {str(value)!r} is not a valid UID")
        elif keyword in ROUTER_NUMBER_KEYWORDS and not _is_integer(value):
            problems.append(f"{keyword} {str(value)!r} is not an integer")
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
