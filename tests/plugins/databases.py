"""Database servers for tests: PostgreSQL and MariaDB from SATSET_TEST_POSTGRES_URL / SATSET_TEST_MARIADB_URL.

Unset, their tests are skipped on a developer machine and fail under CI=true (a CI machine without the servers
must not pass by skipping). `fresh_database` gives each test its own database, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

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
