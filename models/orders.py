"""The RIS order table: radiology exams waiting to be reported to SATUSEHAT, worked by the `poll-ris` flow.

One row per accession number. The HIS/RIS (or `satset orders add`) inserts the exam as the body of the batch
it needs (batch1–batch4, the existing gateway's bodies); a poller claims rows, runs the batch flow and writes
the FHIR ids back. Rows are never deleted: a finished, failed or dead order stays as the record of what was sent.

    pending ──claim──► in_progress ──► done
       ▲                  │  │
       │                  │  └─► failed (retryable, attempts left) ──claim after next_attempt_at──► in_progress
       │                  └────► dead   (rejected, or out of attempts)
       └──────── redrive (operator) ◄── failed / dead

Portable on SQLite, PostgreSQL and MariaDB: JSON through SQLAlchemy's JSON type (MariaDB stores it as LONGTEXT
with a json_valid check), short VARCHARs for everything indexed (MariaDB's utf8mb4 index-length limit), and
every date-time stored as naive UTC (MariaDB DATETIME and SQLite have no time zone) by `UtcDateTime`, which
takes and gives aware datetimes only, so no caller can mix local and UTC times.

No I/O here: the table's shape, the status names and pure helpers. The queries live in `clients/ris.py`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

import sqlalchemy as sa
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from models.inputs import ACSN_MAX_LENGTH, Batch1Input, Batch2Input, Batch3Input, Batch4Input, GatewayInput

# --- statuses ----------------------------------------------------------------------------------------------

PENDING: Final = "pending"
"""Waiting for its first claim (or redriven by an operator)."""
IN_PROGRESS: Final = "in_progress"
"""Claimed by a worker until `lease_expires_at`; after that another worker may take it over."""
DONE: Final = "done"
"""Every resource of the batch exists; `result` holds their ids."""
FAILED: Final = "failed"
"""The last attempt failed for a reason that may pass; claimable again from `next_attempt_at`."""
DEAD: Final = "dead"
"""Rejected (retrying cannot help) or out of attempts: waits for an operator (`satset orders redrive`)."""

STATUSES: Final = (PENDING, IN_PROGRESS, DONE, FAILED, DEAD)
REDRIVABLE: Final = (FAILED, DEAD)
"""What an operator may send back to pending: never an order a worker holds, nor one already done."""

BATCH_INPUTS: Final[dict[int, type[GatewayInput]]] = {
    1: Batch1Input,
    2: Batch2Input,
    3: Batch3Input,
    4: Batch4Input,
}
"""The body each batch takes: an order's payload must validate against the model of its batch."""

PATIENT_NAME_FIELDS: Final = frozenset({"subject_display"})
"""Body fields holding a patient's name: dropped before the payload is stored (SATUSEHAT needs the IHS number,
and a name kept in the table would travel into `satset orders show`, Prefect's run records and logs)."""

# --- column sizes (MariaDB indexes utf8mb4 VARCHARs up to 768 characters; these stay far below) -------------

FHIR_ID_LENGTH: Final = 64
DICOM_UID_LENGTH: Final = 64
EXAM_CODE_LENGTH: Final = 16
STATUS_LENGTH: Final = 16
WORKER_ID_LENGTH: Final = 128
ACCESSION_CONSTRAINT: Final = "uq_radiology_order_accession_number"
PAYLOAD_MAX_BYTES: Final = 256 * 1024
"""The largest batch body (as JSON) an order may hold: half of what the Prefect server takes as a run's parameters
(512 KiB), so the validated input with its defaults always fits. A real body is about 1 KiB."""
LAST_ERROR_MAX_CHARS: Final = 4000
"""`last_error` is cut to this: a message, not a dump (and well inside MariaDB's 64 KiB TEXT)."""


