"""What the crash tests need to kill a poller *inside* a chosen step of a chosen order, deterministically.

* `start_holding_simulator()`: the SATUSEHAT simulator (the real app, platform and router emulation) behind an
  ASGI layer that can hold one order's request at one step, and a router whose C-STORE handler can hold one
  order's association after some instances. A held request does not time out on the gateway's side (the
  poller runs with a long SS_TIMEOUT_S), so the worker sits in that step until the test kills it. A hold is
  one-shot and answers, once released, as its mode says:

  - `drop`: nothing reaches the platform; a plain 504 (the request was in flight and never committed);
  - `commit`: the platform does the work first; the answer is a plain 504 (committed, response lost);
  - `delay`: the request goes through unchanged, late (an order kept in flight, for the database restart).

* `start_poller()`: a separate poller process running the `poll-ris` flow against the test Prefect server in a
  loop, as a flow-run process of `satset serve` or a worker does, in its own process group so that one SIGKILL
  takes it and everything it started.

The verdict on each order is the fault matrix's (`fault_harness.judge`), so that every row of the table means the
same.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import uvicorn

from simulator.app import FHIR_PREFIX, create_app
from simulator.config import SimulatorConfig
from simulator.faults import Faults
from simulator.platform import Platform
from simulator.router import RouterEmulator, _read_header
from simulator.server import RunningSimulator
from simulator.store import Store
from tests.deployments.prefect_server import PROJECT_ROOT, Background, clean_environment, start_background

HoldMode = Literal["drop", "commit", "delay"]
HOLD_MAX_S = 240.0
"""A hold never outlives this, whatever the test does (a forgotten hold must not hang the session)."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --- holds -------------------------------------------------------------------------------------------------


@dataclass
class Hold:
    """One order's request at one step: `token` (its identifier value) in the body (POST) or query (GET)."""

    label: str
    mode: HoldMode
    method: str = "POST"
    resource: str = ""
    token: str = ""
    after_instances: int = 0
    """DICOM holds: the C-STORE held is number after_instances + 1 of the order's association."""
    engaged: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def matches_http(self, method: str, path: str, query: str, body: bytes) -> bool:
        if self.resource == "DICOM" or method != self.method or path != f"{FHIR_PREFIX}/{self.resource}":
            return False
        return self.token in (query if method == "GET" else body.decode("utf-8", "replace"))


class Holds:
    """The armed holds, shared by the HTTP layer (uvicorn's loop) and the router's association threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[Hold] = []
        self.all: list[Hold] = []

    def arm(self, hold: Hold) -> Hold:
        with self._lock:
            self._armed.append(hold)
            self.all.append(hold)
        return hold

    def take(self, predicate: Callable[[Hold], bool]) -> Hold | None:
        """The first armed hold the predicate accepts, disarmed (one-shot)."""
        with self._lock:
            for hold in self._armed:
                if predicate(hold):
                    self._armed.remove(hold)
                    return hold
        return None

    def any_armed(self) -> bool:
        with self._lock:
            return bool(self._armed)

    def engaged(self) -> list[str]:
        return [hold.label for hold in self.all if hold.engaged.is_set()]

    def release_all(self) -> None:
        """Let every held request or association go (and disarm the rest)."""
        with self._lock:
            self._armed.clear()
        for hold in self.all:
            hold.released.set()


class HoldingApp:
    """ASGI layer in front of the simulator's app: holds the request an armed Hold matches."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], holds: Holds) -> None:
        self.app = app
        self.holds = holds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.holds.any_armed():
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []
        body = b""
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        method, path, query = scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1")
        hold = self.holds.take(lambda h: h.matches_http(method, path, query, body))
        if hold is None:
            await self.app(scope, replay, send)
            return
        if hold.mode == "commit":
            await self.app(scope, replay, _discard)
        if hold.mode != "delay":
            hold.engaged.set()
            await _wait_released(hold)
            await _gateway_timeout(send)
            return
        hold.engaged.set()
        await _wait_released(hold)
        await self.app(scope, replay, send)


async def _discard(message: Message) -> None:
    """The platform's answer to a committed request, thrown away (the response the gateway never gets)."""


