"""What every benchmark shares: the local stack (Orthanc, storescp receivers, a Prefect server), statistics,
machine facts, the gateway's environment, verification of what arrived, and the JSON results.

Everything runs on 127.0.0.1 (the loopback shim for Orthanc and storescp, Prefect's own --host) and every process
is stopped by its PID when the benchmark ends, fails or is interrupted (SIGINT/SIGTERM unwind the ExitStack).
The machine is shared and noisy, so benchmarks interleave their methods round by round and report medians, ranges
and ratios measured in the same run, never a lone absolute time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydicom import dcmread

from stack.dcmtk import StoreSCP
from stack.orthanc import OrthancServer
from stack.prefect_server import PrefectServer
from stack.studies import StudySpec, iter_instances

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ORTHANC_USER, ORTHANC_PASSWORD = "bench", "bench-password"
ROUTER_AET = "ROUTER"
LARGE_PDU = 131072
"""dcmtk's largest --max-pdu. Given to every receiver in the 'large PDU' rows; the official router (pynetdicom's
default) accepts 16 KB, which is what the other rows use."""

PACKAGES = ("prefect", "pydicom", "pynetdicom", "dicomweb-client", "numpy", "requests", "httpx", "py-spy")


# -- statistics --------------------------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves (seconds, or whatever was measured)."""
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 4),
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
        "n": len(ordered),
        "values": [round(v, 4) for v in values],
    }


def ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
    return round(numerator["median"] / denominator["median"], 2)


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """Per-round ratios (the two measured back to back in the same round), summarised: robust to load drifting."""
    return summary([a / b for a, b in zip(numerator, denominator, strict=True)])


def fmt(stats: dict[str, Any]) -> str:
    return f"{stats['median']:.3f} ({stats['min']:.3f}-{stats['max']:.3f})"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, printed by the benchmarks and pasted into bench/RESULTS.md."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# -- machine facts ------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, memory, OS, Python, tool and package versions, load now."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "memory_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "os": _debian(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "orthanc": _first_line(["Orthanc", "--version"]),
        "dcmtk": _first_line(["storescu", "--version"]),
        "load_at_start": os.getloadavg(),
    }


def load() -> tuple[float, float, float]:
    return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]


def _debian() -> str:
    try:
        version = Path("/etc/debian_version").read_text().strip()
    except OSError:
        return platform.platform()
    return f"Debian {version}"


