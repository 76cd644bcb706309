"""models.dicom: the study pre-flight (check_study) and the StudyTime/SeriesTime normalisation in the tag edit."""

from __future__ import annotations

import copy
import struct
from datetime import UTC, datetime, timedelta
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from models.dicom import (
    TimeEdits,
    check_routable,
    check_study,
    edit_encoded_for_satusehat,
    edit_for_satusehat,
    normalise_time,
)
from models.timeutil import WIB, WITA
from stack.studies import StudySpec, iter_instances

NOW = datetime(2025, 8, 2, 3, 0, tzinfo=UTC)


def metadata(series: int = 2, per_series: int = 2, **changes: str | None) -> list[dict[str, str]]:
    """A study's pre-flight metadata as clients.pacs.study_metadata gives it; `changes` apply to every instance
    (None removes the element)."""
    instances = []
    for s in range(1, series + 1):
        for i in range(1, per_series + 1):
            values = {
                "StudyInstanceUID": "1.2.3",
                "SeriesInstanceUID": f"1.2.3.{s}",
                "SOPInstanceUID": f"1.2.3.{s}.{i}",
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                "Modality": "CT",
                "SeriesNumber": str(s),
                "InstanceNumber": str(i),
                "AccessionNumber": "PACS1",
                "StudyDate": "20250801",
                "StudyTime": "101500",
                "SeriesDate": "20250801",
                "SeriesTime": f"10{15 + s}00",
                "AcquisitionDate": "20250801",
                "AcquisitionTime": f"10{15 + s}3{i}",
                "StudyDescription": "CT Thorax",
            }
            for keyword, value in changes.items():
                if value is None:
                    values.pop(keyword, None)
                else:
                    values[keyword] = value
            instances.append(values)
    return instances


def test_a_good_study_passes_and_says_what_the_fhir_steps_may_use() -> None:
    check = check_study(metadata(), zone=WIB, now=NOW)

    assert check.ok, check.describe()
    assert (check.instances, check.series, check.modalities) == (4, 2, ("CT",))
    assert check.description == "CT Thorax"
    assert check.started == datetime(2025, 8, 1, 10, 15, tzinfo=WIB)
    assert check.started is not None and check.started.utcoffset() == timedelta(hours=7)
    assert check.times == TimeEdits("101500", {"1.2.3.1": ("20250801", "101600"), "1.2.3.2": ("20250801", "101700")})


def test_the_start_is_in_the_configured_zone() -> None:
    check = check_study(metadata(), zone=WITA, now=NOW)
    assert check.started == datetime(2025, 8, 1, 2, 15, tzinfo=UTC)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    ("keyword", "value", "rule"),
    [
        ("InstanceNumber", "-3", "-3 is negative"),
        ("InstanceNumber", None, "is missing"),
        ("InstanceNumber", "", "is empty"),
        ("InstanceNumber", "2.5", "is not an integer"),
        ("SeriesNumber", None, "is missing"),
        ("SeriesNumber", "-1", "is negative"),
        ("Modality", "", "is empty"),
        ("Modality", None, "is missing"),
        ("SOPClassUID", None, "is missing"),
        ("SOPInstanceUID", "1.2.x", "is not a valid UID"),
    ],
)
def test_an_instance_the_router_cannot_take_is_named_with_the_element_and_the_rule(
    keyword: str, value: str | None, rule: str
) -> None:
    instances = metadata()
    if value is None:
        del instances[2][keyword]
    else:
        instances[2][keyword] = value

    check = check_study(instances, zone=WIB, now=NOW)

    assert not check.ok and check.times is None
    [problem] = check.problems
    assert (problem.keyword, rule in problem.rule) == (keyword, True), problem
    where = "instance #3" if keyword == "SOPInstanceUID" and value is None else "instance"
    assert problem.where.startswith(where)
    message = check.describe()
    assert keyword in message and rule in message
    if keyword != "SOPInstanceUID":
        assert "1.2.3.2.1" in message, "the instance is named"


def test_the_message_groups_one_rule_over_many_instances() -> None:
    check = check_study(metadata(series=1, per_series=5, InstanceNumber="-1"), zone=WIB, now=NOW)
    message = check.describe()
    assert message.count("InstanceNumber -1 is negative") == 1
    assert "instance 1.2.3.1.1, instance 1.2.3.1.2, instance 1.2.3.1.3 and 2 more" in message


