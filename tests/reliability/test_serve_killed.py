"""`satset serve` SIGKILLed while it runs an asynchronous batch1, then started again: the orphaned run is marked
Crashed by the heartbeat automation `satset serve` creates, and the HIS's resend of the same body answers 202 with
a new attempt that adopts the first one's Encounter and completes. Real `prefect server start`, real `satset serve`
processes, the HIS API in this process; nothing but the simulator's hang is staged.

Waiting for the server is bounded by deadlines (the crash comes about 95 s after the kill), never asserted."""

from __future__ import annotations

import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from api.app import create_app
from tests.api.conftest import API_KEY, api_settings
from tests.deployments.prefect_server import (
    PROJECT_ROOT,
    Background,
    PrefectApi,
    running_prefect_server,
    start_background,
    wait_for,
)
from tests.plugins.pacs import unique_accession
from tests.plugins.simulator import SimulatorSession
from tests.reliability.table import append_row

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

CRASH_DEADLINE_S = 300.0
"""90 s of silence after the last heartbeat, the trigger period, and a loaded 2-core host's delays."""
RUN_TIMEOUT_S = 300.0


@pytest.fixture
def prefect_api(tmp_path: Path) -> Iterator[PrefectApi]:
    with running_prefect_server(tmp_path) as server:
        yield server


def serve(prefect_api: PrefectApi, gateway_env: dict[str, str], tmp_path: Path, name: str) -> Background:
    env = prefect_api.env(
        **gateway_env,
        RIS_DATABASE_URL=f"sqlite:///{tmp_path / 'ris.db'}",
        TEMP_DIR=str(tmp_path / "scratch"),
        PREFECT_RUNNER_POLL_FREQUENCY="2",
    )
    serving = start_background(
        name, [sys.executable, "-m", "cli", "serve", "--limit", "2"], env, tmp_path, PROJECT_ROOT
    )
    wait_for(lambda: prefect_api.deployment("batch1/gateway"), "batch1/gateway registered", 180, alive=serving)
    return serving


def state(prefect_api: PrefectApi, flow_run_id: str) -> str:
    return str(prefect_api.flow_run(flow_run_id)["state"]["type"])


async def test_serve_killed_mid_async_batch1_the_run_is_crashed_and_a_resend_resumes_it(
    prefect_api: PrefectApi, simulator: SimulatorSession, gateway_env: dict[str, str], tmp_path: Path
) -> None:
    body = {
        "identifier_value": "RG" + uuid.uuid4().hex[:12].upper(),
        "subject_id": "P10443013727",
        "individual_id": "10016869420",
        "period_start": "2025-08-01T05:57:41+00:00",
        "noacsn": unique_accession(),
    }
    faults = simulator.running.platform.faults
    store = simulator.running.platform.store
    app = create_app(api_settings())
    transport = httpx.ASGITransport(app=app)
    first_serve = serve(prefect_api, gateway_env, tmp_path, "satset-serve-1")
    httpx.post(
        f"{simulator.running.base_url}/admin/faults/http",
        json={"kind": "hang", "count": None, "hang_s": 600, "path_prefix": "/fhir-r4/v1/ServiceRequest"},
        timeout=10,
    ).raise_for_status()
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_api.api_url}):
            async with httpx.AsyncClient(
                transport=transport, base_url="http://gateway.test", headers={"X-API-Key": API_KEY}
            ) as his:
                first = (await his.post("/api/satset/batch1?async=true", json=body)).json()
                run_id = first["flow_run_id"]

                def encounter_made() -> Any:
                    made = [e for e in store.all("Encounter") if body["identifier_value"] in str(e["identifier"])]
                    return made or None

                wait_for(encounter_made, "the first attempt's Encounter", RUN_TIMEOUT_S, alive=first_serve)
                assert state(prefect_api, run_id) == "RUNNING"
                first_serve.stop(first_signal=signal.SIGKILL)  # the process group: serve and its flow run
                faults.clear()

                wait_for(
                    lambda: state(prefect_api, run_id) if state(prefect_api, run_id) != "RUNNING" else None,
                    "the killed run to leave RUNNING",
                    CRASH_DEADLINE_S,
                    interval_s=2,
                )
                assert state(prefect_api, run_id) == "CRASHED"
                second_serve = serve(prefect_api, gateway_env, tmp_path, "satset-serve-2")
                try:
                    resent = await his.post("/api/satset/batch1?async=true", json=body)
                    assert resent.status_code == 202, resent.text
                    attempt = resent.json()
                    assert attempt["flow_run_id"] != run_id
                    assert attempt["idempotency_key"] == f"batch1:{body['noacsn']}#2"
                    done = prefect_api.wait_for_final_state(attempt["flow_run_id"], RUN_TIMEOUT_S, alive=second_serve)
                    assert done["state"]["type"] == "COMPLETED", f"{done['state']}\n{second_serve.log()[-4000:]}"
                finally:
                    second_serve.stop(first_signal=signal.SIGINT)
    finally:
        first_serve.stop(first_signal=signal.SIGKILL)
        faults.clear()

    encounters = [e for e in store.all("Encounter") if body["identifier_value"] in str(e["identifier"])]
    orders = [s for s in store.all("ServiceRequest") if body["noacsn"] in str(s["identifier"])]
    assert len(encounters) == 1 and len(orders) == 1  # resumed: the first attempt's Encounter adopted
    assert orders[0]["encounter"]["reference"] == f"Encounter/{encounters[0]['id']}"
    append_row(
        "async_resend",
        {
            "fault": "`satset serve` SIGKILLed mid async batch1 (Encounter made, ServiceRequest in flight), restarted; "
            "the run Crashed by the heartbeat automation, the order resent",
            "orders": 1,
            "done": 1,
            "failed": 0,
            "lost": 0,
            "duplicated": len(encounters) + len(orders) - 2,
        },
    )
