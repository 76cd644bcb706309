"""models.dicom: the SATUSEHAT tag edit (in place, two elements only) and the router's pre-flight check."""

from __future__ import annotations

import copy
import struct
from io import BytesIO

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from models.dicom import (
    ACCESSION_NUMBER_MAX,
    PATIENT_ID_MAX,
    ROUTER_REQUIRED_KEYWORDS,
    EncodedInstance,
    check_routable,
    edit_encoded_for_satusehat,
    edit_for_satusehat,
    encode_data_set,
    validate_accession_number,
)
from stack.studies import StudySpec, iter_instances

EDITED = {"AccessionNumber", "PatientID"}


@pytest.fixture
def instance() -> Dataset:
    return next(iter_instances(StudySpec(series=1, instances_per_series=1, accession_number="PACS-ACC")))


def test_edit_sets_acsn_and_ihs_number_in_place(instance: Dataset) -> None:
    result = edit_for_satusehat(instance, accession_number="RAD2024000123", patient_id="P02478375538")

    assert result is instance, "in place: the hot path must not copy pixel data"
    assert instance.AccessionNumber == "RAD2024000123"
    assert instance.PatientID == "P02478375538"


def test_edit_leaves_every_other_element_and_the_file_meta_alone(instance: Dataset) -> None:
    before = copy.deepcopy(instance)
    pixels = instance.PixelData

    edit_for_satusehat(instance, accession_number="RAD2024000123", patient_id="P02478375538")

    assert {elem.keyword for elem in instance} == {elem.keyword for elem in before}
    for elem in before:
        if elem.keyword not in EDITED:
            assert instance[elem.tag] == elem, elem.keyword
    assert instance.file_meta == before.file_meta
    assert instance.PixelData is pixels, "the pixel buffer is the same object, not a copy"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        assert instance[keyword].value == before[keyword].value


def test_edit_without_patient_id_keeps_the_pacs_patient_id(instance: Dataset) -> None:
    edit_for_satusehat(instance, accession_number="RAD1", patient_id=None)
    assert instance.PatientID == "SYN0001"
    assert instance.AccessionNumber == "RAD1"


def test_edit_adds_the_elements_when_absent(instance: Dataset) -> None:
    del instance.AccessionNumber
    del instance.PatientID
    edit_for_satusehat(instance, accession_number="RAD1", patient_id="P1")
    assert (instance.AccessionNumber, instance.PatientID) == ("RAD1", "P1")
    assert instance["AccessionNumber"].VR == "SH" and instance["PatientID"].VR == "LO"


def test_edited_instance_round_trips_through_a_part10_file(instance: Dataset) -> None:
    before = copy.deepcopy(instance)
    edit_for_satusehat(instance, accession_number="RAD2024000123", patient_id="P02478375538")
    buffer = BytesIO()
    instance.save_as(buffer, enforce_file_format=True)

    read = dcmread(BytesIO(buffer.getvalue()))

    assert read.AccessionNumber == "RAD2024000123"
    assert read.PatientID == "P02478375538"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PixelData"):
        assert read[keyword].value == before[keyword].value, keyword
    assert read.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert check_routable(read) == []


@pytest.mark.parametrize(
    ("accession", "message"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("A" * (ACCESSION_NUMBER_MAX + 1), "at most 16"),
        ("RAD\\1", "backslash"),
        ("RAD\n1", "printable ASCII"),
        ("RAD\x001", "printable ASCII"),
        ("RAD\t1", "printable ASCII"),
        ("RADé1", "printable ASCII"),
        (" RAD1", "start or end with a space"),
        ("RAD1 ", "start or end with a space"),
    ],
)
def test_bad_accession_numbers_are_refused_and_nothing_changes(instance: Dataset, accession: str, message: str) -> None:
    before = copy.deepcopy(instance)
    with pytest.raises(ValueError, match=message):
        edit_for_satusehat(instance, accession_number=accession, patient_id="P1")
    assert instance == before


