"""The whole gateway on one laptop: PACS, SATUSEHAT, Prefect, the gateway's worker and HIS API, and one order.

    Orthanc (PACS) ─┐                              ┌─ SATUSEHAT simulator (FHIR + DICOM Router)
                    ├── satset serve (deployments, poller) ──┤
    RIS (SQLite) ───┘          ▲                   └─ Prefect server (UI, API)
                         satset api (HIS)

Everything listens on 127.0.0.1 on free ports and lives under one state folder. The demo loads a generated study
into the PACS, adds a pending batch4 order to the RIS table, starts a poll at once (the schedule would get there
within a minute), and reports the FHIR ids and where to look.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from simulator.config import SimulatorConfig
from simulator.server import RunningSimulator, start_simulator
from stack.orthanc import OrthancServer
from stack.ports import LOOPBACK, free_port
from stack.prefect_server import PrefectServer
from stack.studies import StudySpec, iter_instances

PACS_USER = "demo"
ORDER_TIMEOUT_S = 600.0

Say = Callable[[str], None]


@dataclass
class DemoResult:
    """What the demo achieved, for the summary and for `--once`'s exit code."""

    accession_number: str
    status: str
    result: dict[str, Any]
    last_error: str | None
    flow_run_url: str | None


class Demo:
    """Starts each part, in order, with progress on `say`; `stop()` (or the context manager) tears all down."""

    def __init__(self, state_dir: Path, say: Say) -> None:
        self.state_dir = state_dir
        self.say = say
        self._stack = ExitStack()
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self.simulator: RunningSimulator | None = None
        self.orthanc: OrthancServer | None = None
        self.prefect: PrefectServer | None = None
        self.env: dict[str, str] = {}
        self.api_url = ""
        self.api_key = secrets.token_urlsafe(24)

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.say("stopping the demo stack")
        self._stack.close()

    def start(self) -> None:
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True)
        with self._step("SATUSEHAT simulator (FHIR R4 + DICOM Router)"):
            registry = self.state_dir / "registry.json"
            registry.write_text(json.dumps(DEMO_REGISTRY))
            self.simulator = start_simulator(
                SimulatorConfig(admin_enabled=True, db_path=self.state_dir / "satusehat.db", registry_files=(registry,))
            )
            self._stack.callback(self.simulator.stop)
        with self._step("Orthanc (the PACS, DICOMweb)"):
            self.orthanc = OrthancServer(
                users={PACS_USER: secrets.token_urlsafe(12)}, storage_dir=self.state_dir / "pacs"
            )
            self.orthanc.start()
            self._stack.callback(self.orthanc.stop)
        with self._step("Prefect server (SQLite; the first start creates its database)"):
            self.prefect = PrefectServer(self.state_dir / "prefect").start()
            self._stack.callback(self.prefect.stop)
        self.env = self._gateway_env()
        with self._step("satset serve (every deployment, the RIS poller on its schedule)"):
            self._spawn("serve", ["serve"])
            self._wait(lambda: self._deployment_id("poll-ris") is not None, "the poll-ris deployment")
        with self._step("satset api (the HIS endpoints)"):
            self._spawn("api", ["api"])
            self._wait(self._api_answers, "the HIS API")

    def run_order(self, spec: StudySpec) -> DemoResult:
        """Load the study, add its pending order, start a poll, and wait until the order is done (or dead)."""
        from clients.ris import RisStore

        assert self.orthanc is not None and self.prefect is not None
        with self._step(f"loading a generated study ({spec.instance_count} instances) into the PACS"):
            self.orthanc.upload(list(iter_instances(spec)))
        store = RisStore(self.env["RIS_DATABASE_URL"])
        store.create_schema()
        with self._step(f"adding a pending batch4 order, ACSN {spec.accession_number}"):
            store.add_order(4, _order_payload(spec))
        with self._step("starting a poll now (the schedule would within a minute)"):
            self._start_poll()
        self.say("waiting for the order: pending → in_progress → done")
        order = self._wait_for_order(store, spec.accession_number)
        store.close()
        return DemoResult(
            spec.accession_number,
            order.status,
            order.result or {},
            order.last_error,
            self._flow_run_url(f"batch4 {spec.accession_number}"),
        )

    def describe(self, outcome: DemoResult) -> str:
        assert self.simulator is not None and self.prefect is not None
        lines = [f"order {outcome.accession_number}: {outcome.status}"]
        if outcome.status == "done":
            lines += [f"  {key}: {json.dumps(value)}" for key, value in outcome.result.items()]
        elif outcome.last_error:
            lines.append(f"  reason: {outcome.last_error}")
        lines += [
            "",
            f"Prefect UI (the run):   {outcome.flow_run_url or self.prefect.ui_url}",
            f"Prefect UI:             {self.prefect.ui_url}",
            f"HIS API docs:           {self.api_url}/api/docs   (header X-API-Key: {self.api_key})",
            f"SATUSEHAT simulator:    {self.simulator.fhir_url}   (state: {self.simulator.base_url}/admin/state)",
            f"RIS orders:             RIS_DATABASE_URL={self.env['RIS_DATABASE_URL']} .venv/bin/satset orders list",
            f"Gateway log (LOG_FILE): {self.env['LOG_FILE']}",
        ]
        return "\n".join(lines)

    # --- internals ---------------------------------------------------------------------------------------

    @contextmanager
    def _step(self, what: str) -> Iterator[None]:
        self.say(f"{what} ...")
        started = time.monotonic()
        yield
        self.say(f"  ready in {time.monotonic() - started:.1f} s")

    def _gateway_env(self) -> dict[str, str]:
        assert self.simulator is not None and self.orthanc is not None and self.prefect is not None
        api_port = free_port()
        self.api_url = f"http://{LOOPBACK}:{api_port}"
        user, password = self.orthanc.auth or ("", "")
        config = self.simulator.config
        return {
            **self.prefect.client_env(),
            "DCM4CHEE_URL": self.orthanc.dicomweb_url,
            "PACS_USERNAME": user,
            "PACS_PASSWORD": password,
            "ROUTER_IP": config.host,
            "ROUTER_PORT": str(self.simulator.dicom_port),
            "ROUTER_AET": config.router_aet,
            "SS_AUTH_URL": self.simulator.auth_url,
            "SS_BASE_URL": self.simulator.fhir_url,
            "SS_ORG_ID": config.org_id,
            "SS_CLIENT_ID": config.client_id,
            "SS_CLIENT_SECRET": config.client_secret,
            # The hospital's exam code settings: the demo's study is a CT of no named body region, and its order
            # (the existing gateway's batch4 example) carries no codind_code.
            "EXAM_CODE_BY_MODALITY": json.dumps({"CT": DEMO_EXAM_CODE}),
            "DEFAULT_EXAM_CODE": DEMO_EXAM_CODE,
            "RIS_DATABASE_URL": f"sqlite:///{self.state_dir / 'ris.db'}",
            "TEMP_DIR": str(self.state_dir / "tmp"),
            "LOG_FILE": str(self.state_dir / "gateway.log"),
            "API_HOST": LOOPBACK,
            "API_PORT": str(api_port),
            "API_KEY": self.api_key,
        }

    def _spawn(self, name: str, arguments: list[str]) -> None:
        log = (self.state_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", *arguments],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

        def stop() -> None:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
            log.close()

        self._stack.callback(stop)
        self._processes[name] = process

    def _wait(self, ready: Callable[[], bool], what: str, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            for name, process in self._processes.items():
                if process.poll() is not None:
                    tail = (self.state_dir / f"{name}.log").read_text(errors="replace")[-1500:]
                    raise RuntimeError(
                        f"satset {name} exited with {process.returncode} before {what} was ready:\n{tail}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not ready within {timeout_s:.0f} s")
            time.sleep(0.3)

    def _deployment_id(self, flow_name: str) -> str | None:
        assert self.prefect is not None
        try:
            response = httpx.get(f"{self.prefect.api_url}/deployments/name/{flow_name}/gateway", timeout=5)
        except httpx.HTTPError:
            return None
        return response.json()["id"] if response.status_code == 200 else None

    def _api_answers(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/api/satset/halo", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _start_poll(self) -> None:
        assert self.prefect is not None
        deployment_id = self._deployment_id("poll-ris")
        body = {"idempotency_key": f"demo-poll-{uuid.uuid4()}", "tags": ["demo"]}
        httpx.post(f"{self.prefect.api_url}/deployments/{deployment_id}/create_flow_run", json=body, timeout=10)

    def _wait_for_order(self, store: Any, accession_number: str) -> Any:
        deadline = time.monotonic() + ORDER_TIMEOUT_S
        seen = None
        while True:
            order = store.get(accession_number)
            if order.status != seen:
                seen = order.status
                self.say(f"  order {accession_number}: {seen} (attempt {order.attempts})")
            if order.status in ("done", "dead") or time.monotonic() > deadline:
                return order
            time.sleep(0.5)

    def _flow_run_url(self, run_name: str) -> str | None:
        assert self.prefect is not None
        body = {"flow_runs": {"name": {"any_": [run_name]}}, "limit": 1, "sort": "START_TIME_DESC"}
        try:
            runs = httpx.post(f"{self.prefect.api_url}/flow_runs/filter", json=body, timeout=10).json()
        except httpx.HTTPError:
            return None
        return f"{self.prefect.ui_url}/runs/flow-run/{runs[0]['id']}" if runs else None


DEMO_EXAM_CODE = "25045-6"
"""LOINC 'CT unspecified body region': the demo's synthetic CT study names no body region."""

DEMO_PATIENT, DEMO_REFERRER, DEMO_RADIOLOGIST = "P10443013727", "10016869420", "10000504193"
DEMO_REGISTRY = {
    "Patient": [{"id": DEMO_PATIENT, "nik": "9900000000000001", "name": "Pasien Sintetis Satu"}],
    "Practitioner": [
        {"id": DEMO_REFERRER, "nik": "9900000000000101", "name": "Dokter Sintetis Pengirim"},
        {"id": DEMO_RADIOLOGIST, "nik": "9900000000000102", "name": "Dokter Sintetis Radiologi"},
    ],
}
"""The synthetic people the demo's orders name, registered in the simulator (it resolves every reference)."""


def _order_payload(spec: StudySpec) -> dict[str, Any]:
    """The existing gateway's batch4 example, for the generated study."""
    return {
        "identifier_value": "RG" + spec.accession_number,
        "subject_id": DEMO_PATIENT,
        "individual_id": DEMO_REFERRER,
        "period_start": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 3600)),
        "noacsn": spec.accession_number,
        "performer_id": DEMO_RADIOLOGIST,
        "performer_value": "Tidak tampak kelainan",
        "conclusion_text": "Tidak tampak bercak pada kedua lapangan paru",
        "study": spec.study_instance_uid,
    }


def demo_study() -> StudySpec:
    return StudySpec(accession_number="DEMO" + uuid.uuid4().hex[:8].upper(), series=2, instances_per_series=5)
