"""`satset check`: find a misconfiguration in seconds, before anything is created (clients/health.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from prefect.settings import PREFECT_API_URL

from clients.health import Check, run_checks
from models.settings import SettingsError, load_settings


def check(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: every check with its fields.")] = False,
) -> None:
    """Try every part once: TEMP_DIR, the PACS, the SATUSEHAT token, the clock, the router, Prefect, the RIS table.

    One line per check with its time and, for a failure, the setting to fix. Exits 1 when any check failed.
    """
    try:
        settings = load_settings()
    except SettingsError as error:
        failed = Check("settings", False, 0.0, str(error), "the variable named")
        _report([failed], as_json)
        raise typer.Exit(1) from None
    checks = run_checks(settings, prefect_api_url=PREFECT_API_URL.value())
    _report(checks, as_json)
    if not all(item.ok for item in checks):
        raise typer.Exit(1)


def _report(checks: list[Check], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"ok": all(c.ok for c in checks), "checks": [c.as_json() for c in checks]}, indent=2))
        return
    for item in checks:
        mark = "skip" if item.skipped else ("ok" if item.ok else "FAIL")
        fix = f"  -> check {item.setting}" if not item.ok and item.setting else ""
        typer.echo(f"{mark:<4} {item.name:<16} {item.seconds:6.2f} s  {item.detail}{fix}")
