"""Odd and broken DICOM through the gateway's real DICOM path: Orthanc (the PACS) → `route_study` (stream, edit in
the encoded bytes, one association) → the SATUSEHAT DICOM Router emulation, which builds the ImagingStudy from a
released association only.

Each oddity ends in one of two ways: the study arrives whole (and the odd values travel unchanged), or the gateway
raises an error naming the instance and the problem, the association is aborted rather than released, and the
router builds nothing: nothing half-sent is ever reported as done.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

import models.dicom
from clients.errors import AssociationRejected, InstanceRejected, UpstreamUnavailable
from clients.pacs import PacsClient, SeriesRef
from clients.router import RouterClient, raise_for_outcome
from clients.routing import route_study
from models.dicom import NotDicom, edit_encoded_for_satusehat
from simulator.config import SimulatorConfig
from simulator.imaging import acsn_system
from simulator.platform import Platform
from simulator.router import V1_0_1_TRANSFER_SYNTAXES, RouterEmulator
from simulator.store import Store
from stack.dcmtk import StoreSCP
from stack.orthanc import OrthancServer
from stack.studies import StudySpec, iter_instances
from tests.plugins.pacs import ORTHANC_PASSWORD, ORTHANC_USER, unique_accession

pytestmark = pytest.mark.integration

PATIENT = "Patient/P00000000001"
IDLE_S = 30.0
PRIVATE_CREATOR = "SATSET HOSTILE TEST"


# --- the parts ---------------------------------------------------------------------------------------------------


class Router:
    """A router emulation on its own in-process platform, with an order per ACSN asked for."""

    def __init__(self, transfer_syntaxes: Iterable[str] | None = None) -> None:
        self.config = SimulatorConfig(router_delay_s=0.0)
        self.store = Store()
        self.platform = Platform(self.config, self.store)
        self.emulator = RouterEmulator(
            self.platform, transfer_syntaxes=list(transfer_syntaxes) if transfer_syntaxes is not None else None
        )
        self.emulator.start()
        self.encounter = self.store.create(
            {"resourceType": "Encounter", "status": "arrived", "subject": {"reference": PATIENT}}
        )

    def client(self) -> RouterClient:
        return RouterClient(self.config.host, self.emulator.port, self.config.router_aet, dimse_timeout=10.0)

    def order(self, acsn: str) -> None:
        """A ServiceRequest carrying the ACSN, as batch1 makes it before the study is sent."""
        self.store.create(
            {
                "resourceType": "ServiceRequest",
                "identifier": [{"system": acsn_system(self.config.org_id), "value": acsn}],
                "status": "active",
                "intent": "original-order",
                "subject": {"reference": PATIENT},
                "encounter": {"reference": f"Encounter/{self.encounter['id']}"},
            }
        )

    def imaging_studies(self, acsn: str) -> list[dict[str, Any]]:
        assert self.emulator.wait_idle(IDLE_S), "the router emulation did not go idle"
        return self.store.find_by_identifier("ImagingStudy", acsn_system(self.config.org_id), acsn)

    def events(self, kind: str) -> list[dict[str, Any]]:
        assert self.emulator.wait_idle(IDLE_S), "the router emulation did not go idle"
        return [event.detail for event in self.store.events([kind])]


@pytest.fixture
def make_router() -> Iterator[Callable[..., Router]]:
    started: list[Router] = []

    def make(transfer_syntaxes: Iterable[str] | None = None) -> Router:
        started.append(Router(transfer_syntaxes))
        return started[-1]

    yield make
    for router in started:
        router.emulator.stop(drain=False)


@pytest.fixture
def pacs(orthanc: OrthancServer) -> Iterator[PacsClient]:
    with PacsClient(orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD) as client:
        yield client


@pytest.fixture
def store_in_pacs(orthanc: OrthancServer) -> Iterator[Callable[[list[Dataset]], None]]:
    """Upload datasets to Orthanc as they are; removed after the test."""
    stored: set[str] = set()

    def upload(datasets: list[Dataset]) -> None:
        stored.update(answer["ParentStudy"] for answer in orthanc.upload(datasets))

    yield upload
    for study in stored:
        orthanc.delete_study(study)


def instances(count: int = 3, **spec: Any) -> list[Dataset]:
    return list(iter_instances(StudySpec(series=1, instances_per_series=count, **spec)))


def part10(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def frame_8bit(rows: int = 32, columns: int = 32, image_format: str = "JPEG") -> bytes:
    """A real compressed frame of a grey gradient (Pillow: JPEG baseline or JPEG 2000)."""
    pixels = (np.add.outer(np.arange(rows), np.arange(columns)) * 3 % 256).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format=image_format)
    return out.getvalue()


def compressed(ds: Dataset, syntax: UID) -> Dataset:
    """`ds` with its pixels in `syntax`: RLE by pydicom's own encoder; JPEG and JPEG 2000 encapsulated from Pillow."""
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = (np.add.outer(np.arange(32), np.arange(32)) * 3 % 256).astype(np.uint8)
    if syntax == RLELossless:
        ds.PixelData = pixels.tobytes()
        ds.compress(RLELossless)
        return ds
    ds.PixelData = encapsulate([frame_8bit(image_format="JPEG" if syntax == JPEGBaseline8Bit else "JPEG2000")])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == JPEGBaseline8Bit:
        ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def sop_uids(datasets: Iterable[Dataset]) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in datasets}


