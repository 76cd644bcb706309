"""poll-ris end to end: orders in the RIS table, run as batch subflows against the simulator, Orthanc and a real
Prefect server, outcomes written back. Faults are armed in the real parts, never patched into the gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterName,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterName,
)
from pydicom.uid import generate_uid
from sqlmodel import col

from clients.ris import RisStore
from flows.poll import poll_ris
from models.orders import DEAD, DONE, FAILED, RadiologyOrder, utcnow
from models.settings import RisSettings, load_settings
from tasks import runtime
from tasks.ris import reset_stores
from tests.orders.bodies import PATIENT_NAME
from tests.orders.conftest import BACKENDS, database_for
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadedStudy, UploadStudy
from tests.reliability.platform_proxy import Gate, PlatformProxy, Together

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

RESOURCES = {
    "encounter_id": "Encounter",
    "service_request_id": "ServiceRequest",
    "imaging_study_id": "ImagingStudy",
    "observation_id": "Observation",
    "diagnostic_report_id": "DiagnosticReport",
}
BACKOFF_S = 600
NOTHING = {"claimed": 0, "done": 0, "failed": 0, "dead": 0, "lost": 0}
HELD_TIMEOUT_S = 300
"""The gateway's FHIR timeout in tests that hold requests at the platform, above every hold."""


def ris_for(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RisStore]:
    """The poller's settings in the environment, as in production, and a store on the same table for the test."""
    monkeypatch.setenv("RIS_DATABASE_URL", url)
    monkeypatch.setenv("ORDER_RETRY_BACKOFF_S", str(BACKOFF_S))
    reset_stores()
    store = RisStore.from_settings(load_settings(RisSettings))
    store.create_schema()
    yield store
    store.close()
    reset_stores()


@pytest.fixture
def ris(gateway: Gateway, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RisStore]:
    yield from ris_for(sqlite_url, monkeypatch)


@pytest.fixture(params=BACKENDS)
def ris_on_each_database(
    request: pytest.FixtureRequest, gateway: Gateway, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RisStore]:
    for url in database_for(request.param, tmp_path):
        yield from ris_for(url, monkeypatch)


def missing_study_body() -> dict[str, Any]:
    """A batch4 body for a study the PACS has never seen."""
    return batch4_input(cast(UploadedStudy, SimpleNamespace(study_instance_uid=generate_uid())))


def assert_ids_exist(gateway: Gateway, result: dict[str, Any]) -> None:
    store = gateway.simulator.running.platform.store
    for key, resource_type in RESOURCES.items():
        resource = store.read(resource_type, result[key])
        assert resource is not None and resource["id"] == result[key], key


def set_payload(ris: RisStore, accession: str, payload: dict[str, Any]) -> None:
    """What a hand-edited row looks like: the stored body changed behind the table's back."""
    with ris.engine.begin() as connection:
        connection.execute(
            sa.update(RadiologyOrder).where(col(RadiologyOrder.accession_number) == accession).values(payload=payload)
        )


