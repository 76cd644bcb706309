"""A small thread-safe token bucket that caps how fast one process calls an upstream.

SATUSEHAT publishes no rate limit, so the cap is optional (`SS_MAX_RPS`): it exists for hospitals whose
contract or shared egress asks them to stay under a number. The bucket is per process; Prefect's global
concurrency limits are the tool for a cap across workers.

Callers *reserve* a slot under the lock and sleep outside it, so threads are served in the order they
arrived and nobody holds the lock while waiting. The clock and the sleep are injectable so tests can check
the pacing without waiting on the wall clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Allow on average `rate_per_second` acquisitions per second, with at most `burst` back to back."""

    def __init__(
        self,
        rate_per_second: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate_per_second > 0:
            raise ValueError(f"rate_per_second must be positive, got {rate_per_second!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate_per_second = float(rate_per_second)
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._updated = clock()

    def reserve(self) -> float:
        """Take one slot now and return how many seconds the caller must wait before using it."""
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._updated)
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate_per_second)
            self._updated = now
            self._tokens -= 1.0
            return -self._tokens / self.rate_per_second if self._tokens < 0 else 0.0

    def acquire(self) -> None:
        """Block until the caller may make one request."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)

    def __repr__(self) -> str:
        return f"RateLimiter(rate_per_second={self.rate_per_second!r}, burst={self.burst!r})"
