"""The study checked before anything is created, and the router's ImagingStudy chosen right, end to end: Orthanc
(PACS), the simulator (FHIR + DICOM Router emulation) and Prefect, as tests/flows/test_batch4.py."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from pydicom.dataset import Dataset

from clients.errors import AmbiguousStudy, AssociationRejected, StudyNotFound
from clients.routing import StudyNotRoutable
from flows.batches import batch4, run_batch4, task_steps
from flows.dicom import dicom_process
from flows.steps import BatchFailed
from models.inputs import Batch4Input, DicomProcessInput
from stack.orthanc import OrthancServer
from stack.studies import StudySpec, iter_instances
from tasks import runtime
from tasks.dicom import route_study
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadedStudy, UploadStudy, unique_accession

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

Defect = Callable[[Dataset, int], None]
UploadBroken = Callable[[Defect], UploadedStudy]


@pytest.fixture
def upload_broken(orthanc: OrthancServer) -> Iterator[UploadBroken]:
    """Store a generated 2x3 study after `defect(ds, position)` changed its instances (position from 1)."""
    stored: list[str] = []

    def upload(defect: Defect) -> UploadedStudy:
        spec = StudySpec(series=2, instances_per_series=3, accession_number=unique_accession())
        instances = list(iter_instances(spec))
        for position, ds in enumerate(instances, 1):
            defect(ds, position)
        answers = orthanc.upload(instances)
        (study_id,) = {answer["ParentStudy"] for answer in answers}
        stored.append(study_id)
        return UploadedStudy(spec, instances, study_id, answers)

    yield upload
    for study_id in stored:
        orthanc.delete_study(study_id)


def _on(position: int, change: Callable[[Dataset], None]) -> Defect:
    def defect(ds: Dataset, at: int) -> None:
        if at == position:
            change(ds)

    return defect


def _set(keyword: str, value: Any) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def _delete(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


DEFECTS: dict[str, tuple[Defect, str, str]] = {
    "negative InstanceNumber": (_on(3, _set("InstanceNumber", -3)), "InstanceNumber", "is negative"),
    "missing InstanceNumber": (_on(2, _delete("InstanceNumber")), "InstanceNumber", "is missing"),
    "missing SeriesNumber": (_on(5, _delete("SeriesNumber")), "SeriesNumber", "is missing"),
    "missing Modality": (_on(4, _delete("Modality")), "Modality", "is missing"),
    "empty Modality": (_on(4, _set("Modality", "")), "Modality", "is empty"),
    "bad StudyTime": (lambda ds, _: setattr(ds, "StudyTime", "2561"), "StudyTime", "is not a time of day"),
    "no StudyTime, nothing to take it from": (
        lambda ds, _: [delattr(ds, k) for k in ("StudyTime", "SeriesTime", "ContentTime")],
        "StudyTime",
        "does not make one up",
    ),
}


def router_received(gateway: Gateway) -> list[dict[str, Any]]:
    return [event.detail for event in gateway.simulator.running.platform.store.events(["router.received"])]


@pytest.mark.filterwarnings("ignore:Invalid value for VR TM")
@pytest.mark.parametrize("name", list(DEFECTS))
async def test_batch4_refuses_a_study_the_router_would_mangle_before_anything_is_created(
    gateway: Gateway, upload_broken: UploadBroken, name: str
) -> None:
    defect, keyword, rule = DEFECTS[name]
    study = upload_broken(defect)

    with pytest.raises(BatchFailed) as failed:
        await batch4(Batch4Input.model_validate(batch4_input(study)))

    assert failed.value.step == "dicom_process"
    assert isinstance(failed.value.cause, StudyNotRoutable)
    message = str(failed.value)
    assert keyword in message and rule in message, message
    if keyword != "StudyTime":
        position = next(i for i, ds in enumerate(study.instances) if keyword not in ds or ds[keyword].value in ("", -3))
        assert str(study.instances[position].SOPInstanceUID) in message, "the instance is named"
    assert failed.value.created == {}
    assert gateway.counts() == {}, "nothing created on the platform"
    assert router_received(gateway) == [], "nothing sent to the router"


async def test_dicom_process_refuses_it_too_and_sends_nothing(gateway: Gateway, upload_broken: UploadBroken) -> None:
    study = upload_broken(DEFECTS["negative InstanceNumber"][0])

    with pytest.raises(BatchFailed) as failed:
        await dicom_process(
            DicomProcessInput.model_validate({"study": study.study_instance_uid, "accesionnum": unique_accession()})
        )

    assert isinstance(failed.value.cause, StudyNotRoutable) and "InstanceNumber" in str(failed.value)
    assert router_received(gateway) == []


async def test_an_hhmm_study_time_reaches_the_platform_as_a_time_with_its_zone(
    gateway: Gateway, upload_broken: UploadBroken
) -> None:
    def hhmm(ds: Dataset, _: int) -> None:
        ds.StudyTime = "1015"
        del ds.SeriesTime

    study = upload_broken(hhmm)

    result = await batch4(Batch4Input.model_validate(batch4_input(study)))

    imaging = gateway.simulator.running.platform.store.read("ImagingStudy", result["imaging_study_id"])
    day = study.spec.study_date.isoformat()
    assert imaging["started"] == f"{day}T10:15:00+07:00"
    # No SeriesTime: the series' earliest ContentTime (12:00:00 in the generated study), not the router's clock.
    assert {series["started"] for series in imaging["series"]} == {f"{day}T12:00:00+07:00"}


async def test_a_study_time_missing_is_taken_from_the_study_itself(
    gateway: Gateway, upload_broken: UploadBroken
) -> None:
    study = upload_broken(lambda ds, _: delattr(ds, "StudyTime"))

    result = await batch4(Batch4Input.model_validate(batch4_input(study)))

    imaging = gateway.simulator.running.platform.store.read("ImagingStudy", result["imaging_study_id"])
    assert imaging["started"] == f"{study.spec.study_date.isoformat()}T12:00:00+07:00", "the SeriesTime"


async def test_a_wrong_router_ae_title_fails_before_any_fhir_resource_exists(
    gateway: Gateway, upload_study: UploadStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTER_AET", "NOTTHEROUTER")
    runtime.reset()
    study = upload_study(series=1, instances_per_series=2)

    with pytest.raises(BatchFailed) as failed:
        await batch4(Batch4Input.model_validate(batch4_input(study)))

    assert failed.value.step == "router_echo"
    assert isinstance(failed.value.cause, AssociationRejected)
    message = str(failed.value)
    assert "ROUTER_AET ('NOTTHEROUTER')" in message and "ROUTER_IP" in message and "ROUTER_PORT" in message
    assert gateway.counts() == {}, "no Encounter, no ServiceRequest"


async def test_dicom_process_answers_typed_errors_for_a_study_the_pacs_does_not_have(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    with pytest.raises(BatchFailed) as unknown_uid:
        await dicom_process(DicomProcessInput.model_validate({"study": "1.2.3.4.5.6.7.8.9"}))
    assert isinstance(unknown_uid.value.cause, StudyNotFound)
    with pytest.raises(BatchFailed) as unknown_acsn:
        await dicom_process(DicomProcessInput.model_validate({"accesionnum": unique_accession()}))
    assert isinstance(unknown_acsn.value.cause, StudyNotFound)

    shared = unique_accession()
    upload_study(series=1, instances_per_series=1, accession_number=shared)
    upload_study(series=1, instances_per_series=1, accession_number=shared)
    with pytest.raises(BatchFailed) as ambiguous:
        await dicom_process(DicomProcessInput.model_validate({"accesionnum": shared}))
    assert isinstance(ambiguous.value.cause, AmbiguousStudy) and shared in str(ambiguous.value)
    assert router_received(gateway) == []


# --------------------------------------------------------------------------------------------------------------
# The router's ImagingStudy: late, or twice


async def test_a_router_slower_than_the_deadline_is_waited_for_not_sent_the_study_twice(
    gateway: Gateway, upload_study: UploadStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = gateway.simulator.running._router
    assert router is not None
    monkeypatch.setattr(router, "config", dataclasses.replace(router.config, router_delay_s=4.0))  # type: ignore[attr-defined]
    monkeypatch.setenv("IMAGING_STUDY_DEADLINE_S", "1")
    monkeypatch.setenv("IMAGING_STUDY_RESEND_GRACE_S", "120")
    runtime.reset()
    study = upload_study(series=1, instances_per_series=3)

    result = await batch4(Batch4Input.model_validate(batch4_input(study)))

    assert len(router_received(gateway)) == 1, "sent once: the first ImagingStudy was still being built"
    assert gateway.counts()["ImagingStudy"] == 1
    assert "imaging_study_duplicates" not in result


async def test_of_two_imaging_studies_the_complete_one_is_linked_and_the_other_reported(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    """What the official router does when a re-send races its first POST: a second, newer ImagingStudy for the
    same ACSN and study, listing less. The gateway links the complete one and reports the other."""
    running = gateway.simulator.running
    study = upload_study(series=1, instances_per_series=3)
    body = batch4_input(study)
    made: dict[str, str] = {}

    async def route_then_duplicate(*args: Any, **kwargs: Any) -> dict[str, Any]:
        routed = await route_study(*args, **kwargs)
        assert running._router is not None and running._router.wait_idle(30)  # type: ignore[attr-defined]
        [first] = running.platform.store.all("ImagingStudy")
        extra = copy.deepcopy({k: v for k, v in first.items() if k not in ("id", "meta")})
        extra["series"][0]["instance"] = extra["series"][0]["instance"][:1]
        extra["series"][0]["numberOfInstances"] = extra["numberOfInstances"] = 1
        made["first"], made["extra"] = first["id"], running.platform.create(extra)["id"]
        return routed

    steps = dataclasses.replace(task_steps(), route_study=route_then_duplicate)

    @flow(name="batch4-duplicate-test")
    async def batch4_with_a_duplicate(payload: Batch4Input) -> dict[str, Any]:
        return await run_batch4(payload, steps)

    result = await batch4_with_a_duplicate(Batch4Input.model_validate(body))

    assert result["imaging_study_id"] == made["first"]
    assert result["imaging_study_duplicates"] == [made["extra"]]
    report = running.platform.store.read("DiagnosticReport", result["diagnostic_report_id"])
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{made['first']}"}]
    assert len(router_received(gateway)) == 1, "no re-send: a complete ImagingStudy was there"
    async with get_client() as client:
        artifacts = await client.read_latest_artifacts()
    [mine] = [a for a in artifacts if a.key and body["noacsn"].lower() in a.key]
    assert made["extra"] in str(mine.data)


async def test_batch4_answers_the_seven_dicom_process_keys(gateway: Gateway, upload_study: UploadStudy) -> None:
    study = upload_study(series=2, instances_per_series=2)
    result = await batch4(Batch4Input.model_validate(batch4_input(study)))
    assert result["dicom_process"] == {
        "status": "success",
        "study_uid": study.study_instance_uid,
        "total_instance": 4,
        "sent_instance": 4,
        "patient_modified": True,
        "accession_modified": True,
        "router": f"{gateway.env['ROUTER_AET']}@{gateway.env['ROUTER_IP']}:{gateway.env['ROUTER_PORT']}",
    }
