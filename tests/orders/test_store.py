"""RisStore on SQLite, PostgreSQL and MariaDB: what goes in, how orders are claimed, retried, killed, redriven.

Time is passed in (`now=`), never slept through: a lease or a backoff "runs out" by asking at a later instant.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from clients.ris import DuplicateOrder, InvalidOrder, NotRedrivable, OrderNotFound, RisStore
from models.orders import DEAD, DONE, FAILED, IN_PROGRESS, PENDING, RadiologyOrder, order_summary
from models.timeutil import WIB
from tests.orders.bodies import PATIENT_NAME, body

T0 = datetime(2026, 1, 5, 8, 0, 0, 123456, tzinfo=UTC)
"""Microseconds on purpose: MariaDB's DATETIME drops them unless the column is DATETIME(6)."""

LEASE = timedelta(seconds=60)
IDS = {"encounter_id": "enc-1", "service_request_id": "sr-1", "dicom_process": {"status": "success"}}


def add(store: RisStore, batch: int = 4, now: datetime = T0, **overrides: Any) -> RadiologyOrder:
    return store.add_order(batch, body(batch, **overrides), now=now)


def claim_one(store: RisStore, worker: str, now: datetime) -> RadiologyOrder:
    (order,) = store.claim(worker, 1, now)
    return order


def total(store: RisStore) -> int:
    return sum(store.counts().values())


# --- adding ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_add_keeps_the_body_as_given_without_the_patient_name(store: RisStore, batch: int) -> None:
    sent = body(batch)

    store.add_order(batch, sent, now=T0)

    stored = store.get(sent["noacsn"])
    assert stored.payload == {key: value for key, value in sent.items() if key != "subject_display"}
    assert (stored.batch, stored.status, stored.attempts) == (batch, PENDING, 0)
    assert stored.patient_ihs == "P10443013727"
    assert stored.exam_code == sent.get("codind_code")  # no exam is assumed when the order names none
    assert stored.study_instance_uid == (sent["study"] if batch == 4 else None)
    assert stored.attending_practitioner_id == (None if batch == 2 else "10016869420")
    assert stored.performer_practitioner_id == (None if batch == 1 else "10000504193")
    assert stored.next_attempt_at == stored.created_at == T0
    with store.engine.connect() as connection:
        raw = connection.execute(sa.text("SELECT payload FROM radiology_order")).scalar_one()
    assert PATIENT_NAME not in str(raw)
    assert PATIENT_NAME not in json.dumps(order_summary(stored))


def test_a_patient_reference_gives_the_ihs_number(store: RisStore) -> None:
    sent = body(1, subject_id=None, subject_reference="Patient/P02478375538")
    store.add_order(1, {key: value for key, value in sent.items() if value is not None}, now=T0)
    assert store.get(sent["noacsn"]).patient_ihs == "P02478375538"


def test_times_are_stored_as_utc_whatever_offset_they_come_with(store: RisStore) -> None:
    order = add(store, now=T0.astimezone(WIB))

    stored = store.get(order.accession_number)
    assert stored.created_at == T0 and stored.created_at.utcoffset() == timedelta(0)
    with store.engine.connect() as connection:
        raw = connection.execute(sa.text("SELECT created_at FROM radiology_order")).scalar_one()
    assert str(raw).startswith("2026-01-05 08:00:00.123456")  # naive UTC with microseconds, on every database


