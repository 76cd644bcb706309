"""A flow run whose process died (its heartbeats stopped) is marked Crashed by the automation `satset serve`
creates; a run that ended, or still beats, is left alone. On a real Prefect server (its proactive triggers run).

The heartbeats are sent here as a run's process sends them (the same event, the same resource), so the test
controls when they stop; the window is 10 s instead of production's 90 s. Waiting for the server is bounded by
a deadline, never asserted as a duration."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events import Event, RelatedResource
from prefect.events.clients import get_events_client
from prefect.states import Completed, Pending, Running

from deployments.catalog import DEPLOYMENTS
from deployments.zombies import AUTOMATION_NAME, ensure_crash_automation

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

WINDOW_S = 10
DEADLINE_S = 240.0
"""How long the server may take to act (it evaluates proactive triggers every few seconds; a loaded CI host is slow)."""


@flow(name="zombie-probe")
def probe() -> None:
    """Never run: its runs are created and moved by hand."""


async def heartbeat(run: FlowRun) -> None:
    """The event a run's process sends, with the same resource and the deployment related as the engine does."""
    related = []
    if run.deployment_id is not None:
        related.append(
            RelatedResource(
                {
                    "prefect.resource.id": f"prefect.deployment.{run.deployment_id}",
                    "prefect.resource.role": "deployment",
                }
            )
        )
    async with get_events_client() as events:
        await events.emit(
            Event(
                event="prefect.flow-run.heartbeat",
                resource={"prefect.resource.id": f"prefect.flow-run.{run.id}"},
                related=related,
            )
        )


@pytest.fixture
async def probe_deployment(prefect_server: None) -> AsyncIterator[UUID]:
    """A deployment of the probe flow, as `satset serve` registers the gateway's, deleted afterwards."""
    deployment = await probe.ato_deployment(name="zombie-probe")
    deployment_id = await deployment.apply()
    try:
        yield deployment_id
    finally:
        async with get_client() as client:
            await client.delete_deployment(deployment_id)


async def state_of(flow_run_id: UUID) -> StateType | None:
    async with get_client() as client:
        return (await client.read_flow_run(flow_run_id)).state_type


@pytest.fixture
async def automation(prefect_server: None) -> AsyncIterator[UUID]:
    """The automation with the test's short window, deleted afterwards: the Prefect server is the session's, and
    a 10 s window would crash other tests' served runs (they beat every 180 s)."""
    created = await ensure_crash_automation(silent_after_s=WINDOW_S)
    try:
        yield created
    finally:
        async with get_client() as client:
            for found in await client.read_automations_by_name(AUTOMATION_NAME):
                await client.delete_automation(found.id)


async def test_a_run_whose_heartbeats_stop_is_crashed_and_a_finished_or_in_process_one_is_not(
    automation: UUID, probe_deployment: UUID
) -> None:
    assert await ensure_crash_automation(silent_after_s=WINDOW_S) == automation  # idempotent: one automation
    async with get_client() as client:
        assert [a.id for a in await client.read_automations_by_name(AUTOMATION_NAME)] == [automation]
        killed = await client.create_flow_run_from_deployment(probe_deployment)
        finished = await client.create_flow_run_from_deployment(probe_deployment)
        in_process = await client.create_flow_run(probe, state=Running())  # `satset api`: beats every 180 s
        for run in (killed, finished):
            await client.set_flow_run_state(run.id, Running(), force=True)
    for run in (killed, finished, in_process):
        await heartbeat(run)  # then `killed`'s process is SIGKILLed: no more heartbeats, no final state
    async with get_client() as client:
        await client.set_flow_run_state(finished.id, Completed(), force=True)

    deadline = time.monotonic() + DEADLINE_S
    while await state_of(killed.id) == StateType.RUNNING and time.monotonic() < deadline:
        await asyncio.sleep(2)

    async with get_client() as client:
        crashed = await client.read_flow_run(killed.id)
    assert crashed.state_type == StateType.CRASHED
    assert crashed.state is not None and "no heartbeat for 10 s" in (crashed.state.message or "")
    assert await state_of(finished.id) == StateType.COMPLETED
    assert await state_of(in_process.id) == StateType.RUNNING  # not a deployment's run: not watched


async def test_a_crashed_poll_frees_its_deployments_concurrency_slot(automation: UUID) -> None:
    (poll,) = [d for d in DEPLOYMENTS if d.flow_name == "poll-ris"]
    assert poll.concurrency is not None and poll.concurrency.limit == 1  # the slot at stake
    runner_deployment = await poll.to_runner_deployment()  # type: ignore[misc]  # a coroutine in async code
    runner_deployment.schedules = []  # no polls of its own on the session's server
    deployment_id = await runner_deployment.apply()
    try:
        await _crash_frees_the_slot(deployment_id)
    finally:
        async with get_client() as client:
            await client.delete_deployment(deployment_id)


async def _crash_frees_the_slot(deployment_id: UUID) -> None:
    async with get_client() as client:
        killed = await client.create_flow_run_from_deployment(deployment_id)
        await client.set_flow_run_state(killed.id, Pending())  # takes the one slot
        await client.set_flow_run_state(killed.id, Running())
        killed = await client.read_flow_run(killed.id)
        await heartbeat(killed)  # then SIGKILLed
        held = await client.create_flow_run_from_deployment(deployment_id)
        refused = await client.set_flow_run_state(held.id, Pending())
    assert refused.state is not None and refused.state.type != StateType.PENDING  # the slot is taken

    deadline = time.monotonic() + DEADLINE_S
    while await state_of(killed.id) == StateType.RUNNING and time.monotonic() < deadline:
        await asyncio.sleep(2)

    assert await state_of(killed.id) == StateType.CRASHED
    async with get_client() as client:
        next_poll = await client.create_flow_run_from_deployment(deployment_id)
        started = await client.set_flow_run_state(next_poll.id, Pending())
        assert started.state is not None and started.state.type == StateType.PENDING  # the slot is free again
        await client.set_flow_run_state(next_poll.id, Completed(), force=True)