def test_longest_accession_number_is_accepted(instance: Dataset) -> None:
    edit_for_satusehat(instance, accession_number="A" * ACCESSION_NUMBER_MAX, patient_id=None)
    assert instance.AccessionNumber == "A" * ACCESSION_NUMBER_MAX


@pytest.mark.parametrize(
    ("patient_id", "message"),
    [
        ("", "must not be empty"),
        ("P" * (PATIENT_ID_MAX + 1), "at most 64"),
        ("P1\\P2", "backslash"),
        ("P1\r", "printable ASCII"),
    ],
)
def test_bad_patient_ids_are_refused_and_nothing_changes(instance: Dataset, patient_id: str, message: str) -> None:
    before = copy.deepcopy(instance)
    with pytest.raises(ValueError, match=message):
        edit_for_satusehat(instance, accession_number="RAD1", patient_id=patient_id)
    assert instance == before


def test_longest_patient_id_is_accepted(instance: Dataset) -> None:
    edit_for_satusehat(instance, accession_number="RAD1", patient_id="9" * PATIENT_ID_MAX)
    assert instance.PatientID == "9" * PATIENT_ID_MAX


# --------------------------------------------------------------------------------------------------------------
# check_routable


def test_a_complete_instance_is_routable(instance: Dataset) -> None:
    assert check_routable(instance) == []


@pytest.mark.parametrize("keyword", ROUTER_REQUIRED_KEYWORDS)
def test_each_missing_router_tag_is_reported(instance: Dataset, keyword: str) -> None:
    delattr(instance, keyword)
    assert check_routable(instance) == [f"{keyword} is missing"]


@pytest.mark.parametrize("keyword", ROUTER_REQUIRED_KEYWORDS)
def test_each_empty_router_tag_is_reported(instance: Dataset, keyword: str) -> None:
    instance[keyword].value = None
    assert check_routable(instance) == [f"{keyword} is empty"]


def read_patched(ds: Dataset, replacements: dict[bytes, bytes]) -> Dataset:
    """Write `ds`, replace byte strings of equal length in the file, read it back: a malformed PACS file."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    for old, new in replacements.items():
        assert len(old) == len(new) and data.count(old) == 1
        data = data.replace(old, new)
    return dcmread(BytesIO(data))


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_invalid_uid_and_non_integer_number_are_reported(instance: Dataset) -> None:
    instance.SeriesInstanceUID = "1.2.840.99999"
    instance.InstanceNumber = 77777
    malformed = read_patched(instance, {b"1.2.840.99999\0": b"1.2.840.9999x\0", b"77777 ": b"x7777 "})

    problems = check_routable(malformed)

    assert problems == [
        "SeriesInstanceUID '1.2.840.9999x' is not a valid UID",
        "InstanceNumber 'x7777' is not an integer",
    ]


def test_a_value_pydicom_refuses_to_read_is_reported(instance: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    instance.InstanceNumber = 77777
    malformed = read_patched(instance, {b"77777 ": b"x7777 "})
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.RAISE)

    problems = check_routable(malformed)

    assert len(problems) == 1 and problems[0].startswith("InstanceNumber cannot be read")


@pytest.mark.filterwarnings("ignore:Invalid value for VR", 'ignore:Value "7.5" is not valid')
def test_non_integer_series_number_is_reported(instance: Dataset) -> None:
    instance.SeriesNumber = 777
    malformed = read_patched(instance, {b"777 ": b"7.5 "})
    assert check_routable(malformed) == ["SeriesNumber '7.5' is not an integer"]


def test_every_problem_is_listed_at_once(instance: Dataset) -> None:
    del instance.Modality
    del instance.SeriesNumber
    instance.AccessionNumber = ""
    assert check_routable(instance) == ["AccessionNumber is empty", "Modality is missing", "SeriesNumber is missing"]


def test_check_routable_does_not_change_the_dataset(instance: Dataset) -> None:
    del instance.Modality
    before = copy.deepcopy(instance)
    check_routable(instance)
    assert instance == before


@pytest.mark.parametrize("acsn", ["ACC|1", "ACC&1", "ACC#1", "ACC%1", "ACC+1"])
def test_edit_refuses_what_the_order_refuses(acsn: str) -> None:
    """The same ACSN rule as the order's input (the router searches by it unencoded)."""
    with pytest.raises(ValueError, match="must not contain"):
        validate_accession_number(acsn)


