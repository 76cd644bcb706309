"""Fault injection, driven from outside the process through the admin endpoint, as tests and benchmarks do."""

from __future__ import annotations

import time

import httpx
import pytest

from simulator.faults import Faults, HttpFault
from tests.plugins.simulator import SimulatorSession


def arm(sim: SimulatorSession, **fault: object) -> None:
    sim.http.post(f"{sim.running.base_url}/admin/faults/http", json=fault).raise_for_status()


def search(sim: SimulatorSession, token: str, timeout: float = 10) -> httpx.Response:
    return sim.http.get(
        f"{sim.running.fhir_url}/Encounter",
        params={"identifier": "x"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
    )


def test_429_burst_with_retry_after_then_normal(simulator: SimulatorSession) -> None:
    token = simulator.token()
    arm(simulator, kind="429", count=2, retry_after_s=3, path_prefix="/fhir-r4")
    answers = [search(simulator, token) for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 429, 200]
    assert answers[0].headers["Retry-After"] == "3"
    assert "fault" in answers[0].json()  # Apigee's shape, not an OperationOutcome


def test_500_is_json_and_504_is_plain_text(simulator: SimulatorSession) -> None:
    token = simulator.token()
    arm(simulator, kind="500", count=1)
    arm(simulator, kind="504", count=1)
    first, second = search(simulator, token), search(simulator, token)
    assert first.status_code == 500 and first.json()["resourceType"] == "OperationOutcome"
    assert second.status_code == 504 and second.headers["content-type"].startswith("text/plain")
    assert second.text == "Gateway Timeout"


def test_hang_outlasts_the_client_timeout(simulator: SimulatorSession) -> None:
    token = simulator.token()
    arm(simulator, kind="hang", count=1, hang_s=2)
    with pytest.raises(httpx.ReadTimeout):
        search(simulator, token, timeout=0.3)
    assert search(simulator, token).status_code == 200


def test_faults_can_target_a_path_and_method(simulator: SimulatorSession) -> None:
    token = simulator.token()
    arm(simulator, kind="500", count=1, path_prefix="/fhir-r4/v1/Observation", method="POST")
    assert search(simulator, token).status_code == 200  # an Encounter search is not targeted
    state = simulator.http.get(f"{simulator.running.base_url}/admin/state").json()
    assert len(state["faults"]["http"]) == 1


def test_token_endpoint_can_fail_too(simulator: SimulatorSession) -> None:
    arm(simulator, kind="504", count=1, path_prefix="/oauth2")
    with pytest.raises(httpx.HTTPStatusError):
        simulator.token()
    assert simulator.token()


def test_latency_is_added_to_every_request(simulator: SimulatorSession) -> None:
    token = simulator.token()
    simulator.http.post(f"{simulator.running.base_url}/admin/latency", params={"seconds": 0.3}).raise_for_status()
    started = time.monotonic()
    search(simulator, token)
    took = time.monotonic() - started
    simulator.http.post(f"{simulator.running.base_url}/admin/latency", params={"seconds": 0}).raise_for_status()
    assert took >= 0.3  # a lower bound the simulator guarantees, not a speed assertion


def test_a_fraction_fires_at_random_and_stays_armed() -> None:
    faults = Faults(seed=7)
    faults.arm_http(HttpFault(kind="500", count=None, fraction=0.25))
    fired = sum(faults.take_http("GET", "/fhir-r4/v1/Encounter") is not None for _ in range(2000))
    assert 350 < fired < 650
    assert faults.describe()["http"], "a fraction fault stays armed"


def test_faults_are_logged_as_events(simulator: SimulatorSession) -> None:
    token = simulator.token()
    arm(simulator, kind="429", count=1)
    search(simulator, token)
    events = simulator.http.get(f"{simulator.running.base_url}/admin/events", params={"kind": "fault.http"}).json()
    assert [e["detail"]["fault"] for e in events] == ["429"]


def test_lost_response_commits_but_the_client_sees_504(simulator: SimulatorSession) -> None:
    from tests.plugins.simulator import ORG_ID
    from tests.simulator.examples import VALID, example

    arm(simulator, kind="lost-response", count=1, path_prefix="/fhir-r4/v1/Encounter", method="POST")
    encounter = example(VALID["Encounter"], ORG_ID)
    answer = simulator.fhir("POST", "Encounter", json=encounter)
    assert answer.status_code == 504 and answer.text == "Gateway Timeout"
    assert len(simulator.running.platform.store.all("Encounter")) == 1
