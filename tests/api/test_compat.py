"""The existing gateway's contract, to the key: every endpoint of the HIS API driven with the existing gateway's own
request bodies (its Swagger examples, observed_contracts.md "The existing gateway's HTTP interface"; only the
identifiers and accession numbers made unique per test), against the real parts (Orthanc, the simulator's
platform and DICOM Router, a Prefect server). Each answer is checked for the status class the existing code
answered and for every key it returned (field_notes.md: what its code returns). Keys we add (`step` in a batch
failure) are allowed; a key it returned and we do not is a failure.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from tests.api.conftest import API_KEY, api_settings
from tests.api.test_endpoints import RESOURCES, wait_for_imageid
from tests.plugins.gateway import Gateway
from tests.plugins.pacs import UploadStudy, unique_accession

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

BATCH_IDS = ("encounter_id", "service_request_id", "imaging_study_id", "observation_id", "diagnostic_report_id")
DICOM_PROCESS_KEYS = {
    "status",
    "study_uid",
    "total_instance",
    "sent_instance",
    "patient_modified",
    "accession_modified",
    "router",
}
"""What the existing gateway's process_dicom returns (its README example shows only three)."""


def existing_body(study_uid: str | None = None) -> dict[str, Any]:
    """The existing gateway's batch4 Swagger example, field for field, with a unique visit number and ACSN."""
    acsn = unique_accession()
    body = {
        "identifier_value": "RG" + uuid.uuid4().hex[:12].upper(),
        "subject_id": "P10443013727",
        "subject_reference": "Patient/P10443013727",
        "subject_display": "MILA YASYFI TASBIHA",
        "individual_id": "10016869420",
        "individual_reference": "Practitioner/10016869420",
        "individual_display": "dr. ARIAWAN SETIADI, Sp.A",
        "period_start": "2025-08-01T05:57:41+00:00",
        "period_end": "2025-08-01T06:07:41+00:00",
        "location_id": "ecff1c64-3f62-4469-b577-ea38f263b276",
        "location_reference": "Location/ecff1c64-3f62-4469-b577-ea38f263b276",
        "location_display": "Ruang 1, Poliklinik Anak",
        "noacsn": acsn,
        "requester_reference": "Practitioner/10016869420",
        "requester_display": "dr. ARIAWAN SETIADI, Sp.A",
        "performer_id": "10000504193",
        "performer_reference": "Practitioner/10000504193",
        "performer_display": "dr. RINI SUSANTI, Sp.Rad",
        "codind_code": "24648-8",
        "coding_display": "XR Chest PA upright",
        "performer_value": "Hasil Bacaan adalah ...",
        "conclusion_text": "Hasil Bacaan adalah Tak tampak bercak pada kedua lapangan paru",
        "patientid": "P10443013727",
        "accesionnum": acsn,
    }
    if study_uid is not None:
        body["study"] = study_uid
    return body


def pick(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: body[key] for key in keys if key in body}


ENCOUNTER_KEYS = (
    "identifier_value",
    "subject_id",
    "subject_reference",
    "subject_display",
    "individual_id",
    "individual_reference",
    "individual_display",
    "period_start",
    "period_end",
    "location_id",
    "location_reference",
    "location_display",
)
SERVICE_REQUEST_KEYS = (
    "identifier_value",
    "noacsn",
    "subject_id",
    "period_start",
    "requester_reference",
    "requester_display",
    "performer_reference",
    "performer_display",
)
OBSERVATION_KEYS = (
    "identifier_value",
    "codind_code",
    "coding_display",
    "subject_id",
    "subject_display",
    "period_start",
    "performer_id",
    "performer_display",
    "performer_value",
)
CONCLUSION_KEYS = ("identifier_value", "codind_code", "coding_display", "subject_id", "period_start", "performer_id")
BATCH1_KEYS = (*ENCOUNTER_KEYS, *SERVICE_REQUEST_KEYS)
BATCH3_KEYS = (*BATCH1_KEYS, "performer_id", "codind_code", "coding_display", "performer_value", "conclusion_text")