@pytest.mark.parametrize(
    ("stored", "written"),
    [("1015", "101500"), ("10", "100000"), ("101500", "101500"), ("101500.123", "101500.123"), ("10:15:00", "101500")],
)
def test_study_time_is_written_hhmmss(stored: str, written: str) -> None:
    check = check_study(metadata(StudyTime=stored), zone=WIB, now=NOW)
    assert check.ok, check.describe()
    assert check.times is not None and check.times.study_time == written
    assert normalise_time(stored) == written


@pytest.mark.parametrize("bad", ["2561", "1075", "1015.5", "ab", "10151", "1015000"])
def test_a_time_that_is_no_time_is_refused_naming_study_time(bad: str) -> None:
    check = check_study(metadata(StudyTime=bad), zone=WIB, now=NOW)
    assert [p.keyword for p in check.problems] == ["StudyTime"]
    assert "StudyTime" in check.describe()
    with pytest.raises(ValueError):
        normalise_time(bad)


@pytest.mark.parametrize("absent", [None, ""])
def test_a_missing_study_time_is_taken_from_the_studys_own_earliest_time(absent: str | None) -> None:
    check = check_study(metadata(StudyTime=absent), zone=WIB, now=NOW)
    assert check.ok, check.describe()
    assert check.times is not None and check.times.study_time == "101600", "series 1's SeriesTime"
    assert check.started == datetime(2025, 8, 1, 10, 16, tzinfo=WIB)


def test_times_of_another_day_do_not_give_the_study_time() -> None:
    instances = metadata(StudyTime=None, SeriesDate="20250731", AcquisitionDate="20250731")
    check = check_study(instances, zone=WIB, now=NOW)
    [problem] = check.problems
    assert problem.keyword == "StudyTime" and "does not make one up" in problem.rule


@pytest.mark.parametrize("absent", [None, ""])
def test_a_missing_study_time_with_nothing_to_take_it_from_is_refused(absent: str | None) -> None:
    instances = metadata(StudyTime=absent, SeriesTime=absent, AcquisitionTime=None)
    check = check_study(instances, zone=WIB, now=NOW)
    assert not check.ok
    assert "StudyTime" in {p.keyword for p in check.problems}
    assert "SeriesTime" in {p.keyword for p in check.problems}
    assert check.started is None and check.times is None


def test_a_missing_series_time_is_taken_from_the_series_earliest_acquisition() -> None:
    check = check_study(metadata(SeriesTime=None), zone=WIB, now=NOW)
    assert check.ok, check.describe()
    assert check.times is not None
    assert check.times.series == {"1.2.3.1": ("20250801", "101631"), "1.2.3.2": ("20250801", "101731")}


@pytest.mark.parametrize(
    ("keyword", "value", "rule"),
    [
        ("StudyDate", None, "is missing"),
        ("StudyDate", "2025-08-01", "is not a DICOM date"),
        ("StudyDate", "20250231", "is not a DICOM date"),
        ("StudyDate", "20140602", "before 2014-06-03"),
        ("StudyDate", "20250803", "in the future"),
        ("SeriesDate", "2025081", "is not a DICOM date"),
    ],
)
def test_dates_the_platform_refuses_are_refused_naming_the_element(keyword: str, value: str | None, rule: str) -> None:
    changes: dict[str, str | None] = {keyword: value}
    if keyword == "StudyDate" and value and value.isdigit():
        changes["SeriesDate"] = changes["AcquisitionDate"] = value
    check = check_study(metadata(**changes), zone=WIB, now=NOW)
    assert keyword in {p.keyword for p in check.problems}
    assert rule in check.describe()


# --------------------------------------------------------------------------------------------------------------
# The time edit, on a dataset and on the encoded file


@pytest.fixture
def instance() -> Dataset:
    ds = next(iter_instances(StudySpec(series=1, instances_per_series=1, accession_number="PACS-ACC")))
    ds.StudyTime = "1015"
    del ds.SeriesTime
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = "101530"
    return ds


