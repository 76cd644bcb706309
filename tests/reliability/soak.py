"""The soak: many orders through real pollers under random faults of every kind; 0 lost, 0 duplicated, and the
pollers' memory and open files flat.

    .venv/bin/python -m tests.reliability.soak [--orders 1000] [--fault-rate 0.05] [--pollers 3] [--out FILE]

It starts the real parts itself, on 127.0.0.1 and free ports: the SATUSEHAT simulator (in this process, with its
DICOM Router), Orthanc with one small generated study per order behind a proxy that answers 503 at random, a
Prefect server (SQLite in a temporary home, or `--prefect-db postgresql+asyncpg://...`) and the RIS table (SQLite
file, or `--ris-db URL`). It fills the table with batch4 orders, arms the faults, then starts the pollers: separate
processes (`python -m tests.reliability.soak poller`) that run the real `poll-ris` flow in a loop against the
Prefect server until no order is pending, in progress or failed, as a long-lived flow-run process would. While they
work, it samples each poller's RSS and open file descriptors from /proc.

Faults, each request or association drawing independently:

* SATUSEHAT HTTP (OAuth2 and FHIR): 429 with Retry-After, JSON 500, plain-text 504, a hang past SS_TIMEOUT_S and
  a lost response (committed, then a 504), `--fault-rate` shared by the five; every `--expire-every-s` all tokens
  expire (the next calls get 401);
* the DICOM Router: an association aborted after its first instance, a C-STORE failure status (0xA700), each at
  `--fault-rate`;
* the PACS: 503 from the proxy in front of Orthanc's DICOMweb, at `--fault-rate`.

At the end each order is checked in the simulator's own store (one Encounter, ServiceRequest, ImagingStudy listing
every instance sent, Observation, DiagnosticReport, the RIS row holding exactly their ids) and at the platform's
door (each resource created by exactly one successful POST); Prefect's API says how many batch runs each order had
and whether two ever overlapped. The JSON result (printed, and written to `--out`) holds orders, done, failed and
dead with reasons, lost, duplicated, RSS and fds at start/middle/end with their slopes, and the verdict; the exit
status is 1 when anything was lost or duplicated or a poller's memory or open files grew.

"Flat": the median of the last quarter of a poller's samples is within `RSS_GROWTH_ALLOWED` (relative, or
`RSS_GROWTH_FLOOR_KIB`, whichever is larger) of the median of its second quarter, and the fd median within
`FD_GROWTH_ALLOWED` descriptors. The first quarter is warm-up (imports, connection pools, Prefect's caches). Runs
with fewer than `MIN_ORDERS_FOR_FLATNESS` orders report the figures without judging them: too short to tell growth
from warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from clients.ris import RisStore
from models.orders import DEAD, DONE, FAILED, IN_PROGRESS, PENDING

ROOT = Path(__file__).resolve().parents[2]

RSS_GROWTH_ALLOWED = 0.15
RSS_GROWTH_FLOOR_KIB = 32 * 1024
"""Allocator noise and a lazily imported module or two are not a leak; growing past both bounds is."""
FD_GROWTH_ALLOWED = 8
"""Open descriptors move with the connections in flight (HTTP pools, one association per study)."""
MIN_ORDERS_FOR_FLATNESS = 200
SAMPLE_EVERY_S = 2.0
GATEWAY_RESOURCES = ("Encounter", "ServiceRequest", "Observation", "DiagnosticReport")
"""What the gateway itself POSTs (the router creates the ImagingStudy)."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --- the poller process ---------------------------------------------------------------------------------------


def settled(counts: Mapping[str, int]) -> bool:
    """Nothing left to work: no order pending, held, or failed and waiting for its next attempt."""
    return counts.get(PENDING, 0) + counts.get(IN_PROGRESS, 0) + counts.get(FAILED, 0) == 0


