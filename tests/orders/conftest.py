"""Databases for the RIS table tests: a SQLite file, and a fresh PostgreSQL / MariaDB database per test.

The servers come from SATSET_TEST_POSTGRES_URL and SATSET_TEST_MARIADB_URL. Unset, their tests are skipped on a
developer machine and fail under CI=true (a CI machine without the servers must not pass by skipping). Each test
gets its own database `satset_test_<random>`, dropped afterwards, so parallel and earlier runs never interfere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from clients.ris import RisStore

SERVER_ENV = {"postgres": "SATSET_TEST_POSTGRES_URL", "mariadb": "SATSET_TEST_MARIADB_URL"}

BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def server_url(backend: str) -> str:
    """The server URL from the environment; skip without it, or fail when CI=true."""
    variable = SERVER_ENV[backend]
    url = os.environ.get(variable, "").strip()
    if not url:
        if _in_ci():
            pytest.fail(f"{variable} is required in CI (CI=true) but not set", pytrace=False)
        pytest.skip(f"{variable} not set")
    return url


def fresh_database(server: str) -> Iterator[str]:
    """CREATE a database named satset_test_<random> on the server, yield its URL, DROP it afterwards."""
    base = make_url(server)
    name = f"satset_test_{uuid.uuid4().hex[:12]}"
    postgres = base.get_backend_name() == "postgresql"
    quoted = f'"{name}"' if postgres else f"`{name}`"
    create = f"CREATE DATABASE {quoted}" + ("" if postgres else " CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    drop = f"DROP DATABASE IF EXISTS {quoted}" + (" WITH (FORCE)" if postgres else "")
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(create))
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(sa.text(drop))
    finally:
        admin.dispose()


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
