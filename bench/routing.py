"""Item 1 (and its part of 6): one CT study, PACS -> edit -> router, the gateway against the other ways.

A generated CT study (1 series, 512x512 16-bit slices, about 0.5 MB each) is stored in Orthanc; dcmtk storescp
(writing files, TCP_NODELAY=1 like every dcmtk process and Orthanc) stands in for the router. Every method runs in
every round, in a rotating order, and every run is checked (all files arrived, AccessionNumber edited).

Rows: a_flow is the real `dicom_process` flow on a Prefect server (its wall time, and inside it the route_study
time and the PACS listing), run as `satset serve` runs it: the default result storage named by
deployments.serve.pin_result_storage (bench.common.served_flows), so no flow run asks the server for it;
a_route is route_study called directly (the design now in clients/); a_route_1thread the same without the
read-ahead thread; a_before the design it replaced (pydicom decode, pynetdicom encode and send); a_bytes keeps
the bytes encoded but sends them through pynetdicom's own DIMSE/DUL path; b, c, d as in the issue.
Receivers: storescp's default 16 KB maximum PDU (what the official router, pynetdicom's default, also accepts)
and, for a subset, 128 KB given to the receiver (so to every sender alike).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import (
    LARGE_PDU,
    BenchError,
    Stack,
    fmt,
    load,
    log,
    machine,
    paired_ratios,
    ratio,
    stack,
    summary,
    table,
    verify_received,
    write_results,
)
from bench.methods import (
    DirectRouter,
    FlowRunner,
    OrthancModifyStore,
    RouteTimer,
    existing_gateway,
    new_accession,
    remove_tree,
    rotate,
    storescu_from_disk,
    write_edited_files,
)
from stack.prefect_server import PrefectServer
from stack.studies import StudySpec

DISK_ACCESSION = "DISK0001"

VARIANTS = [
    "a_flow",
    "a_flow_no_routing",
    "a_route",
    "a_route_1thread",
    "a_before",
    "a_bytes",
    "b_existing",
    "c_orthanc",
    "d_storescu",
]
LARGE_PDU_METHODS = ["a_flow", "a_route", "a_bytes", "c_orthanc", "d_storescu"]
DOUBLED_METHODS = ["a_flow", "a_route", "b_existing", "c_orthanc", "d_storescu"]
LABELS = {
    "a_flow": "(a) dicom_process flow, end to end",
    "a_flow_no_routing": "the same flow, route_study replaced by a no-op (Prefect's share)",
    "a_route": "(a) route_study alone (no Prefect)",
    "a_route_1thread": "(a) route_study, no read-ahead thread",
    "a_before": "previous design: pydicom decode + pynetdicom encode/send",
    "a_bytes": "idea 2 alone: encoded bytes through pynetdicom's DIMSE/DUL",
    "b_existing": "(b) existing gateway: WADO + dcmodify + storescu per instance",
    "c_orthanc": "(c) Orthanc modify + store-to-modality",
    "d_storescu": "(d) storescu of edited files from disk, 1 association",
}


def run(
    *,
    runs: int = 5,
    sizes: tuple[int, ...] = (300, 600),
    large_pdu: bool = True,
    prefect_server: PrefectServer | None = None,
) -> dict[str, Any]:
    receivers = [("16k", ())]
    if large_pdu:
        receivers.append(("128k", ("--max-pdu", str(LARGE_PDU))))
    results: dict[str, Any] = {"benchmark": "routing", "machine": machine(), "runs": runs, "sizes": {}}
    with stack(receivers=receivers, prefect=True, prefect_server=prefect_server) as st:
        timer = RouteTimer().install()
        flow = FlowRunner(st, timer)
        direct = DirectRouter(st, timer)
        orthanc = OrthancModifyStore(st)
        try:
            for size in sizes:
                spec = StudySpec(
                    series=1, instances_per_series=size, rows=512, columns=512, accession_number="PACS0001"
                )
                log(f"routing: uploading a {size}-instance CT study to Orthanc")
                uid = st.upload(spec)
                edited = st.workdir / f"edited-{size}"
                write_edited_files(spec, edited, DISK_ACCESSION)
                by_pdu: dict[str, Any] = {}
                for pdu, _ in receivers:
                    if size == sizes[0]:
                        methods = VARIANTS if pdu == "16k" else LARGE_PDU_METHODS
                    elif pdu == "16k":
                        methods = DOUBLED_METHODS
                    else:
                        continue
                    by_pdu[pdu] = _measure(st, flow, direct, orthanc, pdu, uid, size, edited, methods, runs)
                results["sizes"][str(size)] = by_pdu
                remove_tree(edited)
                st.orthanc.delete_all()
        finally:
            orthanc.close()
            flow.close()
            timer.uninstall()
    results["load_at_end"] = load()
    results["scaling"] = _scaling(results, sizes)
    write_results("routing", results)
    print(report(results))
    return results


def _measure(
    st: Stack,
    flow: FlowRunner,
    direct: DirectRouter,
    orthanc: OrthancModifyStore,
    pdu: str,
    uid: str,
    size: int,
    edited: Path,
    methods: list[str],
    runs: int,
) -> dict[str, Any]:
    receiver = st.receivers[pdu]
    scratch = st.workdir / "existing-gateway-tmp"

    def one(method: str) -> dict[str, float]:
        acsn = new_accession()
        receiver.clear()
        if method == "a_flow":
            timings = flow.run(pdu, uid, acsn)
        elif method == "a_flow_no_routing":
            return {"wall_s": flow.run(pdu, uid, acsn, stub=True)["wall_s"]}
        elif method == "a_route":
            timings = direct.run(pdu, uid, acsn, encoded=True, read_ahead=4)
        elif method == "a_route_1thread":
            timings = direct.run(pdu, uid, acsn, encoded=True, read_ahead=0)
        elif method == "a_before":
            timings = direct.run(pdu, uid, acsn, encoded=False, read_ahead=0, kind="pynetdicom")
        elif method == "a_bytes":
            timings = direct.run(pdu, uid, acsn, encoded=True, read_ahead=0, kind="bytes")
        elif method == "b_existing":
            timings = existing_gateway(st, receiver, uid, acsn, scratch)
        elif method == "c_orthanc":
            timings = orthanc.run(receiver, uid, acsn)
        elif method == "d_storescu":
            acsn = DISK_ACCESSION
            timings = storescu_from_disk(receiver, edited, size)
        else:
            raise ValueError(method)
        if "wall_s" not in timings:
            timings["wall_s"] = timings["route_s"]
        verify_received(receiver, size, acsn)
        return timings

    log(f"routing: {size} instances, receiver {pdu}: warm-up")
    for method in methods:
        if method != "b_existing":
            one(method)
    samples: dict[str, list[dict[str, float]]] = {method: [] for method in methods}
    b_runs = runs if size <= 300 else min(runs, 3)
    for round_ in range(runs):
        log(f"routing: {size} instances, receiver {pdu}: round {round_ + 1}/{runs}, load {load()}")
        for method in rotate(methods, round_):
            if method == "b_existing" and round_ >= b_runs:
                continue
            try:
                samples[method].append(one(method))
            except BenchError:
                raise
    stats = {
        method: {key: summary([s[key] for s in runs_]) for key in runs_[0]}
        for method, runs_ in samples.items()
        if runs_
    }
    return {"methods": methods, "stats": stats, "ratios": _ratios(stats, samples), "load": load()}


def _ratios(stats: dict[str, Any], samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """The issue's targets, for the flow (a_flow) and for route_study alone (a_route)."""
    out: dict[str, Any] = {}
    for a in ("a_flow", "a_route"):
        if a not in stats:
            continue
        wall = stats[a]["wall_s"]
        entry: dict[str, Any] = {}
        if "b_existing" in stats:
            value = ratio(stats["b_existing"]["wall_s"], wall)
            entry["b_over_a"] = {"value": value, "target": ">= 10", "met": value >= 10}
        if "c_orthanc" in stats:
            value = ratio(stats["c_orthanc"]["wall_s"], wall)
            paired = paired_ratios([s["wall_s"] for s in samples["c_orthanc"]], [s["wall_s"] for s in samples[a]])
            entry["c_over_a"] = {"value": value, "paired": paired, "target": ">= 1.5", "met": value >= 1.5}
        if "d_storescu" in stats:
            value = ratio(wall, stats["d_storescu"]["wall_s"])
            paired = paired_ratios([s["wall_s"] for s in samples[a]], [s["wall_s"] for s in samples["d_storescu"]])
            entry["a_over_d"] = {"value": value, "paired": paired, "target": "<= 1.5", "met": value <= 1.5}
        out[a] = entry
    if "a_before" in stats and "a_route" in stats:
        out["design_speedup"] = ratio(stats["a_before"]["wall_s"], stats["a_route"]["wall_s"])
    return out