async def poll_until_settled(pause_s: float) -> None:
    """Run the real poll-ris flow again and again, as a long-lived flow-run process, until the table is settled.

    With SOAK_READY_DIR set, a file named by the pid is made there once the imports are done; with SOAK_START_FILE
    set, the first poll waits until that file exists, so that several pollers started one after another begin
    claiming at the same moment. A poll that claims nothing pauses first (other pollers hold
    the rest, or failed orders wait for their backoff). A poll that fails (the Prefect API away for a moment) is
    reported and the loop goes on: the claim's lease covers whatever it held.
    """
    from flows.poll import poll_ris
    from models.settings import RisSettings, load_settings

    store = RisStore(load_settings(RisSettings).ris_database_url)
    ready_dir = os.environ.get("SOAK_READY_DIR")
    if ready_dir:  # tell the starter that this poller's imports are done
        (Path(ready_dir) / str(os.getpid())).touch()
    start_file = os.environ.get("SOAK_START_FILE")
    while start_file and not Path(start_file).exists():  # imports done: wait for the others, then start together
        await asyncio.sleep(0.1)
    try:
        while not settled(store.counts()):
            try:
                summary = await poll_ris()
            except Exception as error:
                print(json.dumps({"poll_error": f"{type(error).__name__}: {error}"[:500]}), flush=True)
                summary = {"claimed": 0}
            print(json.dumps({"poll": summary}), flush=True)
            if not summary.get("claimed"):
                await asyncio.sleep(pause_s)
    finally:
        store.close()


# --- what the platform saw ------------------------------------------------------------------------------------


class CreateCounter:
    """Counts the simulator's creates per (resource type, own identifier value), refused ones apart.

    Installed over `Platform.create` (an instance attribute, which the HTTP app looks up at every call), so it
    sees every POST that reaches the platform: a duplicate that the platform refuses (rule 20002) is a second
    create attempt, which the store alone would never show.
    """

    def __init__(self, platform: Any) -> None:
        self._platform = platform
        self._original = platform.create
        self._lock = threading.Lock()
        self.created: Counter[tuple[str, str]] = Counter()
        self.refused: Counter[tuple[str, str]] = Counter()

    def install(self) -> CreateCounter:
        self._platform.create = self
        return self

    def remove(self) -> None:
        with suppress(AttributeError):
            del self._platform.create

    def __call__(self, resource: Any, resource_type: str | None = None) -> dict[str, Any]:
        try:
            created = self._original(resource, resource_type)
        except Exception:
            body = resource if isinstance(resource, dict) else {}
            key = _own_identifier(body, resource_type)
            with self._lock:
                self.refused[key] += 1
            raise
        with self._lock:
            self.created[_own_identifier(created, resource_type)] += 1
        return created


def _own_identifier(body: Mapping[str, Any], resource_type: str | None) -> tuple[str, str]:
    """(type, the identifier value the gateway finds it by): a ServiceRequest's ACSN (its servicerequest
    identifier is the visit number, as the existing gateway sent it), else the first identifier."""
    kind = str(body.get("resourceType") or resource_type or "?")
    items = [item for item in body.get("identifier") or [] if isinstance(item, dict)]
    acsn = [item for item in items if "/acsn/" in str(item.get("system"))]
    chosen = acsn if kind == "ServiceRequest" and acsn else items
    return kind, str(chosen[0].get("value")) if chosen else "?"


FHIR_IDS = {
    "Encounter": "encounter_id",
    "ServiceRequest": "service_request_id",
    "ImagingStudy": "imaging_study_id",
    "Observation": "observation_id",
    "DiagnosticReport": "diagnostic_report_id",
}


@dataclass
class OrderCheck:
    """One order at the end: its RIS status and reason, how many of each resource the platform holds, what's wrong."""

    accession: str
    status: str
    last_error: str | None
    found: dict[str, int]
    problems: list[str]

    @property
    def duplicated(self) -> bool:
        return any(count > 1 for count in self.found.values())

    @property
    def done(self) -> bool:
        return self.status == DONE and not self.problems


