"""Synthetic DICOM studies for tests, the demo and the benchmarks: no patient data, made on the spot.

Each instance is a complete CT/MR/CR image with the tags the SATUSEHAT DICOM Router reads (AccessionNumber,
Study/Series/SOP UIDs, SOP class, Modality, SeriesNumber, InstanceNumber, dates, ImageType), so a study from
here goes through the same paths as one from a real modality.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

_SOP_CLASS_BY_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass(frozen=True)
class StudySpec:
    """What to generate: `series` series of `instances_per_series` images of `rows`×`columns` 16-bit pixels."""

    accession_number: str = "ACC0001"
    patient_id: str = "SYN0001"
    patient_name: str = "SYNTHETIC^PATIENT"
    modality: str = "CT"
    series: int = 2
    instances_per_series: int = 3
    rows: int = 64
    columns: int = 64
    study_date: dt.date = field(default_factory=lambda: dt.date.today() - dt.timedelta(days=1))
    study_instance_uid: str = field(default_factory=generate_uid)
    description: str = "Synthetic study"

    @property
    def instance_count(self) -> int:
        return self.series * self.instances_per_series


def iter_instances(spec: StudySpec) -> Iterator[Dataset]:
    """Yield every instance of the study, series by series, with file meta ready to write."""
    sop_class = _SOP_CLASS_BY_MODALITY.get(spec.modality, CTImageStorage)
    rng = np.random.default_rng(abs(hash(spec.study_instance_uid)) % 2**32)
    # One pixel buffer per study keeps generation fast; pixel content is irrelevant to the gateway.
    pixels = rng.integers(0, 4096, size=(spec.rows, spec.columns), dtype=np.uint16).tobytes()
    date = spec.study_date.strftime("%Y%m%d")
    for series_number in range(1, spec.series + 1):
        series_uid = generate_uid()
        for instance_number in range(1, spec.instances_per_series + 1):
            yield _instance(spec, sop_class, series_uid, series_number, instance_number, pixels, date)


def _instance(
    spec: StudySpec, sop_class: str, series_uid: str, series_number: int, instance_number: int, pixels: bytes, date: str
) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = spec.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.AccessionNumber = spec.accession_number
    ds.PatientID = spec.patient_id
    ds.PatientName = spec.patient_name
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "O"
    ds.Modality = spec.modality
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyDescription = spec.description
    ds.SeriesDescription = f"Series {series_number}"
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "satset-synthetic"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    return ds


def write_study(spec: StudySpec, directory: Path) -> list[Path]:
    """Write the study as Part-10 files named by SOP Instance UID; return the paths in send order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in iter_instances(spec):
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
