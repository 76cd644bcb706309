"""The README's first command ends in a done order: `satset demo --once` brings up every part and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_once_ends_with_the_order_done(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "SS_", "API_"))}
    completed = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--once", "--state-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    assert ": done" in out and "diagnostic_report_id" in out
    assert "/runs/flow-run/" in out and "/api/docs" in out
    log = (tmp_path / "demo" / "gateway.log").read_text(encoding="utf-8")  # LOG_FILE, as the demo sets it
    assert "prefect.flow_runs" in log and "Completed" in log, log[-2000:]
    for line in out.splitlines():  # every link the demo prints is on the loopback address
        if "http://" in line:
            assert "http://127.0.0.1:" in line, line
