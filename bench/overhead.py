"""Item 5: one batch4 order with a 2-instance study; Prefect's share of its wall time (target: under 0.5 s).

Set-up: Orthanc holding a CT study of 2 slices (512x512, 16-bit); the SATUSEHAT simulator in its own process
(bench/simhost.py) with its DICOM Router emulation, which builds the ImagingStudy `ROUTER_DELAY_S` after the
association's release, as the official router does, asynchronously; a Prefect server. The real `batch4` flow (an
async flow, as every gateway flow is) runs in this process, one order after another on one event loop, as a
worker runs them: locate the study, Encounter, ServiceRequest, route the study, wait for the ImagingStudy,
Observation, DiagnosticReport, the summary artifact. Every order has new identifiers, so nothing is answered from
Prefect's cache and every resource is created.

What is measured, per order:

* wall: `await batch4(payload)`, from the call to its return;
* outside Prefect: the union of the intervals spent in network calls, measured from the bench side by timing
  wrappers around the clients' transports: `httpx.Client.send` (the SATUSEHAT client: token, searches, POSTs),
  `requests.Session.send` (the PACS's QIDO-RS, dicomweb-client), `clients.routing.route_study` (the PACS's
  WADO-RS stream edited into one C-STORE association: network both ways); plus the sleeps between the
  ImagingStudy searches (`wait_for_imaging_study`: the platform building the study, not Prefect);
* Prefect's share = wall - outside Prefect. What is left is the flow and task engines, the API calls to the Prefect
  server (counted and timed apart), result persistence, cache-key checks, the artifact, and the thread hand-offs.

Two variants, interleaved order by order (the first order of the process, with its imports and first
connections, is reported apart): `default`, Prefect's defaults, where every flow run asks the server for its
default result storage twice, each time through a new synchronous client that blocks the event loop; `pinned`,
as `satset serve` runs flows (deployments/serve.py, pin_result_storage): the storage named once in
PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, so Prefect resolves it once per process.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

from bench.backlog import SUBJECT, Simulator, simulator
from bench.common import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    BenchError,
    _signals_unwind,
    fmt,
    load,
    log,
    machine,
    paired_ratios,
    quiet_prefect_console,
    summary,
    table,
    write_results,
)
from stack.orthanc import OrthancServer
from stack.prefect_server import PrefectServer
from stack.studies import StudySpec, iter_instances

TARGET_S = 0.5
ROUTER_DELAY_S = 0.05
"""The router emulation's delay between the release and the ImagingStudy (the real router takes seconds)."""
LATENCY_S = 0.0
"""No latency added by the simulator: the target is Prefect's own share, which latency would only dilute."""


def run(
    *,
    runs: int = 9,
    prefect_server: PrefectServer | None = None,
    latency_s: float = LATENCY_S,
    router_delay_s: float = ROUTER_DELAY_S,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "benchmark": "overhead",
        "machine": machine(),
        "runs": runs,
        "latency_s": latency_s,
        "router_delay_s": router_delay_s,
        "target_s": TARGET_S,
    }
    with ExitStack() as exits, _signals_unwind():
        server = prefect_server
        if server is None:
            log("overhead: starting a Prefect server on 127.0.0.1")
            server = PrefectServer()
            server.start()
            exits.callback(server.stop)
        orthanc = OrthancServer(users={ORTHANC_USER: ORTHANC_PASSWORD})
        orthanc.start()
        exits.callback(orthanc.stop)
        sim = exits.enter_context(simulator(latency_s, router_delay_s))
        spec = StudySpec(series=1, instances_per_series=2, rows=512, columns=512, accession_number="PACS0001")
        orthanc.upload(iter_instances(spec))
        exits.enter_context(prefect_settings(server))
        clock = exits.enter_context(NetworkClock.installed())
        runner = Batch4Runner(sim, orthanc, server, spec.study_instance_uid, clock)
        exits.callback(runner.close)
        exits.callback(drain_prefect_services)
        block = save_storage_block(server)
        first = runner.run()
        log(f"overhead: first order: {_line(first)}, load {load()}")
        results["first_order"] = first
        orders: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
        for number in range(runs):
            order = list(VARIANTS) if number % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                with variant_settings(variant, block):
                    measured = runner.run()
                log(f"overhead: {variant} {number + 1}/{runs}: {_line(measured)}, load {load()}")
                orders[variant].append(measured)
        results["orders"] = orders
        results["stats"] = {variant: _stats(measured) for variant, measured in orders.items()}
        results["paired_prefect_s"] = paired_ratios(
            [m["prefect_s"] for m in orders["pinned"]], [m["prefect_s"] for m in orders["default"]]
        )
        results["target"] = {
            variant: {
                "value_s": stats["prefect_s"]["median"],
                "target": f"< {TARGET_S}",
                "met": stats["prefect_s"]["median"] < TARGET_S,
            }
            for variant, stats in results["stats"].items()
        }
    results["load_at_end"] = load()
    write_results("overhead", results)
    print(report(results))
    return results


