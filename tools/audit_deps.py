"""Dependency audit: every pin of requirements.lock against the advisories PyPI publishes, as a Markdown report.

    .venv/bin/python tools/audit_deps.py [--lock requirements.lock] [--out docs/dependency-audit.md]

Exit 1 when a known vulnerability affects a pinned version, else 0 (packages that could not be checked are listed,
not failed: a registry that is briefly unreachable must not block CI, and the report says what went unchecked).

Why not pip-audit: its vulnerability services are OSV (api.osv.dev) and PyPI's per-version JSON
(`/pypi/<name>/<version>/json`); on the machines this project builds on the first is unreachable and the second
answers 404 for every version, so pip-audit reports every package as "not found on PyPI" and exits 0 having
checked nothing. PyPI's project JSON (`/pypi/<name>/json`) does answer, with a `vulnerabilities` list, so this tool
uses that, and states the limit of that source in every report:

* The project JSON lists the advisories (OSV records: `id`, `aliases`, `fixed_in`, `withdrawn`, `link`, ...) that
  affect the project's **latest** release. When the pin is the latest release, that is exactly the pin's list.
* When the pin is older (or newer, a pre-release), an advisory still open at the latest release is presumed to
  affect the pin too, unless `fixed_in` names a version that fixes the pin's own line (same major.minor, at or
  below the pin) or one above the latest release at or below the pin. Advisories fixed between the pin and the
  latest release are not in this source at all: such a pin is reported as *partly checked*, never as clean.
* A withdrawn advisory is ignored. A yanked pin is reported (not failed).

Standard library plus `packaging` (already a dependency of the project).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

DEFAULT_INDEX = "https://pypi.org/pypi"
DEFAULT_LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
TIMEOUT_S = 20.0
TRIES = 3
WORKERS = 8

CHECKED = "checked"
"""The pin is the latest release: PyPI's list is the pin's own."""
PARTLY = "partly checked"
"""The pin is not the latest release: only advisories still open at the latest release can be seen."""

Fetch = Callable[[str], Mapping[str, Any]]
"""Project name → the project's JSON document; raises Unavailable (or any OSError) when it cannot be had."""


