"""Every endpoint through the app, run synchronously as the old gateway did, against the real parts: Orthanc (PACS),
the simulator (SATUSEHAT FHIR + DICOM Router) and a Prefect server. Answers are the old gateway's shapes."""

from __future__ import annotations

import json
import logging
from typing import Any
from uuid import UUID

import anyio
import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler

from api.app import create_app
from tasks import runtime
from tasks.retry import FHIR_RETRIES
from tests.api.conftest import API_KEY, PATIENT_NAME, api_settings
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy, unique_accession
from tests.plugins.simulator import CLIENT_SECRET

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

RESOURCES = ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport")
BATCH3_KEYS = {"encounter_id", "service_request_id", "imaging_study_id", "observation_id", "diagnostic_report_id"}


def without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


async def wait_for_imageid(his: httpx.AsyncClient, acsn: str) -> str:
    """The router makes the ImagingStudy after the association ends: ask until it is there (404 until then)."""
    with anyio.fail_after(30):
        while True:
            answer = await his.get(f"/api/satset/imageid/{acsn}")
            if answer.status_code == 200:
                return str(answer.json()["imagingStudy_id"])
            assert answer.status_code == 404, answer.text
            await anyio.sleep(0.2)


async def flow_run_of(answer: httpx.Response) -> Any:
    """The flow run named by a synchronous answer's X-Flow-Run-Id header, read from the Prefect API."""
    async with get_client() as client:
        return await client.read_flow_run(UUID(answer.headers["X-Flow-Run-Id"]))


async def test_halo_and_a_token_the_platform_accepts(gateway: Gateway, his: httpx.AsyncClient) -> None:
    halo = await his.get("/api/satset/halo")
    assert (halo.status_code, halo.json()) == (200, {"message": "Halo dari Satu Sehat!"})

    answer = await his.get("/api/satset/token")

    assert answer.status_code == 200 and set(answer.json()) == {"access_token"}
    search = gateway.simulator.http.get(
        f"{gateway.simulator.running.fhir_url}/Encounter",
        params={"identifier": "http://sys-ids.kemkes.go.id/encounter/1|none"},
        headers={"Authorization": f"Bearer {answer.json()['access_token']}"},
    )
    assert search.status_code == 200, search.text


