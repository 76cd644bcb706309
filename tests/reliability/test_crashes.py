"""Crashes and a database restart, with nothing lost and nothing created twice.

* SIGKILL in every step of batch4: one batch4 order per case, each held inside its step (the simulator holds
  that order's request, or the router that order's association), a real poller process SIGKILLed with all of
  them in flight at once, then a new poller started once their leases have run out. The FHIR steps are killed
  twice: before the platform commits (request in flight) and after it committed (the response lost, the id never
  recorded).
* PostgreSQL restart: the RIS table on the machine's PostgreSQL, batch4 orders in flight in a running poller,
  the server restarted under it (`pg_ctlcluster ... restart`); the poller rides it out.

Each case ends in the simulator's own store and the RIS table: done with one of each resource (the ImagingStudy
listing every instance), or failed/dead with the reason, judged as the fault matrix judges (`fault_harness.judge`,
itself tested in test_harness.py). Each scenario publishes its rows of the reliability table.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import prefect.settings
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from clients.ris import RisStore
from models.orders import DEAD, DONE, FAILED, IN_PROGRESS, RadiologyOrder, utcnow
from simulator.config import SimulatorConfig
from simulator.router import RouterEmulator
from simulator.server import RunningSimulator
from stack.orthanc import OrthancServer
from tests.deployments.prefect_server import Background, wait_for
from tests.plugins.databases import fresh_database, server_url
from tests.plugins.gateway import batch4_input, gateway_environment
from tests.plugins.pacs import UploadStudy
from tests.plugins.simulator import CLIENT_ID, CLIENT_SECRET, ORG_ID
from tests.reliability.crash_harness import (
    Hold,
    Holds,
    go,
    poller_env,
    sigkill,
    start_holding_simulator,
    start_poller,
)
from tests.reliability.fault_harness import Verdict, check_totals, judge, table_row
from tests.reliability.table import append_row

INSTANCES = 3
LEASE_S = 60
"""The kill test's lease, renewed every third of it while an order runs. Each renewal is a task run, so a short
lease floods the test's Prefect server (on 2 busy cores it then takes a minute to start a subflow); instead the
dead poller's leases are run out in the RIS table (`run_out_leases`) rather than waited for."""
ENGAGE_TIMEOUT_S = 120.0
"""A fresh poller imports Prefect and the gateway, then claims and runs every order up to its step."""
FINISH_TIMEOUT_S = 120.0
TERMINAL = (DONE, FAILED, DEAD)


@dataclass(frozen=True)
class Case:
    """Where one order is when its poller dies: the step, and how that step's request is held."""

    fault: str
    step: str
    resource: str
    mode: str
    method: str = "POST"
    after_instances: int = 0
    gated: bool = False
    """Kept at its ServiceRequest POST (a `delay` hold) until every other order is held, then let go to its step:
    the router client gives up on a C-STORE response after 30 s (its DIMSE timeout), so the association may be
    held only briefly before the kill."""


def _fhir_cases(step: str, resource: str) -> list[Case]:
    return [
        Case(f"SIGKILL in the {resource} POST, before the platform commits", step, resource, "drop"),
        Case(f"SIGKILL after the {resource} is committed, before its id is recorded", step, resource, "commit"),
    ]


KILL_CASES = [
    *_fhir_cases("encounter", "Encounter"),
    *_fhir_cases("service_request", "ServiceRequest"),
    Case(
        f"SIGKILL mid-association (2 of {INSTANCES} instances stored, the 3rd in flight)",
        "dicom_process",
        "DICOM",
        "drop",
        after_instances=2,
        gated=True,
    ),
    Case("SIGKILL while waiting for the ImagingStudy", "imaging_study", "ImagingStudy", "drop", method="GET"),
    *_fhir_cases("observation", "Observation"),
    *_fhir_cases("diagnostic_report", "DiagnosticReport"),
]
"""All ten are held at once in one poller (POLL_CONCURRENCY = 10): each holds one thread of the gateway's I/O pool
(tasks.runtime.io_pool, far larger than ten), so the orders still on their way to their step are never starved."""