def check_order(ris: RisStore, store: Any, org_id: str, body: Mapping[str, Any], sop_uids: set[str]) -> OrderCheck:
    """From the simulator's store and the RIS row: a done order has one of each resource, the RIS row holds exactly
    their ids, and the ImagingStudy lists every instance sent (the study as routed, not a partial association)."""
    from simulator.imaging import acsn_system

    acsn = str(body["noacsn"])
    order = ris.get(acsn)
    resources = {
        "Encounter": store.find_by_identifier("Encounter", None, str(body["identifier_value"])),
        "ServiceRequest": store.find_by_identifier("ServiceRequest", None, acsn),
        "ImagingStudy": store.find_by_identifier("ImagingStudy", acsn_system(org_id), acsn),
        "Observation": store.find_by_identifier("Observation", None, acsn),
        "DiagnosticReport": store.find_by_identifier("DiagnosticReport", None, acsn),
    }
    found = {kind: len(items) for kind, items in resources.items()}
    problems: list[str] = []
    if order.status == DONE:
        problems += [f"{count} {kind}" for kind, count in found.items() if count != 1]
        result = order.result or {}
        for kind, key in FHIR_IDS.items():
            if result.get(key) not in [item["id"] for item in resources[kind]]:
                problems.append(f"RIS {key} is not the platform's {kind}")
        listed = {
            instance["uid"]
            for study in resources["ImagingStudy"][:1]
            for series in study.get("series", [])
            for instance in series.get("instance", [])
        }
        if listed != sop_uids:
            problems.append(f"the ImagingStudy lists {len(listed)} of the {len(sop_uids)} instances sent")
    return OrderCheck(acsn, order.status, order.last_error, found, problems)


def _get_json(http: httpx.Client, method: str, path: str, body: Any = None) -> Any:
    """One Prefect API call, tried again while the server answers 503 (SQLite busy) or a connection drops."""
    deadline = time.monotonic() + 120
    while True:
        try:
            response = http.request(method, path, json=body)
            if response.status_code != 503:
                response.raise_for_status()
                return response.json()
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Prefect API kept failing {method} {path}")
        time.sleep(1)


def flow_runs(api_url: str, flow_name: str) -> list[dict[str, Any]]:
    """Every run of `flow_name` on the Prefect server: name, state, start and end (paged, 200 at a time)."""
    found: list[dict[str, Any]] = []
    with httpx.Client(base_url=api_url, timeout=60) as http:
        while True:
            page = _get_json(
                http,
                "POST",
                "/flow_runs/filter",
                {"flows": {"name": {"any_": [flow_name]}}, "sort": "ID_DESC", "limit": 200, "offset": len(found)},
            )
            found += [
                {
                    "name": run["name"],
                    "state": run["state_type"],
                    "start": run.get("start_time"),
                    "end": run.get("end_time"),
                    "parent_task_run_id": run.get("parent_task_run_id"),
                }
                for run in page
            ]
            if len(page) < 200:
                return found


def runs_by_accession(runs: list[dict[str, Any]], flow_name: str) -> dict[str, list[dict[str, Any]]]:
    """Batch runs grouped by the ACSN in their name ("batch4 R0123...")."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    prefix = f"{flow_name} "
    for run in runs:
        if run["name"].startswith(prefix):
            grouped[run["name"][len(prefix) :]].append(run)
    return grouped


def overlapping(runs: list[dict[str, Any]]) -> bool:
    """Two runs of one order at the same time: the one thing a claim must never allow."""
    spans = sorted((run["start"], run["end"] or "9999") for run in runs if run["start"])
    return any(later_start < earlier_end for (_, earlier_end), (later_start, _) in itertools.pairwise(spans))


# --- /proc sampling ---------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    """Resident set size of `pid` in KiB (VmRSS), None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass
class Sampler:
    """Samples RSS and open fds of some processes every `every_s`, with the number of orders finished so far."""

    pids: dict[str, int]
    finished: Callable[[], int]
    every_s: float = SAMPLE_EVERY_S
    samples: dict[str, list[dict[str, float]]] = field(default_factory=lambda: defaultdict(list))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                finished = self.finished()
            except Exception:
                finished = -1
            for name, pid in self.pids.items():
                rss, fds = rss_kib(pid), open_fds(pid)
                if rss is not None and fds is not None:
                    at = round(time.monotonic() - started, 1)
                    self.samples[name].append({"t_s": at, "rss_kib": rss, "fds": fds, "finished": finished})
            self._stop.wait(self.every_s)


