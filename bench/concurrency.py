"""Item 3 (and its part of 6): 8 studies at once against one at a time, on this 2-core machine.

Eight CT studies (300 slices each) are in Orthanc; the receiver is storescp with --fork (one process per
association, as a router serving several modalities must; plain storescp serves one association at a time and
would serialise any sender). Sequential: the 8 studies routed one after another. Concurrent: 8 at once, with the
per-router association cap (RouterClient's process-wide slots, ROUTER_MAX_ASSOCIATIONS) at 1, 2, 4 (the default)
and 8. Both through route_study in threads (one PACS client each, as the gateway's tasks have) and through 8
dicom_process flows on the Prefect server (asyncio.gather in one worker, cap from the settings), run as `satset
serve` runs them (the result storage named by deployments.serve.pin_result_storage: bench.common.served_flows). The
server keeps its database in PostgreSQL when one is reachable (`bench.common.prefect_database`), as the README asks
for concurrent runs: on SQLite, flow runs created at the same moment are refused (SQLITE_BUSY, 503) and Prefect's
client retries them 2 s later.
The other modes route as the gateway does: the read-ahead thread only for a study transferred while no other study
of the process is (clients.routing.TRANSFERS_IN_PROCESS), so one at a time has it and 8 at once mostly do not;
`*_no_read_ahead` modes route without it at all, to measure what that thread costs in CPU. `processes_N`: the 8
studies spread over N warm worker processes, one study at a time each, so no GIL is shared between studies (as
`satset serve --limit N` runs flow runs, without Prefect's start-up). Throughput
is instances per second; the ratio is concurrent throughput over sequential; CPU seconds per study are read from
/proc for each process (gateway with its worker processes, storescp with its children, Orthanc, Prefect server)
and for the whole machine (every core's busy time, the kernel's work outside any process included). Doubling:
8 x 600 slices.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from bench.common import (
    ROUTER_AET,
    Stack,
    cpu_seconds,
    descendants,
    fmt,
    load,
    log,
    machine,
    machine_cpu_seconds,
    prefect_database,
    ratio,
    stack,
    summary,
    table,
    verify_received,
    write_results,
)
from bench.methods import PATIENT_ID, FlowRunner, RouteTimer, bench_pacs, new_accession, rotate, route_confirmed
from clients import router as router_module
from clients.pacs import PacsClient
from clients.router import RouterClient
from clients.routing import READ_AHEAD
from stack.prefect_server import PrefectServer
from stack.studies import StudySpec

STUDIES = 8
CAPS = (1, 2, 4, 8)
TARGET = 1.5
CORES = os.cpu_count() or 2
PROCESSES = (2, 4)
"""Routing worker processes for the `processes_N` modes (see `_RoutingProcesses`)."""
NO_READ_AHEAD = "_no_read_ahead"
"""Modes ending so route each study without the read-ahead thread (read_ahead=0): its CPU cost, measured."""


def run(
    *, runs: int = 3, sizes: tuple[int, ...] = (300, 600), prefect_server: PrefectServer | None = None
) -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "concurrency", "machine": machine(), "runs": runs, "sizes": {}}
    with ExitStack() as exits:
        database, results["prefect_database"] = exits.enter_context(prefect_database())
        if database is not None:  # the flows run at once: the server the README asks for then
            log(f"concurrency: starting a Prefect server on {results['prefect_database']}")
            prefect_server = exits.enter_context(PrefectServer(database_url=database))
        st = exits.enter_context(stack(receivers=[("fork", ("--fork",))], prefect=True, prefect_server=prefect_server))
        timer = RouteTimer().install()
        exits.callback(timer.uninstall)
        flow = FlowRunner(st, timer)
        exits.callback(flow.close)
        pools = {n: exits.enter_context(_RoutingProcesses(st, n)) for n in PROCESSES}
        for size in sizes:
            log(f"concurrency: uploading {STUDIES} studies of {size} instances")
            uids = [
                st.upload(StudySpec(series=1, instances_per_series=size, rows=512, columns=512)) for _ in range(STUDIES)
            ]
            results["sizes"][str(size)] = _measure(st, flow, pools, uids, size, runs)
            st.orthanc.delete_all()
    results["load_at_end"] = load()
    write_results("concurrency", results)
    print(report(results))
    return results


def _measure(
    st: Stack, flow: FlowRunner, pools: dict[int, _RoutingProcesses], uids: list[str], size: int, runs: int
) -> dict[str, Any]:
    modes = (
        ["sequential", "sequential_no_read_ahead"]
        + [f"threads_cap{cap}" for cap in CAPS]
        + ["threads_cap4_no_read_ahead"]
        + [f"processes_{n}" for n in PROCESSES]
        + ["flows_sequential", "flows_concurrent_cap4"]
    )

    cpu_by_mode: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    meters = _cpu_meters(st)
    receiver = st.receivers["fork"]
    total = len(uids) * size

    def one(mode: str) -> float:
        receiver.clear()
        _reset_caps()
        before = {name: meter() for name, meter in meters.items()}
        elapsed, elsewhere = _run_mode(mode)
        # This process and the machine are read when the routing ends, before the check below lists and stats the
        # receiver's 2400 files (which would count as the gateway's CPU); the receiver's forked children, reaped
        # by storescp a little later, are read after it.
        used = {name: meters[name]() - before[name] for name in AT_RUN_END}
        used["gateway"] += elsewhere
        verify_received(receiver, total, None, timeout_s=60)
        used |= {name: meter() - before[name] for name, meter in meters.items() if name not in AT_RUN_END}
        cpu_by_mode[mode].append(used)
        return elapsed

    def _run_mode(mode: str) -> tuple[float, float]:
        """The mode's wall time, and the CPU seconds the gateway used in other processes (its routing workers)."""
        read_ahead = 0 if mode.endswith(NO_READ_AHEAD) else READ_AHEAD
        if mode.startswith("processes_"):
            return pools[int(mode.removeprefix("processes_"))].route(uids)
        if mode.startswith("sequential"):
            elapsed = _threads(st, uids, workers=1, cap=4, read_ahead=read_ahead)
        elif mode.startswith("threads_cap"):
            cap = int(mode.removeprefix("threads_cap").removesuffix(NO_READ_AHEAD))
            elapsed = _threads(st, uids, workers=len(uids), cap=cap, read_ahead=read_ahead)
        else:
            os.environ["ROUTER_MAX_ASSOCIATIONS"] = "4"
            flow._receiver = None  # re-read the settings
            flow.use("fork")
            concurrent = mode == "flows_concurrent_cap4"
            elapsed = _flows(flow, uids, concurrent=concurrent)
        return elapsed, 0.0

    log(f"concurrency: {size} instances x {len(uids)}: warm-up")
    for mode in ("threads_cap4", "flows_concurrent_cap4", *(f"processes_{n}" for n in PROCESSES)):
        receiver.clear()
        _reset_caps()
        _run_mode(mode)
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(runs):
        log(f"concurrency: {size} instances x {len(uids)}: round {round_ + 1}/{runs}, load {load()}")
        for mode in rotate(modes, round_):
            samples[mode].append(one(mode))
    stats = {mode: summary(values) for mode, values in samples.items()}
    throughput = {mode: round(total / s["median"], 1) for mode, s in stats.items()}
    speedups = {
        mode: ratio(stats["sequential"], stats[mode])
        for mode in modes
        if mode.startswith(("threads", "sequential", "processes"))
    }
    speedups["flows_concurrent_cap4"] = ratio(stats["flows_sequential"], stats["flows_concurrent_cap4"])
    per_study = {
        mode: {name: round(statistics.median(v[name] for v in values) / len(uids), 3) for name in meters}
        for mode, values in cpu_by_mode.items()
    }
    machine_cpu = {mode: values[MACHINE] for mode, values in per_study.items()}
    cpu = {mode: {name: v for name, v in values.items() if name != MACHINE} for mode, values in per_study.items()}
    sequential_per_study = stats["sequential"]["median"] / len(uids)
    bound_modes = ("sequential", "threads_cap4", "threads_cap4_no_read_ahead")
    bounds = {mode: round(sequential_per_study / (sum(cpu[mode].values()) / CORES), 2) for mode in bound_modes}
    machine_bounds = {mode: round(sequential_per_study / (machine_cpu[mode] / CORES), 2) for mode in bound_modes}
    busy = {mode: round(machine_cpu[mode] / (stats[mode]["median"] / len(uids)), 2) for mode in modes}
    return {
        "studies": len(uids),
        "instances_per_study": size,
        "cpu_s_per_study": cpu,
        "machine_cpu_s_per_study": machine_cpu,
        "speedup_bound_from_cpu": bounds["sequential"],
        "speedup_bounds_from_cpu": bounds,
        "speedup_bounds_from_machine_cpu": machine_bounds,
        "sequential_cpu_busy_cores": round(sum(cpu["sequential"].values()) / sequential_per_study, 2),
        "machine_busy_cores": busy,
        "stats": stats,
        "instances_per_s": throughput,
        "speedup_over_sequential": speedups,
        "met": {mode: value >= TARGET for mode, value in speedups.items() if not mode.startswith("sequential")},
        "load": load(),
    }