class Unavailable(Exception):
    """The project's JSON could not be fetched (HTTP error, network, not JSON); the message says why."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    line: int


@dataclass(frozen=True)
class Advisory:
    id: str
    aliases: tuple[str, ...]
    fixed_in: tuple[str, ...]
    link: str
    summary: str

    @property
    def names(self) -> str:
        return ", ".join((self.id, *self.aliases))


@dataclass
class Assessment:
    """The verdict on one pin."""

    pin: Pin
    coverage: str = ""
    """CHECKED, PARTLY, or the reason it could not be checked."""
    latest: str | None = None
    affecting: list[Advisory] = field(default_factory=list)
    fixed_at_pin: list[Advisory] = field(default_factory=list)
    """Advisories open at the latest release whose fix the pin already has (a maintenance line)."""
    yanked: str | None = None

    @property
    def checked(self) -> bool:
        return self.coverage in (CHECKED, PARTLY)


# --- reading the lock file -------------------------------------------------------------------------------------


def parse_lock(text: str) -> tuple[list[Pin], list[tuple[int, str]]]:
    """(pins, lines that are requirements but not `name==version` pins) from a requirements file.

    Comments, blank lines, options (`--hash`, `-r`, `--index-url`) and environment markers are understood; an
    `-e`/URL requirement or a range is returned as not pinned, as this audit cannot say which version runs."""
    pins: list[Pin] = []
    unpinned: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            if line.startswith(("-e", "--editable")):
                unpinned.append((number, line))
            continue
        requirement = line.split(";", 1)[0].split(" --hash", 1)[0].strip().rstrip("\\").strip()
        name, operator, version = requirement.partition("==")
        name = name.split("[", 1)[0].strip()
        if not operator or not name or not version.strip() or any(c in version for c in "<>=!~,*"):
            unpinned.append((number, line))
            continue
        pins.append(Pin(str(canonicalize_name(name)), version.strip(), number))
    return pins, unpinned


# --- deciding -------------------------------------------------------------------------------------------------


def advisories(document: Mapping[str, Any]) -> list[Advisory]:
    """The advisories of a project JSON document, withdrawn ones left out."""
    found = []
    for item in document.get("vulnerabilities") or []:
        if item.get("withdrawn"):
            continue
        found.append(
            Advisory(
                id=str(item.get("id") or "?"),
                aliases=tuple(str(a) for a in item.get("aliases") or ()),
                fixed_in=tuple(str(v) for v in item.get("fixed_in") or ()),
                link=str(item.get("link") or ""),
                summary=" ".join(str(item.get("summary") or item.get("details") or "").split())[:160],
            )
        )
    return found


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def fixes_pin(advisory: Advisory, pin: Version, latest: Version) -> bool:
    """Does a version in `fixed_in` fix `pin`, given that the advisory is open at `latest`?

    A fixed version at or below the pin fixes it when it is on the pin's own line (same major.minor: a backport
    the pin already has) or above the latest release (the pin is a pre-release past the fix). A fix at or below
    the pin on another line says nothing about the pin: the advisory is open at the latest release, so the fix
    did not carry over, and the pin is presumed affected."""
    for text in advisory.fixed_in:
        fixed = _version(text)
        if fixed is None or fixed > pin:
            continue
        if fixed.release[:2] == pin.release[:2] or fixed > latest:
            return True
    return False


def assess(pin: Pin, document: Mapping[str, Any]) -> Assessment:
    """The verdict on `pin` from its project's JSON document (see the module's docstring for the rules)."""
    result = Assessment(pin)
    latest_text = str((document.get("info") or {}).get("version") or "")
    result.latest = latest_text or None
    pinned, latest = _version(pin.version), _version(latest_text)
    if pinned is None:
        result.coverage = f"the pin {pin.version!r} is not a version PEP 440 understands"
        return result
    if latest is None:
        result.coverage = "PyPI's answer names no latest release"
        return result
    releases = document.get("releases")
    if isinstance(releases, Mapping) and releases:
        files = next((files for version, files in releases.items() if _version(version) == pinned), None)
        if files is None:
            result.coverage = f"PyPI lists no release {pin.version}"
            return result
        if files and all(f.get("yanked") for f in files):
            result.yanked = next((f.get("yanked_reason") for f in files if f.get("yanked_reason")), None) or "yanked"
    result.coverage = CHECKED if pinned == latest else PARTLY
    for advisory in advisories(document):
        if pinned != latest and fixes_pin(advisory, pinned, latest):
            result.fixed_at_pin.append(advisory)
        else:
            result.affecting.append(advisory)
    return result


# --- fetching -------------------------------------------------------------------------------------------------


def pypi_fetcher(index: str = DEFAULT_INDEX, timeout_s: float = TIMEOUT_S, tries: int = TRIES) -> Fetch:
    """Fetch `<index>/<name>/json`, retrying network errors and 5xx; a 404 is final."""

    def fetch(name: str) -> Mapping[str, Any]:
        url = f"{index.rstrip('/')}/{name}/json"
        problem = ""
        for attempt in range(tries):
            if attempt:
                time.sleep(attempt)
            try:
                request = urllib.request.Request(url, headers={"Accept": "application/json"})
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    document = json.loads(response.read())
            except urllib.error.HTTPError as error:
                problem = f"HTTP {error.code} from {url}"
                if error.code < 500 and error.code != 429:
                    break
                continue
            except (urllib.error.URLError, OSError) as error:
                problem = f"{url}: {getattr(error, 'reason', error)}"
                continue
            except json.JSONDecodeError:
                problem = f"{url} did not answer JSON"
                continue
            if not isinstance(document, Mapping):
                raise Unavailable(f"{url} answered JSON that is not an object")
            return document
        raise Unavailable(problem)

    return fetch


def audit(pins: Sequence[Pin], fetch: Fetch, workers: int = WORKERS) -> list[Assessment]:
    """Assess every pin (fetching in parallel); a fetch that fails leaves that pin unchecked with the reason."""

    def one(pin: Pin) -> Assessment:
        try:
            document = fetch(pin.name)
        except (Unavailable, OSError, ValueError) as error:
            return Assessment(pin, coverage=f"not checked: {error}")
        return assess(pin, document)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, pins))


# --- reporting ------------------------------------------------------------------------------------------------


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def report(
    assessments: Sequence[Assessment],
    unpinned: Iterable[tuple[int, str]] = (),
    *,
    lock_name: str = "requirements.lock",
    source: str = DEFAULT_INDEX,
    when: dt.datetime | None = None,
) -> str:
    """The Markdown report: the verdict first, then what affects a pin, what could not be checked, every pin."""
    when = when or dt.datetime.now(dt.UTC)
    unpinned = list(unpinned)
    affected = [a for a in assessments if a.affecting]
    checked = [a for a in assessments if a.coverage == CHECKED]
    partly = [a for a in assessments if a.coverage == PARTLY]
    unchecked = [a for a in assessments if not a.checked]
    yanked = [a for a in assessments if a.yanked]
    verdict = (
        f"**{sum(len(a.affecting) for a in affected)} known vulnerabilities affect {len(affected)} pinned package(s).**"
        if affected
        else "**No known vulnerability affects a pinned version** (within what this source can show; see below)."
    )
    lines = [
        "# Dependency audit",
        "",
        f"Run {when:%Y-%m-%d %H:%M} UTC by `tools/audit_deps.py` over `{lock_name}` ({len(assessments)} pins), "
        f"against PyPI's project JSON (`{source}/<name>/json`, its `vulnerabilities` list: OSV advisories).",
        "",
        verdict,
        "",
        f"* fully checked (the pin is the latest release): {len(checked)}",
        f"* partly checked (the pin is not the latest release): {len(partly)}",
        f"* not checked: {len(unchecked) + len(unpinned)}",
        f"* yanked pins: {len(yanked)}",
        "",
        "What this source can show: PyPI lists the advisories that affect a project's *latest* release. For a pin "
        "that is the latest release that is its complete list. For an older pin, an advisory still open at the "
        "latest release is presumed to affect the pin unless `fixed_in` shows the pin's own line fixed; an "
        "advisory fixed between the pin and the latest release is not listed at all, so a partly checked pin is "
        "not proven clean. (pip-audit is not used: api.osv.dev is unreachable from the build machines and PyPI's "
        "per-version JSON answers 404, so it would check nothing and pass.)",
    ]
    if affected:
        lines += ["", "## Vulnerabilities affecting a pin", "", "| package | pinned | advisory | fixed in | link |"]
        lines.append("|---|---|---|---|---|")
        for a in affected:
            for adv in a.affecting:
                fixed = ", ".join(adv.fixed_in) or "no fix published"
                lines.append(f"| {a.pin.name} | {a.pin.version} | {_cell(adv.names)} | {_cell(fixed)} | {adv.link} |")
    if unchecked or unpinned:
        lines += ["", "## Not checked", "", "| requirement | line | why |", "|---|---:|---|"]
        lines += [f"| {a.pin.name}=={a.pin.version} | {a.pin.line} | {_cell(a.coverage)} |" for a in unchecked]
        lines += [f"| {_cell(text)} | {number} | not pinned with == |" for number, text in unpinned]
    if partly:
        lines += ["", "## Partly checked (older than the latest release)", "", "| package | pinned | latest |"]
        lines.append("|---|---|---|")
        lines += [f"| {a.pin.name} | {a.pin.version} | {a.latest} |" for a in sorted(partly, key=lambda a: a.pin.name)]
    if yanked:
        lines += ["", "## Yanked pins", "", "| package | pinned | reason |", "|---|---|---|"]
        lines += [f"| {a.pin.name} | {a.pin.version} | {_cell(a.yanked)} |" for a in yanked]
    lines += ["", "## Every pin", "", "| package | pinned | latest | coverage | advisories affecting the pin |"]
    lines.append("|---|---|---|---|---|")
    for a in sorted(assessments, key=lambda a: a.pin.name):
        found = ", ".join(adv.id for adv in a.affecting) or ("0" if a.checked else "–")
        coverage = a.coverage if a.checked else "not checked"
        lines.append(f"| {a.pin.name} | {a.pin.version} | {a.latest or '–'} | {coverage} | {found} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, fetch: Fetch | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help="requirements file of == pins")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--index", default=DEFAULT_INDEX, help="JSON API root (default %(default)s)")
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args(argv)

    pins, unpinned = parse_lock(args.lock.read_text(encoding="utf-8"))
    assessments = audit(pins, fetch or pypi_fetcher(args.index), workers=args.workers)
    text = report(assessments, unpinned, lock_name=args.lock.name, source=args.index.rstrip("/"))
    sys.stdout.write(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 1 if any(a.affecting for a in assessments) else 0


if __name__ == "__main__":
    raise SystemExit(main())
