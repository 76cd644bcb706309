"""Accession numbers differing only in case are two orders on every database (MariaDB's default collation is
case-insensitive; PostgreSQL and SQLite compare bytes), and a MariaDB table made before is converted."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from clients.ris import RisStore
from models.orders import ACSN_COLLATION
from tests.orders.bodies import body


def test_accession_numbers_differing_in_case_are_two_orders(store: RisStore) -> None:
    lower = "acc" + uuid.uuid4().hex[:8]
    store.add_order(1, body(1, noacsn=lower))

    store.add_order(1, body(1, noacsn=lower.upper()))

    assert store.get(lower).accession_number == lower
    assert store.get(lower.upper()).accession_number == lower.upper()
    assert store.counts()["pending"] == 2


@pytest.mark.mariadb
def test_a_mariadb_table_made_with_the_case_insensitive_collation_is_converted(store: RisStore) -> None:
    if store.engine.dialect.name not in ("mysql", "mariadb"):
        pytest.skip("MariaDB only: the other databases compare bytes already")
    with store.engine.begin() as connection:
        connection.execute(
            sa.text(
                "ALTER TABLE radiology_order MODIFY accession_number VARCHAR(16) "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci NOT NULL"
            )
        )
    store.add_order(1, body(1, noacsn="accm001"))

    store.create_schema()

    store.add_order(1, body(1, noacsn="ACCM001"))
    with store.engine.connect() as connection:
        collation = connection.execute(
            sa.text(
                "SELECT COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                "AND TABLE_NAME = 'radiology_order' AND COLUMN_NAME = 'accession_number'"
            )
        ).scalar_one()
    assert collation == ACSN_COLLATION
    assert {store.get("accm001").accession_number, store.get("ACCM001").accession_number} == {"accm001", "ACCM001"}
