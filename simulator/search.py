"""FHIR search as the platform answers it: token values with FHIR escaping, OR lists, `_sort`, `_count`.

Why this matters: the official router puts the ACSN into its query raw, encoding only `|` as `%7C`
(`GET /ImagingStudy?identifier=http://sys-ids.kemkes.go.id/acsn/{org}%7C{ACSN}&_sort=-_lastUpdated&_count=1`,
shared/research/observed_contracts.md), while a client that escapes (`\\,`) searches for something else. The
simulator reads a value the way FHIR R4 search defines it (https://hl7.org/fhir/R4/search.html#escaping), so an
ACSN with a comma or a dollar behaves here as it will on the platform:

* An unescaped `,` separates values that are OR-ed: `identifier=sys|A,B` finds identifier `sys|A` or `B` (any
  system for the second, as a bare value means), never the literal `A,B`. `\\,` is a literal comma.
* The first unescaped `|` splits a token into system and value: `sys|v` (that system), `|v` (an identifier
  without a system), `sys|` (any value in that system), `v` (any system). `\\|` is a literal bar.
* `$` separates the components of *composite* parameters only; `identifier`, `subject`, `based-on` and `_id` are
  not composite, so an unescaped `$` is taken literally (as HAPI FHIR does too) and `\\$` is the same literal `$`.
  Choice made from the FHIR semantics (the platform's own handling is not documented anywhere we found): an ACSN
  with `$` is found both in the router's raw form and in an escaped one.
* `\\\\` is a literal backslash; a backslash before any other character is kept as it is (`A\\B` stays `A\\B`).
* Several occurrences of one parameter are AND-ed. Parameters other than those above are ignored.
* `_sort`: `-_lastUpdated` (newest first, also the order without `_sort`) or `_lastUpdated` (oldest first).
  `_count`: a whole number ≥ 0 limits the entries, not `total`; `_count=0` answers the total alone. Anything
  else in `_sort` / `_count` is refused (`SearchError`, answered 400 naming the parameter).

Pure functions over the store's answers; no HTTP here (simulator/app.py calls Platform.search, which calls this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

if TYPE_CHECKING:
    from simulator.store import Store

_ESCAPABLE = frozenset("\\,$|")
FILTERS = ("identifier", "subject", "patient", "based-on", "_id")
"""The search parameters the simulator evaluates (everything the gateway and the router ask for)."""


class SearchError(ValueError):
    """A search parameter the simulator cannot evaluate; `parameter` names it for the 400 answer."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"search parameter {parameter}: {message}")
        self.parameter = parameter


@dataclass(frozen=True, slots=True)
class Token:
    """One token alternative. system None: any system; "" (from `|value`): no system. value None: any value."""

    system: str | None
    value: str | None

    def matches(self, identifier: Any) -> bool:
        if not isinstance(identifier, dict):
            return False
        if self.value is not None and identifier.get("value") != self.value:
            return False
        if self.system is None:
            return True
        if self.system == "":
            return not identifier.get("system")
        return identifier.get("system") == self.system


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed search: per filter parameter occurrence, its OR-ed alternatives; the order; the page size."""

    filters: tuple[tuple[str, tuple[str, ...]], ...]
    newest_first: bool = True
    count: int | None = None

    def tokens(self, name: str = "identifier") -> list[tuple[Token, ...]]:
        """Each `name` occurrence's alternatives as tokens (AND over the list, OR within each tuple)."""
        return [tuple(parse_token(raw) for raw in values) for param, values in self.filters if param == name]


def split_or(raw: str) -> list[str]:
    """Split a parameter value on its unescaped commas; escapes stay in the pieces (unescape them last)."""
    pieces: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "\\" and index + 1 < len(raw) and raw[index + 1] in _ESCAPABLE:
            current.append(raw[index : index + 2])
            index += 2
            continue
        if char == ",":
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    pieces.append("".join(current))
    return pieces


