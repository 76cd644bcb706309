"""What makes a resource already on the platform the same order's, and what a re-send changed in it.

Two facts the create-or-adopt path needs, kept pure so a reader sees them in one place:

* **Identity** (`IDENTITY_REFERENCES`): the references that say whose order a resource belongs to. An existing
  resource found by the same business identifier is adopted only when each of these agrees with what the gateway
  would send; otherwise the identifier belongs to another patient or another visit, and adopting it would link one
  patient's data to another's order. The ImagingStudy, the result and the reading text are not identity: they are
  what a corrected report changes.
* **Corrections** (`changed_elements`, `revised`): a re-send whose content differs from what the platform holds is a
  clinical correction. The elements the gateway sends are compared with the stored ones (server-managed elements and
  the ones the gateway sets from the clock are left out); the resource is then sent again with PUT, Observation and
  DiagnosticReport marked `amended`, so the platform keeps the version history and the reader sees it changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

IDENTITY_REFERENCES: Final[Mapping[str, tuple[str, ...]]] = {
    "Encounter": ("subject",),
    "ServiceRequest": ("subject", "encounter"),
    "Observation": ("subject", "encounter", "basedOn"),
    "DiagnosticReport": ("subject", "encounter", "basedOn"),
}
"""Per resource type, the reference elements an adopted resource must share with the one the gateway built."""

NOT_COMPARED: Final[frozenset[str]] = frozenset({"resourceType", "id", "meta", "text", "status", "issued"})
"""Elements a correction never turns on: the server's own, the status the correction itself sets, and `issued`
(the time the gateway posts a report, which differs at every send)."""

AMENDED_STATUS: Final[Mapping[str, str]] = {"Observation": "amended", "DiagnosticReport": "amended"}
"""The status a corrected resource carries (FHIR R4: a result changed after it was final)."""


def references(resource: Mapping[str, Any], element: str) -> tuple[str, ...]:
    """The `Type/id` references an element holds (one Reference or a list of them), absolute URLs cut to
    their last two segments, in order; empty when the element is absent."""
    value = resource.get(element)
    items = value if isinstance(value, list) else [value]
    found = []
    for item in items:
        reference = item.get("reference") if isinstance(item, Mapping) else None
        if isinstance(reference, str) and reference.strip():
            found.append("/".join(reference.strip().rstrip("/").split("/")[-2:]))
    return tuple(found)


def identity_conflicts(built: Mapping[str, Any], existing: Mapping[str, Any]) -> list[str]:
    """The identity elements on which an existing resource disagrees with the built one, e.g. ['subject'].

    An element either side does not carry proves nothing and constrains nothing (a resource made by an older
    integration may lack `basedOn`; the correction then adds it)."""
    conflicts = []
    for element in IDENTITY_REFERENCES.get(str(built.get("resourceType")), ()):
        wanted, held = references(built, element), references(existing, element)
        if wanted and held and set(wanted) != set(held):
            conflicts.append(element)
    return conflicts


def changed_elements(built: Mapping[str, Any], existing: Mapping[str, Any]) -> list[str]:
    """The top-level elements the gateway sends whose content differs from what the platform holds, sorted.

    Only elements present in `built` count (the platform may add its own); dates compare as instants, so
    `+07:00` and `+00:00` spellings of one moment are no change."""
    return sorted(
        element
        for element, value in built.items()
        if element not in NOT_COMPARED and _canonical(value) != _canonical(existing.get(element))
    )


def revised(built: Mapping[str, Any], existing: Mapping[str, Any]) -> dict[str, Any]:
    """The resource to PUT for a correction: what the gateway built now, under the existing id, with the
    amended status where the resource type has one."""
    resource = {**built, "id": existing["id"]}
    amended = AMENDED_STATUS.get(str(built.get("resourceType")))
    if amended is not None:
        resource["status"] = amended
    return resource


def _canonical(value: Any) -> str:
    return json.dumps(_normalised(value), sort_keys=True, ensure_ascii=False)


def _normalised(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _normalised(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_normalised(item) for item in value]
    if isinstance(value, str) and len(value) >= 20 and value[4:5] == "-" and value[10:11] == "T":
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
        if moment.tzinfo is not None:
            return moment.timestamp()
    return value
