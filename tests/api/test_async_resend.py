"""An idempotent resend of an asynchronous order whose run FAILED or CRASHED starts a new attempt, which resumes
(every step adopts what the first attempt created) and is what the 202 answers; a completed run stays the answer.
Real Prefect server, simulator and a Prefect Runner serving "batch1/gateway" (as `satset serve` does)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType
from prefect.runner import Runner
from prefect.states import Crashed

from flows import FLOWS
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy
from tests.reliability.table import append_row

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
async def served(gateway: Gateway) -> AsyncIterator[Runner]:
    """batch1's deployment, registered; `await runner.start(run_once=True)` runs what is queued, then returns."""
    runner = Runner(name="resend-test-runner", pause_on_shutdown=False)
    deployment = await FLOWS["batch1"].flow.ato_deployment(name="gateway", entrypoint_type=EntrypointType.MODULE_PATH)
    await runner.aadd_deployment(deployment)
    yield runner


def batch1_body(upload_study: UploadStudy) -> dict[str, Any]:
    sent = batch4_input(upload_study(series=1, instances_per_series=1))
    return {key: value for key, value in sent.items() if key != "study"}


async def status(his: httpx.AsyncClient, flow_run_id: str) -> dict[str, Any]:
    answer = await his.get(f"/api/runs/{flow_run_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def test_a_failed_run_is_followed_by_a_new_attempt_that_resumes_and_is_answered(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient, served: Runner
) -> None:
    body = batch1_body(upload_study)
    gateway.arm(kind="500", count=None, path_prefix="/fhir-r4/v1/ServiceRequest", method="POST")  # the outage
    first = (await his.post("/api/satset/batch1?async=true", json=body)).json()
    await served.start(run_once=True)
    failed = await status(his, first["flow_run_id"])
    assert failed["state"] == "FAILED" and gateway.counts() == {"Encounter": 1}
    gateway.simulator.running.platform.faults.clear()  # the outage is over

    resent = await his.post("/api/satset/batch1?async=true", json=body)
    again = await his.post("/api/satset/batch1?async=true", json=body)

    assert resent.status_code == again.status_code == 202
    attempt = resent.json()
    assert attempt["flow_run_id"] != first["flow_run_id"] and attempt["state"] == "SCHEDULED"
    assert attempt["idempotency_key"] == f"batch1:{body['noacsn']}#2"
    assert again.json()["flow_run_id"] == attempt["flow_run_id"]  # two resends meet on one new attempt
    await served.start(run_once=True)
    done = await status(his, attempt["flow_run_id"])
    assert done["state"] == "COMPLETED", done
    assert gateway.counts() == {"Encounter": 1, "ServiceRequest": 1}  # resumed: the first Encounter adopted
    assert done["result"]["encounter_id"] == gateway.resources("Encounter")[0]["id"]
    after = await his.post("/api/satset/batch1?async=true", json=body)
    assert after.json()["flow_run_id"] == attempt["flow_run_id"]  # a completed attempt stays the answer
    append_row(
        "async_resend",
        {
            "fault": "async batch1 FAILED by an outage (every POST ServiceRequest 500), resent after it: a new "
            "attempt resumes from the Encounter",
            "orders": 1,
            "done": 1,
            "failed": 0,
            "lost": 0,
            "duplicated": sum(gateway.counts().values()) - 2,
        },
    )


async def test_a_crashed_run_is_followed_by_a_new_attempt(
    gateway: Gateway, upload_study: UploadStudy, his: httpx.AsyncClient, served: Runner
) -> None:
    body = batch1_body(upload_study)
    first = (await his.post("/api/satset/batch1?async=true", json=body)).json()
    async with get_client() as client:  # what Prefect's zombie detection does to a run whose process died
        await client.set_flow_run_state(UUID(first["flow_run_id"]), Crashed(message="process killed"), force=True)

    resent = (await his.post("/api/satset/batch1?async=true", json=body)).json()

    assert resent["flow_run_id"] != first["flow_run_id"]
    assert (resent["state"], resent["idempotency_key"]) == ("SCHEDULED", f"batch1:{body['noacsn']}#2")
    await served.start(run_once=True)
    assert (await status(his, resent["flow_run_id"]))["state"] == "COMPLETED"
    assert gateway.counts() == {"Encounter": 1, "ServiceRequest": 1}
    append_row(
        "async_resend",
        {
            "fault": "async batch1 run CRASHED (its process died), resent: a new attempt runs it",
            "orders": 1,
            "done": 1,
            "failed": 0,
            "lost": 0,
            "duplicated": sum(gateway.counts().values()) - 2,
        },
    )
