"""The DICOM Router emulation over real sockets, and the pure ImagingStudy builder behind it.

Every network test starts the emulator on a free 127.0.0.1 port against an in-memory Platform, sends with
pynetdicom or dcmtk's storescu, then waits with `wait_idle` (a bounded wait, never a fixed sleep) and looks at
the store. Studies come from stack.studies, so they carry the tags a real modality sends.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification

from simulator.app import create_app
from simulator.config import SimulatorConfig
from simulator.faults import RouterFault
from simulator.imaging import (
    JAKARTA,
    ImagingStudyBuildError,
    InstanceHeader,
    RouterBuild,
    acsn_system,
    build_imaging_study,
    patient_reference,
)
from simulator.platform import Platform
from simulator.router import RouterEmulator, _read_header
from simulator.store import Store
from stack.studies import StudySpec, iter_instances, write_study

LOOPBACK = "127.0.0.1"
ROUTER_AET = "DCMROUTER"
PATIENT = "Patient/P00000000001"
IDLE_TIMEOUT_S = 30.0
EXAMPLE = (
    Path(__file__).resolve().parents[1]
    / "data"
    / "satusehat_examples"
    / "imagingstudy__edycoleee-flask-dicomrouter-dcm__README-router-created-response.json"
)


# --- fixtures and helpers ----------------------------------------------------------------------------------


@dataclass
class Sim:
    """A platform with an Encounter and (helpers to add) ServiceRequests, and a started router emulation."""

    config: SimulatorConfig
    store: Store
    platform: Platform
    router: RouterEmulator
    encounter_id: str

    @property
    def port(self) -> int:
        return self.router.port

    @property
    def acsn_system(self) -> str:
        return acsn_system(self.config.org_id)

    def add_service_request(self, acsn: str, subject: str = PATIENT) -> dict[str, Any]:
        """A minimal order carrying the ACSN, inserted directly (the platform's POST rules are not under test)."""
        return self.store.create(
            {
                "resourceType": "ServiceRequest",
                "identifier": [
                    {
                        "system": f"http://sys-ids.kemkes.go.id/servicerequest/{self.config.org_id}",
                        "value": f"order-{len(self.store.all('ServiceRequest')) + 1}",
                    },
                    {
                        "use": "usual",
                        "type": {
                            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                        },
                        "system": self.acsn_system,
                        "value": acsn,
                    },
                ],
                "status": "active",
                "intent": "original-order",
                "subject": {"reference": subject},
                "encounter": {"reference": f"Encounter/{self.encounter_id}"},
            }
        )

    def imaging_studies(self, acsn: str) -> list[dict[str, Any]]:
        return self.store.find_by_identifier("ImagingStudy", self.acsn_system, acsn)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [event.detail for event in self.store.events([kind])]

    def wait(self) -> None:
        assert self.router.wait_idle(IDLE_TIMEOUT_S), "the router emulation did not go idle"


def _make_sim(delay_s: float) -> Sim:
    config = SimulatorConfig(router_delay_s=delay_s)
    store = Store()
    platform = Platform(config, store)
    encounter = store.create(
        {
            "resourceType": "Encounter",
            "identifier": [{"system": f"http://sys-ids.kemkes.go.id/encounter/{config.org_id}", "value": "V001"}],
            "status": "arrived",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": PATIENT},
        }
    )
    return Sim(config, store, platform, RouterEmulator(platform, platform.faults), encounter["id"])


@pytest.fixture
def sim() -> Iterator[Sim]:
    already_running = set(threading.enumerate())  # e.g. the session simulator's own router
    made = _make_sim(delay_s=0.05)
    made.router.start()
    try:
        yield made
    finally:
        made.router.stop()
        made.store.close()
    leftovers = [
        t.name
        for t in set(threading.enumerate()) - already_running
        if t.name.startswith(("satset-router", "AcceptorThread"))
    ]
    assert leftovers == [], f"threads left running after stop(): {leftovers}"


@dataclass
class Sent:
    statuses: list[int | None]
    """Status per C-STORE sent, None where the association was gone (aborted) before an answer."""
    rejected: bool
    aborted: bool
    released: bool


def _nodelay(assoc: Association) -> None:
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_pynetdicom(
    port: int, datasets: Sequence[Dataset], *, called_aet: str = ROUTER_AET, release: bool = True
) -> Sent:
    """One association: a C-STORE per dataset, in its own transfer syntax; stop at the first unanswered one."""
    ae = AE(ae_title="SATSETTEST")
    for sop_class, syntax in dict.fromkeys((ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(LOOPBACK, port, ae_title=called_aet)
    statuses: list[int | None] = []
    try:
        if assoc.is_established:
            _nodelay(assoc)
            for ds in datasets:
                status = assoc.send_c_store(ds)
                statuses.append(int(status.Status) if "Status" in status else None)
                if statuses[-1] is None or not assoc.is_established:
                    break  # no answer: the association is gone (a next send would wait out the DIMSE timeout)
            if release and assoc.is_established:
                assoc.release()
        return Sent(statuses, assoc.is_rejected, assoc.is_aborted, assoc.is_released)
    finally:
        if not release and assoc.is_established:
            assoc.release()
        ae.shutdown()


def study(acsn: str = "ACC0001", *, series: int = 2, per_series: int = 3, **changes: Any) -> list[Dataset]:
    return list(
        iter_instances(StudySpec(accession_number=acsn, series=series, instances_per_series=per_series, **changes))
    )


def series_uids(datasets: Sequence[Dataset]) -> list[str]:
    return list(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in datasets))


def assert_matches(found: dict[str, Any], sent: Sequence[Dataset], service_request: dict[str, Any]) -> None:
    """The ImagingStudy lists exactly the sent series and instances, and is linked as the router links it."""
    assert found["subject"] == {"reference": PATIENT}
    assert found["basedOn"] == [{"reference": f"ServiceRequest/{service_request['id']}"}]
    assert found["status"] == "available"
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{sent[0].StudyInstanceUID}"} in found["identifier"]
    assert found["numberOfSeries"] == len(series_uids(sent))
    assert found["numberOfInstances"] == len(sent)
    assert [s["uid"] for s in found["series"]] == series_uids(sent)
    by_series = {s["uid"]: {i["uid"] for i in s["instance"]} for s in found["series"]}
    for uid in series_uids(sent):
        expected = {str(ds.SOPInstanceUID) for ds in sent if ds.SeriesInstanceUID == uid}
        assert by_series[uid] == expected
        assert next(s for s in found["series"] if s["uid"] == uid)["numberOfInstances"] == len(expected)


# --- the builder, pure ---------------------------------------------------------------------------------------


def _run_build(datasets: Sequence[Dataset], **overrides: Any) -> RouterBuild:
    arguments: dict[str, Any] = {
        "service_request_id": "sr-1",
        "subject_reference": PATIENT,
        "imaging_study_id": None,
        "org_id": "ORG1",
        "now": dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=JAKARTA),
    }
    arguments.update(overrides)
    return build_imaging_study(datasets, **arguments)


def _build(datasets: Sequence[Dataset], **overrides: Any) -> dict[str, Any]:
    """The study of a build that went through every instance."""
    built = _run_build(datasets, **overrides)
    assert built.stopped is None, built.stopped
    return built.study


def test_builder_matches_the_routers_shape() -> None:
    """Same keys, in the same order, as the body the router was observed posting; values from the headers."""
    sent = study("ACC0009", series=2, per_series=2, study_date=dt.date(2024, 1, 1), description="Synthetic CT")
    built = _build(sent)
    assert list(built) == [
        "resourceType",
        "identifier",
        "status",
        "modality",
        "subject",
        "started",
        "basedOn",
        "numberOfSeries",
        "numberOfInstances",
        "description",
        "series",
    ]
    assert built["identifier"][0] == {
        "use": "usual",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
        "system": "http://sys-ids.kemkes.go.id/acsn/ORG1",
        "value": "ACC0009",
    }
    assert built["identifier"][1] == {"system": "urn:dicom:uid", "value": f"urn:oid:{sent[0].StudyInstanceUID}"}
    assert built["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]
    assert built["started"] == "2024-01-01T12:00:00+07:00"
    assert built["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
    assert (built["numberOfSeries"], built["numberOfInstances"], built["description"]) == (2, 4, "Synthetic CT")
    first = built["series"][0]
    assert list(first) == ["uid", "number", "modality", "description", "numberOfInstances", "started", "instance"]
    assert (first["uid"], first["number"], first["description"]) == (sent[0].SeriesInstanceUID, 1, "Series 1")
    assert first["started"] == "2024-01-01T12:00:00+07:00"
    assert first["instance"][1] == {
        "uid": sent[1].SOPInstanceUID,
        "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"},
        "number": 2,
        "title": "ORIGINAL\\PRIMARY\\AXIAL",
    }


def test_builder_output_has_the_keys_of_a_real_router_imagingstudy() -> None:
    """Key sets at study, series and instance level equal those of an ImagingStudy the real router created."""
    real = json.loads(EXAMPLE.read_text())
    built = _build(study(series=1, per_series=1), imaging_study_id="is-1")
    assert set(built) == set(real) - {"meta"}
    assert set(built["series"][0]) == set(real["series"][0])
    assert set(built["series"][0]["instance"][0]) == set(real["series"][0]["instance"][0])


def test_builder_puts_the_existing_id_first_for_a_put() -> None:
    built = _build(study(series=1, per_series=1), imaging_study_id="is-42")
    assert list(built)[:2] == ["resourceType", "id"]
    assert built["id"] == "is-42"


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("AccessionNumber", ""),
        ("SeriesInstanceUID", ""),
        ("SOPClassUID", None),
        ("Modality", ""),
        ("Modality", None),
        ("SeriesNumber", None),
        ("SeriesNumber", ""),
        ("SeriesNumber", "-1"),
        ("InstanceNumber", None),
        ("InstanceNumber", ""),
        ("InstanceNumber", "-1"),
    ],
)
def test_a_refused_first_instance_builds_nothing_and_names_the_attribute(keyword: str, value: str | None) -> None:
    """The router's createImagingStudy fails on the first file: process_dicom_2_fhir returns None, nothing posts."""
    sent = study(series=1, per_series=3)
    if value is None:
        delattr(sent[0], keyword)
    else:
        setattr(sent[0], keyword, value)
    with pytest.raises(ImagingStudyBuildError) as caught:
        _run_build(sent)
    assert caught.value.tag == keyword
    assert keyword in str(caught.value)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("InstanceNumber", None), ("InstanceNumber", ""), ("InstanceNumber", "-2"), ("SOPClassUID", None)],
)
def test_a_later_instance_the_library_refuses_stops_the_build_there(keyword: str, value: str | None) -> None:
    """addInstance raises on it: the study holds the instances before it only (not the ones after), as posted."""
    sent = study(series=1, per_series=4)
    if value is None:
        delattr(sent[2], keyword)
    else:
        setattr(sent[2], keyword, value)
    built = _run_build(sent)
    assert built.stopped is not None
    assert (built.stopped.tag, built.stopped.sop_instance_uid) == (keyword, sent[2].SOPInstanceUID)
    assert [i["uid"] for i in built.study["series"][0]["instance"]] == [sent[0].SOPInstanceUID, sent[1].SOPInstanceUID]
    assert (built.study["numberOfInstances"], built.study["series"][0]["numberOfInstances"]) == (2, 2)