def test_naive_times_are_refused(store: RisStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        add(store, now=datetime(2026, 1, 5, 8, 0))
    assert total(store) == 0


@pytest.mark.parametrize(
    ("batch", "change", "field"),
    [
        (4, {"study": "not-a-uid"}, "study"),
        (1, {"noacsn": None}, "noacsn"),
        (4, {"noacsn": "A" * 17}, "noacsn"),
        (3, {"codind_code": "24648-9"}, "codind_code"),
        (3, {"performer_id": None}, "performer_id"),
        (4, {"subject_id": None}, "subject_id"),
        (2, {"noacsn": None}, "noacsn"),  # batch2 may go without, but the table's key is the accession number
    ],
)
def test_an_invalid_body_is_refused_naming_the_field(
    store: RisStore, batch: int, change: dict[str, Any], field: str
) -> None:
    sent = {key: value for key, value in body(batch, **change).items() if value is not None}

    with pytest.raises(InvalidOrder) as refused:
        store.add_order(batch, sent, now=T0)

    assert f"{field}:" in str(refused.value)
    assert PATIENT_NAME not in str(refused.value)
    assert total(store) == 0


@pytest.mark.parametrize("batch", [0, 5])
def test_an_unknown_batch_is_refused(store: RisStore, batch: int) -> None:
    with pytest.raises(InvalidOrder, match="batch: must be 1, 2, 3 or 4"):
        store.add_order(batch, body(4), now=T0)
    assert total(store) == 0


def test_the_same_accession_twice_is_refused_and_the_first_order_kept(store: RisStore) -> None:
    first = add(store, batch=4)
    claim_one(store, "w1", T0)

    with pytest.raises(DuplicateOrder) as refused:
        add(store, batch=1, noacsn=first.accession_number, identifier_value="OTHER")

    assert first.accession_number in str(refused.value) and "nothing was changed" in str(refused.value)
    kept = store.get(first.accession_number)
    assert (kept.batch, kept.status, kept.claimed_by, kept.payload) == (4, IN_PROGRESS, "w1", first.payload)
    assert total(store) == 1


# --- claiming --------------------------------------------------------------------------------------------------


def test_claim_takes_the_oldest_due_orders_under_a_lease(store: RisStore) -> None:
    orders = [add(store) for _ in range(3)]

    first = store.claim("w1", 2, T0)
    second = store.claim("w2", 2, T0)

    assert [o.id for o in first] == [orders[0].id, orders[1].id]
    assert [o.id for o in second] == [orders[2].id]
    assert store.claim("w3", 5, T0) == []
    for order, worker in zip([*first, *second], ["w1", "w1", "w2"], strict=True):
        stored = store.get(order.accession_number)
        assert (stored.status, stored.attempts, stored.claimed_by) == (IN_PROGRESS, 1, worker)
        assert stored.lease_expires_at == T0 + LEASE


def test_claim_takes_expired_leases_then_due_retries_then_pending_each_earliest_due_first(store: RisStore) -> None:
    held = add(store)
    claim_one(store, "crashed", T0)
    failed = add(store)
    claim_one(store, "w", T0)
    assert failed.id is not None
    store.fail(failed.id, "w", "500", True, T0)
    pending_late = add(store, now=T0 + timedelta(seconds=30))
    pending_early = add(store, now=T0 + timedelta(seconds=20))  # added after, due before

    first_two = store.claim("r1", 2, T0 + LEASE)
    last_two = store.claim("r2", 5, T0 + LEASE)

    assert [o.id for o in first_two] == [held.id, failed.id]
    assert [o.id for o in last_two] == [pending_early.id, pending_late.id]


def test_a_claim_whose_lease_ran_out_is_taken_over_and_the_old_worker_is_ignored(store: RisStore) -> None:
    order = add(store)
    claim_one(store, "crashed", T0)

    assert store.claim("rescuer", 5, T0 + LEASE - timedelta(microseconds=1)) == []
    rescued = claim_one(store, "rescuer", T0 + LEASE)
    assert (rescued.id, rescued.attempts, rescued.claimed_by) == (order.id, 2, "rescuer")

    assert order.id is not None
    late = T0 + LEASE + timedelta(seconds=1)
    assert store.complete(order.id, "crashed", {"encounter_id": "stale"}, late) is False
    assert store.fail(order.id, "crashed", "stale failure", True, late) is None
    assert store.renew(order.id, "crashed", late) is False
    untouched = store.get(order.accession_number)
    assert (untouched.status, untouched.claimed_by, untouched.result, untouched.last_error) == (
        IN_PROGRESS,
        "rescuer",
        None,
        None,
    )

    assert store.complete(order.id, "rescuer", IDS, late) is True
    assert store.complete(order.id, "crashed", {"encounter_id": "stale"}, late) is False
    done = store.get(order.accession_number)
    assert (done.status, done.result, done.lease_expires_at) == (DONE, IDS, None)


def test_complete_twice_by_the_holder_is_answered_from_the_row(store: RisStore) -> None:
    """A complete retried after a lost connection must not report a lost claim when its first commit landed."""
    order = add(store)
    claim_one(store, "w1", T0)
    assert order.id is not None
    assert store.complete(order.id, "w1", IDS, T0) is True
    assert store.complete(order.id, "w1", {"other": "ids"}, T0) is True
    assert store.get(order.accession_number).result == IDS


def test_renewing_a_lease_keeps_other_claimers_away(store: RisStore) -> None:
    order = add(store)
    claim_one(store, "w1", T0)
    assert order.id is not None

    assert store.renew(order.id, "w1", T0 + timedelta(seconds=50)) is True

    assert store.claim("w2", 5, T0 + LEASE) == []
    taken = claim_one(store, "w2", T0 + timedelta(seconds=50) + LEASE)
    assert taken.claimed_by == "w2"


# --- failing ---------------------------------------------------------------------------------------------------


def test_a_retryable_failure_backs_off_doubling_then_dies_after_the_last_attempt(store: RisStore) -> None:
    order = add(store)
    assert order.id is not None
    now = T0
    waits = []
    for attempt in (1, 2):
        claimed = claim_one(store, "w", now)
        assert claimed.attempts == attempt
        assert store.fail(order.id, "w", f"attempt {attempt}: 500", True, now) == FAILED
        failed = store.get(order.accession_number)
        assert failed.status == FAILED and failed.next_attempt_at is not None
        waits.append(failed.next_attempt_at - now)
        assert store.claim("w", 5, failed.next_attempt_at - timedelta(microseconds=1)) == []
        now = failed.next_attempt_at

    claim_one(store, "w", now)
    assert store.fail(order.id, "w", "attempt 3: 500", True, now) == DEAD

    assert waits == [timedelta(seconds=10), timedelta(seconds=20)]  # backoff * 2**(attempts-1)
    dead = store.get(order.accession_number)
    assert (dead.status, dead.attempts, dead.next_attempt_at, dead.last_error) == (DEAD, 3, None, "attempt 3: 500")
    assert store.claim("w", 5, now + timedelta(days=365)) == []
    assert [store.retry_delay(n).total_seconds() for n in (1, 2, 3, 4)] == [10, 20, 40, 80]


def test_a_rejected_order_is_dead_at_once(store: RisStore) -> None:
    order = add(store)
    claim_one(store, "w", T0)
    assert order.id is not None

    assert store.fail(order.id, "w", "batch4 stopped at dicom_process: no study", False, T0) == DEAD

    dead = store.get(order.accession_number)
    assert (dead.status, dead.attempts, dead.last_error) == (DEAD, 1, "batch4 stopped at dicom_process: no study")
    assert store.claim("w", 5, T0 + timedelta(days=365)) == []


def test_a_long_error_is_cut(store: RisStore) -> None:
    order = add(store)
    claim_one(store, "w", T0)
    assert order.id is not None
    store.fail(order.id, "w", "x" * 100_000, True, T0)
    assert len(store.get(order.accession_number).last_error or "") == 4000


# --- operators -------------------------------------------------------------------------------------------------


def test_redrive_sends_failed_and_dead_orders_back_with_fresh_attempts(store: RisStore) -> None:
    dead, failed, done, held, pending = (add(store) for _ in range(5))
    for order, outcome in ((dead, "dead"), (failed, "failed"), (done, "done"), (held, None)):
        claim_one(store, "w", T0)
        assert order.id is not None
        if outcome == "done":
            store.complete(order.id, "w", IDS, T0)
        elif outcome is not None:
            store.fail(order.id, "w", f"{outcome} because", outcome == "failed", T0)

    for order in (done, held, pending):
        with pytest.raises(NotRedrivable, match=f"order {order.accession_number} is"):
            store.redrive(order.accession_number)
    with pytest.raises(OrderNotFound):
        store.redrive("NO-SUCH-ORDER")
    with pytest.raises(NotRedrivable):
        store.redrive(status=DONE)
    with pytest.raises(ValueError):
        store.redrive()
    with pytest.raises(ValueError):
        store.redrive(dead.accession_number, status=DEAD)

    later = T0 + LEASE / 2  # the held order's lease still runs
    assert store.redrive(dead.accession_number, now=later) == [dead.accession_number]
    assert store.redrive(status=FAILED, now=later) == [failed.accession_number]
    assert store.redrive(status=DEAD, now=later) == []

    for order, why in ((dead, "dead because"), (failed, "failed because")):
        again = store.get(order.accession_number)
        assert (again.status, again.attempts, again.next_attempt_at, again.claimed_by) == (PENDING, 0, later, None)
        assert again.last_error == why  # the history stays
    assert {o.id for o in store.claim("w2", 5, later)} == {dead.id, failed.id, pending.id}


def test_list_and_counts(store: RisStore) -> None:
    orders = [add(store) for _ in range(3)]
    claim_one(store, "w", T0)

    assert [o.accession_number for o in store.list_orders()] == [o.accession_number for o in orders]
    assert [o.id for o in store.list_orders(limit=2)] == [orders[0].id, orders[1].id]
    assert [o.id for o in store.list_orders(limit=2, newest=True)] == [orders[1].id, orders[2].id]
    assert [o.id for o in store.list_orders(PENDING)] == [orders[1].id, orders[2].id]
    assert store.counts() == {PENDING: 2, IN_PROGRESS: 1, DONE: 0, FAILED: 0, DEAD: 0}
    with pytest.raises(ValueError, match="unknown status"):
        store.list_orders("finished")
    with pytest.raises(OrderNotFound):
        store.get("NO-SUCH-ORDER")


def test_no_order_is_ever_deleted(store: RisStore) -> None:
    """Every path an order can take leaves its row: done, failed, dead, redriven, taken over."""
    orders = [add(store) for _ in range(5)]
    accessions = [o.accession_number for o in orders]
    now = T0
    for round_ in range(4):
        for order in store.claim(f"w{round_}", 5, now):
            assert order.id is not None
            if order.id % 3 == 0:
                store.complete(order.id, order.claimed_by or "", IDS, now)
            elif order.id % 3 == 1:
                store.fail(order.id, order.claimed_by or "", "rejected", False, now)
            else:
                store.fail(order.id, order.claimed_by or "", "500", True, now)
        assert [o.accession_number for o in store.list_orders()] == accessions
        store.redrive(status=DEAD, now=now)
        now += timedelta(hours=1)
    assert total(store) == 5
    assert store.counts()[DONE] >= 1
