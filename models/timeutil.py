"""Date-times the way SATUSEHAT takes them: parsed from the HIS, checked, and written as UTC `+00:00`.

The platform's rules (shared research, satusehat.md §1.5 and §5.5):

* every date-time is sent in UTC with the offset written `+00:00` ("Standar format Waktu … adalah UTC +00"),
  e.g. 17:35 WIB on 23 Aug 2023 is `2023-08-23T10:35:00+00:00`;
* no date before 3 June 2014, and no date in the future.

The HIS sends ISO 8601 strings, with or without an offset. A string without one is the hospital's local time,
Asia/Jakarta (WIB) unless the validation context names another zone (hospitals in WITA/WIT exist).

`SatusehatDateTime` is the one pydantic type every input model uses for its date-time fields. It reads two
optional keys from the validation context, so tests and callers can pin them without patching the clock:

* `"now"`: an aware `datetime` to judge "in the future" against (default: the system clock);
* `"local_tz"`: a `tzinfo` for naive input (default: `WIB`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, ValidationInfo
from pydantic_core import PydanticCustomError

WIB = timezone(timedelta(hours=7), "WIB")
"""Asia/Jakarta. A fixed offset is exact: Jakarta has kept UTC+7 without daylight saving since 1964, long
before the earliest date SATUSEHAT accepts, and a fixed offset needs no tz database on the gateway host."""

WITA = timezone(timedelta(hours=8), "WITA")
"""Asia/Makassar (central Indonesia), for hospitals whose HIS sends naive WITA times."""

WIT = timezone(timedelta(hours=9), "WIT")
"""Asia/Jayapura (eastern Indonesia), for hospitals whose HIS sends naive WIT times."""

DEFAULT_LOCAL_TZ: tzinfo = WIB
"""The zone of a date-time that carries no offset, unless the validation context says otherwise."""

EARLIEST_DATETIME = datetime(2014, 6, 3, tzinfo=UTC)
"""'Standar format pengiriman Tanggal tidak bisa kurang dari 03 Juni 2014'. Compared in UTC, because UTC is
what is sent: 2014-06-03 05:00 WIB is 2014-06-02 in UTC and would be refused."""

MAX_CLOCK_SKEW = timedelta(minutes=5)
"""How far ahead of our clock a date-time may be before it counts as 'in the future': the HIS's clock and
ours are not in step, and a visit registered 'now' on a slightly fast HIS must not be refused."""

ISO_DATETIME = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?(Z|[+-][0-9]{2}:?[0-9]{2})?$"
)
"""The calendar form SATUSEHAT writes (`YYYY-MM-DDThh:mm:ss+zz:zz`), with what HIS commonly send around it: a
space for `T`, no seconds, a fraction (truncated), `Z`, an offset without its colon, or none (local time).
Python's `fromisoformat` reads more than that (week dates `2025-W31-5`, the basic form `20250801T100000`, an
hour alone); none of those is a form the platform uses, so they are refused rather than guessed at."""

DATETIME_FORM = "YYYY-MM-DDThh:mm:ss+zz:zz, e.g. 2025-08-01T12:57:41+07:00 (without an offset it is read as local time)"

CONTEXT_NOW = "now"
"""Validation-context key: the aware `datetime` that stands for 'now'."""

CONTEXT_LOCAL_TZ = "local_tz"
"""Validation-context key: the `tzinfo` of naive input."""


def validation_context(*, now: datetime | None = None, local_tz: tzinfo | None = None) -> dict[str, Any]:
    """A context for `Model.model_validate(data, context=...)` that pins the clock and/or the local zone."""
    context: dict[str, Any] = {}
    if now is not None:
        context[CONTEXT_NOW] = require_aware(now, "now")
    if local_tz is not None:
        context[CONTEXT_LOCAL_TZ] = local_tz
    return context


def utc_now() -> datetime:
    """The system clock in UTC, to the second (the precision everything is sent with)."""
    return datetime.now(UTC).replace(microsecond=0)


def require_aware(value: datetime, what: str) -> datetime:
    """Refuse a naive datetime where the zone cannot be guessed (a programming error, not HIS input)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got naive {value.isoformat()}")
    return value


