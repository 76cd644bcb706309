"""Item 4 (and its part of 6): drain a backlog of pending batch3 orders from the RIS table, against a platform
that answers every request 150 ms late, under a cap on requests per second.

Set-up, per round: the SATUSEHAT simulator in its own process (bench/simhost.py) with 150 ms added to every
request and one ImagingStudy per order already there (as the DICOM Router leaves it when the modality sent the
images itself: batch3's situation); a fresh RIS table (SQLite) with N pending batch3 orders.

* gateway: the real `poll-ris` flow in a worker process (bench/backlog_worker.py) on a Prefect server, in light mode
  (POLL_ORDER_RUNS=task: every order one task run of the poll run, its steps plain calls inside it), POLL_CONCURRENCY
  orders at a time, one token and one connection pool per process, SS_MAX_RPS set (the client's token bucket and
  its request window, clients/ratelimit.py). `gateway_flow` is the same in the default mode (every order a batch3
  subflow run, a task run per step, an artifact per order): measured on BASELINE_FLOW_ORDERS orders only (it is
  the slow one), to show what the light mode changes. The Prefect server runs on PostgreSQL (a fresh database,
  dropped at the end): on SQLite, many concurrent subflow runs make the server answer 503 "database is locked".
* existing: the existing gateway's way (shared/research/observed_contracts.md), written here: one order after
  another, each call with a new token request (`httpx.post` without a client: a new connection per call),
  POST Encounter, POST ServiceRequest, GET ImagingStudy by ACSN, POST Observation, POST DiagnosticReport, then
  the ids written back to the RIS row. Sequential and latency-bound, so its throughput does not depend on N; it
  drains a sample of the same kind of orders (BASELINE_SAMPLE per round, its own table) and its orders/s is the
  rate at which it would drain the whole table (about 16 minutes for 500).

The cap is checked where it matters, at the platform: the simulator logs every request's arrival and the benchmark
counts them in every sliding one-second window; the same count over the moments the gateway sent them is reported
beside it.

Checked every round: every order done with its five ids, and every Encounter, ServiceRequest, Observation and
DiagnosticReport exists exactly once on the platform (by the identifier it is found by) and no other does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BenchError,
    cpu_seconds,
    descendants,
    fmt,
    load,
    log,
    machine,
    paired_ratios,
    prefect_database,
    ratio,
    summary,
    table,
    write_results,
)
from clients.ris import RisStore
from models import fhir
from models.inputs import Batch3Input
from models.orders import DONE
from stack.prefect_server import PrefectServer

ORG_ID = "100099999"
CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret"
SUBJECT = "P10443013727"
LATENCY_S = 0.15
MAX_RPS = 80.0
"""The cap given to the gateway (SS_MAX_RPS): a per-process budget a hospital might be asked to respect."""
CONCURRENCY = 32
"""POLL_CONCURRENCY: batch3 runs at once; about what the cap allows with 150 ms per request (9 requests each)."""
BASELINE_SAMPLE = 20
BASELINE_FLOW_ORDERS = 60
RESOURCE_TYPES = ("Encounter", "ServiceRequest", "Observation", "DiagnosticReport")
IDS = ("encounter_id", "service_request_id", "imaging_study_id", "observation_id", "diagnostic_report_id")


def run(
    *,
    runs: int = 3,
    sizes: tuple[int, ...] = (500, 1000),
    baseline_sample: int = BASELINE_SAMPLE,
    max_rps: float = MAX_RPS,
    concurrency: int = CONCURRENCY,
    flow_orders: int = BASELINE_FLOW_ORDERS,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "benchmark": "backlog",
        "machine": machine(),
        "runs": runs,
        "latency_s": LATENCY_S,
        "max_rps": max_rps,
        "poll_concurrency": concurrency,
        "baseline_sample": baseline_sample,
        "sizes": {},
    }
    with ExitStack() as exits:
        workdir = Path(tempfile.mkdtemp(prefix="satset-bench-backlog-"))
        exits.callback(_remove, workdir)
        database, results["prefect_database"] = exits.enter_context(prefect_database())
        log(f"backlog: starting a Prefect server on {results['prefect_database']}")
        server = PrefectServer(database_url=database, scheduler=False)
        server.start()
        exits.callback(server.stop)
        os.environ.pop("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK", None)
        results["result_storage"] = _pin_result_storage(server)
        sim = exits.enter_context(simulator())
        if flow_orders:
            log(f"backlog: the default mode (a subflow run per order) on {flow_orders} orders, load {load()}")
            flow_mode = _gateway(sim, server, workdir, flow_orders, max_rps, concurrency, order_runs="flow")
            log(f"backlog:   gateway_flow: {flow_mode['orders_per_s']:.2f} orders/s")
            results["flow_mode"] = flow_mode
        for size in sizes:
            rounds: list[dict[str, Any]] = []
            for round_ in range(runs):
                log(f"backlog: {size} orders, round {round_ + 1}/{runs}, load {load()}")
                order = ("existing", "gateway") if round_ % 2 else ("gateway", "existing")
                measured: dict[str, Any] = {}
                for method in order:
                    if method == "gateway":
                        measured[method] = _gateway(sim, server, workdir, size, max_rps, concurrency)
                    else:
                        measured[method] = _existing(sim, workdir, baseline_sample)
                    log(f"backlog:   {method}: {measured[method]['orders_per_s']:.2f} orders/s")
                rounds.append(measured)
            results["sizes"][str(size)] = _summarise(rounds, max_rps)
    results["load_at_end"] = load()
    results["scaling"] = _scaling(results, sizes)
    write_results("backlog", results)
    print(report(results))
    return results


# -- the stack -----------------------------------------------------------------------------------------------------


class Simulator:
    """The simulator process: its URLs, its request log, reset and seeding between rounds."""

    def __init__(self, process: subprocess.Popen[str], urls: dict[str, Any], latency_s: float = LATENCY_S) -> None:
        self.process = process
        self.urls = urls
        self.latency_s = latency_s
        self.http = httpx.Client(base_url=urls["base_url"], timeout=60)

    def env(self) -> dict[str, str]:
        return {
            "SS_AUTH_URL": self.urls["auth_url"],
            "SS_BASE_URL": self.urls["fhir_url"],
            "SS_ORG_ID": ORG_ID,
            "SS_CLIENT_ID": CLIENT_ID,
            "SS_CLIENT_SECRET": CLIENT_SECRET,
            "DEFAULT_EXAM_CODE": "25045-6",  # the bench orders carry no codind_code; none is assumed
            # batch3 never touches these; the settings require them.
            "DCM4CHEE_URL": "http://127.0.0.1:9/dicom-web",
            "ROUTER_IP": self.urls["router_host"],
            "ROUTER_PORT": str(self.urls["router_port"]),
            "ROUTER_AET": self.urls["router_aet"],
        }

    def prepare(self, acsns: list[str]) -> None:
        """Empty the platform, set its latency again (reset clears it), and seed one ImagingStudy per ACSN."""
        self.http.post("/admin/reset").raise_for_status()
        self.http.post("/admin/latency", params={"seconds": self.latency_s}).raise_for_status()
        for start in range(0, len(acsns), 200):
            self.http.post(
                "/bench/seed", json={"acsns": acsns[start : start + 200], "subject": SUBJECT}
            ).raise_for_status()

    def request_count(self) -> int:
        return len(self.http.get("/bench/requests", params={"after": 0}).json())

    def requests_since(self, index: int) -> list[tuple[float, str, str]]:
        return [tuple(item) for item in self.http.get("/bench/requests", params={"after": index}).json()]  # type: ignore[misc]

    def resources(self, resource_type: str) -> list[dict[str, Any]]:
        return self.http.get(f"/admin/resources/{resource_type}").json()  # type: ignore[no-any-return]


@contextmanager
def simulator(latency_s: float = LATENCY_S, router_delay_s: float | None = None) -> Iterator[Simulator]:
    """The simulator in its own process (bench/simhost.py), stopped by its PID when the block ends."""
    command = [
        sys.executable,
        "-m",
        "bench.simhost",
        "--latency",
        str(latency_s),
        "--org",
        ORG_ID,
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
    ]
    if router_delay_s is not None:
        command += ["--router-delay", str(router_delay_s)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise BenchError("the simulator did not start")
        sim = Simulator(process, json.loads(line), latency_s)
        yield sim
        sim.http.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# -- orders --------------------------------------------------------------------------------------------------------


def _orders(count: int) -> list[dict[str, Any]]:
    """`count` batch3 bodies with accession numbers no earlier round used (Prefect caches by identifier)."""
    prefix = "B" + uuid.uuid4().hex[:7].upper()
    return [
        {
            "identifier_value": f"RG{prefix}{number:06d}",
            "subject_id": SUBJECT,
            "individual_id": "10016869420",
            "period_start": "2025-08-01T05:57:41+00:00",
            "noacsn": f"{prefix}{number:06d}",
            "performer_id": "10000504193",
            "performer_value": "Tidak tampak kelainan",
            "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
        }
        for number in range(count)
    ]


def _fill(path: Path, bodies: list[dict[str, Any]]) -> RisStore:
    store = RisStore(f"sqlite:///{path}")
    store.create_schema()
    for body in bodies:
        store.add_order(3, body)
    return store


# -- the two ways --------------------------------------------------------------------------------------------------


def _gateway(
    sim: Simulator,
    server: PrefectServer,
    workdir: Path,
    size: int,
    max_rps: float,
    concurrency: int,
    order_runs: str = "task",
) -> dict[str, Any]:
    bodies = _orders(size)
    sim.prepare([b["noacsn"] for b in bodies])
    table_path = workdir / f"ris-{uuid.uuid4().hex[:8]}.db"
    store = _fill(table_path, bodies)
    env = {
        **os.environ,
        **sim.env(),
        **server.client_env(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RIS_DATABASE_URL": f"sqlite:///{table_path}",
        "SS_MAX_RPS": f"{max_rps:g}",
        "POLL_BATCH_SIZE": str(size),
        "POLL_CONCURRENCY": str(concurrency),
        "POLL_ORDER_RUNS": order_runs,
        **({"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": storage} if (storage := _pinned.get(server.api_url)) else {}),
        "TEMP_DIR": str(workdir / "gateway-tmp"),
    }
    first = sim.request_count()
    cpu_before = _stack_cpu(sim, server)
    started = time.perf_counter()
    command = [sys.executable, "-m", "bench.backlog_worker", str(size), str(concurrency)]
    if os.environ.get("EXP_WORKER"):
        command = [sys.executable, os.environ["EXP_WORKER"], str(size), str(concurrency)]
    if profile := os.environ.get("SATSET_BENCH_PYSPY"):  # a py-spy profile of the worker, e.g. /tmp/backlog.txt
        command = [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--gil",
            "--format",
            "raw",
            "-r",
            "200",
            "-o",
            profile,
            "--",
            *command,
        ]
    spy = None
    if server_profile := os.environ.get("SATSET_BENCH_PYSPY_SERVER"):  # the Prefect server's profile, likewise
        assert server.pid is not None
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--gil",
                "--subprocesses",
                "--format",
                "raw",
                "-r",
                "100",
                "-o",
                server_profile,
                "--pid",
                str(server.pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    worker = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    cpu = {key: round(value - cpu_before[key], 2) for key, value in _stack_cpu(sim, server).items()}
    if spy is not None:
        spy.send_signal(2)
        spy.wait(timeout=60)
    if worker.returncode != 0:
        raise BenchError(f"the gateway worker failed:\n{worker.stderr[-3000:]}")
    drained = json.loads([line for line in worker.stdout.splitlines() if line.startswith("{")][-1])
    requests = sim.requests_since(first)
    not_done: dict[str, int] = {}
    if order_runs == "flow" and store.counts()[DONE] != size:
        # The reference row: a failure there is a finding to report, not a reason to lose the run's other figures.
        not_done = dict(Counter((o.last_error or "")[:300] for o in store.list_orders() if o.status != DONE))
        log(f"backlog:   gateway_flow: {sum(not_done.values())} orders not done: {not_done}")
    else:
        _verify(sim, store, bodies)
    store.close()
    table_path.unlink(missing_ok=True)
    return {
        "not_done": not_done,
        "orders": size,
        "wall_s": drained["wall_s"],
        "process_wall_s": wall,
        "orders_per_s": size / drained["wall_s"],
        "polls": len(drained["polls"]),
        "cpu_s": {"worker": drained["cpu_s"], **cpu},
        "prefect_api_requests": drained.get("prefect_api_requests"),
        **_rate(requests, max_rps),
        "sent": _rate([(t, "", "") for t in drained.get("platform_send_times", [])], max_rps),
    }


_pinned: dict[str, str] = {}


def _pin_result_storage(server: PrefectServer) -> str | None:
    """What `satset serve` does before it serves (deployments/serve.py): name the default result storage, so the
    worker's flow runs stop asking the server for it; the worker gets the name in its environment, as served
    flow runs do."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from deployments.serve import pin_result_storage

    # The worker's PREFECT_HOME is the server's (server.client_env()): its local results live there.
    updates = {PREFECT_API_URL: server.api_url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: server.home / "storage"}
    with temporary_settings(updates=updates):
        slug = pin_result_storage({})
    if slug is not None:
        _pinned[server.api_url] = slug
    return slug


