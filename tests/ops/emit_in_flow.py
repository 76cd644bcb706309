"""Run as `python -m tests.ops.emit_in_flow ACSN`: a flow run that emits the gateway's two custom alert events the
way the poller and the ImagingStudy wait do (tasks/events.py), against the Prefect API in PREFECT_API_URL."""

from __future__ import annotations

import sys

from prefect import flow

from tasks.events import HalfwayAlarm, order_dead


@flow(name="ops-alert-probe")
def probe(accession_number: str) -> list[bool]:
    ticks = iter([0.0, 200.0])  # the wait started, then 200 s later (deadline 300 s): past half
    alarm = HalfwayAlarm(accession_number, 300.0, clock=lambda: next(ticks))
    late = alarm.check("the ImagingStudy lists 3 of 10 instances sent")
    dead = order_dead(accession_number, 4, "ServiceRequest refused: RuleNumber 10117 ...", attempts=1)
    return [late, dead]


if __name__ == "__main__":
    sent = probe(sys.argv[1])
    print(sent)
    sys.exit(0 if all(sent) else 1)
