"""LOG_FILE: the gateway's own log on disk, as the existing gateway kept one, beside Prefect's run logs.

Prefect keeps each run's log in its database (the UI shows it); a hospital's operators also grep a plain file and
rotate it with logrotate. One handler on the root logger catches the gateway's loggers (clients, api, flows) and
Prefect's flow and task run loggers, which propagate to it. A WatchedFileHandler reopens the file when logrotate
moves it away. What goes in is what the loggers say, and they never say secrets or patient names
(tests/security/test_leaks.py scans this file too).
"""

from __future__ import annotations

import logging
import threading
from logging.handlers import WatchedFileHandler
from pathlib import Path

from models.settings import SettingsError

GATEWAY_LOGGERS = ("satset", "api", "clients", "flows", "tasks", "simulator")
"""The gateway's logger names (modules log under their package name, the API under `satset.api`)."""

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"

_lock = threading.Lock()
_attached: dict[Path, WatchedFileHandler] = {}


def attach_log_file(path: Path | None, level: int = logging.INFO) -> WatchedFileHandler | None:
    """Also write the gateway's and Prefect's run log records at `level` and above to `path` (None: no file).

    Idempotent per path and process, so every entry point (CLI commands, flow processes started by a worker) may
    call it. An unwritable path raises SettingsError naming LOG_FILE rather than running without the log asked for.
    """
    if path is None:
        return None
    if (known := _attached.get(path)) is not None:  # the common case: every settings() call of a flow run
        return known
    given, path = path, path.expanduser().resolve()
    with _lock:
        if path in _attached:
            _attached[given] = _attached[path]
            return _attached[path]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = WatchedFileHandler(path, encoding="utf-8", delay=False)
        except OSError as error:
            raise SettingsError(f"LOG_FILE: cannot open {str(path)!r} for writing ({error.strerror})") from None
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(FORMAT))
        logging.getLogger().addHandler(handler)
        for name in GATEWAY_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET or logger.level > level:
                logger.setLevel(level)
        _attached[path] = _attached[given] = handler
        return handler


def detach_log_files() -> None:
    """Close every handler attach_log_file added (tests; a process that changes LOG_FILE)."""
    with _lock:
        for handler in set(_attached.values()):
            logging.getLogger().removeHandler(handler)
            handler.close()
        _attached.clear()
