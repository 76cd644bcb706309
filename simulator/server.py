"""Run the simulator: the HTTP app under uvicorn and the router emulation, in one process, on 127.0.0.1.

`start_simulator()` is what the tests, the demo and `satset simulator` use; it returns once both listeners
accept connections and says where they are.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn

from simulator.app import AUTH_PREFIX, FHIR_PREFIX, STOW_PATH, create_app
from simulator.config import SimulatorConfig
from simulator.faults import Faults
from simulator.platform import Platform
from simulator.store import Store


@dataclass
class RunningSimulator:
    """A started simulator: its URLs, its platform (for inspection in tests) and how to stop it."""

    config: SimulatorConfig
    platform: Platform
    http_port: int
    dicom_port: int | None
    _server: uvicorn.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _router: object | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.http_port}"

    @property
    def auth_url(self) -> str:
        return self.base_url + AUTH_PREFIX

    @property
    def fhir_url(self) -> str:
        return self.base_url + FHIR_PREFIX

    @property
    def stow_url(self) -> str:
        return self.base_url + STOW_PATH

    def describe(self) -> str:
        lines = [
            f"SATUSEHAT simulator ready (org {self.config.org_id}, client id {self.config.client_id})",
            f"  SS_AUTH_URL={self.auth_url}",
            f"  SS_BASE_URL={self.fhir_url}",
            f"  STOW (router uploads): {self.stow_url}",
        ]
        if self.dicom_port is not None:
            lines.append(
                f"  DICOM Router: AE {self.config.router_aet} at {self.config.host}:{self.dicom_port} "
                f"(ROUTER_IP={self.config.host} ROUTER_PORT={self.dicom_port} ROUTER_AET={self.config.router_aet})"
            )
        if self.config.admin_enabled:
            lines.append(f"  Admin (faults, inspection): {self.base_url}/admin/state")
        return "\n".join(lines)

    def serve_until_signalled(self) -> None:
        """Block until SIGTERM or Ctrl-C, then stop: how a simulator runs as a process of its own (the CLI, the
        benchmarks' host). Call from the main thread (signal handlers are installed there)."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        if self._router is not None:
            self._router.stop()  # type: ignore[attr-defined]
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.platform.store.close()

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_simulator(config: SimulatorConfig | None = None, ready_timeout_s: float = 30.0) -> RunningSimulator:
    """Start the HTTP app (and the router emulation unless disabled); return when both accept connections."""
    config = config or SimulatorConfig()
    store = Store(config.db_path)
    platform = Platform(config, store, Faults())

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.http_port))
    http_port = sock.getsockname()[1]

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(platform), log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the caller owns signals
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="simulator-http", daemon=True)
    thread.start()

    router = None
    dicom_port = None
    if config.router_enabled:
        from simulator.router import RouterEmulator

        router = RouterEmulator(platform, platform.faults)
        dicom_port = router.start()

    running = RunningSimulator(config, platform, http_port, dicom_port, server, thread, router)
    _wait_until(lambda: server.started, ready_timeout_s, running)
    return running


def _wait_until(condition: Callable[[], bool], timeout_s: float, running: RunningSimulator) -> None:
    """Poll `condition` until true; stop what was started and fail if the deadline passes first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            running.stop()
            raise RuntimeError(f"the simulator did not start within {timeout_s:.0f} s")
        time.sleep(0.01)
