"""The asynchronous mode: 202 at once, the run queued on "<flow>/gateway", the same order key giving the same run,
and the run completing once something serves the deployment (here a Prefect Runner, as `satset serve` is one)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType
from prefect.runner import Runner

from flows import FLOWS
from tests.api.conftest import PATIENT_NAME
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
async def served(gateway: Gateway) -> AsyncIterator[Runner]:
    """batch1's deployment "batch1/gateway", registered; `await runner.start(run_once=True)` runs what is queued
    (each run in its own `python -m prefect.engine` process, importing the flow by its entrypoint, with this
    test's environment and Prefect API) and returns when they end. As `prefect.serve(flow.to_deployment(...))`
    does; `Runner.add_flow`/`flow.serve()` would instead cloudpickle the flow into the child by value, where
    its string annotations (`from __future__ import annotations`) no longer resolve."""
    runner = Runner(name="api-test-runner", pause_on_shutdown=False)
    deployment = await FLOWS["batch1"].flow.ato_deployment(name="gateway", entrypoint_type=EntrypointType.MODULE_PATH)
    await runner.aadd_deployment(deployment)
    yield runner


async def test_async_batch1_is_queued_once_per_order_and_completes_when_served(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient, served: Runner
) -> None:
    body = {
        k: v
        for k, v in batch4_input(upload_study(series=1, instances_per_series=1), subject_display=PATIENT_NAME).items()
        if k != "study"
    }
    key = f"his-order-{body['noacsn']}"

    first = await his.post("/api/satset/batch1?async=true", json=body, headers={"Idempotency-Key": key})
    again = await his.post("/api/satset/batch1?async=true", json=body, headers={"Idempotency-Key": key})
    by_prefer = await his.post("/api/satset/batch1", json=body, headers={"Prefer": "respond-async"})
    by_prefer_again = await his.post("/api/satset/batch1", json=body, headers={"Prefer": "respond-async, wait=5"})

    assert [a.status_code for a in (first, again, by_prefer, by_prefer_again)] == [202] * 4
    accepted = first.json()
    assert set(accepted) == {"flow_run_id", "flow_run_name", "state", "idempotency_key", "ui_url", "status_url"}
    assert accepted["idempotency_key"] == key and accepted["state"] == "SCHEDULED"
    assert again.json()["flow_run_id"] == accepted["flow_run_id"]
    assert accepted["ui_url"].endswith(f"/runs/flow-run/{accepted['flow_run_id']}")
    assert first.headers["Location"] == accepted["status_url"]
    assert accepted["status_url"] == f"http://gateway.test/api/runs/{accepted['flow_run_id']}"
    # Without a key the order key is the flow and the ACSN: one run per order, another than the keyed one.
    assert by_prefer.json()["idempotency_key"] == f"batch1:{body['noacsn']}"
    assert by_prefer_again.json()["flow_run_id"] == by_prefer.json()["flow_run_id"] != accepted["flow_run_id"]
    assert by_prefer.headers["Preference-Applied"] == "respond-async"
    assert gateway.counts() == {}  # nothing ran yet: nobody served the deployment

    waiting = await his.get(f"/api/runs/{accepted['flow_run_id']}")
    assert waiting.status_code == 200
    assert (waiting.json()["state"], waiting.json()["done"], waiting.json()["result"]) == ("SCHEDULED", False, None)

    await served.start(run_once=True)

    done = await his.get(accepted["status_url"].removeprefix("http://gateway.test"))
    assert done.status_code == 200, done.text
    status = done.json()
    assert (status["state"], status["done"], status["flow_name"]) == ("COMPLETED", True, "batch1"), status
    assert set(status["result"]) == {"encounter_id", "service_request_id"}
    other = (await his.get(f"/api/runs/{by_prefer.json()['flow_run_id']}")).json()
    assert other["state"] == "COMPLETED" and other["result"] == status["result"]  # the second run adopted
    assert gateway.counts() == {"Encounter": 1, "ServiceRequest": 1}
    assert status["result"]["encounter_id"] == gateway.resources("Encounter")[0]["id"]

    async with get_client() as client:
        run = await client.read_flow_run(UUID(accepted["flow_run_id"]))
    assert run.parameters["payload"]["noacsn"] == body["noacsn"]
    assert PATIENT_NAME not in json.dumps(run.parameters) and "subject_display" not in run.parameters["payload"]


async def test_async_without_a_served_deployment_is_503_naming_it(gateway: Gateway, his: httpx.AsyncClient) -> None:
    body = {
        "identifier_value": "OBS-1",
        "subject_id": "P10443013727",
        "encounter_id": "6dc2dc13-0b5a-4105-996e-6403e43be60a",
        "period_start": "2025-08-31T15:25:00+00:00",
        "performer_id": "10000504193",
        "performer_value": "Hasil Bacaan",
        "service_request_id": "a33163ec-ba77-4775-8d20-83035b76e668",
        "imaging_study_id": "75b7e9d0-c079-419c-84f8-8dba7b9cd585",
        "conclusion_text": "Normal",
    }

    answer = await his.post("/api/satset/batch2?async=true", json=body)

    assert answer.status_code == 503
    assert answer.json()["error"] == "deployment batch2/gateway not found"
    assert "satset serve" in answer.json()["detail"]


async def test_status_of_an_unknown_run_is_404(gateway: Gateway, his: httpx.AsyncClient) -> None:
    answer = await his.get("/api/runs/00000000-0000-4000-8000-000000000000")
    assert answer.status_code == 404 and answer.json()["field"] == "flow_run_id"
