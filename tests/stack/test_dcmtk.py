"""dcmtk storescu and storescp as test peers: one association, every file delivered, loopback only."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
import pytest

from stack.dcmtk import StoreSCP, find_tool, storescu
from stack.orthanc import OrthancServer
from stack.ports import LOOPBACK, free_port
from stack.studies import StudySpec, write_study
from tests.plugins.pacs import listening_addresses, require, unique_accession

pytestmark = pytest.mark.integration


def test_storescu_delivers_every_file_to_storescp(storescp: StoreSCP, tmp_path: Path) -> None:
    sent = write_study(StudySpec(series=2, instances_per_series=4), tmp_path / "study")

    result = storescu(storescp.host, storescp.port, [tmp_path / "study"], called_aet=storescp.aet)

    assert result.ok, result.stderr
    assert result.stores_succeeded == len(sent)
    assert result.stderr.count("Requesting Association") == 1
    received = storescp.wait_for_files(len(sent))
    assert {pydicom.dcmread(p).SOPInstanceUID for p in received} == {p.stem for p in sent}


def test_storescp_listens_on_loopback_only(storescp: StoreSCP) -> None:
    assert listening_addresses(storescp.port) == {LOOPBACK}


def test_storescp_pid_is_the_running_storescp_until_stopped(tmp_path: Path) -> None:
    require(find_tool("storescp") is not None, "dcmtk storescp (Debian package 'dcmtk')")
    scp = StoreSCP(tmp_path / "received")
    assert scp.pid is None
    with scp:
        assert scp.pid is not None
        assert Path(f"/proc/{scp.pid}/comm").read_text().strip() == "storescp"
    assert scp.pid is None


def test_storescu_to_a_closed_port_returns_a_failure(tmp_path: Path) -> None:
    require(storescu_available(), "dcmtk storescu (Debian package 'dcmtk')")
    (path,) = write_study(StudySpec(series=1, instances_per_series=1), tmp_path / "study")

    result = storescu(LOOPBACK, free_port(), [path])

    assert not result.ok
    assert "Association Request Failed" in result.stderr


def test_stop_ends_storescp(tmp_path: Path) -> None:
    require(storescu_available(), "dcmtk storescp (Debian package 'dcmtk')")
    scp = StoreSCP(tmp_path / "received", aet="ROUTER")
    scp.start()
    port = scp.port
    assert scp.running

    scp.stop()

    assert not scp.running
    assert listening_addresses(port) == set()


def test_storescu_into_orthanc_dicom_port(orthanc: OrthancServer, tmp_path: Path) -> None:
    spec = StudySpec(accession_number=unique_accession(), series=1, instances_per_series=3)
    write_study(spec, tmp_path / "study")

    result = storescu(LOOPBACK, orthanc.dicom_port, [tmp_path / "study"], called_aet=orthanc.aet)

    try:
        assert result.ok, result.stderr
        found = httpx.get(
            f"{orthanc.dicomweb_url}/studies", params={"AccessionNumber": spec.accession_number}, auth=orthanc.auth
        ).json()
        assert [study["00201208"]["Value"] for study in found] == [[3]]
    finally:
        for study_id in orthanc.study_ids():
            answer = orthanc.client.get(f"/studies/{study_id}").json()
            if answer["MainDicomTags"].get("StudyInstanceUID") == spec.study_instance_uid:
                orthanc.delete_study(study_id)


def storescu_available() -> bool:
    from stack.dcmtk import find_tool

    return find_tool("storescu") is not None and find_tool("storescp") is not None