VARIANTS = {
    "default": "Prefect's defaults: every flow run asks the server for its default result storage, twice",
    "pinned": "as `satset serve` runs it: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK named by pin_result_storage()",
}


def drain_prefect_services(timeout_s: float = 30.0) -> None:
    """Send Prefect's queued logs and events while its server still runs: Prefect drains them at interpreter exit,
    and with the server stopped by then its retries would hold the exit."""
    from prefect._internal.concurrency.services import QueueService

    QueueService.drain_all(timeout=timeout_s)


def save_storage_block(server: PrefectServer) -> str:
    """What `satset serve` does before serving (deployments/serve.py): name the default result storage."""
    from deployments.serve import pin_result_storage

    slug = pin_result_storage({})
    if slug is None:
        raise BenchError("pin_result_storage named no storage block")
    return slug


def variant_settings(variant: str, block: str) -> Any:
    from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

    if variant == "pinned":
        return temporary_settings(updates={PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: block})
    return nullcontext()


def _line(measured: dict[str, Any]) -> str:
    return (
        f"wall {measured['wall_s']:.3f} s, outside Prefect {measured['outside_s']:.3f} s, "
        f"Prefect {measured['prefect_s']:.3f} s"
    )


def _stats(orders: list[dict[str, Any]]) -> dict[str, Any]:
    stats = {
        key: summary([order[key] for order in orders])
        for key in ("wall_s", "outside_s", "network_s", "platform_wait_s", "prefect_s", "prefect_api_s")
    }
    stats["prefect_api_requests"] = summary([order["prefect_api_requests"] for order in orders])
    stats["prefect_api_by_path"] = orders[-1]["prefect_api_by_path"]
    return stats


# -- measuring -----------------------------------------------------------------------------------------------------


