"""The terminology tables (simulator/terminology/*.csv): well formed, and they know every code the gateway sends
(a gateway code missing here would be refused by the simulator, and the real platform knows it)."""

from __future__ import annotations

import csv

import pytest

from models import fhir, inputs
from simulator import terminology
from stack.demo import DEMO_EXAM_CODE


def test_every_table_row_has_a_code_a_display_and_a_source_once() -> None:
    with (terminology.DIRECTORY / "systems.csv").open(newline="") as index:
        names = [row["name"] for row in csv.DictReader(index)]
    assert len(names) == 8
    for name in names:
        with (terminology.DIRECTORY / f"{name}.csv").open(newline="") as table:
            rows = list(csv.DictReader(table))
        assert rows, name
        assert all(row["code"] and row["display"] and row["source"] for row in rows), name
        assert len({row["code"] for row in rows}) == len(rows), name


@pytest.mark.parametrize(
    "coding",
    [
        fhir.ENCOUNTER_CLASS_AMBULATORY,
        fhir.PARTICIPANT_ATTENDER,
        fhir.IDENTIFIER_TYPE_ACSN,
        fhir.SERVICE_REQUEST_CATEGORY_IMAGING,
        fhir.OBSERVATION_CATEGORY_IMAGING,
        fhir.DIAGNOSTIC_SECTION_RADIOLOGY,
    ],
)
def test_the_gateways_fixed_codes_are_known(coding: fhir.Coding) -> None:
    assert terminology.is_checked(coding.system) and terminology.knows(coding.system, coding.code)


@pytest.mark.parametrize("code", sorted({*inputs.EXAM_DISPLAYS, DEMO_EXAM_CODE, "36643-5"}))
def test_the_gateways_exam_codes_are_known(code: str) -> None:
    assert terminology.knows(fhir.LOINC, code)


@pytest.mark.parametrize("modality", ["CR", "CT", "DX", "MG", "MR", "NM", "PT", "US", "XA", "OT", "SR"])
def test_dicom_modalities_are_known(modality: str) -> None:
    assert terminology.knows(fhir.DICOM_DCM, modality)


def test_an_unlisted_code_is_unknown() -> None:
    assert not terminology.knows(fhir.LOINC, "99999-9") and terminology.is_checked(fhir.LOINC)
    assert not terminology.is_checked("http://example.org/unchecked")