def _first_line(command: list[str]) -> str | None:
    tool = shutil.which(command[0]) or (f"/usr/sbin/{command[0]}" if Path(f"/usr/sbin/{command[0]}").exists() else None)
    if tool is None:
        return None
    try:
        output = subprocess.run([tool, *command[1:]], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((line.strip() for line in (output.stdout + output.stderr).splitlines() if line.strip()), None)


# -- the stack ---------------------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A storescp standing in for the SATUSEHAT DICOM Router, and the Orthanc modality name that points at it."""

    label: str
    scp: StoreSCP
    modality: str

    @property
    def directory(self) -> Path:
        return self.scp.output_dir

    def clear(self) -> None:
        """Empty what the last run received before the next one, keeping the files to be overwritten.

        Why not delete them: this machine's root filesystem is ext4 without a journal, where creating a file scans
        past every inode deleted in the last minutes (`recently_deleted` in the kernel's inode allocator). Deleting
        the 2400 files of one run and creating them again in the next made that scan 60% of storescp's CPU and the
        routing 1.8x slower (bench/RESULTS.md, "The receiver's filesystem"). A run sends the same
        instances again, so storescp opens the same names and overwrites them: no inode is allocated on the
        measured path, as on a router host with an ordinary (journalled) filesystem.
        """
        for path in self.directory.glob("*.dcm"):
            os.truncate(path, 0)

    def received(self) -> list[Path]:
        """The files written since the last `clear` (StoreSCP.received_files leaves the emptied ones out)."""
        return self.scp.received_files()


@dataclass
class Stack:
    """Orthanc (the PACS), receivers, and optionally a Prefect server; `gateway_env` points the gateway at them."""

    workdir: Path
    orthanc: OrthancServer
    receivers: dict[str, Receiver]
    prefect: PrefectServer | None = None
    studies: dict[str, StudySpec] = field(default_factory=dict)
    result_storage: str | None = None
    """The default result storage block named as `satset serve` names it (`served_flows`), passed to workers."""

    def gateway_env(self, receiver: str = "default", **extra: str) -> dict[str, str]:
        """The environment a gateway worker would have (the existing gateway's variable names)."""
        scp = self.receivers[receiver].scp
        env = {
            "DCM4CHEE_URL": self.orthanc.dicomweb_url,
            "PACS_USERNAME": ORTHANC_USER,
            "PACS_PASSWORD": ORTHANC_PASSWORD,
            "ROUTER_IP": scp.host,
            "ROUTER_PORT": str(scp.port),
            "ROUTER_AET": ROUTER_AET,
            # Required by the settings, never called by dicom-process.
            "SS_AUTH_URL": "http://127.0.0.1:9/oauth2/v1",
            "SS_BASE_URL": "http://127.0.0.1:9/fhir-r4/v1",
            "SS_ORG_ID": "BENCH01",
            "SS_CLIENT_ID": "bench",
            "SS_CLIENT_SECRET": "bench",
            "DEFAULT_EXAM_CODE": "25045-6",  # the bench orders carry no codind_code; none is assumed
            "TEMP_DIR": str(self.workdir / "gateway-tmp"),
            **extra,
        }
        if self.prefect is not None:
            env.update(self.prefect.client_env())
            env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        if self.result_storage is not None:
            env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = self.result_storage
        return env

    def upload(self, spec: StudySpec) -> str:
        """Store a generated study in Orthanc (as a modality would); returns its Study Instance UID."""
        self.orthanc.upload(iter_instances(spec))
        self.studies[spec.study_instance_uid] = spec
        return spec.study_instance_uid


@contextmanager
def stack(
    *,
    receivers: Sequence[tuple[str, Sequence[str]]] = (("default", ()),),
    prefect: bool = False,
    prefect_server: PrefectServer | None = None,
) -> Iterator[Stack]:
    """Start storescp receivers (label, extra storescp args), Orthanc knowing them as modalities, and a Prefect
    server if asked (or use the one given); stop all of it, whatever happens, when the block ends."""
    with ExitStack() as exits, _signals_unwind():
        workdir = Path(tempfile.mkdtemp(prefix="satset-bench-"))
        exits.callback(shutil.rmtree, workdir, True)
        started: dict[str, Receiver] = {}
        for label, args in receivers:
            scp = StoreSCP(workdir / f"recv-{label}", aet=ROUTER_AET, extra_args=tuple(args))
            scp.start()
            exits.callback(scp.stop)
            started[label] = Receiver(label, scp, f"router-{label}")
        modalities = {r.modality: (ROUTER_AET, r.scp.host, r.scp.port) for r in started.values()}
        orthanc = OrthancServer(users={ORTHANC_USER: ORTHANC_PASSWORD}, modalities=modalities)
        orthanc.start()
        exits.callback(orthanc.stop)
        server = prefect_server
        if prefect and server is None:
            server = PrefectServer()
            server.start()
            exits.callback(server.stop)
        result_storage = exits.enter_context(served_flows(server)) if prefect and server is not None else None
        yield Stack(workdir, orthanc, started, server, result_storage=result_storage)


DEFAULT_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
"""Where a fresh database for the Prefect server is made (`SATSET_BENCH_POSTGRES_URL` overrides)."""


@contextmanager
def prefect_database() -> Iterator[tuple[str | None, str]]:
    """A fresh PostgreSQL database for a Prefect server (dropped afterwards), and its label; SQLite (None) if there
    is no PostgreSQL. PostgreSQL is the server the README asks for when runs go concurrently: on SQLite, flow runs
    created at the same moment fail with SQLITE_BUSY, answered 503, and Prefect's client waits 2 s, then 4 s."""
    import uuid

    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    base = make_url(os.environ.get("SATSET_BENCH_POSTGRES_URL", DEFAULT_POSTGRES))
    name = f"satset_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError:
        admin.dispose()
        log("bench: no PostgreSQL reachable; the Prefect server runs on SQLite")
        yield None, "SQLite"
        return
    try:
        url = base.set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)
        yield url, f"PostgreSQL {base.host}:{base.port or 5432} (fresh database)"
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def served_flows(server: PrefectServer) -> Iterator[str]:
    """Run flows as `satset serve` runs them: the default result storage named by deployments.serve's own
    `pin_result_storage` (the block Prefect would have used), in PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK.

    `satset serve` sets the variable in its environment and its flow-run processes inherit it; here the flows run
    in this process (routing, concurrency), where Prefect has read its settings already, so the same setting is
    applied as a temporary setting for the block, and worker processes (memory) get it in `Stack.gateway_env`.
    Without it every top-level flow run asks the server for its default result storage twice, through a new
    synchronous client, blocking its event loop (bench/RESULTS.md, item 5). Yields the block's slug."""
    os.environ.update({**server.client_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    from deployments.serve import pin_result_storage

    pointed = {  # in case Prefect was imported (its settings read) before the environment pointed at `server`
        PREFECT_API_URL: server.api_url,
        PREFECT_LOCAL_STORAGE_PATH: str(server.home / "storage"),
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    with temporary_settings(updates=pointed):
        environ: dict[str, str] = {}
        slug = pin_result_storage(environ)
        if slug is None:
            raise BenchError("pin_result_storage named no result storage block")
        try:
            with temporary_settings(updates={PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: slug}):
                yield slug
        finally:
            # FlowRunner copies Stack.gateway_env into os.environ: keep the name from reaching later benchmarks'
            # processes (another server, or item 5's default variant).
            if os.environ.get("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK") == slug:
                del os.environ["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]


@contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise in the main thread, so `with` blocks stop every child process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- verification ------------------------------------------------------------------------------------------------


def verify_received(receiver: Receiver, expected: int, accession: str | None, *, timeout_s: float = 30.0) -> None:
    """Every instance arrived (as a file), and a sample carries the expected AccessionNumber."""
    files = receiver.scp.wait_for_files(expected, timeout_s=timeout_s)
    if len(files) != expected:
        raise BenchError(f"{receiver.label}: {len(files)} of {expected} instances arrived")
    if accession is not None:
        for path in (files[0], files[-1]):
            found = dcmread(path, stop_before_pixels=True).AccessionNumber
            if found != accession:
                raise BenchError(f"{receiver.label}: {path.name} has AccessionNumber {found!r}, not {accession!r}")


class BenchError(RuntimeError):
    """A run did not do what it claims (instances missing, not edited): its time must not be reported."""


# -- running and timing ------------------------------------------------------------------------------------------


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


class RssSampler:
    """Peak RSS of a process, sampled every `interval_s` in a thread (from /proc: no extra dependency)."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self._pid = pid
        self._interval = interval_s
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rss-{pid}")

    def __enter__(self) -> RssSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes(self._pid)
            if rss is None:
                return
            self.peak = max(self.peak, rss)
            self.samples.append((round(time.monotonic() - self._started, 3), rss))
            self._stop.wait(self._interval)


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` now, or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """CPU time (user + system) `pid` has used, plus its children's it has waited for when asked."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    used = int(fields[11]) + int(fields[12])  # utime, stime
    if reaped_children:
        used += int(fields[13]) + int(fields[14])  # cutime, cstime
    return used / _TICKS


def machine_cpu_seconds(source: Path = Path("/proc/stat")) -> float:
    """CPU time the whole machine has spent busy, summed over its cores (from /proc/stat).

    Why beside the per-process meters: the kernel does part of the routing's work outside any process's own
    time (loopback TCP in softirq context, writing back what the receiver wrote), and the benchmark's other
    processes use the cores too. Busy = user + nice + system + irq + softirq; idle, iowait and steal (time the
    hypervisor gave to someone else) are not, and guest time is already inside user and nice.
    """
    fields = [int(value) for value in source.read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / _TICKS


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


def _meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mib(value: int | float) -> float:
    return round(value / 2**20, 1)


def write_results(name: str, data: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    return path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quiet_prefect_console() -> None:
    """Keep Prefect's INFO logs going to the API (as in production) but off this terminal: the tables stay readable."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.events", "prefect.client"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, PrefectConsoleHandler):
                logger.removeHandler(handler)
