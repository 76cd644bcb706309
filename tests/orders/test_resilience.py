"""The database going away: which errors are retried, the tasks riding out a lost database, and pooled
connections that a restarting server killed being replaced without the poller noticing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

import tasks.ris
from clients.ris import RisStore, is_transient
from tasks.ris import claim_orders, reset_stores, retry_when_database_lost
from tests.orders.bodies import body
from tests.orders.conftest import BACKENDS, database_for

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
SERVERS = BACKENDS[1:]


def real_error(url: str, statement: str = "SELECT 1") -> sa.exc.SQLAlchemyError:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text(statement))
    except sa.exc.SQLAlchemyError as error:
        return error
    finally:
        engine.dispose()
    raise AssertionError(f"{statement} did not fail")


def test_lost_connections_are_transient_and_mistakes_are_not(tmp_path: Path) -> None:
    unreachable = real_error("postgresql+psycopg2://postgres@127.0.0.1:1/none")  # nothing listens on port 1
    locked_out = real_error(f"sqlite:///{tmp_path / 'missing-dir' / 'ris.db'}")
    bad_sql = real_error(f"sqlite:///{tmp_path / 'ris.db'}", "SELECT * FROM no_such_table WHERE")

    assert is_transient(unreachable) and is_transient(locked_out)
    assert not is_transient(bad_sql)
    assert not is_transient(ValueError("not a database error"))


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.anyio
async def test_a_claim_rides_out_a_database_that_is_not_there_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database directory appears only after the second failed attempt, as a server would come back."""
    folder = tmp_path / "not-yet"
    url = f"sqlite:///{folder / 'ris.db'}"
    monkeypatch.setenv("RIS_DATABASE_URL", url)
    reset_stores()
    decisions: list[bool] = []

    def decide_then_recover(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
        decisions.append(retry_when_database_lost(task, task_run, state))
        if len(decisions) == 2:
            folder.mkdir()
            store = RisStore(url)
            store.create_schema()
            store.add_order(4, body(4), now=T0)
            store.close()
        return decisions[-1]

    fast = claim_orders.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
    monkeypatch.setattr(tasks.ris, "claim_orders", fast.with_options(retry_condition_fn=decide_then_recover))
    try:
        claimed = await tasks.ris.claim_orders("w", 5)
    finally:
        reset_stores()

    assert decisions == [True, True]
    assert [order.attempts for order in claimed] == [1]


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.anyio
async def test_a_mistake_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIS_DATABASE_URL", f"sqlite:///{tmp_path / 'ris.db'}")
    reset_stores()
    decisions: list[bool] = []

    def recording(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
        decisions.append(retry_when_database_lost(task, task_run, state))
        return decisions[-1]

    fast = claim_orders.with_options(retry_delay_seconds=0, retry_jitter_factor=None, retry_condition_fn=recording)
    try:
        with pytest.raises(ValueError, match="worker_id must not be empty"):
            await fast("", 5)
    finally:
        reset_stores()
    assert decisions == [False]


def kill_other_connections(server: sa.Engine, database: str) -> int:
    """What a server restart does to a pool: every connection to `database` but this one is cut."""
    with server.connect() as connection:
        if server.dialect.name == "postgresql":
            return len(
                connection.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                ).all()
            )
        ids = connection.execute(
            sa.text("SELECT id FROM information_schema.processlist WHERE db = :db AND id <> CONNECTION_ID()"),
            {"db": database},
        ).scalars()
        killed = 0
        for process_id in ids:
            connection.execute(sa.text(f"KILL CONNECTION {int(process_id)}"))
            killed += 1
        return killed


@pytest.mark.parametrize("backend", SERVERS)
def test_pooled_connections_killed_by_the_server_are_replaced(backend: str, tmp_path: Path) -> None:
    for url in database_for(backend, tmp_path):
        store = RisStore(url)
        store.create_schema()
        order = store.add_order(4, body(4), now=T0)
        server = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            assert kill_other_connections(server, store.engine.url.database or "") >= 1

            claimed = store.claim("w", 5, T0)

            assert [o.id for o in claimed] == [order.id]
        finally:
            server.dispose()
            store.close()
