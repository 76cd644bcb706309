"""deploy/: the systemd units pass `systemd-analyze verify`, the logrotate snippet passes `logrotate --debug`, and
every PREFECT_ variable the env files set is one Prefect reads (a misspelt one would be ignored silently).

The units name the installed paths (/opt/satset, its .venv); `verify` checks that ExecStart is executable, so the
test points those paths at this checkout and the venv running the tests. A machine without systemd-analyze or
logrotate skips those tests; CI (CI=true) fails them instead (./dev installs the `systemd` and `logrotate` packages).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import AliasChoices

from tests.plugins.pacs import require

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
LOGROTATE = ROOT / "deploy" / "logrotate" / "satset"
UNITS = sorted(SYSTEMD.glob("*.service"))
INSTALLED_VENV = "/opt/satset/.venv"
INSTALLED_HOME = "/opt/satset"
ASSIGNMENT = re.compile(r"^#? ?([A-Z][A-Z0-9_]*)=")


def test_there_are_units_for_the_server_serve_worker_and_api() -> None:
    assert {u.name for u in UNITS} == {
        "prefect-server.service",
        "satset-serve.service",
        "satset-worker.service",
        "satset-api.service",
    }


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_each_unit_runs_as_the_gateway_user_restarts_and_reads_an_environment_file(unit: Path) -> None:
    text = unit.read_text()
    for line in ("User=satset", "Group=satset", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert f"\n{line}\n" in text, f"{unit.name}: {line}"
    assert re.search(r"^Restart=(always|on-failure)$", text, re.M), unit.name
    environment_file = re.search(r"^EnvironmentFile=(/etc/satset/\S+)$", text, re.M)
    assert environment_file, unit.name
    shipped = SYSTEMD / Path(environment_file.group(1)).name
    assert shipped.exists() or environment_file.group(1) == "/etc/satset/satset.env", unit.name  # from .env.example


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze (Debian package systemd)")
    venv = str(Path(sys.executable).parent.parent)
    for unit in UNITS:
        text = unit.read_text().replace(INSTALLED_VENV, venv).replace(INSTALLED_HOME, str(ROOT))
        (tmp_path / unit.name).write_text(text)
    checked = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / u.name) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = checked.stdout + checked.stderr
    # Unknown keys and bad values are only warnings (exit 0): any line about our units fails the test.
    ours = [line for line in output.splitlines() if any(u.name in line or str(tmp_path) in line for u in UNITS)]
    assert checked.returncode == 0 and not ours, output


def test_systemd_analyze_verify_is_strict_enough_to_catch_a_misspelt_key(tmp_path: Path) -> None:
    """The check above would pass a unit with a typo if warnings were not read: this proves they are reported."""
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze (Debian package systemd)")
    broken = tmp_path / "broken.service"
    broken.write_text("[Service]\nExecStart=/bin/true\nRestartSek=5\n")
    checked = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=120)
    assert "RestartSek" in checked.stdout + checked.stderr


def test_logrotate_accepts_the_snippet(tmp_path: Path) -> None:
    require(shutil.which("logrotate") is not None, "logrotate (Debian package logrotate)")
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "satset.log").write_text("one line\n")
    text = LOGROTATE.read_text().replace("/var/log/satset", str(logs)).replace("satset satset", f"{user} {group}")
    config = tmp_path / "satset.conf"
    config.write_text(text)
    checked = subprocess.run(
        ["logrotate", "--debug", "--state", str(tmp_path / "state"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0 and "error" not in output.lower(), output
    assert "satset.log" in output  # the pattern matched the log file


def prefect_environment_names() -> set[str]:
    """Every environment variable name Prefect's settings read (prefixes and aliases, all nested models)."""
    from prefect.settings.base import PrefectBaseSettings
    from prefect.settings.models.root import Settings

    names: set[str] = set()
    seen: set[type] = set()

    def walk(model: type[PrefectBaseSettings]) -> None:
        if model in seen:
            return
        seen.add(model)
        prefix = str(model.model_config.get("env_prefix", "")).upper()
        for field_name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, PrefectBaseSettings):
                walk(annotation)
                continue
            names.add(prefix + field_name.upper())
            if isinstance(field.validation_alias, AliasChoices):
                names.update(c.upper() for c in field.validation_alias.choices if isinstance(c, str))

    walk(Settings)
    return names


@pytest.mark.parametrize("env_file", [SYSTEMD / "prefect-server.env", ROOT / ".env.example"], ids=lambda p: p.name)
def test_every_prefect_variable_set_is_one_prefect_reads(env_file: Path) -> None:
    known = prefect_environment_names()
    assert "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED" in known and "PREFECT_API_URL" in known
    for line in env_file.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match and match.group(1).startswith("PREFECT_"):
            assert match.group(1) in known, f"{env_file.name}: Prefect reads no {match.group(1)}"