def make_due(ris: RisStore, accession: str) -> None:
    """Move a failed order's next attempt into the past, as waiting out the backoff would."""
    with ris.engine.begin() as connection:
        connection.execute(
            sa.update(RadiologyOrder)
            .where(col(RadiologyOrder.accession_number) == accession)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


async def test_pending_orders_are_done_with_ids_the_platform_holds(
    gateway: Gateway, upload_study: UploadStudy, ris_on_each_database: RisStore
) -> None:
    ris = ris_on_each_database
    sent = batch4_input(upload_study(series=1, instances_per_series=2), subject_display=PATIENT_NAME)
    ris.add_order(4, sent)

    summary = await poll_ris()

    assert summary == {**NOTHING, "claimed": 1, "done": 1}
    order = ris.get(sent["noacsn"])
    assert (order.status, order.attempts, order.last_error, order.lease_expires_at) == (DONE, 1, None, None)
    assert order.result is not None
    assert_ids_exist(gateway, order.result)
    assert gateway.counts() == dict.fromkeys(RESOURCES.values(), 1)
    async with get_client() as client:
        artifacts = await client.read_latest_artifacts()
    (artifact,) = [a for a in artifacts if a.key == "poll-ris"]
    markdown = str(artifact.data)
    assert "| claimed | `1` |" in markdown and "| done | `1` |" in markdown
    assert PATIENT_NAME not in markdown and sent["noacsn"] not in markdown  # counts only


async def test_an_order_whose_study_is_missing_is_dead_with_the_reason(gateway: Gateway, ris: RisStore) -> None:
    sent = missing_study_body()
    ris.add_order(4, sent)

    summary = await poll_ris()

    assert summary == {**NOTHING, "claimed": 1, "dead": 1}
    order = ris.get(sent["noacsn"])
    assert (order.status, order.attempts, order.next_attempt_at) == (DEAD, 1, None)
    assert order.last_error is not None
    assert "batch4 stopped at dicom_process" in order.last_error and "fix the input" in order.last_error
    assert gateway.counts() == {}  # the study is looked for before anything is created
    assert await poll_ris() == NOTHING  # dead waits for an operator


async def test_a_retryable_failure_is_retried_after_its_backoff_and_completes_once(
    gateway: Gateway, upload_study: UploadStudy, fast_retries: None, ris: RisStore
) -> None:
    sent = batch4_input(upload_study(series=1, instances_per_series=2))
    ris.add_order(4, sent)
    gateway.arm(kind="500", count=None, path_prefix="/fhir-r4/v1/Observation", method="POST")
    before = utcnow()

    first = await poll_ris()

    assert first == {**NOTHING, "claimed": 1, "failed": 1}
    failed = ris.get(sent["noacsn"])
    assert (failed.status, failed.attempts) == (FAILED, 1)
    assert failed.last_error is not None
    assert "batch4 stopped at observation" in failed.last_error and "run it again to resume" in failed.last_error
    assert failed.next_attempt_at is not None
    assert before + timedelta(seconds=BACKOFF_S) <= failed.next_attempt_at <= utcnow() + timedelta(seconds=BACKOFF_S)
    assert await poll_ris() == NOTHING  # not due yet

    gateway.simulator.running.platform.faults.clear()
    make_due(ris, sent["noacsn"])
    second = await poll_ris()

    assert second == {**NOTHING, "claimed": 1, "done": 1}
    done = ris.get(sent["noacsn"])
    assert (done.status, done.attempts) == (DONE, 2)
    assert done.result is not None
    assert f"encounter_id={done.result['encounter_id']}" in failed.last_error  # resumed, not started over
    assert_ids_exist(gateway, done.result)
    assert gateway.counts() == dict.fromkeys(RESOURCES.values(), 1)


@pytest.fixture
def platform_proxy(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[PlatformProxy]:
    """The gateway's SATUSEHAT URLs through a proxy in front of the simulator, where a test can hold requests.

    The FHIR timeout is raised above the proxy's longest hold: a held request must never be given up and sent
    again (the held one would still reach the platform when let through)."""
    with PlatformProxy(gateway.simulator.running.base_url, "platform") as proxy:
        monkeypatch.setenv("SS_AUTH_URL", proxy.auth_url)
        monkeypatch.setenv("SS_BASE_URL", proxy.fhir_url)
        monkeypatch.setenv("SS_TIMEOUT_S", str(HELD_TIMEOUT_S))
        runtime.reset()
        yield proxy
    runtime.reset()


async def test_one_poll_runs_several_orders_at_once_and_one_failure_stops_none(
    gateway: Gateway, upload_study: UploadStudy, ris: RisStore, platform_proxy: PlatformProxy
) -> None:
    good = [batch4_input(upload_study(series=1, instances_per_series=1)) for _ in range(3)]
    missing = missing_study_body()
    for sent in (good[0], missing, good[1], good[2]):
        ris.add_order(4, sent)
    # Each good batch's Encounter POST is held until all three are held at once: they go through only if the poll
    # runs the three batches at the same time, however slowly each starts (the test Prefect server on SQLite
    # staggers colliding subflow starts by seconds). Run one after another, the first would wait out the barrier.
    together = Together(3)
    platform_proxy.hold("POST", "/fhir-r4/v1/Encounter", together, count=3)

    summary = await poll_ris(concurrency=3)

    assert together.met, f"the three batches were never in flight together: {together.passed}"
    assert together.passed == ["platform"] * 3
    assert summary == {**NOTHING, "claimed": 4, "done": 3, "dead": 1}
    results = [ris.get(sent["noacsn"]).result or {} for sent in good]
    for result in results:
        assert_ids_exist(gateway, result)
    assert len({result["diagnostic_report_id"] for result in results}) == 3
    assert ris.get(missing["noacsn"]).status == DEAD
    assert gateway.counts() == dict.fromkeys(RESOURCES.values(), 3)


async def test_a_stored_payload_that_no_longer_validates_is_dead_naming_the_field(
    gateway: Gateway, ris: RisStore
) -> None:
    sent = missing_study_body()
    ris.add_order(4, sent)
    set_payload(ris, sent["noacsn"], {**ris.get(sent["noacsn"]).payload, "study": "not-a-uid"})

    summary = await poll_ris()

    assert summary == {**NOTHING, "claimed": 1, "dead": 1}
    order = ris.get(sent["noacsn"])
    assert order.status == DEAD and order.last_error is not None
    assert "invalid stored batch4 payload" in order.last_error and "study:" in order.last_error
    assert gateway.counts() == {}
    assert gateway.simulator.running.platform.store.token_count() == 0


async def test_a_batch_longer_than_the_lease_keeps_its_claim(
    gateway: Gateway,
    upload_study: UploadStudy,
    ris: RisStore,
    platform_proxy: PlatformProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poller renews its lease while it works: another poller never takes an order that is still running.

    The batch is held at the platform (its Encounter POST waits at a gate) until the test has seen the lease renewed
    three times in the RIS row; after each renewal, another poller asks for the order at the moment the lease it
    replaced ran out (a clock the test drives), and must get nothing. Then the gate opens and the batch completes."""
    lease_s = 6.0  # renewed every 2 s: shorter leases renew so often that their task runs crowd the batch's own on
    # the test Prefect server (SQLite), which then answers 503 (seen once in 20 runs with a 2 s lease on a loaded host)
    monkeypatch.setenv("ORDER_LEASE_S", str(lease_s))
    sent = batch4_input(upload_study(series=1, instances_per_series=1))
    ris.add_order(4, sent)
    gate = Gate(timeout_s=HELD_TIMEOUT_S / 2)
    platform_proxy.hold("POST", "/fhir-r4/v1/Encounter", gate)
    other_poller = RisStore(str(ris.engine.url), lease_s=lease_s)
    leases: list[datetime] = []
    stolen: list[RadiologyOrder] = []

    try:
        polling = asyncio.create_task(poll_ris(return_state=True))
        arrived = asyncio.create_task(asyncio.to_thread(gate.wait_for_arrival, HELD_TIMEOUT_S / 2))
        await asyncio.wait({polling, arrived}, return_when=asyncio.FIRST_COMPLETED)
        if not arrived.done():
            gate.open()
            pytest.fail(f"the poll ended before its batch reached the platform: {await (await polling).result()}")
        assert await arrived, "the batch never reached the platform"
        deadline = time.monotonic() + HELD_TIMEOUT_S / 2
        while len(leases) < 4 and not polling.done() and time.monotonic() < deadline:
            lease = (await asyncio.to_thread(ris.get, sent["noacsn"])).lease_expires_at
            if lease is not None and (not leases or lease > leases[-1]):
                if leases:  # renewed: a poller looking when the previous lease ran out finds nothing to take
                    stolen += await asyncio.to_thread(other_poller.claim, "other-poller", 5, leases[-1])
                leases.append(lease)
            await asyncio.wait({polling}, timeout=0.05)
        gate.open()
        state = await polling
    finally:
        gate.open()
        other_poller.close()

    assert not gate.timed_out, "the gate opened by its timeout, not by the test"
    assert len(leases) == 4, f"the lease was renewed {len(leases) - 1} times while the batch was held"
    assert stolen == []
    assert await state.result() == {**NOTHING, "claimed": 1, "done": 1}
    assert ris.get(sent["noacsn"]).attempts == 1
    # Each renewal is a task run in the Prefect UI. Task runs reach the server as events it writes a little later:
    # read until the three renewals seen in the RIS row are there (bounded: then the assertion fails).
    renewals: list[Any] = []
    records_deadline = time.monotonic() + 60
    async with get_client() as client:
        while len(renewals) < 3 and time.monotonic() < records_deadline:
            renewals = await client.read_task_runs(
                task_run_filter=TaskRunFilter(
                    name=TaskRunFilterName(like_="renew-lease"),
                    flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id]),
                )
            )
            await asyncio.sleep(0 if len(renewals) >= 3 else 0.5)
    assert len(renewals) >= 3


# -- light mode (POLL_ORDER_RUNS=task): one task run per order, the steps inside it --------------------------------


@pytest.fixture
def light(monkeypatch: pytest.MonkeyPatch) -> None:
    """poll-ris in light mode, and the order task's retries without their waiting (the policy stays the same)."""
    import flows.poll

    monkeypatch.setenv("POLL_ORDER_RUNS", "task")
    monkeypatch.setattr(
        flows.poll, "run_order", flows.poll.run_order.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
    )


async def test_light_mode_runs_each_order_as_one_task_run_and_files_the_same_resources(
    gateway: Gateway, upload_study: UploadStudy, ris: RisStore, light: None
) -> None:
    sent = [batch4_input(upload_study(series=1, instances_per_series=2)) for _ in range(2)]
    for body in sent:
        ris.add_order(4, body)

    summary = await poll_ris(concurrency=2)

    assert summary == {**NOTHING, "claimed": 2, "done": 2}
    for body in sent:
        order = ris.get(body["noacsn"])
        assert (order.status, order.attempts) == (DONE, 1)
        assert order.result is not None and set(order.result) >= set(RESOURCES)
        assert order.result["dicom_process"]["status"] == "success"
        assert_ids_exist(gateway, order.result)
    assert gateway.counts() == dict.fromkeys(RESOURCES.values(), 2)
    names = [f"batch4 {body['noacsn']}" for body in sent]
    async with get_client() as client:
        subflows = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))
        order_runs = await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=names)))
    assert subflows == []
    assert sorted(run.name for run in order_runs) == sorted(names)


