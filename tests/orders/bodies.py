"""Batch bodies as a HIS sends them, with unique accession numbers; no Orthanc needed (UIDs are made up)."""

from __future__ import annotations

import uuid
from typing import Any

PATIENT_NAME = "Budi Santoso"
"""Sent as subject_display by every body here: it must never be stored, logged or shown."""


def accession() -> str:
    return "R" + uuid.uuid4().hex[:15].upper()


def body(batch: int, **overrides: Any) -> dict[str, Any]:
    """A valid body for `batch` (1-4), the existing gateway's example values, patient name included."""
    common = {
        "identifier_value": "RG" + uuid.uuid4().hex[:12].upper(),
        "subject_id": "P10443013727",
        "subject_display": PATIENT_NAME,
        "period_start": "2025-08-01T05:57:41+00:00",
        "noacsn": accession(),
    }
    order = {"individual_id": "10016869420"}
    reading = {
        "performer_id": "10000504193",
        "performer_value": "Tidak tampak kelainan",
        "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
    }
    links = {
        "encounter_id": str(uuid.uuid4()),
        "service_request_id": str(uuid.uuid4()),
        "imaging_study_id": str(uuid.uuid4()),
    }
    study = {"study": f"2.25.{uuid.uuid4().int}"}
    parts = {
        1: {**common, **order},
        2: {**common, **reading, **links},
        3: {**common, **order, **reading},
        4: {**common, **order, **reading, **study},
    }
    return {**parts[batch], **overrides}
