"""A claim survives every row it cannot run: spent or unreadable orders go dead at the claim, with the reason
naming the column, and the good orders beside them are claimed as usual. SQLite, PostgreSQL and MariaDB.

Time is passed in (`now=`), never slept through. The end-to-end poll over the same rows is tests/orders/
test_poll_poison.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from clients.ris import RisStore
from models.orders import DEAD, IN_PROGRESS, PENDING
from tests.orders.bodies import body
from tests.orders.poison import insert_by_sql, poisons_for, state_of

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


def test_rows_python_cannot_read_or_out_of_attempts_are_dead_at_the_claim_and_the_good_ones_claimed(
    store: RisStore,
) -> None:
    good = [store.add_order(1, body(1), now=T0).accession_number for _ in range(2)]
    unreadable = {
        poison.name: (insert_by_sql(store.engine, poison.payload, **(poison.columns or {})), poison.names)
        for poison in poisons_for(store.engine)
        if poison.names in ("attempts", "created_at") or poison.name in ("huge number", "invalid json")
    }

    claim = store.claim_report("w", 100, T0)

    assert set(good) <= {order.accession_number for order in claim.orders}
    assert {acsn for acsn, _ in claim.dead} == {acsn for acsn, _ in unreadable.values()}
    for name, (acsn, field) in unreadable.items():
        order = state_of(store.engine, acsn)
        assert order.status == DEAD, name
        assert order.last_error is not None and f"{field}:" in order.last_error, (name, order.last_error)
        assert (order.lease_expires_at, order.next_attempt_at) == (None, None)
    for acsn in good:
        assert store.get(acsn).status == IN_PROGRESS
    assert store.claim_report("w2", 100, T0 + timedelta(seconds=1)).dead == []  # dead stays dead


def test_an_order_whose_poller_dies_on_every_attempt_ends_dead_naming_its_attempts(store: RisStore) -> None:
    acsn = store.add_order(1, body(1), now=T0).accession_number
    other = store.add_order(1, body(1), now=T0).accession_number
    now = T0
    for attempt in range(1, store.max_attempts + 1):  # each claim's poller is SIGKILLed: no outcome recorded
        claimed = store.claim(f"w{attempt}", 1, now)
        assert [order.accession_number for order in claimed] == [acsn]
        assert store.get(acsn).attempts == attempt  # counted at the claim, before the run
        now += store.lease

    claim = store.claim_report("last", 2, now)

    assert [dead for dead, _ in claim.dead] == [acsn]
    assert [order.accession_number for order in claim.orders] == [other]
    order = store.get(acsn)
    assert (order.status, order.attempts) == (DEAD, store.max_attempts)
    assert order.last_error is not None and order.last_error.startswith("attempts: all 3 (ORDER_MAX_ATTEMPTS)")


def test_redrive_touches_only_the_orders_it_names(store: RisStore) -> None:
    spent = [insert_by_sql(store.engine, "{}", attempts=store.max_attempts) for _ in range(2)]
    good = [store.add_order(1, body(1), now=T0).accession_number for _ in range(2)]
    store.claim_report("w", 100, T0)  # the spent ones dead, the good ones in progress
    assert [store.get(acsn).status for acsn in spent + good] == [DEAD, DEAD, IN_PROGRESS, IN_PROGRESS]

    assert store.redrive(spent[0], now=T0) == [spent[0]]
    assert [store.get(acsn).status for acsn in spent + good] == [PENDING, DEAD, IN_PROGRESS, IN_PROGRESS]
    assert store.redrive(status=DEAD, now=T0) == [spent[1]]
    assert [store.get(acsn).status for acsn in spent + good] == [PENDING, PENDING, IN_PROGRESS, IN_PROGRESS]
    assert [store.get(acsn).claimed_by for acsn in good] == ["w", "w"]


def test_an_operator_lists_and_shows_rows_python_cannot_read(store: RisStore) -> None:
    unreadable = insert_by_sql(store.engine, '{"subject_id": ' + "9" * 5000 + "}")
    good = store.add_order(1, body(1), now=T0).accession_number
    store.claim_report("w", 100, T0)

    listed = {order.accession_number: order for order in store.list_orders()}
    shown = store.get(unreadable)

    assert set(listed) == {unreadable, good}
    assert (shown.status, shown.payload) == (DEAD, None)
    assert shown.last_error is not None and "payload:" in shown.last_error
    assert store.list_orders(status=DEAD)[0].accession_number == unreadable