@dataclass
class Order:
    """A batch4 order of the test: its body, its study's SOP Instance UIDs, and its hold."""

    case: Case
    body: dict[str, Any]
    sop_uids: set[str]
    hold: Hold
    gate: Hold | None = None

    @property
    def accession(self) -> str:
        return str(self.body["noacsn"])


@dataclass(frozen=True)
class PgCluster:
    """The Debian cluster behind SATSET_TEST_POSTGRES_URL, which this process may restart."""

    url: str
    version: str
    name: str


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def restartable_postgres() -> PgCluster:
    """The PostgreSQL server of SATSET_TEST_POSTGRES_URL and its Debian cluster, which this process may restart.

    Skipped with the reason (failed under CI=true) when the URL is unset or pg_ctlcluster cannot restart that
    server from here. Session-scoped, so that it is decided before the Prefect server and Orthanc start."""
    url = server_url("postgres")
    tools = ("pg_ctlcluster", "pg_lsclusters", "pg_isready")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    _need(not missing, f"{', '.join(missing)} not found (Debian package postgresql-common)")
    address = make_url(url)
    host, port = address.host or "localhost", address.port or 5432
    _need(host in ("127.0.0.1", "localhost", "::1"), f"SATSET_TEST_POSTGRES_URL points at {host}, not this machine")
    version, name = _pg_cluster(url)
    listed = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=30).stdout
    owners = [
        fields[4]
        for fields in (line.split() for line in listed.splitlines())
        if len(fields) >= 5 and fields[:3] == [version, name, str(port)] and fields[3] == "online"
    ]
    _need(bool(owners), f"pg_lsclusters shows no cluster {version}/{name} online on port {port}")
    user = pwd.getpwuid(os.geteuid()).pw_name
    _need(os.geteuid() == 0 or user == owners[0], f"pg_ctlcluster needs root or {owners[0]}, not {user}")
    return PgCluster(url, version, name)


def _need(ok: bool, reason: str) -> None:
    """Skip the restart test with `reason` on a developer machine; fail under CI=true, where it must run."""
    if ok:
        return
    message = f"cannot restart PostgreSQL: {reason}"
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (the restart test must run in CI)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def holding_simulator() -> Iterator[tuple[RunningSimulator, Holds]]:
    """A simulator of this test's own, with holds; every hold released before it stops."""
    config = SimulatorConfig(org_id=ORG_ID, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, router_delay_s=0.2)
    running, holds = start_holding_simulator(config)
    try:
        yield running, holds
    finally:
        holds.release_all()
        running.stop()


@pytest.fixture
def gateway_settings(holding_simulator: tuple[RunningSimulator, Holds], orthanc: OrthancServer) -> dict[str, str]:
    """The gateway's environment on a host: the holding simulator (FHIR and router) and Orthanc (the PACS)."""
    running, _ = holding_simulator
    return {
        **gateway_environment(running, orthanc),
        "SS_TIMEOUT_S": "600",  # a held request stays held until the test lets it go: no client timeout
        "IMAGING_STUDY_DEADLINE_S": "60",
        "ORDER_RETRY_BACKOFF_S": "1",
        "POLL_BATCH_SIZE": "20",
        "POLL_CONCURRENCY": str(len(KILL_CASES)),
    }


@pytest.fixture
def prefect_api_url(prefect_server: None) -> str:
    return str(prefect.settings.PREFECT_API_URL.value())


@pytest.fixture
def ris_on_postgres(restartable_postgres: PgCluster) -> Iterator[str]:
    yield from fresh_database(restartable_postgres.url)


# --- helpers -----------------------------------------------------------------------------------------------


