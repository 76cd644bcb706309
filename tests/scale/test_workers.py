"""The production shape: a Prefect server on PostgreSQL, the RIS on PostgreSQL, two process workers on one pool.

Orders added to the RIS are worked by poll-ris runs that either worker may pick up; HIS-style runs of batch1 are
created through Prefect's REST API at the same time. Every order ends done exactly once, and the simulator holds
exactly one Encounter and ServiceRequest per order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy.engine import make_url

from clients.ris import RisStore
from stack.prefect_server import PrefectServer
from tests.plugins.databases import fresh_database, server_url
from tests.plugins.gateway import batch4_input
from tests.plugins.simulator import SimulatorSession

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
ORDERS = 6
HIS_RUNS = 2
DEADLINE_S = 420


@pytest.fixture
def prefect_on_postgres(tmp_path: Path) -> Iterator[PrefectServer]:
    for database in fresh_database(server_url("postgres")):
        url = make_url(database).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        with PrefectServer(tmp_path / "prefect", database_url=url) as server:
            yield server


@pytest.fixture
def ris_on_postgres() -> Iterator[str]:
    yield from fresh_database(server_url("postgres"))


def _prefect(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    prefect = str(Path(sys.executable).with_name("prefect"))
    return subprocess.run([prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def _order() -> dict[str, object]:
    """A batch1 body (the order only: no images), identifiers unique to this test."""
    body = batch4_input(SimpleNamespace(study_instance_uid=""))  # type: ignore[arg-type]
    body.pop("study")
    return body


def test_two_workers_on_postgres_process_every_order_exactly_once(
    simulator: SimulatorSession,
    gateway_env: dict[str, str],
    prefect_on_postgres: PrefectServer,
    ris_on_postgres: str,
    tmp_path: Path,
) -> None:
    server = prefect_on_postgres
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        **gateway_env,
        **server.client_env(),
        "PREFECT_HOME": str(tmp_path / "client-home"),
        "RIS_DATABASE_URL": ris_on_postgres,
        "SATSET_HOME": str(REPO),
        "POLL_BATCH_SIZE": "2",
    }
    created = _prefect("work-pool", "create", "satset-process", "--type", "process", env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = _prefect("--no-prompt", "deploy", "--all", env=env)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    store = RisStore(ris_on_postgres)
    store.create_schema()
    accessions = []
    for _ in range(ORDERS):
        body = _order()
        store.add_order(1, body)
        accessions.append(str(body["noacsn"]))

    workers = [_start_worker(name, env, tmp_path) for name in ("worker-a", "worker-b")]
    try:
        api = server.api_url
        poll_id = httpx.get(f"{api}/deployments/name/poll-ris/gateway", timeout=10).json()["id"]
        batch1_id = httpx.get(f"{api}/deployments/name/batch1/gateway", timeout=10).json()["id"]
        his_bodies = [_order() for _ in range(HIS_RUNS)]
        for body in his_bodies:  # the HIS path: Prefect's REST API, idempotent by key, twice each
            for _ in range(2):
                httpx.post(
                    f"{api}/deployments/{batch1_id}/create_flow_run",
                    json={"parameters": {"payload": body}, "idempotency_key": f"his-{body['noacsn']}"},
                    timeout=10,
                ).raise_for_status()
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if all(store.get(acsn).status == "done" for acsn in accessions) and _all_runs_final(api, batch1_id):
                break
            for _ in range(2):  # two polls at once: the deployment's limit of one cancels the second
                httpx.post(
                    f"{api}/deployments/{poll_id}/create_flow_run",
                    json={"idempotency_key": f"poll-{uuid.uuid4()}"},
                    timeout=10,
                ).raise_for_status()
            time.sleep(3)
        orders = [store.get(acsn) for acsn in accessions]
    finally:
        for worker in workers:
            _stop(worker)
        store.close()

    assert [o.status for o in orders] == ["done"] * ORDERS, [(o.status, o.last_error) for o in orders]
    assert all(o.attempts == 1 for o in orders), [o.attempts for o in orders]
    counts = simulator.running.platform.store.counts()
    assert counts == {"Encounter": ORDERS + HIS_RUNS, "ServiceRequest": ORDERS + HIS_RUNS}
    runs = httpx.post(
        f"{server.api_url}/flow_runs/filter",
        json={"flow_runs": {"deployment_id": {"any_": [batch1_id]}}, "limit": 50},
        timeout=10,
    ).json()
    his_runs = [r for r in runs if r["parent_task_run_id"] is None]
    assert len(his_runs) == HIS_RUNS  # the repeated create_flow_run calls gave the same runs back


def _all_runs_final(api: str, deployment_id: str) -> bool:
    runs = httpx.post(
        f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}, timeout=10
    ).json()
    return all(run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for run in runs)


def _start_worker(name: str, env: dict[str, str], tmp_path: Path) -> subprocess.Popen[bytes]:
    log = (tmp_path / f"{name}.log").open("wb")
    prefect = str(Path(sys.executable).with_name("prefect"))
    return subprocess.Popen(
        [prefect, "worker", "start", "--pool", "satset-process", "--name", name, "--limit", "3"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
