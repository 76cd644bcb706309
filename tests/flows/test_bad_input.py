"""Bad input fails fast with a message naming the field or the cause, and nothing half-sent is forgotten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL

from flows.batches import batch4
from flows.steps import BatchFailed
from models.inputs import Batch4Input
from tasks import runtime
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def satset_run(
    flow: str, body: dict[str, Any], env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """`satset run FLOW --params FILE` in a fresh process, against the test session's Prefect server."""
    params = tmp_path / "params.json"
    params.write_text(json.dumps(body))
    environment = {**os.environ, **env, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    command = [sys.executable, "-m", "cli", "run", flow, "--params", str(params)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=240, check=False)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"subject_id": None}, "subject_id"),
        ({"period_start": "01/08/2025 05:57"}, "period_start"),
        ({"noacsn": ""}, "noacsn"),
        ({"noacsn": "A" * 17}, "noacsn"),
        ({"study": "not-a-uid"}, "study"),
    ],
)
async def test_invalid_input_is_refused_before_anything_is_sent(
    gateway: Gateway, upload_study: UploadStudy, tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    body = {
        k: v
        for k, v in {**batch4_input(upload_study(series=1, instances_per_series=1)), **change}.items()
        if v is not None
    }

    completed = satset_run("batch4", body, gateway.env, tmp_path)

    assert completed.returncode == 1
    assert completed.stderr.startswith("error: invalid input"), completed.stderr
    assert f"{field}:" in completed.stderr
    assert gateway.counts() == {}
    assert gateway.simulator.running.platform.store.token_count() == 0  # not even a token was asked for


async def test_satset_run_prints_the_result_as_json(
    gateway: Gateway, upload_study: UploadStudy, tmp_path: Path
) -> None:
    body = batch4_input(upload_study(series=1, instances_per_series=2))

    completed = satset_run("batch4", body, gateway.env, tmp_path)

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["dicom_process"]["status"] == "success"
    assert gateway.simulator.running.platform.store.read("DiagnosticReport", result["diagnostic_report_id"])


async def test_missing_settings_are_named(tmp_path: Path) -> None:
    env = {name: "" for name in ("DCM4CHEE_URL", "ROUTER_IP", "SS_AUTH_URL", "SS_BASE_URL", "SS_CLIENT_SECRET")}
    completed = satset_run("batch1", {}, {**env, "SS_ORG_ID": "1", "SS_CLIENT_ID": "c"}, tmp_path)
    assert completed.returncode == 1
    assert "DCM4CHEE_URL" in completed.stderr and "SS_CLIENT_SECRET" in completed.stderr


async def test_study_not_in_the_pacs_stops_before_anything_is_created(gateway: Gateway) -> None:
    body = batch4_input(SimpleNamespace(study_instance_uid="1.2.826.0.1.3680043.8.498.1"))  # type: ignore[arg-type]

    with pytest.raises(BatchFailed) as failed:
        await batch4(Batch4Input.model_validate(body))

    assert failed.value.step == "dicom_process"
    assert body["study"] in str(failed.value) and "no study" in str(failed.value)
    assert gateway.counts() == {}


async def test_router_refusing_the_ae_title_fails_fast_before_anything_is_made(
    gateway: Gateway, upload_study: UploadStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = batch4_input(upload_study(series=1, instances_per_series=2))
    monkeypatch.setenv("ROUTER_AET", "NOTTHEROUTER")
    runtime.reset()

    with pytest.raises(BatchFailed) as failed:
        await batch4(Batch4Input.model_validate(body))

    message = str(failed.value)
    assert failed.value.step == "router_echo" and "NOTTHEROUTER" in message and "ROUTER_AET" in message
    assert "fix the input" in message  # a refusal is not retried
    assert failed.value.created == {} and gateway.counts() == {}  # the C-ECHO comes before the Encounter
    monkeypatch.setenv("ROUTER_AET", gateway.env["ROUTER_AET"])
    runtime.reset()
    await batch4(Batch4Input.model_validate(body))
    assert gateway.counts() == dict.fromkeys(
        ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport"), 1
    )


async def test_a_rule_the_platform_enforces_is_reported_with_its_rule_number(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    """An org id that is not the client's: the platform's rule 10117 comes back, named, and is not retried."""
    body = batch4_input(upload_study(series=1, instances_per_series=1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SS_ORG_ID", "999999")
        runtime.reset()
        with pytest.raises(BatchFailed) as failed:
            await batch4(Batch4Input.model_validate(body))
    runtime.reset()
    assert failed.value.step == "encounter"
    assert "10117" in str(failed.value)
    assert failed.value.status_code == 400
    assert failed.value.response()["detail"]["issue"][0]["expression"]
