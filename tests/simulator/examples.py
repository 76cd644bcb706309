"""The public SATUSEHAT example payloads (shared/research/satusehat_examples/), re-pointed at this simulator.

The examples name the sandbox org 10000004 (or a production org) and resources that exist only on the real
platform; `example()` swaps in the test org and the ids of resources created earlier in the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "satusehat_examples"

VALID = {
    "Encounter": "encounter__sid-indonesia__Example-Encounter-Registration-Payload.json",
    "ServiceRequest": "servicerequest__sid-indonesia__TB-ServiceRequest-Create-Permintaan-Chest-Xray-1.json",
    "ImagingStudy": "imagingstudy__edycoleee-flask-dicomrouter-dcm__README-router-created-response.json",
    "Observation": "observation__sid-indonesia__TB-Observation-Create-Hasil-Temuan-Radiologi-1.json",
    "DiagnosticReport": "diagnosticreport__sid-indonesia__TB-DiagnosticReport-Create-Report-Radiologi-1.json",
}
"""The examples INDEX.md lists as the current radiology shapes; the others are older variants (see the tests)."""

_FOREIGN_ORGS = ("10000004", "100025702")
_MASKED = {"Patient/P00284578---": "Patient/100000030009"}
"""Ids the examples' authors masked, pointed at the registry's sandbox patient (the one the chain's orders name)."""


def load(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES_DIR / name).read_text())


def example(name: str, org_id: str, refs: dict[str, str] | None = None) -> dict[str, Any]:
    """The example with `org_id` in identifier systems and Organization references, placeholders filled, and each
    reference to Encounter/ServiceRequest/ImagingStudy/Observation pointed at `refs[type]`."""
    text = (EXAMPLES_DIR / name).read_text()
    text = text.replace("{{DOCTOR_IHS_NUMBER}}", "N10000001").replace("{{FACILITY_IHS_NUMBER}}", org_id)
    for masked, registered in _MASKED.items():
        text = text.replace(masked, registered)
    for foreign in _FOREIGN_ORGS:
        text = text.replace(f"/{foreign}", f"/{org_id}").replace(f"Organization/{foreign}", f"Organization/{org_id}")
    resource: dict[str, Any] = json.loads(text)
    resource.pop("id", None)
    resource.pop("meta", None)
    _repoint(resource, refs or {})
    return resource


def _repoint(node: Any, refs: dict[str, str]) -> None:
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str) and "/" in reference:
            kind = reference.split("/", 1)[0]
            if kind in refs:
                node["reference"] = f"{kind}/{refs[kind]}"
        for value in node.values():
            _repoint(value, refs)
    elif isinstance(node, list):
        for value in node:
            _repoint(value, refs)