def parse_datetime(value: str | datetime, *, local_tz: tzinfo = DEFAULT_LOCAL_TZ) -> datetime:
    """An ISO 8601 date-time as an aware UTC datetime truncated to whole seconds.

    Truncating here, once, means every later comparison (end after start, not in the future) sees exactly the
    value that will be sent. A date without a time of day is refused: sending midnight would invent a time.
    """
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise PydanticCustomError("datetime_empty", "must not be empty")
        if "T" not in text and " " not in text:
            raise PydanticCustomError(
                "datetime_no_time", "must include a time of day: an ISO 8601 date-time {form}", {"form": DATETIME_FORM}
            )
        try:
            if not ISO_DATETIME.match(text):
                raise ValueError(text)
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise PydanticCustomError(
                "datetime_format", "must be an ISO 8601 date-time {form}", {"form": DATETIME_FORM}
            ) from None
    else:
        raise PydanticCustomError(
            "datetime_type", "must be an ISO 8601 date-time string, got {type}", {"type": type(value).__name__}
        )
    if moment.tzinfo is None or moment.utcoffset() is None:
        moment = moment.replace(tzinfo=local_tz)
    try:
        return moment.astimezone(UTC).replace(microsecond=0)
    except OverflowError:  # 0001-01-01T00:00:00 (.NET's DateTime.MinValue) in WIB, 9999-12-31T23:59:59-12:00
        raise PydanticCustomError(
            "datetime_out_of_range",
            "is out of range: SATUSEHAT takes date-times from {earliest} to now",
            {"earliest": EARLIEST_DATETIME.date().isoformat()},
        ) from None


def check_datetime_range(moment: datetime, *, now: datetime, skew: timedelta = MAX_CLOCK_SKEW) -> datetime:
    """Refuse what SATUSEHAT refuses: before 2014-06-03, or later than `now` plus the allowed clock skew."""
    if moment < EARLIEST_DATETIME:
        raise PydanticCustomError(
            "datetime_too_early",
            "must not be before {earliest}: SATUSEHAT refuses older dates",
            {"earliest": to_fhir_datetime(EARLIEST_DATETIME)},
        )
    if moment > now + skew:
        raise PydanticCustomError(
            "datetime_in_future",
            "must not be in the future: it is later than now ({now}) plus {skew_s} s of allowed clock skew",
            {"now": to_fhir_datetime(now), "skew_s": int(skew.total_seconds())},
        )
    return moment


def to_fhir_datetime(value: datetime) -> str:
    """`YYYY-MM-DDThh:mm:ss+00:00`: UTC, whole seconds, the offset spelt out (never `Z`), as the docs show."""
    return require_aware(value, "a FHIR date-time").astimezone(UTC).replace(microsecond=0).isoformat()


def context_now(info: ValidationInfo | None) -> datetime:
    """'Now' for a validator: the context's pinned clock, else the system clock."""
    context = info.context if info is not None and isinstance(info.context, dict) else {}
    now = context.get(CONTEXT_NOW)
    return utc_now() if now is None else require_aware(now, CONTEXT_NOW).astimezone(UTC)


def context_local_tz(info: ValidationInfo | None) -> tzinfo:
    """The zone of naive input for a validator: the context's, else `DEFAULT_LOCAL_TZ`."""
    context = info.context if info is not None and isinstance(info.context, dict) else {}
    local_tz = context.get(CONTEXT_LOCAL_TZ)
    return DEFAULT_LOCAL_TZ if local_tz is None else local_tz


def _parse_in_context(value: Any, info: ValidationInfo) -> datetime:
    return parse_datetime(value, local_tz=context_local_tz(info))


def _check_in_context(value: datetime, info: ValidationInfo) -> datetime:
    return check_datetime_range(value, now=context_now(info))


SatusehatDateTime = Annotated[
    datetime,
    BeforeValidator(_parse_in_context),
    AfterValidator(_check_in_context),
    PlainSerializer(to_fhir_datetime, return_type=str, when_used="json"),
]
"""An aware UTC date-time, whole seconds, within SATUSEHAT's range; JSON-serialised as `…+00:00`, which
parses back to the same value (so models survive a round trip through Prefect parameters)."""
