"""The clients a worker process shares across its task runs, built once from the settings.

One SATUSEHAT client per process means one token and one connection pool for every flow the process runs,
instead of a token request per call (the existing gateway's habit). Clients are thread-safe; tasks call them
from the threads of `io_pool()` so async flows never block their event loop on I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from clients.log_file import attach_log_file
from clients.pacs import PacsClient
from clients.router import RouterClient
from clients.satusehat import SatusehatClient
from models.settings import Settings, get_settings

_lock = threading.Lock()
_clients: dict[str, object] = {}
_per_thread = threading.local()
_thread_clients: list[PacsClient] = []
_generation = [0]
"""Bumped by reset(), so every thread builds its per-thread clients again from the new settings."""

T = TypeVar("T")

IO_THREADS = 64
"""Blocking client calls in flight at once per process. asyncio's default pool has min(32, cores + 4) threads,
6 on a 2-core host: with the platform 150 ms away that caps a worker at 40 requests/s whatever POLL_CONCURRENCY
says, and queued calls hold their flow runs open. The threads mostly wait on sockets; the SS_MAX_RPS bucket,
not the pool, is what limits the rate."""


def settings() -> Settings:
    """The process's settings; the first call also opens LOG_FILE, so a flow run started by a worker or by
    `satset serve` (a process of its own, never through the `satset` command) writes to it as well."""
    current = get_settings()
    attach_log_file(current.log_file)
    return current


def satusehat() -> SatusehatClient:
    return _shared("satusehat", lambda: SatusehatClient.from_settings(settings()))


def pacs() -> PacsClient:
    """One PACS client per thread: dicomweb-client sits on a requests.Session, which is not thread-safe."""
    client: PacsClient | None = getattr(_per_thread, "pacs", None)
    if client is None or getattr(_per_thread, "generation", None) != _generation[0]:
        client = _per_thread.pacs = PacsClient.from_settings(settings())
        _per_thread.generation = _generation[0]
        with _lock:
            _thread_clients.append(client)
    return client


def router() -> RouterClient:
    return _shared("router", lambda: RouterClient.from_settings(settings()))


def io_pool() -> ThreadPoolExecutor:
    """The process's threads for blocking I/O calls (platform, PACS, router), separate from asyncio's default."""
    return _shared("io-pool", lambda: ThreadPoolExecutor(IO_THREADS, thread_name_prefix="satset-io"))


def reset() -> None:
    """Forget the settings and close the clients (tests, and a process whose environment changed)."""
    with _lock:
        for client in [*_clients.values(), *_thread_clients]:
            if isinstance(client, ThreadPoolExecutor):
                continue  # calls may still be in flight; the pool holds no settings and is kept
            close = getattr(client, "close", None)
            if callable(close):
                close()
        pool = _clients.get("io-pool")
        _clients.clear()
        if pool is not None:
            _clients["io-pool"] = pool
        _thread_clients.clear()
        _generation[0] += 1
        get_settings.cache_clear()


def _shared(name: str, build: Callable[[], T]) -> T:
    with _lock:
        if name not in _clients:
            _clients[name] = build()
        return _clients[name]  # type: ignore[return-value]
