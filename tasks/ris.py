"""Prefect tasks over the RIS order table: claim, renew, complete, fail. Thin wrappers over `clients.ris.RisStore`.

They retry only what a later attempt can survive: a lost connection (PostgreSQL or MariaDB restarting, a network
blip), a deadlock, SQLite's "database is locked". A retried call is safe: claiming twice at worst leaves orders
in_progress until their lease runs out (then another poll takes them); completing or failing twice is answered
from the row the first call wrote.

Never cached (every call must reach the database) and never persisted (a claimed order carries its payload,
clinical data that does not belong in Prefect's result storage). The blocking client runs in a worker thread so
the flow's event loop keeps driving the other orders.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from clients.ris import Claim, RisStore, is_transient
from models.orders import RadiologyOrder
from models.settings import RisSettings, load_settings
from tasks.retry import JITTER

DB_RETRIES = 6
DB_RETRY_DELAYS_S = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0]
"""About a minute in all: long enough for a database server to restart."""

_lock = threading.Lock()
_stores: dict[tuple[str, int, float, float], RisStore] = {}


def ris_store() -> RisStore:
    """The process's store for the current RisSettings, its schema created on first use."""
    settings = load_settings(RisSettings)
    key = (
        settings.ris_database_url,
        settings.order_max_attempts,
        settings.order_lease_s,
        settings.order_retry_backoff_s,
    )
    with _lock:
        store = _stores.get(key)
        if store is None:
            store = RisStore.from_settings(settings)
            try:
                store.create_schema()
            except BaseException:
                store.close()
                raise
            _stores[key] = store
        return store


def reset_stores() -> None:
    """Close every store (tests, and a process whose RIS settings changed)."""
    with _lock:
        for store in _stores.values():
            store.close()
        _stores.clear()


def retry_when_database_lost(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry predicate: only transient database errors are worth another attempt.

    Reads the exception from `state.data`, where Prefect puts it for the check (`state.result()` would be a
    coroutine here: these tasks are async).
    """
    return isinstance(state.data, BaseException) and is_transient(state.data)


DB_TASK: dict[str, Any] = {
    "retries": DB_RETRIES,
    "retry_delay_seconds": DB_RETRY_DELAYS_S,
    "retry_jitter_factor": JITTER,
    "retry_condition_fn": retry_when_database_lost,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


@task(name="claim-orders", **DB_TASK)
async def claim_orders(worker_id: str, limit: int) -> list[RadiologyOrder]:
    """Claim up to `limit` due orders for this worker (atomically: no other poller gets them)."""
    return await asyncio.to_thread(lambda: ris_store().claim(worker_id, limit))


@task(name="claim-orders", **DB_TASK)
async def claim_work(worker_id: str, limit: int) -> Claim:
    """Claim up to `limit` due orders, with those the claim made dead instead (out of attempts, unreadable)."""
    return await asyncio.to_thread(lambda: ris_store().claim_report(worker_id, limit))


@task(name="renew-lease", **DB_TASK)
async def renew_lease(order_id: int, worker_id: str) -> bool:
    """Extend the worker's lease on an order it is still running; False if it lost the claim."""
    return await asyncio.to_thread(lambda: ris_store().renew(order_id, worker_id))


@task(name="complete-order", **DB_TASK)
async def complete_order(order_id: int, worker_id: str, result: Mapping[str, Any]) -> bool:
    """Write the FHIR ids back and mark the order done; False if another worker holds it now."""
    return await asyncio.to_thread(lambda: ris_store().complete(order_id, worker_id, result))


@task(name="fail-order", **DB_TASK)
async def fail_order(order_id: int, worker_id: str, error: str, retryable: bool) -> str | None:
    """Record a failed attempt: the new status (failed: retried later; dead: for an operator), None if not held."""
    return await asyncio.to_thread(lambda: ris_store().fail(order_id, worker_id, error, retryable))
