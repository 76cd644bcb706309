"""The simulator's state: FHIR resources with their identifiers, issued tokens and an event log, in SQLite.

A file survives restarts (`satset simulator --db FILE`); `:memory:` serves the tests. One connection behind a
lock is plenty for a simulator and keeps the ordering of `_lastUpdated` exact.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (type, id)
);
CREATE TABLE IF NOT EXISTS identifiers (
    type TEXT NOT NULL,
    system TEXT NOT NULL,
    value TEXT NOT NULL,
    id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS identifiers_lookup ON identifiers (type, system, value);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Event:
    """Something the platform did that a caller cannot see in a response (the router's work, mostly)."""

    seq: int
    at: str
    kind: str
    detail: dict[str, Any]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _version_id(moment: dt.datetime) -> str:
    """SATUSEHAT's versionId is the base64 of the update time in nanoseconds, unpadded."""
    nanos = int(moment.timestamp() * 1_000_000) * 1000
    return base64.b64encode(str(nanos).encode()).decode().rstrip("=")


class Store:
    """Resources by type and id, searchable by identifier, subject and basedOn; tokens; events."""

    def __init__(self, path: Path | None = None) -> None:
        target = str(path) if path else ":memory:"
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL" if path else "PRAGMA journal_mode=MEMORY")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- resources -------------------------------------------------------------------------------------

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Store a new resource under a fresh UUID with meta.versionId and meta.lastUpdated; return it."""
        with self._lock:
            stored = self._stamp({**resource, "id": str(uuid.uuid4())})
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO resources (type, id, body) VALUES (?, ?, ?)",
                (stored["resourceType"], stored["id"], json.dumps(stored)),
            )
            self._index(stored)
            self._db.execute("COMMIT")
            return stored

    def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Replace an existing resource (same type and id); the caller has checked that it exists."""
        with self._lock:
            stored = self._stamp(resource)
            self._db.execute("BEGIN")
            # A new seq keeps _sort=-_lastUpdated exact: the newest write sorts first.
            self._db.execute("DELETE FROM resources WHERE type = ? AND id = ?", (stored["resourceType"], stored["id"]))
            self._db.execute(
                "INSERT INTO resources (type, id, body) VALUES (?, ?, ?)",
                (stored["resourceType"], stored["id"], json.dumps(stored)),
            )
            self._db.execute(
                "DELETE FROM identifiers WHERE type = ? AND id = ?", (stored["resourceType"], stored["id"])
            )
            self._index(stored)
            self._db.execute("COMMIT")
            return stored

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM resources WHERE type = ? AND id = ?", (resource_type, resource_id)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def exists(self, resource_type: str, resource_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM resources WHERE type = ? AND id = ?", (resource_type, resource_id)
            ).fetchone()
        return row is not None

    def find_by_identifier(self, resource_type: str, system: str | None, value: str) -> list[dict[str, Any]]:
        """Resources of a type carrying the identifier, newest first. system None matches any system."""
        return self.find_by_identifiers(resource_type, [(system, value)])

    def find_by_identifiers(
        self, resource_type: str, identifiers: Sequence[tuple[str | None, str]]
    ) -> list[dict[str, Any]]:
        """Resources carrying any of the (system, value) identifiers (system None: any), newest first, once each.

        One query, so an OR search (`identifier=sys|A,B`) keeps the store's exact newest-first order.
        """
        if not identifiers:
            return []
        conditions: list[str] = []
        args: list[Any] = [resource_type]
        for system, value in identifiers:
            if system is None:
                conditions.append("i.value = ?")
                args.append(value)
            else:
                conditions.append("(i.system = ? AND i.value = ?)")
                args.extend((system, value))
        query = (
            "SELECT r.body FROM resources r JOIN identifiers i ON i.type = r.type AND i.id = r.id "
            f"WHERE r.type = ? AND ({' OR '.join(conditions)}) GROUP BY r.seq ORDER BY r.seq DESC"
        )
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [json.loads(row[0]) for row in rows]

    def all(self, resource_type: str) -> list[dict[str, Any]]:
        """Every resource of a type, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM resources WHERE type = ? ORDER BY seq DESC", (resource_type,)
            ).fetchall()
        return [json.loads(row[0]) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT type, COUNT(*) FROM resources GROUP BY type").fetchall()
        return dict(rows)

    def reset(self) -> None:
        """Forget everything (tests and demos start clean without restarting the process)."""
        with self._lock:
            self._db.executescript(
                "DELETE FROM resources; DELETE FROM identifiers; DELETE FROM tokens; DELETE FROM events;"
            )

    def _stamp(self, resource: dict[str, Any]) -> dict[str, Any]:
        moment = _now()
        meta = {**resource.get("meta", {}), "lastUpdated": moment.isoformat(), "versionId": _version_id(moment)}
        return {**resource, "meta": meta}

    def _index(self, resource: dict[str, Any]) -> None:
        rows = [
            (resource["resourceType"], ident["system"], ident["value"], resource["id"])
            for ident in resource.get("identifier", [])
            if isinstance(ident, dict) and ident.get("system") and ident.get("value")
        ]
        self._db.executemany("INSERT INTO identifiers (type, system, value, id) VALUES (?, ?, ?, ?)", rows)

    # --- tokens ----------------------------------------------------------------------------------------

    def issue_token(self, client_id: str, ttl_s: float) -> tuple[str, float]:
        """A new opaque bearer token; returns it with its issue time (epoch seconds)."""
        token = base64.urlsafe_b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode().rstrip("=")
        issued = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO tokens (token, client_id, expires_at) VALUES (?, ?, ?)", (token, client_id, issued + ttl_s)
            )
        return token, issued

    def token_valid(self, token: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT expires_at FROM tokens WHERE token = ?", (token,)).fetchone()
        return row is not None and row[0] > time.time()

    def expire_tokens(self) -> int:
        """Make every issued token expired at once (fault injection: 'tokens expired mid-flow')."""
        with self._lock:
            return self._db.execute("UPDATE tokens SET expires_at = 0").rowcount

    def token_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0]

    # --- events ----------------------------------------------------------------------------------------

    def log_event(self, kind: str, **detail: Any) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)", (_now().isoformat(), kind, json.dumps(detail))
            )

    def events(self, kinds: Iterable[str] | None = None, after: int = 0) -> list[Event]:
        with self._lock:
            rows = self._db.execute("SELECT seq, at, kind, detail FROM events WHERE seq > ? ORDER BY seq", (after,))
            found = [Event(seq, at, kind, json.loads(detail)) for seq, at, kind, detail in rows.fetchall()]
        wanted = set(kinds) if kinds is not None else None
        return [event for event in found if wanted is None or event.kind in wanted]