async def test_light_mode_retries_a_retryable_step_within_the_order_and_creates_nothing_twice(
    gateway: Gateway, upload_study: UploadStudy, ris: RisStore, light: None
) -> None:
    sent = batch4_input(upload_study(series=1, instances_per_series=1))
    ris.add_order(4, sent)
    gateway.arm(kind="500", count=2, path_prefix="/fhir-r4/v1/Observation", method="POST")

    summary = await poll_ris()

    assert summary == {**NOTHING, "claimed": 1, "done": 1}
    order = ris.get(sent["noacsn"])
    assert (order.status, order.attempts) == (DONE, 1)
    assert order.result is not None
    assert_ids_exist(gateway, order.result)
    assert gateway.counts() == dict.fromkeys(RESOURCES.values(), 1)  # adopted on the retries, routed once


async def test_light_mode_a_rejected_order_is_dead_without_retrying(
    gateway: Gateway, ris: RisStore, light: None
) -> None:
    sent = missing_study_body()
    ris.add_order(4, sent)

    summary = await poll_ris()

    assert summary == {**NOTHING, "claimed": 1, "dead": 1}
    order = ris.get(sent["noacsn"])
    assert order.last_error is not None and "batch4 stopped at dicom_process" in order.last_error
    assert gateway.counts() == {}


def test_the_light_mode_retry_predicate_retries_only_a_retryable_step() -> None:
    from prefect.states import Failed

    from clients.errors import StudyNotFound, UpstreamUnavailable
    from flows.poll import retry_when_step_retryable
    from flows.steps import BatchFailed

    def decide(error: BaseException) -> bool:
        return retry_when_step_retryable(cast(Any, None), cast(Any, None), Failed(data=error))

    assert decide(BatchFailed("batch3", "encounter", {}, UpstreamUnavailable("down", service="satusehat")))
    assert not decide(BatchFailed("batch4", "dicom_process", {}, StudyNotFound("no such study")))
    assert not decide(UpstreamUnavailable("down", service="satusehat"))  # not a step's failure
    assert not decide(ValueError("a bug"))