def trend(samples: list[dict[str, float]], judge: bool) -> dict[str, Any]:
    """Start (the first sample after an order finished: imports and pools warm), middle, end, quarter medians,
    slope per 100 orders over the second half, and whether it is flat."""
    if len(samples) < 8:
        return {"samples": len(samples), "flat": None, "why": "too few samples"}
    quarter = len(samples) // 4
    second, last = samples[quarter : 2 * quarter], samples[-quarter:]
    result: dict[str, Any] = {"samples": len(samples)}
    warm = next((s for s in samples if s["finished"] > 0), samples[0])
    for key in ("rss_kib", "fds"):
        result[key] = {
            "process_start": samples[0][key],
            "start": warm[key],
            "middle": samples[len(samples) // 2][key],
            "end": samples[-1][key],
            "max": max(s[key] for s in samples),
            "q2_median": statistics.median(s[key] for s in second),
            "q4_median": statistics.median(s[key] for s in last),
            "slope_per_100_orders": _slope(samples[len(samples) // 2 :], key),
        }
    rss, fds = result["rss_kib"], result["fds"]
    rss_allowed = max(rss["q2_median"] * RSS_GROWTH_ALLOWED, RSS_GROWTH_FLOOR_KIB)
    rss_flat = rss["q4_median"] - rss["q2_median"] <= rss_allowed
    fds_flat = fds["q4_median"] - fds["q2_median"] <= FD_GROWTH_ALLOWED
    result["rss_growth_allowed_kib"] = round(rss_allowed)
    result["flat"] = (rss_flat and fds_flat) if judge else None
    if judge and not result["flat"]:
        result["why"] = (
            f"rss q2→q4 {rss['q2_median']}→{rss['q4_median']} KiB, fds {fds['q2_median']}→{fds['q4_median']}"
        )

    if not judge:
        result["why"] = f"not judged: fewer than {MIN_ORDERS_FOR_FLATNESS} orders"
    return result


def _slope(samples: list[dict[str, float]], key: str) -> float | None:
    """Least-squares slope of `key` against orders finished, per 100 orders (None if nothing finished meanwhile)."""
    points = [(s["finished"], s[key]) for s in samples if s["finished"] >= 0]
    xs = [x for x, _ in points]
    if len(points) < 2 or max(xs) == min(xs):
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in points)
    denominator = sum((x - mean_x) ** 2 for x in xs)
    return round(100 * numerator / denominator, 2)


# --- the PACS, failing at random ----------------------------------------------------------------------------------


class FaultyProxy:
    """An HTTP proxy in front of Orthanc that answers a `fraction` of requests with 503 (a PACS under load).

    Bodies are small (generated studies), so each answer is read whole and passed on; the rest goes through
    unchanged, Basic auth included.
    """

    HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"})

    def __init__(self, upstream: str, fraction: float, seed: int) -> None:
        self.upstream = upstream
        self.fraction = fraction
        self.random = random.Random(seed)
        self.served = 0
        self.failed = 0
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.served += 1
        if self.random.random() < self.fraction:
            self.failed += 1
            await _answer(send, 503, [(b"content-type", b"text/plain")], b"Service Unavailable")
            return
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.upstream, timeout=120)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"host", b"content-length")]
        query = scope.get("query_string", b"").decode("latin-1")
        response = await self._client.request(
            scope["method"], scope["path"] + (f"?{query}" if query else ""), headers=headers, content=body
        )
        passed = [(k.encode(), v.encode()) for k, v in response.headers.items() if k.lower() not in self.HOP_HEADERS]
        await _answer(send, response.status_code, passed, response.content)


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serve_in_thread(app: Any, name: str) -> Iterator[str]:
    """An ASGI app under uvicorn on 127.0.0.1 and a free port, in a daemon thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# --- the soak -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakConfig:
    """One soak run. The defaults are the documented run (docs/soak.md)."""

    orders: int = 1000
    fault_rate: float = 0.05
    pollers: int = 3
    poll_batch_size: int = 10
    poll_concurrency: int = 6
    instances: int = 2
    """Per study: one series of `instances` 32×32 images (the subject is the workflow, not the pixels)."""
    expire_every_s: float = 30.0
    timeout_s: float = 4 * 3600.0
    seed: int = 1
    prefect_db: str | None = None
    ris_db: str | None = None


HTTP_FAULT_KINDS = ("429", "500", "504", "hang", "lost-response")
ROUTER_FAULT_KINDS = ("abort", "status")
SS_TIMEOUT_S = 5.0
HANG_S = 7.0
IMAGING_STUDY_DEADLINE_S = 60.0
ORDER_RETRY_BACKOFF_S = 2.0


def per_kind(rate: float, kinds: int) -> float:
    """The fraction for each of `kinds` independent faults so that one request meets any of them with `rate`."""
    return 1 - (1 - rate) ** (1 / kinds) if rate > 0 else 0.0


def run_soak(config: SoakConfig, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start everything, run the orders through the pollers under faults, check each one; the result as JSON."""
    from simulator.config import SimulatorConfig
    from simulator.faults import HttpFault, RouterFault
    from simulator.server import start_simulator
    from stack.orthanc import OrthancServer
    from stack.prefect_server import PrefectServer
    from stack.studies import StudySpec, iter_instances
    from tests.deployments.prefect_server import clean_environment, start_background
    from tests.orders.bodies import body
    from tests.plugins.simulator import CLIENT_ID, CLIENT_SECRET, ORG_ID

    started = time.monotonic()
    result: dict[str, Any] = {"config": asdict(config), "machine": _machine()}
    with ExitStack() as exits:
        simulator = start_simulator(
            SimulatorConfig(
                org_id=ORG_ID, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, router_delay_s=0.2, admin_enabled=True
            )
        )
        exits.callback(simulator.stop)
        creates = CreateCounter(simulator.platform).install()
        orthanc = OrthancServer(users={"soak": "soak-password"})
        orthanc.start()
        exits.callback(orthanc.stop)
        proxy = FaultyProxy(orthanc.http_url, per_kind(config.fault_rate, 1), config.seed)
        proxy_url = exits.enter_context(serve_in_thread(proxy, "pacs-proxy"))
        prefect = PrefectServer(workdir / "prefect-server", database_url=config.prefect_db, scheduler=False)
        prefect.start()
        exits.callback(prefect.stop)
        ris_url = config.ris_db or f"sqlite:///{workdir / 'ris.db'}"
        ris = RisStore(ris_url)
        ris.create_schema()
        exits.callback(ris.close)
        log(f"parts up in {time.monotonic() - started:.0f} s; loading {config.orders} studies and orders")

        bodies: dict[str, dict[str, Any]] = {}
        sop_uids: dict[str, set[str]] = {}
        for _ in range(config.orders):
            spec = StudySpec(series=1, instances_per_series=config.instances, rows=32, columns=32)
            instances = list(iter_instances(spec))
            orthanc.upload(instances)
            order = body(4, study=spec.study_instance_uid)
            ris.add_order(4, order)
            bodies[order["noacsn"]] = order
            sop_uids[order["noacsn"]] = {str(ds.SOPInstanceUID) for ds in instances}
        loaded_s = time.monotonic() - started

        faults = simulator.platform.faults
        http_fraction = per_kind(config.fault_rate, len(HTTP_FAULT_KINDS))
        for kind in HTTP_FAULT_KINDS:
            faults.arm_http(HttpFault(kind=kind, count=None, fraction=http_fraction, hang_s=HANG_S))  # type: ignore[arg-type]
        router_fraction = per_kind(config.fault_rate, 1)
        faults.arm_router(RouterFault(kind="abort", count=None, fraction=router_fraction, after_instances=1))
        faults.arm_router(RouterFault(kind="status", count=None, fraction=router_fraction))

        env = clean_environment(
            **{**prefect.client_env(), "PREFECT_HOME": str(workdir / "poller-home")},
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DCM4CHEE_URL=f"{proxy_url}/dicom-web",
            PACS_USERNAME="soak",
            PACS_PASSWORD="soak-password",
            ROUTER_IP=simulator.config.host,
            ROUTER_PORT=str(simulator.dicom_port),
            ROUTER_AET=simulator.config.router_aet,
            SS_AUTH_URL=simulator.auth_url,
            SS_BASE_URL=simulator.fhir_url,
            SS_ORG_ID=ORG_ID,
            SS_CLIENT_ID=CLIENT_ID,
            SS_CLIENT_SECRET=CLIENT_SECRET,
            DEFAULT_EXAM_CODE="25045-6",  # the orders carry no codind_code; the gateway assumes no exam
            SS_TIMEOUT_S=str(SS_TIMEOUT_S),
            IMAGING_STUDY_DEADLINE_S=str(IMAGING_STUDY_DEADLINE_S),
            TEMP_DIR=str(workdir / "gateway-tmp"),
            RIS_DATABASE_URL=ris_url,
            POLL_BATCH_SIZE=str(config.poll_batch_size),
            POLL_CONCURRENCY=str(config.poll_concurrency),
            ORDER_RETRY_BACKOFF_S=str(ORDER_RETRY_BACKOFF_S),
        )
        log(f"loaded in {loaded_s:.0f} s; faults armed; starting {config.pollers} poller(s)")
        command = [sys.executable, "-m", "tests.reliability.soak", "poller"]
        pollers = [start_background(f"poller-{n}", command, env, workdir, cwd=ROOT) for n in range(config.pollers)]
        for poller in pollers:
            exits.callback(poller.stop)
        sampler = Sampler({p.name: p.process.pid for p in pollers}, lambda: _finished(ris)).start()
        exits.callback(sampler.stop)

        work_started = time.monotonic()
        next_expiry = work_started + config.expire_every_s
        next_report = work_started + 60
        expiries = 0
        while any(p.alive() for p in pollers):
            if time.monotonic() - work_started > config.timeout_s:
                log("timed out: stopping the pollers")
                break
            if config.expire_every_s and time.monotonic() >= next_expiry:
                simulator.platform.store.expire_tokens()
                expiries += 1
                next_expiry += config.expire_every_s
            time.sleep(1)
            if time.monotonic() >= next_report:
                log(f"{time.monotonic() - work_started:.0f} s: {ris.counts()}")
                next_report += 60
        work_s = time.monotonic() - work_started
        sampler.stop()
        faults.clear()
        for poller in pollers:
            poller.stop()
        exit_codes = {p.name: p.process.returncode for p in pollers}

        result.update(
            _verdicts(ris, simulator, ORG_ID, bodies, sop_uids, creates, prefect.api_url, sampler, config.orders)
        )
        result["faults"] = {
            "http_fraction_per_kind": round(http_fraction, 5),
            "router_fraction_per_kind": round(router_fraction, 5),
            "http_injected": dict(Counter(e.detail["fault"] for e in simulator.platform.store.events(["fault.http"]))),
            "router_injected": dict(
                Counter(e.detail["fault"] for e in simulator.platform.store.events(["router.fault"]))
            ),
            "pacs_503": proxy.failed,
            "pacs_requests": proxy.served,
            "token_expiries": expiries,
        }
        result["poller_exit_codes"] = exit_codes
        result["durations_s"] = {
            "start_and_load": round(loaded_s),
            "work": round(work_s),
            "orders_per_minute": round(60 * config.orders / work_s, 1),
        }
        result["problems"] = problems(result, exit_codes)
        result["ok"] = not result["problems"]
        if not result["ok"]:
            result["poller_log_tails"] = {p.name: p.log()[-3000:] for p in pollers}
    return result


