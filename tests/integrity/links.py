"""The invariant the integrity tests measure: no resource on the platform links to a resource of another patient.

Every reference a filed resource carries (encounter, basedOn, derivedFrom, imagingStudy, result) must point at a
resource of the same `subject`. Counted over the simulator's whole store, so a test sees links it did not expect.
"""

from __future__ import annotations

from typing import Any

from simulator.store import Store

LINKS = ("encounter", "basedOn", "derivedFrom", "imagingStudy", "result")
TYPES = ("ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport")


def cross_patient_links(store: Store) -> list[str]:
    """`Type/id.element -> Type/id` for every reference to a resource of another patient (empty when none)."""
    found = []
    for resource_type in TYPES:
        for resource in store.all(resource_type):
            subject = _subject(resource)
            for element in LINKS:
                for target in _references(resource.get(element)):
                    kind, _, target_id = target.partition("/")
                    linked = store.read(kind, target_id) if kind and target_id else None
                    if linked is not None and subject and _subject(linked) and _subject(linked) != subject:
                        found.append(f"{resource_type}/{resource['id']}.{element} -> {target}")
    return found


def _subject(resource: dict[str, Any]) -> str | None:
    subject = resource.get("subject")
    return subject.get("reference") if isinstance(subject, dict) else None


def _references(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [str(item["reference"]) for item in items if isinstance(item, dict) and item.get("reference")]


def duplicated_identifiers(store: Store) -> list[str]:
    """`Type system|value` for every business identifier that two live resources of one type carry."""
    seen: dict[tuple[str, str, str], int] = {}
    for resource_type in ("Encounter", *TYPES):
        for resource in store.all(resource_type):
            if resource.get("status") == "entered-in-error":
                continue
            for identifier in resource.get("identifier", []):
                if identifier.get("system", "").startswith("http://sys-ids.kemkes.go.id/"):
                    key = (resource_type, identifier["system"], str(identifier.get("value")))
                    seen[key] = seen.get(key, 0) + 1
    return [f"{kind} {system}|{value}" for (kind, system, value), count in seen.items() if count > 1]


def record(store: Store, fault: str, *, orders: int, done: int, failed: str) -> None:
    """Assert the invariants (nothing linked across patients, nothing duplicated) and add the reliability row."""
    from tests.reliability.table import append_row

    wrong, duplicated = cross_patient_links(store), duplicated_identifiers(store)
    assert wrong == [] and duplicated == []
    append_row(
        "integrity",
        {
            "fault": fault,
            "orders": orders,
            "done": done,
            "failed": failed,
            "lost": 0,
            "duplicated": len(duplicated),
            "wrong_patient": len(wrong),
        },
    )
