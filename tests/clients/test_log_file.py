"""LOG_FILE: the gateway's and Prefect's run log records reach the file, logrotate can move it, and a path that
cannot be written stops start-up naming the variable."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from clients.log_file import attach_log_file, detach_log_files
from models.settings import SettingsError


@pytest.fixture(autouse=True)
def _detached() -> Iterator[None]:
    yield
    detach_log_files()


@pytest.mark.filterwarnings("ignore:Logger 'prefect.flow_runs' attempted to send logs")
def test_gateway_and_prefect_run_records_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "gateway.log"
    attach_log_file(path)

    logging.getLogger("clients.satusehat").info("POST Encounter -> 201")
    logging.getLogger("prefect.flow_runs").info("Finished in state Completed()")
    logging.getLogger("clients.satusehat").debug("below the level")

    text = path.read_text(encoding="utf-8")
    assert "INFO clients.satusehat" in text and "POST Encounter -> 201" in text
    assert "prefect.flow_runs" in text and "Finished in state Completed()" in text
    assert "below the level" not in text


def test_attaching_twice_writes_each_record_once(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    assert attach_log_file(path) is attach_log_file(path)

    logging.getLogger("flows.poll").warning("order RAD1 failed")

    assert path.read_text(encoding="utf-8").count("order RAD1 failed") == 1


def test_a_file_moved_away_by_logrotate_is_opened_again(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    attach_log_file(path)
    logging.getLogger("api").info("before rotation")
    path.rename(tmp_path / "gateway.log.1")

    logging.getLogger("api").info("after rotation")

    assert "after rotation" in path.read_text(encoding="utf-8")
    assert "after rotation" not in (tmp_path / "gateway.log.1").read_text(encoding="utf-8")


def test_no_log_file_adds_no_handler() -> None:
    before = list(logging.getLogger().handlers)
    assert attach_log_file(None) is None
    assert logging.getLogger().handlers == before


def test_a_path_that_cannot_be_written_names_log_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SettingsError, match=r"^LOG_FILE: cannot open .*a-file/gateway\.log"):
        attach_log_file(tmp_path / "a-file" / "gateway.log")
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(SettingsError, match=r"^LOG_FILE: cannot open .*a-directory"):
        attach_log_file(tmp_path / "a-directory")


def test_the_command_stops_with_the_variable_named(tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()

    result = CliRunner().invoke(app, ["orders", "list"], env={"LOG_FILE": str(tmp_path / "a-directory")})

    assert result.exit_code == 2
    assert "LOG_FILE: cannot open" in result.output
