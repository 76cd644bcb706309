"""Two pollers never take the same order: many claimers at once, in threads and in processes, on every database.

Each claimer claims small batches until a claim comes back empty. Afterwards every order must have been claimed
exactly once: reported by one claimer only, attempts 1, `claimed_by` that claimer. A claim that is not atomic
(read, then write without a lock or a condition) hands the same rows to several claimers here.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import UTC, datetime

import pytest

from clients.ris import RisStore
from models.orders import IN_PROGRESS
from tests.orders.bodies import body
from tests.orders.claimers import claim_in_process, claim_until_empty

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
ORDERS = 60
BATCH = 3


def add_orders(store: RisStore, count: int = ORDERS) -> set[int]:
    return {store.add_order(4, body(4), now=T0).id or 0 for _ in range(count)}


def assert_each_claimed_once(store: RisStore, expected: set[int], claims: dict[str, list[int]]) -> None:
    reported = Counter(order_id for ids in claims.values() for order_id in ids)
    assert [order_id for order_id, times in reported.items() if times > 1] == []
    assert set(reported) == expected
    owner = {order_id: worker for worker, ids in claims.items() for order_id in ids}
    for order in store.list_orders():
        assert (order.status, order.attempts, order.claimed_by) == (IN_PROGRESS, 1, owner[order.id or 0])


@pytest.mark.parametrize("claimers", [2, 8])
def test_claimers_in_threads_take_every_order_exactly_once(store: RisStore, claimers: int) -> None:
    expected = add_orders(store)
    start = threading.Barrier(claimers)
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claimer(worker: str) -> None:
        try:
            start.wait(timeout=60)
            claims[worker] = claim_until_empty(store, worker, BATCH, T0)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=claimer, args=(f"thread-{n}",)) for n in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)

    assert not any(thread.is_alive() for thread in threads), "a claimer hung"
    assert errors == []
    assert_each_claimed_once(store, expected, claims)


def test_claimers_in_processes_take_every_order_exactly_once(store: RisStore, database_url: str) -> None:
    claimers = 3
    expected = add_orders(store)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(claimers)
    results = context.Queue()
    processes = [
        context.Process(
            target=claim_in_process, args=(database_url, f"process-{n}", BATCH, T0.isoformat(), start, results)
        )
        for n in range(claimers)
    ]
    for process in processes:
        process.start()
    try:
        reports = [results.get(timeout=240) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()

    failures = [report for report in reports if isinstance(report[1], str)]
    assert failures == []
    assert_each_claimed_once(store, expected, dict(reports))
