"""The gateway wired to the real local parts: settings pointing at the simulator (FHIR + DICOM Router) and at
Orthanc (the PACS), as a hospital's environment file would, and a helper to make orders for generated studies."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from simulator.server import RunningSimulator
from stack.orthanc import OrthancServer
from tasks import runtime
from tests.plugins.pacs import ORTHANC_PASSWORD, ORTHANC_USER, UploadedStudy, unique_accession
from tests.plugins.simulator import CLIENT_ID, CLIENT_SECRET, ORG_ID, SimulatorSession

IMAGING_STUDY_DEADLINE_S = 15


@dataclass
class Gateway:
    """What a flow test needs: the simulator (to arm faults and count resources) and the PACS."""

    simulator: SimulatorSession
    orthanc: OrthancServer
    env: dict[str, str]

    def resources(self, resource_type: str) -> list[dict[str, Any]]:
        return self.simulator.running.platform.store.all(resource_type)

    def counts(self) -> dict[str, int]:
        return self.simulator.running.platform.store.counts()

    def arm(self, **fault: Any) -> None:
        """Arm an HTTP fault on the simulator, from outside, as the admin endpoint allows."""
        url = f"{self.simulator.running.base_url}/admin/faults/http"
        httpx.post(url, json=fault, timeout=10).raise_for_status()

    def arm_router(self, **fault: Any) -> None:
        url = f"{self.simulator.running.base_url}/admin/faults/router"
        httpx.post(url, json=fault, timeout=10).raise_for_status()


def gateway_environment(running: RunningSimulator, orthanc: OrthancServer) -> dict[str, str]:
    """The gateway's variables for a test simulator (FHIR and router) and a test Orthanc (the PACS)."""
    return {
        "DCM4CHEE_URL": orthanc.dicomweb_url,
        "PACS_USERNAME": ORTHANC_USER,
        "PACS_PASSWORD": ORTHANC_PASSWORD,
        "ROUTER_IP": running.config.host,
        "ROUTER_PORT": str(running.dicom_port),
        "ROUTER_AET": running.config.router_aet,
        "SS_AUTH_URL": running.auth_url,
        "SS_BASE_URL": running.fhir_url,
        "SS_ORG_ID": ORG_ID,
        "SS_CLIENT_ID": CLIENT_ID,
        "SS_CLIENT_SECRET": CLIENT_SECRET,
        # The hospital's exam code (as the demo sets it): the test bodies, like the existing gateway's, carry no
        # codind_code, and the gateway assumes no exam (issue 16).
        "DEFAULT_EXAM_CODE": "25045-6",
    }


@pytest.fixture
def gateway_env(simulator: SimulatorSession, orthanc: OrthancServer) -> dict[str, str]:
    return {
        **gateway_environment(simulator.running, orthanc),
        "IMAGING_STUDY_DEADLINE_S": str(IMAGING_STUDY_DEADLINE_S),
    }


@pytest.fixture
def gateway(
    prefect_server: None,
    simulator: SimulatorSession,
    orthanc: OrthancServer,
    gateway_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Gateway]:
    """Settings from the environment, as in production, pointing at the local parts; clients rebuilt per test."""
    for name, value in gateway_env.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    yield Gateway(simulator, orthanc, gateway_env)
    runtime.reset()


def batch4_input(study: UploadedStudy, **overrides: Any) -> dict[str, Any]:
    """The existing gateway's batch4 example, for a generated study, with identifiers unique to the test."""
    acsn = unique_accession()
    body = {
        "identifier_value": "RG" + uuid.uuid4().hex[:12].upper(),
        "subject_id": "P10443013727",
        "individual_id": "10016869420",
        "period_start": "2025-08-01T05:57:41+00:00",
        "noacsn": acsn,
        "performer_id": "10000504193",
        "performer_value": "Tidak tampak kelainan",
        "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
        "study": study.study_instance_uid,
    }
    return {**body, **overrides}