def _stack_cpu(sim: Simulator, server: PrefectServer) -> dict[str, float]:
    """CPU seconds used so far by the simulator, the Prefect server (with its children) and PostgreSQL."""
    server_pid = server.pid
    prefect = 0.0
    if server_pid is not None:
        prefect = sum(cpu_seconds(pid) for pid in [server_pid, *descendants(server_pid)])
    # The whole PostgreSQL server (shared with other users of the machine: indicative only). Backends that exited
    # are counted in the postmaster's reaped-children time, live ones in their own.
    postgres = 0.0
    postgres_pids = set()
    for status in Path("/proc").glob("[0-9]*/comm"):
        try:
            if status.read_text().strip() == "postgres":
                postgres_pids.add(int(status.parent.name))
        except (OSError, ValueError):
            continue
    for pid in postgres_pids:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        postgres += cpu_seconds(pid, reaped_children=parent not in postgres_pids)
    return {"simulator": cpu_seconds(sim.process.pid), "prefect_server": prefect, "postgres": postgres}


def _existing(sim: Simulator, workdir: Path, sample: int) -> dict[str, Any]:
    bodies = _orders(sample)
    sim.prepare([b["noacsn"] for b in bodies])
    table_path = workdir / f"ris-existing-{uuid.uuid4().hex[:8]}.db"
    store = _fill(table_path, bodies)
    first = sim.request_count()
    started = time.perf_counter()
    done = 0
    while claimed := store.claim("existing-gateway", 1):
        order = claimed[0]
        assert order.id is not None
        store.complete(order.id, "existing-gateway", _existing_batch3(sim, Batch3Input.model_validate(order.payload)))
        done += 1
    wall = time.perf_counter() - started
    requests = sim.requests_since(first)
    _verify(sim, store, bodies)
    store.close()
    table_path.unlink(missing_ok=True)
    return {"orders": done, "wall_s": wall, "orders_per_s": done / wall, **_rate(requests, None)}


