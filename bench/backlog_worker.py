"""A gateway worker draining the RIS table, for bench/backlog.py: `python -m bench.backlog_worker BATCH CONCURRENCY`.

Runs the real `poll-ris` flow (on the Prefect server in PREFECT_API_URL, the RIS table in RIS_DATABASE_URL, the
platform cap in SS_MAX_RPS) again and again, as its schedule would, until a poll claims nothing; prints one JSON
line: wall time, polls and their summaries, this process's CPU seconds. A process of its own, as `satset serve`
runs flows, so the benchmark's own interpreter and the simulator's do not share its GIL.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any


async def drain(batch_size: int, concurrency: int) -> dict[str, Any]:
    from flows.poll import poll_ris

    polls: list[dict[str, Any]] = []
    started = time.perf_counter()
    while True:
        poll_started = time.perf_counter()
        summary = await poll_ris(batch_size=batch_size, concurrency=concurrency)
        polls.append({**summary, "wall_s": round(time.perf_counter() - poll_started, 3)})
        if not summary["claimed"]:
            break
    return {"wall_s": time.perf_counter() - started, "polls": polls}


def _count_prefect_requests() -> dict[str, int]:
    """Count the worker's requests to the Prefect API by method and path (ids blanked): where per-order cost goes."""
    import re
    from collections import Counter

    from prefect.client.base import PrefectHttpxAsyncClient

    counted: Counter[str] = Counter()
    real = PrefectHttpxAsyncClient.send

    async def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        path = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "{id}", request.url.path)
        counted[f"{request.method} {path}"] += 1
        return await real(self, request, *args, **kwargs)

    PrefectHttpxAsyncClient.send = send  # type: ignore[method-assign]
    return counted


def _record_platform_sends() -> list[float]:
    """The moment (time.time()) each request to the platform leaves the gateway: the entry of `httpx.Client.send`,
    after the SS_MAX_RPS bucket let it go. The worker's only synchronous httpx client is the SATUSEHAT client
    (Prefect's is asynchronous), so these are the platform's requests as the gateway paces them."""
    import threading

    import httpx

    sent: list[float] = []
    lock = threading.Lock()
    real = httpx.Client.send

    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            sent.append(time.time())
        return real(self, request, *args, **kwargs)

    httpx.Client.send = send  # type: ignore[method-assign]
    return sent


def main(argv: list[str]) -> int:
    batch_size, concurrency = int(argv[0]), int(argv[1])
    import flows.poll  # noqa: F401  (Prefect sets its logging up on import; quiet it after)
    from bench.common import quiet_prefect_console

    quiet_prefect_console()
    counted = _count_prefect_requests()
    sent = _record_platform_sends()
    result = asyncio.run(drain(batch_size, concurrency))
    result["prefect_api_requests"] = dict(counted)
    result["platform_send_times"] = sent
    times = os.times()
    result["cpu_s"] = round(times.user + times.system, 3)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
