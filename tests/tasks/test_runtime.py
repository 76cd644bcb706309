"""The process's I/O threads (tasks/runtime.py io_pool, tasks/fhir.py in_thread): blocking client calls of async
flows run there, with the caller's context, more at once than asyncio's default pool allows. No Prefect needed."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from tasks import runtime
from tasks.fhir import in_thread

current_order: contextvars.ContextVar[str] = contextvars.ContextVar("current_order", default="none")


def test_one_pool_per_process_with_its_own_named_threads() -> None:
    pool = runtime.io_pool()

    assert runtime.io_pool() is pool
    assert pool._max_workers == runtime.IO_THREADS
    assert pool.submit(lambda: threading.current_thread().name).result().startswith("satset-io")


def test_reset_keeps_the_pool_and_its_calls_in_flight() -> None:
    pool = runtime.io_pool()
    blocked = threading.Event()
    in_flight = pool.submit(blocked.wait, 10)  # a call in flight when the settings change

    runtime.reset()

    assert runtime.io_pool() is pool
    blocked.set()
    assert in_flight.result(timeout=10) is True


def test_in_thread_runs_the_call_in_an_io_thread_with_the_callers_context() -> None:
    def where(prefix: str, *, suffix: str) -> tuple[str, str]:
        return threading.current_thread().name, f"{prefix}{current_order.get()}{suffix}"

    async def main() -> tuple[str, str]:
        current_order.set("ACSN-1")
        return await in_thread(where, "<", suffix=">")

    thread, value = asyncio.run(main())

    assert thread.startswith("satset-io")
    assert value == "<ACSN-1>"


def test_in_thread_raises_what_the_call_raised() -> None:
    def fail() -> None:
        raise LookupError("not there")

    with pytest.raises(LookupError, match="not there"):
        asyncio.run(in_thread(fail))


def test_more_calls_wait_at_once_than_asyncios_default_pool_has_threads() -> None:
    """40 calls that can only finish together: asyncio.to_thread (min(32, cores + 4) threads) would deadlock here
    until the barrier's timeout; the I/O pool holds them all at once."""
    calls = 40
    assert calls <= runtime.IO_THREADS
    barrier = threading.Barrier(calls, timeout=30)

    async def main() -> list[int]:
        return await asyncio.gather(*(in_thread(barrier.wait) for _ in range(calls)))

    arrived = asyncio.run(main())

    assert sorted(arrived) == list(range(calls))