# --------------------------------------------------------------------------------------------------------------
# The same edit on the encoded file (the send path)

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]


def as_part10(ds: Dataset, syntax: UID = ExplicitVRLittleEndian) -> bytes:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(
        buffer, enforce_file_format=True, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian
    )
    return buffer.getvalue()


def expected_edit(part10: bytes, accession: str, patient_id: str | None) -> Dataset:
    """What the pydicom path makes of the same file: the reference for the encoded edit."""
    ds = dcmread(BytesIO(part10))
    return edit_for_satusehat(ds, accession_number=accession, patient_id=patient_id)


def assert_same_dataset(encoded: EncodedInstance, expected: Dataset) -> None:
    got = encoded.to_dataset()
    assert [elem.tag for elem in got] == [elem.tag for elem in expected]
    for elem in expected:
        assert got[elem.tag].value == elem.value, elem.keyword
    assert encoded.transfer_syntax_uid == expected.file_meta.TransferSyntaxUID


def code_item(value: str, *, undefined: bool = False) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    nested = Dataset()
    nested.CodeMeaning = "nested " + value
    item.ConceptNameCodeSequence = Sequence([nested])
    if undefined:
        item.is_undefined_length_sequence_item = True
        item["ConceptNameCodeSequence"].is_undefined_length = True
        nested.is_undefined_length_sequence_item = True
    return item


def with_sequences(ds: Dataset, *, undefined: bool) -> Dataset:
    """Sequences before AccessionNumber (0008,0006), between the edits (0008,1140) and after them (0040,0275)."""
    ds.LanguageCodeSequence = Sequence([code_item("en", undefined=undefined), code_item("id", undefined=undefined)])
    ds.ReferencedImageSequence = Sequence([code_item("ref", undefined=undefined)])
    ds.RequestAttributesSequence = Sequence([code_item("req", undefined=undefined)])
    if undefined:
        for keyword in ("LanguageCodeSequence", "ReferencedImageSequence", "RequestAttributesSequence"):
            ds[keyword].is_undefined_length = True
    return ds


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda uid: uid.name)
@pytest.mark.parametrize("shape", ["plain", "absent", "sequences", "undefined-length sequences"])
def test_encoded_edit_equals_the_dataset_edit(instance: Dataset, syntax: UID, shape: str) -> None:
    if shape == "absent":
        del instance.AccessionNumber
        del instance.PatientID
    elif shape != "plain":
        with_sequences(instance, undefined=shape.startswith("undefined"))
    part10 = as_part10(instance, syntax)

    encoded = edit_encoded_for_satusehat(part10, accession_number="RAD2024000123", patient_id="P02478375538")

    assert len(encoded.parts) > 1, "edited in the encoding, not by the general path"
    assert_same_dataset(encoded, expected_edit(part10, "RAD2024000123", "P02478375538"))
    assert encoded.summary.AccessionNumber == "RAD2024000123"
    assert encoded.summary.PatientID == "P02478375538"
    assert check_routable(encoded.summary) == []


def test_encoded_edit_does_not_copy_the_pixel_data(instance: Dataset) -> None:
    part10 = as_part10(instance)
    encoded = edit_encoded_for_satusehat(part10, accession_number="RAD1", patient_id="P1")

    tail = encoded.parts[-1]
    assert isinstance(tail, memoryview) and tail.obj is part10, "a view of the PACS's buffer"
    assert len(tail) > len(instance.PixelData)
    assert encoded.nbytes == len(encoded.data_set_bytes())