def add_orders(ris: RisStore, holds: Holds, upload_study: UploadStudy, cases: list[Case]) -> list[Order]:
    """One pending batch4 order per case, its study in Orthanc, its hold armed at the case's step."""
    orders = []
    for case in cases:
        study = upload_study(series=1, instances_per_series=INSTANCES)
        body = batch4_input(study)
        token = str(body["identifier_value"] if case.resource == "Encounter" else body["noacsn"])
        hold = holds.arm(
            Hold(
                label=f"{case.step}/{case.mode} {body['noacsn']}",
                mode=case.mode,  # type: ignore[arg-type]
                method=case.method,
                resource=case.resource,
                token=token,
                after_instances=case.after_instances,
            )
        )
        gate = None
        if case.gated:
            gate = holds.arm(
                Hold(f"gate {body['noacsn']}", "delay", resource="ServiceRequest", token=str(body["noacsn"]))
            )
        ris.add_order(4, body)
        orders.append(Order(case, body, set(study.by_sop_uid), hold, gate))
    return orders


def wait_until_held(
    ris: RisStore, holds: Holds, orders: list[Order], poller: Background, at_gate: bool = False
) -> None:
    """Every order inside its step (`at_gate`: the gated ones at their gate instead); fails at once, naming it,
    if an order ends before it got there."""

    def hold(order: Order) -> Hold:
        return order.gate if at_gate and order.gate is not None else order.hold

    def check() -> bool | None:
        if all(hold(order).engaged.is_set() for order in orders):
            return True
        ended = [o for o in orders if not hold(o).engaged.is_set() and ris.get(o.accession).status in TERMINAL]
        if ended:
            why = "; ".join(f"{o.case.fault}: {ris.get(o.accession).last_error}" for o in ended)
            raise AssertionError(f"orders ended before reaching their step: {why}\n{poller.log()[-4000:]}")
        return None

    try:
        wait_for(check, "every order to be held in its step", timeout_s=ENGAGE_TIMEOUT_S, alive=poller)
    except AssertionError as error:
        raise AssertionError(f"{error}\nheld: {holds.engaged()}") from None


def wait_until_finished(ris: RisStore, orders: list[Order], poller: Background) -> None:
    wait_for(
        lambda: True if all(ris.get(order.accession).status in TERMINAL for order in orders) else None,
        "every order to end done, failed or dead",
        timeout_s=FINISH_TIMEOUT_S,
        alive=poller,
    )


def run_out_leases(ris: RisStore, orders: list[Order]) -> None:
    """The dead poller's leases at their end, as if ORDER_LEASE_S had passed: its claims untouched (still
    in_progress, claimed by it), only `lease_expires_at` moved to the past, so the next poll takes them all."""
    table = RadiologyOrder.__table__  # type: ignore[attr-defined]
    accessions = [order.accession for order in orders]
    with ris.engine.begin() as connection:
        moved = connection.execute(
            sa.update(table)
            .where(table.c.accession_number.in_(accessions), table.c.status == IN_PROGRESS)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        ).rowcount
    assert moved == len(orders), f"{moved} of {len(orders)} orders still claimed by the dead poller"


def assert_killed_inside_the_step(running: RunningSimulator, ris: RisStore, orders: list[Order]) -> None:
    """What the RIS and the platform hold right after the kill: each order claimed and unfinished, and each FHIR
    POST committed (commit) or not (drop)."""
    for order in orders:
        case = order.case
        held = ris.get(order.accession)
        assert held.status == IN_PROGRESS and held.result is None, (case.fault, held.status)
        if case.resource not in ("DICOM", "ImagingStudy"):
            assert len(found(running, order, case.resource)) == (1 if case.mode == "commit" else 0), case.fault


def release_the_dead_pollers_requests(running: RunningSimulator, orders: list[Order]) -> None:
    """The held requests answer the dead poller; the held association goes on, finds its peer gone and is
    discarded by the router (nothing built from half a study)."""
    for order in orders:
        order.hold.released.set()
    router = running._router
    assert isinstance(router, RouterEmulator) and router.wait_idle(30), "the router did not settle"
    for order in orders:
        if order.case.resource == "DICOM":
            assert found(running, order, "ImagingStudy") == [], "a killed association must yield nothing"
            assert len(running.platform.store.events(["router.discarded"])) == 1
        if order.case.resource == "ImagingStudy":  # routed before the kill, so the router made it
            assert len(found(running, order, "ImagingStudy")) == 1


