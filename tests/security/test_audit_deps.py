"""tools/audit_deps.py decides from PyPI's project JSON: canned documents of the shape PyPI answers, no network."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from tools.audit_deps import (
    CHECKED,
    PARTLY,
    Pin,
    Unavailable,
    assess,
    audit,
    main,
    parse_lock,
    report,
)

ECDSA_MINERVA = {  # as PyPI answers for ecdsa 0.19.2: open at the latest release, no fix published
    "aliases": ["CVE-2024-23342", "GHSA-wj6h-64fc-37mp"],
    "details": "python-ecdsa has been found to be subject to a Minerva timing attack on the P-256 curve.",
    "fixed_in": [],
    "id": "PYSEC-2026-1325",
    "link": "https://osv.dev/vulnerability/PYSEC-2026-1325",
    "source": "osv",
    "summary": None,
    "withdrawn": None,
}


def advisory(id: str, fixed_in: list[str], withdrawn: str | None = None) -> dict[str, Any]:
    return {**ECDSA_MINERVA, "id": id, "aliases": [f"CVE-{id}"], "fixed_in": fixed_in, "withdrawn": withdrawn}


def project(latest: str, vulnerabilities: list[dict[str, Any]], releases: list[str] | None = None) -> dict[str, Any]:
    versions = releases if releases is not None else [latest]
    return {
        "info": {"name": "demo", "version": latest},
        "releases": {v: [{"filename": f"demo-{v}.tar.gz", "yanked": False, "yanked_reason": None}] for v in versions},
        "vulnerabilities": vulnerabilities,
        "urls": [],
    }


def pin(version: str, name: str = "demo") -> Pin:
    return Pin(name, version, 1)


def test_parse_lock_reads_pins_and_names_what_is_not_pinned() -> None:
    text = "\n".join(
        [
            "# Every Python package ... Regenerate with ./dev lock.",
            "Jinja2==3.1.6",
            "fhir.resources==8.3.0  # comment",
            "uvicorn[standard]==0.54.0 ; python_version >= '3.11'",
            "--index-url https://example.invalid/simple",
            "requests>=2.0",
            "pkg==1.0.*",
            "-e .",
            "",
        ]
    )
    pins, unpinned = parse_lock(text)
    assert [(p.name, p.version, p.line) for p in pins] == [
        ("jinja2", "3.1.6", 2),
        ("fhir-resources", "8.3.0", 3),
        ("uvicorn", "0.54.0", 4),
    ]
    assert [number for number, _ in unpinned] == [6, 7, 8]


def test_the_real_lock_file_is_all_pins() -> None:
    pins, unpinned = parse_lock((Path(__file__).resolve().parents[2] / "requirements.lock").read_text())
    assert unpinned == [] and len(pins) > 50


def test_a_pin_at_the_latest_release_is_affected_by_every_advisory_listed() -> None:
    verdict = assess(pin("0.19.2"), project("0.19.2", [ECDSA_MINERVA, advisory("X-1", ["0.20.0"])]))
    assert verdict.coverage == CHECKED
    assert [a.id for a in verdict.affecting] == ["PYSEC-2026-1325", "X-1"]
    assert verdict.affecting[0].names == "PYSEC-2026-1325, CVE-2024-23342, GHSA-wj6h-64fc-37mp"


def test_withdrawn_advisories_are_ignored() -> None:
    verdict = assess(pin("1.0"), project("1.0", [advisory("W-1", [], withdrawn="2025-01-01T00:00:00Z")]))
    assert verdict.coverage == CHECKED and verdict.affecting == []


def test_an_older_pin_is_presumed_affected_by_what_is_open_at_the_latest_release() -> None:
    verdict = assess(pin("2.0.1"), project("2.3.0", [advisory("O-1", ["2.4.0"])], ["2.0.1", "2.3.0"]))
    assert verdict.coverage == PARTLY
    assert [a.id for a in verdict.affecting] == ["O-1"]


def test_a_fix_on_the_pins_own_line_at_or_below_it_clears_the_pin() -> None:
    # urllib3-style backport: open at 2.2.1 (latest), fixed in 1.26.19 on the 1.26 line the pin is on.
    document = project("2.2.1", [advisory("B-1", ["1.26.19", "2.2.2"])], ["1.26.18", "1.26.20", "2.0.0", "2.2.1"])
    fixed_line = assess(pin("1.26.20"), document)
    assert fixed_line.affecting == [] and [a.id for a in fixed_line.fixed_at_pin] == ["B-1"]
    before_the_backport = assess(pin("1.26.18"), document)
    assert [a.id for a in before_the_backport.affecting] == ["B-1"]
    # A fix on another line (1.26.19 <= 2.0.0) says nothing about the 2.0 line: still affected.
    other_line = assess(pin("2.0.0"), document)
    assert [a.id for a in other_line.affecting] == ["B-1"]


def test_a_pre_release_pin_past_the_fix_is_cleared() -> None:
    document = project("1.4.0", [advisory("P-1", ["1.5.0rc1"])], ["1.4.0", "1.5.0rc2"])
    assert assess(pin("1.5.0rc2"), document).affecting == []
    assert [a.id for a in assess(pin("1.4.0"), document).affecting] == ["P-1"]


def test_unknown_versions_and_releases_are_not_checked() -> None:
    assert "PyPI lists no release 9.9" in assess(pin("9.9"), project("1.0", [])).coverage
    assert "PEP 440" in assess(pin("not-a-version"), project("1.0", [])).coverage
    assert "no latest release" in assess(pin("1.0"), {"info": {}, "vulnerabilities": []}).coverage
    assert not assess(pin("9.9"), project("1.0", [])).checked


def test_a_yanked_pin_is_reported() -> None:
    document = project("1.1", [], ["1.0", "1.1"])
    document["releases"]["1.0"] = [{"filename": "demo-1.0.tar.gz", "yanked": True, "yanked_reason": "broken"}]
    assert assess(pin("1.0"), document).yanked == "broken"
    assert assess(pin("1.1"), document).yanked is None


def test_a_fetch_that_fails_leaves_the_pin_unchecked_with_the_reason() -> None:
    def fetch(name: str) -> dict[str, Any]:
        if name == "gone":
            raise Unavailable("HTTP 404 from https://pypi.example/gone/json")
        return project("1.0", [])

    verdicts = audit([pin("1.0", "gone"), pin("1.0", "here")], fetch, workers=2)
    assert [v.checked for v in verdicts] == [False, True]
    assert "HTTP 404" in verdicts[0].coverage


def gone(name: str) -> dict[str, Any]:
    raise Unavailable("HTTP 404")


def test_the_report_names_affected_pins_the_unchecked_and_the_limits_of_the_source() -> None:
    verdicts = [
        assess(pin("0.19.2", "ecdsa"), project("0.19.2", [ECDSA_MINERVA])),
        assess(pin("1.0", "old"), project("2.0", [], ["1.0", "2.0"])),
        audit([pin("1.0", "gone")], gone)[0],
    ]
    text = report(verdicts, [(7, "requests>=2")], when=dt.datetime(2026, 12, 6, 15, 0, tzinfo=dt.UTC))
    assert "Run 2026-12-06 15:00 UTC" in text
    assert "**1 known vulnerabilities affect 1 pinned package(s).**" in text
    assert "| ecdsa | 0.19.2 | PYSEC-2026-1325, CVE-2024-23342, GHSA-wj6h-64fc-37mp | no fix published |" in text
    assert "| gone==1.0 | 1 | not checked: HTTP 404 |" in text and "| requests>=2 | 7 | not pinned with == |" in text
    assert "| old | 1.0 | 2.0 | partly checked | 0 |" in text and "## Partly checked" in text
    assert "not proven clean" in text


def test_main_exits_1_on_an_affected_pin_and_0_otherwise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("ecdsa==0.19.2\nrequests==2.34.2\n")
    documents = {"ecdsa": project("0.19.2", [ECDSA_MINERVA]), "requests": project("2.34.2", [])}
    out = tmp_path / "report" / "audit.md"

    assert main(["--lock", str(lock), "--out", str(out)], fetch=documents.__getitem__) == 1
    assert "PYSEC-2026-1325" in out.read_text() and "PYSEC-2026-1325" in capsys.readouterr().out

    documents["ecdsa"] = project("0.19.2", [])
    assert main(["--lock", str(lock)], fetch=documents.__getitem__) == 0
    assert "No known vulnerability affects a pinned version" in capsys.readouterr().out


def test_main_passes_but_reports_when_the_registry_cannot_be_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("requests==2.34.2\n")

    def unreachable(name: str) -> dict[str, Any]:
        raise OSError("network unreachable")

    assert main(["--lock", str(lock)], fetch=unreachable) == 0
    output = capsys.readouterr().out
    assert "* not checked: 1" in output and "network unreachable" in output
