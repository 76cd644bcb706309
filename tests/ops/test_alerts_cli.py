"""`satset alerts` refusing what it cannot do, before any Prefect call, with one sentence (no server needed)."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import pytest
from typer.testing import CliRunner

from cli.app import app
from deployments.automations import POLL_SILENT_NAME, AlertsError, gateway_automations, save_webhook_block


@pytest.mark.parametrize(
    "args",
    [[], ["--webhook-url", "http://127.0.0.1:9/hook", "--block", "slack-webhook/x"]],
    ids=["neither", "both"],
)
def test_install_needs_exactly_one_destination(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["alerts", "install", *args])
    assert result.exit_code == 1
    assert "exactly one of --webhook-url URL and --block SLUG/NAME" in result.output


def test_a_block_reference_without_a_type_is_refused_by_name() -> None:
    result = CliRunner().invoke(app, ["alerts", "install", "--block", "just-a-name"])
    assert result.exit_code == 1
    assert "expected <block type slug>/<name>" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", [["install", "--block", "slack-webhook/x"], ["list"], ["remove"]], ids=str)
def test_without_prefect_api_url_it_refuses_rather_than_start_a_temporary_server(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["alerts", *command])
    assert result.exit_code == 1
    assert "PREFECT_API_URL is not set" in result.output and "Traceback" not in result.output


def test_a_webhook_that_is_not_http_is_refused() -> None:
    with pytest.raises(AlertsError, match="--webhook-url must be an http"):
        save_webhook_block("ftp://example/hook")


def test_the_poller_window_is_said_as_a_person_would() -> None:
    block = uuid4()
    by_name = {a.name: a for a in gateway_automations(block, poll_silence=timedelta(minutes=1))}
    assert "for 1 minute" in by_name[POLL_SILENT_NAME].actions[0].subject
    by_name = {a.name: a for a in gateway_automations(block, poll_silence=timedelta(seconds=90))}
    assert "for 90 seconds" in by_name[POLL_SILENT_NAME].actions[0].subject
    assert {action.block_document_id for a in by_name.values() for action in a.actions} == {block}
