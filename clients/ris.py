"""The RIS order table over plain SQLAlchemy: add, claim, complete, fail, redrive. No Prefect; usable from a shell.

Claiming is atomic on every supported database, so any number of pollers (threads, processes, hosts) can share
the table and no order is ever run by two of them at once:

* PostgreSQL and MariaDB (10.6+): one transaction selects the claimable rows `FOR UPDATE SKIP LOCKED` (a row
  another claimer has locked is skipped, not waited for) and marks them in_progress before it commits.
* SQLite (no row locks): the same SELECT finds candidates, then each is taken by a conditional UPDATE that repeats
  the claimable test (`WHERE id = ? AND <claimable>`). SQLite runs one writer at a time, so of two claimers racing
  for a row exactly one sees rowcount 1; the other moves on.

Both paths run the conditional UPDATE (on the server databases it cannot miss: the row is locked), so the code is
one path with the lock as an addition. A claim is a lease: a worker that dies leaves its order in_progress until
`lease_expires_at`, then any poller takes it over. Completing or failing applies only while the worker still holds
the claim (`status = in_progress AND claimed_by = worker`), so a worker that lost its lease cannot overwrite the
new owner's outcome. Orders are never deleted.

Every timestamp is an aware UTC datetime (`models.orders.UtcDateTime` stores naive UTC). Every method takes `now`
so tests move time without patching the clock. Engines are created with `hide_parameters=True`: a database error
quotes the SQL, never the bound values (payloads hold clinical text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic_core import to_jsonable_python
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from models.inputs import ACSN_MAX_LENGTH
from models.orders import (
    ACSN_COLLATION,
    DEAD,
    DONE,
    FAILED,
    IN_PROGRESS,
    PENDING,
    REDRIVABLE,
    STATUSES,
    InvalidOrder,
    RadiologyOrder,
    truncate_error,
    utcnow,
    validate_order,
)
from models.settings import RisSettings

__all__ = [
    "Claim",
    "DuplicateOrder",
    "InvalidOrder",
    "NotRedrivable",
    "OrderNotFound",
    "RisError",
    "RisStore",
    "is_transient",
]

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite writer waits for another's lock before giving up (claims from many threads queue here)."""

SQLITE_TRANSIENT = ("locked", "busy", "unable to open database file", "disk i/o error")
"""SQLite OperationalError messages that describe the file's state (another writer, a missing mount), not the SQL."""

MARIADB_MIN_VERSION = (10, 6)
"""The first MariaDB with `SKIP LOCKED`."""


class RisError(Exception):
    """A request the order table refuses; the message says why and what to do, never a patient's name."""


class DuplicateOrder(RisError):
    """An order with this accession number exists already; it is left exactly as it was."""


class OrderNotFound(RisError, LookupError):
    """No order has this accession number."""


class NotRedrivable(RisError):
    """Only failed and dead orders go back to pending: a held order has a worker, a done one is finished."""


