"""A real Prefect API server for the tests that run flows: one per test session, SQLite in a temp PREFECT_HOME.

Only flow tests ask for it; everything below the task layer is tested without Prefect at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
from prefect import Task


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _gateway_modules() -> list[ModuleType]:
    import flows.batches
    import flows.dicom
    import flows.resources
    import tasks.dicom
    import tasks.fhir

    return [tasks.fhir, tasks.dicom, flows.batches, flows.resources, flows.dicom]


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The production retry policy (which attempts, on which errors) without its waiting, for fault tests."""
    for module in _gateway_modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, Task) and value.retries:
                monkeypatch.setattr(module, name, value.with_options(retry_delay_seconds=0, retry_jitter_factor=None))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (flows are async) run on asyncio through anyio's pytest plugin."""
    return "asyncio"
