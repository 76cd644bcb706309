"""Where the time goes: py-spy samples a worker routing the 300-slice study, in the previous design and now.

py-spy (added to .venv for the benchmarks) records the child process (bench/child.py, 10 routings in a row) at
1 kHz, only the thread holding the GIL (--gil): a sample is Python doing work, so the shares say where the
interpreter's time went (waits and the kernel's socket copies do not count). Frames are grouped into what they do, and
the shares are printed with the heaviest functions; the stacks, folded small, stay in
bench/results/profile-*.folded for a flame graph (flamegraph.pl or speedscope).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, load, log, machine, stack, table, write_results
from bench.methods import new_accession
from stack.studies import StudySpec

REPO = Path(__file__).resolve().parent.parent
ROUTINGS = 10

# First match wins, innermost frame outwards: what a CPU sample was doing.
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("pydicom decode (dcmread)", re.compile(r"pydicom/filereader|dcmread|_read_part10")),
    ("pydicom/pynetdicom encode", re.compile(r"pydicom/filewriter|^encode \(.*dsutils|encode_data_set")),
    ("edit + pre-flight (models/dicom.py)", re.compile(r"models/dicom\.py")),
    ("pynetdicom DUL + reactor threads", re.compile(r"pynetdicom/(dul|fsm|association|pdu|pdu_items|transport|timer)")),
    ("pynetdicom DIMSE (fragments, messages)", re.compile(r"pynetdicom/dimse")),
    (
        "wire: build request, write it, read the response",
        re.compile(r"^(WireChannel|_send_buffers|p_data_buffers|parse_store_response|c_store_command).*router\.py"),
    ),
    ("PACS: HTTP read + multipart", re.compile(r"clients/pacs\.py|dicomweb_client|urllib3|requests/|http/client")),
    ("router client (pre-flight, statuses)", re.compile(r"clients/router\.py")),
    ("routing glue (read-ahead hand-off, listing)", re.compile(r"clients/routing\.py")),
]


def run(*, rounds: int = ROUTINGS) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is needed: .venv/bin/pip install py-spy")
    results: dict[str, Any] = {"benchmark": "profile", "machine": machine(), "routings": rounds, "modes": {}}
    with stack() as st:
        uid = st.upload(StudySpec(series=1, instances_per_series=300, rows=512, columns=512))
        env = {**os.environ, **st.gateway_env("default")}
        for mode in ("route_before", "route"):
            log(f"profile: {mode}, {rounds} routings under py-spy, load {load()}")
            raw = RESULTS_DIR / f"profile-{mode}.txt"
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            command = [
                spy,
                "record",
                "--format",
                "raw",
                "--rate",
                "1000",
                "--gil",
                "--threads",
                "--output",
                str(raw),
                "--",
            ]
            command += [sys.executable, "-m", "bench.child", mode, uid, new_accession(), str(rounds)]
            subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True)
            results["modes"][mode] = summarise(raw)
            fold(raw, RESULTS_DIR / f"profile-{mode}.folded")
            raw.unlink()
    results["load_at_end"] = load()
    write_results("profile", results)
    print(report(results))
    return results


def summarise(path: Path) -> dict[str, Any]:
    """CPU samples by category and by function (self time), from py-spy's collapsed stacks."""
    categories: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        if "importlib" in stack_text or not any(
            key in frame for frame in frames for key in ("routing.py", "router.py", "pynetdicom")
        ):
            continue  # imports and start-up, not the routing
        total += count
        functions[_short(frames[-1])] += count
        for frame in reversed(frames):
            category = next((name for name, pattern in CATEGORIES if pattern.search(frame)), None)
            if category is not None:
                categories[category] += count
                break
        else:
            categories["other"] += count
    return {
        "samples": total,
        "categories": {name: round(100 * n / total, 1) for name, n in categories.most_common()},
        "top_functions": [(name, round(100 * n / total, 1)) for name, n in functions.most_common(12)],
    }


def fold(raw: Path, folded: Path, min_share: float = 0.002) -> None:
    """Keep the stacks small enough to commit: line numbers and site-packages paths dropped, identical stacks
    merged, stacks under 0.2% of the samples left out. Still a valid input for flamegraph.pl or speedscope."""
    merged: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if stack_text and "importlib" not in stack_text:  # start-up imports are not the routing
            thread, *frames = stack_text.split(";")
            name = re.sub(r"thread \(\d+\): |-\d+|@\d+", "", thread)  # one entry per kind of thread
            merged[";".join([name, *(_short(frame) for frame in frames)])] += int(count_text)
    total = sum(merged.values()) or 1
    kept = [f"{stack} {count}" for stack, count in merged.most_common() if count / total >= min_share]
    folded.write_text("\n".join(kept) + "\n")


def _short(frame: str) -> str:
    return re.sub(r" \((?:.*/)?(site-packages/)?([^/]+/[^/]+\.py|[^/]+\.py):\d+\)", r" (\2)", frame)


def report(results: dict[str, Any]) -> str:
    out = []
    for mode, data in results["modes"].items():
        out.append(f"\n### {mode}: {data['samples']} CPU samples at 1 kHz over {results['routings']} routings\n")
        out.append(table(["what the CPU did", "% of samples"], list(data["categories"].items())))
        out.append("")
        out.append(table(["function (self)", "%"], data["top_functions"]))
    return "\n".join(out)