class RisStore:
    """The `radiology_order` table of one database, with the poller's rules (lease, attempts, backoff)."""

    def __init__(
        self,
        url: str,
        *,
        max_attempts: int = 5,
        lease_s: float = 900.0,
        backoff_s: float = 60.0,
    ) -> None:
        if max_attempts < 1 or lease_s <= 0 or backoff_s <= 0:
            raise ValueError("max_attempts must be >= 1, lease_s and backoff_s > 0")
        self.max_attempts = max_attempts
        self.lease = timedelta(seconds=lease_s)
        self.backoff = timedelta(seconds=backoff_s)
        self.engine: Engine = sa.create_engine(url, **_engine_options(url))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: RisSettings) -> RisStore:
        return cls(
            settings.ris_database_url,
            max_attempts=settings.order_max_attempts,
            lease_s=settings.order_lease_s,
            backoff_s=settings.order_retry_backoff_s,
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"RisStore({self.engine.url.render_as_string(hide_password=True)!r})"

    # --- schema ------------------------------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the table and its indexes if missing (idempotent; two processes starting together are fine)."""
        self._check_server()
        table = RadiologyOrder.__table__  # type: ignore[attr-defined]
        try:
            table.metadata.create_all(self.engine, tables=[table], checkfirst=True)
        except SQLAlchemyError:
            if not sa.inspect(self.engine).has_table(table.name):
                raise  # another process creating it at the same moment is the only excuse
        self._binary_accession()

    def _binary_accession(self) -> None:
        """A MariaDB table created before the accession number had its binary collation gets it now.

        The old case-insensitive unique key cannot hold two ACSNs differing in case only, so the change finds no
        duplicates to refuse; afterwards `accm001` and `ACCM001` are two orders, as on PostgreSQL and SQLite.
        """
        if self.engine.dialect.name not in ("mysql", "mariadb"):
            return
        with self.engine.begin() as connection:
            collation = connection.execute(
                sa.text(
                    "SELECT COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                    "AND TABLE_NAME = 'radiology_order' AND COLUMN_NAME = 'accession_number'"
                )
            ).scalar_one_or_none()
            if collation is not None and collation != ACSN_COLLATION:
                connection.execute(
                    sa.text(
                        f"ALTER TABLE radiology_order MODIFY accession_number VARCHAR({ACSN_MAX_LENGTH}) "
                        f"CHARACTER SET utf8mb4 COLLATE {ACSN_COLLATION} NOT NULL"
                    )
                )

    def _check_server(self) -> None:
        """MariaDB before 10.6 (or MySQL before 8) parses no SKIP LOCKED: say so at start-up, not at the first claim."""
        dialect = self.engine.dialect
        if dialect.name not in ("mysql", "mariadb"):
            return
        with self.engine.connect():
            version = dialect.server_version_info or ()
        is_mariadb = getattr(dialect, "is_mariadb", False)
        minimum = MARIADB_MIN_VERSION if is_mariadb else (8, 0)
        if tuple(version[:2]) < minimum:
            product = "MariaDB" if is_mariadb else "MySQL"
            needed = ".".join(map(str, minimum))
            raise RisError(f"{product} {'.'.join(map(str, version))} has no SKIP LOCKED; the RIS table needs {needed}+")

    # --- orders in -------------------------------------------------------------------------------------------

    def add_order(self, batch: int, payload: Mapping[str, Any], *, now: datetime | None = None) -> RadiologyOrder:
        """Store a pending order after checking `payload` as batch `batch`'s input (InvalidOrder names the field).

        Patient names are dropped from the payload. The same accession number twice raises DuplicateOrder and
        leaves the first order untouched.
        """
        checked = validate_order(batch, payload)
        now = _aware(now)
        order = RadiologyOrder(
            **checked.columns,
            batch=batch,
            payload=checked.payload,
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
        with self._sessions() as session:
            session.add(order)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                existing = self._find(session, order.accession_number)
                if existing is None:
                    raise
                raise DuplicateOrder(
                    f"an order with accession number {existing.accession_number} exists already "
                    f"(batch {existing.batch}, {existing.status}); nothing was changed. Use a new accession number, "
                    "or redrive the existing order if it failed"
                ) from None
        return order

    # --- the poller's side -------------------------------------------------------------------------------------

    def claim(self, worker_id: str, limit: int, now: datetime | None = None) -> list[RadiologyOrder]:
        """Take up to `limit` claimable orders for `worker_id`; no other claimer gets any of them.

        The orders to run only: see `claim_report` for the ones a claim found spent or unreadable and buried.
        """
        return self.claim_report(worker_id, limit, now).orders

    def claim_report(self, worker_id: str, limit: int, now: datetime | None = None) -> Claim:
        """Take up to `limit` claimable orders for `worker_id`; no other claimer gets any of them.

        Claimable, in this order: in_progress with `lease_expires_at <= now` (its worker died), failed with
        `next_attempt_at <= now`, pending; each kind earliest due first. Each claimed order has `attempts + 1`
        (counted at the claim, so a poller that dies mid-run has used the attempt up), in_progress,
        `claimed_by = worker_id` and a lease until `now + lease`.

        Two kinds of claimable order are made dead here instead of being returned, each with its reason in
        `last_error` (and in `Claim.dead`), so one bad row never stops a poll nor comes back forever:
        * spent: `attempts` has reached `max_attempts` already (its poller stopped on every attempt: crash,
          kill, hang; the lease ran out each time);
        * unreadable: a column the database holds but Python cannot read (invalid JSON, a 5000-digit number, a
          date-time SQLite stored as any text), named in the reason.

        One SELECT per kind, each a range of its own index, so a table full of done orders (they are never
        deleted) costs nothing to poll; all in one transaction, locked `FOR UPDATE SKIP LOCKED` where the database
        has row locks, then taken one by one with the conditional UPDATE.
        """
        if not worker_id:
            raise ValueError("worker_id must not be empty")
        claim = Claim([], [])
        if limit < 1:
            return claim
        now = _aware(now)
        with self._sessions() as session, session.begin():
            candidates: list[int] = []
            for kind in _claimable_kinds(now):
                if len(candidates) == limit:
                    break
                candidates += session.scalars(
                    kind.limit(limit - len(candidates)).with_for_update(skip_locked=True)  # SQLite renders nothing
                ).all()
            taken = []
            for order_id in candidates:
                spent = self._spent(session, order_id, now)
                if spent is not None:
                    claim.dead.append(self._bury(session, order_id, worker_id, spent, now))
                elif self._take(session, order_id, worker_id, now):
                    taken.append(order_id)
            if taken:
                claim.orders.extend(self._load(session, taken, worker_id, now, claim.dead))
        return claim

    def _spent(self, session: Session, order_id: int, now: datetime) -> str | None:
        """Why a claimable order is out of attempts already (None if it has some left): claiming it would run it
        past ORDER_MAX_ATTEMPTS, and an order whose every claim crashed its poller would never end."""
        row = session.execute(
            sa.select(col(RadiologyOrder.status), col(RadiologyOrder.last_error)).where(
                col(RadiologyOrder.id) == order_id,
                _claimable(now),
                col(RadiologyOrder.attempts) >= self.max_attempts,
            )
        ).one_or_none()
        if row is None:
            return None
        status, previous = row
        if status == IN_PROGRESS:
            reason = (
                f"attempts: all {self.max_attempts} (ORDER_MAX_ATTEMPTS) ended without an outcome: the poller running "
                "the order stopped (crash, kill or hang) and its lease ran out each time; run it by hand, or redrive "
                "it once the cause is found"
            )
        else:
            reason = (
                f"attempts: the row says its {self.max_attempts} (ORDER_MAX_ATTEMPTS) attempts are used up already; "
                "redrive it to run it again"
            )
        return reason if not previous else f"{reason}\nbefore that: {previous}"

    def _bury(self, session: Session, order_id: int, worker_id: str, reason: str, now: datetime) -> tuple[str, str]:
        """Make an order dead with `reason`, held or claimable (the caller has it locked); (ACSN, reason)."""
        session.execute(
            sa.update(RadiologyOrder)
            .where(col(RadiologyOrder.id) == order_id)
            .values(
                status=DEAD,
                claimed_by=worker_id,
                lease_expires_at=None,
                next_attempt_at=None,
                last_error=truncate_error(reason),
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        accession = session.scalars(
            sa.select(col(RadiologyOrder.accession_number)).where(col(RadiologyOrder.id) == order_id)
        ).one()
        return accession, reason

    def _load(
        self, session: Session, taken: list[int], worker_id: str, now: datetime, dead: list[tuple[str, str]]
    ) -> list[RadiologyOrder]:
        """The taken orders as objects, in `taken` order; one that cannot be read is buried (reason in `dead`).

        One SELECT for all; only when it fails (a row Python cannot read) one per order, to find the culprit.
        """
        query = sa.select(RadiologyOrder)
        try:
            found = {order.id: order for order in session.scalars(query.where(col(RadiologyOrder.id).in_(taken)))}
            return [found[order_id] for order_id in taken]
        except sa.exc.DBAPIError:
            raise  # the database's own error: the transaction is gone, and the claim with it
        except Exception:
            session.expunge_all()
        orders = []
        for order_id in taken:
            try:
                orders.append(session.scalars(query.where(col(RadiologyOrder.id) == order_id)).one())
            except sa.exc.DBAPIError:
                raise
            except Exception:
                session.expunge_all()
                reason = _unreadable(session, order_id)
                dead.append(self._bury(session, order_id, worker_id, reason, now))
        return orders

    def _take(self, session: Session, order_id: int, worker_id: str, now: datetime) -> bool:
        """The conditional UPDATE: marks the order claimed only if it is still claimable, and says whether it did."""
        outcome = session.execute(
            sa.update(RadiologyOrder)
            .where(col(RadiologyOrder.id) == order_id, _claimable(now))
            .values(
                status=IN_PROGRESS,
                attempts=col(RadiologyOrder.attempts) + 1,
                claimed_by=worker_id,
                lease_expires_at=now + self.lease,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        return _rowcount(outcome) == 1

    def complete(self, order_id: int, worker_id: str, result: Mapping[str, Any], now: datetime | None = None) -> bool:
        """Mark the order done with the FHIR ids; False if `worker_id` no longer holds it (nothing is changed).

        Calling it again after a success (a retry whose first commit landed) returns True and changes nothing.
        """
        now = _aware(now)
        with self._sessions() as session, session.begin():
            outcome = session.execute(
                sa.update(RadiologyOrder)
                .where(*_held_by(order_id, worker_id))
                .values(
                    status=DONE,
                    result=to_jsonable_python(dict(result)),
                    lease_expires_at=None,
                    next_attempt_at=None,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if _rowcount(outcome) == 1:
                return True
            current = session.get(RadiologyOrder, order_id)
            return current is not None and current.status == DONE and current.claimed_by == worker_id

    def renew(self, order_id: int, worker_id: str, now: datetime | None = None) -> bool:
        """Extend the lease of an order the worker still holds to `now + lease`; False if the claim was lost.

        A batch can outlast the lease (an ImagingStudy deadline, retries with backoff): the poller renews while it
        works, so only a worker that stopped renewing (crashed, hung, cut off) loses its orders to another.
        """
        now = _aware(now)
        with self._sessions() as session, session.begin():
            outcome = session.execute(
                sa.update(RadiologyOrder)
                .where(*_held_by(order_id, worker_id))
                .values(lease_expires_at=now + self.lease, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            return _rowcount(outcome) == 1

    def fail(
        self, order_id: int, worker_id: str, error: str, retryable: bool, now: datetime | None = None
    ) -> str | None:
        """Record a failed attempt; returns the new status (failed or dead), or None if the claim was lost.

        Retryable with attempts left → failed, claimable again after `backoff * 2**(attempts-1)`. Rejected, or
        the last attempt → dead, for an operator. `last_error` keeps `error` either way.
        """
        now = _aware(now)
        with self._sessions() as session, session.begin():
            current = session.get(RadiologyOrder, order_id)
            if current is None or current.claimed_by != worker_id:
                return None
            if current.status != IN_PROGRESS:  # a retried call whose first commit landed: report, change nothing
                return current.status if current.status in (FAILED, DEAD) else None
            attempts = current.attempts
            if retryable and attempts < self.max_attempts:
                status, next_attempt_at = FAILED, now + self.retry_delay(attempts)
            else:
                status, next_attempt_at = DEAD, None
            outcome = session.execute(
                sa.update(RadiologyOrder)
                .where(*_held_by(order_id, worker_id), col(RadiologyOrder.attempts) == attempts)
                .values(
                    status=status,
                    next_attempt_at=next_attempt_at,
                    lease_expires_at=None,
                    last_error=truncate_error(error),
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            return status if _rowcount(outcome) == 1 else None

    def retry_delay(self, attempts: int) -> timedelta:
        """The wait after failed attempt number `attempts` (1-based): backoff, 2×, 4×, …"""
        return self.backoff * 2 ** max(attempts - 1, 0)

    # --- the operator's side -----------------------------------------------------------------------------------

    def get(self, accession_number: str) -> RadiologyOrder:
        """The order with this accession number (OrderNotFound if none)."""
        with self._sessions() as session:
            order = self._find(session, accession_number)
        if order is None:
            raise OrderNotFound(f"no order with accession number {accession_number}")
        return order

    def list_orders(
        self, status: str | None = None, *, limit: int | None = None, newest: bool = False
    ) -> list[RadiologyOrder]:
        """Orders oldest first, all or of one status; with `newest`, the last `limit` added (still oldest first)."""
        order_id = col(RadiologyOrder.id)
        query = sa.select(RadiologyOrder).order_by(order_id.desc() if newest else order_id)
        if status is not None:
            query = query.where(col(RadiologyOrder.status) == _known_status(status))
        if limit is not None:
            query = query.limit(limit)
        with self._sessions() as session:
            found = _read(session, query)
        return found[::-1] if newest else found

    def counts(self) -> dict[str, int]:
        """How many orders are in each status (every status listed, zeros included)."""
        query = sa.select(col(RadiologyOrder.status), sa.func.count()).group_by(col(RadiologyOrder.status))
        with self._sessions() as session:
            found = {status: int(count) for status, count in session.execute(query)}
        return {status: found.get(status, 0) for status in STATUSES}

    def redrive(
        self, accession_number: str | None = None, *, status: str | None = None, now: datetime | None = None
    ) -> list[str]:
        """Send failed/dead orders back to pending, due now; returns the accession numbers redriven.

        One order by accession number (NotRedrivable if it is pending, in_progress or done), or every order of a
        status (failed or dead). Attempts are reset to 0: an operator redrives after fixing the cause, and the
        order deserves the full ORDER_MAX_ATTEMPTS again (otherwise a dead order would die at its first hiccup).
        `last_error` and `result` are kept, so the history of the order is not lost.
        """
        if (accession_number is None) == (status is None):
            raise ValueError("redrive takes an accession number or a status, not both and not neither")
        now = _aware(now)
        if status is not None and _known_status(status) not in REDRIVABLE:
            raise NotRedrivable(f"only {' or '.join(REDRIVABLE)} orders can be redriven, not {status}")
        with self._sessions() as session, session.begin():
            if accession_number is not None:
                order = self._find(session, accession_number)
                if order is None:
                    raise OrderNotFound(f"no order with accession number {accession_number}")
                if order.status not in REDRIVABLE:
                    raise NotRedrivable(
                        f"order {accession_number} is {order.status}: only {' or '.join(REDRIVABLE)} orders "
                        "can be redriven"
                    )
                targets: Sequence[tuple[int, str, str]] = [(order.id or 0, order.accession_number, order.status)]
            else:
                query = (
                    sa.select(col(RadiologyOrder.id), col(RadiologyOrder.accession_number), col(RadiologyOrder.status))
                    .where(col(RadiologyOrder.status) == status)
                    .order_by(col(RadiologyOrder.id))
                )
                targets = [(row[0], row[1], row[2]) for row in session.execute(query)]
            redriven = []
            for order_id, accession, seen_status in targets:
                outcome = session.execute(
                    sa.update(RadiologyOrder)
                    .where(col(RadiologyOrder.id) == order_id, col(RadiologyOrder.status) == seen_status)
                    .values(
                        status=PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        claimed_by=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(outcome) == 1:
                    redriven.append(accession)
        return redriven

    @staticmethod
    def _find(session: Session, accession_number: str) -> RadiologyOrder | None:
        found = _read(
            session, sa.select(RadiologyOrder).where(col(RadiologyOrder.accession_number) == accession_number)
        )
        return found[0] if found else None


def _read(session: Session, query: sa.Select[tuple[RadiologyOrder]]) -> list[RadiologyOrder]:
    """The orders `query` selects, for an operator: a row with a column Python cannot read (written by SQL: invalid
    JSON, a 5000-digit number) is shown with that column None instead of failing the whole list; its `last_error`
    (written when the claim made it dead) names the column."""
    try:
        return list(session.scalars(query))
    except sa.exc.DBAPIError:
        raise
    except Exception:
        session.expunge_all()
    table = RadiologyOrder.__table__  # type: ignore[attr-defined]
    orders = []
    for order_id in session.scalars(query.with_only_columns(col(RadiologyOrder.id))):
        values: dict[str, Any] = {}
        for column in table.columns:
            try:
                values[column.name] = session.execute(
                    sa.select(column).where(col(RadiologyOrder.id) == order_id)
                ).scalar_one()
            except sa.exc.DBAPIError:
                raise
            except Exception:
                values[column.name] = None
        orders.append(RadiologyOrder.model_construct(**values))
    return orders


@dataclass
class Claim:
    """What one claim took: the orders to run, and the (ACSN, reason) of those it made dead instead."""

    orders: list[RadiologyOrder]
    dead: list[tuple[str, str]]


def _unreadable(session: Session, order_id: int) -> str:
    """Which of an order's columns Python cannot read, and why (the error's type, never the value)."""
    faults = []
    for column in RadiologyOrder.__table__.columns:  # type: ignore[attr-defined]
        try:
            session.execute(sa.select(column).where(col(RadiologyOrder.id) == order_id)).scalar_one()
        except sa.exc.DBAPIError:
            raise
        except Exception as error:
            why = (
                f"{type(error).__name__}: {error.msg}"
                if isinstance(error, json.JSONDecodeError)
                else type(error).__name__
            )
            faults.append(f"{column.name}: the stored value cannot be read ({why})")
    found = "\n  ".join(faults) or "the row cannot be read"
    return f"invalid stored order:\n  {found}\nthe order can never run as it is: fix the row, then redrive it"


def is_transient(error: BaseException) -> bool:
    """True for database errors a later attempt may not meet: a lost or refused connection (the server restarting),
    a deadlock or lock timeout, SQLite's "database is locked". Constraint and SQL errors are not transient.

    SQLite reports its SQL errors as OperationalError too ("no such table", "incomplete input"), so for SQLite only
    the messages of a busy or unreachable file count.
    """
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, sa.exc.InterfaceError | sa.exc.DisconnectionError):
        return True
    if not isinstance(error, sa.exc.OperationalError):
        return False
    if type(error.orig).__module__.startswith("sqlite3"):
        message = str(error.orig).lower()
        return any(sign in message for sign in SQLITE_TRANSIENT)
    return True


def _claimable(now: datetime) -> sa.ColumnElement[bool]:
    """Pending; failed and due; or held under a lease that has run out."""
    status = col(RadiologyOrder.status)
    return sa.or_(
        status == PENDING,
        sa.and_(status == FAILED, col(RadiologyOrder.next_attempt_at) <= now),
        sa.and_(status == IN_PROGRESS, col(RadiologyOrder.lease_expires_at) <= now),
    )


def _claimable_kinds(now: datetime) -> list[sa.Select[tuple[int]]]:
    """The claim's SELECTs, one per kind of claimable order, each served by an index (status, due time, id)."""
    order_id, status = col(RadiologyOrder.id), col(RadiologyOrder.status)
    next_attempt_at, lease_expires_at = col(RadiologyOrder.next_attempt_at), col(RadiologyOrder.lease_expires_at)
    return [
        sa.select(order_id).where(status == IN_PROGRESS, lease_expires_at <= now).order_by(lease_expires_at, order_id),
        sa.select(order_id).where(status == FAILED, next_attempt_at <= now).order_by(next_attempt_at, order_id),
        sa.select(order_id).where(status == PENDING).order_by(next_attempt_at, order_id),
    ]


def _held_by(order_id: int, worker_id: str) -> tuple[sa.ColumnElement[bool], ...]:
    """The claim is still this worker's: a re-claim after its lease ran out changed `claimed_by`."""
    return (
        col(RadiologyOrder.id) == order_id,
        col(RadiologyOrder.status) == IN_PROGRESS,
        col(RadiologyOrder.claimed_by) == worker_id,
    )


def _known_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; one of: {', '.join(STATUSES)}")
    return status


def _rowcount(outcome: sa.Result[Any]) -> int:
    return int(getattr(outcome, "rowcount", 0))


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got naive {now.isoformat()}")
    return now


def _engine_options(url: str) -> dict[str, Any]:
    """Per database: SQLite waits for the writer lock; servers ping pooled connections (a restarted PostgreSQL
    leaves dead ones behind) and MariaDB reads committed rows, so a claim locks what it takes and little else."""
    options: dict[str, Any] = {"hide_parameters": True}
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    else:
        options["pool_pre_ping"] = True
        options["pool_recycle"] = 1800
    if backend in ("mysql", "mariadb"):
        options["isolation_level"] = "READ COMMITTED"
    return options
