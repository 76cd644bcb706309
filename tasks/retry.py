"""Named retry policies for the gateway's tasks: retry what may succeed later, never what cannot.

Prefect owns the retry loop (the clients never retry on their own), so every attempt shows in the UI. A task
retries only when its exception is `Retryable` (429, 5xx, timeouts, dropped connections, an incomplete C-STORE);
a `Rejected` request (a rule broken, a wrong AE title, a study not in the PACS) fails at once with its reason.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from clients.errors import Retryable

FHIR_RETRIES = 5
FHIR_RETRY_DELAYS_S = [1.0, 2.0, 5.0, 10.0, 30.0]
"""Five attempts after the first, backing off to 30 s: long enough to ride out a platform hiccup."""

DICOM_RETRIES = 3
DICOM_RETRY_DELAYS_S = [2.0, 10.0, 30.0]

JITTER = 0.2
"""Spread retries of concurrent runs so they do not arrive at the platform in step."""

MAX_RETRY_AFTER_S = 120.0


def retry_when_retryable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry predicate: only `Retryable` errors are worth another attempt.

    Prefect hands the predicate a Failed state whose data is the task's exception (task_engine.can_retry).
    """
    return isinstance(state.data, Retryable)


async def honour_retry_after(error: Retryable) -> None:
    """Wait what the upstream asked for (Retry-After) before Prefect's own backoff adds its delay."""
    if error.retry_after:
        await asyncio.sleep(min(error.retry_after, MAX_RETRY_AFTER_S))
