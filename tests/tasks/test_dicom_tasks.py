"""The DICOM tasks call the PACS from the I/O thread that does the work, with that thread's own PACS client: several
flow runs of one process route at once, and a requests.Session must not be shared between threads. No Prefect
server is needed: the tasks' functions are called directly, the routing itself replaced by a recorder."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from clients import routing
from clients.pacs import PacsClient, StudyRef
from clients.router import RouterClient, StudyOutcome
from tasks import runtime
from tasks.dicom import locate_study, route_study

SETTINGS = {
    "DCM4CHEE_URL": "http://127.0.0.1:9/dicom-web",
    "ROUTER_IP": "127.0.0.1",
    "ROUTER_PORT": "9",
    "ROUTER_AET": "DCMROUTER",
    "SS_AUTH_URL": "http://127.0.0.1:9/oauth2/v1",
    "SS_BASE_URL": "http://127.0.0.1:9/fhir-r4/v1",
    "SS_ORG_ID": "ORG01",
    "SS_CLIENT_ID": "client",
    "SS_CLIENT_SECRET": "secret",
}


@pytest.fixture(autouse=True)
def settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in SETTINGS.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    yield
    runtime.reset()


class Calls:
    """What each call saw: its thread, the client it was given, and the client its own thread owns."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=10)  # every call in flight at once, or the test fails
        self.seen: list[tuple[str, object, object]] = []
        self._lock = threading.Lock()

    def record(self, given: object) -> None:
        self.barrier.wait()
        with self._lock:
            self.seen.append((threading.current_thread().name, given, runtime.pacs()))

    def assert_each_thread_used_its_own_client(self, parties: int) -> None:
        threads = {thread for thread, _, _ in self.seen}
        assert len(self.seen) == parties and len(threads) == parties
        assert all(thread.startswith("satset-io") for thread in threads)
        assert all(given is owned for _, given, owned in self.seen)
        assert len({id(given) for _, given, _ in self.seen}) == parties
        assert runtime.pacs() not in [given for _, given, _ in self.seen]  # not the event loop thread's client


def test_concurrent_routings_use_the_pacs_client_of_their_own_io_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(3)
    routers: list[RouterClient] = []

    def recording_route_study(pacs: PacsClient, router: RouterClient, **study: Any) -> routing.RoutingReport:
        calls.record(pacs)
        routers.append(router)
        uid, accession = study["study_instance_uid"], study["accession_number"]
        outcome = StudyOutcome(uid, accession, 1, 1, 0, (), 0.0, True)
        return routing.RoutingReport(uid, accession, 1, 1, True, True, router.router, 0.0, outcome)

    monkeypatch.setattr(routing, "route_study", recording_route_study)

    async def three_at_once() -> list[dict[str, Any]]:
        return await asyncio.gather(*(route_study.fn(f"1.2.3.{n}", f"ACSN{n}", "P1") for n in range(3)))

    results = asyncio.run(three_at_once())

    assert [result["study_uid"] for result in results] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    calls.assert_each_thread_used_its_own_client(3)
    assert routers[0] is routers[1] is routers[2] is runtime.router()  # association slots are process-wide


def test_concurrent_lookups_use_the_pacs_client_of_their_own_io_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(3)

    def recording_find_study(self: PacsClient, **query: str | None) -> StudyRef:
        calls.record(self)
        return StudyRef(str(query["study_instance_uid"]), "ACSN", 1, ("CT",))

    monkeypatch.setattr(PacsClient, "find_study", recording_find_study)
    monkeypatch.setattr(PacsClient, "study_metadata", lambda self, uid: [_routable_instance(uid)])

    async def three_at_once() -> list[dict[str, Any]]:
        return await asyncio.gather(*(locate_study.fn(study_instance_uid=f"1.2.3.{n}") for n in range(3)))

    results = asyncio.run(three_at_once())

    assert [result["study_instance_uid"] for result in results] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    calls.assert_each_thread_used_its_own_client(3)


def _routable_instance(study_uid: str) -> dict[str, str]:
    """One instance's metadata that passes the pre-flight."""
    return {
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": study_uid + ".1",
        "SOPInstanceUID": study_uid + ".1.1",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "Modality": "CT",
        "SeriesNumber": "1",
        "InstanceNumber": "1",
        "StudyDate": "20250801",
        "StudyTime": "101500",
        "SeriesDate": "20250801",
        "SeriesTime": "101600",
    }