def found(running: RunningSimulator, order: Order, resource: str) -> list[dict[str, Any]]:
    store = running.platform.store
    if resource == "Encounter":
        return store.find_by_identifier("Encounter", None, str(order.body["identifier_value"]))
    return store.find_by_identifier(resource, None, order.accession)


def publish(name: str, rows: list[dict[str, Any]]) -> None:
    """Rows for docs/reliability.md: written to $SATSET_RELIABILITY_OUT/<name>.jsonl when that is set."""
    for item in rows:
        append_row(name, item)


def verdicts(running: RunningSimulator, ris: RisStore, orders: list[Order]) -> list[Verdict]:
    """The fault matrix's verdict on each order (`fault_harness.judge`), from the platform's store and the RIS."""
    return [judge(ris, running.platform.store, order.body, order.sop_uids) for order in orders]


def assert_nothing_lost_or_duplicated(running: RunningSimulator, judged: list[Verdict], attempts: int) -> None:
    described = "\n".join(verdict.describe() for verdict in judged)
    assert all(verdict.done for verdict in judged), described
    assert not any(verdict.duplicated for verdict in judged), described
    assert check_totals(running.platform.store, judged) == []  # nothing created that no order accounts for
    assert [verdict.attempts for verdict in judged] == [attempts] * len(judged), described


# --- SIGKILL in every step ---------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(420)  # its own bounds (ENGAGE_TIMEOUT_S, FINISH_TIMEOUT_S) should speak first on a slow host
def test_a_poller_killed_in_any_step_of_batch4_loses_and_duplicates_nothing(
    holding_simulator: tuple[RunningSimulator, Holds],
    gateway_settings: dict[str, str],
    prefect_api_url: str,
    upload_study: UploadStudy,
    tmp_path: Path,
) -> None:
    running, holds = holding_simulator
    ris_url = f"sqlite:///{tmp_path / 'ris.db'}"
    ris = RisStore(ris_url)
    ris.create_schema()
    env = poller_env(gateway_settings, prefect_api_url, tmp_path / "prefect-home", ris_url, ORDER_LEASE_S=str(LEASE_S))
    pollers: list[Background] = []
    try:
        pollers.append(start_poller("poller-1", env, tmp_path, go_file=tmp_path / "go-1"))  # imports meanwhile
        orders = add_orders(ris, holds, upload_study, KILL_CASES)
        go(tmp_path / "go-1")
        wait_until_held(ris, holds, orders, pollers[0], at_gate=True)
        for order in orders:
            if order.gate is not None:
                order.gate.released.set()
        wait_until_held(ris, holds, orders, pollers[0])
        sigkill(pollers[0])
        assert_killed_inside_the_step(running, ris, orders)

        pollers.append(start_poller("poller-2", env, tmp_path, go_file=tmp_path / "go-2"))
        release_the_dead_pollers_requests(running, orders)
        run_out_leases(ris, orders)
        go(tmp_path / "go-2")
        wait_until_finished(ris, orders, pollers[1])
    finally:
        holds.release_all()
        for poller in pollers:
            poller.stop()

    judged = verdicts(running, ris, orders)
    ris.close()
    publish("crashes", [table_row(order.case.fault, [verdict]) for order, verdict in zip(orders, judged, strict=True)])
    assert_nothing_lost_or_duplicated(running, judged, attempts=2)  # the killed claim, then the one that finished


# --- PostgreSQL restart ------------------------------------------------------------------------------------

RESTART_CASES = [
    Case("in flight", "encounter", "Encounter", "delay"),
    Case("in flight", "service_request", "ServiceRequest", "delay"),
    Case("in flight", "observation", "Observation", "delay"),
    Case("in flight", "diagnostic_report", "DiagnosticReport", "delay"),
]
RESTART_FAULT = "PostgreSQL (RIS table) restarted while the poller runs {n} batch4 orders"


