"""The Prefect UI shows a batch4 run as an operator needs it: Completed, every step as a task run, the summary
artifact, and the deployment's run form built from the payload model. Headless Chromium against a real
`prefect server start`; the flow runs the way `satset run` runs it, against the simulator and Orthanc.

A screenshot of the run page is kept in the test's tmp dir; with SATSET_UPDATE_SCREENSHOTS=1 it also replaces
docs/screenshots/batch4-flow-run.png.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from deployments.catalog import by_full_name
from tasks.artifacts import artifact_key
from tests.deployments.prefect_server import PROJECT_ROOT, PrefectApi, running_prefect_server, wait_for
from tests.plugins.gateway import batch4_input
from tests.plugins.pacs import UploadStudy, require
from tests.plugins.simulator import SimulatorSession
from tests.ui.chromium import dump_dom, find_chromium, screenshot

pytestmark = pytest.mark.integration

BATCH4_TASKS = (
    "locate-study",
    "post-encounter",
    "post-service-request",
    "route-study",
    "wait-for-imaging-study",
    "post-observation",
    "post-diagnostic-report",
)
PAGE_TIMEOUT_S = 180.0
"""How long a page may take to show what is expected (each try renders it again in a fresh browser)."""
DOCS_SCREENSHOT = PROJECT_ROOT / "docs" / "screenshots" / "batch4-flow-run.png"


class _Texts(HTMLParser):
    """The text nodes of a DOM, stripped, without scripts and styles: what a person could read on the page."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip > 0:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.texts.append(data.strip())


def visible_texts(html: str) -> list[str]:
    parser = _Texts()
    parser.feed(html)
    return parser.texts


def page_showing(url: str, expected: list[str]) -> list[str]:
    """The page's texts once every `expected` text is among them (a text node equal to it), or fail listing the
    missing ones. Rendering again is the only wait: the single-page app fetches from the API after loading."""
    last: dict[str, Any] = {}

    def attempt() -> list[str] | None:
        texts = visible_texts(dump_dom(url))
        last["missing"] = [text for text in expected if text not in texts]
        last["texts"] = texts
        return texts if not last["missing"] else None

    try:
        return wait_for(attempt, f"{url} to show {expected}", PAGE_TIMEOUT_S, interval_s=1.0)
    except AssertionError as error:
        raise AssertionError(f"{error}\nmissing: {last.get('missing')}\npage text: {last.get('texts')}") from None


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


@pytest.fixture
def prefect_api(tmp_path: Path) -> Any:
    require(find_chromium() is not None, "Chromium (Debian package 'chromium')")
    with running_prefect_server(tmp_path) as server:
        yield server


def _run_batch4(server: PrefectApi, gateway_env: dict[str, str], body: dict[str, Any], tmp_path: Path) -> str:
    """Run batch4 as `satset run` does, reporting to `server`; return the flow run's id."""
    params = tmp_path / "batch4.json"
    params.write_text(json.dumps(body))
    env = server.env(**gateway_env, TEMP_DIR=str(tmp_path / "scratch"))
    command = [sys.executable, "-m", "cli", "run", "batch4", "--params", str(params)]
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, f"{completed.stdout}\n{completed.stderr[-6000:]}"
    [run] = server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["batch4"]}}})
    assert run["state"]["type"] == "COMPLETED"
    return str(run["id"])


def _recorded_task_names(server: PrefectApi, run_id: str) -> list[str] | None:
    """Task runs reach the database through the server's event pipeline, a moment after the flow ends."""
    runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    names = [str(r["name"]) for r in runs if r["state"] and r["state"]["type"] == "COMPLETED"]
    found = all(any(n.startswith(f"{task}-") for n in names) for task in BATCH4_TASKS)
    return names if found else None


def test_the_ui_shows_a_completed_batch4_run_with_its_task_runs_and_artifact(
    prefect_api: PrefectApi,
    simulator: SimulatorSession,
    gateway_env: dict[str, str],
    upload_study: UploadStudy,
    tmp_path: Path,
) -> None:
    study = upload_study(series=1, instances_per_series=2)
    body = batch4_input(study)
    run_id = _run_batch4(prefect_api, gateway_env, body, tmp_path)
    task_names = wait_for(lambda: _recorded_task_names(prefect_api, run_id), "batch4's task runs", 120)
    key = artifact_key("batch4", body["noacsn"])
    run_name = f"batch4 {body['noacsn']}"

    ui = prefect_api.ui_url
    # v1 (Vue) run page: the state badge, the run's name; its timeline is a canvas, so tasks are checked in v2.
    v1 = page_showing(f"{ui}/runs/flow-run/{run_id}", ["Completed", run_name])
    assert "Failed" not in v1 and "Crashed" not in v1
    # v2 (React, the default UI): the same header, then the Task Runs and Artifacts tabs.
    page_showing(f"{ui}/v2/runs/flow-run/{run_id}", ["Completed", run_name, "batch4"])
    tasks = page_showing(f"{ui}/v2/runs/flow-run/{run_id}?tab=TaskRuns", sorted(task_names))
    assert tasks.count("Completed") >= len(BATCH4_TASKS), "every task run shows as Completed"
    page_showing(f"{ui}/v2/runs/flow-run/{run_id}?tab=Artifacts", [key, "batch4 summary"])

    shot = screenshot(f"{ui}/runs/flow-run/{run_id}", tmp_path / "batch4-flow-run.png")
    screenshot(f"{ui}/v2/runs/flow-run/{run_id}?tab=Artifacts", tmp_path / "batch4-flow-run-v2-artifacts.png")
    assert _png_size(shot) == (1400, 900)
    if os.environ.get("SATSET_UPDATE_SCREENSHOTS"):  # opt-in: a test run leaves tracked files alone
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_the_deployment_run_form_asks_for_the_payload_fields(prefect_api: PrefectApi) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api.api_url}):
        deployment_id = by_full_name()["batch4/gateway"].to_runner_deployment().apply()
    # The field titles pydantic gives Batch4Input's required fields, rendered as form labels by the UI (people
    # may be named by IHS id or NIK, so those are optional fields now).
    page_showing(
        f"{prefect_api.ui_url}/v2/deployments/deployment/{deployment_id}/run",
        ["payload", "Noacsn", "Study", "Period Start", "Conclusion Text", "Performer Value"],
    )
