"""A gateway worker process for one measurement: route one study, report its own peak RSS (VmHWM) as JSON.

Run by bench/memory.py as `python -m bench.child MODE STUDY_UID ACSN` with the gateway's environment. MODE:
`flow` runs the real dicom_process flow (the worker's shape: Prefect imported, flow and tasks on a server),
`route` calls clients.routing.route_study directly, `route_before` the previous design (pydicom + pynetdicom).
The parent samples this process's RSS from outside as well; VmHWM is the kernel's own peak, nothing missed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main(argv: list[str]) -> int:
    mode, study_uid, accession = argv[:3]
    repeat = int(argv[3]) if len(argv) > 3 else 1  # bench/profile.py: several routings for enough samples
    result: dict[str, Any] = {"mode": mode, "repeat": repeat}
    counted = {"requests": 0, "largest_response_bytes": 0}
    from clients.pacs import PacsClient

    real_stream = PacsClient._stream_files

    def counting_stream(self: PacsClient, url: str, operation: str, *, not_found: str) -> Any:
        counted["requests"] += 1
        size = 0
        for part in real_stream(self, url, operation, not_found=not_found):
            size += len(part)
            yield part
        counted["largest_response_bytes"] = max(counted["largest_response_bytes"], size)

    PacsClient._stream_files = counting_stream  # type: ignore[method-assign]

    if mode == "flow":
        import asyncio

        from flows.dicom import dicom_process
        from models.inputs import DicomProcessInput

        payload = DicomProcessInput(study=study_uid, patientid="P02478375538", accesionnum=accession)
        result["rss_ready_kib"] = status_kib("VmRSS")
        started = time.perf_counter()
        outcome = asyncio.run(dicom_process(payload))
        result["elapsed_s"] = time.perf_counter() - started
        result["sent"] = outcome.get("sent_instance")
    else:
        from clients.pacs import PacsClient
        from clients.router import RouterClient
        from clients.routing import route_study
        from models.settings import get_settings

        settings = get_settings()
        pacs = PacsClient.from_settings(settings)
        router = RouterClient.from_settings(settings)
        result["rss_ready_kib"] = status_kib("VmRSS")
        started = time.perf_counter()
        for round_ in range(repeat):
            report = route_study(
                pacs,
                router,
                study_instance_uid=study_uid,
                accession_number=accession if repeat == 1 else f"{accession[:12]}{round_:04d}",
                patient_id="P02478375538",
                encoded=mode == "route",
                read_ahead=4 if mode == "route" else 0,
            )
        result["elapsed_s"] = (time.perf_counter() - started) / repeat
        result["sent"] = report.sent_instance
    result["vm_hwm_kib"] = status_kib("VmHWM")
    result.update(counted)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
