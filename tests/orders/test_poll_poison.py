"""poll-ris over rows of every malformed shape written by SQL beside good orders, on SQLite, PostgreSQL and
MariaDB, through the real parts (simulator, Orthanc, Prefect server): the good orders are done, every bad one is
dead with a reason naming its field, and no poll stalls on them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from clients.ris import RisStore
from flows.poll import poll_ris
from models.orders import DEAD, DONE
from models.settings import RisSettings, load_settings
from tasks.ris import reset_stores
from tests.orders.bodies import PATIENT_NAME, body
from tests.orders.conftest import BACKENDS, database_for
from tests.orders.poison import insert_by_sql, poisons_for, state_of
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy
from tests.reliability.table import append_row

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

NOTHING = {"claimed": 0, "done": 0, "failed": 0, "dead": 0, "lost": 0}


@pytest.fixture(params=BACKENDS)
def ris(
    request: pytest.FixtureRequest, gateway: Gateway, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RisStore]:
    """The poller's settings in the environment, as in production, and a store on the same table for the test."""
    for url in database_for(request.param, tmp_path):
        monkeypatch.setenv("RIS_DATABASE_URL", url)
        reset_stores()
        store = RisStore.from_settings(load_settings(RisSettings))
        store.create_schema()
        yield store
        store.close()
        reset_stores()


async def test_malformed_rows_are_dead_naming_the_field_and_the_good_orders_beside_them_done(
    gateway: Gateway, upload_study: UploadStudy, ris: RisStore
) -> None:
    good = [ris.add_order(1, body(1)).accession_number]
    bad = {}
    for poison in poisons_for(ris.engine):
        bad[poison.name] = (insert_by_sql(ris.engine, poison.payload, **(poison.columns or {})), poison.names)
        good.append(ris.add_order(1, body(1)).accession_number)  # a good one after each bad one
    good.append(ris.add_order(4, batch4_input(upload_study(series=1, instances_per_series=1))).accession_number)

    summary = await poll_ris(batch_size=100, concurrency=4)

    assert summary == {**NOTHING, "claimed": len(good) + len(bad), "done": len(good), "dead": len(bad)}
    for acsn in good:
        assert ris.get(acsn).status == DONE, acsn
    for name, (acsn, field) in bad.items():
        state = state_of(ris.engine, acsn)
        assert state.status == DEAD, name
        assert state.last_error is not None and f"{field}:" in state.last_error, (name, state.last_error)
        assert PATIENT_NAME not in state.last_error
        if field != "attempts":
            assert state.attempts == 1, name  # counted at the claim, dead at its first
    assert gateway.counts()["Encounter"] == len(good)
    assert await poll_ris() == NOTHING  # dead waits for an operator; nothing is claimed again
    append_row(
        "poison",
        {
            "fault": f"{len(bad)} malformed rows written by SQL beside {len(good)} good orders "
            f"({'mariadb' if getattr(ris.engine.dialect, 'is_mariadb', False) else ris.engine.dialect.name}): "
            f"{', '.join(bad)}",
            "orders": len(good) + len(bad),
            "done": len(good),
            "failed": f"{len(bad)} dead at their first claim, each reason naming the field",
            "lost": 0,  # every good one done, every bad one dead with its reason: asserted above
            "duplicated": gateway.counts()["Encounter"] - len(good),
        },
    )
