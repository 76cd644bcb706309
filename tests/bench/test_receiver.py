"""The benchmarks' receiver: emptied between runs without deleting its files, so storescp overwrites them.

Why it matters: on an ext4 without a journal (this machine's root filesystem) a file created soon after others
were deleted costs an inode-bitmap scan, which made the benchmarks' own deletions most of storescp's CPU
(bench/RESULTS.md). These tests pin the behaviour the figures rely on: nothing is deleted, the next run's files are
the same inodes, and only the files written since the last clear count as received.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from bench.common import Receiver
from stack.dcmtk import StoreSCP, storescu
from stack.studies import StudySpec, write_study

pytestmark = pytest.mark.integration


def test_clear_keeps_the_files_and_the_next_run_overwrites_the_same_inodes(storescp: StoreSCP, tmp_path: Path) -> None:
    receiver = Receiver("test", storescp, "router-test")
    study = tmp_path / "study"
    sent = write_study(StudySpec(series=1, instances_per_series=3), study)

    assert storescu(storescp.host, storescp.port, [study], called_aet=storescp.aet).ok
    first = storescp.wait_for_files(len(sent))
    inodes = {path.name: path.stat().st_ino for path in first}
    assert len(first) == len(sent)

    receiver.clear()

    assert receiver.received() == []
    assert sorted(path.name for path in receiver.directory.glob("*.dcm")) == sorted(inodes)

    assert storescu(storescp.host, storescp.port, [study], called_aet=storescp.aet).ok
    second = storescp.wait_for_files(len(sent))
    assert {path.name: path.stat().st_ino for path in second} == inodes
    assert all(path.stat().st_size > 0 for path in second)


def test_only_files_written_since_the_clear_are_received(storescp: StoreSCP, tmp_path: Path) -> None:
    receiver = Receiver("test", storescp, "router-test")
    first, second = write_study(StudySpec(series=1, instances_per_series=2), tmp_path / "study")
    assert storescu(storescp.host, storescp.port, [first, second], called_aet=storescp.aet).ok
    assert len(storescp.wait_for_files(2)) == 2
    receiver.clear()

    assert storescu(storescp.host, storescp.port, [second], called_aet=storescp.aet).ok

    received = storescp.wait_for_files(2, timeout_s=0.5)  # only one is written: waits, then says so
    assert [pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in received] == [second.stem]
