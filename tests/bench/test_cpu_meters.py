"""The benchmarks' CPU meters: the whole machine's busy time next to each process's own.

Item 3's bound (bench/RESULTS.md) divides the cores by the CPU a study costs; the machine-wide meter is what counts
the kernel's work outside any process (loopback TCP in softirq context, writeback). These tests pin which
/proc/stat columns count as busy and that the meter moves with real work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import cpu_seconds, machine_cpu_seconds

TICKS = os.sysconf("SC_CLK_TCK")


def test_busy_is_user_nice_system_irq_softirq_and_not_idle_iowait_steal_guest(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  1000 20 300 9000 400 5 70 800 60 6\ncpu0 500 10 150 4500 200 2 35 400 30 3\n")

    assert machine_cpu_seconds(stat) == (1000 + 20 + 300 + 5 + 70) / TICKS


def test_the_machine_meter_counts_at_least_what_this_process_burns() -> None:
    machine_before, own_before = machine_cpu_seconds(), cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    machine_used = machine_cpu_seconds() - machine_before
    own_used = cpu_seconds(os.getpid()) - own_before

    assert own_used >= 0.2
    assert machine_used >= own_used - 2 / TICKS  # both are read in clock ticks