class NetworkClock:
    """Intervals spent in network calls and in waits on the platform, recorded by wrappers installed for the run.

    Thread-safe (the clients run in the gateway's I/O threads). `installed()` patches and restores:
    `httpx.Client.send`, `requests.Session.send`, `clients.routing.route_study` (network), the poll sleeps of
    `tasks.fhir.wait_for_imaging_study` (platform wait), and Prefect's own API client (counted and timed apart).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.network: list[tuple[float, float]] = []
        self.waits: list[tuple[float, float]] = []
        self.prefect: list[tuple[float, float]] = []
        self.prefect_requests: Counter[str] = Counter()

    def clear(self) -> None:
        with self._lock:
            self.network.clear()
            self.waits.clear()
            self.prefect.clear()
            self.prefect_requests.clear()

    def _record(self, into: list[tuple[float, float]], started: float) -> None:
        ended = time.perf_counter()
        with self._lock:
            into.append((started, ended))

    def timing(self, into: list[tuple[float, float]], function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._record(into, started)

        return timed

    @classmethod
    @contextmanager
    def installed(cls) -> Iterator[NetworkClock]:
        import httpx
        import requests
        from prefect.client.base import PrefectHttpxAsyncClient

        import clients.routing
        import tasks.fhir

        clock = cls()
        originals = [
            (httpx.Client, "send", httpx.Client.send),
            (requests.Session, "send", requests.Session.send),
            (clients.routing, "route_study", clients.routing.route_study),
            (tasks.fhir, "asyncio", tasks.fhir.asyncio),
            (PrefectHttpxAsyncClient, "send", PrefectHttpxAsyncClient.send),
        ]
        from prefect.client.base import PrefectHttpxSyncClient

        real_sync_send = httpx.Client.send

        def sync_send(self: httpx.Client, request: httpx.Request, *args: Any, **kwargs: Any) -> httpx.Response:
            """The platform's requests are network; Prefect's own synchronous client (it has one, used for the
            default result storage lookup of every flow run) is Prefect's API, as its async client is."""
            prefect_api = isinstance(self, PrefectHttpxSyncClient)
            started = time.perf_counter()
            try:
                return real_sync_send(self, request, *args, **kwargs)
            finally:
                clock._record(clock.prefect if prefect_api else clock.network, started)
                if prefect_api:
                    path = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "{id}", request.url.path)
                    with clock._lock:
                        clock.prefect_requests[f"{request.method} {path} (sync)"] += 1

        httpx.Client.send = sync_send  # type: ignore[method-assign]
        requests.Session.send = clock.timing(clock.network, requests.Session.send)  # type: ignore[method-assign]
        clients.routing.route_study = clock.timing(clock.network, clients.routing.route_study)  # type: ignore[assignment]
        tasks.fhir.asyncio = _SleepTimer(clock)  # type: ignore[assignment]
        real_prefect_send = PrefectHttpxAsyncClient.send

        async def prefect_send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            path = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "{id}", request.url.path)
            started = time.perf_counter()
            try:
                return await real_prefect_send(self, request, *args, **kwargs)
            finally:
                clock._record(clock.prefect, started)
                with clock._lock:
                    clock.prefect_requests[f"{request.method} {path}"] += 1

        PrefectHttpxAsyncClient.send = prefect_send  # type: ignore[method-assign]
        try:
            yield clock
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


class _SleepTimer:
    """Stands in for the `asyncio` module inside tasks/fhir.py: the same, with `sleep` recorded as a platform wait."""

    def __init__(self, clock: NetworkClock) -> None:
        self._clock = clock

    async def sleep(self, delay: float) -> None:
        started = time.perf_counter()
        try:
            await asyncio.sleep(delay)
        finally:
            self._clock._record(self._clock.waits, started)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def prefect_settings(server: PrefectServer) -> Any:
    """This process's Prefect settings pointed at `server` (settings are read when prefect is first imported, and
    something imported it before the environment was set: without this, Prefect starts an ephemeral server)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_SERVER_ANALYTICS_ENABLED: False})


def covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] covered by at least one interval (overlaps counted once)."""
    total = 0.0
    reached = start
    for first, last in sorted(intervals):
        first, last = max(first, reached), min(last, end)
        if last > first:
            total += last - first
            reached = last
    return total