def _scaling(results: dict[str, Any], sizes: tuple[int, ...]) -> dict[str, Any]:
    """Time at the doubled study size over time at the base size, per method (2.0 = linear)."""
    if len(sizes) < 2:
        return {}
    base, doubled = (results["sizes"][str(n)]["16k"]["stats"] for n in sizes[:2])
    return {method: ratio(doubled[method]["wall_s"], base[method]["wall_s"]) for method in doubled if method in base}


def report(results: dict[str, Any]) -> str:
    """The benchmark's tables, as printed and as pasted into bench/RESULTS.md."""
    out = []
    for size, by_pdu in results["sizes"].items():
        for pdu, block in by_pdu.items():
            stats = block["stats"]
            rows = []
            for method in block["methods"]:
                if method not in stats:
                    continue
                s = stats[method]
                detail = ", ".join(
                    f"{key[:-2]} {s[key]['median']:.3f}" for key in s if key != "wall_s" and key.endswith("_s")
                )
                rows.append([LABELS[method], fmt(s["wall_s"]), s["wall_s"]["n"], detail])
            out.append(f"\n### {size} instances, receiver max PDU {pdu} (load at end {block['load']})\n")
            out.append(table(["method", "median s (min-max)", "runs", "inside (medians, s)"], rows))
            lines = []
            for a, entry in block["ratios"].items():
                if a == "design_speedup":
                    lines.append(f"* previous design / route_study now: {entry}x")
                    continue
                parts = [
                    f"{name.replace('_over_', '/')} = {item['value']} (target {item['target']}: "
                    f"{'met' if item['met'] else 'NOT met'})"
                    for name, item in entry.items()
                ]
                lines.append(f"* {a}: " + "; ".join(parts))
            out.append("\n".join(lines))
    if results.get("scaling"):
        out.append("\n### doubling the study (time at 2x / time at 1x, 2.0 = linear)\n")
        out.append(table(["method", "ratio"], [[LABELS[m], v] for m, v in results["scaling"].items()]))
    return "\n".join(out)