def test_an_instance_refused_in_a_new_series_leaves_that_series_empty_like_the_router() -> None:
    """addSeries appends the new series (and counts it) before addInstance raises: an empty series is posted."""
    sent = study(series=2, per_series=2)
    del sent[2].InstanceNumber  # the first instance of series 2
    built = _run_build(sent)
    assert built.stopped is not None and built.stopped.tag == "InstanceNumber"
    second = built.study["series"][1]
    assert second["uid"] == sent[2].SeriesInstanceUID
    assert second["numberOfInstances"] == 0
    assert "instance" not in second  # fhir.resources drops the empty list when it serialises
    assert (built.study["numberOfSeries"], built.study["numberOfInstances"]) == (2, 2)


@pytest.mark.parametrize(("keyword", "value"), [("SeriesNumber", None), ("SeriesNumber", "-1"), ("Modality", "")])
def test_a_new_series_without_series_number_or_modality_stops_before_the_series_is_added(
    keyword: str, value: str | None
) -> None:
    sent = study(series=2, per_series=2)
    if value is None:
        delattr(sent[2], keyword)
    else:
        setattr(sent[2], keyword, value)
    built = _run_build(sent)
    assert built.stopped is not None and built.stopped.tag == keyword
    assert [s["uid"] for s in built.study["series"]] == [sent[0].SeriesInstanceUID]
    assert built.study["numberOfSeries"] == 1


