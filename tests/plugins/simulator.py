"""The SATUSEHAT simulator as a fixture: one in-process instance per test session, state reset per test.

It listens on real sockets (127.0.0.1, free ports), so every test talks to it exactly as the gateway does.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from simulator.config import SimulatorConfig
from simulator.server import RunningSimulator, start_simulator

ORG_ID = "100012345"
TEST_REGISTRY: dict[str, list[dict[str, str]]] = {
    "Patient": [
        {"id": "P10443013727", "nik": "9900000000000001", "name": "Pasien Sintetis Satu"},
        {"id": "P02478375538", "nik": "9900000000000002", "name": "Pasien Sintetis Dua"},
        {"id": "P00000000001", "nik": "9900000000000003", "name": "Pasien Sintetis Tiga"},
        {"id": "P00000000002", "nik": "9900000000000004", "name": "Pasien Sintetis Empat"},
        {"id": "P00000000009", "nik": "9900000000000005", "name": "Pasien Sintetis Lima"},
    ],
    "Practitioner": [
        {"id": "10016869420", "nik": "9900000000000101", "name": "Dokter Sintetis Pengirim"},
        {"id": "10000504193", "nik": "9900000000000102", "name": "Dokter Sintetis Radiologi"},
        {"id": "N10000001", "nik": "9900000000000103", "name": "Dokter Sandbox Dokumentasi"},
    ],
    "Location": [
        {"id": "ef011065-38c9-46f8-9c35-d1fe68966a3e", "name": "Ruang Radiologi"},
        {"id": "ecff1c64-3f62-4469-b577-ea38f263b276", "name": "Ruang Radiologi (the existing gateway's example)"},
    ],
}
"""The people and places the tests' orders name: the simulator resolves every reference, so they are registered
(the simulator's synthetic seed has them too; this keeps the tests independent of that seed)."""
CLIENT_ID = "test-client"
CLIENT_SECRET = "test-secret-&+=value"


@dataclass
class SimulatorSession:
    """A running simulator plus an authenticated HTTP client for tests that speak FHIR to it directly."""

    running: RunningSimulator
    http: httpx.Client

    @property
    def config(self) -> SimulatorConfig:
        return self.running.config

    def token(self) -> str:
        response = self.http.post(
            f"{self.running.auth_url}/accesstoken",
            params={"grant_type": "client_credentials"},
            data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def fhir(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        """A FHIR call with a fresh token (tests of the platform, not of the gateway's token cache)."""
        headers = {**(headers or {}), "Authorization": f"Bearer {self.token()}"}
        return self.http.request(method, f"{self.running.fhir_url}/{path}", headers=headers, **kwargs)


@pytest.fixture(scope="session")
def simulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSimulator]:
    registry = tmp_path_factory.mktemp("simulator") / "registry.json"
    registry.write_text(json.dumps(TEST_REGISTRY))
    config = SimulatorConfig(
        registry_files=(registry,),
        org_id=ORG_ID,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        router_delay_s=0.2,
        admin_enabled=True,
        router_enabled=importlib.util.find_spec("simulator.router") is not None,
    )
    running = start_simulator(config)
    yield running
    running.stop()


@pytest.fixture
def simulator(simulator_process: RunningSimulator) -> Iterator[SimulatorSession]:
    """The session's simulator, emptied and with no faults armed, and an HTTP client for it."""
    simulator_process.platform.store.reset()
    simulator_process.platform.faults.clear()
    with httpx.Client(timeout=10) as http:
        yield SimulatorSession(simulator_process, http)
    simulator_process.platform.faults.clear()