class Batch4Runner:
    """Runs the real batch4 flow in this process (the gateway's environment), one order per call, and times it."""

    def __init__(
        self, sim: Simulator, orthanc: OrthancServer, server: PrefectServer, study_uid: str, clock: NetworkClock
    ) -> None:
        self.sim = sim
        self.study_uid = study_uid
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        os.environ.update(
            {
                **sim.env(),
                **server.client_env(),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DCM4CHEE_URL": orthanc.dicomweb_url,
                "PACS_USERNAME": ORTHANC_USER,
                "PACS_PASSWORD": ORTHANC_PASSWORD,
                "IMAGING_STUDY_DEADLINE_S": "60",
            }
        )
        from tasks import runtime

        runtime.reset()
        import flows.batches  # noqa: F401  (Prefect sets its logging up on import; quiet it after)

        quiet_prefect_console()

    def run(self) -> dict[str, Any]:
        from flows.batches import batch4
        from models.inputs import Batch4Input

        number = uuid.uuid4().hex[:8].upper()
        payload = Batch4Input.model_validate(
            {
                "identifier_value": f"RG{number}",
                "subject_id": SUBJECT,
                "individual_id": "10016869420",
                "period_start": "2025-08-01T05:57:41+00:00",
                "noacsn": f"OV{number}",
                "performer_id": "10000504193",
                "performer_value": "Tidak tampak kelainan",
                "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
                "study": self.study_uid,
            }
        )
        self.sim.prepare([])
        self.clock.clear()
        started = time.perf_counter()
        result = self.loop.run_until_complete(batch4(payload))
        ended = time.perf_counter()
        self._verify(payload, result)
        clock = self.clock
        wall = ended - started
        outside = covered(clock.network + clock.waits, started, ended)
        return {
            "wall_s": round(wall, 4),
            "outside_s": round(outside, 4),
            "network_s": round(covered(clock.network, started, ended), 4),
            "platform_wait_s": round(covered(clock.waits, started, ended), 4),
            "prefect_s": round(wall - outside, 4),
            "prefect_api_s": round(covered(clock.prefect, started, ended), 4),
            "prefect_api_requests": sum(clock.prefect_requests.values()),
            "prefect_api_by_path": dict(clock.prefect_requests),
            "network_calls": len(clock.network),
            "imaging_study_waits": len(clock.waits),
        }

    def _verify(self, payload: Any, result: dict[str, Any]) -> None:
        keys = ("encounter_id", "service_request_id", "imaging_study_id", "observation_id", "diagnostic_report_id")
        missing = [key for key in keys if not result.get(key)]
        if missing or result["dicom_process"]["status"] != "success":
            raise BenchError(f"batch4 did not file everything: missing {missing}, result {result}")
        imaging = self.sim.http.get("/admin/resources/ImagingStudy").json()
        mine = [r for r in imaging if r["id"] == result["imaging_study_id"]]
        instances = sum(len(s.get("instance", [])) for r in mine for s in r.get("series", []))
        if instances != 2:
            raise BenchError(f"the ImagingStudy lists {instances} instances, not 2")

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


# -- report --------------------------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    first = results["first_order"]
    labels = (
        ("wall_s", "wall time of `await batch4(...)`"),
        ("network_s", "in network calls (FHIR, QIDO-RS, WADO-RS + C-STORE)"),
        ("platform_wait_s", "waiting between ImagingStudy searches (the router)"),
        ("outside_s", "outside Prefect (union of the two)"),
        ("prefect_s", "**Prefect's share** (wall - outside)"),
        ("prefect_api_s", "... of which awaiting the Prefect API"),
    )
    rows = [
        [label, *(fmt(results["stats"][variant][key]) for variant in VARIANTS), f"{first[key]:.3f}"]
        for key, label in labels
    ]
    rows.append(
        [
            "Prefect API requests per order",
            *(f"{results['stats'][variant]['prefect_api_requests']['median']:.0f}" for variant in VARIANTS),
            str(first["prefect_api_requests"]),
        ]
    )
    out = [
        f"\n### batch4, a 2-instance study: {results['runs']} orders per variant, interleaved, after a first order "
        "(seconds, median (min-max))\n",
        table(["", *VARIANTS, "first order (default)"], rows),
        "",
    ]
    for variant, description in VARIANTS.items():
        target = results["target"][variant]
        out.append(
            f"* {variant} ({description}): Prefect's share {target['value_s']:.3f} s "
            f"(target < {TARGET_S}: {'met' if target['met'] else 'NOT met'})"
        )
    paired = results["paired_prefect_s"]
    out.append(
        f"* pinned / default, Prefect's share per round: {paired['median']:.2f} "
        f"({paired['min']:.2f}-{paired['max']:.2f})"
    )
    for variant in VARIANTS:
        out.append(f"* Prefect API requests per order, {variant}: {results['stats'][variant]['prefect_api_by_path']}")
    return "\n".join(out)


if __name__ == "__main__":
    run()