# --- AccessionNumber, odd values, large private elements ----------------------------------------------------------


def test_a_study_without_accession_number_arrives_with_the_acsn(
    pacs: PacsClient, store_in_pacs: Callable[[list[Dataset]], None], make_router: Callable[..., Router]
) -> None:
    study = instances(3)
    for ds in study:
        del ds.AccessionNumber
    store_in_pacs(study)
    router, acsn = make_router(), unique_accession()
    router.order(acsn)

    report = route_study(
        pacs, router.client(), study_instance_uid=study[0].StudyInstanceUID, accession_number=acsn, patient_id="P1"
    )

    assert (report.total_instance, report.sent_instance, report.accession_modified) == (3, 3, True)
    (built,) = router.imaging_studies(acsn)
    assert {item["uid"] for series in built["series"] for item in series["instance"]} == sop_uids(study)
    assert [event["studies"][0]["accession"] for event in router.events("router.received")] == [acsn]


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")
def test_overlong_and_non_ascii_values_elsewhere_travel_byte_for_byte(
    pacs: PacsClient, store_in_pacs: Callable[[list[Dataset]], None], storescp: StoreSCP
) -> None:
    """Only AccessionNumber and PatientID change: a UTF-8 description far over LO's 64 characters, a non-ASCII
    patient name and an institution name of 300 characters arrive as the PACS stored them."""
    study = instances(2)
    for ds in study:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.StudyDescription = " ".join(["Toraks PA — 胸部正位 — Röntgen"] * 8)  # 215 characters, LO allows 64
        ds.PatientName = "Łukasz^Đặng^Nguyễn"
        ds.InstitutionName = "X" * 300
    store_in_pacs(study)
    acsn = unique_accession()
    client = RouterClient(storescp.host, storescp.port, storescp.aet)

    report = route_study(pacs, client, study_instance_uid=study[0].StudyInstanceUID, accession_number=acsn)

    assert report.sent_instance == 2
    received = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, storescp.wait_for_files(2))}
    assert set(received) == sop_uids(study)
    for original in study:
        arrived = received[str(original.SOPInstanceUID)]
        assert arrived.AccessionNumber == acsn
        assert arrived.StudyDescription == original.StudyDescription
        assert str(arrived.PatientName) == str(original.PatientName)
        assert arrived.InstitutionName == original.InstitutionName


