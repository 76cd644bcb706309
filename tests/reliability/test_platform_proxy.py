"""The platform proxy's barriers hold what they are asked to hold and say when they were not met: the timing tests
(tests/orders/test_poll.py, tests/reliability/test_pollers.py) rest on them, so a barrier that let everything
through, or claimed a meeting that never happened, would make those tests prove nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.reliability.platform_proxy import Gate, PlatformProxy, Together


@pytest.fixture
def upstream() -> Iterator[str]:
    """A stand-in platform that answers every request 200 with its method and path."""

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            body = f"{self.command} {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def post_in_threads(url: str, count: int) -> tuple[list[threading.Thread], list[int]]:
    statuses: list[int] = []

    def post() -> None:
        statuses.append(httpx.post(url, json={"n": 1}, timeout=30).status_code)

    threads = [threading.Thread(target=post) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, statuses


def arrived(proxy: PlatformProxy, count: int) -> None:
    """Wait (bounded) until `count` POSTs reached the proxy."""
    deadline = time.monotonic() + 30
    while sum(r.method == "POST" for r in proxy.received) < count:
        assert time.monotonic() < deadline, proxy.received
        time.sleep(0.01)


def test_requests_are_recorded_and_forwarded(upstream: str) -> None:
    with PlatformProxy(upstream) as proxy:
        answer = httpx.post(f"{proxy.fhir_url}/Encounter?x=1", json={"resourceType": "Encounter"}, timeout=10)

    assert (answer.status_code, answer.text) == (200, "POST /fhir-r4/v1/Encounter?x=1")
    [received] = proxy.received
    assert (received.method, received.path) == ("POST", "/fhir-r4/v1/Encounter?x=1")
    assert b'"resourceType":"Encounter"' in received.body.replace(b" ", b"")


def test_together_releases_only_when_all_wait_at_once(upstream: str) -> None:
    together = Together(3, timeout_s=30)
    with PlatformProxy(upstream) as proxy:
        proxy.hold("POST", "/fhir-r4/v1/Encounter", together, count=3)
        first, statuses = post_in_threads(f"{proxy.fhir_url}/Encounter", 2)
        arrived(proxy, 2)
        other = httpx.get(f"{proxy.fhir_url}/Encounter", timeout=10)  # not held: another method
        assert other.status_code == 200 and statuses == []  # the two POSTs still wait
        last, more = post_in_threads(f"{proxy.fhir_url}/Encounter", 1)
        for thread in first + last:
            thread.join(30)

    assert together.met and statuses + more == [200, 200, 200]
    assert together.passed == ["proxy"] * 3


def test_together_that_times_out_says_so_and_lets_the_requests_through(upstream: str) -> None:
    together = Together(3, timeout_s=0.5)
    with PlatformProxy(upstream) as proxy:
        proxy.hold("POST", "/fhir-r4/v1/Encounter", together, count=3)
        threads, statuses = post_in_threads(f"{proxy.fhir_url}/Encounter", 2)
        for thread in threads:
            thread.join(30)

    assert statuses == [200, 200]
    assert together.timed_out and not together.met


def test_distinct_parties_are_proxies_not_requests(upstream: str) -> None:
    together = Together(2, distinct=True, timeout_s=0.5)
    with PlatformProxy(upstream, "a") as a, PlatformProxy(upstream, "b") as b:
        a.hold("POST", "/fhir-r4/v1/Encounter", together, count=10)
        b.hold("POST", "/fhir-r4/v1/Encounter", together, count=10)
        threads, _ = post_in_threads(f"{a.fhir_url}/Encounter", 2)  # two requests, one party
        for thread in threads:
            thread.join(30)
        assert not together.met
        met = Together(2, distinct=True, timeout_s=30)
        a.hold("POST", "/fhir-r4/v1/Observation", met)
        b.hold("POST", "/fhir-r4/v1/Observation", met)
        threads = (
            post_in_threads(f"{a.fhir_url}/Observation", 1)[0] + post_in_threads(f"{b.fhir_url}/Observation", 1)[0]
        )
        for thread in threads:
            thread.join(30)

    assert met.met and sorted(met.passed) == ["a", "b"]


def test_a_gate_holds_until_opened(upstream: str) -> None:
    gate = Gate(timeout_s=30)
    with PlatformProxy(upstream) as proxy:
        proxy.hold("POST", "/fhir-r4/v1/Encounter", gate)
        threads, statuses = post_in_threads(f"{proxy.fhir_url}/Encounter", 1)
        assert gate.wait_for_arrival(10)
        assert statuses == []
        gate.open()
        threads[0].join(30)
        again = httpx.post(f"{proxy.fhir_url}/Encounter", json={}, timeout=10)  # count=1: only the first is held

    assert statuses == [200] and again.status_code == 200
    assert not gate.timed_out and gate.waiting == 1
