"""A claimer that runs in its own process (imported by the spawned child, so it lives outside the test module)."""

from __future__ import annotations

from datetime import datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from clients.ris import RisStore


def claim_until_empty(store: RisStore, worker: str, limit: int, now: datetime) -> list[int]:
    """Claim batches until a claim comes back empty; the ids claimed, in order."""
    claimed: list[int] = []
    while batch := store.claim(worker, limit, now):
        claimed.extend(order.id for order in batch if order.id is not None)
    return claimed


def claim_in_process(url: str, worker: str, limit: int, now: str, start: Barrier, results: Queue[Any]) -> None:
    """Wait for every claimer to be ready, claim until empty, report (worker, ids) or (worker, error)."""
    store = RisStore(url, lease_s=60)
    try:
        start.wait(timeout=120)
        results.put((worker, claim_until_empty(store, worker, limit, datetime.fromisoformat(now))))
    except Exception as error:
        results.put((worker, f"{type(error).__name__}: {error}"))
    finally:
        store.close()
