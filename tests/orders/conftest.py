"""Databases for the RIS table tests: a SQLite file, and a fresh PostgreSQL / MariaDB database per test.

The servers come from SATSET_TEST_POSTGRES_URL and SATSET_TEST_MARIADB_URL. Unset, their tests are skipped on a
developer machine and fail under CI=true (a CI machine without the servers must not pass by skipping). Each test
gets its own database `satset_test_<random>`, dropped afterwards, so parallel and earlier runs never interfere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.ris import RisStore
from tests.plugins.databases import BACKENDS, fresh_database, server_url


def database_for(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'ris.db'}"
    else:
        yield from fresh_database(server_url(backend))


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend in turn (SQLite, PostgreSQL, MariaDB)."""
    yield from database_for(request.param, tmp_path)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file, for tests whose subject is not the database (the flow, the CLI)."""
    return f"sqlite:///{tmp_path / 'ris.db'}"


@pytest.fixture
def store(database_url: str) -> Iterator[RisStore]:
    """A RisStore on a fresh database, table created; max 3 attempts, 60 s lease, 10 s first backoff."""
    ris = RisStore(database_url, max_attempts=3, lease_s=60, backoff_s=10)
    ris.create_schema()
    yield ris
    ris.close()
