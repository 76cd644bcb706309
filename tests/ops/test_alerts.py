"""`satset alerts install` against a real `prefect server start`, with a webhook receiver on 127.0.0.1.

Each automation is made to fire by what fires it in production: a batch1 run that really fails (SATUSEHAT refuses
the client), the two custom events emitted from inside a flow run, and a poller that never completes. The
receiver is polled with a bounded wait; nothing depends on how long the server takes, only on whether it fires.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from deployments.automations import (
    BATCH_FAILED_NAME,
    DEFAULT_BLOCK_NAME,
    IMAGING_SLOW_NAME,
    NAME_PREFIX,
    ORDER_DEAD_NAME,
    POLL_SILENT_NAME,
    find_notification_block,
    gateway_automations,
    install_alerts,
)
from stack.ports import LOOPBACK, free_port
from stack.prefect_server import PrefectServer
from tests.deployments.prefect_server import PROJECT_ROOT, STARTUP_TIMEOUT_S, PrefectApi, wait_for
from tests.ops.receiver import Receiver, running_receiver
from tests.plugins.pacs import unique_accession

pytestmark = pytest.mark.integration

FIRE_TIMEOUT_S = 240.0
"""From the event to the webhook: the server's event pipeline, trigger and action services on 2 busy cores."""

COMMAND_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectApi]:
    """A server that knows its UI address (PREFECT_UI_URL, as deploy/systemd sets it), so alerts carry links."""
    port = free_port()
    saved = os.environ.get("PREFECT_UI_URL")
    os.environ["PREFECT_UI_URL"] = f"http://{LOOPBACK}:{port}"
    try:
        home = tmp_path_factory.mktemp("alerts") / "prefect-home"
        started = PrefectServer(home, port=port, scheduler=False, start_timeout_s=STARTUP_TIMEOUT_S).start()
    finally:
        if saved is None:
            os.environ.pop("PREFECT_UI_URL")
        else:
            os.environ["PREFECT_UI_URL"] = saved
    api = PrefectApi(started)
    try:
        yield api
    finally:
        api.http.close()
        started.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