def assert_keys(answer: httpx.Response, status_class: int, keys: set[str]) -> dict[str, Any]:
    """The status class and every key the existing gateway returned (ours may add keys)."""
    assert answer.status_code // 100 == status_class, answer.text
    body = answer.json()
    assert keys <= set(body), f"missing {sorted(keys - set(body))}: {answer.text}"
    return dict(body)


@pytest.fixture
def compat_app(gateway: Gateway) -> FastAPI:
    """The HIS API with a short synchronous wait for the ImagingStudy (the existing gateway did not wait at all)."""
    return create_app(api_settings(API_SYNC_IMAGING_WAIT_S=2))


@pytest.fixture
async def his(compat_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=compat_app),
        base_url="http://gateway.test",
        headers={"X-API-Key": API_KEY},
        timeout=120,
    ) as client:
        yield client


async def test_halo_and_token(his: httpx.AsyncClient) -> None:
    assert assert_keys(await his.get("/api/satset/halo"), 2, {"message"}) == {"message": "Halo dari Satu Sehat!"}
    assert_keys(await his.get("/api/satset/token"), 2, {"access_token"})


async def test_the_split_workflow_batch1_dicom_process_imageid_batch2(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient
) -> None:
    """The order, the images routed separately, their ImagingStudy id asked for, then the report."""
    body = existing_body()
    study = upload_study(series=1, instances_per_series=2)

    ordered = assert_keys(
        await his.post("/api/satset/batch1", json=pick(body, *BATCH1_KEYS)), 2, {"encounter_id", "service_request_id"}
    )
    routed = assert_keys(
        await his.post(
            "/api/dicom/process",
            json={"study": study.study_instance_uid, "patientid": body["patientid"], "accesionnum": body["noacsn"]},
        ),
        2,
        DICOM_PROCESS_KEYS,
    )
    assert routed["status"] == "success" and routed["total_instance"] == routed["sent_instance"] == 2
    assert routed["patient_modified"] is True and routed["accession_modified"] is True
    imaging_study_id = await wait_for_imageid(his, body["noacsn"])
    found = assert_keys(await his.get(f"/api/satset/imageid/{body['noacsn']}"), 2, {"imagingStudy_id"})
    assert found == {"imagingStudy_id": imaging_study_id}

    report_body = {**pick(body, *OBSERVATION_KEYS, "conclusion_text"), **ordered, "imaging_study_id": imaging_study_id}
    assert_keys(await his.post("/api/satset/batch2", json=report_body), 2, {"observation_id", "diagnostic_report_id"})
    assert gateway.counts() == dict.fromkeys(RESOURCES, 1)


async def test_batch3_once_the_modality_has_sent_the_images(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient
) -> None:
    """The order first (the router needs its ServiceRequest), the images, then batch3 for the whole exam."""
    body = existing_body()
    study = upload_study(series=1, instances_per_series=1)
    ordered = assert_keys(
        await his.post("/api/satset/batch1", json=pick(body, *BATCH1_KEYS)), 2, {"encounter_id", "service_request_id"}
    )
    routed = await his.post(
        "/api/dicom/process", json={"study": study.study_instance_uid, "accesionnum": body["noacsn"]}
    )
    assert_keys(routed, 2, DICOM_PROCESS_KEYS)
    imaging_study_id = await wait_for_imageid(his, body["noacsn"])

    whole = assert_keys(await his.post("/api/satset/batch3", json=pick(body, *BATCH3_KEYS)), 2, set(BATCH_IDS))

    assert pick(whole, "encounter_id", "service_request_id") == ordered
    assert whole["imaging_study_id"] == imaging_study_id
    assert gateway.counts() == dict.fromkeys(RESOURCES, 1)


