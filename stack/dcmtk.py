"""dcmtk's storescu and storescp as tools for tests, the demo and the benchmarks.

They are the reference C-STORE peers: storescp stands in for the SATUSEHAT DICOM Router, storescu for a modality.
Every process gets TCP_NODELAY=1, because Debian's dcmtk 3.6.7 otherwise leaves Nagle on and stalls each C-STORE
about 45 ms (300 instances: 13.5 s instead of 0.4 s); storescp also gets the loopback shim so it listens on
127.0.0.1 only. Outcomes are values (exit code, output), not exceptions: the caller decides what a failure means.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from stack.loopback import loopback_env
from stack.ports import LOOPBACK, free_port


class DcmtkError(RuntimeError):
    """A dcmtk tool is missing or storescp did not start."""


def find_tool(name: str) -> Path | None:
    """The dcmtk executable `name` (storescu, storescp, ...) on PATH, or None."""
    found = shutil.which(name)
    return Path(found) if found else None


@dataclass(frozen=True)
class ToolResult:
    """What a dcmtk process did: its command line, exit code and output."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """Exit code 0. For storescu that means the association went through, not that every store succeeded."""
        return self.returncode == 0

    @property
    def stores_succeeded(self) -> int:
        """storescu -v: how many C-STORE responses said Success."""
        return (self.stdout + self.stderr).count("Received Store Response (Success)")


def storescu(
    host: str,
    port: int,
    paths: Iterable[Path | str],
    *,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "STORESCU",
    extra_args: Sequence[str] = (),
    timeout_s: float = 300.0,
) -> ToolResult:
    """Send files and directories (walked recursively) to host:port in one association.

    Pass directories for large studies: every file path is one command-line argument.

    storescu proposes the transfer syntax each file has (`--propose-lossless` etc. in `extra_args` change that);
    with -v the output has one "Received Store Response (Success)" line per instance accepted.
    """
    tool = find_tool("storescu")
    if tool is None:
        raise DcmtkError("storescu not found: install dcmtk (Debian/Ubuntu: apt-get install dcmtk)")
    items = [str(p) for p in paths]
    if not items:
        raise ValueError("storescu needs at least one file or directory")
    args = [str(tool), "-v", "-aet", calling_aet, "-aec", called_aet]
    if any(Path(p).is_dir() for p in items):
        args += ["+sd", "+r"]  # scan directories, recursively
    args += [*extra_args, host, str(port), *items]
    env = dict(os.environ, TCP_NODELAY="1")
    completed = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    return ToolResult(tuple(args), completed.returncode, completed.stdout, completed.stderr)


class StoreSCP:
    """dcmtk storescp on a free 127.0.0.1 port, writing every received instance to `output_dir` as *.dcm.

    `ignore=True` receives without writing (the fastest possible receiver, for benchmarks). `accept_all=True`
    (default) accepts compressed transfer syntaxes too, as the SATUSEHAT router does.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        ignore: bool = False,
        accept_all: bool = True,
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 10.0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.aet = aet
        self._fixed_port = port
        self._ignore = ignore
        self._accept_all = accept_all
        self._extra_args = tuple(extra_args)
        self._start_timeout_s = start_timeout_s
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        """storescp's verbose output, a hidden file in the output directory (received files end in .dcm)."""
        return self.output_dir / ".storescp.log"

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The storescp process (with --fork, the parent of one child per association)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start storescp and return once its port accepts TCP connections."""
        tool = find_tool("storescp")
        if tool is None:
            raise DcmtkError("storescp not found: install dcmtk (Debian/Ubuntu: apt-get install dcmtk)")
        if self._process is not None:
            raise DcmtkError("storescp is already running")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.port = self._fixed_port or free_port()
        args = [str(tool), "-v", "-aet", self.aet, "-od", str(self.output_dir), "-fe", ".dcm"]
        if self._accept_all:
            args.append("+xa")
        if self._ignore:
            args.append("--ignore")
        args += [*self._extra_args, str(self.port)]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=loopback_env()
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise DcmtkError(f"storescp exited with code {code} before listening:\n{self.log()}")
            try:
                # A bare connect+close makes storescp log one failed association and go on listening.
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise DcmtkError(f"storescp did not listen on {LOOPBACK}:{self.port} within {self._start_timeout_s} s")
            time.sleep(0.01)

    def stop(self) -> int | None:
        """Stop storescp (SIGTERM, then SIGKILL after 5 s) and return its exit code."""
        process, self._process = self._process, None
        if process is None:
            return self.returncode
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.returncode = process.returncode
        return self.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def received_files(self) -> list[Path]:
        """The *.dcm files written so far, sorted by name; empty ones (emptied for storescp to overwrite, as the
        benchmarks' Receiver.clear does) are not counted."""
        return sorted(path for path in self.output_dir.glob("*.dcm") if path.stat().st_size > 0)

    def wait_for_files(self, count: int, timeout_s: float = 30.0) -> list[Path]:
        """Poll until at least `count` files are there or the deadline passes; return what is there."""
        deadline = time.monotonic() + timeout_s
        while True:
            files = self.received_files()
            if len(files) >= count or time.monotonic() > deadline or not self.running:
                return files
            time.sleep(0.01)
