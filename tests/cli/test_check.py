"""`satset check` against the real parts: every check passes on a working installation, and each kind of
misconfiguration fails its own check, in seconds, naming the setting to fix, with nothing created anywhere."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli.app import app
from tests.plugins.gateway import Gateway

pytestmark = [pytest.mark.integration]


def check(*args: str) -> Result:
    return CliRunner().invoke(app, ["check", *args])


def checks_by_name(result: Result) -> dict[str, dict[str, object]]:
    return {item["name"]: item for item in json.loads(result.stdout)["checks"]}


@pytest.fixture
def installed(gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    """A working installation: the gateway's parts, a RIS table, TEMP_DIR, run from an empty directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TEMP_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("RIS_DATABASE_URL", f"sqlite:///{tmp_path / 'ris.db'}")
    assert CliRunner().invoke(app, ["orders", "list"]).exit_code == 0  # creates the table
    return gateway


def test_a_working_installation_passes_every_check(installed: Gateway) -> None:
    result = check()

    assert result.exit_code == 0, result.stdout
    lines = result.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines] == [
        "temp_dir",
        "pacs",
        "satusehat_token",
        "clock",
        "router",
        "prefect_api",
        "ris_database",
    ]
    assert all(line.startswith("ok ") for line in lines), result.stdout
    assert installed.counts() == {}  # nothing created on the platform


def test_json_output_names_every_check(installed: Gateway) -> None:
    result = check("--json")

    assert result.exit_code == 0
    found = checks_by_name(result)
    assert all(item["ok"] for item in found.values()) and len(found) == 7


@pytest.mark.parametrize(
    ("variable", "value", "failing", "setting"),
    [
        ("ROUTER_AET", "WRONGAET", "router", "ROUTER_AET"),
        ("PACS_PASSWORD", "not-the-password", "pacs", "PACS_PASSWORD"),
        ("SS_CLIENT_SECRET", "not-the-secret", "satusehat_token", "SS_CLIENT_SECRET"),
    ],
)
def test_each_misconfiguration_fails_its_own_check_naming_the_setting(
    installed: Gateway, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, failing: str, setting: str
) -> None:
    monkeypatch.setenv(variable, value)

    result = check("--json")

    assert result.exit_code == 1
    found = checks_by_name(result)
    assert [name for name, item in found.items() if not item["ok"]] == [failing]
    assert setting in str(found[failing]["setting"])
    if "PASSWORD" in variable or "SECRET" in variable:
        assert value not in result.stdout  # a wrong secret is never printed
    assert installed.counts() == {}


def test_a_refused_connection_fails_in_seconds_not_after_retries(
    installed: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("SS_AUTH_URL", f"http://127.0.0.1:{port}/oauth2/v1")
    monkeypatch.setenv("ROUTER_PORT", str(port))

    found = checks_by_name(check("--json"))

    assert not found["satusehat_token"]["ok"] and not found["router"]["ok"]
    assert "ROUTER_PORT" in str(found["router"]["setting"])


def test_a_missing_ris_table_and_an_unwritable_temp_dir_are_reported(
    installed: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RIS_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TEMP_DIR", str(blocker / "scratch"))

    found = checks_by_name(check("--json"))

    assert not found["ris_database"]["ok"] and "has no table" in str(found["ris_database"]["detail"])
    assert not found["temp_dir"]["ok"] and found["temp_dir"]["setting"] == "TEMP_DIR"


def test_no_ris_database_is_a_skip_not_a_failure(installed: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RIS_DATABASE_URL")

    result = check()

    assert result.exit_code == 0
    (line,) = [line for line in result.stdout.splitlines() if line.split()[1] == "ris_database"]
    assert line.startswith("skip")
