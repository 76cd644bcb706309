"""A corrected order reaches SATUSEHAT: a re-send with another reading, conclusion, exam code or visit detail is
PUT to the resources already filed (Observation and DiagnosticReport `amended`), the answer and the run's artifact
say what changed, and a re-send with identical content changes nothing. Through the real parts."""

from __future__ import annotations

from typing import Any

import pytest
from prefect.client.orchestration import get_client

from flows.batches import batch1, batch4
from models.inputs import Batch1Input, Batch4Input
from tasks.artifacts import artifact_key
from tests.integrity.links import record
from tests.integrity.test_wrong_patient import batch1_body
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.usefixtures("fast_retries")]

IDS = ("encounter_id", "service_request_id", "imaging_study_id", "observation_id", "diagnostic_report_id")


async def _filed(gateway: Gateway, upload_study: UploadStudy) -> tuple[dict[str, Any], dict[str, Any]]:
    body = batch4_input(upload_study(series=1, instances_per_series=2))
    return body, await batch4(Batch4Input.model_validate(body))


async def test_an_identical_resend_changes_nothing(gateway: Gateway, upload_study: UploadStudy) -> None:
    body, first = await _filed(gateway, upload_study)
    versions = {
        kind: r["meta"]["versionId"] for kind in ("Observation", "DiagnosticReport") for r in gateway.resources(kind)
    }

    again = await batch4(Batch4Input.model_validate(body))

    assert again == first and "revised" not in again
    assert {kind: r["meta"]["versionId"] for kind in versions for r in gateway.resources(kind)} == versions
    record(gateway.simulator.running.platform.store, "batch4 sent twice, identical", orders=2, done=2, failed="0")


async def test_a_corrected_reading_and_conclusion_amend_the_filed_resources(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    body, first = await _filed(gateway, upload_study)
    store = gateway.simulator.running.platform.store
    before = {
        "Observation": store.read("Observation", first["observation_id"]),
        "DiagnosticReport": store.read("DiagnosticReport", first["diagnostic_report_id"]),
    }
    corrected = {**body, "performer_value": "Koreksi: nodul 4 mm lobus kanan atas", "conclusion_text": "Koreksi"}

    result = await batch4(Batch4Input.model_validate(corrected))

    assert {key: result[key] for key in IDS} == {key: first[key] for key in IDS}  # the same resources, revised
    reading = store.read("Observation", first["observation_id"])
    report = store.read("DiagnosticReport", first["diagnostic_report_id"])
    assert (reading["status"], reading["valueString"]) == ("amended", corrected["performer_value"])
    assert (report["status"], report["conclusion"]) == ("amended", "Koreksi")
    assert result["revised"] == [
        {
            "resource": "observation",
            "id": first["observation_id"],
            "changed": ["valueString"],
            "previous_version": before["Observation"]["meta"]["versionId"],
        },
        {
            "resource": "diagnostic_report",
            "id": first["diagnostic_report_id"],
            "changed": ["conclusion"],
            "previous_version": before["DiagnosticReport"]["meta"]["versionId"],
        },
    ]
    assert reading["meta"]["versionId"] != before["Observation"]["meta"]["versionId"]
    assert set(gateway.counts().values()) == {1}  # nothing created twice
    async with get_client() as client:
        artifact = await client.read_artifacts()
    summaries = [str(a.data) for a in artifact if a.key == artifact_key("batch4", body["noacsn"])]
    assert len(summaries) == 2  # the first filing and the correction, the order's history in the UI
    assert sum("revised.0.changed | `['valueString']`" in summary for summary in summaries) == 1

    # The correction sent again: no further PUT, and the same answer as the first time (an idempotent replay).
    resent = await batch4(Batch4Input.model_validate(corrected))
    assert resent == result
    record(
        store,
        "batch4 re-sent with a corrected reading and conclusion (PUT, amended), then again",
        orders=3,
        done=3,
        failed="0",
    )
    assert store.read("Observation", first["observation_id"])["meta"] == reading["meta"]


async def test_a_changed_exam_code_updates_the_order_reading_and_report(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    body, first = await _filed(gateway, upload_study)
    store = gateway.simulator.running.platform.store
    corrected = {**body, "codind_code": "24627-2", "coding_display": "CT Chest"}

    result = await batch4(Batch4Input.model_validate(corrected))

    changed = {item["resource"]: item["changed"] for item in result["revised"]}
    assert "code" in changed["service_request"] and "code" in changed["observation"]
    assert "code" in changed["diagnostic_report"]
    for kind, key in (("ServiceRequest", "service_request_id"), ("Observation", "observation_id")):
        codes = [coding["code"] for coding in store.read(kind, first[key])["code"]["coding"]]
        assert "24627-2" in codes, kind
    assert store.read("ServiceRequest", first["service_request_id"])["status"] == "active"  # an order, not a result
    record(store, "batch4 re-sent with another exam code (PUT of order, reading, report)", orders=2, done=2, failed="0")


async def test_a_changed_visit_detail_updates_the_encounter(gateway: Gateway) -> None:
    body = batch1_body()
    first = await batch1(Batch1Input.model_validate(body))

    result = await batch1(Batch1Input.model_validate({**body, "individual_id": "10000504193"}))

    assert result["encounter_id"] == first["encounter_id"]
    (revision,) = [item for item in result["revised"] if item["resource"] == "encounter"]
    assert "participant" in revision["changed"]
    assert revision["previous_version"] is not None
    (encounter,) = gateway.resources("Encounter")
    assert encounter["participant"][0]["individual"]["reference"] == "Practitioner/10000504193"
    assert encounter["meta"]["versionId"] != revision["previous_version"]
    record(
        gateway.simulator.running.platform.store,
        "batch1 re-sent with another practitioner (PUT Encounter)",
        orders=2,
        done=2,
        failed="0",
    )