@pytest.mark.parametrize("keyword", ["SeriesNumber", "Modality"])
def test_series_number_and_modality_are_read_only_when_a_series_is_new(keyword: str) -> None:
    """In a series already seen the router never reads them: such an instance goes in like the others."""
    sent = study(series=1, per_series=3)
    delattr(sent[1], keyword)
    built = _build(sent)
    assert built["numberOfInstances"] == 3


@pytest.mark.parametrize(
    ("study_time", "expected"),
    [
        ("101500", "2024-03-04T10:15:00+07:00"),
        ("101500.123456", "2024-03-04T10:15:00+07:00"),
        ("1015", "2024-03-04T00:00:00"),
        ("", "2024-03-04T00:00:00"),
        (None, "2024-03-04T00:00:00"),
    ],
)
def test_study_started_is_built_as_the_routers_gen_started_datetime(study_time: str | None, expected: str) -> None:
    """hhmmss → +07:00; absent, empty or HHMM → zone-less midnight (outputs probed on the router's own libraries)."""
    sent = study(series=1, per_series=1, study_date=dt.date(2024, 3, 4))
    if study_time is None:
        del sent[0].StudyTime
    else:
        sent[0].StudyTime = study_time
    assert _build(sent)["started"] == expected


def test_builder_falls_back_as_the_router_does() -> None:
    """No descriptions → "No Description"; no ImageType → ORIGINAL\\PRIMARY; no SeriesTime → the router's clock's
    time of day (UTC in its container) labelled +07:00; no or bad StudyDate / SeriesDate → no `started`."""
    sent = study(series=1, per_series=2, study_date=dt.date(2024, 5, 6))
    for ds in sent:
        del ds.StudyDescription, ds.SeriesDescription, ds.ImageType, ds.SeriesTime
    built = _build(sent)  # now = 2025-01-02 03:04:05 +07:00 = 2025-01-01 20:04:05 UTC
    assert built["description"] == "No Description"
    assert built["series"][0]["description"] == "No Description"
    assert built["series"][0]["instance"][0]["title"] == "ORIGINAL\\PRIMARY"
    assert built["series"][0]["started"] == "2024-05-06T20:04:05+07:00"
    del sent[0].StudyDate
    assert "started" not in _build(sent)
    sent[0].StudyDate = ""
    assert "started" not in _build(sent)
    sent[0].StudyDate, sent[0].StudyTime = "20240506", "251500"  # strptime refuses the hour: no started
    assert "started" not in _build(sent)
    for ds in sent:
        del ds.SeriesDate
    assert "started" not in _build(sent)["series"][0]


