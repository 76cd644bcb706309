"""The SATUSEHAT simulator in its own process, for benchmarks: the platform's latency, a log of every request as it
arrives, and ImagingStudies seeded as the DICOM Router would have left them.

`python -m bench.simhost --latency 0.15 --org ORG --client-id ID --client-secret SECRET` prints one JSON line
(its URLs) when ready and runs until SIGTERM. Its own process, so the gateway's interpreter is not shared with it
(the tests run it in-process, which is fine for correctness, not for throughput).

Added on top of `simulator.server.start_simulator`, without changing the simulator:

* `GET /bench/requests?after=N`: (arrival time, method, path) of every request from the N-th on, recorded before
  the simulated latency, so the benchmark counts requests per second as the platform would see them;
* `POST /bench/seed` {"acsns": [...], "subject": "P..."}: one ImagingStudy per ACSN (2 instances, 1 series),
  built by the router emulation's own builder (`simulator.imaging.build_imaging_study`) and stored directly,
  i.e. the images were sent to the router earlier (batch3's situation: the modality sent them itself).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request, Response

import simulator.server as server
from simulator.config import SimulatorConfig
from simulator.imaging import InstanceHeader, build_imaging_study
from simulator.platform import Platform

_log: list[tuple[float, str, str]] = []
_log_lock = threading.Lock()


def _instrument(create_app: Any) -> Any:
    """Wrap the simulator's app factory: the request log (outermost middleware) and the bench routes."""

    def create(platform: Platform) -> FastAPI:
        app: FastAPI = create_app(platform)

        @app.get("/bench/requests")
        async def requests(after: int = 0) -> list[tuple[float, str, str]]:
            with _log_lock:
                return _log[after:]

        @app.post("/bench/seed")
        async def seed(body: dict[str, Any]) -> dict[str, int]:
            for acsn in body["acsns"]:
                platform.store.create(_imaging_study(acsn, body["subject"], platform.config.org_id))
            return platform.store.counts()

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Response:
            path = request.url.path
            if not path.startswith(("/bench", "/admin")):
                with _log_lock:
                    _log.append((time.time(), request.method, path))
            return await call_next(request)

        return app

    return create


def _imaging_study(acsn: str, subject: str, org_id: str) -> dict[str, Any]:
    study_uid = f"2.25.{uuid.uuid4().int}"
    series_uid = f"2.25.{uuid.uuid4().int}"
    headers = [
        InstanceHeader(
            accession_number=acsn,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=f"2.25.{uuid.uuid4().int}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality="CT",
            series_number="1",
            instance_number=str(number),
            study_date="20250801",
            study_time="055741",
        )
        for number in (1, 2)
    ]
    # The order's ServiceRequest is created later by batch3 itself; the router would have linked an earlier one.
    return build_imaging_study(
        headers,
        service_request_id=str(uuid.uuid4()),
        subject_reference=f"Patient/{subject}",
        imaging_study_id=None,
        org_id=org_id,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simhost")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--org", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--router-delay", type=float, default=0.2)
    args = parser.parse_args(argv)
    server.create_app = _instrument(server.create_app)  # type: ignore[assignment]
    config = SimulatorConfig(
        org_id=args.org,
        client_id=args.client_id,
        client_secret=args.client_secret,
        router_delay_s=args.router_delay,
        admin_enabled=True,
    )
    running = server.start_simulator(config)
    running.platform.faults.latency_s = args.latency
    ready = {
        "base_url": running.base_url,
        "auth_url": running.auth_url,
        "fhir_url": running.fhir_url,
        "router_host": config.host,
        "router_port": running.dicom_port,
        "router_aet": config.router_aet,
    }
    print(json.dumps(ready), flush=True)
    running.serve_until_signalled()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
