"""422 answers a HIS developer can act on: each problem as the field's name and the rule it broke.

FastAPI's default 422 lists pydantic's raw errors, including `input`: for a missing field that is the whole body,
patient name and all. Here every error becomes {"field", "in", "rule"}, without the value sent, e.g.

    {"error": "invalid input",
     "fields": [{"field": "subject_id", "in": "body",
                 "rule": "subject_id is required unless subject_reference is given (every resource names its patient)"},
                {"field": "noacsn", "in": "body", "rule": "must not be empty"}]}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_PREFIXES = ("Value error, ", "Assertion failed, ")

_SENT_CONTEXT_KEYS = ("value", "start", "end", "noacsn")
"""Context keys under which the input models' messages quote what the HIS sent (`...; got '{value}'`)."""


class FieldProblem(BaseModel):
    """One problem with the request (documentation of the 422 body)."""

    model_config = ConfigDict(populate_by_name=True, use_attribute_docstrings=True)

    field: str
    """The field as the HIS sends it: a body key (`noacsn`), a path or query parameter, or a header name."""
    in_: str = Field(alias="in")
    """Where it is: body, path, query or header."""
    rule: str
    """What the value must be."""


class InvalidInput(BaseModel):
    """The 422 body: every problem found, not only the first."""

    error: str = "invalid input"
    fields: list[FieldProblem]


def describe(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """pydantic/FastAPI errors → [{"field", "in", "rule"}], one per error, never echoing the value sent."""
    problems = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ())]
        where = location[0] if location else "body"
        field = ".".join(location[1:]) or where
        if error.get("type") == "json_invalid":  # its location is a character offset, not a field
            field = "body"
        problems.append({"field": field, "in": where, "rule": _rule(error, where, field)})
    return problems


def _rule(error: Mapping[str, Any], where: str, field: str) -> str:
    kind = str(error.get("type", ""))
    context = error.get("ctx") or {}
    if kind == "missing":
        return "is required" if where == "body" or field != where else "a JSON object body is required"
    if kind == "string_too_short":
        minimum = context.get("min_length", 1)
        return "must not be empty" if minimum == 1 else f"must be at least {minimum} characters"
    if kind == "string_too_long":
        return f"must be at most {context.get('max_length')} characters"
    if kind == "string_type":
        return "must be a string"
    if kind == "json_invalid":
        return f"the body is not valid JSON ({context.get('error', 'parse error')})"
    if kind in ("model_attributes_type", "dict_type", "model_type"):
        return "must be a JSON object"
    if kind == "uuid_parsing":
        return "must be a UUID (a flow run id as returned by the API)"
    message = str(error.get("msg", kind))
    for prefix in _PREFIXES:
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return without_values_sent(message, error)


def without_values_sent(message: str, error: Mapping[str, Any]) -> str:
    """The rule without the values the caller sent: the models' messages quote them (useful on the command
    line), but a 422 goes back over the network and into logs, and a value in the wrong field may be a name."""
    context = error.get("ctx") or {}
    sent = [error.get("input"), *(context.get(key) for key in _SENT_CONTEXT_KEYS)]
    values = {str(value) for value in sent if isinstance(value, str | int | float) and not isinstance(value, bool)}
    for value in sorted((v for v in values if v.strip()), key=len, reverse=True):
        quoted = re.escape(value)
        message = re.sub(rf"[;,]?\s*got '?{quoted}'?(?=$|[\s;,)])", "", message)
        message = re.sub(rf"\s*\('?{quoted}'?\)", "", message)
        if len(value) > 3:  # shorter ones ('-', '.') also occur in the rules' own words
            message = message.replace(f"'{value}'", "the value sent")
    return message
