"""The platform's FHIR behaviour without HTTP: validate, check references and duplicates, store, search.

The HTTP app and the router emulation both go through here, so a resource the router creates meets the same
rules as one the gateway posts (the official router posts over HTTP too).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

from simulator import rules, search
from simulator.config import SimulatorConfig
from simulator.faults import Faults
from simulator.registry import Registry
from simulator.rules import Rule, Violation
from simulator.store import Store


class OutcomeError(Exception):
    """A request the platform refuses: an HTTP status and the OperationOutcome issues to answer with."""

    def __init__(self, status: int, violations: list[Violation]) -> None:
        super().__init__("; ".join(v.text for v in violations))
        self.status = status
        self.violations = violations

    @classmethod
    def single(cls, status: int, rule: Rule, expression: str, **fields: str) -> OutcomeError:
        return cls(status, [Violation(rule, expression, rule.text.format(**fields))])

    def outcome(self) -> dict[str, Any]:
        return {
            "resourceType": "OperationOutcome",
            "text": {"status": "generated"},
            "issue": [v.issue() for v in self.violations],
        }


class Platform:
    """SATUSEHAT's FHIR store as one organisation's client sees it."""

    def __init__(
        self,
        config: SimulatorConfig,
        store: Store,
        faults: Faults | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.store = store
        self.faults = faults or Faults()
        self.registry = Registry.seeded(config.org_id, list(config.registry_files))
        self._clock = clock
        # Duplicate check and insert must be one step, or two racing POSTs both get through.
        self._write_lock = threading.Lock()
        self._own_identifier_types = {
            rules.SYS_IDS + pattern.format(org=config.org_id): types for pattern, types in _OWN_IDENTIFIER.items()
        }

    def create(self, resource: Any, resource_type: str | None = None) -> dict[str, Any]:
        """POST: validate and store under a new id. `resource_type` is the URL's type, if any."""
        body = self._as_resource(resource, resource_type)
        kind = body["resourceType"]
        body = {k: v for k, v in body.items() if k not in ("id", "meta")}
        self._validate(kind, body)
        with self._write_lock:
            self._refuse_duplicates(kind, body, own_id=None)
            return self.store.create(body)

    def update(self, resource_type: str, resource_id: str, resource: Any) -> dict[str, Any]:
        """PUT: the body must carry the id (SATUSEHAT answers 'id is required'), and the resource must exist."""
        body = self._as_resource(resource, resource_type)
        if not body.get("id"):
            raise OutcomeError.single(400, rules.ID_REQUIRED, f"{resource_type}.id")
        if body["id"] != resource_id:
            raise OutcomeError.single(
                400, rules.ID_MISMATCH, f"{resource_type}.id", body_id=str(body["id"]), url_id=resource_id
            )
        body = {k: v for k, v in body.items() if k != "meta"}
        self._validate(resource_type, body)
        with self._write_lock:
            if not self.store.exists(resource_type, resource_id):
                reference = f"{resource_type}/{resource_id}"
                raise OutcomeError.single(404, rules.NOT_FOUND, resource_type, reference=reference)
            self._refuse_duplicates(resource_type, body, own_id=resource_id)
            return self.store.update(body)

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        self._require_supported(resource_type)
        found = self.store.read(resource_type, resource_id)
        if found is None:
            reference = f"{resource_type}/{resource_id}"
            raise OutcomeError.single(404, rules.NOT_FOUND, resource_type, reference=reference)
        return found

    def search(self, resource_type: str, params: list[tuple[str, str]], base_url: str = "") -> dict[str, Any]:
        """A searchset Bundle, FHIR search semantics as the platform applies them: simulator/search.py.

        Raises search.SearchError for a `_sort` / `_count` it cannot evaluate.
        """
        self._require_supported(resource_type)
        query = search.parse(params)
        return search.bundle(resource_type, params, search.run(self.store, resource_type, query), query, base_url)

    # --- internals ---------------------------------------------------------------------------------------

    def _as_resource(self, resource: Any, resource_type: str | None) -> dict[str, Any]:
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            kind = resource_type or "FHIR"
            raise OutcomeError.single(400, rules.INVALID_PAYLOAD, kind, resource=kind)
        kind = resource["resourceType"]
        if resource_type is not None and kind != resource_type:
            raise OutcomeError.single(
                400, rules.INVALID_PAYLOAD, f"{resource_type}.resourceType", resource=resource_type
            )
        self._require_supported(kind)
        return resource

    def _require_supported(self, resource_type: str) -> None:
        if resource_type not in rules.SUPPORTED_TYPES:
            raise OutcomeError.single(400, rules.UNSUPPORTED_TYPE, resource_type, resource=resource_type)

    def _validate(self, resource_type: str, body: dict[str, Any]) -> None:
        """The catalogue's rules (simulator/catalogue.py), applied by simulator.rules."""
        context = rules.Context(
            org_id=self.config.org_id,
            now=self._clock(),
            clock_skew_s=self.config.clock_skew_s,
            registry=self.registry,
            read=self.store.read,
            strict_undocumented=self.config.strict_undocumented,
        )
        violations = rules.check(resource_type, body, context)
        if violations:
            raise OutcomeError(400, violations)

    def _refuse_duplicates(self, resource_type: str, body: dict[str, Any], own_id: str | None) -> None:
        """A resource's own identifier (encounter/{org}, servicerequest/{org}, ...) is unique: rule 20002.

        Only the resource's own identifier: several ServiceRequests may share an ACSN (the official router then
        takes the newest), and the router's ImagingStudy is found by search and replaced, not refused.
        """
        for index, ident in enumerate(body.get("identifier") or []):
            system, value = ident.get("system"), ident.get("value")
            if not value or resource_type not in self._own_identifier_types.get(system, ()):
                continue
            holders = self.store.find_by_identifier(resource_type, system, value)
            if any(holder["id"] != own_id for holder in holders):
                raise OutcomeError.single(
                    400, rules.DUPLICATE, f"{resource_type}.identifier[{index}]", resource=resource_type
                )


_OWN_IDENTIFIER: dict[str, tuple[str, ...]] = {
    "encounter/{org}": ("Encounter",),
    "servicerequest/{org}": ("ServiceRequest",),
    "observation/{org}": ("Observation",),
    "diagnostic/{org}/rad": ("DiagnosticReport",),
    "diagnostic/{org}/lab": ("DiagnosticReport",),
}
"""Identifier systems that name one resource each, and the types they belong to."""
