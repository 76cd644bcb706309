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

from simulator.config import SimulatorConfig
from simulator.faults import RouterFault
from simulator.imaging import (
    JAKARTA,
    ImagingStudyBuildError,
    InstanceHeader,
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


def _build(datasets: Sequence[Dataset], **overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "service_request_id": "sr-1",
        "subject_reference": PATIENT,
        "imaging_study_id": None,
        "org_id": "ORG1",
        "now": dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=JAKARTA),
    }
    arguments.update(overrides)
    return build_imaging_study(datasets, **arguments)


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
        ("StudyInstanceUID", None),
        ("SeriesInstanceUID", ""),
        ("SOPClassUID", None),
        ("Modality", ""),
        ("Modality", None),
        ("SeriesNumber", None),
        ("SeriesNumber", ""),
        ("InstanceNumber", None),
    ],
)
def test_builder_names_a_missing_or_empty_required_attribute(keyword: str, value: str | None) -> None:
    sent = study(series=1, per_series=3)
    if value is None:
        delattr(sent[1], keyword)
    else:
        setattr(sent[1], keyword, value)
    with pytest.raises(ImagingStudyBuildError) as caught:
        _build(sent)
    assert caught.value.tag == keyword
    assert keyword in str(caught.value)


def test_builder_falls_back_as_the_router_does() -> None:
    """No descriptions → "No Description"; no ImageType → ORIGINAL\\PRIMARY; no SeriesTime → the router's clock;
    no StudyDate → no study `started`; a short StudyTime → the date alone."""
    sent = study(series=1, per_series=2, study_date=dt.date(2024, 5, 6))
    for ds in sent:
        del ds.StudyDescription, ds.SeriesDescription, ds.ImageType, ds.SeriesTime
    built = _build(sent)
    assert built["description"] == "No Description"
    assert built["series"][0]["description"] == "No Description"
    assert built["series"][0]["instance"][0]["title"] == "ORIGINAL\\PRIMARY"
    assert built["series"][0]["started"] == "2024-05-06T03:04:05+07:00"
    del sent[0].StudyDate
    assert "started" not in _build(sent)
    sent[0].StudyDate, sent[0].StudyTime = "20240506", "1200"
    assert _build(sent)["started"] == "2024-05-06"


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
def test_a_missing_required_attribute_fails_the_imagingstudy_and_names_it(sim: Sim) -> None:
    sim.add_service_request("ACC0007")
    sent = study("ACC0007", series=1, per_series=2)
    sent[1].Modality = ""
    assert send_pynetdicom(sim.port, sent).statuses == [0x0000, 0x0000]
    sim.wait()
    assert sim.store.all("ImagingStudy") == []
    [failed] = sim.events("router.failed")
    assert failed["tag"] == "Modality"
    assert "Modality" in failed["reason"]


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