async def _wait_released(hold: Hold) -> None:
    deadline = time.monotonic() + HOLD_MAX_S
    while not hold.released.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _gateway_timeout(send: Send) -> None:
    """The platform's gateway giving up: a plain-text 504 (to a client that is usually dead by then)."""
    with suppress(Exception):
        await send({"type": "http.response.start", "status": 504, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Gateway Timeout"})


class HoldingRouter(RouterEmulator):
    """The router emulation, with one order's association held inside the C-STORE of a chosen instance."""

    def __init__(self, platform: Platform, holds: Holds) -> None:
        super().__init__(platform, platform.faults)
        self.holds = holds
        self._stores_by_association: dict[int, int] = {}
        self._count_lock = threading.Lock()

    def _on_store(self, event: Any) -> int:
        if self.holds.any_armed():
            accession = str(_read_header(event).get("AccessionNumber", ""))
            with self._count_lock:
                key = id(event.assoc)
                stored_before = self._stores_by_association.get(key, 0)
                self._stores_by_association[key] = stored_before + 1
            hold = self.holds.take(
                lambda h: h.resource == "DICOM" and h.token == accession and h.after_instances == stored_before
            )
            if hold is not None:  # this association's thread waits; the gateway waits for the C-STORE response
                hold.engaged.set()
                hold.released.wait(HOLD_MAX_S)
        return super()._on_store(event)


def start_holding_simulator(config: SimulatorConfig) -> tuple[RunningSimulator, Holds]:
    """The simulator as `simulator.server.start_simulator` builds it, with the hold layer in front of it."""
    store = Store(config.db_path)
    platform = Platform(config, store, Faults())
    holds = Holds()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.http_port))
    app = HoldingApp(create_app(platform), holds)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30)
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="crash-simulator", daemon=True)
    thread.start()
    router = HoldingRouter(platform, holds)
    dicom_port = router.start()
    running = RunningSimulator(config, platform, sock.getsockname()[1], dicom_port, server, thread, router)
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            running.stop()
            raise RuntimeError("the holding simulator did not start within 30 s")
        time.sleep(0.01)
    return running, holds


# --- the poller process ------------------------------------------------------------------------------------


def poller_env(
    base: Mapping[str, str], prefect_api_url: str, prefect_home: Path, ris_url: str, **extra: str
) -> dict[str, str]:
    """A gateway host's environment for the poller: the test Prefect server, the gateway settings, the RIS.

    Both pollers of a test share `prefect_home`, as two runs on one host share Prefect's result storage (the
    task cache that lets a re-run skip finished steps).
    """
    return clean_environment(
        **base,
        PREFECT_API_URL=prefect_api_url,
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        RIS_DATABASE_URL=ris_url,
        **extra,
    )


POLLER = """
import asyncio, os, pathlib

from flows.poll import poll_ris


async def main() -> None:
    go = os.environ.get("CRASH_GO_FILE")
    while go and not pathlib.Path(go).exists():
        await asyncio.sleep(0.1)
    while True:
        print("poll-ris", await poll_ris(), flush=True)
        await asyncio.sleep(float(os.environ.get("CRASH_POLL_PAUSE_S", "1")))


asyncio.run(main())
"""
"""The poller process: `poll-ris` in a loop, as `satset serve` runs it on its schedule (one poll at a time), only
more often. It imports the gateway (not this module: the simulator's imports have no place in a gateway host),
then waits for `CRASH_GO_FILE` to exist, so a test can start it early and let it poll at a moment it chooses."""


def start_poller(name: str, env: Mapping[str, str], log_dir: Path, go_file: Path | None = None) -> Background:
    """A separate poller process in its own process group (its log in `log_dir`/`name`.log); with `go_file`, its
    first poll waits until that file exists (see `go`)."""
    extra = {"CRASH_GO_FILE": str(go_file)} if go_file is not None else {}
    return start_background(name, [sys.executable, "-c", POLLER], {**env, **extra}, log_dir, cwd=PROJECT_ROOT)


def go(go_file: Path) -> None:
    """Let a poller started with `go_file` begin polling."""
    go_file.touch()


def sigkill(poller: Background) -> None:
    """SIGKILL the poller's whole process group, as a crashed host or the OOM killer would, and reap it."""
    with suppress(ProcessLookupError):
        os.killpg(poller.process.pid, signal.SIGKILL)
    poller.process.wait(timeout=30)
