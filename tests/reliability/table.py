"""The reliability table: each fault test appends its row here, and `render` puts every row into docs/reliability.md.

    SATSET_RELIABILITY_OUT=var/reliability .venv/bin/pytest tests/reliability
    .venv/bin/python -m tests.reliability.table render var/reliability

A row is one JSON object per line in `$SATSET_RELIABILITY_OUT/<name>.jsonl`: fault, orders, done, failed (a count,
or the count with the reasons recorded), lost, duplicated. Rows are written only when the variable is set, so an
ordinary test run leaves nothing behind. Rendering reads every `*.jsonl` of the folder (faults.jsonl first, the
others in name order, rows in file order; a fault seen twice keeps its last row, so a re-run replaces its rows) and
rewrites what lies between the markers of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OUT_ENV = "SATSET_RELIABILITY_OUT"
START = "<!-- fault-table:start -->"
END = "<!-- fault-table:end -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
FAULTS = "faults"
"""The fault matrix's file (tests/reliability/test_faults.py): its rows come first."""
COLUMNS = ("fault", "orders", "done", "failed", "lost", "duplicated")
HEADERS = ("fault", "orders", "done", "failed (with the reason recorded)", "lost", "duplicated")
OPTIONAL = ("wrong_patient",)
"""Measured by the integrity tests (tests/integrity): resources linked to a resource of another patient; rows of
suites that do not measure it show a dash."""
OPTIONAL_HEADERS = ("linked to another patient",)


def append_row(name: str, row: Mapping[str, Any]) -> Path | None:
    """Append `row` to `$SATSET_RELIABILITY_OUT/<name>.jsonl`; a no-op (None) when the variable is not set."""
    folder = os.environ.get(OUT_ENV, "").strip()
    if not folder:
        return None
    missing = [column for column in COLUMNS if column not in row]
    if missing:
        raise ValueError(f"a reliability row needs {', '.join(missing)}")
    path = Path(folder) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return path


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """Every row of every *.jsonl in `folder` (faults.jsonl first, then by name); a fault listed twice keeps its
    last row, in its first place."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.jsonl"), key=lambda path: (path.stem != FAULTS, path.name)):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            rows[str(row["fault"])] = row
    return list(rows.values())


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table (pipes in the text escaped)."""
    lines = ["| " + " | ".join(HEADERS + OPTIONAL_HEADERS) + " |", "|---|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        cells = [_cell(row.get(column, "")) for column in COLUMNS] + [_cell(row.get(c, "–")) for c in OPTIONAL]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(folder: Path, doc: Path = DOC) -> int:
    """Put the rows of `folder` between the markers of `doc`; returns how many rows were written."""
    rows = read_rows(folder)
    if not rows:
        raise SystemExit(f"no rows in {folder}/*.jsonl: run the tests with {OUT_ENV}={folder} first")
    text = doc.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{doc} has no {START} ... {END} markers")
    doc.write_text(text[: start + len(START)] + "\n" + markdown(rows) + "\n" + text[end:], encoding="utf-8")
    return len(rows)


def _cell(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "render":
        print("usage: python -m tests.reliability.table render DIR", file=sys.stderr)
        return 2
    count = render(Path(argv[1]))
    print(f"{count} rows written to {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
