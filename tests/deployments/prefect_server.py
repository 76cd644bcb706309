"""A real `prefect server start` (SQLite in a temporary PREFECT_HOME, 127.0.0.1, a free port) and the processes
that talk to it (CLI, worker, `satset serve`), each in its own process group so a test can always stop it.

Used by the deployment tests and the UI test: both need what an operator runs, not the in-process test harness.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from stack.prefect_server import PrefectServer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 180.0
"""A first start migrates a new SQLite database; on a busy 2-core machine that has taken over a minute."""

API_RETRY_S = 60.0
"""How long an API call may keep answering 503 before the test gives up."""

T = TypeVar("T")


def prefect_command(*args: str) -> list[str]:
    """The venv's own `prefect` CLI (the same version the project pins)."""
    return [str(VENV_BIN / "prefect"), *args]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any PREFECT_ setting (the test session's harness must not leak in)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(extra)
    return env


@dataclass
class Background:
    """A process started in a new session (its own process group), its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, first_signal: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Signal the whole group (the process and the flow-run subprocesses it started), then kill what is left."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, first_signal)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        # Children (flow-run subprocesses) may outlive their parent: the group goes in any case.
        _signal_group(self.process.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def start_background(
    name: str, command: Sequence[str], env: Mapping[str, str], log_dir: Path, cwd: Path = PROJECT_ROOT
) -> Background:
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    try:
        process = subprocess.Popen(
            list(command),
            env=dict(env),
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log_file.close()
    return Background(name, process, log_path)


def wait_for(
    check: Callable[[], T | None], what: str, timeout_s: float, interval_s: float = 0.5, alive: Background | None = None
) -> T:
    """Poll `check` until it returns something other than None; fail naming `what` (and the process log) if not."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result is not None:
            return result
        if alive is not None and not alive.alive():
            code = alive.process.returncode
            raise AssertionError(f"{alive.name} exited ({code}) before {what}:\n{alive.log()[-4000:]}")
        if time.monotonic() > deadline:
            tail = f"\n{alive.name} log:\n{alive.log()[-4000:]}" if alive is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")
        time.sleep(interval_s)


@dataclass
class PrefectApi:
    """Test-side calls on a running `stack.prefect_server.PrefectServer`; `env()` is what a client process needs."""

    server: PrefectServer
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.api_url, timeout=30)

    @property
    def home(self) -> Path:
        return self.server.home

    @property
    def ui_url(self) -> str:
        return self.server.ui_url

    @property
    def api_url(self) -> str:
        return self.server.api_url

    def env(self, **extra: str) -> dict[str, str]:
        return clean_environment(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            **extra,
        )

    def healthy(self) -> bool | None:
        try:
            return True if self.http.get("/health").status_code == 200 else None
        except httpx.HTTPError:
            return None

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call; a 503 (SQLite busy under load, which the server reports as unavailable) is tried again.

        Only idempotent calls come here: reads, and flow-run creation with an idempotency key.
        """

        def attempt() -> httpx.Response | None:
            response = self.http.request(method, path, **kwargs)
            return None if response.status_code == 503 else response

        return wait_for(attempt, f"{method} {path} to be served (not 503)", API_RETRY_S, interval_s=1.0)

    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.request("GET", path, **kwargs)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any = None) -> Any:
        response = self.request("POST", path, json=body if body is not None else {})
        response.raise_for_status()
        return response.json() if response.content else None

    def deployment(self, full_name: str) -> dict[str, Any] | None:
        """The deployment "<flow>/<name>" as the REST API returns it, or None while it does not exist."""
        response = self.request("GET", f"/deployments/name/{full_name}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return dict(response.json())

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return dict(self.get(f"/flow_runs/{flow_run_id}"))

    def wait_for_final_state(
        self, flow_run_id: str, timeout_s: float, alive: Background | None = None
    ) -> dict[str, Any]:
        """Poll the run until its state is final (Completed, Failed, Crashed, Cancelled); return the run."""

        def final() -> dict[str, Any] | None:
            run = self.flow_run(flow_run_id)
            state = run.get("state") or {}
            return run if state.get("type") in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

        return wait_for(final, f"flow run {flow_run_id} to finish", timeout_s, interval_s=1.0, alive=alive)

    def run_cli(self, *args: str, timeout_s: float = 300, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess[str]:
        """A `prefect ...` command against this server; a non-zero exit fails with its output."""
        completed = subprocess.run(
            prefect_command(*args), env=self.env(), cwd=cwd, capture_output=True, text=True, timeout=timeout_s
        )
        if completed.returncode != 0:
            raise AssertionError(
                f"prefect {' '.join(args)} exited {completed.returncode}:\n{completed.stdout}\n{completed.stderr}"
            )
        return completed


@contextmanager
def running_prefect_server(directory: Path) -> Iterator[PrefectApi]:
    """`prefect server start` on 127.0.0.1 and a free port, with its own PREFECT_HOME under `directory`.

    No scheduler: tests create their runs themselves, and the poller's interval must not add runs of its own.
    """
    server = PrefectServer(directory / "prefect-home", scheduler=False, start_timeout_s=STARTUP_TIMEOUT_S).start()
    api = PrefectApi(server)
    try:
        yield api
    finally:
        api.http.close()
        server.stop()