def _finished(ris: RisStore) -> int:
    counts = ris.counts()
    return counts[DONE] + counts[DEAD]


def _verdicts(
    ris: RisStore,
    simulator: Any,
    org_id: str,
    bodies: dict[str, dict[str, Any]],
    sop_uids: dict[str, set[str]],
    creates: CreateCounter,
    api_url: str,
    sampler: Sampler,
    orders: int,
) -> dict[str, Any]:
    """Each order against the store, the platform's door and Prefect's runs; the pollers' trends."""
    runs = runs_by_accession(flow_runs(api_url, "batch4"), "batch4")
    done = failed = dead = lost = duplicated = 0
    reasons: Counter[str] = Counter()
    retried: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    attempts: Counter[int] = Counter()
    for acsn, order_body in bodies.items():
        check = check_order(ris, simulator.platform.store, org_id, order_body, sop_uids[acsn])
        row = ris.get(acsn)
        attempts[row.attempts] += 1
        keys = [("Encounter", order_body["identifier_value"])] + [(kind, acsn) for kind in GATEWAY_RESOURCES[1:]]
        created_twice = [kind for kind, value in keys if creates.created[(kind, value)] > 1]
        twice_at_once = overlapping(runs.get(acsn, []))
        if check.duplicated or created_twice or twice_at_once:
            duplicated += 1
            examples["duplicated"].append(f"{acsn}: {check.problems} created twice {created_twice} {twice_at_once}")
        if check.done:
            done += 1
            if row.attempts > 1 and row.last_error:  # done in the end: why the earlier attempt(s) failed
                retried[_reason(row.last_error)] += 1
        elif check.status == FAILED and check.last_error:
            failed += 1
            reasons[_reason(check.last_error)] += 1
        elif check.status == DEAD and check.last_error:
            dead += 1
            reasons[_reason(check.last_error)] += 1
        else:
            lost += 1
            examples["lost"].append(f"{acsn}: {check.status} {check.problems} {check.last_error}"[:400])
    judge = orders >= MIN_ORDERS_FOR_FLATNESS
    return {
        "orders": len(bodies),
        "done": done,
        "failed": failed,
        "dead": dead,
        "lost": lost,
        "duplicated": duplicated,
        "reasons": dict(reasons.most_common()),
        "retried_then_done": dict(retried.most_common()),
        "examples": {key: value[:10] for key, value in examples.items()},
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "batch_runs": sum(len(r) for r in runs.values()),
        "duplicate_creates_refused": sum(creates.refused[(k, v)] for k, v in creates.refused if k in GATEWAY_RESOURCES),
        "pollers": {name: trend(samples, judge) for name, samples in sampler.samples.items()},
    }