MACHINE = "machine"
AT_RUN_END = ("gateway", MACHINE)
"""Meters read as soon as the routing ends (the rest once the receiver has settled): see `_measure`."""


def _cpu_meters(st: Stack) -> dict[str, Callable[[], float]]:
    """CPU seconds used so far by each process of the routing: this gateway process (its threads), the receiver
    (storescp and its forked children, reaped), Orthanc, and the Prefect server (with its worker processes); and
    by the whole machine (`MACHINE`: every core's busy time, the kernel's work outside any process included)."""
    meters: dict[str, Callable[[], float]] = {"gateway": lambda: cpu_seconds(os.getpid()), MACHINE: machine_cpu_seconds}
    scp_pid = st.receivers["fork"].scp.pid
    if scp_pid is not None:
        meters["storescp"] = lambda: cpu_seconds(scp_pid, reaped_children=True)
    orthanc_pid = st.orthanc.pid
    if orthanc_pid is not None:
        meters["orthanc"] = lambda: cpu_seconds(orthanc_pid)
    server_pid = st.prefect.pid if st.prefect is not None else None
    if server_pid is not None:
        meters["prefect_server"] = lambda: (
            cpu_seconds(server_pid, reaped_children=True) + sum(cpu_seconds(child) for child in descendants(server_pid))
        )
    return meters