def test_encoded_edit_without_patient_id_keeps_the_pacs_patient_id(instance: Dataset) -> None:
    encoded = edit_encoded_for_satusehat(as_part10(instance), accession_number="RAD1", patient_id=None)
    assert encoded.to_dataset().PatientID == "SYN0001"
    assert encoded.summary.PatientID == "SYN0001"
    assert encoded.to_dataset().AccessionNumber == "RAD1"


@pytest.mark.parametrize("accession", ["R", "RA", "A" * ACCESSION_NUMBER_MAX])
def test_encoded_edit_pads_values_to_even_length(instance: Dataset, accession: str) -> None:
    encoded = edit_encoded_for_satusehat(as_part10(instance), accession_number=accession, patient_id="P123")
    assert encoded.nbytes % 2 == 0
    assert encoded.to_dataset().AccessionNumber == accession


def test_encoded_edit_corrects_a_retired_group_length(instance: Dataset) -> None:
    """Old files carry (0008,0000) and (0010,0000): they must still cover their groups after the edit."""
    original = as_part10(instance)
    meta_end = 144 + int.from_bytes(original[140:144], "little")
    data = original[meta_end:]
    group_8, group_10 = (sum(len(_element_bytes(e)) for e in instance if e.tag.group == g) for g in (0x0008, 0x0010))
    part10 = b"".join(
        [
            original[:meta_end],
            struct.pack("<HH2sHL", 0x0008, 0x0000, b"UL", 4, group_8),
            data[:group_8],
            struct.pack("<HH2sHL", 0x0010, 0x0000, b"UL", 4, group_10),
            data[group_8:],
        ]
    )
    assert dcmread(BytesIO(part10))[0x0010, 0x0000].value == group_10, "the test file is what it says"

    encoded = edit_encoded_for_satusehat(part10, accession_number="RAD2024000123", patient_id="P02478375538")

    assert len(encoded.parts) > 1, "edited in the encoding"
    edited = encoded.to_dataset()
    for group in (0x0008, 0x0010):
        actual = sum(len(_element_bytes(elem)) for elem in edited if elem.tag.group == group and elem.tag.element)
        assert edited[group, 0x0000].value == actual
    assert (edited.AccessionNumber, edited.PatientID) == ("RAD2024000123", "P02478375538")
    assert edited.PixelData == instance.PixelData


def _element_bytes(elem: DataElement) -> bytes:
    ds = Dataset()
    ds.add(elem)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_deflated_files_take_the_general_path(instance: Dataset) -> None:
    deflated = as_part10(instance, DeflatedExplicitVRLittleEndian)

    encoded = edit_encoded_for_satusehat(deflated, accession_number="RAD1", patient_id="P1")

    assert encoded.parts and len(encoded.parts) == 1, "decoded, edited and encoded again"
    assert encoded.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert_same_dataset(encoded, expected_edit(deflated, "RAD1", "P1"))


def test_a_file_without_file_meta_cannot_say_its_syntax(instance: Dataset) -> None:
    bare = encode_data_set(instance, ExplicitVRLittleEndian)  # a data set alone, no preamble, no meta
    with pytest.raises(ValueError, match="without a transfer syntax"):
        edit_encoded_for_satusehat(bare, accession_number="RAD1", patient_id="P1")


def test_encoded_edit_validates_before_reading_anything() -> None:
    with pytest.raises(ValueError, match="at most 16"):
        edit_encoded_for_satusehat(b"not dicom at all", accession_number="A" * 17, patient_id=None)
    with pytest.raises(ValueError, match="backslash"):
        edit_encoded_for_satusehat(b"not dicom at all", accession_number="RAD1", patient_id="P1\\P2")


def test_the_summary_reports_what_the_router_needs(instance: Dataset) -> None:
    del instance.Modality
    instance.SeriesNumber = None
    encoded = edit_encoded_for_satusehat(as_part10(instance), accession_number="RAD1", patient_id="P1")

    assert check_routable(encoded.summary) == ["Modality is missing", "SeriesNumber is empty"]
    assert encoded.sop_instance_uid == instance.SOPInstanceUID
    assert encoded.sop_class_uid == instance.SOPClassUID