def _reason(last_error: str) -> str:
    """The first line of an order's last error, ids and accession numbers cut, so equal causes group."""
    first = last_error.splitlines()[0]
    return " ".join(word if not any(c.isdigit() for c in word) else "…" for word in first.split())[:160]


def problems(result: Mapping[str, Any], exit_codes: Mapping[str, int | None]) -> list[str]:
    """Why the soak fails, if it does: lost or duplicated orders, a poller that grew or did not finish."""
    found = []
    if result["lost"]:
        found.append(f"{result['lost']} order(s) lost")
    if result["duplicated"]:
        found.append(f"{result['duplicated']} order(s) duplicated")
    for name, code in exit_codes.items():
        if code != 0:
            found.append(f"{name} exited {code} (0 is: every order settled)")
    for name, trend_ in result["pollers"].items():
        if trend_.get("flat") is False:
            found.append(f"{name} not flat: {trend_.get('why')}")
    return found


def _machine() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "memory_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
        "python": sys.version.split()[0],
        "load_at_start": [round(v, 2) for v in os.getloadavg()],
    }


# --- the command ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["poller"]:
        asyncio.run(poll_until_settled(float(os.environ.get("SOAK_POLL_PAUSE_S", "1.0"))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.soak", description=__doc__.splitlines()[0])
    defaults = SoakConfig()
    parser.add_argument("--orders", type=int, default=defaults.orders)
    parser.add_argument("--fault-rate", type=float, default=defaults.fault_rate)
    parser.add_argument("--pollers", type=int, default=defaults.pollers)
    parser.add_argument("--batch-size", type=int, default=defaults.poll_batch_size)
    parser.add_argument("--concurrency", type=int, default=defaults.poll_concurrency)
    parser.add_argument("--expire-every-s", type=float, default=defaults.expire_every_s)
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--prefect-db", help="postgresql+asyncpg://... for the Prefect server (default SQLite)")
    parser.add_argument("--ris-db", help="SQLAlchemy URL of the RIS table (default a SQLite file)")
    parser.add_argument("--out", type=Path, help="where to write the JSON result")
    parsed = parser.parse_args(args)
    config = SoakConfig(
        orders=parsed.orders,
        fault_rate=parsed.fault_rate,
        pollers=parsed.pollers,
        poll_batch_size=parsed.batch_size,
        poll_concurrency=parsed.concurrency,
        expire_every_s=parsed.expire_every_s,
        timeout_s=parsed.timeout_s,
        seed=parsed.seed,
        prefect_db=parsed.prefect_db,
        ris_db=parsed.ris_db,
    )
    workdir = Path(tempfile.mkdtemp(prefix="satset-soak-"))
    try:
        result = run_soak(config, workdir, log=lambda line: print(line, file=sys.stderr, flush=True))
    except BaseException:
        print(f"soak failed; its files are kept in {workdir}", file=sys.stderr)
        raise
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if parsed.out is not None:
        parsed.out.write_text(text + "\n")
    if result["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"soak failed: {result['problems']}; files kept in {workdir}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