def _reset_caps() -> None:
    """Forget the process-wide router slots, so the next RouterClient sets the cap (bench only: in a worker the
    first client's limit stays, by design)."""
    with router_module._slots_lock:
        router_module._slots.clear()


def _threads(st: Stack, uids: list[str], *, workers: int, cap: int, read_ahead: int = READ_AHEAD) -> float:
    scp = st.receivers["fork"].scp
    local = threading.local()

    def route(uid: str) -> None:
        pacs = getattr(local, "pacs", None)
        if pacs is None:
            pacs = local.pacs = bench_pacs(st.orthanc.dicomweb_url)
        router = RouterClient(scp.host, scp.port, ROUTER_AET, max_associations=cap)
        route_confirmed(pacs, router, uid, read_ahead=read_ahead)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-route") as pool:
        list(pool.map(route, uids))
    return time.perf_counter() - started


class _RoutingProcesses:
    """N worker processes, each routing one study at a time (8 studies, N at once): no GIL shared between studies.

    Why measure it: in one process the studies' threads share one GIL, and 10-14% of the machine stays idle however
    many studies go at once (bench/RESULTS.md item 3). Separate processes are how `satset serve --limit N` runs
    flow runs (without Prefect's start-up here: the workers are started and warmed before the runs). Each worker is
    alone in its process, so it routes with the read-ahead thread, as a served flow run would. The association cap
    is N (one association per process)."""

    def __init__(self, st: Stack, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        scp = st.receivers["fork"].scp
        self._target = (st.orthanc.dicomweb_url, scp.host, scp.port)
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        # One warm-up task per worker, each long enough that the pool starts them all: imports happen here.
        list(self._pool.map(_warm_routing_worker, [0.5] * workers))

    def route(self, uids: list[str]) -> tuple[float, float]:
        """Route the studies; the wall time and the CPU seconds the workers used for them."""
        started = time.perf_counter()
        used = sum(self._pool.map(_route_in_worker, [(*self._target, uid) for uid in uids]))
        return time.perf_counter() - started, used

    def __enter__(self) -> _RoutingProcesses:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_worker_pacs: PacsClient | None = None


def _warm_routing_worker(hold_s: float) -> None:
    time.sleep(hold_s)


def _route_in_worker(target: tuple[str, str, int, str]) -> float:
    """Route one study in a worker process; returns the CPU seconds it took (all of the process's threads)."""
    global _worker_pacs
    url, host, port, uid = target
    cpu_before = time.process_time()
    if _worker_pacs is None:
        _worker_pacs = bench_pacs(url)
    route_confirmed(_worker_pacs, RouterClient(host, port, ROUTER_AET), uid)
    return time.process_time() - cpu_before


def _flows(flow: FlowRunner, uids: list[str], *, concurrent: bool) -> float:
    import asyncio

    from flows.dicom import dicom_process
    from models.inputs import DicomProcessInput

    payloads = [DicomProcessInput(study=uid, patientid=PATIENT_ID, accesionnum=new_accession()) for uid in uids]

    async def sequential() -> None:
        for payload in payloads:
            await dicom_process(payload)

    async def together() -> None:
        await asyncio.gather(*(dicom_process(payload) for payload in payloads))

    started = time.perf_counter()
    flow.loop.run_until_complete(together() if concurrent else sequential())
    return time.perf_counter() - started


def report(results: dict[str, Any]) -> str:
    out = []
    for size, block in results["sizes"].items():
        rows = []
        for mode, stats in block["stats"].items():
            speedup = block["speedup_over_sequential"].get(mode, "")
            met = block["met"].get(mode)
            rows.append(
                [
                    mode,
                    fmt(stats),
                    block["instances_per_s"][mode],
                    speedup,
                    "" if met is None else ("met" if met else "NOT met"),
                ]
            )
        out.append(f"\n### {block['studies']} studies x {size} instances (load at end {block['load']})\n")
        out.append(
            table(["mode", "wall s median (min-max)", "instances/s", f"x sequential (target >= {TARGET})", ""], rows)
        )
        names = list(next(iter(block["cpu_s_per_study"].values())))
        cpu_rows = [
            [mode, *(f"{values[name]:.3f}" for name in names), f"{sum(values.values()):.3f}"]
            for mode, values in block["cpu_s_per_study"].items()
        ]
        out.append(f"\nCPU seconds per study (median of runs); {CORES} cores\n")
        out.append(table(["mode", *names, "total"], cpu_rows))
        out.append(
            f"\nUpper bound on the speedup from CPU alone (sequential wall per study / (CPU per study of the mode / "
            f"{CORES} cores)): {block.get('speedup_bounds_from_cpu', block['speedup_bound_from_cpu'])}; one study at "
            f"a time keeps {block.get('sequential_cpu_busy_cores')} cores busy"
        )
        if "machine_cpu_s_per_study" in block:
            machine_rows = [
                [mode, f"{block['machine_cpu_s_per_study'][mode]:.3f}", block["machine_busy_cores"][mode]]
                for mode in block["machine_cpu_s_per_study"]
            ]
            out.append("\nThe whole machine (every core's busy time, /proc/stat), per study\n")
            out.append(table(["mode", "machine CPU s per study", f"cores busy (of {CORES})"], machine_rows))
            out.append(f"\nThe same bound from the machine's CPU: {block['speedup_bounds_from_machine_cpu']}")
    return "\n".join(out)