def _pg_cluster(url: str) -> tuple[str, str]:
    """(version, cluster) of the server behind `url`, from its cluster_name ("15/main" on Debian)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            name = str(connection.execute(sa.text("SHOW cluster_name")).scalar() or "")
    finally:
        engine.dispose()
    matched = re.fullmatch(r"(\d+)/(\S+)", name)
    _need(matched is not None, f"cluster_name is {name!r}, not a Debian cluster's VERSION/NAME")
    assert matched is not None
    return matched.group(1), matched.group(2)


def _started_at(url: str) -> Any:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT pg_postmaster_start_time()")).scalar()
    finally:
        engine.dispose()


def _pg_ready(url: str) -> bool:
    address = make_url(url)
    command = ["pg_isready", "-q", "-h", address.host or "127.0.0.1", "-p", str(address.port or 5432)]
    return subprocess.run(command, check=False, timeout=10).returncode == 0


def _pg_ctlcluster(cluster: PgCluster, action: str) -> subprocess.CompletedProcess[str]:
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", cluster.version, cluster.name, action]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def _ensure_running(cluster: PgCluster) -> None:
    """Never leave the machine's PostgreSQL down, whatever happened to the restart."""
    if _pg_ready(cluster.url):
        return
    started = _pg_ctlcluster(cluster, "start")
    wait_for(
        lambda: True if _pg_ready(cluster.url) else None,
        f"PostgreSQL {cluster.version}/{cluster.name} to be back ({started.stderr.strip()})",
        timeout_s=60,
    )


@pytest.mark.integration
@pytest.mark.postgres
def test_a_postgresql_restart_while_orders_run_loses_and_duplicates_nothing(
    restartable_postgres: PgCluster,
    holding_simulator: tuple[RunningSimulator, Holds],
    gateway_settings: dict[str, str],
    prefect_api_url: str,
    ris_on_postgres: str,
    upload_study: UploadStudy,
    tmp_path: Path,
) -> None:
    cluster = PgCluster(ris_on_postgres, restartable_postgres.version, restartable_postgres.name)
    running, holds = holding_simulator
    ris = RisStore(ris_on_postgres)
    ris.create_schema()
    env = poller_env(gateway_settings, prefect_api_url, tmp_path / "prefect-home", ris_on_postgres, ORDER_LEASE_S="30")
    before = _started_at(ris_on_postgres)
    poller: Background | None = None
    restart: list[subprocess.CompletedProcess[str]] = []
    try:
        poller = start_poller("poller", env, tmp_path, go_file=tmp_path / "go")
        orders = add_orders(ris, holds, upload_study, RESTART_CASES)
        go(tmp_path / "go")
        wait_until_held(ris, holds, orders, poller)

        # Restart under the running poller; let the held orders go as soon as the server is down, so their
        # completions (and the leases' renewals) meet the restart and the dead pooled connections it leaves.
        restarting = threading.Thread(target=lambda: restart.append(_pg_ctlcluster(cluster, "restart")))
        restarting.start()
        while restarting.is_alive() and _pg_ready(ris_on_postgres):
            time.sleep(0.05)
        holds.release_all()
        restarting.join(timeout=130)
        _ensure_running(cluster)
        wait_until_finished(ris, orders, poller)
        assert poller.alive(), "the poller must ride the restart out"
    finally:
        holds.release_all()
        if poller is not None:
            poller.stop()
        _ensure_running(cluster)

    assert restart and restart[0].returncode == 0, restart[0].stderr if restart else "no restart"
    assert _started_at(ris_on_postgres) != before, "the server did not restart"
    judged = verdicts(running, ris, orders)
    ris.close()
    publish("crashes-postgres", [table_row(RESTART_FAULT.format(n=len(orders)), judged)])
    assert_nothing_lost_or_duplicated(running, judged, attempts=1)  # ridden out in the first claim: no takeover
