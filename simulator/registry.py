"""The platform's registries as the simulator has them: Patient, Practitioner, Location and Organization.

On SATUSEHAT these come from the master indexes (people by NIK -> IHS number, the facility's Locations and
Organizations); a client references them, it does not create them. Here they are seeded with a small synthetic
set (`registry_seed.json`, which includes the ids the project's tests, demo and benchmarks use), can be loaded
from a file (`satset simulator --registry FILE`) and extended through `POST /admin/registry`.

Id formats (satusehat.md 2, "IHS number formats"): Patient `P` + 11 digits (production/dev) or a 12-digit sandbox
number; Practitioner 11 digits or `N` + digits (sandbox dummy); Location a UUID; Organization digits. An entry
whose id does not have its kind's format is refused when loaded.

File format (JSON): {"Patient": [{"id", "nik", "name"}], "Practitioner": [{"id", "nik", "name"}],
"Location": [{"id", "name"}], "Organization": [{"id", "name"}]} (any kind may be absent).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("Patient", "Practitioner", "Location", "Organization")
NIK_SYSTEM = "https://fhir.kemkes.go.id/id/nik"
SEED_FILE = Path(__file__).resolve().parent / "registry_seed.json"

ID_FORMATS: dict[str, re.Pattern[str]] = {
    "Patient": re.compile(r"^(P\d{11}|\d{12})$"),
    "Practitioner": re.compile(r"^(\d{11}|N\d{1,11})$"),
    "Location": re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
    "Organization": re.compile(r"^\d{6,12}$"),
}
_NIK = re.compile(r"^\d{16}$")


class RegistryError(ValueError):
    """A registry entry that cannot be loaded: names the kind, the entry and the rule it breaks."""


@dataclass(frozen=True)
class Entry:
    kind: str
    id: str
    name: str
    nik: str | None = None

    def resource(self) -> dict[str, Any]:
        """The entry as the platform answers it in a search (id, identifier, name[].text; no other data)."""
        body: dict[str, Any] = {"resourceType": self.kind, "id": self.id, "name": self.name}
        if self.kind in ("Patient", "Practitioner"):
            body["name"] = [{"use": "official", "text": self.name}]
            body["identifier"] = [{"use": "official", "system": NIK_SYSTEM, "value": self.nik}] if self.nik else []
            body["active"] = True
        return body


class Registry:
    """Entries by kind and id, searchable by NIK; safe to extend while the simulator serves requests."""

    def __init__(self, own_org_id: str) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._lock = threading.Lock()
        self.own_org_id = own_org_id
        self.add({"Organization": [{"id": own_org_id, "name": "This client's organization"}]})

    @classmethod
    def seeded(cls, own_org_id: str, files: list[Path] | None = None) -> Registry:
        """The synthetic seed, then each file in turn."""
        registry = cls(own_org_id)
        registry.load(SEED_FILE)
        for path in files or []:
            registry.load(path)
        return registry

    def load(self, path: Path) -> int:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RegistryError(f"registry file {path}: {error}") from None
        return self.add(data)

    def add(self, data: Any) -> int:
        """Add (or replace) entries; all or nothing. Returns how many were added."""
        if not isinstance(data, dict) or {k for k in data if not k.startswith("_")} - set(KINDS):
            raise RegistryError(f"a registry is an object with the keys {', '.join(KINDS)}")
        entries = [self._entry(kind, item) for kind in KINDS for item in data.get(kind) or []]
        with self._lock:
            for entry in entries:
                self._entries[entry.kind][entry.id] = entry
        return len(entries)

    def has(self, kind: str, ident: str) -> bool:
        with self._lock:
            return ident in self._entries.get(kind, {})

    def get(self, kind: str, ident: str) -> Entry | None:
        with self._lock:
            return self._entries.get(kind, {}).get(ident)

    def by_nik(self, kind: str, nik: str) -> list[Entry]:
        with self._lock:
            return [entry for entry in self._entries.get(kind, {}).values() if entry.nik == nik]

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            return {
                kind: [{k: v for k, v in vars(e).items() if k != "kind" and v is not None} for e in entries.values()]
                for kind, entries in self._entries.items()
            }

    @staticmethod
    def _entry(kind: str, item: Any) -> Entry:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise RegistryError(f"{kind} entry {item!r}: needs a string id")
        ident = item["id"]
        if not ID_FORMATS[kind].match(ident):
            raise RegistryError(f"{kind} entry {ident!r}: id does not have the platform's format for a {kind}")
        nik = item.get("nik")
        if nik is not None and (kind not in ("Patient", "Practitioner") or not _NIK.match(str(nik))):
            raise RegistryError(f"{kind} entry {ident!r}: nik must be 16 digits (Patient and Practitioner only)")
        return Entry(kind, ident, str(item.get("name") or f"{kind} {ident}"), None if nik is None else str(nik))
