"""The summary each flow run publishes to the Prefect UI: ids, counts and durations, never patient data."""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import acreate_markdown_artifact


def artifact_key(flow: str, accession_number: str | None) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes; one key per order gives it a history."""
    suffix = re.sub(r"[^a-z0-9]+", "-", (accession_number or "").lower()).strip("-")
    return f"{flow}-{suffix}" if suffix else flow


async def publish_summary(
    flow: str, accession_number: str | None, outcome: dict[str, Any], durations_s: dict[str, float]
) -> None:
    """A markdown table: every id created or adopted, counts, and how long each step took."""
    rows = [f"| {key} | `{value}` |" for key, value in _flatten(outcome)]
    timing = [f"| {step} | {seconds:.3f} s |" for step, seconds in durations_s.items()]
    markdown = "\n".join(
        [
            f"### {flow}" + (f" — ACSN {accession_number}" if accession_number else ""),
            "",
            "| result | value |",
            "|---|---|",
            *rows,
            "",
            "| step | duration |",
            "|---|---|",
            *timing,
        ]
    )
    await acreate_markdown_artifact(
        markdown=markdown, key=artifact_key(flow, accession_number), description=f"{flow} summary"
    )


def _flatten(outcome: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in outcome.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):  # e.g. the corrections a re-send made: revised.0.resource ...
                rows.extend(_flatten(item, f"{prefix}{key}.{index}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows
