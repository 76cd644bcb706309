"""The code systems the simulator checks, with the codes it knows: data files here, one CSV per system.

`systems.csv` names each system; `<name>.csv` lists its codes (code, display, source). A coding in one of these
systems whose code is not listed is refused (simulator.rules); codings in other systems are not checked here.
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent


@cache
def systems() -> dict[str, dict[str, str]]:
    """system URI -> {code: display} for every checked system."""
    known: dict[str, dict[str, str]] = {}
    with (DIRECTORY / "systems.csv").open(newline="") as index:
        for row in csv.DictReader(index):
            with (DIRECTORY / f"{row['name']}.csv").open(newline="") as table:
                known[row["system"]] = {entry["code"]: entry["display"] for entry in csv.DictReader(table)}
    return known


def is_checked(system: str) -> bool:
    return system in systems()


def knows(system: str, code: str) -> bool:
    return code in systems().get(system, {})