def satset(api: PrefectApi, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=api.env(**(env or {})),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def ours(api: PrefectApi) -> list[dict[str, Any]]:
    automations = api.post("/automations/filter", {})
    return [a for a in automations if a["name"].startswith(NAME_PREFIX)]


@pytest.fixture(scope="module")
def installed(server: PrefectApi, receiver: Receiver) -> list[dict[str, Any]]:
    """The alerts installed twice through the CLI, pointing at the receiver."""
    for _ in range(2):
        done = satset(server, "alerts", "install", "--webhook-url", receiver.hook_url)
        assert done.returncode == 0, done.stdout + done.stderr
    assert receiver.hook_url not in done.stdout + done.stderr  # a webhook URL can be a credential
    return ours(server)


def test_install_twice_leaves_four_automations_and_one_block(
    server: PrefectApi, installed: list[dict[str, Any]]
) -> None:
    names = sorted(a["name"] for a in installed)
    assert names == sorted([ORDER_DEAD_NAME, BATCH_FAILED_NAME, POLL_SILENT_NAME, IMAGING_SLOW_NAME])
    blocks = server.post("/block_documents/filter", {"block_types": {"slug": {"any_": ["custom-webhook"]}}})
    assert [b["name"] for b in blocks] == [DEFAULT_BLOCK_NAME]
    assert all(a["enabled"] for a in installed)
    block_ids = {action["block_document_id"] for a in installed for action in a["actions"]}
    assert block_ids == {blocks[0]["id"]}


def test_install_with_an_existing_block_by_name_updates_in_place(
    server: PrefectApi, installed: list[dict[str, Any]]
) -> None:
    done = satset(server, "alerts", "install", "--block", f"custom-webhook/{DEFAULT_BLOCK_NAME}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(a["id"] for a in ours(server)) == sorted(a["id"] for a in installed)
    listed = satset(server, "alerts", "list")
    assert listed.returncode == 0 and listed.stdout.count(NAME_PREFIX) == 4, listed.stdout


def test_a_block_that_does_not_exist_is_named_in_the_error(server: PrefectApi, installed: list[dict[str, Any]]) -> None:
    done = satset(server, "alerts", "install", "--block", "slack-webhook/no-such-block")
    assert done.returncode == 1
    assert "slack-webhook/no-such-block" in done.stderr and "no such block" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_failed_batch1_run_fires_the_webhook(
    server: PrefectApi, receiver: Receiver, installed: list[dict[str, Any]], tmp_path: Path
) -> None:
    acsn = unique_accession()
    order = {
        "identifier_value": "RG" + uuid.uuid4().hex[:12].upper(),
        "subject_id": "P10443013727",
        "individual_id": "10016869420",
        "period_start": "2025-08-01T05:57:41+00:00",
        "noacsn": acsn,
    }
    params = tmp_path / "order.json"
    params.write_text(json.dumps(order))
    platform = {  # a SATUSEHAT that refuses the client's credentials: batch1 fails at once, not retried
        "DCM4CHEE_URL": f"{receiver.base_url}/dicom-web",
        "ROUTER_IP": "127.0.0.1",
        "SS_AUTH_URL": f"{receiver.base_url}/oauth2/v1",
        "SS_BASE_URL": f"{receiver.base_url}/fhir-r4/v1",
        "SS_ORG_ID": "10000004",
        "SS_CLIENT_ID": "client",
        "SS_CLIENT_SECRET": "not-the-secret",
    }
    run = satset(server, "run", "batch1", "--params", str(params), env=platform)
    assert run.returncode == 1, run.stdout + run.stderr

    note = wait_for(lambda: receiver.first(f"batch1 {acsn}"), "the batch-failed notification", FIRE_TIMEOUT_S)
    assert "Failed" in note["subject"]
    assert f"batch1 {acsn}" in note["body"] and "/flow-run/" in note["body"]
    assert "not-the-secret" not in json.dumps(receiver.received())


def test_the_order_dead_and_imaging_study_events_fire_the_webhook(
    server: PrefectApi, receiver: Receiver, installed: list[dict[str, Any]]
) -> None:
    acsn = unique_accession()
    emitted = subprocess.run(
        [sys.executable, "-m", "tests.ops.emit_in_flow", acsn],
        env=server.env(),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert emitted.returncode == 0, emitted.stdout + emitted.stderr

    dead = wait_for(lambda: receiver.first(f"order {acsn} is dead"), "the order-dead notification", FIRE_TIMEOUT_S)
    assert "batch4" in dead["body"] and "RuleNumber 10117" in dead["body"] and "after 1 attempt" in dead["body"]
    assert f"satset orders redrive {acsn}" in dead["body"] and "/flow-run/" in dead["body"]

    late = wait_for(
        lambda: receiver.first(f"ImagingStudy for {acsn} is late"), "the ImagingStudy notification", FIRE_TIMEOUT_S
    )
    assert "Waited 200 s of 300 s" in late["body"] and "3 of 10 instances" in late["body"]


def test_a_poller_that_never_completes_fires_the_webhook(
    server: PrefectApi, receiver: Receiver, installed: list[dict[str, Any]]
) -> None:
    """The proactive trigger, its window shortened to Prefect's minimum so the test need not wait ten minutes."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        block_id = find_notification_block(client, f"custom-webhook/{DEFAULT_BLOCK_NAME}")
        automations = gateway_automations(block_id, poll_silence=timedelta(seconds=10))
        install_alerts([a for a in automations if a.name == POLL_SILENT_NAME], client)

    note = wait_for(lambda: receiver.first("RIS poller has not completed"), "the poller notification", FIRE_TIMEOUT_S)
    assert "for 10 seconds" in note["subject"]
    assert "satset check" in note["body"]
