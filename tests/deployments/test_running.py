"""The two ways to run the gateway's deployments, each against a real `prefect server start`:

* workers: `prefect work-pool create` + `prefect --no-prompt deploy --all` from prefect.yaml, then a process worker
  started in another directory runs a batch1 run (the pull step must put it in $SATSET_HOME);
* one host: `satset serve` registers every deployment and runs a flow run created through the REST API.

The flows reach the simulator and Orthanc of the test session through the settings in the processes' environment,
exactly as on a gateway host.
"""

from __future__ import annotations

import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from deployments.catalog import DEPLOYMENTS, by_full_name
from deployments.prefect_yaml import PULL_STEPS, WORK_POOL
from tests.deployments.prefect_server import (
    PROJECT_ROOT,
    Background,
    PrefectApi,
    prefect_command,
    running_prefect_server,
    start_background,
    wait_for,
)
from tests.plugins.pacs import require, unique_accession
from tests.plugins.simulator import SimulatorSession

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 300.0
"""A first flow run imports Prefect and the gateway in a fresh process; 2 busy cores have needed minutes."""


@pytest.fixture
def prefect_api(tmp_path: Path) -> Any:
    with running_prefect_server(tmp_path) as server:
        yield server


def _batch1_body() -> dict[str, Any]:
    return {
        "identifier_value": "RG" + uuid.uuid4().hex[:12].upper(),
        "subject_id": "P10443013727",
        "individual_id": "10016869420",
        "period_start": "2025-08-01T05:57:41+00:00",
        "noacsn": unique_accession(),
    }