def plan_for(ds: Dataset) -> TimeEdits:
    values = {kw: str(ds.get(kw, "")) for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    values.update(
        SOPClassUID=str(ds.SOPClassUID),
        Modality="CT",
        SeriesNumber="1",
        InstanceNumber="1",
        StudyDate=str(ds.StudyDate),
        StudyTime=str(ds.StudyTime),
        SeriesDate=str(ds.SeriesDate),
        AcquisitionDate=str(ds.AcquisitionDate),
        AcquisitionTime=str(ds.AcquisitionTime),
    )
    check = check_study([values], zone=WIB, now=datetime.now(UTC))
    assert check.times is not None, check.describe()
    return check.times


def as_part10(ds: Dataset, syntax: UID = ExplicitVRLittleEndian) -> bytes:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(
        buffer, enforce_file_format=True, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian
    )
    return buffer.getvalue()


def test_the_dataset_edit_writes_study_and_series_time_hhmmss(instance: Dataset) -> None:
    before = copy.deepcopy(instance)
    edit_for_satusehat(instance, accession_number="RAD1", patient_id="P1", times=plan_for(instance))

    assert (instance.StudyTime, instance.SeriesTime) == ("101500", "101530")
    assert instance["SeriesTime"].VR == "TM"
    changed = {"AccessionNumber", "PatientID", "StudyTime", "SeriesTime"}
    for elem in before:
        if elem.keyword not in changed:
            assert instance[elem.tag] == elem, elem.keyword


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_the_encoded_edit_writes_the_same_times(instance: Dataset, syntax: UID) -> None:
    times = plan_for(instance)
    part10 = as_part10(instance, syntax)

    encoded = edit_encoded_for_satusehat(part10, accession_number="RAD1", patient_id="P1", times=times)

    assert len(encoded.parts) > 1, "edited in the encoding, not by the general path"
    got = encoded.to_dataset()
    expected = edit_for_satusehat(dcmread(BytesIO(part10)), accession_number="RAD1", patient_id="P1", times=times)
    assert [elem.tag for elem in got] == [elem.tag for elem in expected]
    for elem in expected:
        assert got[elem.tag].value == elem.value, elem.keyword
    assert (got.StudyTime, got.SeriesTime, got.AccessionNumber) == ("101500", "101530", "RAD1")
    assert check_routable(encoded.summary) == []


def test_the_encoded_edit_leaves_times_already_right_byte_for_byte(instance: Dataset) -> None:
    instance.StudyTime = "101500"
    instance.SeriesTime = "101530"
    part10 = as_part10(instance)
    times = plan_for(instance)

    with_times = edit_encoded_for_satusehat(part10, accession_number="RAD1", patient_id="P1", times=times)
    without = edit_encoded_for_satusehat(part10, accession_number="RAD1", patient_id="P1")

    assert with_times.data_set_bytes() == without.data_set_bytes()


def test_the_encoded_edit_keeps_a_retired_group_length_right(instance: Dataset) -> None:
    """Three elements of group 0008 change size or appear: (0008,0000) must still cover the group."""
    original = as_part10(instance)
    meta_end = 144 + int.from_bytes(original[140:144], "little")
    data = original[meta_end:]
    group_8 = sum(len(_element_bytes(e)) for e in instance if e.tag.group == 0x0008)
    part10 = original[:meta_end] + struct.pack("<HH2sHL", 0x0008, 0x0000, b"UL", 4, group_8) + data

    encoded = edit_encoded_for_satusehat(part10, accession_number="RAD1", patient_id="P1", times=plan_for(instance))

    assert len(encoded.parts) > 1
    edited = encoded.to_dataset()
    actual = sum(len(_element_bytes(e)) for e in edited if e.tag.group == 0x0008 and e.tag.element)
    assert edited[0x0008, 0x0000].value == actual
    assert (edited.StudyTime, edited.SeriesTime) == ("101500", "101530")


def _element_bytes(elem: object) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.add(elem)  # type: ignore[arg-type]
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_time_edits_travel_as_json() -> None:
    times = TimeEdits("101500", {"1.2.3.1": ("20250801", "101600")})
    assert TimeEdits.from_json(times.as_json()) == times


def test_the_send_paths_check_refuses_a_negative_instance_number(instance: Dataset) -> None:
    instance.InstanceNumber = -3
    assert check_routable(instance) == ["InstanceNumber -3 is negative (FHIR's unsignedInt)"]
