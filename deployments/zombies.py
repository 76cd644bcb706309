"""Flow runs whose process died are marked Crashed: Prefect's heartbeats and an automation on the server.

A flow run started from a deployment (by `satset serve` or a worker) sends a `prefect.flow-run.heartbeat` event as
it starts and every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds after. If the process is SIGKILLed, or its host
dies, nothing tells the server: the run would stay RUNNING for ever, an asynchronous HIS call would keep answering
with it, and the poller's run would hold its deployment's concurrency slot. The automation created here (Prefect's
documented zombie-flow recipe: the OSS server has no built-in one) changes such a run to Crashed once
`SILENT_AFTER_S` pass after its last heartbeat without a heartbeat or a final state. The bound: a run whose process
died is Crashed at most SILENT_AFTER_S after its last heartbeat, plus the server's proactive-trigger period
(PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY, 5 s): 95 s with the defaults here.

A Crashed run then frees what it held: an idempotent resend of the order starts a new attempt (api/runs.py),
and the next scheduled poll finds the deployment's slot free.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from datetime import timedelta
from typing import TYPE_CHECKING, Final
from uuid import UUID

if TYPE_CHECKING:
    from prefect.events.schemas.automations import AutomationCore

HEARTBEAT_S: Final = 30
"""PREFECT_FLOWS_HEARTBEAT_FREQUENCY for the runs `satset serve` starts (Prefect's minimum; its default is 180)."""

SILENT_AFTER_S: Final = 90
"""Three missed heartbeats (MISSED_HEARTBEATS): a run silent this long after its last one is Crashed. A busy host
may delay one heartbeat (they come from a thread of the run's process), never three in a row while it lives."""

AUTOMATION_NAME: Final = "satset: crash flow runs whose process died"


MISSED_HEARTBEATS: Final = 3


def heartbeat_environment(environ: MutableMapping[str, str] = os.environ) -> float:
    """Turn heartbeats on at HEARTBEAT_S for the flow runs this process starts (they inherit the environment),
    unless the operator set a frequency already; returns the silence after which a run counts as dead:
    SILENT_AFTER_S, or three of the operator's beats if theirs are slower (a live run is never crashed)."""
    frequency = environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    try:
        beats = float(frequency)
    except ValueError:
        beats = float(HEARTBEAT_S)  # Prefect refuses the value at the run's start and says why
    return max(float(SILENT_AFTER_S), MISSED_HEARTBEATS * beats)


def crash_automation_spec(silent_after_s: float = SILENT_AFTER_S) -> AutomationCore:
    """The automation: for each flow run, after a heartbeat expect another heartbeat or a final state within
    `silent_after_s`; if none comes, change the run to Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=AUTOMATION_NAME,
        description=(
            "Created by `satset serve`: a flow run that stopped sending heartbeats (its process was killed or its "
            "host died) is marked Crashed, so it frees its concurrency slot and a resend of its order starts anew."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Only runs of deployments (served or from a worker), which beat every HEARTBEAT_S: a flow called
            # in-process (the HIS API's synchronous calls, `satset run`, a poll's batch subflows) beats at
            # Prefect's default 180 s and would be crashed, alive, by a 90 s window.
            match_related=ResourceSpecification({"prefect.resource.role": "deployment"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silent_after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {silent_after_s:g} s: the process running this flow run died",
            )
        ],
    )


async def ensure_crash_automation(silent_after_s: float = SILENT_AFTER_S) -> UUID:
    """Create the automation on the Prefect server, or bring an existing one of that name up to date; its id.

    Idempotent: every `satset serve` start calls it, and two hosts starting together leave one automation
    (a second of the same name is deleted)."""
    from prefect.client.orchestration import get_client

    spec = crash_automation_spec(silent_after_s)
    async with get_client() as client:
        existing = await client.read_automations_by_name(AUTOMATION_NAME)
        if not existing:
            return await client.create_automation(spec)
        keep, *extra = sorted(existing, key=lambda automation: str(automation.id))
        for automation in extra:
            await client.delete_automation(automation.id)
        await client.update_automation(keep.id, spec)
        return keep.id
