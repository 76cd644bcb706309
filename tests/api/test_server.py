"""`satset api` as a HIS meets it: a uvicorn process on a real socket, bound to loopback by default, refusing to
start without a credential, and keeping secrets and patient names out of what it answers and logs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prefect.settings import PREFECT_API_URL

from tests.api.conftest import API_KEY, PATIENT_NAME
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import listening_addresses
from tests.plugins.simulator import CLIENT_SECRET

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

SATSET_API = "import typer; from cli.api_cmd import api; typer.run(api)"
"""`satset api` (the command function as cli/app.py registers it), without depending on that registration."""


def api_environment(gateway_env: dict[str, str], **api: str) -> dict[str, str]:
    """This process's environment without any API_* variable, plus the gateway's settings and `api`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
    prefect = {"PREFECT_API_URL": str(PREFECT_API_URL.value())} if PREFECT_API_URL.value() else {}
    return {**inherited, **gateway_env, **prefect, **api}


@dataclass
class ApiProcess:
    """A running `satset api`: its base URL (from the line it prints) and everything it writes."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    base_url: str = ""

    def read(self, listening: threading.Event) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("HIS API on "):
                self.base_url = line.split()[3].removesuffix("/api/satset/")
                listening.set()
        listening.set()  # the process ended: stop waiting either way

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def api_process(gateway: Gateway, tmp_path: Path) -> Iterator[ApiProcess]:
    """`satset api --port 0` with an API key, output (stdout and stderr, access log included) collected."""
    process = subprocess.Popen(
        [sys.executable, "-c", SATSET_API, "--port", "0"],
        env=api_environment(gateway.env, API_KEY=API_KEY),
        cwd=tmp_path,  # no .env file of the checkout applies
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = ApiProcess(process)
    listening = threading.Event()
    reader = threading.Thread(target=running.read, args=(listening,), daemon=True)
    reader.start()
    try:
        assert listening.wait(timeout=120) and running.base_url, running.output
        assert running.base_url.startswith("http://127.0.0.1:")
        assert f"(docs: {running.base_url}/api/docs)" in running.output
        yield running
    finally:
        process.terminate()
        process.wait(timeout=60)
        reader.join(timeout=60)


async def test_satset_api_serves_on_loopback_over_a_real_socket(api_process: ApiProcess, gateway: Gateway) -> None:
    base = api_process.base_url
    no_study = SimpleNamespace(study_instance_uid="1.2.3")  # batch1 sends no images
    body = {k: v for k, v in batch4_input(no_study, subject_display=PATIENT_NAME).items() if k != "study"}  # type: ignore[arg-type]

    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        halo = await client.get("/api/satset/halo")
        docs = await client.get("/api/docs")
        refused = await client.post("/api/satset/batch1", json=body)
        ordered = await client.post("/api/satset/batch1", json=body, headers={"X-API-Key": API_KEY})
        keyed = await client.get(f"/api/satset/halo?api_key={API_KEY}&async=true")  # a key where it does not go

    assert (halo.status_code, halo.json()) == (200, {"message": "Halo dari Satu Sehat!"})
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers
    assert ordered.status_code == 200, ordered.text
    assert ordered.json()["encounter_id"] == gateway.resources("Encounter")[0]["id"]
    assert "X-Flow-Run-Id" in ordered.headers and "server" not in ordered.headers
    port = int(base.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}

    api_process.process.terminate()
    api_process.process.wait(timeout=60)
    output = api_process.output
    assert '"POST /api/satset/batch1 HTTP/1.1" 401' in output and " 200" in output  # the access log is there
    assert keyed.status_code == 200
    assert '"GET /api/satset/halo?api_key=REDACTED&async=true HTTP/1.1" 200' in output  # redacted, not dropped
    assert PATIENT_NAME not in output and CLIENT_SECRET not in output and API_KEY not in output


async def test_satset_api_refuses_to_start_without_a_credential(gateway: Gateway, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", SATSET_API, "--port", "0"],
        env=api_environment(gateway.env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 1
    assert completed.stderr.startswith("error: ")
    for variable in ("API_KEY", "API_BASIC_USER", "API_BASIC_PASSWORD", "API_AUTH_DISABLED"):
        assert variable in completed.stderr
    assert "HIS API on" not in completed.stdout


async def test_satset_api_refuses_to_start_without_the_gateway_settings(tmp_path: Path) -> None:
    missing = dict.fromkeys(("DCM4CHEE_URL", "ROUTER_IP", "SS_AUTH_URL", "SS_BASE_URL", "SS_CLIENT_SECRET"), "")
    completed = subprocess.run(
        [sys.executable, "-c", SATSET_API],
        env=api_environment({**missing, "SS_ORG_ID": "1", "SS_CLIENT_ID": "c"}, API_KEY=API_KEY),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 1
    assert "DCM4CHEE_URL" in completed.stderr and "SS_CLIENT_SECRET" in completed.stderr


async def test_satset_api_refuses_to_start_without_prefect_api_url(gateway: Gateway, tmp_path: Path) -> None:
    """Without PREFECT_API_URL Prefect would start a temporary server of its own, one that outlived the process."""
    environment = {k: v for k, v in api_environment(gateway.env, API_KEY=API_KEY).items() if k != "PREFECT_API_URL"}
    environment["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile of the machine sets it either

    completed = subprocess.run(
        [sys.executable, "-c", SATSET_API, "--port", "0"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert completed.stderr.startswith("error: PREFECT_API_URL is not set")
    assert len(completed.stderr.strip().splitlines()) == 1
    assert "HIS API on" not in completed.stdout
