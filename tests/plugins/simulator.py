"""The SATUSEHAT simulator as a fixture: one in-process instance per test session, state reset per test.

It listens on real sockets (127.0.0.1, free ports), so every test talks to it exactly as the gateway does.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from simulator.config import SimulatorConfig
from simulator.server import RunningSimulator, start_simulator

ORG_ID = "100012345"
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
def simulator_process() -> Iterator[RunningSimulator]:
    config = SimulatorConfig(
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
