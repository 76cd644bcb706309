"""A real `prefect server start` as a child process on 127.0.0.1: for the demo, benchmarks and scale-out tests.

SQLite in its own PREFECT_HOME by default; pass `database_url` (postgresql+asyncpg://...) for the production shape.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from stack.ports import LOOPBACK, free_port


class PrefectServerError(RuntimeError):
    """The server did not become healthy; the message carries the tail of its log."""


class PrefectServer:
    """`prefect server start` on a free port; `api_url` for clients and workers, `ui_url` for people."""

    def __init__(
        self,
        home: Path | None = None,
        *,
        port: int | None = None,
        database_url: str | None = None,
        scheduler: bool = True,
        start_timeout_s: float = 180.0,
    ) -> None:
        self._own_home = home is None
        self.home = Path(tempfile.mkdtemp(prefix="satset-prefect-")) if home is None else home
        self.port = port or free_port()
        self.database_url = database_url
        self.scheduler = scheduler
        """Off in tests that create their runs themselves, so interval schedules add none of their own."""
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = self.home / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def client_env(self) -> dict[str, str]:
        """What a process needs to talk to this server (flows, workers, `satset serve`)."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_UI_URL": self.ui_url, "PREFECT_HOME": str(self.home)}

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": self.api_url,  # else the UI asks port 4200, whatever --port says
        }
        env.pop("PREFECT_API_URL", None)
        if self.database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.database_url
        command = [_prefect_cli(), "server", "start", "--host", LOOPBACK, "--port", str(self.port)]
        if not self.scheduler:
            command.append("--no-scheduler")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._wait_healthy()
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        """The `prefect server start` process (its API workers are its children)."""
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        self.stop()
        raise PrefectServerError(
            f"the Prefect server did not become healthy within {self.start_timeout_s:.0f} s\n{tail}"
        )


def _prefect_cli() -> str:
    """The `prefect` executable of this environment (next to this Python), so the server matches the client."""
    beside = Path(sys.executable).with_name("prefect")
    return str(beside) if beside.exists() else "prefect"