async def test_the_single_resource_endpoints_answer_the_platforms_resource(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient
) -> None:
    body = existing_body()
    study = upload_study(series=1, instances_per_series=1)
    store = gateway.simulator.running.platform.store

    encounter = assert_keys(
        await his.post("/api/satset/encounter", json=pick(body, *ENCOUNTER_KEYS)), 2, {"resourceType", "id"}
    )
    assert encounter == store.read("Encounter", encounter["id"])  # SATUSEHAT's own body, passed through
    order = assert_keys(
        await his.post(
            "/api/satset/service-req", json={**pick(body, *SERVICE_REQUEST_KEYS), "encounter_id": encounter["id"]}
        ),
        2,
        {"resourceType", "id"},
    )
    assert order == store.read("ServiceRequest", order["id"])
    routed = await his.post(
        "/api/dicom/process", json={"study": study.study_instance_uid, "accesionnum": body["noacsn"]}
    )
    assert_keys(routed, 2, DICOM_PROCESS_KEYS)
    links = {
        "encounter_id": encounter["id"],
        "service_request_id": order["id"],
        "imaging_study_id": await wait_for_imageid(his, body["noacsn"]),
    }
    reading = assert_keys(
        await his.post("/api/satset/observation", json={**pick(body, *OBSERVATION_KEYS), **links}),
        2,
        {"resourceType", "id"},
    )
    assert reading == store.read("Observation", reading["id"])
    conclusion_body = {**pick(body, *CONCLUSION_KEYS), "conclusion_text": body["conclusion_text"], **links}
    report = assert_keys(
        await his.post("/api/satset/conclusion", json={**conclusion_body, "observation_id": reading["id"]}),
        2,
        {"resourceType", "id"},
    )
    assert report == store.read("DiagnosticReport", report["id"])


async def test_the_existing_gateways_failure_answers(gateway: Gateway, his: httpx.AsyncClient) -> None:
    """404 with the search Bundle for imageid, 404 {"status", "message"} for a study the PACS does not have, and
    batch3 without an ImagingStudy: 404 at once (here after the 2 s synchronous wait) with the ids so far."""
    body = existing_body()

    unknown = assert_keys(await his.get(f"/api/satset/imageid/{body['noacsn']}"), 4, {"error", "detail"})
    assert unknown["error"] == "No ImagingStudy found" and unknown["detail"]["resourceType"] == "Bundle"

    missing = await his.post("/api/dicom/process", json={"study": "1.2.826.0.1.3680043.8.498.77", "accesionnum": "X1"})
    assert missing.status_code == 404
    assert assert_keys(missing, 4, {"status", "message"})["status"] == "error"

    waiting = await his.post("/api/satset/batch3", json=pick(body, *BATCH3_KEYS))
    assert waiting.status_code == 404
    failure = assert_keys(waiting, 4, {"error", "encounter_id", "service_request_id", "detail"})
    assert failure["error"] == "ServiceRequest created but ImagingStudy lookup failed"


async def test_batch4_answers_the_ids_and_dicom_process_with_its_seven_keys(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient
) -> None:
    study = upload_study(series=2, instances_per_series=2)
    body = existing_body(study.study_instance_uid)

    answer = await his.post("/api/satset/batch4", json=body)

    result = assert_keys(answer, 2, {*BATCH_IDS, "dicom_process"})
    assert (await his.get(f"/api/satset/imageid/{body['noacsn']}")).json() == {
        "imagingStudy_id": result["imaging_study_id"]
    }
    assert result["dicom_process"]["status"] == "success"
    # The existing code's seven keys. flows/batches.py (helper "study", branch h/study) adds the four that
    # batch4 lacks on main (total_instance, sent_instance, patient_modified, accession_modified): on h/api alone
    # this one assertion fails; it passes once h/study is merged.
    assert set(result["dicom_process"]) == DICOM_PROCESS_KEYS, result["dicom_process"]