def _existing_batch3(sim: Simulator, payload: Batch3Input) -> dict[str, str]:
    """The existing gateway's batch3: a token per call, then the call; sequential; ids taken from the answers."""
    auth, base = sim.urls["auth_url"], sim.urls["fhir_url"]

    def token() -> str:
        response = httpx.post(
            f"{auth}/accesstoken",
            params={"grant_type": "client_credentials"},
            data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
            timeout=30,
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def post(resource: dict[str, Any]) -> str:
        response = httpx.post(
            f"{base}/{resource['resourceType']}",
            json=resource,
            headers={"Authorization": f"Bearer {token()}", "Content-Type": "application/json"},
            timeout=30,
        )
        if response.status_code not in (200, 201):
            raise BenchError(f"existing gateway: {resource['resourceType']} answered {response.status_code}")
        return str(response.json()["id"])

    ids: dict[str, str] = {}
    ids["encounter_id"] = post(fhir.build_encounter(payload, ORG_ID))
    ids["service_request_id"] = post(fhir.build_service_request(payload, ORG_ID, encounter_id=ids["encounter_id"]))
    found = httpx.get(
        f"{base}/ImagingStudy",
        params={
            "identifier": f"{fhir.identifier_system(fhir.IdentifierKind.ACSN, ORG_ID)}|{payload.noacsn}",
            "_sort": "-_lastUpdated",
            "_count": "1",
        },
        headers={"Authorization": f"Bearer {token()}", "Accept": "application/json"},
        timeout=30,
    ).json()
    ids["imaging_study_id"] = found["entry"][0]["resource"]["id"]
    links = {key: ids[key] for key in ("encounter_id", "service_request_id", "imaging_study_id")}
    ids["observation_id"] = post(fhir.build_observation(payload, ORG_ID, **links))
    ids["diagnostic_report_id"] = post(
        fhir.build_diagnostic_report(payload, ORG_ID, **links, observation_id=ids["observation_id"])
    )
    return ids


# -- checks --------------------------------------------------------------------------------------------------------


def _verify(sim: Simulator, store: RisStore, bodies: list[dict[str, Any]]) -> None:
    """Every order done with its ids; every resource on the platform once, and nothing else."""
    counts = store.counts()
    if counts[DONE] != len(bodies):
        errors = Counter((order.last_error or "")[:300] for order in store.list_orders() if order.status != DONE)
        raise BenchError(f"RIS table after the run: {counts}, expected {len(bodies)} done; errors: {dict(errors)}")
    results = {order.accession_number: order.result or {} for order in store.list_orders(DONE)}
    for acsn, result in results.items():
        missing = [key for key in IDS if not result.get(key)]
        if missing:
            raise BenchError(f"order {acsn} is done without {missing}")
    expected = {
        "Encounter": Counter(b["identifier_value"] for b in bodies),
        **{kind: Counter(b["noacsn"] for b in bodies) for kind in RESOURCE_TYPES[1:]},
    }
    id_keys = dict(
        zip(
            RESOURCE_TYPES,
            ("encounter_id", "service_request_id", "observation_id", "diagnostic_report_id"),
            strict=True,
        )
    )
    for kind in RESOURCE_TYPES:
        found = sim.resources(kind)
        values = Counter(fhir.lookup_identifier(resource, ORG_ID)[1] for resource in found)
        if values != expected[kind]:
            extra = sum((values - expected[kind]).values())
            missing_n = sum((expected[kind] - values).values())
            raise BenchError(f"{kind}: {len(found)} on the platform, {extra} unexpected or twice, {missing_n} missing")
        ids = {resource["id"] for resource in found}
        if {result[id_keys[kind]] for result in results.values()} != ids:
            raise BenchError(f"{kind}: the ids in the RIS table are not the ids on the platform")


def _rate(requests: list[tuple[float, str, str]], cap: float | None) -> dict[str, Any]:
    """Requests the platform saw: how many, per order kind, the mean rate and the busiest one-second window."""
    times = sorted(t for t, _, _ in requests)
    busiest = 0
    end = 0
    for start, moment in enumerate(times):
        while end < len(times) and times[end] < moment + 1.0:
            end += 1
        busiest = max(busiest, end - start)
    span = (times[-1] - times[0]) if len(times) > 1 else 0.0
    tokens = sum(1 for _, method, path in requests if path.endswith("/accesstoken"))
    out: dict[str, Any] = {
        "requests": len(times),
        "token_requests": tokens,
        "mean_rps": round(len(times) / span, 1) if span else None,
        "busiest_1s": busiest,
    }
    if cap is not None:
        out["cap_honoured"] = busiest <= cap + 1  # the bucket's burst of 1 on top of the rate
    return out


# -- report --------------------------------------------------------------------------------------------------------


def _summarise(rounds: list[dict[str, Any]], max_rps: float) -> dict[str, Any]:
    gateway = [r["gateway"] for r in rounds]
    existing = [r["existing"] for r in rounds]
    stats = {
        name: {
            "orders_per_s": summary([m["orders_per_s"] for m in measured]),
            "wall_s": summary([m["wall_s"] for m in measured]),
            "requests_per_order": summary([m["requests"] / m["orders"] for m in measured]),
            "mean_rps": summary([m["mean_rps"] for m in measured]),
            "busiest_1s": summary([m["busiest_1s"] for m in measured]),
            "sent_busiest_1s": summary([m["sent"]["busiest_1s"] for m in measured if "sent" in m] or [0]),
        }
        for name, measured in (("gateway", gateway), ("existing", existing))
    }
    stats["gateway"]["cpu_s_per_order"] = {
        part: summary([m["cpu_s"][part] / m["orders"] for m in gateway])
        for part in ("worker", "prefect_server", "postgres", "simulator")
    }
    value = ratio(stats["gateway"]["orders_per_s"], stats["existing"]["orders_per_s"])
    return {
        "rounds": rounds,
        "stats": stats,
        "ratio": {
            "value": value,
            "paired": paired_ratios([g["orders_per_s"] for g in gateway], [e["orders_per_s"] for e in existing]),
            "target": ">= 10",
            "met": value >= 10,
        },
        "cap": {
            "max_rps": max_rps,
            "busiest_1s_max": max(g["busiest_1s"] for g in gateway),
            "sent_busiest_1s_max": max(g["sent"]["busiest_1s"] for g in gateway),
            "honoured": all(g["busiest_1s"] <= max_rps for g in gateway),
        },
    }


def _scaling(results: dict[str, Any], sizes: tuple[int, ...]) -> dict[str, Any]:
    if len(sizes) < 2:
        return {}
    base, doubled = (results["sizes"][str(n)]["stats"]["gateway"] for n in sizes[:2])
    return {
        "gateway_wall": ratio(doubled["wall_s"], base["wall_s"]),
        "gateway_orders_per_s": ratio(doubled["orders_per_s"], base["orders_per_s"]),
    }


def report(results: dict[str, Any]) -> str:
    out = []
    for size, block in results["sizes"].items():
        stats = block["stats"]
        rows = []
        for name, label in (
            (
                "gateway",
                f"gateway: poll-ris, {results['poll_concurrency']} at a time, SS_MAX_RPS {results['max_rps']:g}",
            ),
            ("existing", f"existing gateway's way (sample of {results['baseline_sample']} per round)"),
        ):
            s = stats[name]
            rows.append(
                [
                    label,
                    fmt(s["orders_per_s"]),
                    fmt(s["wall_s"]),
                    f"{s['requests_per_order']['median']:.1f}",
                    f"{s['mean_rps']['median']:.1f}",
                    f"{s['busiest_1s']['max']:.0f}",
                ]
            )
        out.append(f"\n### {size} pending batch3 orders, {results['latency_s'] * 1000:.0f} ms per request\n")
        out.append(
            table(
                ["method", "orders/s median (min-max)", "wall s", "requests/order", "mean req/s", "busiest 1 s"],
                rows,
            )
        )
        r, cap = block["ratio"], block["cap"]
        cpu = stats["gateway"]["cpu_s_per_order"]
        out.append(
            "\n* gateway CPU s per order (medians): "
            + ", ".join(f"{part} {cpu[part]['median']:.3f}" for part in ("worker", "prefect_server", "simulator"))
        )
        out.append(
            f"\n* gateway / existing orders/s = {r['value']} (per-round {r['paired']['median']:.2f}, "
            f"{r['paired']['min']:.2f}-{r['paired']['max']:.2f}; target >= 10: {'met' if r['met'] else 'NOT met'})"
            f"\n* cap {cap['max_rps']:g} req/s: busiest one-second window at the platform {cap['busiest_1s_max']}, "
            f"as sent by the gateway {cap['sent_busiest_1s_max']} "
            f"({'honoured' if cap['honoured'] else 'NOT honoured'} at the platform)"
        )
    if results.get("scaling"):
        s = results["scaling"]
        out.append(
            f"\n* doubling the backlog: gateway wall x{s['gateway_wall']}, orders/s x{s['gateway_orders_per_s']} "
            "(existing gateway: x2.00 and x1.00 by construction, one order after another)"
        )
    if flow := results.get("flow_mode"):
        out.append(
            f"\n* default mode (a batch3 subflow run per order, a task run per step), {flow['orders']} orders: "
            f"{flow['orders_per_s']:.2f} orders/s"
            + (f" ({sum(flow['not_done'].values())} not done: {flow['not_done']})" if flow.get("not_done") else "")
            + f", busiest 1 s at the platform {flow['busiest_1s']}, "
            f"CPU s per order: worker {flow['cpu_s']['worker'] / flow['orders']:.3f}, "
            f"Prefect server {flow['cpu_s']['prefect_server'] / flow['orders']:.3f}"
        )
    out.append(f"\nPrefect server database: {results['prefect_database']}")
    return "\n".join(out)
