"""A reverse proxy in front of the simulator's HTTP face (OAuth2 and FHIR), in the test process: it records every
request the gateway sends to the platform, and can hold chosen requests at a barrier the test controls.

Why a proxy: the simulator answers every request on one event loop, so nothing inside it may block; here each
request has a thread of its own, which may wait. Point the gateway at `auth_url` and `fhir_url`.

* `received`: every request as it arrived (method, path with its query, headers, body), for tests of what reached
  the platform (tests/security: no patient name in any of it).
* `hold(method, path_prefix, gate, count)`: the next `count` matching requests wait at `gate`, then go on to the
  platform unchanged. `Together(n)` lets them go once n requests wait at it (n batches at once), or, with
  `distinct=True`, once requests from n proxies sharing it wait (one proxy per poller process: every poller is
  working); `Gate` when the test opens it. A gate waits at most `timeout_s`, then lets
  the requests through and records that it timed out, so a test asserts its barrier was really met instead of
  trusting the clock. Keep the gateway's SS_TIMEOUT_S above `timeout_s`: a request the gateway gave up on would
  still be forwarded when the gate opens.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import urlsplit

from simulator.app import AUTH_PREFIX, FHIR_PREFIX

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})
UPSTREAM_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Received:
    """One request as the proxy received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def text(self) -> str:
        """The whole request as text (request line, headers, body), for scanning."""
        shown = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
        return f"{self.method} {self.path}\n{shown}\n\n{self.body.decode('utf-8', 'replace')}"


class Waitable(Protocol):
    def wait(self, label: str) -> None: ...


@dataclass
class Together:
    """Holds the requests waiting at it until `parties` of them wait at once, then lets every request through from
    then on (a latch). With `distinct`, the parties are distinct labels (proxies), not requests: one proxy per
    poller, and every poller must be there."""

    parties: int
    distinct: bool = False
    timeout_s: float = 180.0
    timed_out: bool = False
    passed: list[str] = field(default_factory=list)
    """The labels (proxy names) of the requests that went through, in order."""

    def __post_init__(self) -> None:
        self._arrived: list[str] = []
        self._met = False
        self._condition = threading.Condition()

    def wait(self, label: str) -> None:
        with self._condition:
            self._arrived.append(label)
            present = set(self._arrived) if self.distinct else self._arrived
            if len(present) >= self.parties:
                self._met = True
                self._condition.notify_all()
            elif not self._condition.wait_for(lambda: self._met, self.timeout_s):
                self.timed_out = True  # go on, and say so: the test fails on `met`, not on a hang
            self.passed.append(label)

    @property
    def met(self) -> bool:
        """Every party was there while the others were still waiting."""
        with self._condition:
            return self._met and not self.timed_out


@dataclass
class Gate:
    """Holds the requests waiting at it until the test calls `open()`."""

    timeout_s: float = 180.0
    timed_out: bool = False
    waiting: int = 0
    """Requests that arrived at the gate (waiting now or let through)."""

    def __post_init__(self) -> None:
        self._open = threading.Event()
        self._arrived = threading.Condition()

    def wait(self, label: str) -> None:
        with self._arrived:
            self.waiting += 1
            self._arrived.notify_all()
        if not self._open.wait(self.timeout_s):
            self.timed_out = True

    def wait_for_arrival(self, timeout_s: float) -> bool:
        """Block until a request waits at the gate (True), or the gate is opened or `timeout_s` passes first."""
        with self._arrived:
            self._arrived.wait_for(lambda: self.waiting > 0 or self._open.is_set(), timeout_s)
            return self.waiting > 0

    def open(self) -> None:
        self._open.set()
        with self._arrived:
            self._arrived.notify_all()


@dataclass
class _Hold:
    method: str
    path_prefix: str
    gate: Waitable
    remaining: int


class PlatformProxy:
    """Reverse proxy to `upstream` (the simulator's base URL), recording requests and holding the ones asked for."""

    def __init__(self, upstream: str, name: str = "proxy") -> None:
        parts = urlsplit(upstream)
        self.name = name
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.received: list[Received] = []
        self._holds: list[_Hold] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet: the test prints what matters
                return

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                gate = proxy._arrive(Received(self.command, self.path, headers, body))
                if gate is not None:
                    gate.wait(proxy.name)
                connection = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=UPSTREAM_TIMEOUT_S
                )
                try:
                    connection.request(self.command, self.path, body=body or None, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    out = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                    status = response.status
                except OSError:
                    status, out, data = 502, [("Content-Type", "text/plain")], b"Bad Gateway"
                finally:
                    connection.close()
                self.send_response(status)
                for key, value in out:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"{name}-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def auth_url(self) -> str:
        """SS_AUTH_URL through the proxy."""
        return self.url + AUTH_PREFIX

    @property
    def fhir_url(self) -> str:
        """SS_BASE_URL through the proxy."""
        return self.url + FHIR_PREFIX

    def hold(self, method: str, path_prefix: str, gate: Waitable, count: int = 1) -> None:
        """Make the next `count` requests `method path_prefix...` wait at `gate` before they are forwarded."""
        with self._lock:
            self._holds.append(_Hold(method, path_prefix, gate, count))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> PlatformProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _arrive(self, request: Received) -> Waitable | None:
        """Record the request; the gate it must wait at, if a hold matches (consuming one use of it)."""
        with self._lock:
            self.received.append(request)
            for hold in self._holds:
                if hold.remaining > 0 and request.method == hold.method and request.path.startswith(hold.path_prefix):
                    hold.remaining -= 1
                    return hold.gate
        return None