def _run_env(server: PrefectApi, gateway_env: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    """A gateway host's environment: the Prefect server, the gateway's settings, a RIS database of its own."""
    return server.env(
        **gateway_env,
        RIS_DATABASE_URL=f"sqlite:///{tmp_path / 'ris.db'}",
        TEMP_DIR=str(tmp_path / "scratch"),
        **extra,
    )


def _start_run(server: PrefectApi, full_name: str, parameters: dict[str, Any]) -> str:
    deployment = server.deployment(full_name)
    assert deployment is not None, f"{full_name} is not deployed"
    body = {"parameters": parameters, "idempotency_key": uuid.uuid4().hex}  # safe to send again after a 503
    run = server.post(f"/deployments/{deployment['id']}/create_flow_run", body)
    return str(run["id"])


def _assert_completed_batch1(
    server: PrefectApi, simulator: SimulatorSession, run_id: str, body: dict[str, Any], runner: Background
) -> None:
    run = server.wait_for_final_state(run_id, RUN_TIMEOUT_S, alive=runner)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{runner.log()[-6000:]}"
    store = simulator.running.platform.store
    encounters = [e for e in store.all("Encounter") if body["identifier_value"] in str(e["identifier"])]
    orders = [s for s in store.all("ServiceRequest") if body["noacsn"] in str(s["identifier"])]
    assert len(encounters) == 1 and len(orders) == 1
    assert orders[0]["encounter"]["reference"] == f"Encounter/{encounters[0]['id']}"


def _assert_schedule_and_limit(deployment: dict[str, Any], full_name: str) -> None:
    expected = by_full_name()[full_name]
    if expected.interval_s is None:
        assert deployment["schedules"] == [], full_name
    else:
        [schedule] = deployment["schedules"]
        assert schedule["schedule"]["interval"] == expected.interval_s
        assert schedule["active"] is True
    if expected.concurrency is None:
        assert deployment["global_concurrency_limit"] is None, full_name
    else:
        # The REST read keeps `concurrency_limit` null; the limit lives in a global concurrency limit.
        assert deployment["global_concurrency_limit"]["limit"] == expected.concurrency.limit
        assert deployment["concurrency_options"]["collision_strategy"] == expected.concurrency.collision_strategy


def test_prefect_deploy_all_then_a_process_worker_runs_batch1(
    prefect_api: PrefectApi,
    simulator: SimulatorSession,
    gateway_env: dict[str, str],
    tmp_path: Path,
) -> None:
    for deployment in DEPLOYMENTS:
        require(deployment.available(), f"{deployment.entrypoint} (being written)")
    prefect_api.run_cli("work-pool", "create", WORK_POOL, "--type", "process")
    prefect_api.run_cli("--no-prompt", "deploy", "--all", cwd=PROJECT_ROOT)

    for expected in DEPLOYMENTS:
        deployment = prefect_api.deployment(expected.full_name)
        assert deployment is not None, f"{expected.full_name} was not deployed"
        assert deployment["entrypoint"] == expected.entrypoint
        assert deployment["work_pool_name"] == WORK_POOL
        assert deployment["pull_steps"] == PULL_STEPS, "the pull step must stay a template, resolved on the worker"
        assert sorted(deployment["tags"]) == sorted(expected.tags)
        assert deployment["description"] == expected.description
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["paused"] is False
        _assert_schedule_and_limit(deployment, expected.full_name)
    batch4 = prefect_api.deployment("batch4/gateway")
    assert batch4 is not None
    form = batch4["parameter_openapi_schema"]
    assert form["required"] == ["payload"]
    assert {"noacsn", "study", "period_start"} <= set(form["definitions"]["Batch4Input"]["properties"])

    # The worker starts somewhere else: only the pull step ($SATSET_HOME) gets the run to the code and its .env.
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    env = _run_env(prefect_api, gateway_env, tmp_path, SATSET_HOME=str(PROJECT_ROOT), PREFECT_WORKER_QUERY_SECONDS="2")
    command = prefect_command("worker", "start", "--pool", WORK_POOL, "--limit", "2")
    worker = start_background("prefect-worker", command, env, tmp_path, cwd=elsewhere)
    try:
        body = _batch1_body()
        run_id = _start_run(prefect_api, "batch1/gateway", {"payload": body})
        _assert_completed_batch1(prefect_api, simulator, run_id, body, worker)
        run = prefect_api.flow_run(run_id)
        assert run["work_pool_name"] == WORK_POOL
    finally:
        worker.stop()


def test_satset_serve_registers_every_deployment_and_runs_a_flow_run_created_through_the_api(
    prefect_api: PrefectApi,
    simulator: SimulatorSession,
    gateway_env: dict[str, str],
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "serve-cwd"
    elsewhere.mkdir()
    env = _run_env(prefect_api, gateway_env, tmp_path, PREFECT_RUNNER_POLL_FREQUENCY="2")
    command = [sys.executable, "-m", "cli", "serve", "--limit", "2"]  # `satset serve`, from this venv
    serving = start_background("satset-serve", command, env, tmp_path, cwd=elsewhere)
    try:
        served = [d for d in DEPLOYMENTS if d.available()]
        for expected in served:
            deployment = wait_for(
                lambda name=expected.full_name: prefect_api.deployment(name),
                f"{expected.full_name} to be registered",
                timeout_s=180,
                alive=serving,
            )
            assert deployment["entrypoint"] == f"{expected.module}.{expected.function}"
            assert deployment["work_pool_name"] is None
            assert sorted(deployment["tags"]) == sorted(expected.tags)
            _assert_schedule_and_limit(deployment, expected.full_name)
        output = serving.log()
        assert all(d.full_name in output for d in served), output
        assert f"Prefect UI: {prefect_api.ui_url}/deployments" in output

        body = _batch1_body()
        run_id = _start_run(prefect_api, "batch1/gateway", {"payload": body})
        _assert_completed_batch1(prefect_api, simulator, run_id, body, serving)
    finally:
        serving.stop(first_signal=signal.SIGINT)

    assert serving.process.returncode == 0, f"satset serve did not stop on Ctrl-C:\n{serving.log()[-4000:]}"
    # pause_on_shutdown=False: stopping the process leaves every deployment (and the poller's schedule) active.
    for expected in DEPLOYMENTS:
        if expected.available():
            deployment = prefect_api.deployment(expected.full_name)
            assert deployment is not None and deployment["paused"] is False, expected.full_name