def unescape(raw: str) -> str:
    """`\\,` `\\$` `\\|` `\\\\` → the character; any other backslash is kept."""
    out: list[str] = []
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "\\" and index + 1 < len(raw) and raw[index + 1] in _ESCAPABLE:
            out.append(raw[index + 1])
            index += 2
            continue
        out.append(char)
        index += 1
    return "".join(out)


def parse_token(raw: str) -> Token:
    """One (already OR-split) token value: system and value around the first unescaped `|`, unescaped."""
    index = 0
    while index < len(raw):
        if raw[index] == "\\" and index + 1 < len(raw) and raw[index + 1] in _ESCAPABLE:
            index += 2
            continue
        if raw[index] == "|":
            system, value = unescape(raw[:index]), unescape(raw[index + 1 :])
            return Token(system, value or None)
        index += 1
    return Token(None, unescape(raw))


def parse(params: Sequence[tuple[str, str]]) -> Query:
    """The query string's (name, value) pairs, as the app decoded them (`%7C` is already `|`)."""
    filters: list[tuple[str, tuple[str, ...]]] = []
    newest_first = True
    count: int | None = None
    for name, value in params:
        if name in FILTERS:
            filters.append((name, tuple(split_or(value))))
        elif name == "_sort":
            key = value.strip()
            if key not in ("_lastUpdated", "-_lastUpdated"):
                raise SearchError("_sort", f"only _lastUpdated and -_lastUpdated are supported, got {value!r}")
            newest_first = key.startswith("-")
        elif name == "_count":
            if not value.strip().isdigit():
                raise SearchError("_count", f"must be a whole number of 0 or more, got {value!r}")
            count = int(value.strip())
    return Query(tuple(filters), newest_first, count)


def run(store: Store, resource_type: str, query: Query) -> list[dict[str, Any]]:
    """The matching resources in the query's order (all of them; the caller pages with `count`)."""
    matches = _candidates(store, resource_type, query)  # newest first
    for name, values in query.filters:
        if name == "identifier":
            alternatives = [parse_token(raw) for raw in values]
            matches = [r for r in matches if any(t.matches(i) for t in alternatives for i in _identifiers(r))]
        elif name in ("subject", "patient"):
            wanted = {_reference(unescape(raw), "Patient") for raw in values}
            matches = [r for r in matches if (r.get("subject") or {}).get("reference") in wanted]
        elif name == "based-on":
            wanted = {unescape(raw) for raw in values}
            matches = [r for r in matches if wanted & {b.get("reference") for b in r.get("basedOn") or []}]
        elif name == "_id":
            wanted = {unescape(raw) for raw in values}
            matches = [r for r in matches if r.get("id") in wanted]
    return matches if query.newest_first else list(reversed(matches))


def bundle(
    resource_type: str, params: Sequence[tuple[str, str]], matches: list[dict[str, Any]], query: Query, base_url: str
) -> dict[str, Any]:
    """The searchset Bundle as the platform returns it: total, self link, entry[].fullUrl/resource/search.mode."""
    shown = matches if query.count is None else matches[: query.count]
    result: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(matches),
        "link": [{"relation": "self", "url": f"{base_url}/{resource_type}?{urlencode(list(params))}"}],
    }
    if shown:
        result["entry"] = [
            {"fullUrl": f"{base_url}/{resource_type}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in shown
        ]
    return result


def _candidates(store: Store, resource_type: str, query: Query) -> list[dict[str, Any]]:
    """Start from the identifier index when the first identifier parameter names system and value in every
    alternative (the index holds only identifiers with both); the filters in `run` decide either way."""
    for alternatives in query.tokens("identifier"):
        if all(t.system and t.value is not None for t in alternatives):
            return store.find_by_identifiers(resource_type, [(t.system, t.value or "") for t in alternatives])
        break
    return store.all(resource_type)


def _identifiers(resource: dict[str, Any]) -> list[Any]:
    found = resource.get("identifier")
    return found if isinstance(found, list) else []


def _reference(value: str, default_type: str) -> str:
    return value if "/" in value else f"{default_type}/{value}"
