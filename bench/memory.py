"""Item 2 (and its part of 6): a 1 GB study (2000 CT slices) through the gateway, and its peak RSS.

Each routing runs in a fresh worker process (bench/child.py) so its peak RSS (VmHWM) is its own: `flow` is the
real dicom_process flow on the Prefect server (a worker's shape; PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK in its
environment, named by deployments.serve.pin_result_storage as `satset serve` names it for its flow-run
processes), `route` is route_study alone. The study has
4 series (a CT with several reconstructions), and the gateway asks for one series per request: no response is
the whole study. Orthanc's RSS is sampled during the routing to show what the PACS holds. Doubling: 4000 slices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import (
    RssSampler,
    fmt,
    load,
    log,
    machine,
    mib,
    stack,
    summary,
    table,
    verify_received,
    write_results,
)
from bench.methods import new_accession
from stack.prefect_server import PrefectServer
from stack.studies import StudySpec

SERIES = 4
TARGET_MIB = 200
REPO = Path(__file__).resolve().parent.parent


def run(
    *, runs: int = 3, sizes: tuple[int, ...] = (2000, 4000), prefect_server: PrefectServer | None = None
) -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "memory", "machine": machine(), "runs": runs, "sizes": {}}
    with stack(prefect=True, prefect_server=prefect_server) as st:
        receiver = st.receivers["default"]
        for size in sizes:
            spec = StudySpec(
                series=SERIES, instances_per_series=size // SERIES, rows=512, columns=512, accession_number="PACS1"
            )
            log(f"memory: uploading a {size}-instance study ({size * 0.5:.0f} MB) to Orthanc")
            uid = st.upload(spec)
            env = {**os.environ, **st.gateway_env("default")}
            modes = ["flow", "route"] + (["route_before"] if size == sizes[0] else [])
            samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
            for round_ in range(runs):
                for mode in modes:
                    if mode == "route_before" and round_ > 0:
                        continue  # slow and only for reference
                    log(f"memory: {size} instances, {mode}, round {round_ + 1}/{runs}, load {load()}")
                    receiver.clear()
                    acsn = new_accession()
                    samples[mode].append(_one(env, mode, uid, acsn, st.orthanc.pid))
                    verify_received(receiver, size, acsn, timeout_s=60)
            results["sizes"][str(size)] = {
                "study_mib": mib(size * (512 * 512 * 2 + 1000)),
                "series": SERIES,
                "modes": {mode: _summarise(values) for mode, values in samples.items() if values},
                "load": load(),
            }
            st.orthanc.delete_all()
    results["load_at_end"] = load()
    write_results("memory", results)
    print(report(results))
    return results


def _one(env: dict[str, str], mode: str, uid: str, acsn: str, orthanc_pid: int | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.child", mode, uid, acsn]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert orthanc_pid is not None
    with RssSampler(process.pid, interval_s=0.05) as gateway, RssSampler(orthanc_pid, interval_s=0.05) as orthanc:
        stdout, _ = process.communicate(timeout=900)
    if process.returncode != 0:
        raise RuntimeError(f"bench.child {mode} exited with {process.returncode}")
    measured = json.loads(stdout.strip().splitlines()[-1])
    orthanc_start = orthanc.samples[0][1] if orthanc.samples else 0
    return {
        **measured,
        "sampled_peak_rss_kib": gateway.peak // 1024,
        "orthanc_rss_start_kib": orthanc_start // 1024,
        "orthanc_rss_peak_kib": orthanc.peak // 1024,
    }


def _summarise(values: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "peak_rss_mib": summary([v["vm_hwm_kib"] / 1024 for v in values]),
        "rss_ready_mib": summary([v["rss_ready_kib"] / 1024 for v in values]),
        "elapsed_s": summary([v["elapsed_s"] for v in values]),
        "orthanc_rss_growth_mib": summary(
            [(v["orthanc_rss_peak_kib"] - v["orthanc_rss_start_kib"]) / 1024 for v in values]
        ),
        "wado_requests": values[0]["requests"],
        "largest_response_mib": mib(values[0]["largest_response_bytes"]),
        "met": all(v["vm_hwm_kib"] / 1024 < TARGET_MIB for v in values),
    }


def _mib_range(stats: dict[str, Any]) -> str:
    return f"{stats['median']:.1f} ({stats['min']:.1f}-{stats['max']:.1f})"


def report(results: dict[str, Any]) -> str:
    rows = []
    for size, block in results["sizes"].items():
        for mode, s in block["modes"].items():
            rows.append(
                [
                    f"{size} ({block['study_mib']:.0f} MiB, {block['series']} series)",
                    mode,
                    _mib_range(s["peak_rss_mib"]),
                    f"{s['rss_ready_mib']['median']:.0f}",
                    fmt(s["elapsed_s"]),
                    f"{s['wado_requests']} / {s['largest_response_mib']:.0f} MiB",
                    f"{s['orthanc_rss_growth_mib']['median']:.0f}",
                    "met" if s["met"] else "NOT met",
                ]
            )
    header = [
        "instances",
        "worker",
        "peak RSS MiB (min-max)",
        "RSS before routing MiB",
        "time s",
        "WADO requests / largest response",
        "Orthanc RSS growth MiB",
        f"< {TARGET_MIB} MiB",
    ]
    return "\n" + table(header, rows)