def test_an_empty_series_time_gives_a_zone_less_series_started() -> None:
    sent = study(series=1, per_series=1, study_date=dt.date(2024, 5, 6))
    sent[0].SeriesTime = ""
    assert _build(sent)["series"][0]["started"] == "2024-05-06T00:00:00"


def test_builder_joins_a_single_valued_image_type_character_by_character_like_the_router() -> None:
    """The router's '\\\\'.join(ds.ImageType) splits a one-value ImageType (a str in pydicom) into letters."""
    sent = study(series=1, per_series=1)
    sent[0].ImageType = "DERIVED"
    assert _build(sent)["series"][0]["instance"][0]["title"] == "D\\E\\R\\I\\V\\E\\D"


def test_builder_lists_each_modality_once_in_series_order_and_skips_repeated_instances() -> None:
    ct = study(series=2, per_series=1)
    mr = study(series=1, per_series=1, modality="MR", study_instance_uid=ct[0].StudyInstanceUID)
    built = _build([*ct, *mr, ct[0]])
    assert [m["code"] for m in built["modality"]] == ["CT", "MR"]
    assert built["numberOfInstances"] == 3
    assert built["series"][0]["numberOfInstances"] == 1


def test_builder_refuses_instances_of_two_studies() -> None:
    with pytest.raises(ImagingStudyBuildError, match="more than one study"):
        _build([*study(series=1, per_series=1), *study(series=1, per_series=1)])


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("Patient/P1", "Patient/P1"), ("https://x/fhir/Patient/P1", None), ("P1", None), (None, None)],
)
def test_patient_reference_splits_like_the_router(reference: str | None, expected: str | None) -> None:
    service_request = {"subject": {"reference": reference}} if reference else {}
    assert patient_reference(service_request) == expected


class _TrackedBytes(BytesIO):
    """Remembers how far anything read into it."""

    furthest = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.furthest = max(self.furthest, self.tell())
        return data


def test_header_decoding_never_reads_the_pixel_data() -> None:
    """Memory must not grow with pixel size: the decoder stops before (7FE0,0010), yet finds the header."""
    ds = study(series=1, per_series=1, rows=256, columns=256)[0]
    encoded = encode(ds, False, True)
    assert encoded is not None
    pixel_data_at = encoded.index(b"\xe0\x7f\x10\x00OW")
    stream = _TrackedBytes(encoded)
    event = SimpleNamespace(
        request=SimpleNamespace(DataSet=stream), context=SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian)
    )
    header = InstanceHeader.from_dataset(_read_header(event))  # type: ignore[arg-type]
    assert stream.furthest <= pixel_data_at
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.accession_number == "ACC0001"
    assert header.instance_number == "1"
    assert header.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")


# --- over the network ------------------------------------------------------------------------------------------

integration = pytest.mark.integration


@integration
def test_multi_series_study_over_pynetdicom_becomes_one_imagingstudy(sim: Sim) -> None:
    order = sim.add_service_request("ACC0001")
    sent = study("ACC0001", series=3, per_series=2)
    result = send_pynetdicom(sim.port, sent)
    assert result.statuses == [0x0000] * len(sent)
    sim.wait()
    found = sim.imaging_studies("ACC0001")
    assert len(found) == 1
    assert_matches(found[0], sent, order)
    [created] = sim.events("router.imagingstudy")
    assert (created["id"], created["action"], created["series"], created["instances"]) == (
        found[0]["id"],
        "created",
        3,
        6,
    )
    [received] = sim.events("router.received")
    assert (received["calling_aet"], received["called_aet"], received["instances"]) == ("SATSETTEST", ROUTER_AET, 6)