def with_large_private_elements(ds: Dataset, blob: bytes) -> Dataset:
    """`ds` with private elements before the ones the edit rewrites and after them: a 10 MB OB in group 0009, a
    private sequence of undefined length holding 200 items of its own private elements (group 0009 too), and a
    1 MB element of a private creator no dictionary knows in group 0019 (between PatientID and the UIDs)."""
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "OB", blob)
    items = []
    for number in range(200):
        item = Dataset()
        item.private_block(0x0011, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", f"item {number}")
        items.append(item)
    block.add_new(0x02, "SQ", items)
    ds.private_block(0x0019, "UNKNOWN VENDOR 1.0", create=True).add_new(0x10, "OB", blob[: 1024 * 1024])
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=lambda uid: UID(uid).name)
def test_large_private_elements_travel_whole_and_the_study_is_built(
    pacs: PacsClient,
    store_in_pacs: Callable[[list[Dataset]], None],
    make_router: Callable[..., Router],
    storescp: StoreSCP,
    syntax: UID,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large private elements around the edited ones (in explicit VR, and in implicit VR where their VR is not
    written) are stepped over by the edit in the encoded bytes and arrive unchanged; the router builds the study."""

    def no_reencoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the edit in the encoded bytes gave up on the private elements")

    monkeypatch.setattr(models.dicom, "_edit_by_reencoding", no_reencoding)
    blob = np.random.default_rng(7).integers(0, 256, size=10 * 1024 * 1024, dtype=np.uint8).tobytes()
    study = instances(2)
    for ds in study:
        ds.file_meta.TransferSyntaxUID = syntax
        with_large_private_elements(ds, blob)
    store_in_pacs(study)
    router, acsn = make_router(), unique_accession()
    router.order(acsn)

    report = route_study(
        pacs, router.client(), study_instance_uid=study[0].StudyInstanceUID, accession_number=acsn, patient_id="P7"
    )
    route_study(
        pacs,
        RouterClient(storescp.host, storescp.port, storescp.aet),
        study_instance_uid=study[0].StudyInstanceUID,
        accession_number=acsn,
        patient_id="P7",
    )

    assert (report.total_instance, report.sent_instance) == (2, 2)
    (built,) = router.imaging_studies(acsn)
    assert {item["uid"] for series in built["series"] for item in series["instance"]} == sop_uids(study)
    received = [dcmread(path) for path in storescp.wait_for_files(2)]
    assert {str(ds.SOPInstanceUID) for ds in received} == sop_uids(study)
    digest = hashlib.sha256(blob).digest()
    for arrived in received:
        assert (arrived.AccessionNumber, arrived.PatientID) == (acsn, "P7")
        assert arrived.file_meta.TransferSyntaxUID == syntax
        assert hashlib.sha256(arrived[0x0009, 0x1001].value).digest() == digest
        sequence = arrived[0x0009, 0x1002]
        if sequence.VR != "SQ":  # implicit VR: a private sequence reads as UN unless a dictionary knows it
            sequence = sequence.value
            assert b"item 0" in sequence and b"item 199" in sequence
        else:
            assert [item[0x0011, 0x1001].value for item in sequence.value] == [f"item {n}" for n in range(200)]
        assert arrived[0x0019, 0x1010].value == blob[: 1024 * 1024]


@pytest.mark.parametrize(
    ("acsn", "problem"),
    [("A" * 17, "at most 16"), ("AKSÉS01", "printable ASCII"), ("ACC 01 ", "space"), ("ACC&01", "'&'")],
)
def test_an_acsn_dicom_cannot_carry_is_refused_before_anything_is_sent(
    pacs: PacsClient,
    store_in_pacs: Callable[[list[Dataset]], None],
    make_router: Callable[..., Router],
    acsn: str,
    problem: str,
) -> None:
    study = instances(1)
    store_in_pacs(study)
    router = make_router()

    with pytest.raises(ValueError, match=problem):
        route_study(pacs, router.client(), study_instance_uid=study[0].StudyInstanceUID, accession_number=acsn)

    assert router.events("router.received") == [] and router.events("router.discarded") == []


# --- missing UIDs, files that are not DICOM -----------------------------------------------------------------------


def test_instances_missing_uids_are_named_and_the_router_builds_nothing(make_router: Callable[..., Router]) -> None:
    """Orthanc refuses such files, so they go to the edit and the router client directly, as the PACS stream would
    hand them over. Each is refused before sending with its problem; the association is aborted, not released."""
    study = instances(4)
    del study[1].SOPInstanceUID
    del study[2].Modality
    study[3].StudyInstanceUID = generate_uid()
    router, acsn = make_router(), unique_accession()
    router.order(acsn)

    edited = [edit_encoded_for_satusehat(part10(ds), accession_number=acsn, patient_id=None) for ds in study]
    outcome = router.client().send_study(edited)

    assert (outcome.sent, outcome.confirmed) == (1, 1)
    reasons = [failure.describe() for failure in outcome.failures]
    assert "(no SOP Instance UID)" in reasons[0] and "SOPInstanceUID is missing" in reasons[0]
    assert study[2].SOPInstanceUID in reasons[1] and "Modality is missing" in reasons[1]
    assert study[3].SOPInstanceUID in reasons[2] and "one association carries one study" in reasons[2]
    assert outcome.problem is not None and outcome.problem.kind == "aborted"
    with pytest.raises(InstanceRejected) as raised:
        raise_for_outcome(outcome)
    assert "3 not stored" in raised.value.message and "SOPInstanceUID is missing" in raised.value.message
    assert router.imaging_studies(acsn) == []
    assert len(router.events("router.discarded")) == 1 and router.events("router.imagingstudy") == []


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param(b"<html><body><h1>502 Bad Gateway</h1></body></html>", id="html"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\0" * 128 + b"DICM" + b"\2\0\x10\0UI\x04\0abcd", id="unknown-transfer-syntax"),
    ],
)
def test_a_file_that_is_not_dicom_is_refused_by_the_edit_with_the_reason(junk: bytes) -> None:
    with pytest.raises(NotDicom) as raised:
        edit_encoded_for_satusehat(junk, accession_number="ACC1", patient_id=None)
    assert "DICOM" in str(raised.value) or "transfer syntax" in str(raised.value)


def test_a_part_that_is_not_dicom_in_the_pacs_stream_stops_the_study_named_and_unbuilt(
    orthanc: OrthancServer, store_in_pacs: Callable[[list[Dataset]], None], make_router: Callable[..., Router]
) -> None:
    """The PACS hands over an HTML error page as the second part of the series: the study stops with an error
    naming that instance's place in the study, the association is aborted, and the router builds nothing."""

    class PacsWithAnErrorPage(PacsClient):
        def iter_instance_files(self, study_instance_uid: str, **kwargs: Any) -> Iterator[bytes]:
            files = super().iter_instance_files(study_instance_uid, **kwargs)
            yield next(files)
            yield b"<html><body>502 Bad Gateway</body></html>"
            yield from files

    study = instances(3)
    store_in_pacs(study)
    router, acsn = make_router(), unique_accession()
    router.order(acsn)

    with (
        PacsWithAnErrorPage(orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD) as pacs,
        pytest.raises(UpstreamUnavailable) as raised,
    ):
        route_study(pacs, router.client(), study_instance_uid=study[0].StudyInstanceUID, accession_number=acsn)

    assert f"instance 2 of study {study[0].StudyInstanceUID}" in raised.value.message
    assert "not DICOM" in raised.value.message and raised.value.service == "pacs"
    assert router.imaging_studies(acsn) == []
    assert len(router.events("router.discarded")) == 1 and router.events("router.imagingstudy") == []


# --- compressed transfer syntaxes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEGBaseline8Bit, JPEG2000], ids=lambda uid: UID(uid).name)
def test_a_compressed_study_goes_as_stored_to_the_current_router(
    pacs: PacsClient,
    store_in_pacs: Callable[[list[Dataset]], None],
    make_router: Callable[..., Router],
    storescp: StoreSCP,
    syntax: UID,
) -> None:
    """Router v1.1.0 accepts every transfer syntax: the study is sent in the syntax the PACS stored, unconverted."""
    study = [compressed(ds, syntax) for ds in instances(2)]
    store_in_pacs(study)
    router, acsn = make_router(), unique_accession()
    router.order(acsn)

    report = route_study(pacs, router.client(), study_instance_uid=study[0].StudyInstanceUID, accession_number=acsn)
    route_study(
        pacs,
        RouterClient(storescp.host, storescp.port, storescp.aet),
        study_instance_uid=study[0].StudyInstanceUID,
        accession_number=acsn,
    )

    assert report.sent_instance == 2
    (built,) = router.imaging_studies(acsn)
    assert built["numberOfInstances"] == 2
    received = [dcmread(path) for path in storescp.wait_for_files(2)]
    assert {ds.file_meta.TransferSyntaxUID for ds in received} == {syntax}
    assert sorted(ds.PixelData for ds in received) == sorted(ds.PixelData for ds in study)


def test_a_router_refusing_the_compressed_syntax_is_a_clear_refusal_and_nothing_is_built(
    pacs: PacsClient, store_in_pacs: Callable[[list[Dataset]], None], make_router: Callable[..., Router]
) -> None:
    """Router v1.0.1 accepts no JPEG Baseline: the association has no context for the study, nothing is sent."""
    study = [compressed(ds, JPEGBaseline8Bit) for ds in instances(2)]
    store_in_pacs(study)
    router, acsn = make_router(V1_0_1_TRANSFER_SYNTAXES), unique_accession()
    router.order(acsn)

    with pytest.raises(AssociationRejected) as raised:
        route_study(pacs, router.client(), study_instance_uid=study[0].StudyInstanceUID, accession_number=acsn)

    assert "accepted none of the" in raised.value.message and "presentation contexts" in raised.value.message
    assert router.imaging_studies(acsn) == [] and router.events("router.received") == []


class SeriesInOrder(PacsClient):
    """A PACS that lists the series of a study in a chosen order (Orthanc's own order is not the upload order)."""

    def __init__(self, *args: Any, first: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first = first

    def list_series_refs(self, study_instance_uid: str) -> list[SeriesRef]:
        refs = super().list_series_refs(study_instance_uid)
        return sorted(refs, key=lambda ref: ref.series_instance_uid not in self.first)


@pytest.mark.parametrize("first", ["uncompressed", "rle"])
def test_a_study_partly_in_a_syntax_the_router_refuses_is_never_half_built(
    orthanc: OrthancServer,
    store_in_pacs: Callable[[list[Dataset]], None],
    make_router: Callable[..., Router],
    first: str,
) -> None:
    """Two series, one uncompressed and one RLE, to a router that takes no RLE. The gateway proposes contexts in
    the syntax of the first instance it retrieves (Orthanc does not say how the others are stored), so:

    * uncompressed first: the uncompressed instances are stored, the RLE ones have no context and are named; the
      association is aborted, so the router, which would have built an ImagingStudy of the uncompressed series
      alone on a release, builds nothing;
    * RLE first: the router accepts none of the proposed contexts; nothing is sent.
    """
    uid = generate_uid()
    plain = instances(2, study_instance_uid=uid)
    rle = [compressed(ds, RLELossless) for ds in instances(2, study_instance_uid=uid)]
    for ds in rle:
        ds.SeriesNumber = 2
    store_in_pacs(plain + rle)
    router, acsn = make_router(V1_0_1_TRANSFER_SYNTAXES), unique_accession()
    router.order(acsn)
    leading = plain if first == "uncompressed" else rle
    pacs = SeriesInOrder(
        orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD, first={leading[0].SeriesInstanceUID}
    )

    with pacs, pytest.raises((InstanceRejected, AssociationRejected)) as raised:
        route_study(pacs, router.client(), study_instance_uid=uid, accession_number=acsn)

    message = raised.value.message
    if first == "uncompressed":
        assert isinstance(raised.value, InstanceRejected), message
        assert "No presentation context" in message and "RLE Lossless" in message
        assert any(str(ds.SOPInstanceUID) in message for ds in rle)
        assert "aborted, not released" in message
        assert router.events("router.discarded")  # the router dropped the association's instances
    else:
        assert isinstance(raised.value, AssociationRejected), message
        assert "accepted none of the" in message and "presentation contexts" in message
        assert router.events("router.received") == []
    assert router.imaging_studies(acsn) == []
    assert router.events("router.imagingstudy") == []
    assert ExplicitVRLittleEndian in V1_0_1_TRANSFER_SYNTAXES
