"""The receiver's filesystem: what deleting the last run's files costs storescp (the router's stand-in).

Every benchmark empties the receiver between runs. It used to delete the files; on this machine's root filesystem
(ext4 without a journal) creating a file then scans past every inode deleted in the last minutes (the kernel's
`recently_deleted` check in its inode allocator), so storescp paid for the benchmark's own deletions on the
measured path. `Receiver.clear` now empties the files instead and storescp overwrites them (a run sends the same
instances again: same names). The kernel skips inodes deleted in the last 60 s (360 s while their inode table block
is dirty), so the cost grows with how many files were deleted in the last minutes: one study deleted now and then
costs nothing measurable; the 2400 files item 3 deleted every few seconds did.

This measures both ways side by side in item 3's setting: 8 CT studies of 300 slices routed one after another by
route_study to storescp --fork (16 KB PDUs), the receiver emptied before each run by deleting its files or by
emptying them, in alternating order; storescp's CPU seconds per study and the wall time of the 8 studies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.common import (
    ROUTER_AET,
    Receiver,
    cpu_seconds,
    fmt,
    load,
    log,
    machine,
    ratio,
    stack,
    summary,
    table,
    timed,
    verify_received,
    write_results,
)
from bench.concurrency import STUDIES
from bench.methods import bench_pacs, rotate, route_confirmed
from clients.router import RouterClient
from stack.studies import StudySpec

POLICIES = ["delete", "overwrite"]
"""How the receiver is emptied before a run: its files deleted (as before), or emptied and overwritten (now)."""


def run(*, runs: int = 5, size: int = 300) -> dict[str, Any]:
    results: dict[str, Any] = {
        "benchmark": "receiver",
        "machine": machine(),
        "runs": runs,
        "studies": STUDIES,
        "size": size,
    }
    with stack(receivers=[("fork", ("--fork",))]) as st:
        receiver = st.receivers["fork"]
        results["filesystem"] = _filesystem(receiver.directory)
        scp_pid = receiver.scp.pid
        if scp_pid is None:
            raise RuntimeError("storescp is not running")
        uids = [
            st.upload(StudySpec(series=1, instances_per_series=size, rows=512, columns=512)) for _ in range(STUDIES)
        ]
        pacs = bench_pacs(st.orthanc.dicomweb_url)
        router = RouterClient(receiver.scp.host, receiver.scp.port, ROUTER_AET)

        def route_all() -> None:
            for uid in uids:
                route_confirmed(pacs, router, uid)

        def once(policy: str) -> tuple[float, float]:
            _empty(receiver, policy)
            before = cpu_seconds(scp_pid, reaped_children=True)
            wall, _ = timed(route_all)
            verify_received(receiver, STUDIES * size, None, timeout_s=60)
            return wall, (cpu_seconds(scp_pid, reaped_children=True) - before) / STUDIES

        log(f"receiver: {STUDIES} x {size} instances on {results['filesystem']}: warm-up")
        for policy in POLICIES:
            once(policy)
        walls: dict[str, list[float]] = {policy: [] for policy in POLICIES}
        cpu: dict[str, list[float]] = {policy: [] for policy in POLICIES}
        for round_ in range(runs):
            log(f"receiver: round {round_ + 1}/{runs}, load {load()}")
            for policy in rotate(POLICIES, round_):
                wall, used = once(policy)
                walls[policy].append(wall)
                cpu[policy].append(used)
    results["wall_s"] = {policy: summary(values) for policy, values in walls.items()}
    results["storescp_cpu_s"] = {policy: summary(values) for policy, values in cpu.items()}
    results["delete_over_overwrite"] = {
        "wall": ratio(results["wall_s"]["delete"], results["wall_s"]["overwrite"]),
        "storescp_cpu": ratio(results["storescp_cpu_s"]["delete"], results["storescp_cpu_s"]["overwrite"]),
    }
    results["load_at_end"] = load()
    write_results("receiver", results)
    print(report(results))
    return results


def _empty(receiver: Receiver, policy: str) -> None:
    if policy == "delete":
        for path in receiver.directory.glob("*.dcm"):
            path.unlink()
    else:
        receiver.clear()


def _filesystem(directory: Path) -> str:
    """The filesystem holding `directory` (type and mount options, from /proc/mounts: the longest mount prefix)."""
    best = ("", "?", "?")
    resolved = str(directory.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _device, mount, kind, options, *_ = line.split()
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
            best = (mount, kind, options)
    return f"{best[1]} at {best[0]} ({best[2]})"


def report(results: dict[str, Any]) -> str:
    rows = [
        [
            policy,
            fmt(results["wall_s"][policy]),
            fmt(results["storescp_cpu_s"][policy]),
        ]
        for policy in POLICIES
    ]
    ratios = results["delete_over_overwrite"]
    header = ["receiver emptied by", "8 studies, wall s median (min-max)", "storescp CPU s per study, median (min-max)"]
    return "\n".join(
        [
            f"\n### {results['studies']} x {results['size']} instances one after another, storescp --fork on "
            f"{results['filesystem']} "
            f"(load at end {results['load_at_end']})\n",
            table(header, rows),
            f"\ndelete / overwrite: wall {ratios['wall']}x, storescp CPU {ratios['storescp_cpu']}x; "
            f"{os.cpu_count()} cores",
        ]
    )