@integration
def test_multi_series_study_over_dcmtk_storescu_becomes_one_imagingstudy(sim: Sim, tmp_path: Path) -> None:
    from tests.plugins.pacs import require_dcmtk  # skipped on a developer machine without dcmtk, failed in CI

    storescu = require_dcmtk("storescu")
    order = sim.add_service_request("ACC0002")
    spec = StudySpec(accession_number="ACC0002", series=2, instances_per_series=3)
    write_study(spec, tmp_path / "study")
    completed = subprocess.run(
        [
            storescu,
            "-aet",
            "STORESCU",
            "-aec",
            ROUTER_AET,
            "+sd",
            "+r",
            LOOPBACK,
            str(sim.port),
            str(tmp_path / "study"),
        ],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    sim.wait()
    files = [dcmread(path, stop_before_pixels=True) for path in sorted((tmp_path / "study").glob("*.dcm"))]
    found = sim.imaging_studies("ACC0002")
    assert len(found) == 1
    assert found[0]["numberOfSeries"] == 2
    assert found[0]["numberOfInstances"] == 6
    assert {s["uid"] for s in found[0]["series"]} == {str(ds.SeriesInstanceUID) for ds in files}
    assert {i["uid"] for s in found[0]["series"] for i in s["instance"]} == {str(ds.SOPInstanceUID) for ds in files}
    assert found[0]["subject"] == {"reference": PATIENT}
    assert found[0]["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    [received] = sim.events("router.received")
    assert received["calling_aet"] == "STORESCU"


@integration
def test_a_second_association_for_the_acsn_replaces_the_imagingstudy_with_its_own_instances(sim: Sim) -> None:
    order = sim.add_service_request("ACC0003")
    sent = study("ACC0003", series=2, per_series=3)
    send_pynetdicom(sim.port, sent)
    sim.wait()
    [first] = sim.imaging_studies("ACC0003")
    subset = sent[3:5]  # two instances of the second series only
    assert send_pynetdicom(sim.port, subset).statuses == [0x0000, 0x0000]
    sim.wait()
    [second] = sim.imaging_studies("ACC0003")
    assert second["id"] == first["id"]
    assert second["meta"]["versionId"] != first["meta"]["versionId"]
    assert_matches(second, subset, order)
    assert [e["action"] for e in sim.events("router.imagingstudy")] == ["created", "replaced"]


@integration
def test_the_newest_service_request_with_the_acsn_wins(sim: Sim) -> None:
    sim.add_service_request("ACC0004", subject="Patient/P00000000009")
    newest = sim.add_service_request("ACC0004")
    sent = study("ACC0004", series=1, per_series=2)
    send_pynetdicom(sim.port, sent)
    sim.wait()
    [found] = sim.imaging_studies("ACC0004")
    assert_matches(found, sent, newest)


@integration
def test_no_service_request_for_the_acsn_creates_nothing(sim: Sim) -> None:
    sent = study("ACC-NO-ORDER", series=1, per_series=2)
    assert send_pynetdicom(sim.port, sent).statuses == [0x0000, 0x0000]  # the sender cannot tell
    sim.wait()
    assert sim.store.all("ImagingStudy") == []
    [skipped] = sim.events("router.skipped")
    assert skipped["reason"] == "ServiceRequest not found"
    assert (skipped["accession"], skipped["study"]) == ("ACC-NO-ORDER", sent[0].StudyInstanceUID)


@integration
def test_a_service_request_whose_subject_is_not_patient_slash_id_creates_nothing(sim: Sim) -> None:
    sim.add_service_request("ACC0005", subject="https://example.org/fhir/Patient/P00000000001")
    send_pynetdicom(sim.port, study("ACC0005", series=1, per_series=1))
    sim.wait()
    assert sim.store.all("ImagingStudy") == []
    [skipped] = sim.events("router.skipped")
    assert skipped["reason"].startswith("ServiceRequest not found")


@integration
def test_an_empty_accession_number_creates_nothing(sim: Sim) -> None:
    sent = study("", series=1, per_series=2)
    assert send_pynetdicom(sim.port, sent).statuses == [0x0000, 0x0000]
    sim.wait()
    assert sim.store.all("ImagingStudy") == []
    [skipped] = sim.events("router.skipped")
    assert "empty AccessionNumber" in skipped["reason"]
    assert skipped["study"] == sent[0].StudyInstanceUID


@integration
def test_an_absent_accession_number_element_fails_the_c_store(sim: Sim) -> None:
    """The router's C-STORE handler reads ds.AccessionNumber; without the element it raises → 0xC211."""
    sim.add_service_request("ACC0006")
    sent = study("ACC0006", series=1, per_series=2)
    del sent[1].AccessionNumber
    assert send_pynetdicom(sim.port, sent).statuses == [0x0000, 0xC211]
    sim.wait()
    [found] = sim.imaging_studies("ACC0006")
    assert found["numberOfInstances"] == 1


@integration
def test_a_refused_first_instance_fails_the_imagingstudy_and_names_it(sim: Sim) -> None:
    sim.add_service_request("ACC0007")
    sent = study("ACC0007", series=1, per_series=2)
    sent[0].Modality = ""
    assert send_pynetdicom(sim.port, sent).statuses == [0x0000, 0x0000]
    sim.wait()
    assert sim.store.all("ImagingStudy") == []
    [failed] = sim.events("router.failed")
    assert failed["tag"] == "Modality"
    assert "Modality" in failed["reason"]


@integration
@pytest.mark.parametrize(("value", "label"), [(None, "absent"), ("-3", "neg")])
def test_a_later_instance_without_a_usable_instance_number_gives_a_partial_imagingstudy(
    sim: Sim, value: str | None, label: str
) -> None:
    """As the router posted 3 of 10 instances: everything before the refused instance, nothing after it."""
    order = sim.add_service_request(f"ACC-P-{label}")
    sent = study(f"ACC-P-{label}", series=2, per_series=3)
    if value is None:
        del sent[4].InstanceNumber
    else:
        sent[4].InstanceNumber = value
    assert send_pynetdicom(sim.port, sent).statuses == [0x0000] * 6  # the modality cannot tell
    sim.wait()
    [found] = sim.imaging_studies(f"ACC-P-{label}")
    assert_matches(found, sent[:4], order)
    [stopped] = sim.events("router.build_stopped")
    assert (stopped["tag"], stopped["sop_instance_uid"]) == ("InstanceNumber", sent[4].SOPInstanceUID)
    assert (stopped["instances"], stopped["received"]) == (4, 6)
    [created] = sim.events("router.imagingstudy")
    assert (created["instances"], created["partial"]) == (4, True)


@integration
@pytest.mark.parametrize(
    ("study_time", "started"),
    [("101500", "T10:15:00+07:00"), ("1015", None), ("", None), (None, None)],
    ids=["hhmmss", "hhmm", "empty", "absent"],
)
def test_study_time_decides_whether_the_imagingstudy_appears(
    sim: Sim, study_time: str | None, started: str | None
) -> None:
    """hhmmss → +07:00 and the ImagingStudy appears; HHMM, empty or absent → the router posts a zone-less
    `started`, the platform refuses it (date format) and no ImagingStudy appears for the ACSN, as in production."""
    acsn = f"ACC-TIME-{study_time}"
    sim.add_service_request(acsn)
    sent = study(acsn, series=1, per_series=2, study_date=dt.date(2024, 3, 4))
    for ds in sent:
        if study_time is None:
            del ds.StudyTime
        else:
            ds.StudyTime = study_time
    send_pynetdicom(sim.port, sent)
    sim.wait()
    found = sim.imaging_studies(acsn)
    if started is not None:
        [imaging_study] = found
        assert imaging_study["started"] == f"2024-03-04{started}"
        assert sim.events("router.failed") == []
        return
    assert found == []
    [failed] = sim.events("router.failed")
    assert failed["reason"].startswith("POST ImagingStudy failed")
    assert failed["status"] == 400
    [issue] = [i for i in failed["outcome"]["issue"] if i["expression"] == ["ImagingStudy.started"]]
    assert issue["severity"] == "error"


@integration
def test_a_short_series_time_is_refused_too(sim: Sim) -> None:
    """SeriesTime `1015` → the series' zone-less midnight: the platform refuses the ImagingStudy there as well."""
    sim.add_service_request("ACC-STIME")
    sent = study("ACC-STIME", series=1, per_series=1)
    sent[0].SeriesTime = "1015"
    send_pynetdicom(sim.port, sent)
    sim.wait()
    assert sim.imaging_studies("ACC-STIME") == []
    [failed] = sim.events("router.failed")
    assert ["ImagingStudy.series[0].started"] in [issue["expression"] for issue in failed["outcome"]["issue"]]


@integration
def test_the_routers_post_meets_the_same_validation_as_an_external_post(sim: Sim) -> None:
    """The emulation's refusal equals what `POST /fhir-r4/v1/ImagingStudy` answers the router's own body."""
    order = sim.add_service_request("ACC-SAME")
    sent = study("ACC-SAME", series=1, per_series=1)
    del sent[0].StudyTime
    send_pynetdicom(sim.port, sent)
    sim.wait()
    [failed] = sim.events("router.failed")
    body = build_imaging_study(
        sent, service_request_id=order["id"], subject_reference=PATIENT, imaging_study_id=None, org_id=sim.config.org_id
    ).study
    token, _ = sim.store.issue_token(sim.config.client_id, 60)
    with TestClient(create_app(sim.platform)) as client:
        response = client.post(
            "/fhir-r4/v1/ImagingStudy",
            content=json.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
    assert response.status_code == failed["status"] == 400
    assert failed["outcome"] == response.json()
    assert sim.store.all("ImagingStudy") == []


@integration
def test_the_platform_rules_judge_the_routers_imagingstudy(sim: Sim) -> None:
    """The router posts through the platform's rules: a study dated before 2014-06-03 is refused, and logged."""
    sim.add_service_request("ACC0008")
    send_pynetdicom(sim.port, study("ACC0008", series=1, per_series=1, study_date=dt.date(2007, 1, 1)))
    sim.wait()
    assert sim.store.all("ImagingStudy") == []
    [failed] = sim.events("router.failed")
    assert failed["reason"].startswith("POST ImagingStudy failed")
    assert failed["status"] == 400
    assert any("started" in expression for issue in failed["outcome"]["issue"] for expression in issue["expression"])


@integration
def test_an_acsn_with_a_comma_is_not_found_by_the_routers_raw_search(sim: Sim) -> None:
    """The router's `identifier=<acsn system>%7CR,1` is `R` OR `1`: the order holding `R,1` is never found."""
    sim.add_service_request("R,1")
    send_pynetdicom(sim.port, study("R,1", series=1, per_series=1))
    sim.wait()
    assert sim.store.all("ImagingStudy") == []
    [skipped] = sim.events("router.skipped")
    assert (skipped["reason"], skipped["accession"]) == ("ServiceRequest not found", "R,1")


@integration
def test_an_acsn_with_a_comma_links_the_order_of_one_of_its_pieces(sim: Sim) -> None:
    """With an order for `Q` on file, the raw search for `Q,2` finds it: the ImagingStudy of `Q,2` is based on
    the wrong order, as the router would post it in production."""
    other = sim.add_service_request("Q")
    send_pynetdicom(sim.port, study("Q,2", series=1, per_series=1))
    sim.wait()
    [found] = sim.store.all("ImagingStudy")
    assert found["identifier"][0]["value"] == "Q,2"
    assert found["basedOn"] == [{"reference": f"ServiceRequest/{other['id']}"}]


@integration
def test_an_acsn_with_a_dollar_is_found_by_the_routers_raw_search(sim: Sim) -> None:
    order = sim.add_service_request("D$1")
    sent = study("D$1", series=1, per_series=2)
    send_pynetdicom(sim.port, sent)
    sim.wait()
    [found] = sim.imaging_studies("D$1")
    assert_matches(found, sent, order)


@integration
def test_a_wrong_called_ae_title_is_rejected(sim: Sim) -> None:
    sim.add_service_request("ACC0010")
    result = send_pynetdicom(sim.port, study("ACC0010", series=1, per_series=1), called_aet="NOTTHEROUTER")
    assert result.rejected
    assert result.statuses == []
    sim.wait()
    assert sim.store.all("ImagingStudy") == []
    [rejected] = sim.events("router.rejected")
    assert rejected["called_aet"] == "NOTTHEROUTER"


@integration
def test_an_abort_fault_aborts_the_association_and_nothing_is_created(sim: Sim) -> None:
    sim.add_service_request("ACC0011")
    sent = study("ACC0011", series=2, per_series=3)
    sim.platform.faults.arm_router(RouterFault("abort", after_instances=2))
    result = send_pynetdicom(sim.port, sent)
    assert result.aborted
    assert result.statuses[:2] == [0x0000, 0x0000]
    assert result.statuses[2] is None
    sim.wait()
    assert sim.store.all("ImagingStudy") == []
    [discarded] = sim.events("router.discarded")
    assert (discarded["reason"], discarded["instances"]) == ("association aborted", 2)
    # The fault was used up: the re-send (what the gateway must do) goes through.
    assert send_pynetdicom(sim.port, sent).statuses == [0x0000] * len(sent)
    sim.wait()
    [found] = sim.imaging_studies("ACC0011")
    assert found["numberOfInstances"] == len(sent)


@integration
def test_an_echo_only_association_does_not_use_up_an_abort_fault(sim: Sim) -> None:
    sim.platform.faults.arm_router(RouterFault("abort", after_instances=0))
    assert echo(sim.port) == 0x0000
    sim.add_service_request("ACC0012")
    result = send_pynetdicom(sim.port, study("ACC0012", series=1, per_series=2))
    assert result.aborted
    sim.wait()
    assert sim.store.all("ImagingStudy") == []


@integration
def test_a_status_fault_answers_that_status_and_drops_the_instance(sim: Sim) -> None:
    sim.add_service_request("ACC0013")
    sent = study("ACC0013", series=2, per_series=2)
    sim.platform.faults.arm_router(RouterFault("status", count=1, status=0xA700))
    result = send_pynetdicom(sim.port, sent)
    assert result.statuses == [0xA700, 0x0000, 0x0000, 0x0000]
    assert result.released
    sim.wait()
    [found] = sim.imaging_studies("ACC0013")
    assert found["numberOfInstances"] == 3
    assert sent[0].SOPInstanceUID not in {i["uid"] for s in found["series"] for i in s["instance"]}


def echo(port: int, called_aet: str = ROUTER_AET) -> int | None:
    ae = AE(ae_title="SATSETTEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title=called_aet)
    try:
        if not assoc.is_established:
            return None
        _nodelay(assoc)
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status) if "Status" in status else None
    finally:
        ae.shutdown()


@integration
def test_c_echo_answers_success_and_only_on_the_routers_ae_title(sim: Sim) -> None:
    assert echo(sim.port) == 0x0000
    assert echo(sim.port, called_aet="ANY-SCP") is None
    sim.wait()
    assert sim.events("router.received") == []  # echo associations are not the router's business


def _encapsulated(ds: Dataset, syntax: UID) -> Dataset:
    """The instance re-labelled as compressed with junk fragments: the router never decodes pixel data."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00\x01" * 64])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def _relabelled(ds: Dataset, syntax: UID) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


@integration
@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, JPEGLosslessSV1, JPEG2000Lossless],
)
def test_every_transfer_syntax_is_accepted_and_read(sim: Sim, syntax: UID) -> None:
    sim.add_service_request("ACC0014")
    sent = study("ACC0014", series=1, per_series=2)
    wrap = _encapsulated if syntax.is_compressed else _relabelled
    result = send_pynetdicom(sim.port, [wrap(ds, syntax) for ds in sent])
    assert result.statuses == [0x0000, 0x0000]
    sim.wait()
    [found] = sim.imaging_studies("ACC0014")
    assert_matches(found, sent, sim.store.find_by_identifier("ServiceRequest", sim.acsn_system, "ACC0014")[0])


@integration
def test_wait_idle_waits_for_an_open_association(sim: Sim) -> None:
    """An association not yet released is pending: wait_idle says False until it is released and processed."""
    sim.add_service_request("ACC0015")
    ae = AE(ae_title="SATSETTEST")
    sent = study("ACC0015", series=1, per_series=1)
    ae.add_requested_context(sent[0].SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, sim.port, ae_title=ROUTER_AET)
    try:
        assert assoc.is_established
        assert int(assoc.send_c_store(sent[0]).Status) == 0x0000
        assert not sim.router.wait_idle(0.2)
        assoc.release()
    finally:
        ae.shutdown()
    sim.wait()
    assert len(sim.imaging_studies("ACC0015")) == 1


@integration
@pytest.mark.parametrize("drain", [True, False])
def test_stop_drains_or_drops_the_released_work(drain: bool) -> None:
    """With a long delay the ImagingStudy is not there right after the release (asynchronous, as in production);
    stop(drain=True) processes it at once, stop(drain=False) drops it and says so."""
    made = _make_sim(delay_s=600.0)
    made.router.start()
    try:
        made.add_service_request("ACC0016")
        assert send_pynetdicom(made.port, study("ACC0016", series=1, per_series=2)).released
        assert made.imaging_studies("ACC0016") == []
        assert not made.router.wait_idle(0.1)
    finally:
        made.router.stop(drain=drain)
    try:
        assert len(made.imaging_studies("ACC0016")) == (1 if drain else 0)
        assert len(made.events("router.dropped")) == (0 if drain else 1)
        assert made.router.wait_idle(0)
    finally:
        made.store.close()


@integration
def test_one_association_with_two_studies_processes_each(sim: Sim) -> None:
    first_order = sim.add_service_request("ACC0017")
    second_order = sim.add_service_request("ACC0018")
    first = study("ACC0017", series=1, per_series=2)
    second = study("ACC0018", series=2, per_series=1)
    assert send_pynetdicom(sim.port, [*first, *second]).statuses == [0x0000] * 4
    sim.wait()
    assert_matches(sim.imaging_studies("ACC0017")[0], first, first_order)
    assert_matches(sim.imaging_studies("ACC0018")[0], second, second_order)
    [received] = sim.events("router.received")
    assert [s["accession"] for s in received["studies"]] == ["ACC0017", "ACC0018"]
