"""Fault injection: make the simulator misbehave the way the real platform and router do, on demand.

Off unless something arms it. Tests and benchmarks arm it from outside the process through the admin endpoint
(`POST /admin/faults`), or at start-up through `satset simulator --fault ...`. Each armed fault fires for the next
`count` matching requests (or for a `fraction` of them, at random) and then disarms itself.
"""

from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass
from typing import Any, Literal

HttpFaultKind = Literal["429", "500", "504", "hang", "lost-response"]
RouterFaultKind = Literal["abort", "status", "lose"]


@dataclass
class HttpFault:
    """Answer matching requests with 429 (+Retry-After), a JSON 500, a plain-text 504, a hang past the timeout,
    or `lost-response`: do the work, then answer a plain-text 504 as a gateway that timed out on a backend which
    committed anyway (the case that makes naive clients create a resource twice)."""

    kind: HttpFaultKind
    count: int | None = 1
    fraction: float | None = None
    retry_after_s: float = 1.0
    hang_s: float = 60.0
    path_prefix: str = ""
    """Only requests whose path starts with this, e.g. '/fhir-r4/v1/Observation' or '/oauth2'."""
    method: str | None = None


@dataclass
class RouterFault:
    """Make the router abort an association after `after_instances`, answer `status` to C-STORE requests, or
    `lose` the instance after `after_instances`: answer Success (as the router does, before any work) and leave it
    out of the ImagingStudy, as a router that failed to process a file it had acknowledged."""

    kind: RouterFaultKind
    count: int | None = 1
    """How many associations (abort, lose) or instances (status) it applies to."""
    fraction: float | None = None
    after_instances: int = 0
    status: int = 0xA700


class Faults:
    """The armed faults and per-request latency, safe to use from the HTTP workers and the router's threads."""

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._http: list[HttpFault] = []
        self._router: list[RouterFault] = []
        self.latency_s: float = 0.0
        self._random = random.Random(seed)

    def arm_http(self, fault: HttpFault) -> None:
        with self._lock:
            self._http.append(fault)

    def arm_router(self, fault: RouterFault) -> None:
        with self._lock:
            self._router.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._http.clear()
            self._router.clear()
            self.latency_s = 0.0

    def take_http(self, method: str, path: str) -> HttpFault | None:
        """The fault this request must suffer, if any (consuming one use of it)."""
        with self._lock:
            for fault in self._http:
                if not path.startswith(fault.path_prefix) or (fault.method and fault.method != method):
                    continue
                if self._fires(fault):
                    self._consume(self._http, fault)
                    return fault
        return None

    def take_router(self, kind: RouterFaultKind) -> RouterFault | None:
        with self._lock:
            for fault in self._router:
                if fault.kind == kind and self._fires(fault):
                    self._consume(self._router, fault)
                    return fault
        return None

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latency_s": self.latency_s,
                "http": [asdict(f) for f in self._http],
                "router": [asdict(f) for f in self._router],
            }

    def _fires(self, fault: HttpFault | RouterFault) -> bool:
        return fault.fraction is None or self._random.random() < fault.fraction

    @staticmethod
    def _consume(armed: list[Any], fault: HttpFault | RouterFault) -> None:
        if fault.count is None:
            return
        fault.count -= 1
        if fault.count <= 0:
            armed.remove(fault)