async def test_token_refused_is_502_with_the_reason_and_no_secret(
    gateway: Gateway, his: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-secret-&+=0123"
    monkeypatch.setenv("SS_CLIENT_SECRET", wrong)
    runtime.reset()

    answer = await his.get("/api/satset/token")

    assert answer.status_code == 502
    assert answer.json()["error"] == "SATUSEHAT token request failed" and "401" in answer.json()["detail"]
    assert wrong not in answer.text and CLIENT_SECRET not in answer.text


async def test_batch4_end_to_end(gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient) -> None:
    study = upload_study(series=2, instances_per_series=2)
    body = batch4_input(study)

    answer = await his.post("/api/satset/batch4", json=body)

    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert set(result) == {*BATCH3_KEYS, "dicom_process"}
    assert set(result["dicom_process"]) == {
        "status",
        "study_uid",
        "total_instance",
        "sent_instance",
        "patient_modified",
        "accession_modified",
        "router",
    }
    assert result["dicom_process"]["status"] == "success"
    assert result["dicom_process"]["study_uid"] == study.study_instance_uid
    assert gateway.counts() == dict.fromkeys(RESOURCES, 1)
    imaging = gateway.simulator.running.platform.store.read("ImagingStudy", result["imaging_study_id"])
    assert sum(len(s["instance"]) for s in imaging["series"]) == 4
    run = await flow_run_of(answer)
    assert run.state.is_completed() and run.name == f"batch4 {body['noacsn']}"
    assert answer.headers["X-Flow-Run-Url"].endswith(f"/runs/flow-run/{run.id}")

    found = await his.get(f"/api/satset/imageid/{body['noacsn']}")
    assert (found.status_code, found.json()) == (200, {"imagingStudy_id": result["imaging_study_id"]})

    status = await his.get(f"/api/runs/{run.id}")
    assert status.status_code == 200
    assert status.json()["state"] == "COMPLETED" and status.json()["done"] is True
    assert status.json()["flow_name"] == "batch4" and status.json()["result"] == result


async def test_imageid_of_an_unknown_acsn_is_404_with_the_search_bundle(
    gateway: Gateway, his: httpx.AsyncClient
) -> None:
    """As the existing gateway answered: {"error": "No ImagingStudy found", "detail": <the searchset Bundle>}."""
    answer = await his.get("/api/satset/imageid/NOSUCHACSN")

    assert answer.status_code == 404
    assert answer.json()["error"] == "No ImagingStudy found"
    bundle = answer.json()["detail"]
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and not bundle.get("entry")
    assert (await flow_run_of(answer)).state.is_failed()  # the lookup is a flow run too, visible in the UI


async def test_batch1_dicom_process_batch3_and_batch2(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient
) -> None:
    """The split workflow: the order, the images routed separately, then the report (batch3 adopts the order,
    batch2 adopts the reading and the report: the same ids, nothing twice)."""
    study = upload_study(series=1, instances_per_series=3)
    body = without(batch4_input(study), "study")

    ordered = await his.post("/api/satset/batch1", json=body)
    assert ordered.status_code == 200, ordered.text
    assert set(ordered.json()) == {"encounter_id", "service_request_id"}

    routed = await his.post(
        "/api/dicom/process", json={"study": study.study_instance_uid, "accesionnum": body["noacsn"], "patientid": ""}
    )
    assert routed.status_code == 200, routed.text
    assert routed.json() == {
        "status": "success",
        "study_uid": study.study_instance_uid,
        "total_instance": 3,
        "sent_instance": 3,
        "patient_modified": False,
        "accession_modified": True,
        "router": routed.json()["router"],
    }
    assert gateway.simulator.running.config.router_aet in routed.json()["router"]
    imaging_study_id = await wait_for_imageid(his, body["noacsn"])

    whole = await his.post("/api/satset/batch3", json=body)
    assert whole.status_code == 200, whole.text
    # batch3's body names the radiologist (performer_id), batch1's did not: the order is revised to carry it.
    assert [item["resource"] for item in whole.json().get("revised", [])] in ([], ["service_request"])
    assert set(whole.json()) - {"revised"} == BATCH3_KEYS
    assert {k: whole.json()[k] for k in ordered.json()} == ordered.json()
    assert whole.json()["imaging_study_id"] == imaging_study_id

    report = await his.post("/api/satset/batch2", json={**body, **ordered.json(), "imaging_study_id": imaging_study_id})
    assert report.status_code == 200, report.text
    # batch2's body dates the reading by its period_start; batch3 knew no study time and sent none: a revision.
    revised = report.json().pop("revised", [])
    assert {item["resource"] for item in revised} <= {"observation", "diagnostic_report"}
    assert all(item["changed"] == ["effectiveDateTime"] for item in revised)
    assert {k: report.json()[k] for k in ("observation_id", "diagnostic_report_id")} == {
        k: whole.json()[k] for k in ("observation_id", "diagnostic_report_id")
    }
    assert gateway.counts() == dict.fromkeys(RESOURCES, 1)


async def test_single_resource_endpoints_answer_the_platform_resource(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient
) -> None:
    study = upload_study(series=1, instances_per_series=1)
    body = batch4_input(study)

    encounter = await his.post("/api/satset/encounter", json=body)
    assert encounter.status_code == 201, encounter.text
    assert encounter.json()["resourceType"] == "Encounter" and encounter.json()["meta"]["versionId"]
    assert encounter.json() == gateway.simulator.running.platform.store.read("Encounter", encounter.json()["id"])

    order = await his.post(
        "/api/satset/service-req",
        json={**body, "encounter_id": encounter.json()["id"], "requester_reference": "Practitioner/10016869420"},
    )
    assert order.status_code == 201, order.text
    assert order.json()["resourceType"] == "ServiceRequest"
    assert order.json()["encounter"]["reference"] == f"Encounter/{encounter.json()['id']}"

    routed = await his.post(
        "/api/dicom/process", json={"study": study.study_instance_uid, "accesionnum": body["noacsn"]}
    )
    assert routed.status_code == 200, routed.text
    links = {
        "encounter_id": encounter.json()["id"],
        "service_request_id": order.json()["id"],
        "imaging_study_id": await wait_for_imageid(his, body["noacsn"]),
    }

    reading = await his.post("/api/satset/observation", json={**body, **links})
    assert reading.status_code == 201, reading.text
    assert reading.json()["resourceType"] == "Observation"
    assert reading.json()["derivedFrom"] == [{"reference": f"ImagingStudy/{links['imaging_study_id']}"}]

    report = await his.post("/api/satset/conclusion", json={**body, **links, "observation_id": reading.json()["id"]})
    assert report.status_code == 201, report.text
    assert report.json()["resourceType"] == "DiagnosticReport"
    assert report.json()["conclusion"] == body["conclusion_text"]
    assert gateway.counts() == dict.fromkeys(RESOURCES, 1)


async def test_dicom_process_for_a_study_the_pacs_does_not_have_is_404(
    gateway: Gateway, his: httpx.AsyncClient
) -> None:
    """The existing gateway answered 404 {"status": "error", "message"} for an unknown study or ACSN."""
    missing = "1.2.826.0.1.3680043.8.498.424242"

    by_uid = await his.post("/api/dicom/process", json={"study": missing})
    by_acsn = await his.post("/api/dicom/process", json={"accesionnum": "NOSUCHACSN"})

    for answer, named in ((by_uid, missing), (by_acsn, "NOSUCHACSN")):
        assert answer.status_code == 404, answer.text
        assert answer.json()["status"] == "error" and set(answer.json()) == {"status", "message"}
        assert named in answer.json()["message"]


async def test_dicom_process_for_an_acsn_of_two_studies_is_409_naming_it(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient
) -> None:
    """The existing gateway routed the first match; a client's ambiguous ACSN is a 4xx that names it."""
    acsn = unique_accession()
    first = upload_study(accession_number=acsn, series=1, instances_per_series=1)
    second = upload_study(accession_number=acsn, series=1, instances_per_series=1)

    answer = await his.post("/api/dicom/process", json={"accesionnum": acsn})

    assert answer.status_code == 409, answer.text
    assert answer.json()["status"] == "error"
    message = answer.json()["message"]
    assert acsn in message and first.study_instance_uid in message and second.study_instance_uid in message


async def test_batch1_failing_at_service_request_keeps_the_encounter_and_a_resend_resumes(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient, fast_retries: None
) -> None:
    body = without(batch4_input(upload_study(series=1, instances_per_series=1)), "study")
    gateway.arm(kind="500", count=FHIR_RETRIES + 1, path_prefix="/fhir-r4/v1/ServiceRequest", method="POST")

    failed = await his.post("/api/satset/batch1", json=body)

    assert failed.status_code == 502, failed.text  # the platform failed (5xx, retried): upstream error
    assert set(failed.json()) == {"error", "step", "encounter_id", "detail"}
    assert failed.json()["error"] == "Encounter created but ServiceRequest failed"  # the existing gateway's words
    assert failed.json()["step"] == "service_request"
    assert failed.json()["encounter_id"] == gateway.resources("Encounter")[0]["id"]
    assert "500" in failed.json()["detail"]
    assert (await flow_run_of(failed)).state.is_failed()

    resent = await his.post("/api/satset/batch1", json=body)
    assert resent.status_code == 200, resent.text
    assert resent.json()["encounter_id"] == failed.json()["encounter_id"]
    assert gateway.counts() == {"Encounter": 1, "ServiceRequest": 1}


async def test_a_platform_rule_comes_back_as_its_operation_outcome_and_status(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An org id that is not the client's: SATUSEHAT's rule 10117, passed through as the old gateway did."""
    body = batch4_input(upload_study(series=1, instances_per_series=1))
    monkeypatch.setenv("SS_ORG_ID", "999999")
    runtime.reset()

    single = await his.post("/api/satset/encounter", json=body)
    batch = await his.post("/api/satset/batch1", json=without(body, "study"))

    assert single.status_code == 400, single.text
    outcome = single.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "10117" in json.dumps(outcome) and outcome["issue"][0]["expression"]
    assert outcome["text"] == {"status": "generated"}  # passed through whole, as the platform answered
    assert batch.status_code == 400, batch.text
    assert batch.json()["error"] == "Failed to create Encounter" and batch.json()["step"] == "encounter"
    assert batch.json()["detail"] == outcome
    assert "10117" in json.dumps(batch.json()["detail"])
    assert gateway.counts() == {}


async def test_answers_logs_and_run_records_hold_no_secret_and_no_patient_name(
    gateway: Gateway,
    upload_study: UploadStudy,
    his: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    body = without(batch4_input(upload_study(series=1, instances_per_series=1), subject_display=PATIENT_NAME), "study")
    answers = [
        await his.post("/api/satset/batch1", json=body),
        await his.post("/api/satset/encounter", json=body),
        await his.get("/api/satset/token"),
        await his.post("/api/satset/batch1", json={**body, "subject_id": ""}),  # 422
    ]
    monkeypatch.setenv("SS_CLIENT_SECRET", CLIENT_SECRET + "-wrong")
    runtime.reset()
    answers.append(await his.get("/api/satset/token"))
    new_order = {"identifier_value": body["identifier_value"] + "B", "noacsn": unique_accession()}
    answers.append(await his.post("/api/satset/batch1", json={**body, **new_order}))
    # The refused token: 502 from /token; the batch stops at its first step (BatchFailed's status for a refusal).
    assert [a.status_code for a in answers] == [200, 201, 200, 422, 502, 502], [a.text for a in answers]
    assert answers[-1].json()["step"] == "encounter"

    run_ids = [UUID(a.headers["X-Flow-Run-Id"]) for a in answers if "X-Flow-Run-Id" in a.headers]
    assert len(run_ids) == 3
    await APILogHandler.aflush()
    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
    assert len(runs) == 3 and any("stopped at encounter" in log.message for log in logs)  # the failure is logged
    assert "422 POST /api/satset/batch1: subject_id" in caplog.text  # the API's own log is captured
    records = [
        *(a.text for a in answers),
        *(str(a.headers) for a in answers),
        caplog.text,
        *(log.message for log in logs),
        json.dumps([run.parameters for run in runs], default=str),
    ]
    for record in records:
        assert PATIENT_NAME not in record and "Budi" not in record
        assert CLIENT_SECRET not in record


async def test_a_synchronous_batch3_without_imaging_study_answers_404_within_the_bound(
    gateway: Gateway, upload_study: UploadStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The existing gateway answered 404 at once; ours waits API_SYNC_IMAGING_WAIT_S (here 1 s), not the
    background deadline (here 120 s; the test's own timeout would stop a call that waited for it), then 404 with
    the ids so far and the hint. The same body sent once the images are there adopts them."""
    monkeypatch.setenv("IMAGING_STUDY_DEADLINE_S", "120")
    runtime.reset()
    app = create_app(api_settings(API_SYNC_IMAGING_WAIT_S=1))
    study = upload_study(series=1, instances_per_series=1)
    body = without(batch4_input(study), "study")

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test", headers={"X-API-Key": API_KEY}
    ) as his:
        waiting = await his.post("/api/satset/batch3", json=body)

        assert waiting.status_code == 404, waiting.text
        failure = waiting.json()
        assert failure["error"] == "ServiceRequest created but ImagingStudy lookup failed"
        assert failure["step"] == "imaging_study"
        assert set(failure) == {"error", "step", "encounter_id", "service_request_id", "detail"}
        assert "?async=true" in failure["detail"] and "API_SYNC_IMAGING_WAIT_S" in failure["detail"]
        assert gateway.counts() == {"Encounter": 1, "ServiceRequest": 1}
        assert (await flow_run_of(waiting)).state.is_failed()  # a failed run, as any step's failure

        routed = await his.post(
            "/api/dicom/process", json={"study": study.study_instance_uid, "accesionnum": body["noacsn"]}
        )
        assert routed.status_code == 200, routed.text
        await wait_for_imageid(his, body["noacsn"])
        done = await his.post("/api/satset/batch3", json=body)

    assert done.status_code == 200, done.text
    assert {k: done.json()[k] for k in ("encounter_id", "service_request_id")} == {
        k: failure[k] for k in ("encounter_id", "service_request_id")
    }
    assert gateway.counts() == dict.fromkeys(RESOURCES, 1)
