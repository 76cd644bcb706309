"""Debian's headless Chromium, driven from the command line: the DOM of a page after its scripts ran, or a PNG.

Flags as this machine kind needs them (root, no network): no sandbox, no GPU, and no background connections to
Google's hosts, each call with a new empty profile so nothing carries over between pages.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIRTUAL_TIME_BUDGET_MS = 15000
"""Virtual time the page gets to fetch from the API and render (it runs faster than wall time when idle)."""
WINDOW_SIZE = "1400,900"


def find_chromium() -> str | None:
    """The Chromium executable (Debian package 'chromium'), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(arguments: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    executable = find_chromium()
    if executable is None:
        raise FileNotFoundError("chromium is not installed (Debian package 'chromium')")
    with tempfile.TemporaryDirectory(prefix="satset-chromium-") as profile:
        command = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if completed.returncode != 0:
        raise RuntimeError(f"chromium exited {completed.returncode}: {completed.stderr[-2000:]}")
    return completed


def dump_dom(url: str, budget_ms: int = VIRTUAL_TIME_BUDGET_MS, timeout_s: float = 120) -> str:
    """The serialised DOM of `url` once its scripts had `budget_ms` of virtual time."""
    return _run(
        [f"--virtual-time-budget={budget_ms}", f"--window-size={WINDOW_SIZE}", "--dump-dom", url], timeout_s
    ).stdout


def screenshot(url: str, path: Path, budget_ms: int = VIRTUAL_TIME_BUDGET_MS, timeout_s: float = 120) -> Path:
    """A PNG of `url` in a 1400×900 window."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--virtual-time-budget={budget_ms}", f"--window-size={WINDOW_SIZE}", f"--screenshot={path}", url], timeout_s)
    if not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {path}")
    return path
