"""The clients a worker process shares across its task runs, built once from the settings.

One SATUSEHAT client per process means one token and one connection pool for every flow the process runs,
instead of a token request per call (the existing gateway's habit). Clients are thread-safe; tasks call them
from worker threads (`asyncio.to_thread`) so async flows never block their event loop on I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

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


def settings() -> Settings:
    return get_settings()


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


def reset() -> None:
    """Forget the settings and close the clients (tests, and a process whose environment changed)."""
    with _lock:
        for client in [*_clients.values(), *_thread_clients]:
            close = getattr(client, "close", None)
            if callable(close):
                close()
        _clients.clear()
        _thread_clients.clear()
        _generation[0] += 1
        get_settings.cache_clear()


def _shared(name: str, build: Callable[[], T]) -> T:
    with _lock:
        if name not in _clients:
            _clients[name] = build()
        return _clients[name]  # type: ignore[return-value]
