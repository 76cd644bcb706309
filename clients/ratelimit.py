"""A small thread-safe token bucket that caps how fast one process calls an upstream.

SATUSEHAT publishes no rate limit, so the cap is optional (`SS_MAX_RPS`): it exists for hospitals whose
contract or shared egress asks them to stay under a number. The bucket is per process; Prefect's global
concurrency limits are the tool for a cap across workers.

Callers *reserve* a slot under the lock and sleep outside it, so threads are served in the order they
arrived and nobody holds the lock while waiting. The clock and the sleep are injectable so tests can check
the pacing without waiting on the wall clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["RateLimiter", "RequestWindow"]


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


class RequestWindow:
    """At most `limit` requests in any `window_s` as the upstream sees them, whatever delays them on the way.

    The token bucket spaces requests as they leave, but a busy host, a queue in the network or the upstream's own
    scheduling can bunch requests that left evenly spaced (measured: 98 arrivals in one second at the platform
    under an 80/s bucket, on a loaded 2-core host). So here a request holds a place from the moment it is sent
    until `window_s` after its answer came back, and a request is sent only while fewer than `limit` places are
    held. Then no window of `window_s` at the upstream holds more than `limit` arrivals: the last of them to be
    sent was sent after all the others, each of which was then either in flight or answered less than `window_s`
    before (it arrived inside the window), so each held a place. The price: a request holds its place for its
    latency on top of the window, so the steady rate is at most `limit / (window_s + latency)`.
    """

    def __init__(self, limit: int, window_s: float = 1.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        self.limit = limit
        self.window_s = float(window_s)
        self._clock = clock
        self._changed = threading.Condition()
        self._in_flight = 0
        self._answered: deque[float] = deque()
        """When each answer came back, oldest first (read under the lock, so in order)."""

    @classmethod
    def per_second(cls, rate_per_second: float, **kwargs: Callable[[], float]) -> RequestWindow:
        """The window for a cap in requests per second: 80/s is 80 per second, 0.5/s is 1 per 2 seconds."""
        if not rate_per_second > 0:
            raise ValueError(f"rate_per_second must be positive, got {rate_per_second!r}")
        limit = max(1, math.floor(rate_per_second))
        return cls(limit, limit / rate_per_second, **kwargs)

    def try_acquire(self) -> float:
        """Take a place and return 0.0, or return how long until one may free up (inf: when an answer comes)."""
        with self._changed:
            return self._try_acquire()

    def _try_acquire(self) -> float:
        now = self._clock()
        while self._answered and self._answered[0] <= now - self.window_s:
            self._answered.popleft()
        if self._in_flight + len(self._answered) < self.limit:
            self._in_flight += 1
            return 0.0
        if self._answered:
            return max(self._answered[0] + self.window_s - now, 0.0) or 1e-3
        return math.inf

    def acquire(self) -> None:
        """Block until the caller may send one request; call `release()` once its answer (or its failure) is back."""
        with self._changed:
            while (wait := self._try_acquire()) > 0:
                self._changed.wait(None if math.isinf(wait) else wait)

    def release(self) -> None:
        """The request's answer is back (or it failed): its place stays held for `window_s` from now."""
        with self._changed:
            if self._in_flight < 1:
                raise RuntimeError("release() without acquire()")
            self._in_flight -= 1
            self._answered.append(self._clock())
            self._changed.notify_all()  # waiters recompute when the oldest place frees

    @property
    def held(self) -> int:
        """Places held now (requests in flight, and answered within the last window)."""
        with self._changed:
            now = self._clock()
            return self._in_flight + sum(1 for answered in self._answered if answered > now - self.window_s)

    def __repr__(self) -> str:
        return f"RequestWindow(limit={self.limit!r}, window_s={self.window_s!r})"