ACSN_COLLATION: Final = "utf8mb4_bin"
"""MariaDB's collation for the accession number: binary, so `accm001` and `ACCM001` are two orders, as they are on
PostgreSQL and SQLite (both compare strings byte by byte). Under MariaDB's default `utf8mb4_*_ci` they collide
on the unique key, and one HIS's order would be refused as another's duplicate, or found in its place."""

ACSN_TYPE: Final = sa.String(ACSN_MAX_LENGTH).with_variant(
    mysql.VARCHAR(ACSN_MAX_LENGTH, charset="utf8mb4", collation=ACSN_COLLATION), "mysql", "mariadb"
)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """An aware datetime in Python, naive UTC in the database (DATETIME(6) on MariaDB: microseconds kept).

    Refuses naive input: a naive value could be local time, and one such row would be claimed hours early or late.
    """

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given for a UTC column: pass an aware datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """The clock every order timestamp is read from: aware UTC."""
    return datetime.now(UTC)


class RadiologyOrder(SQLModel, table=True):
    """A radiology exam to report: its identity columns (for operators and queries), the batch body, the state."""

    __tablename__: ClassVar[str] = "radiology_order"  # type: ignore[misc]
    __table_args__ = (
        sa.CheckConstraint("batch BETWEEN 1 AND 4", name="ck_radiology_order_batch"),
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{status}'" for status in STATUSES) + ")", name="ck_radiology_order_status"
        ),
        sa.CheckConstraint("attempts >= 0", name="ck_radiology_order_attempts"),
        sa.UniqueConstraint("accession_number", name=ACCESSION_CONSTRAINT),
        # The claim's three SELECTs: pending and failed by next_attempt_at, in_progress by lease_expires_at.
        sa.Index("ix_radiology_order_status_next_attempt", "status", "next_attempt_at", "id"),
        sa.Index("ix_radiology_order_status_lease", "status", "lease_expires_at", "id"),
        {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"},
    )

    id: int | None = Field(default=None, primary_key=True)
    accession_number: str = Field(sa_column=sa.Column(ACSN_TYPE, nullable=False))
    """The order's ACSN (`noacsn`): one order per accession number, DICOM SH (16 characters at most), compared
    case-sensitively on every database (`ACSN_TYPE`)."""
    patient_ihs: str = Field(max_length=FHIR_ID_LENGTH, index=True, nullable=False)
    """The patient's SATUSEHAT IHS number (never the name)."""
    attending_practitioner_id: str | None = Field(default=None, max_length=FHIR_ID_LENGTH)
    """The encounter's attending practitioner (batches 1, 3, 4)."""
    performer_practitioner_id: str | None = Field(default=None, max_length=FHIR_ID_LENGTH)
    """The radiologist who reads the exam (batches 2, 3, 4)."""
    exam_code: str | None = Field(default=None, max_length=EXAM_CODE_LENGTH)
    """LOINC code of the exam when the order names one (`codind_code`); else none: the exam is then decided when
    the order runs, from the PACS study's modality or the hospital's DEFAULT_EXAM_CODE (no exam is assumed)."""
    study_instance_uid: str | None = Field(default=None, max_length=DICOM_UID_LENGTH)
    """The PACS study (batch 4 only: batch 3 finds the ImagingStudy by ACSN, batches 1 and 2 have none)."""
    batch: int = Field(nullable=False)
    payload: dict[str, Any] = Field(sa_column=sa.Column(sa.JSON, nullable=False))
    """The batch body as the HIS/RIS gave it, without patient-name fields; re-validated before each run."""
    status: str = Field(default=PENDING, max_length=STATUS_LENGTH, nullable=False)
    attempts: int = Field(default=0, nullable=False)
    """Claims so far (reset by a redrive)."""
    next_attempt_at: datetime | None = Field(default=None, sa_column=sa.Column(UtcDateTime(), nullable=True))
    """When a failed order may be claimed again (pending: when it became pending)."""
    claimed_by: str | None = Field(default=None, max_length=WORKER_ID_LENGTH)
    """The worker holding (or that last held) the order; kept after done/failed as the record of who ran it."""
    lease_expires_at: datetime | None = Field(default=None, sa_column=sa.Column(UtcDateTime(), nullable=True))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    """Why the last attempt failed (names the step and the ids created so far); kept after a redrive."""
    result: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(sa.JSON, nullable=True))
    """The FHIR ids the batch created or adopted."""
    created_at: datetime = Field(default_factory=utcnow, sa_column=sa.Column(UtcDateTime(), nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=sa.Column(UtcDateTime(), nullable=False))


class InvalidOrder(ValueError):
    """An order the table must not take: the message names each field and the rule, never a patient's name."""


@dataclass(frozen=True)
class ValidatedOrder:
    """A body checked against its batch's input: the columns to store and the payload (names stripped)."""

    batch: int
    payload: dict[str, Any]
    columns: dict[str, Any]


def validate_order(batch: int, body: Mapping[str, Any], *, context: dict[str, Any] | None = None) -> ValidatedOrder:
    """Check `body` as batch `batch`'s input before it is stored, so a bad order fails at the door, not at 3 am.

    Raises InvalidOrder naming every field at fault. The payload kept is the body as given (JSON-ready) minus
    patient names; the columns are read from the validated input (defaults applied, references resolved).
    """
    model = BATCH_INPUTS.get(batch) if isinstance(batch, int) and not isinstance(batch, bool) else None
    if model is None:
        raise InvalidOrder(f"batch: must be 1, 2, 3 or 4; got {batch!r}")
    if not isinstance(body, Mapping):
        raise InvalidOrder(f"payload: must be a JSON object (the batch{batch} body); got {type(body).__name__}")
    try:
        payload = to_jsonable_python(strip_patient_names(dict(body)))
    except PydanticSerializationError as error:
        raise InvalidOrder(f"payload: not representable as JSON ({error})") from None
    check_payload_size(payload, f"batch{batch} order")
    try:
        checked = model.model_validate(payload, context=context)
    except ValidationError as error:
        raise InvalidOrder(describe_invalid(error, f"batch{batch} order")) from None
    accession = getattr(checked, "noacsn", None)
    if accession is None:
        raise InvalidOrder(
            f"noacsn: required for a batch{batch} order in the RIS table (the accession number is the order's key)"
        )
    return ValidatedOrder(batch, payload, identity_columns(batch, checked))


def identity_columns(batch: int, checked: GatewayInput) -> dict[str, Any]:
    """The columns an operator searches by, read from a validated input."""
    attending = getattr(checked, "attender_ref", None) if isinstance(checked, Batch1Input) else None
    return {
        "accession_number": getattr(checked, "noacsn", None),
        "patient_ihs": _reference_id(checked.subject_ref),  # type: ignore[attr-defined]
        "attending_practitioner_id": _reference_id(attending),
        "performer_practitioner_id": getattr(checked, "performer_id", None),
        "exam_code": checked.codind_code,  # type: ignore[attr-defined]
        "study_instance_uid": checked.study if isinstance(checked, Batch4Input) else None,
    }


def describe_invalid(error: ValidationError, what: str) -> str:
    """One line per field at fault, from pydantic's report, without the input values (they may be patient data)."""
    lines = [f"{'.'.join(str(part) for part in item['loc']) or 'payload'}: {item['msg']}" for item in error.errors()]
    return f"invalid {what}:\n  " + "\n  ".join(lines)


def _reference_id(reference: str | None) -> str | None:
    """'Patient/P123' → 'P123' (the id of a relative reference)."""
    return None if reference is None else reference.rsplit("/", 1)[-1]


def strip_patient_names(body: dict[str, Any]) -> dict[str, Any]:
    """The body without patient-name fields, so a name never reaches the table."""
    return {key: value for key, value in body.items() if key not in PATIENT_NAME_FIELDS}


def order_payload(order: RadiologyOrder) -> dict[str, Any]:
    """The body to run the order's batch flow with (a copy: the caller may not change the row through it).

    Raises InvalidOrder when the stored payload is not a JSON object (a row written by SQL may hold a string,
    a list or JSON null): the order can never run as it is.
    """
    if not isinstance(order.payload, dict):
        raise InvalidOrder(
            f"invalid stored batch{order.batch} payload:\n  payload: must be a JSON object (the batch body); "
            f"got {_json_kind(order.payload)}"
        )
    return strip_patient_names(dict(order.payload))


def order_input(order: RadiologyOrder) -> GatewayInput:
    """The order's payload validated as its batch's input, for the poller, which runs rows it did not write.

    Raises pydantic's ValidationError naming the field; InvalidOrder for a batch outside 1–4, a payload that is
    not a JSON object, or a value the validators crash on (an OverflowError, say, from a date at the edge of the
    calendar): every one of them names the field, so the order goes dead with a reason an operator can act on.
    """
    model = BATCH_INPUTS.get(order.batch) if type(order.batch) is int else None
    if model is None:
        raise InvalidOrder(f"invalid stored order:\n  batch: must be 1, 2, 3 or 4; got {order.batch!r}")
    payload = order_payload(order)
    check_payload_size(payload, f"stored batch{order.batch} payload")
    try:
        return model.model_validate(payload)
    except ValidationError:
        raise
    except Exception as error:  # a validator that raised something pydantic does not turn into a ValidationError
        fields = _fields_that_crash(model, payload) or ["payload"]
        raise InvalidOrder(
            f"invalid stored batch{order.batch} payload:\n  "
            + "\n  ".join(f"{field}: cannot be validated ({type(error).__name__})" for field in fields)
        ) from None


def check_payload_size(payload: dict[str, Any], what: str) -> None:
    """Refuse a body larger than `PAYLOAD_MAX_BYTES`, naming its largest field (InvalidOrder).

    The batch flow takes the body as its parameters, and the Prefect server refuses a run whose parameters pass
    512 KiB: such an order could never run, and retrying it would only fill the log.
    """
    try:
        size = len(json.dumps(payload, default=str).encode())
    except (TypeError, ValueError, OverflowError):
        return  # not JSON-ready: validation names the field
    if size <= PAYLOAD_MAX_BYTES:
        return
    sizes = {str(key): len(json.dumps(value, default=str).encode()) for key, value in payload.items()}
    largest = max(sizes, key=sizes.__getitem__)
    raise InvalidOrder(
        f"invalid {what}:\n  {largest}: {sizes[largest]} bytes; the whole body is {size} bytes, more than the "
        f"{PAYLOAD_MAX_BYTES} a batch takes"
    )


def _fields_that_crash(model: type[GatewayInput], payload: dict[str, Any]) -> list[str]:
    """The payload's keys whose value alone makes validation raise something other than a ValidationError."""
    crashing = []
    for key, value in payload.items():
        try:
            model.model_validate({key: value})
        except ValidationError:
            continue  # the other fields are missing here: that is expected
        except Exception:
            crashing.append(str(key))
    return crashing


def _json_kind(value: Any) -> str:
    """The JSON name of a value's type, never the value (it may be clinical text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def order_summary(order: RadiologyOrder) -> dict[str, Any]:
    """The order as JSON-ready data for operators (`satset orders show`): every column, times in ISO 8601."""
    columns = RadiologyOrder.__table__.columns  # type: ignore[attr-defined]
    data = {column.name: getattr(order, column.name) for column in columns}
    return {key: value.isoformat() if isinstance(value, datetime) else value for key, value in data.items()}


def truncate_error(message: str) -> str:
    """`message` cut to `LAST_ERROR_MAX_CHARS`, marked as cut."""
    if len(message) <= LAST_ERROR_MAX_CHARS:
        return message
    return message[: LAST_ERROR_MAX_CHARS - 1] + "…"
